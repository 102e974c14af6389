"""Writer slots and handles: what a thread or a handle takes, it gives back.

Every thread that appends holds one of the ring's ``max_writers`` lease slots.  A
thread that exits, or a handle that closes, must give its slots back, or a
long-running program (thread pools, ``multiprocessing`` tasks that get the ring
by pickle) runs out of slots, file descriptors or mappings.  A handle closed
while its threads append makes them fail with RingClosedError, and closing is
safe from several threads at once.

Slot counts are read from the ring's lease table in shared memory (a read-only
peek through a second mapping); everything else goes through the public API.
Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmflush
from shmflush import _layout, _ring

HEADER = struct.Struct("<IQ")  # writer id, sequence number; then filler
JOIN_DEADLINE_S = 10.0
APPEND_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
CLOSE_BOUND_S = 10.0  # "did not hang" bound for a close that should take milliseconds
SMALL: dict[str, Any] = {"buffer_size": 1 << 16, "buffers": 4, "lanes": 1, "sync": "none"}


def _payload(writer: int, seq: int) -> bytes:
    # Filler of varying length (0 to 40 bytes) derived from both numbers.
    extra = (writer * 7 + seq * 13) % 41
    return HEADER.pack(writer, seq) + bytes((writer + seq + i) & 0xFF for i in range(extra))


def _records(path: Path) -> list[bytes]:
    with shmflush.read(path) as reader:
        return list(reader)


def _check_file(
    path: Path, returned: dict[int, list[int]], maybe: dict[int, int] | None = None
) -> None:
    """Every returned append's record exactly once, whole, in its writer's order;
    no other record but, per writer, the one in *maybe* (an append that raised)."""
    maybe = maybe or {}
    seen: dict[int, list[int]] = {}
    for position, record in enumerate(_records(path)):
        writer, seq = HEADER.unpack_from(record)
        assert record == _payload(writer, seq), f"record {position}: bytes differ"
        seen.setdefault(writer, []).append(seq)
    for writer, seqs in seen.items():
        assert seqs == sorted(set(seqs)), f"writer {writer}: duplicated or out of order"
        allowed = {*returned.get(writer, []), maybe.get(writer)}
        stray = sorted(set(seqs) - allowed)
        assert not stray, f"writer {writer}: records never appended: {stray[:5]}"
    for writer, seqs in returned.items():
        missing = sorted(set(seqs) - set(seen.get(writer, [])))
        assert not missing, f"writer {writer}: returned appends missing, first {missing[:5]}"


def _slots_in_use(name: str) -> int:
    """Lease slots with a holder (nonzero pid) in ring *name*'s shared memory."""
    core = _ring.attach_ring(name)
    try:
        g = core.geometry
        return sum(1 for k in range(g.max_writers) if core.words[(g.lease(k) + _layout.L_PID) // 8])
    finally:
        core.unmap()


def _close_timed(ring: shmflush.Ring) -> float:
    started = time.monotonic()
    ring.close(timeout=CLOSE_TIMEOUT_S)
    return time.monotonic() - started


@contextlib.contextmanager
def _fine_grained_switching() -> Iterator[None]:
    # Switch threads every microsecond instead of every 5 ms, so that two threads
    # really interleave inside the calls under test.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


# -- thread churn ----------------------------------------------------------------------

# Not the 100,000 threads one would like: starting, running and joining one takes
# about 230 us on two idle cores (25 s for 100,000), and twice that when the cores
# are shared.  40,000 fit in about 10-20 s and still reuse each of the 8 slots
# thousands of times.
CHURN_THREADS = 40_000
CHURN_AT_ONCE = 4


def test_thread_churn_does_not_exhaust_writer_slots(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    errors: list[str] = []

    def one_append(ring: shmflush.Ring, n: int) -> None:
        try:
            ring.append(_payload(n, 0), timeout=APPEND_TIMEOUT_S)  # one writer per thread
        except Exception as exc:
            errors.append(f"thread {n}: {exc!r}")

    ring = shmflush.create(ring_name, path, max_writers=8, **SMALL)
    try:
        for first in range(0, CHURN_THREADS, CHURN_AT_ONCE):
            threads = [
                threading.Thread(target=one_append, args=(ring, n))
                for n in range(first, min(first + CHURN_AT_ONCE, CHURN_THREADS))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(JOIN_DEADLINE_S)
                assert not thread.is_alive(), f"{thread.name} did not finish"
            assert not errors, f"after {first} short-lived threads: {errors[0]}"
    finally:
        ring.close(timeout=CLOSE_TIMEOUT_S)
    _check_file(path, {n: [0] for n in range(CHURN_THREADS)})


# -- a closed handle gives its slots back ----------------------------------------------


@pytest.mark.parametrize("thread_state", ["thread_still_running", "thread_finished"])
def test_slot_is_freed_when_its_handle_closes(
    ring_name: str, tmp_path: Path, thread_state: str
) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, max_writers=1, **SMALL)
    try:
        assert _slots_in_use(ring_name) == 0
        handle = shmflush.attach(ring_name)
        appended = threading.Event()
        finish = threading.Event()
        errors: list[BaseException] = []

        def user() -> None:
            try:
                handle.append(_payload(1, 0), timeout=APPEND_TIMEOUT_S)
            except BaseException as exc:
                errors.append(exc)
            appended.set()
            finish.wait(JOIN_DEADLINE_S)

        thread = threading.Thread(target=user)
        thread.start()
        try:
            assert appended.wait(JOIN_DEADLINE_S), "the thread did not append in time"
            assert not errors, f"the thread's append raised {errors[0]!r}"
            assert _slots_in_use(ring_name) == 1
            if thread_state == "thread_finished":
                finish.set()
                thread.join(JOIN_DEADLINE_S)
            handle.close()
            assert _slots_in_use(ring_name) == 0, "the closed handle still holds a slot"
        finally:
            finish.set()
            thread.join(JOIN_DEADLINE_S)
        assert not thread.is_alive()

        # With max_writers=1 a new thread can append only in the slot given back.
        def newcomer() -> None:
            try:
                ring.append(_payload(2, 0), timeout=APPEND_TIMEOUT_S)
            except BaseException as exc:
                errors.append(exc)

        second = threading.Thread(target=newcomer)
        second.start()
        second.join(JOIN_DEADLINE_S)
        assert not second.is_alive()
        assert not errors, f"a new thread could not append: {errors[0]!r}"
    finally:
        ring.close(timeout=CLOSE_TIMEOUT_S)
    _check_file(path, {1: [0], 2: [0]})


# -- handles that travel to pool tasks -------------------------------------------------

POOL_TASKS = 200


def _append_and_count_fds(ring: shmflush.Ring, task: int) -> tuple[int, int, int]:
    """Pool task: gets the ring by pickle (an attach), appends, counts its fds."""
    # One writer id per task: the two workers' records may interleave in any order.
    ring.append(_payload(task, 0), timeout=APPEND_TIMEOUT_S)
    return os.getpid(), task, len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_handles_passed_to_pool_tasks_do_not_leak_fds(
    ring_name: str, tmp_path: Path, start_method: str
) -> None:
    path = tmp_path / "log"
    ctx = multiprocessing.get_context(start_method)
    ring = shmflush.create(ring_name, path, **SMALL)
    try:
        pool = ctx.Pool(2)
        try:
            # chunksize=1: every task is pickled, hence attached, on its own.
            results = pool.starmap_async(
                _append_and_count_fds, [(ring, t) for t in range(POOL_TASKS)], chunksize=1
            ).get(timeout=120)
            pool.close()
            joiner = threading.Thread(target=pool.join, daemon=True)
            joiner.start()
            joiner.join(JOIN_DEADLINE_S * 3)
            assert not joiner.is_alive(), "the pool's workers did not exit"
        finally:
            pool.terminate()
    finally:
        ring.close(timeout=CLOSE_TIMEOUT_S)
    by_worker: dict[int, list[tuple[int, int]]] = {}
    for pid, task, fds in results:
        by_worker.setdefault(pid, []).append((task, fds))
    for pid, counts in by_worker.items():
        counts.sort()
        first, most = counts[0][1], max(fds for _, fds in counts)
        assert most <= first + 2, (
            f"worker {pid}: {first} fds during its first task, up to {most} after "
            f"{len(counts)} tasks (last: {counts[-1][1]})"
        )
    _check_file(path, {task: [0] for task in range(POOL_TASKS)})


# -- closing a handle under its threads ------------------------------------------------

CLOSE_ROUNDS = 5
APPENDERS = 4
APPENDS_BEFORE_CLOSE = 200


def _close_under_appenders(name: str, writers: list[int], returned: dict[int, list[int]]) -> None:
    """Attach; one thread per writer appends through the handle until an append
    fails; close the handle once each has appended a while.  Every thread must
    end with RingClosedError."""
    handle = shmflush.attach(name)
    stop = threading.Event()
    ends: dict[int, BaseException | str] = {}

    def append_until_it_fails(writer: int) -> None:
        done = returned.setdefault(writer, [])
        try:
            while not stop.is_set():
                handle.append(_payload(writer, len(done)), timeout=APPEND_TIMEOUT_S)
                done.append(len(done))
            ends[writer] = "stopped by the test: no append failed after close()"
        except BaseException as exc:
            ends[writer] = exc

    threads = [threading.Thread(target=append_until_it_fails, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + JOIN_DEADLINE_S
        while any(len(returned.get(w, [])) < APPENDS_BEFORE_CLOSE for w in writers):
            assert time.monotonic() < deadline, "the threads did not get going"
            assert not ends, f"a thread ended before close(): {ends}"
            time.sleep(0.001)
        handle.close()
        for thread in threads:
            thread.join(JOIN_DEADLINE_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(JOIN_DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "a thread is stuck in append"
    wrong = {w: repr(e) for w, e in ends.items() if not isinstance(e, shmflush.RingClosedError)}
    assert not wrong, f"threads ended otherwise than with RingClosedError: {wrong}"


def test_attached_handle_closed_while_its_threads_append(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, recovery_timeout=0.05, **{**SMALL, "lanes": 2})
    returned: dict[int, list[int]] = {}
    try:
        with _fine_grained_switching():
            for round_ in range(CLOSE_ROUNDS):
                writers = [round_ * APPENDERS + t for t in range(APPENDERS)]
                try:
                    _close_under_appenders(ring_name, writers, returned)
                except AssertionError as exc:
                    raise AssertionError(f"round {round_}: {exc}") from None
        elapsed = _close_timed(ring)
    finally:
        with contextlib.suppress(Exception):
            ring.close(timeout=CLOSE_TIMEOUT_S)
    assert elapsed < CLOSE_BOUND_S, f"the owner's close() took {elapsed:.1f} s"
    # The append each thread had in flight raised: its record may be there, once.
    _check_file(path, returned, {w: len(seqs) for w, seqs in returned.items()})


# -- closing from two threads at once --------------------------------------------------

ATTACHED_CLOSE_ROUNDS = 100
OWNER_CLOSE_ROUNDS = 10


def _close_together(ring: shmflush.Ring) -> list[str]:
    """Two threads call ring.close() at the same moment; returns what they raised."""
    barrier = threading.Barrier(2, timeout=JOIN_DEADLINE_S)
    raised: list[str] = []

    def close() -> None:
        try:
            barrier.wait()
            ring.close(timeout=CLOSE_TIMEOUT_S)
        except BaseException as exc:
            raised.append(repr(exc))

    threads = [threading.Thread(target=close) for _ in range(2)]
    with _fine_grained_switching():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLOSE_BOUND_S)
    assert not any(t.is_alive() for t in threads), "a close() did not return"
    return raised


def _close_attached_from_two_threads(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, **SMALL)
    try:
        base = _slots_in_use(ring_name)
        for round_ in range(ATTACHED_CLOSE_ROUNDS):
            handle = shmflush.attach(ring_name)
            handle.append(_payload(round_, 0), timeout=APPEND_TIMEOUT_S)  # a writer per handle
            raised = _close_together(handle)
            assert not raised, f"round {round_}: close() raised {raised}"
            assert handle.closed
            with pytest.raises(shmflush.RingClosedError):
                handle.append(b"after close")
            assert _slots_in_use(ring_name) == base, f"round {round_}: a slot was not given back"
    finally:
        ring.close(timeout=CLOSE_TIMEOUT_S)
    _check_file(path, {round_: [0] for round_ in range(ATTACHED_CLOSE_ROUNDS)})


def _close_owner_from_two_threads(ring_name: str, tmp_path: Path) -> None:
    for round_ in range(OWNER_CLOSE_ROUNDS):
        name = f"{ring_name}-{round_}"
        path = tmp_path / f"log{round_}"
        ring = shmflush.create(name, path, **SMALL)
        try:
            flusher = ring.stats().flusher_pid
            for seq in range(50):
                ring.append(_payload(round_, seq), timeout=APPEND_TIMEOUT_S)
            raised = _close_together(ring)
        finally:
            with contextlib.suppress(Exception):
                ring.close(timeout=CLOSE_TIMEOUT_S)
        assert not raised, f"round {round_}: close() raised {raised}"
        assert ring.closed
        leftovers = [e for e in os.listdir("/dev/shm") if name in e]
        assert not leftovers, f"round {round_}: left in /dev/shm: {leftovers}"
        assert _gone(flusher), f"round {round_}: flusher {flusher} still running"
        # Both closes returned: everything appended is on disk.
        _check_file(path, {round_: list(range(50))})


@pytest.mark.parametrize("handle", ["attached", "owner"])
def test_close_from_two_threads_at_once(ring_name: str, tmp_path: Path, handle: str) -> None:
    """Neither close() raises ValueError or anything else.  Of the owner's two
    calls, one drains; the other waits for it or returns at once.  Once both
    returned, the ring is gone and every record is in the file."""
    if handle == "attached":
        _close_attached_from_two_threads(ring_name, tmp_path)
    else:
        _close_owner_from_two_threads(ring_name, tmp_path)


def _gone(pid: int) -> bool:
    """Wait (with a deadline) until process *pid* is gone or a zombie."""
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return True
        if stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X"):
            return True
        time.sleep(0.01)
    return False
