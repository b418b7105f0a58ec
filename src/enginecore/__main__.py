"""`python -m enginecore`: the engine-core process (one per data-parallel rank).

Started by `frontend.launch`. It binds the input address and one output address per client,
starts the workers, sends `CoreReady` to every client and runs the busy loop until told to stop
(Control "shutdown", SIGTERM/SIGINT) or until its parent dies.

On a headless node (multi-node data parallel) it gets `--head ADDR` instead of addresses: it
registers with the head node's launcher first (`enginecore/head_link.py`), which tells it how
many clients to expect, and binds tcp:// addresses on the interface that reaches the head.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from enginecore.config import EngineConfig, Env

_HEAD_TIMEOUT_S = 3600.0  # a headless node may be started long before the head


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m enginecore")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--input-addr", help="ZMQ address to bind for CoreInput")
    parser.add_argument("--output-addrs", nargs="+",
                        help="ZMQ addresses to bind, one per client index")
    parser.add_argument("--dp-rank", type=int, default=0, help="data-parallel rank of this core")
    parser.add_argument("--head", help="tcp:// registration address of the head node (instead "
                                       "of --input-addr/--output-addrs)")
    args = parser.parse_args()
    if args.head is None and (args.input_addr is None or not args.output_addrs):
        parser.error("give --input-addr and --output-addrs, or --head")
    logging.basicConfig(level=Env.LOG_LEVEL,
                        format=f"%(asctime)s enginecore{args.dp_rank} %(message)s")
    from enginecore.core import EngineCoreProc
    from enginecore.head_link import HeadLink, HeadRefusedError, local_host_towards

    proc_holder: list[EngineCoreProc] = []

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        if proc_holder:
            proc_holder[0].stopping = True
        else:
            sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    config = EngineConfig.from_json(args.config)
    input_addr, output_addrs, on_bound = args.input_addr, args.output_addrs, None
    if args.head is not None:
        parent = os.getppid()
        link = HeadLink(args.head, args.dp_rank, config.dp_fingerprint())
        try:
            num_clients = link.hello(_HEAD_TIMEOUT_S, lambda: os.getppid() != parent)
        except HeadRefusedError as e:
            logging.getLogger("enginecore").error("%s", e)
            sys.exit(3)
        host = local_host_towards(args.head)
        input_addr, output_addrs = f"tcp://{host}:*", [f"tcp://{host}:*"] * num_clients

        def on_bound(inp: str, outs: list[str]) -> None:
            link.register(inp, outs, os.getpid(), Env.PEER_TIMEOUT_S * 6)
            link.close()

    proc = EngineCoreProc(config, input_addr, output_addrs, args.dp_rank, on_bound,
                          watch_clients=args.head is not None)
    proc_holder.append(proc)
    proc.run()


if __name__ == "__main__":
    main()
