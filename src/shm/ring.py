"""`ShmRing`: fixed-size data slots plus per-slot flags in one named shared-memory segment.

Dimension legend: S = num_slots, B = slot_bytes, R = num_readers (all in bytes or counts).

Segment layout (byte offsets):

    0          64          64+B        64+2B             64+S*B                 64+S*B+S*(1+R)
    +----------+-----------+-----------+-- ... --+-------+------------------------------+
    | header   | slot 0    | slot 1    |         | slot  | flags, one row per slot:     |
    | magic,S, | data      | data      |   ...   | S-1   |  slot 0: [W r0 r1 .. r(R-1)] |
    | B, R     | (B bytes) | (B bytes) |         |       |  slot 1: [W r0 r1 .. r(R-1)] |
    +----------+-----------+-----------+-- ... --+-------+------------------------------+

The 64-byte header lets a reader attach knowing only the segment name. Every flag is one byte
(0 or 1), so a store or load of a flag is a single, untearable byte access.

Flag state machine of one slot (W = written flag, r_i = read flag of reader i):

      fresh: W=0            begin_write (writer)                 commit (writer)
      or (W=1, all r=1) ──► W:=0, then every r_i:=0 ──► data ──► W:=1 ──► (W=1, all r=0)
             ▲                                                               │
             └──── every reader i: copy the data out, then r_i:=1 ◄──────────┘

- writable(slot):      W == 0 or every r_i == 1 (each reader has copied the previous message).
- readable(slot, i):   r_i == 0 and W == 1, loaded in that order (see "Load order").
- Why W:=0 *before* the r_i:=0: a reader that has finished this slot polls it again for the
  message of the next lap. If the writer cleared r_i while the stale W=1 was still set, that
  reader would see (W=1, r_i=0) and copy out the *previous* message. With W=0 first, the slot
  stays unreadable until `commit`, which sets W=1 only after all data is in place.
- Load order in `readable`: r_i first, then W. Loading W first races with `begin_write`: the
  reader could load the stale W=1 of the previous lap, the writer then store W:=0 and r_i:=0,
  and the reader load r_i=0 and copy a half-written slot. Loading r_i first is safe: seeing
  r_i=0 (which reader i itself had set to 1) means the writer's W:=0 store came before, so the
  later load of W returns 1 only after `commit`, i.e. after all the data.
- Each flag has one writer at any time: W only the writer; r_i is cleared by the writer only
  while every reader has set it (so no reader touches it), and set by reader i only while W=1.

Memory ordering assumption: x86-64 TSO. Stores become visible to other cores in program order
and loads are not reordered with older loads, so "data stores, then W:=1" is observed as such
by a reader that loads W, then the data. CPython issues these as plain stores in that order
(the calls in between are opaque to the C compiler). Weakly ordered CPUs (aarch64) would need a
real fence between the data and the flag; the stdlib offers none, so they are not supported.

Attaching never registers the segment with multiprocessing's resource tracker (Python 3.11 and
3.12 `SharedMemory(name)` does, and the tracker then unlinks the segment when the *attaching*
process exits): `open_segment` maps it through the stdlib's `_posixshmem.shm_open` directly,
the same call `SharedMemory` makes (3.13's `track=False` does the equivalent). Only the creator
registers (so a crashed creator's tracker still cleans up) and only the creator unlinks.
"""

from __future__ import annotations

import _posixshmem
import mmap
import os
import struct
from multiprocessing.shared_memory import SharedMemory

_HEADER = struct.Struct("<8sQQQ")  # magic, num_slots, slot_bytes, num_readers
_HEADER_BYTES = 64  # header padded to a cache line so slot 0 starts aligned
_MAGIC = b"SHMRING1"


def open_segment(name: str, writable: bool = True) -> mmap.mmap:
    """Map an existing segment by name without registering it with the resource tracker."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)  # the mapping keeps the segment alive; the descriptor is not needed


class ShmRing:
    """S data slots of B bytes and their written/read flags in one shared-memory segment."""

    def __init__(self, name: str, mapping: mmap.mmap | SharedMemory) -> None:
        self.name = name
        # A SharedMemory means this process created the segment: it alone may unlink it.
        self._owner: SharedMemory | None = None
        self._mmap: mmap.mmap | None = None
        if isinstance(mapping, SharedMemory):
            self._owner, buf = mapping, mapping.buf
        else:
            self._mmap, buf = mapping, memoryview(mapping)
        self._unlinked = False
        self.buf: memoryview | None = buf
        magic, num_slots, slot_bytes, num_readers = _HEADER.unpack_from(self.buf, 0)
        if magic != _MAGIC:
            self.close()
            raise ValueError(f"shared-memory segment {name!r} is not a ShmRing")
        self.num_slots: int = num_slots
        self.slot_bytes: int = slot_bytes
        self.num_readers: int = num_readers
        self._flags_off = _HEADER_BYTES + num_slots * slot_bytes
        self._row = 1 + num_readers  # flag bytes per slot: [W r0 .. r(R-1)]
        self._all_read = b"\x01" * num_readers

    @classmethod
    def create(
        cls, num_readers: int, slot_bytes: int, num_slots: int, name: str | None = None
    ) -> ShmRing:
        """Create a zeroed ring (every slot fresh and writable); `name=None` picks one."""
        if num_readers < 1 or slot_bytes < 1 or num_slots < 1:
            raise ValueError("num_readers, slot_bytes and num_slots must all be >= 1")
        size = _HEADER_BYTES + num_slots * slot_bytes + num_slots * (1 + num_readers)
        shm = SharedMemory(name=name, create=True, size=size)
        # POSIX ftruncate zero-fills, so all flags start at 0. The header is written before the
        # name is handed out, so an attacher always finds it complete.
        _HEADER.pack_into(shm.buf, 0, _MAGIC, num_slots, slot_bytes, num_readers)
        return cls(shm.name, shm)

    @classmethod
    def attach(cls, name: str) -> ShmRing:
        """Attach to a ring created by another process (or this one) by name."""
        return cls(name, open_segment(name))

    # ------------------------------------------------------------------ flags

    def writable(self, slot: int) -> bool:
        """True if the writer may overwrite `slot` (fresh, or read by every reader)."""
        off = self._flags_off + slot * self._row
        buf = self._view()
        return buf[off] == 0 or buf[off + 1 : off + self._row] == self._all_read

    def fully_read(self, slot: int) -> bool:
        """True if `slot` holds a committed message that every reader has copied out."""
        off = self._flags_off + slot * self._row
        buf = self._view()
        return buf[off] == 1 and buf[off + 1 : off + self._row] == self._all_read

    def readable(self, slot: int, reader_rank: int) -> bool:
        """True if `slot` holds a committed message reader `reader_rank` has not read yet."""
        off = self._flags_off + slot * self._row
        buf = self._view()
        # Load r_i *before* W (see "Load order" in the module docstring).
        return buf[off + 1 + reader_rank] == 0 and buf[off] == 1

    def begin_write(self, slot: int) -> None:
        """Writer: W:=0, then clear every read flag (order matters: see module docstring)."""
        off = self._flags_off + slot * self._row
        buf = self._view()
        buf[off] = 0
        buf[off + 1 : off + self._row] = bytes(self.num_readers)

    def commit(self, slot: int) -> None:
        """Writer: publish `slot` (W:=1) after all of its data has been stored."""
        self._view()[self._flags_off + slot * self._row] = 1

    def mark_read(self, slot: int, reader_rank: int) -> None:
        """Reader: release `slot` (r_i:=1) after copying its data out."""
        self._view()[self._flags_off + slot * self._row + 1 + reader_rank] = 1

    # ------------------------------------------------------------------ data

    def chunk(self, slot: int) -> memoryview:
        """View of the B data bytes of `slot`; use as `with ring.chunk(s) as c:` to release it."""
        start = _HEADER_BYTES + slot * self.slot_bytes
        return self._view()[start : start + self.slot_bytes]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unmap the segment in this process (idempotent); the segment itself stays."""
        buf, self.buf = self.buf, None
        if buf is None:
            return
        if self._owner is not None:
            self._owner.close()  # releases its own `buf` view and the mapping
        elif self._mmap is not None:
            buf.release()
            self._mmap.close()

    def unlink(self) -> None:
        """Remove the segment name (creator only); mappings elsewhere stay valid until closed."""
        if self._owner is None:
            raise RuntimeError("only the process that created a ShmRing may unlink it")
        if not self._unlinked:
            self._unlinked = True
            self._owner.unlink()

    def _view(self) -> memoryview:
        if self.buf is None:
            raise ValueError(f"ShmRing {self.name!r} is closed")
        return self.buf
