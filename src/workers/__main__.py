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
    parser.add_argument("--response", required=True, help="shm name of the response ring (rank 0)")
    args = parser.parse_args()
    logging.basicConfig(level=Env.LOG_LEVEL, format=f"%(asctime)s worker{args.rank} %(message)s")
    parent_pid = os.getppid()
    # Rank 0 creates the response ring first thing, so the core can attach while the model loads.
    outq = BroadcastQueue.create(num_readers=1, name=args.response) if args.rank == 0 else None
    inq = BroadcastQueue.attach(args.broadcast, reader_rank=args.rank)
    try:
        from workers.worker import Worker  # heavy import (torch) after the rings exist

        worker = Worker(EngineConfig.from_json(args.config), args.rank, parent_pid)
    except Exception:
        traceback.print_exc()
        if outq is not None:
            outq.put(encode(WorkerError(message=traceback.format_exc())))
        sys.exit(1)
    try:
        worker.run(inq, outq)
    finally:
        inq.close()
        if outq is not None:
            outq.close()
            outq.unlink()  # the core's mapping stays valid; only the name goes


if __name__ == "__main__":
    main()
