"""`python -m workers`: one worker process, started by the engine core's executor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from enginecore.config import EngineConfig, Env
from enginecore.protocol import WorkerError, encode
from shm import BroadcastQueue


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--broadcast", required=True, help="shm name of the step broadcast ring")
    parser.add_argument("--response", required=True, help="shm name of this rank's response ring")
    parser.add_argument("--dist-init", default=None,
                        help="torch.distributed init method (tcp://host:port) for TP > 1")
    args = parser.parse_args()
    logging.basicConfig(level=Env.LOG_LEVEL, format=f"%(asctime)s worker{args.rank} %(message)s")
    parent_pid = os.getppid()
    # Each rank creates its response ring first thing, so the core can attach while the model
    # loads (and read a startup error from any rank).
    outq = BroadcastQueue.create(num_readers=1, name=args.response)
    inq = BroadcastQueue.attach(args.broadcast, reader_rank=args.rank)
    try:
        from workers.worker import Worker  # heavy import (torch) after the rings exist

        worker = Worker(EngineConfig.from_json(args.config), args.rank, parent_pid,
                        args.dist_init)
    except Exception:
        traceback.print_exc()
        outq.put(encode(WorkerError(message=f"worker {args.rank}: {traceback.format_exc()}")))
        sys.stderr.flush()
        os._exit(1)  # as below: no interpreter teardown with a half-joined process group
    clean = False
    try:
        clean = worker.run(inq, outq)
    finally:
        inq.close()
        outq.close()
        outq.unlink()  # the core's mapping stays valid; only the name goes
    if not clean:
        # Skip interpreter teardown: a process group whose peers hang in a collective can block
        # it. The error is already on the ring.
        os._exit(1)


if __name__ == "__main__":
    main()
