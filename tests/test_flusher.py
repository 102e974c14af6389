"""The flusher's error handling (shmflush._flusher): a full disk, failing syncs,
a file deleted or truncated under the ring, and what the owner's close()
reports when the flusher gives up.

Unit tests drive a bare ring's ``Flusher`` by hand (tests/bare.py,
conftest's bare fixture), with os.pwrite, os.posix_fallocate or os.fdatasync replaced; the end
to end test fills a real, small tmpfs.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bare import Bare, dead_claim

import shmflush
from shmflush import _flusher, _format
from shmflush import _layout as L

# Generous "did not hang" bounds, never timing assertions.
DEADLINE_S = 10.0


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _fill_one(bare: Bare, record: bytes) -> int:
    """Append *record* in a fill of its own and seal it; returns the buffer."""
    core = bare.core
    bare.ring.append(record)
    i = core.words[core.lane_w[0]] & L.LANE_INDEX_MASK
    core.seal(i)
    return i


def _seal_all(bare: Bare) -> None:
    for i in range(bare.core.geometry.buffers):
        bare.core.seal(i)


def _own(bare: Bare) -> None:
    """Make the bare ring's handle its owner, as create() does, so that close()
    runs the owner's shutdown (with this process standing in for the flusher)."""
    bare.ring._owner_pid = os.getpid()


def _append_until_timeout(
    ring: shmflush.Ring,
    record: Callable[[int], bytes],
    timeout: float,
    acknowledged: list[bytes],
) -> shmflush.RingTimeoutError:
    """Append record(0), record(1), ... until one times out; returns that error.
    Every record whose append returned goes to *acknowledged*."""
    for k in range(100_000):
        data = record(k)
        try:
            ring.append(data, timeout=timeout)
        except shmflush.RingTimeoutError as exc:
            return exc
        acknowledged.append(data)
    raise AssertionError("100000 appends and no writer ever waited")


class _Failing:
    """Stand-in for an os function that raises OSError(*code*) while ``on``."""

    def __init__(self, real: Callable[..., Any], code: int) -> None:
        self.real = real
        self.code = code
        self.on = True
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.on:
            raise _oserror(self.code)
        return self.real(*args)


@pytest.mark.parametrize("call", ["pwrite", "posix_fallocate"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_stalls_the_ring_instead_of_breaking_it_and_it_heals_by_itself(
    bare: Bare, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    core = bare.core
    failing = _Failing(getattr(os, call), code)
    monkeypatch.setattr(os, call, failing)
    acknowledged = [b"first"]
    _fill_one(bare, b"first")
    bare.flush()
    assert failing.calls, f"the flusher never called {call}"
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken) == (code, False)
    assert not core.status() & L.STATUS_BROKEN
    # Writers are not refused: they fill the other buffers, then wait for space,
    # and a timeout says why.
    timed_out = _append_until_timeout(
        bare.ring, lambda k: bytes([k % 251]) * 1500, 0.1, acknowledged
    )
    assert len(acknowledged) > 2
    assert os.strerror(code) in str(timed_out)
    assert "it retries" in str(timed_out)
    assert isinstance(timed_out.__cause__, OSError)
    assert timed_out.__cause__.errno == code
    # Retries while the disk stays full change nothing.
    for now in (1e9, 2e9):
        bare.flush()
        bare.flusher.flush_pending(now)
    assert bare.ring.stats().stalled == code
    # Space comes back: the next retry writes everything and clears the stall.
    failing.on = False
    _seal_all(bare)
    bare.flusher.take_ready()
    bare.flusher.flush_pending(3e9)
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken) == (0, False)
    assert all(core.state(i) & L.IDLE for i in range(core.geometry.buffers))
    bare.ring.append(b"after")  # the ring takes records again
    _seal_all(bare)
    bare.flush()
    assert bare.records() == [*acknowledged, b"after"]


class _SyncLog:
    """Records every pwrite and fdatasync; fdatasync fails *failures* times."""

    def __init__(self, failures: int, code: int = errno.EIO) -> None:
        self.events: list[tuple[str, int]] = []
        self.failures = failures
        self.code = code
        self.lock = threading.Lock()
        self.real_pwrite = os.pwrite

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        with self.lock:
            self.events.append(("pwrite", offset))
        return self.real_pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            self.events.append(("fdatasync", fd))
            if self.failures:
                self.failures -= 1
                raise _oserror(self.code)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "pwrite", self.pwrite)
        monkeypatch.setattr(os, "fdatasync", self.fdatasync)

    def attempts(self) -> list[set[int]]:
        """The offsets written before each fdatasync."""
        result: list[set[int]] = []
        written: set[int] = set()
        for kind, value in self.events:
            if kind == "pwrite":
                written.add(value)
            else:
                result.append(written)
                written = set()
        return result


def test_a_failed_fdatasync_rewrites_the_whole_batch_before_it_syncs_again(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsyncgate: after a failed fdatasync the page cache may have dropped the
    # batch; syncing again would "succeed" without writing it.
    core = bare.core
    bare.flusher.sync_data = True
    log = _SyncLog(failures=2)
    log.install(monkeypatch)
    records = [b"a" * 100, b"b" * 3000, b"c" * 10]
    buffers = [_fill_one(bare, r) for r in records]
    addresses = {core.words[core.address_w[i]] for i in buffers}
    bare.flush()
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken) == (errno.EIO, False)
    for now in (1e9, 2e9):
        bare.flusher.flush_pending(now)
    assert log.attempts() == [addresses, addresses, addresses]
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken, stats.syncs) == (0, False, 1)
    assert all(core.state(i) & L.IDLE for i in buffers)
    assert bare.records() == records


def test_a_fdatasync_that_keeps_failing_breaks_the_ring_and_close_reports_the_loss(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = bare.core
    bare.flusher.sync_data = True
    log = _SyncLog(failures=10**6)
    log.install(monkeypatch)
    records = [b"x" * 100, b"y" * 200]
    buffers = [_fill_one(bare, r) for r in records]
    addresses = {core.words[core.address_w[i]] for i in buffers}
    bare.flush()
    assert not core.status() & L.STATUS_BROKEN  # one failure is retried first
    now = 0.0
    while not core.status() & L.STATUS_BROKEN and now < 100:
        now += 10
        bare.flusher.flush_pending(now)
    attempts = log.attempts()
    assert len(attempts) == _flusher._IO_ATTEMPTS
    assert all(written == addresses for written in attempts), "a retry synced without rewriting"
    stats = bare.ring.stats()
    assert (stats.broken, stats.stalled) == (True, 0)
    with pytest.raises(shmflush.RingBrokenError) as info:
        bare.ring.append(b"refused")
    assert info.value.errno == errno.EIO
    # The owner's close() after the flusher gave up (as its closing branch does).
    _own(bare)
    core.set_status(L.STATUS_FLUSHER_DONE)
    with pytest.raises(shmflush.RingBrokenError) as info:
        bare.ring.close()
    nbytes = sum(_format.record_size(len(r)) for r in records)
    message = str(info.value)
    assert f"2 fills holding 2 records ({nbytes} bytes of records)" in message
    assert "not written to the file durably" in message
    assert "[Errno 5]" in message
    assert info.value.errno == errno.EIO
    assert isinstance(info.value.__cause__, OSError)


def test_close_after_the_flusher_gave_up_on_a_full_disk_names_exactly_what_was_lost(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = bare.core
    monkeypatch.setattr(os, "pwrite", _Failing(os.pwrite, errno.ENOSPC))
    written = [b"w" * 50]
    _fill_one(bare, written[0])
    bare.flush()
    monkeypatch.undo()
    bare.flusher.flush_pending(1e9)  # the first fill made it
    lost = [bytes([k]) * 700 for k in range(12)]  # two fills' worth
    monkeypatch.setattr(os, "pwrite", _Failing(os.pwrite, errno.ENOSPC))
    for record in lost:
        bare.ring.append(record)
    _seal_all(bare)
    bare.flusher.take_ready()
    bare.flusher.flush_pending(2e9)
    assert bare.ring.stats().stalled == errno.ENOSPC
    fills = sum(1 for i in range(core.geometry.buffers) if not core.state(i) & L.IDLE)
    _own(bare)
    core.set_status(L.STATUS_FLUSHER_DONE)
    with pytest.raises(shmflush.RingBrokenError) as info:
        bare.ring.close()
    nbytes = sum(_format.record_size(len(r)) for r in lost)
    message = str(info.value)
    assert "the flusher gave up draining" in message
    assert f"{fills} fills holding 12 records ({nbytes} bytes of records)" in message
    assert info.value.errno == errno.ENOSPC
    assert bare.records() == written


def test_close_that_times_out_on_a_full_disk_says_why_and_what_was_lost(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwrite", _Failing(os.pwrite, errno.ENOSPC))
    _fill_one(bare, b"z" * 30)
    bare.flush()
    _own(bare)
    # Nobody sets FLUSHER_DONE: the owner's wait runs out.
    with pytest.raises(shmflush.RingTimeoutError) as info:
        bare.ring.close(timeout=0.1)
    message = str(info.value)
    assert "did not drain within 0.1 s" in message
    assert "No space left on device" in message
    assert f"1 fill holding 1 record ({_format.record_size(30)} bytes" in message
    assert isinstance(info.value.__cause__, OSError)


def test_close_counts_records_past_a_claim_that_was_never_finished(bare: Bare) -> None:
    # A writer's unfinished claim that wrote nothing is zero: padding words,
    # which the walk of the fill's record headers steps over.
    core = bare.core
    bare.ring.append(b"done")
    dead_claim(core, 9, core.words[core.lane_w[0]], 64)
    bare.ring.append(b"after the hole")
    _seal_all(bare)
    bare.flush()  # not taken: the dead claim is not committed
    _own(bare)
    core.set_status(L.STATUS_FLUSHER_DONE)
    with pytest.raises(shmflush.RingBrokenError) as info:
        bare.ring.close()
    message = str(info.value)
    assert "a writer never finished its claim" in message
    assert "1 fill holding 2 records (" in message
    assert bare.records() == []


# -- a real full file system -----------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted under tmp_path (needs root: CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazily if busy: a failed test may still hold a file open there.
        umount = subprocess.run(["umount", str(mount_point)], timeout=DEADLINE_S, check=False)
        if umount.returncode:
            subprocess.run(["umount", "-l", str(mount_point)], timeout=DEADLINE_S, check=True)


def _fill_up(path: Path) -> None:
    """Write zeros to *path* until the file system is full."""
    chunk = bytes(64 << 10)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return


def test_a_ring_on_a_full_file_system_waits_and_loses_nothing_once_space_is_freed(
    small_fs: Path, ring_name: str
) -> None:
    path = small_fs / "log"
    with warnings.catch_warnings():
        # Older kernels' tmpfs refuses O_DIRECT; buffered writes stall the same way.
        warnings.simplefilter("ignore", shmflush.DirectIOWarning)
        ring = shmflush.create(ring_name, path, buffer_size=64 << 10, buffers=4, lanes=1)
    acknowledged: list[bytes] = []
    try:
        for k in range(20):
            record = b"before %d " % k + b"." * 500
            ring.append(record)
            acknowledged.append(record)
        ring.sync(timeout=DEADLINE_S)
        _fill_up(small_fs / "ballast")
        # Append until writers wait: the disk is full, the ring stalls.
        timed_out = _append_until_timeout(
            ring, lambda k: b"during %d " % k + b"-" * (k % 3000), 1.0, acknowledged
        )
        assert "No space left on device" in str(timed_out)
        stats = ring.stats()
        assert (stats.stalled, stats.broken) == (errno.ENOSPC, False)
        # A writer blocked in append is let through once space is freed.
        late: list[BaseException | None] = []

        def append_late() -> None:
            try:
                ring.append(b"late", timeout=DEADLINE_S)
                late.append(None)
            except BaseException as exc:  # reported below
                late.append(exc)

        writer = threading.Thread(target=append_late)
        writer.start()
        (small_fs / "ballast").unlink()
        writer.join(DEADLINE_S + 1)
        assert not writer.is_alive()
        assert late == [None]
        acknowledged.append(b"late")
        ring.sync(timeout=DEADLINE_S)
        stats = ring.stats()
        assert (stats.stalled, stats.broken) == (0, False)
    finally:
        ring.close(timeout=DEADLINE_S)  # raises if anything was lost
    assert list(shmflush.read(path)) == acknowledged


# -- the file deleted or truncated under a live ring ----------------------------------


def _damage_file(path: Path, damage: str) -> str:
    """Delete or truncate *path*; returns what the ring's errors must say."""
    if damage == "deleted":
        path.unlink()
        return f"the file {path} was deleted while the ring was writing it"
    os.truncate(path, 0)
    return f"the file {path} was truncated to 0 bytes below "


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_file_deleted_or_truncated_under_a_live_ring_breaks_it_and_says_so(
    ring_name: str, tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, buffer_size=64 << 10, buffers=4, lanes=1)
    close_error: shmflush.ShmflushError | None = None
    try:
        for k in range(50):
            ring.append(b"written %d" % k)
        ring.sync(timeout=DEADLINE_S)
        said = _damage_file(path, damage)
        # Appends and syncs go on until the flusher's next look at the file.
        deadline = time.monotonic() + DEADLINE_S
        broken: shmflush.RingBrokenError | None = None
        while broken is None and time.monotonic() < deadline:
            try:
                ring.append(b"after", timeout=DEADLINE_S)
                ring.sync(timeout=DEADLINE_S)
            except shmflush.RingBrokenError as exc:
                broken = exc
            time.sleep(0.01)
        assert broken is not None, f"the file was {damage} and the ring never said so"
        assert said in str(broken)
        assert ring.stats().broken
        with pytest.raises(shmflush.RingBrokenError, match=re.escape(said)):
            ring.append(b"refused")
        with pytest.raises(shmflush.RingBrokenError, match=re.escape(said)):
            ring.sync(timeout=DEADLINE_S)
    finally:
        started = time.monotonic()
        try:
            ring.close(timeout=DEADLINE_S)
        except shmflush.ShmflushError as exc:
            close_error = exc
        closing = time.monotonic() - started
    assert isinstance(close_error, shmflush.RingBrokenError)
    assert said in str(close_error)
    assert closing < DEADLINE_S, "close() hung on a damaged file"


def test_the_flusher_does_not_take_its_own_preallocation_or_trim_for_a_truncation(
    bare: Bare,
) -> None:
    # The size only counts below what was written: preallocation grows the file
    # past it, and a file exactly as long as what was written is whole.
    core = bare.core
    _fill_one(bare, b"x" * 5000)
    bare.flush()
    written = core.header(L.H_WRITTEN_BELOW)
    assert written > 0
    for size in (written, written + (64 << 20)):
        os.truncate(bare.path, size)
        bare.flusher.next_file_check = 0.0
        bare.flusher.check_file(1.0)
        assert not core.status() & L.STATUS_BROKEN, f"size {size} taken for damage"
    os.truncate(bare.path, written - 4096)
    bare.flusher.next_file_check = 0.0
    bare.flusher.check_file(1.0)
    assert core.status() & L.STATUS_BROKEN
    assert core.header(L.H_ERROR_KIND) == L.ERROR_FILE_TRUNCATED
    assert (core.header(L.H_ERROR_SIZE), core.header(L.H_ERROR_WRITTEN)) == (
        written - 4096,
        written,
    )


def test_a_flusher_whose_membarrier_is_refused_turns_writers_to_one_atomic_per_record(
    bare: Bare, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # seccomp can refuse membarrier(2) to the flusher although the creator could
    # register: the flusher then cannot take idle writers' tails, so it tells
    # writers (H_FENCE) to claim one record at a time from their next claim.
    from shmflush import _fence

    if not _fence.register():
        pytest.skip("membarrier(2) is not available here")
    core = bare.core
    core.set_header(L.H_FENCE, L.FENCE_ON)
    core.fence_on = True
    bare.ring.append(b"in a chunk")
    writer = bare.ring._tls.slot
    assert writer.fenced
    assert writer.room() > 0  # a chunk with a tail
    lane_word = core.words[core.lane_w[0]]
    i = lane_word & L.LANE_INDEX_MASK
    core.seal(i)

    def refused() -> None:
        raise OSError(errno.EPERM, "membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED): refused")

    monkeypatch.setattr(_fence, "barrier", refused)
    bare.flush()
    assert "fall back to one atomic per record" in capfd.readouterr().err
    assert core.header(L.H_FENCE) == L.FENCE_OFF
    assert not core.state(i) & L.IDLE  # the tail is the writer's to return
    bare.ring.append(b"after")  # returns the tail, claims in fallback mode
    assert not writer.fenced
    assert writer.room() == 0  # exactly one record per claim
    bare.flush()
    core.seal(core.words[core.lane_w[0]] & L.LANE_INDEX_MASK)
    bare.flush()
    assert bare.records() == [b"in a chunk", b"after"]


class _HeldSync:
    """Records every pwrite and fdatasync (entry and return); the first
    fdatasync waits until ``release`` is set, then fails with *fail* if given."""

    def __init__(self, fail: int | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.held = False
        self.real_pwrite = os.pwrite
        self.real_fdatasync = os.fdatasync

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        with self.lock:
            self.events.append(("pwrite", offset))
        return self.real_pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            self.events.append(("sync", fd))
            first, self.held = not self.held, True
        try:
            if first:
                self.entered.set()
                assert self.release.wait(DEADLINE_S), "the test never released the sync"
                if self.fail is not None:
                    raise _oserror(self.fail)
            self.real_fdatasync(fd)
        finally:
            with self.lock:
                self.events.append(("synced", fd))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "pwrite", self.pwrite)
        monkeypatch.setattr(os, "fdatasync", self.fdatasync)

    def index(self, event: tuple[str, int]) -> int:
        with self.lock:
            return self.events.index(event)


def _pump_until(bare: Bare, done: Callable[[], bool], now: float = 0.0) -> None:
    """Run the loop's batch step (take, then pump) until *done*, with a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "the batch in flight never finished"
        bare.flusher.take_ready()
        bare.flusher.pump(now, closing=False)
        time.sleep(0.001)


def _address(bare: Bare, i: int) -> int:
    return bare.core.words[bare.core.address_w[i]]


def test_fills_taken_while_a_batch_syncs_are_written_after_that_sync_and_nothing_before_it_is_reset(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop takes fills while the I/O thread writes and syncs a batch, and
    # writes them as the next batch; a buffer is reset only after its own sync
    # (I4), and two batches' writes never overlap a sync (fsyncgate).
    core = bare.core
    flusher = bare.flusher
    flusher.sync_data = True
    log = _HeldSync()
    log.install(monkeypatch)
    a = _fill_one(bare, b"a" * 100)
    flusher.take_ready()
    flusher.pump(0.0, closing=False)
    assert log.entered.wait(DEADLINE_S), "the batch was never synced"
    b = _fill_one(bare, b"b" * 200)
    flusher.take_ready()
    flusher.pump(0.0, closing=False)
    assert flusher.batch is not None
    assert (flusher.batch.buffers, flusher.pending) == ([a], [b])
    assert not core.state(a) & L.IDLE, "reset before its fdatasync returned"
    assert ("pwrite", _address(bare, b)) not in log.events
    assert not flusher.all_idle()
    log.release.set()
    _pump_until(bare, flusher.all_idle)
    fd = bare.fd
    assert log.index(("synced", fd)) < log.index(("pwrite", _address(bare, b)))
    assert bare.ring.stats().syncs == 2
    assert bare.records() == [b"a" * 100, b"b" * 200]


def test_a_fdatasync_that_fails_in_flight_rewrites_its_batch_with_the_fills_taken_meanwhile(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = bare.core
    flusher = bare.flusher
    flusher.sync_data = True
    log = _HeldSync(fail=errno.EIO)
    log.install(monkeypatch)
    a = _fill_one(bare, b"a" * 100)
    flusher.take_ready()
    flusher.pump(0.0, closing=False)
    assert log.entered.wait(DEADLINE_S), "the batch was never synced"
    b = _fill_one(bare, b"b" * 200)
    flusher.take_ready()
    log.release.set()
    _pump_until(bare, lambda: flusher.batch is None)
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken, stats.syncs) == (errno.EIO, False, 0)
    assert sorted(flusher.pending) == sorted([a, b])
    assert not core.state(a) & L.IDLE, "a batch whose sync failed was reset"
    _pump_until(bare, flusher.all_idle, now=1.0)  # after the retry pause
    # The retry wrote the failed batch again, and the new fill with it, before
    # it synced again.
    second = log.events[log.index(("synced", bare.fd)) + 1 :]
    written = {offset for kind, offset in second if kind == "pwrite"}
    assert written == {_address(bare, a), _address(bare, b)}
    assert second[-2:] == [("sync", bare.fd), ("synced", bare.fd)]
    stats = bare.ring.stats()
    assert (stats.stalled, stats.broken, stats.syncs) == (0, False, 1)
    assert bare.records() == [b"a" * 100, b"b" * 200]


def test_the_gap_filler_waits_for_the_batch_in_flight_before_it_writes_and_syncs(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The filler's own fdatasync(2) could take a writeback error that belongs
    # to the batch in flight, and that batch would then count as durable.
    from shmflush import _atomic

    core = bare.core
    flusher = bare.flusher
    flusher.sync_data = True
    _fill_one(bare, b"first")
    bare.flush()
    hole = core.header(L.H_NEXT_ADDRESS)
    _atomic.fetch_add(core.base + L.H_NEXT_ADDRESS, 16384, 5)  # a dead closer's
    log = _HeldSync()
    log.install(monkeypatch)
    _fill_one(bare, b"second")
    flusher.take_ready()
    flusher.pump(0.0, closing=False)
    assert log.entered.wait(DEADLINE_S), "the batch was never synced"
    timeout = flusher.recovery.timeout
    for now in (1.0, 2 + timeout, 3 + 2 * timeout):  # long past the recovery timeout
        flusher.pump(now, closing=False)
    assert ("pwrite", hole) not in log.events, "the gap was filled with a batch in flight"
    assert core.header(L.H_WRITTEN_BELOW) == hole
    log.release.set()
    after = 4 + 3 * timeout
    _pump_until(bare, flusher.all_idle, now=after)
    for now in (after, after + 2 * timeout):
        flusher.pump(now, closing=False)
    assert core.header(L.H_WRITTEN_BELOW) == core.header(L.H_NEXT_ADDRESS)
    assert log.index(("synced", bare.fd)) < log.index(("pwrite", hole))
    reader = shmflush.read(bare.path)
    assert list(reader) == [b"first", b"second"]
    assert reader.abandoned == 4


def test_a_flusher_that_gives_up_on_close_first_accounts_for_the_batch_in_flight(
    bare: Bare, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run() must not return with the I/O thread still writing: the caller closes
    # the descriptor next, and close() would name durable fills as lost.
    core = bare.core
    flusher = bare.flusher
    flusher.sync_data = True
    log = _HeldSync()
    log.install(monkeypatch)
    i = _fill_one(bare, b"late" * 100)
    core.set_status(L.STATUS_CLOSING)
    timer = threading.Timer(1.0, log.release.set)  # well after it gives up
    timer.start()
    try:
        assert flusher.run(give_up_after=0.1) == 1
    finally:
        log.release.set()
        timer.join(DEADLINE_S)
    assert log.entered.is_set()
    assert flusher.batch is None
    assert core.state(i) & L.IDLE
    assert core.status() & L.STATUS_FLUSHER_DONE
    assert bare.ring.stats().syncs == 1
    assert bare.records() == [b"late" * 100]
