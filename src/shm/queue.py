"""`BroadcastQueue`: one writer, N readers, byte messages over a `ShmRing`; stdlib only.

Every reader receives every message, in order. The writer and each reader keep a private
sequence number n; message n lives in slot n % S. `put` waits until that slot has been read by
every reader (back-pressure: the writer is never more than S messages ahead of the slowest
reader); `get` waits until it is written. Synchronisation is by the ring's flags alone, because
the processes are started with subprocess and share no multiprocessing primitives.

Framing inside a slot of B bytes:

    +--------------------------------------------+----------------------------------------+
    | frame (16 B): nbytes u64 | oversize u8 |   | inline: the nbytes message bytes       |
    |               pad u8 | name_len u16 | pad  | oversize: name of a one-off segment    |
    +--------------------------------------------+----------------------------------------+

A message longer than B - 16 bytes goes through a one-off `SharedMemory` segment named
"<queue name>_<n>", written by the writer and copied out by each reader (readers never unlink).
The writer unlinks it once every reader has read its slot: lazily, at the next `put` that finds
the slot fully read, and in any case at `close()` (an oversize message still unread then is lost;
a reader that asks for it gets `PeerGoneError`).

Waiting (`_wait_until`): poll without sleeping for `_SPIN_S`, then sleep with exponential backoff
from `_MIN_SLEEP_S` up to `_MAX_SLEEP_S`. Spinning catches the common ping-pong case (the peer
answers within microseconds) with no syscall; sleeping afterwards gives the CPU away, which
matters when more processes than cores share a machine (CI: 2 cores, 3+ processes) - a reader
spinning forever would starve the very writer it waits for. The price is that a message arriving
during a sleep is noticed up to `_MAX_SLEEP_S` late, and only once a wait has already lasted
about twice that long. `should_abort()` is called every `_ABORT_POLL_S` during a wait; it is how
the engine notices a dead peer (e.g. `lambda: proc.poll() is not None`).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType

from shm.ring import ShmRing, open_segment

_FRAME = struct.Struct("<Q?xH4x")  # nbytes, oversize, name_len -> 16 bytes
_MIN_SLOT_BYTES = 512  # frame + the longest oversize-segment name (names are <= 255 bytes)

# With cores to spare (a GPU host), spin for a whole decode step's worth: a sleep there would add
# up to _MAX_SLEEP_S to every step. With few cores (CI), spin briefly and give the CPU away.
_SPIN_S = 5e-3 if (os.cpu_count() or 1) >= 8 else 50e-6
_MIN_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3
_ABORT_POLL_S = 0.05


class PeerGoneError(RuntimeError):
    """The process at the other end of a queue is gone (`should_abort()` returned True)."""


def _wait_until(
    ready: Callable[[], bool],
    timeout: float | None,
    should_abort: Callable[[], bool] | None,
) -> None:
    """Return once `ready()`; raise TimeoutError / PeerGoneError (see module docstring)."""
    if ready():
        return
    now = time.monotonic()
    deadline = None if timeout is None else now + timeout
    spin_until = now + _SPIN_S
    next_abort_check = now + _ABORT_POLL_S
    sleep_s = _MIN_SLEEP_S
    while not ready():
        now = time.monotonic()
        if should_abort is not None and now >= next_abort_check:
            if should_abort():
                raise PeerGoneError("peer process is gone")
            next_abort_check = now + _ABORT_POLL_S
        if deadline is not None and now >= deadline:
            raise TimeoutError(f"shared-memory queue wait timed out after {timeout} s")
        if now >= spin_until:
            time.sleep(sleep_s)
            sleep_s = min(2 * sleep_s, _MAX_SLEEP_S)


class BroadcastQueue:
    """One-writer, N-reader queue of byte messages in shared memory."""

    def __init__(self, ring: ShmRing, reader_rank: int | None) -> None:
        self._ring = ring
        self._reader_rank = reader_rank  # None for the writer
        self._seq = 0  # next message number to put (writer) or get (reader)
        self._oversize: dict[int, SharedMemory] = {}  # writer: slot -> unread one-off segment

    @classmethod
    def create(
        cls,
        num_readers: int,
        slot_bytes: int = 1 << 20,
        num_slots: int = 8,
        name: str | None = None,
    ) -> BroadcastQueue:
        """Create the queue; the returned handle is its writer. `name=None` picks one."""
        if slot_bytes < _MIN_SLOT_BYTES:
            raise ValueError(f"slot_bytes must be >= {_MIN_SLOT_BYTES}, got {slot_bytes}")
        return cls(ShmRing.create(num_readers, slot_bytes, num_slots, name), None)

    @classmethod
    def attach(cls, name: str, reader_rank: int) -> BroadcastQueue:
        """Attach as reader `reader_rank` (0 <= rank < num_readers) to the queue `name`."""
        ring = ShmRing.attach(name)
        if not 0 <= reader_rank < ring.num_readers:
            ring.close()
            raise ValueError(f"reader_rank {reader_rank} not in [0, {ring.num_readers})")
        return cls(ring, reader_rank)

    @property
    def name(self) -> str:
        """Name readers pass to `attach`."""
        return self._ring.name

    def put(
        self,
        data: bytes | bytearray | memoryview,
        timeout: float | None = None,
        should_abort: Callable[[], bool] | None = None,
    ) -> None:
        """Writer: append one message; blocks while the next slot is unread by some reader."""
        if self._reader_rank is not None:
            raise RuntimeError("put() on a reader handle")
        ring, slot = self._ring, self._seq % self._ring.num_slots
        payload = memoryview(data).cast("B")
        _wait_until(lambda: ring.writable(slot), timeout, should_abort)
        self._reap()  # includes this slot's old one-off segment: every reader has copied it
        ring.begin_write(slot)
        with ring.chunk(slot) as chunk:
            nbytes = payload.nbytes
            if _FRAME.size + nbytes <= ring.slot_bytes:
                _FRAME.pack_into(chunk, 0, nbytes, False, 0)
                chunk[_FRAME.size : _FRAME.size + nbytes] = payload
            else:
                seg_name = self._write_oversize(slot, payload).encode()
                _FRAME.pack_into(chunk, 0, nbytes, True, len(seg_name))
                chunk[_FRAME.size : _FRAME.size + len(seg_name)] = seg_name
        ring.commit(slot)
        self._seq += 1

    def get(
        self, timeout: float | None = None, should_abort: Callable[[], bool] | None = None
    ) -> bytes:
        """Reader: return the next message (a copy); blocks until it is written."""
        rank = self._reader_rank
        if rank is None:
            raise RuntimeError("get() on the writer handle")
        ring, slot = self._ring, self._seq % self._ring.num_slots
        _wait_until(lambda: ring.readable(slot, rank), timeout, should_abort)
        with ring.chunk(slot) as chunk:
            nbytes, oversize, name_len = _FRAME.unpack_from(chunk, 0)
            if oversize:
                seg_name = bytes(chunk[_FRAME.size : _FRAME.size + name_len]).decode()
                data = _copy_segment(seg_name, nbytes)
            else:
                data = bytes(chunk[_FRAME.size : _FRAME.size + nbytes])
        ring.mark_read(slot, rank)  # after the copy: the writer may now overwrite the slot
        self._seq += 1
        return data

    def close(self) -> None:
        """Unmap this handle; the writer also unlinks its pending one-off segments."""
        for seg in self._oversize.values():
            seg.unlink()
        self._oversize.clear()
        self._ring.close()

    def unlink(self) -> None:
        """Writer only: remove the queue's segment name (do it once every reader attached)."""
        if self._reader_rank is not None:
            raise RuntimeError("only the writer unlinks a BroadcastQueue")
        self._ring.unlink()

    def __enter__(self) -> BroadcastQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close; the writer also unlinks."""
        self.close()
        if self._reader_rank is None:
            self._ring.unlink()

    def _write_oversize(self, slot: int, payload: memoryview) -> str:
        """Copy `payload` into a fresh one-off segment; keep it to unlink once fully read."""
        seg = SharedMemory(name=f"{self.name}_{self._seq}", create=True, size=payload.nbytes)
        try:
            seg.buf[: payload.nbytes] = payload
        finally:
            seg.close()  # unmap now; the name (kept in self._oversize) is what we unlink later
        self._oversize[slot] = seg
        return seg.name

    def _reap(self) -> None:
        """Unlink the one-off segments of slots every reader has finished with."""
        for slot in [s for s in self._oversize if self._ring.fully_read(s)]:
            self._oversize.pop(slot).unlink()


def _copy_segment(name: str, nbytes: int) -> bytes:
    """Copy `nbytes` out of the one-off segment `name` (read-only map, never unlinked here)."""
    try:
        mapping = open_segment(name, writable=False)
    except FileNotFoundError:
        raise PeerGoneError(f"oversize segment {name!r} is gone: the writer closed") from None
    try:
        return mapping[:nbytes]
    finally:
        mapping.close()
