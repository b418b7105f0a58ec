"""Start and stop engine-core processes (each starts its workers): one per local DP rank.

Used by the CLI server and by the embedded client. A core is launched by module name, so the
frontend never imports its code (and never imports torch).

With data parallelism each local rank gets its own slice of the node's GPUs through
CUDA_VISIBLE_DEVICES: local rank i of a node sees GPUs [i*TP, (i+1)*TP) of the visible ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from enginecore.config import EngineConfig, Env


@dataclass
class CoreHandle:
    proc: subprocess.Popen
    input_addr: str
    output_addrs: list[str]
    ipc_dir: str
    dp_rank: int = 0

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
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def device_slice(config: EngineConfig, local_index: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for local DP rank `local_index`, or None to leave it unchanged."""
    p = config.parallel
    if p.data_parallel_size == 1 or p.device == "cpu":
        return None
    tp = p.tensor_parallel_size
    needed = p.local_dp_size * tp
    visible = Env.CUDA_VISIBLE_DEVICES
    devices = visible.split(",") if visible else [str(i) for i in range(needed)]
    if len(devices) < needed:
        raise ValueError(f"data_parallel_size_local ({p.local_dp_size}) x tensor_parallel_size "
                         f"({tp}) needs {needed} GPUs; CUDA_VISIBLE_DEVICES lists "
                         f"{len(devices)}")
    return ",".join(devices[local_index * tp:(local_index + 1) * tp])


def _spawn(config: EngineConfig, args: list[str], local_index: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "enginecore", "--config", config.to_json(), *args]
    env = None
    if (devices := device_slice(config, local_index)) is not None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
    # Its own process group: a terminal's Ctrl-C reaches only our process, which stops the core
    # (and the core its workers) in order; the core still exits when our process dies.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0, env=env)


def start_engine_core(config: EngineConfig, num_clients: int = 1, dp_rank: int = 0,
                      local_index: int = 0) -> CoreHandle:
    """Spawn `python -m enginecore` with ipc:// sockets in a private temp dir."""
    ipc_dir = tempfile.mkdtemp(prefix="tls-")
    input_addr = f"ipc://{ipc_dir}/in"
    output_addrs = [f"ipc://{ipc_dir}/out{i}" for i in range(num_clients)]
    proc = _spawn(config, ["--input-addr", input_addr, "--output-addrs", *output_addrs,
                           "--dp-rank", str(dp_rank)], local_index)
    return CoreHandle(proc=proc, input_addr=input_addr, output_addrs=output_addrs,
                      ipc_dir=ipc_dir, dp_rank=dp_rank)


def start_local_cores(config: EngineConfig, num_clients: int) -> list[CoreHandle]:
    """One engine core per DP rank of this node (ranks start_rank .. start_rank + local - 1)."""
    p = config.parallel
    cores: list[CoreHandle] = []
    try:
        for i in range(p.local_dp_size):
            cores.append(start_engine_core(config, num_clients, p.data_parallel_start_rank + i, i))
    except BaseException:
        for core in cores:
            core.stop()
        raise
    return cores


def start_headless_cores(config: EngineConfig, head_addr: str) -> list[CoreHandle]:
    """The engine cores of a headless node; each registers with the head at `head_addr`."""
    p = config.parallel
    cores = []
    for i in range(p.local_dp_size):
        rank = p.data_parallel_start_rank + i
        proc = _spawn(config, ["--head", head_addr, "--dp-rank", str(rank)], i)
        cores.append(CoreHandle(proc=proc, input_addr="", output_addrs=[], ipc_dir="",
                                dp_rank=rank))
    return cores
