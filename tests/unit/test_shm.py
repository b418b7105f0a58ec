"""Shared-memory transport: ShmRing flags and BroadcastQueue across real reader processes.

Readers run in separate interpreters started with subprocess (as the engine starts workers),
executing `_reader_main` from this file; they verify every message themselves and report
through their exit code and stderr.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from shm import BroadcastQueue, PeerGoneError, ShmRing

_HERE = os.path.dirname(os.path.abspath(__file__))
_SMALL_SLOT = 4096  # slot_bytes for the in-order tests: messages up to ~3 KiB stay inline
_BIG_SLOT = 64 << 10


def _plan(kind: str) -> list[int]:
    """Message sizes (bytes) the writer sends and the readers expect, by test kind."""
    if kind == "inorder":  # 1000 messages of 0..2999 bytes, hundreds of laps
        return [(i * 37) % 3000 for i in range(1000)]
    if kind == "pingpong":  # tiny messages through one slot: readers poll as the writer writes
        return [8] * 5000
    if kind == "oversize":  # inline and several-MiB messages interleaved
        return [10, 5 << 20, 0, (3 << 20) + 7, _BIG_SLOT, 100, 9 << 20, 1]
    if kind == "one":
        return [123, 1 << 20]
    raise ValueError(kind)


def _payload(i: int, size: int) -> bytes:
    """Deterministic content of message i, so every process can check it independently."""
    return random.Random(i * 1_000_003 + size).randbytes(size)


def _reader_main(name: str, rank: int, kind: str) -> None:
    """Child process: attach as `rank`, read the plan of `kind`, check each message."""
    parent = os.getppid()
    with BroadcastQueue.attach(name, rank) as q:
        if kind == "exit":  # attach and die without reading: a dead worker
            return
        for i, size in enumerate(_plan(kind)):
            got = q.get(timeout=30, should_abort=lambda: os.getppid() != parent)
            want = _payload(i, size)
            if got != want:
                sys.exit(f"reader {rank}: message {i} differs: {len(got)} bytes, want {size}")


def _spawn_reader(name: str, rank: int, kind: str) -> subprocess.Popen[str]:
    code = (
        f"import sys; sys.path.insert(0, {_HERE!r}); import test_shm; "
        "test_shm._reader_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, name, str(rank), kind],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    """Wait for readers (and their resource trackers, which hold stderr); assert success."""
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        errs.append(err)
    return errs


def _leftovers(name: str) -> list[str]:
    """Entries in /dev/shm that belong to queue `name` (its ring and one-off segments)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(name))


def _run_broadcast(kind: str, num_readers: int, slot_bytes: int, num_slots: int) -> None:
    q = BroadcastQueue.create(num_readers, slot_bytes=slot_bytes, num_slots=num_slots)
    procs = [_spawn_reader(q.name, r, kind) for r in range(num_readers)]
    try:
        try:
            for i, size in enumerate(_plan(kind)):
                q.put(
                    _payload(i, size),
                    timeout=30,
                    should_abort=lambda: any(p.poll() is not None for p in procs),
                )
        except PeerGoneError:  # a reader died early: show why
            pytest.fail("\n".join(p.communicate()[1] for p in procs if p.poll() is not None))
        _finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        q.close()
        q.unlink()
    assert _leftovers(q.name) == []


@pytest.mark.parametrize(("num_readers", "num_slots"), [(1, 4), (3, 2)])
def test_in_order_delivery_to_every_reader(num_readers: int, num_slots: int) -> None:
    # Few slots -> many laps, each lap a chance for a reader to see a stale or torn slot.
    _run_broadcast("inorder", num_readers, slot_bytes=_SMALL_SLOT, num_slots=num_slots)


def test_single_slot_ping_pong_never_shows_a_stale_message() -> None:
    # Every message is a race between a reader re-polling the slot and the writer reclaiming
    # it: catches a wrong flag order (e.g. loading W before r_i in ShmRing.readable).
    _run_broadcast("pingpong", 2, slot_bytes=1024, num_slots=1)


def test_oversize_messages_reach_every_reader_and_leak_nothing() -> None:
    _run_broadcast("oversize", 3, slot_bytes=_BIG_SLOT, num_slots=2)


def test_oversize_segment_unlinked_once_every_reader_has_read_it() -> None:
    q = BroadcastQueue.create(2, slot_bytes=_BIG_SLOT, num_slots=4)
    readers = [BroadcastQueue.attach(q.name, r) for r in range(2)]
    try:
        q.put(_payload(0, 1 << 20))
        assert len(_leftovers(q.name)) == 2  # ring + one-off segment
        assert readers[0].get(timeout=1) == _payload(0, 1 << 20)
        q.put(b"x")
        assert len(_leftovers(q.name)) == 2  # reader 1 has not read it yet: must survive
        assert readers[1].get(timeout=1) == _payload(0, 1 << 20)
        q.put(b"y")  # next put reaps the fully read segment
        assert _leftovers(q.name) == [q.name]
        q.put(_payload(3, 1 << 20))  # unread at close: close must still unlink it
    finally:
        for r in readers:
            r.close()
        q.close()
        q.unlink()
    assert _leftovers(q.name) == []


def test_wraparound_and_backpressure() -> None:
    num_slots = 3
    with BroadcastQueue.create(1, slot_bytes=1024, num_slots=num_slots) as q:
        with BroadcastQueue.attach(q.name, 0) as r:
            sent = received = 0
            for _ in range(10):  # 10 laps
                for _ in range(num_slots):
                    q.put(sent.to_bytes(4, "little"), timeout=1)
                    sent += 1
                with pytest.raises(TimeoutError):  # ring full: the reader read nothing yet
                    q.put(b"overflow", timeout=0.02)
                for _ in range(num_slots):
                    assert int.from_bytes(r.get(timeout=1), "little") == received
                    received += 1
            with pytest.raises(TimeoutError):  # drained: nothing more to read
                r.get(timeout=0.02)
    assert _leftovers(q.name) == []


def test_get_timeout_raises_timeout_error() -> None:
    with BroadcastQueue.create(1, slot_bytes=1024) as q, BroadcastQueue.attach(q.name, 0) as r:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            r.get(timeout=0.1)
        assert 0.1 <= time.monotonic() - start < 2.0
        q.put(b"late")  # the queue still works after a timed-out get
        assert r.get(timeout=1) == b"late"


def test_put_on_full_ring_with_dead_reader_raises_peer_gone() -> None:
    with BroadcastQueue.create(1, slot_bytes=1024, num_slots=2) as q:
        proc = _spawn_reader(q.name, 0, "exit")
        _finish([proc])
        q.put(b"a", timeout=1)
        q.put(b"b", timeout=1)
        start = time.monotonic()
        with pytest.raises(PeerGoneError):  # no timeout: only should_abort can end the wait
            q.put(b"c", should_abort=lambda: proc.poll() is not None)
        assert time.monotonic() - start < 2.0
    assert issubclass(PeerGoneError, RuntimeError)


def test_get_with_writer_gone_raises_peer_gone() -> None:
    with BroadcastQueue.create(1, slot_bytes=1024) as q, BroadcastQueue.attach(q.name, 0) as r:
        with pytest.raises(PeerGoneError):
            r.get(timeout=5, should_abort=lambda: True)
        q.put(b"ok")
        assert r.get(timeout=1, should_abort=lambda: False) == b"ok"


def test_reader_process_exit_does_not_unlink_segments() -> None:
    q = BroadcastQueue.create(2, slot_bytes=_BIG_SLOT, num_slots=4)
    try:
        for i, size in enumerate(_plan("one")):  # second message is oversize
            q.put(_payload(i, size), timeout=1)
        (err,) = _finish([_spawn_reader(q.name, 0, "one")])
        assert "leaked" not in err  # the child's resource tracker saw nothing of ours
        assert len(_leftovers(q.name)) == 2  # ring and the one-off segment both survive
        with BroadcastQueue.attach(q.name, 1) as r:  # and are still readable
            for i, size in enumerate(_plan("one")):
                assert r.get(timeout=1) == _payload(i, size)
    finally:
        q.close()
        q.unlink()
    assert _leftovers(q.name) == []


def test_ring_flag_state_machine() -> None:
    ring = ShmRing.create(num_readers=2, slot_bytes=64, num_slots=2)
    other = ShmRing.attach(ring.name)
    try:
        assert (other.num_readers, other.slot_bytes, other.num_slots) == (2, 64, 2)
        assert ring.writable(0) and not other.readable(0, 0)  # fresh slot
        ring.begin_write(0)
        with ring.chunk(0) as c:
            c[:5] = b"hello"
        assert not other.readable(0, 0)  # data stored but not yet committed
        ring.commit(0)
        assert other.readable(0, 0) and other.readable(0, 1) and not ring.writable(0)
        with other.chunk(0) as c:
            assert bytes(c[:5]) == b"hello"
        other.mark_read(0, 0)
        assert not other.readable(0, 0) and not ring.writable(0)  # reader 1 still pending
        other.mark_read(0, 1)
        assert ring.writable(0) and ring.fully_read(0)
        ring.begin_write(0)  # next lap: nobody may read the stale message
        assert not other.readable(0, 0) and not other.readable(0, 1)
    finally:
        other.close()
        ring.close()
        ring.unlink()
    assert _leftovers(ring.name) == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BroadcastQueue.create(1, slot_bytes=16)
    with BroadcastQueue.create(2, slot_bytes=1024) as q:
        with pytest.raises(ValueError):
            BroadcastQueue.attach(q.name, 2)
        with BroadcastQueue.attach(q.name, 0) as r:
            with pytest.raises(RuntimeError):
                r.put(b"x")
            with pytest.raises(RuntimeError):
                q.get()
    with pytest.raises(FileNotFoundError):
        BroadcastQueue.attach(q.name, 0)  # unlinked by the writer's __exit__
