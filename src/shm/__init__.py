"""Shared-memory transport: a one-writer, N-reader broadcast queue of byte messages.

Stdlib only; knows no message types (callers send msgpack bytes). See `shm.ring` for the memory
layout and flag protocol, `shm.queue` for framing, oversize messages and waiting.
"""

from __future__ import annotations

from shm.queue import BroadcastQueue, PeerGoneError
from shm.ring import ShmRing

__all__ = ["BroadcastQueue", "PeerGoneError", "ShmRing"]
