"""Start and stop the engine-core process (which starts the workers).

Used by the CLI server and by the embedded client. The core is launched by module name, so the
frontend never imports its code (and never imports torch).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from enginecore.config import EngineConfig


@dataclass
class CoreHandle:
    proc: subprocess.Popen
    input_addr: str
    output_addrs: list[str]
    ipc_dir: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; the core stops its workers itself."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def start_engine_core(config: EngineConfig, num_clients: int = 1) -> CoreHandle:
    """Spawn `python -m enginecore` with ipc:// sockets in a private temp dir."""
    ipc_dir = tempfile.mkdtemp(prefix="tls-")
    input_addr = f"ipc://{ipc_dir}/in"
    output_addrs = [f"ipc://{ipc_dir}/out{i}" for i in range(num_clients)]
    cmd = [sys.executable, "-m", "enginecore", "--config", config.to_json(),
           "--input-addr", input_addr, "--output-addrs", *output_addrs]
    # Its own process group: a terminal's Ctrl-C reaches only our process, which stops the core
    # (and the core its workers) in order; the core still exits when our process dies.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0)
    return CoreHandle(proc=proc, input_addr=input_addr, output_addrs=output_addrs,
                      ipc_dir=ipc_dir)
