"""`python -m enginecore`: the engine-core process, started by `frontend.launch`.

It binds the input address and one output address per client, starts the workers, sends
`CoreReady` to every client and runs the busy loop until told to stop (Control "shutdown",
SIGTERM/SIGINT) or until its parent dies.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from enginecore.config import EngineConfig, Env


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m enginecore")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--input-addr", required=True, help="ZMQ address to bind for CoreInput")
    parser.add_argument("--output-addrs", required=True, nargs="+",
                        help="ZMQ addresses to bind, one per client index")
    args = parser.parse_args()
    logging.basicConfig(level=Env.LOG_LEVEL, format="%(asctime)s enginecore %(message)s")
    from enginecore.core import EngineCoreProc

    proc_holder: list[EngineCoreProc] = []

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        if proc_holder:
            proc_holder[0].stopping = True
        else:
            sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    proc = EngineCoreProc(EngineConfig.from_json(args.config), args.input_addr, args.output_addrs)
    proc_holder.append(proc)
    proc.run()


if __name__ == "__main__":
    main()
