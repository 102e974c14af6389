"""Protocol-level tests, driven step by step in one process.

The ring here has no flusher process: the test drives a ``Flusher`` object by
hand, so it can stop the protocol at exactly the interleaving it wants.  Each
regression test is named after a defect of the Rust crate listed in the design
notes (section 3).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bare import Bare, dead_claim, dead_pid, make_bare

import shmflush
from shmflush import _format
from shmflush import _layout as L
from shmflush._ring import MOVED


def test_sealer_payload_is_not_dropped(bare: Bare) -> None:
    # The record that crosses capacity seals the fill with no other writer left;
    # its own payload must land in the next fill, not vanish.
    big = bare.core.max_record - 100
    bare.ring.append(b"a" * big)
    bare.ring.append(b"b" * 500)  # crosses capacity: this writer closes fill 1
    assert bare.core.state(0) & L.CLOSED
    bare.core.seal(bare.core.words[bare.core.lane_w[0]] & L.LANE_INDEX_MASK)
    bare.flush()
    assert bare.records() == [b"a" * big, b"b" * 500]


def test_flush_waits_for_the_file_address(bare: Bare) -> None:
    # A fill that is sealed but not yet closed has no address: the flusher must not
    # take it, even with no writers left.
    bare.ring.append(b"x" * 10)
    i = bare.core.words[bare.core.lane_w[0]] & L.LANE_INDEX_MASK
    from shmflush import _atomic

    _atomic.fetch_or(bare.core.state_addr[i], L.SEALED, 5)  # sealed, not closed
    bare.flusher.take_ready()
    assert bare.flusher.pending == []
    # Closing it (as the sealer would) makes it eligible.
    bare.core.close_extent(i, bare.core.state(i) >> 32)
    _atomic.fetch_or(bare.core.state_addr[i], L.CLOSED, 5)
    bare.flush()
    assert bare.records() == [b"x" * 10]


def test_addresses_advance_by_padded_sizes(bare: Bare) -> None:
    addresses = []
    for n in (1, 100, 3000, 5000, 0):
        bare.ring.append(b"z" * n)
        i = bare.core.words[bare.core.lane_w[0]] & L.LANE_INDEX_MASK
        bare.core.seal(i)
        addresses.append(
            (bare.core.words[bare.core.address_w[i]], bare.core.words[bare.core.used_w[i]])
        )
        bare.flush()
    for (a, used), (b, _) in itertools.pairwise(addresses):
        assert a % 4096 == 0
        assert b == a + _format.segment_size(used)
    assert os.path.getsize(bare.path) % 4096 == 0
    assert bare.records() == [b"z" * n for n in (1, 100, 3000, 5000, 0)]


@pytest.mark.parametrize("buffer_size", [8192, 2 << 20])
def test_capacity_check_uses_configured_size(
    ring_name: str, tmp_path: Path, buffer_size: int
) -> None:
    b = make_bare(ring_name, tmp_path / "c.log", buffer_size=buffer_size)
    try:
        assert b.ring.max_record == buffer_size - 64 - 8
        b.ring.append(b"m" * b.ring.max_record)
        with pytest.raises(shmflush.RecordTooLargeError):
            b.ring.append(b"m" * (b.ring.max_record + 1))
        b.core.seal(b.core.words[b.core.lane_w[0]] & L.LANE_INDEX_MASK)
        b.flush()
        assert b.records() == [b"m" * b.ring.max_record]
    finally:
        b.ring.close()
        os.close(b.fd)
        L.unlink_segment(ring_name)


def test_stale_claim_in_recycled_buffer_is_abandoned_and_buffer_freed(
    ring_name: str, tmp_path: Path
) -> None:
    # Lane 0 still names (old fill, buffer x) while x was recycled and reopened as
    # lane 1's fill: exactly what a writer sees if it reads the lane word, sleeps,
    # and claims later.  The claim must not be used; the buffer must not wedge.
    b = make_bare(ring_name, tmp_path / "s.log", buffers=4, lanes=2)
    core = b.core
    try:
        b.ring.append(b"first")  # lane 0 (this thread's slot 0) opens its fill
        lw0 = core.words[core.lane_w[0]]
        x = lw0 & L.LANE_INDEX_MASK
        core.seal(x)
        b.flush()  # x's fill is written; x is IDLE again, lane 0 still names it
        assert core.state(x) & L.IDLE
        lw1 = core.words[core.lane_w[1]]
        # Make lane 1 take x: occupy every other idle buffer first.
        others = [j for j in range(4) if j != x and core.state(j) & L.IDLE]
        for j in others:
            assert core._reserve(prefer=j) == j
        # Lane 1's own buffer is among them: renumber it, as a rotator that took
        # it would, so that lane 1's fill counts as done.
        core.words[core.fill_w[lw1 & L.LANE_INDEX_MASK]] = 999
        assert core.rotate(1, lw1, core.geometry.lease(15) // 8 + 4) == MOVED
        assert core.words[core.lane_w[1]] & L.LANE_INDEX_MASK == x
        for j in others:
            core.unreserve(j)
        # Lane 0's word is now stale: (old fill, x) while x holds lane 1's fill.
        assert core.words[core.lane_w[0]] == lw0
        b.ring.append(b"second")
        assert b.ring.stats().abandoned == 1
        assert core.words[core.lane_w[0]] != lw0  # lane 0 moved on
        for k in (0, 1):
            core.seal(core.words[core.lane_w[k]] & L.LANE_INDEX_MASK)
        b.flush()
        assert all(core.state(j) & L.IDLE for j in range(4)), "a buffer never became free"
        reader = shmflush.read(b.path)
        assert list(reader) == [b"first", b"second"]
        assert reader.abandoned == 1
    finally:
        b.ring.close()
        os.close(b.fd)
        L.unlink_segment(ring_name)


def test_padding_is_zero_not_stale_data(bare: Bare) -> None:
    core = bare.core
    bare.ring.append(b"\xff" * 7000)
    i = core.words[core.lane_w[0]] & L.LANE_INDEX_MASK
    core.seal(i)
    bare.flush()
    start = core.buffer_at[i]
    assert not any(core.view[start : start + core.geometry.buffer_size]), "buffer not zeroed"
    # Reuse the same buffer with a short record: its padding must be zeros.
    bare.ring.append(b"\x01" * 10)
    j = core.words[core.lane_w[0]] & L.LANE_INDEX_MASK
    core.seal(j)
    address = core.words[core.address_w[j]]
    bare.flush()
    data = bare.path.read_bytes()[address : address + 4096]
    used_end = 64 + _format.record_size(10)
    assert data[64 + 8 : 64 + 18] == b"\x01" * 10
    assert not any(data[used_end:])


def test_manual_flush_waits_for_active_writers(bare: Bare) -> None:
    # sync() seals the open fill, but the flusher must not write it while a
    # reservation in it is still being filled (torn records).
    entered = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with bare.ring.reserve(1000) as view:
                view[:500] = b"h" * 500
                entered.set()
                assert release.wait(10)
                view[500:] = b"t" * 500
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert entered.wait(10)
        i = bare.core.words[bare.core.lane_w[0]] & L.LANE_INDEX_MASK
        bare.core.seal(i)
        bare.flush()
        assert bare.flusher.pending == []
        assert bare.path.stat().st_size == _format.DATA_START, (
            "a fill with an active writer was written"
        )
    finally:
        release.set()
        t.join(10)
    assert not t.is_alive()
    assert errors == []
    bare.flush()
    assert bare.records() == [b"h" * 500 + b"t" * 500]


class _ShortWriteFile:
    """os.pwrite stand-in that writes at most 1000 bytes per call."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = os.pwrite

    def __call__(self, fd: int, data: memoryview, offset: int) -> int:
        self.calls += 1
        return self.real(fd, data[:1000], offset)


def test_short_writes_are_completed_not_counted_as_success(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = _ShortWriteFile()
    monkeypatch.setattr(os, "pwrite", short)
    payloads = [bytes([k]) * 3000 for k in range(1, 6)]
    for p in payloads:
        bare.ring.append(p)
    for i in range(4):
        bare.core.seal(i)
    bare.flush()
    assert short.calls > 5
    assert bare.records() == payloads


def test_failed_write_keeps_buffer_and_stalls_the_ring_until_space_comes_back(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk used to break the ring for good, though nothing was lost: the
    # write is retried from shared memory, so the ring only stalls, and heals.
    import errno

    bare.ring.append(b"keep me")
    i = bare.core.words[bare.core.lane_w[0]] & L.LANE_INDEX_MASK
    bare.core.seal(i)

    def full_disk(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)
    bare.flush()
    # Not leaked, not reset: still taken and pending, with the stall in shared memory.
    assert bare.flusher.pending == [i]
    assert not bare.core.state(i) & L.IDLE
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken) == (errno.ENOSPC, False)
    bare.ring.append(b"more")  # a stall is no error: appends go on while there is room
    with pytest.raises(shmflush.RingTimeoutError, match="No space left on device") as info:
        bare.ring.sync(timeout=0.2)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    # Space comes back: the retry writes the kept buffer and clears the stall.
    monkeypatch.undo()
    bare.flusher.flush_pending(1e9)
    assert bare.records() == [b"keep me"]
    assert bare.core.state(i) & L.IDLE
    assert bare.ring.stats().stalled == 0


def test_dead_writer_mid_batch_is_recovered_keeping_its_finished_records(bare: Bare) -> None:
    # A batch claim (append_many) holds several records; its writer died after
    # finishing the first and half-writing the second.  Recovery must find the
    # claim although it starts with a valid header.
    from shmflush._recovery import Recovery

    core = bare.core
    bare.ring.append(b"before")
    lane_word = core.words[core.lane_w[0]]
    i = lane_word & L.LANE_INDEX_MASK
    # The dead writer's slot: a dead pid, its intent, its claim of two records.
    at = core.geometry.lease(9)
    first = dead_claim(core, 9, lane_word, _format.record_size(100) * 2)
    core.view[first + 8 : first + 108] = b"1" * 100
    _format.pack_record_header(core.view, first, 100)
    second = first + _format.record_size(100)
    core.view[second + 8 : second + 58] = b"2" * 50  # died here: no header
    bare.ring.append(b"after")  # a live writer's record past the dead claim
    core.seal(i)
    recovery = Recovery(core)
    for now in (0.0, 10.0):
        recovery.run(now)
    bare.flush()
    reader = shmflush.read(bare.path)
    assert list(reader) == [b"before", b"1" * 100, b"after"]
    assert reader.abandoned == 1
    assert core.state(i) & L.IDLE
    assert core.words[(at + L.L_PID) // 8] == 0  # the dead slot is free again


def test_phantom_waiters_do_not_pile_up_the_space_semaphore(bare: Bare) -> None:
    # Writers SIGKILLed while waiting for space never take themselves off the
    # waiter count; the flusher must not post for them without bound.
    core = bare.core
    core.set_header(L.H_WAITERS, 1000)
    for _ in range(10):
        core.post_space()
    assert core.space_sem is not None
    assert core.space_sem.value <= 64


def test_sweep_frees_dead_slots_whose_intent_no_longer_matters(bare: Bare) -> None:
    from shmflush._recovery import Recovery

    core = bare.core
    g = core.geometry
    stale = {
        3: L.INTENT_ROTATING,  # died rotating, reserved nothing
        4: (123 << 32) | 64,  # a claim in a fill that is long gone
        5: 0,  # nothing in flight
    }
    for k, intent in stale.items():
        at = g.lease(k)
        core.words[(at + L.L_PID) // 8] = dead_pid()
        core.words[(at + L.L_INTENT) // 8] = intent
    Recovery(core).sweep()
    for k in stale:
        assert core.words[(g.lease(k) + L.L_PID) // 8] == 0, f"slot {k} still taken"


def test_address_taken_by_a_dead_closer_is_filled_not_left_as_a_hole(bare: Bare) -> None:
    # A closer killed between taking a file address and storing it: nobody will
    # write that range.  The flusher fills it, so the file reads strictly.
    from shmflush import _atomic

    core = bare.core
    bare.ring.append(b"first")
    core.seal(core.words[core.lane_w[0]] & L.LANE_INDEX_MASK)
    bare.flush()
    _atomic.fetch_add(core.base + L.H_NEXT_ADDRESS, 16384, 5)  # the lost allocation
    bare.ring.append(b"second")
    core.seal(core.words[core.lane_w[0]] & L.LANE_INDEX_MASK)
    bare.flush()
    with pytest.raises(shmflush.CorruptFileError):
        list(shmflush.read(bare.path))
    gaps = bare.flusher.gaps
    gaps.check(100.0, closing=False)  # notices the mark is stuck
    gaps.check(200.0, closing=False)  # still stuck after the recovery timeout: fill
    assert core.header(L.H_WRITTEN_BELOW) == core.header(L.H_NEXT_ADDRESS)
    reader = shmflush.read(bare.path)
    assert list(reader) == [b"first", b"second"]
    assert reader.abandoned == 4  # four 4 KiB fillers


def test_recovery_never_abandons_a_record_between_two_dead_claims(bare: Bare) -> None:
    # Two dead claims in one fill with a live writer's finished record between
    # them: dead claim A (one 32-byte record, unfinished), the live record (32
    # bytes), dead batch claim B (64 bytes: a finished 32-byte record, then an
    # unfinished one).  "A's hole is 64 bytes" also explains the fill (B then
    # reads as a record plus a 32-byte hole), but it swallows the live record.
    from shmflush._recovery import Recovery

    core = bare.core
    bare.ring.append(b"head")
    lane_word = core.words[core.lane_w[0]]
    i = lane_word & L.LANE_INDEX_MASK
    unit = _format.record_size(24)
    a = dead_claim(core, 9, lane_word, unit)
    core.view[a + 8 : a + 20] = b"a" * 12  # died mid-copy: no header
    bare.ring.append(b"L" * 24)  # a live writer's record, acknowledged
    b = dead_claim(core, 10, lane_word, 2 * unit)
    core.view[b + 8 : b + 32] = b"B" * 24
    _format.pack_record_header(core.view, b, 24)  # B's first record: finished
    core.view[b + unit + 8 : b + unit + 16] = b"b" * 8  # the second: not
    bare.ring.append(b"tail")
    core.seal(i)
    recovery = Recovery(core)
    for now in (0.0, 10.0):
        recovery.run(now)
    bare.flush()
    reader = shmflush.read(bare.path)
    assert list(reader) == [b"head", b"L" * 24, b"B" * 24, b"tail"]
    assert reader.abandoned == 2


def _fill_every_buffer(bare: Bare) -> None:
    """Append until no buffer is free (nothing flushes a bare ring by itself)."""
    for _ in range(100):
        try:
            bare.ring.append(b"f" * 3000, timeout=0)
        except shmflush.RingTimeoutError:
            return
    raise AssertionError("100 records of 3000 bytes never filled 4 buffers of 8 KiB")


@contextlib.contextmanager
def _sigusr1_every_100_ms(handler: Callable[[int, Any], None], target: int) -> Iterator[None]:
    """Install *handler* for SIGUSR1 and send SIGUSR1 to thread *target* every 0.1 s.

    pthread_kill, not kill(getpid()): a signal sent to the process may be taken
    by any thread that does not block it, and then the waiting thread may
    never see one.
    """
    old = signal.signal(signal.SIGUSR1, handler)
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(0.1):
            signal.pthread_kill(target, signal.SIGUSR1)

    sender = threading.Thread(target=send, name="sigusr1-sender")
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(5)
        signal.signal(signal.SIGUSR1, old)


def _main_thread() -> int:
    main = threading.main_thread().ident
    assert main is not None
    assert threading.get_ident() == main  # Python runs signal handlers only there
    return main


def test_a_harmless_signal_does_not_break_an_append_waiting_for_space(bare: Bare) -> None:
    # posix_ipc raises SignalError when a signal interrupts sem_timedwait; the
    # wait must go on (PEP 475), until the append's own timeout.
    _fill_every_buffer(bare)
    handled: list[int] = []
    with (
        _sigusr1_every_100_ms(lambda signum, frame: handled.append(signum), _main_thread()),
        pytest.raises(shmflush.RingTimeoutError),
    ):
        bare.ring.append(b"waits", timeout=2)
    assert len(handled) >= 3  # the handler ran during the wait, several times
    assert bare.core.header(L.H_WAITERS) == 0


class _HandlerError(Exception):
    pass


def test_a_signal_handler_that_raises_stops_an_append_waiting_for_space(bare: Bare) -> None:
    # posix_ipc itself would replace the handler's exception with SignalError.
    _fill_every_buffer(bare)
    raised: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        # Once only: a later signal must not raise again while the test cleans up.
        if not raised:
            raised.append(signum)
            raise _HandlerError

    started = time.monotonic()
    with _sigusr1_every_100_ms(interrupt, _main_thread()), pytest.raises(_HandlerError):
        bare.ring.append(b"waits", timeout=30)
    assert time.monotonic() - started < 20  # stopped by the handler, not the timeout


def test_a_signal_taken_by_a_waiting_writer_thread_does_not_break_its_append(
    bare: Bare,
) -> None:
    # The kernel may give a process's signal to any thread; there sem_timedwait
    # fails with EINTR although that thread runs no handler.
    _fill_every_buffer(bare)
    outcome: list[BaseException | None] = []
    started = threading.Event()

    def writer() -> None:
        started.set()
        try:
            bare.ring.append(b"waits", timeout=2)
        except BaseException as exc:  # the test looks at what it was
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=writer, name="waiting-writer")
    handled: list[int] = []
    thread.start()
    assert started.wait(10)
    assert thread.ident is not None
    with _sigusr1_every_100_ms(lambda signum, frame: handled.append(signum), thread.ident):
        thread.join(20)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], shmflush.RingTimeoutError), outcome
    assert handled  # the signals did arrive, and their handler ran in the main thread
