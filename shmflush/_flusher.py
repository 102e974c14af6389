"""Layer 3: the flusher process.

One flusher per ring writes closed fills to the file, straight from shared memory,
at the address each fill got when it was closed.  It runs as its own process
(``python -m shmflush flusher NAME --fd N``), started by the ring's owner, which
hands it the already locked and scanned file descriptor.

One pass of the loop:

1. seal fills that stayed open and non-empty for ``flush_interval`` (or all fills,
   when the owner is closing), so quiet writers still reach the disk;
2. take every fill that is SEALED|CLOSED with no writer (compare-and-swap in
   FLUSHING: a fill is taken once) and queue it for the next batch;
3. once the batch in flight is durable, start the next one at once with every
   fill queued, then reset the finished one (below) while the next is written.

A batch is written by the I/O thread, one batch at a time, while the loop goes
on sealing and taking:

4. ``pwrite(2)`` each fill of the batch at its address, after writing its
   segment header into the buffer (CRC over the records);
5. ``fdatasync(2)`` once for the whole batch when the sync level is "data"
   (group commit);
6. back in the loop: mark the batch durable, zero the written part of each
   buffer and mark it IDLE (invariant I4: reuse only after the write is as
   durable as the sync level promises), then wake writers waiting for space.

A failed batch stays taken, in shared memory, and is retried with a growing pause:
nothing is reset before it is written (and synced).  What a failure does to the
ring depends on what it can have cost (see Flusher.failed):

* a full disk or quota (ENOSPC, EDQUOT from pwrite(2) or posix_fallocate(2))
  left nothing behind that we count on: the ring is *stalled*, not broken.  The
  errno is in ``H_STALL_ERRNO``, writers wait for space (their timeouts say
  why), and the first retry that succeeds clears the stall;
* any other error, and any failed fdatasync(2) ("fsyncgate": the kernel may have
  dropped the dirty pages and will not report it again), is retried by
  rewriting the whole batch from shared memory before the next fdatasync, a
  few times; then the ring is BROKEN.
"""

from __future__ import annotations

import argparse
import contextlib
import errno as E
import fcntl
import mmap
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from . import _faults, _files, _format, _proc
from . import _layout as L
from ._errors import ShmflushError
from ._recovery import Recovery
from ._ring import TAKEN, WAITING, Ring, acquire, attach_ring

# Threads writing fills at once (see Flusher.write_all).
_WRITE_THREADS = 4
# Preallocation step (see Flusher.preallocate).
_PREALLOCATE = 64 << 20
# After a whole step did not fit, preallocate only what is needed for this long.
_PREALLOCATE_BACKOFF = 10.0
# Errors that mean "no room now": the write or allocation failed as a whole and
# succeeds unchanged once space is freed.
_NO_SPACE = frozenset((E.ENOSPC, E.EDQUOT))
# Attempts at a batch that fails with any other error before the ring is broken.
_IO_ATTEMPTS = 5


@dataclass
class _Outcome:
    """What the I/O thread did with a batch."""

    done: list[int] = field(default_factory=list)  # buffers written in full
    written: int = 0  # bytes
    syncing: bool = False  # the error (if any) came from fdatasync(2)
    error: OSError | ValueError | None = None


@dataclass
class _Batch:
    """The batch in flight: its buffers, in address order, and its I/O (the
    outcome is stored before the loop is woken)."""

    buffers: list[int]
    future: Future[None] = field(init=False)
    outcome: _Outcome | None = None


class Flusher:
    def __init__(self, ring: Ring, fd: int) -> None:
        self.ring = ring
        self.fd = fd
        self.direct = False
        self.sync_data = ring.header(L.H_SYNC) == L.SYNC_LEVELS["data"]
        self.interval = ring.header(L.H_FLUSH_INTERVAL_NS) / 1e9
        self.pending: list[int] = []  # taken (FLUSHING), not yet in a batch
        self.batch: _Batch | None = None  # being written and synced
        self.io: ThreadPoolExecutor | None = None  # the I/O thread (see start_batch)
        self.retry_at = 0.0
        self.retry_pause = 0.05
        self.attempts = 0  # failed attempts at the pending batch, other than no space
        # buffer -> (fill number, when first seen open and non-empty)
        self.first_seen: dict[int, tuple[int, float]] = {}
        self.recovery = Recovery(ring)
        self.pool: ThreadPoolExecutor | None = None
        self.can_preallocate = True
        self.allocated = os.fstat(fd).st_size
        self.preallocate_whole_after = 0.0
        self.next_recovery = 0.0
        self.gaps = _Gaps(self)
        self.next_sweep = 0.0
        self.next_file_check = 0.0
        self.files = _files.FileTable(L.read_path(ring.view).decode(errors="surrogateescape"), fd)
        self.settings = _files.load_settings(self.files.path)
        self.hooks: list[subprocess.Popen[bytes]] = []
        self.roll_refused_until = 0.0

    # -- file ----------------------------------------------------------------

    def enable_direct_io(self) -> None:
        """Switch the inherited descriptor to O_DIRECT, if the file system allows.

        O_DIRECT skips the page cache: buffers go from shared memory to the device.
        tmpfs before Linux 6.6, ramfs and some FUSE file systems refuse it with
        EINVAL; then we write through the page cache and rely on fdatasync.
        """
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != E.EINVAL:
                raise
            self.set_direct(False)
        else:
            self.set_direct(True)

    def set_direct(self, on: bool) -> None:
        self.direct = on
        self.ring.set_header(L.H_DIRECT_IO, L.DIRECT_ON if on else L.DIRECT_OFF)

    def write_fill(self, i: int) -> int:
        """Write buffer *i*'s closed fill at its address; returns bytes written."""
        ring = self.ring
        words = ring.words
        used = words[ring.used_w[i]]
        if not used:
            return 0
        if used > ring.capacity:
            raise ValueError(f"buffer {i}: used length {used} exceeds capacity")
        address = words[ring.address_w[i]]
        if address % _format.BLOCK or address + _format.segment_size(used) > ring.header(
            L.H_NEXT_ADDRESS
        ):
            raise ValueError(f"buffer {i}: address {address} was never handed out")
        start = ring.buffer_at[i]
        fd, offset = self.files.locate(address)  # which file of the stream, where
        # sealed_ns is stamped here, when the fill is taken for writing: after its
        # seal and its last record, within one flush latency of the seal (see
        # docs/format.md section 2).  A retried write restamps it.
        _format.write_segment_header(
            ring.view,
            start,
            used=used,
            seq=words[ring.seq_w[i]],
            address=offset,
            stream_id=L.read_stream_id(ring.view),
            sealed_ns=time.time_ns(),
        )
        size = _format.segment_size(used)
        address = offset
        chunk = ring.view[start : start + size]
        try:
            done = 0
            while done < size:
                try:
                    n = os.pwrite(fd, chunk[done:], address + done)
                except OSError as exc:
                    # Some file systems accept O_DIRECT at fcntl time and refuse it
                    # at write time; fall back once, then retry the same bytes.
                    if exc.errno == E.EINVAL and self.direct:
                        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                        self.set_direct(False)
                        print(
                            f"shmflush: O_DIRECT refused on write ({exc.strerror}); "
                            "falling back to buffered writes plus fdatasync",
                            file=sys.stderr,
                        )
                        continue
                    raise
                if n <= 0:
                    raise OSError(E.EIO, "pwrite wrote nothing")
                done += n
        finally:
            chunk.release()
        return size

    # -- buffers ---------------------------------------------------------------

    def reset(self, i: int) -> None:
        self.ring.reset(i)

    def seal_due(self, now: float, closing: bool) -> None:
        ring = self.ring
        for i in range(ring.geometry.buffers):
            st = ring.state(i)
            if st & L.SEALED:
                self.first_seen.pop(i, None)
                continue
            if closing:
                ring.seal(i)
                continue
            if not st >> L.OFFSET_SHIFT:
                continue
            fill = ring.words[ring.fill_w[i]]
            seen = self.first_seen.get(i)
            if seen is None or seen[0] != fill:
                self.first_seen[i] = (fill, now)
            elif now - seen[1] >= self.interval:
                ring.seal(i)
                self.first_seen.pop(i, None)

    def take_ready(self) -> bool:
        """Take every closed fill whose claims are all committed, taking back
        idle writers' chunk tails first where that is what a fill waits for.
        Returns True if a closed fill is still waiting for a writer."""
        incomplete = self._take()
        if incomplete and self.ring.return_chunks():
            incomplete = self._take()
        return incomplete

    def _take(self) -> bool:
        ring = self.ring
        incomplete = False
        for i in range(ring.geometry.buffers):
            got = ring.take(i)
            if got == TAKEN:
                self.pending.append(i)
            elif got == WAITING:
                incomplete = True
        return incomplete

    # -- batches ---------------------------------------------------------------
    #
    # One batch at a time is written and synced, by the I/O thread, while the
    # main loop goes on sealing and taking fills into ``pending``: the device
    # never waits for the loop, and the loop never waits for the device.  The
    # writes of two batches never overlap, and nothing else touches the file
    # while a batch is in flight (the gap filler waits for the gap between two
    # batches): an fdatasync(2) error can then only be about the batch it
    # belongs to, so "a failed sync rewrites its whole batch" stays exact.

    def flush_pending(self, now: float) -> None:
        """Write, sync and reset every pending fill as one batch, and return
        when that is done or has failed (see failed()); nothing before the
        retry time of a failed batch.

        The loop runs the same steps without waiting (see pump()); this is them
        in one call, for a caller that drives the flusher by hand (the tests).
        """
        self.start_batch(now)
        self.release(self.finish_batch(now, wait=True))

    def pump(self, now: float, closing: bool) -> None:
        """The loop's batch step: finish the batch in flight if its I/O is done,
        start the next one at once with every fill taken meanwhile, then reset
        the finished batch's buffers while the next one is written."""
        durable = self.finish_batch(now, wait=False)
        if self.batch is None:
            # The gap filler writes and syncs the file itself: only between
            # batches, so that its fdatasync(2) cannot consume a writeback error
            # that belongs to a batch (fsyncgate).
            self.gaps.check(now, closing)
            self.start_batch(now)
        self.release(durable)
        if durable and self.batch is None:
            # Again once the last batch is reset: on close, the gap is filled
            # at once only when every buffer is idle.
            self.gaps.check(now, closing)

    def start_batch(self, now: float) -> None:
        """Hand every pending fill to the I/O thread, in address order, unless a
        batch is in flight or a failed one waits for its retry time."""
        if self.batch is not None or not self.pending or now < self.retry_at:
            return
        ring = self.ring
        buffers = sorted(self.pending, key=lambda i: ring.words[ring.address_w[i]])
        self.pending = []
        self.check_file(now, before_write=True)
        if self.io is None:
            self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shmflush-batch")
        batch = _Batch(buffers)
        batch.future = self.io.submit(self._run_batch, batch, now)
        self.batch = batch

    def _run_batch(self, batch: _Batch, now: float) -> None:
        try:
            batch.outcome = self._write_and_sync(batch.buffers, now)
        finally:
            # Wake the loop once the outcome is there: it starts the next batch at
            # once.  (A bug in the I/O code wakes it too: finish_batch re-raises.)
            sem = self.ring.flush_sem
            if sem is not None:
                sem.release()

    def _write_and_sync(self, buffers: list[int], now: float) -> _Outcome:
        """The I/O thread: write every fill of the batch, then fdatasync(2) it
        once (group commit).  Errors are returned, for the loop to handle."""
        ring = self.ring
        outcome = _Outcome()
        try:
            self.preallocate(now)
            # Every fill of the batch, every attempt: after a failed fdatasync the
            # page cache may hold none of it (see failed()).
            for i, size in self.write_all(buffers):
                outcome.written += size
                outcome.done.append(i)
            if _faults.ENABLED and outcome.written:
                _faults.reached("flush.written")
            if outcome.written and self.sync_data:
                outcome.syncing = True
                self.files.sync()
                if _faults.ENABLED:
                    _faults.reached("flush.synced")
                ring.set_header(L.H_SYNCS, ring.header(L.H_SYNCS) + 1)
        except (OSError, ValueError) as exc:
            outcome.error = exc
        return outcome

    def finish_batch(self, now: float, *, wait: bool) -> list[int]:
        """Account for the batch in flight once its I/O is done (at once, or
        after waiting for it with *wait*); returns the buffers that are now
        durable, to be reset (see release()).  A failed batch goes back to
        ``pending``, to be retried with the fills taken since."""
        batch = self.batch
        if batch is None or not (wait or batch.outcome is not None or batch.future.done()):
            return []
        if wait or batch.outcome is None:
            batch.future.result()  # re-raises what is not an I/O error
        outcome = batch.outcome
        assert outcome is not None
        self.batch = None
        if outcome.error is not None:
            self.pending = batch.buffers + self.pending
            self.failed(outcome.error, now, syncing=outcome.syncing)
            return []
        ring = self.ring
        for i in outcome.done:
            used = ring.words[ring.used_w[i]]
            if used:
                start = ring.words[ring.address_w[i]]
                self.gaps.written(start, start + _format.segment_size(used))
        # Mark the batch durable before zeroing anything: a flusher restarted after
        # a crash in the middle of the resets must reset these, not rewrite them.
        for i in batch.buffers:
            ring.words[ring.durable_w[i]] = ring.words[ring.fill_w[i]]
        # Counters first: a sync() that returns once its buffers are IDLE must see them.
        ring.set_header(L.H_BUFFERS_FLUSHED, ring.header(L.H_BUFFERS_FLUSHED) + len(outcome.done))
        ring.set_header(L.H_BYTES_WRITTEN, ring.header(L.H_BYTES_WRITTEN) + outcome.written)
        self.retry_at = 0.0
        self.retry_pause = 0.05
        self.attempts = 0
        return batch.buffers

    def release(self, durable: list[int]) -> None:
        """Reset the buffers of a durable batch (I4) and wake writers waiting
        for space."""
        if not durable:
            return
        ring = self.ring
        for i in durable:
            self.reset(i)
        # The stall is over before writers wake: one that timed out meanwhile must
        # not blame a disk that has room again.
        ring.set_header(L.H_STALL_ERRNO, 0)
        ring.post_space()

    def quiesce(self) -> None:
        """Wait for the batch in flight to leave the file alone, whatever its
        outcome: its thread must not write through a descriptor that is closed
        (and maybe reused) once the loop has returned."""
        if self.batch is not None:
            with contextlib.suppress(Exception):
                self.batch.future.result()

    def failed(self, exc: OSError | ValueError, now: float, *, syncing: bool) -> None:
        """Record a failed attempt at the pending batch and schedule the retry.

        Nothing of the batch is reset, so every fill is still in shared memory and
        the retry writes all of them again.  ENOSPC or EDQUOT from pwrite(2) or
        posix_fallocate(2) means that call did not happen: an O_DIRECT write
        reached no device, a buffered one dirtied no page it reports as written,
        and the whole batch is written again before it is synced.  So waiting for
        space loses nothing, and the ring only stalls.

        A failed fdatasync(2) is different (PostgreSQL's "fsyncgate"): the kernel
        may have marked the dirty pages clean after a failed writeback, and a
        second fdatasync would succeed without writing them.  So it is never
        retried on its own: the next attempt rewrites the whole batch first.  That,
        and any other error (EIO, EFBIG, ...), gets _IO_ATTEMPTS attempts before
        the ring is BROKEN; it is still retried after that, slowly, in case the
        device recovers before the owner closes.
        """
        ring = self.ring
        if isinstance(exc, ValueError):
            # A descriptor whose extent is out of range (corrupted shared memory):
            # refuse it like an I/O error rather than die (a restarted flusher would
            # only find it again), but it will not heal by itself.
            errno = E.EUCLEAN
            self.attempts = _IO_ATTEMPTS
        else:
            errno = exc.errno or E.EIO
            if syncing or errno not in _NO_SPACE:
                self.attempts += 1
        buffer = getattr(exc, "shmflush_buffer", None)
        if self.attempts >= _IO_ATTEMPTS:
            if not ring.status() & L.STATUS_BROKEN:
                ring.set_header(L.H_ERROR_ERRNO, errno)
                ring.set_header(L.H_ERROR_BUFFER, L.NO_BUFFER if buffer is None else buffer)
                ring.set_header(L.H_STALL_ERRNO, 0)
                ring.set_status(L.STATUS_BROKEN)
        elif not ring.status() & L.STATUS_BROKEN:
            ring.set_header(L.H_STALL_ERRNO, errno)
        self.retry_at = now + self.retry_pause
        self.retry_pause = min(self.retry_pause * 2, 1.0)

    def preallocate(self, now: float) -> None:
        """Reserve file space ahead of the writes, in large extents.

        With the blocks allocated up front, most writes and fdatasyncs touch no
        allocation metadata.  The zero tail this leaves reads as a clean end of
        file, and a clean close cuts it off.  File systems that cannot do it
        (EOPNOTSUPP and friends) are simply not preallocated.  Where a whole
        extent does not fit any more, only what the batch needs is allocated
        for a while; if even that does not fit, the disk is full and the ENOSPC
        (or EDQUOT) is raised: the batch waits for space (see failed()).
        """
        if not self.can_preallocate:
            return
        # One file throughout, even if the main loop rolls meanwhile (this runs
        # on the I/O thread): the old one may get a little more, cut when finished.
        active = self.files.active
        fd = active.fd
        end = self.ring.header(L.H_NEXT_ADDRESS) - active.base
        if end <= active.allocated:
            return
        if now >= self.preallocate_whole_after:
            target = (end + _PREALLOCATE - 1) // _PREALLOCATE * _PREALLOCATE + _PREALLOCATE
            try:
                os.posix_fallocate(fd, active.allocated, target - active.allocated)
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    self.can_preallocate = False
                    return
                self.preallocate_whole_after = now + _PREALLOCATE_BACKOFF
            else:
                active.allocated = target
                return
        try:
            os.posix_fallocate(fd, active.allocated, end - active.allocated)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                self.can_preallocate = False
                return
            raise
        active.allocated = end

    def check_file(self, now: float, *, before_write: bool = False) -> None:
        """Break the ring if its file was deleted or truncated under it.

        Either loses records that were already written, and nothing else would
        ever say so: writes to a deleted file succeed, and a truncated one just
        grows a zero hole.  The loop calls this at most every 0.25 s.  The size
        test only means something before our next write, which grows the file
        back over the hole; so start_batch also calls it (*before_write*) ahead
        of each batch: one fstat(2) against a pwrite of at least 4 KiB.  A
        truncation that lands while a batch is being written past it goes
        unseen.  The size only counts below the end of what was written:
        preallocation only grows the file, and the clean-close trim never cuts
        below it.
        """
        if now < self.next_file_check and not before_write:
            return
        self.next_file_check = now + 0.25
        ring = self.ring
        if ring.status() & L.STATUS_BROKEN:
            return  # the first cause is the one to report
        try:
            st = os.fstat(self.fd)
        except OSError:
            return
        if st.st_nlink == 0:
            ring.set_header(L.H_ERROR_KIND, L.ERROR_FILE_DELETED)
        else:
            written = self.gaps.written_end() - self.files.active.base
            if st.st_size >= written:
                return
            ring.set_header(L.H_ERROR_SIZE, st.st_size)
            ring.set_header(L.H_ERROR_WRITTEN, written)
            ring.set_header(L.H_ERROR_KIND, L.ERROR_FILE_TRUNCATED)
        ring.set_header(L.H_STALL_ERRNO, 0)
        # After the cause: a writer that sees BROKEN reads the cause next.  The
        # flusher keeps writing what is in shared memory (so the owner's close()
        # is not held up); records written after a truncation are still readable.
        ring.set_status(L.STATUS_BROKEN)

    def trim(self) -> None:
        """Cut the preallocated zero tail (clean close)."""
        end = self.ring.header(L.H_NEXT_ADDRESS) - self.files.active.base
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_size > end:
                os.ftruncate(self.fd, end)

    def write_all(self, buffers: list[int]) -> list[tuple[int, int]]:
        """Write the fills of *buffers*; returns (buffer, bytes) for each.

        Several fills are written by a small thread pool: the CRC (crc32c releases
        the GIL from 32 KiB) of one overlaps the pwrite(2) of another, and
        several O_DIRECT writes keep the device queue busy.  Each fill has its own
        address, so the order of the writes does not matter.  The first error is
        raised, tagged with its buffer, once every write has finished.
        """
        if len(buffers) == 1:
            return [(buffers[0], self._write_tagged(buffers[0]))]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(
                max_workers=_WRITE_THREADS, thread_name_prefix="shmflush-write"
            )
        futures = [(i, self.pool.submit(self._write_tagged, i)) for i in buffers]
        results: list[tuple[int, int]] = []
        error: BaseException | None = None
        for i, future in futures:
            try:
                results.append((i, future.result()))
            except (OSError, ValueError) as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def _write_tagged(self, i: int) -> int:
        try:
            return self.write_fill(i)
        except (OSError, ValueError) as exc:
            exc.shmflush_buffer = i  # type: ignore[union-attr]
            raise

    def all_idle(self) -> bool:
        ring = self.ring
        return (
            self.batch is None
            and not self.pending
            and all(ring.state(i) & L.IDLE for i in range(ring.geometry.buffers))
        )

    # -- rotation (docs/rotation.md) -----------------------------------------------

    def maybe_roll(self, now: float) -> None:
        """Finish closed files whose addresses are all written, then roll to a
        new file if the active one is due (by size or by wall-clock age).

        Called from the main loop, between batches, on the thread that takes
        fills: every fill taken so far got its address before the roll reads
        ``H_NEXT_ADDRESS``, so none of them can belong to the new file."""
        if len(self.files.files) > 1:
            self.finish_closed()
        settings = self.settings
        ring = self.ring
        if not settings.rolls or ring.status() & (L.STATUS_CLOSING | L.STATUS_BROKEN):
            return
        if now < self.roll_refused_until:
            return
        active = self.files.active
        end = ring.header(L.H_NEXT_ADDRESS) - active.base
        if end <= _format.DATA_START:
            return  # nothing in it yet: an empty file is never closed
        due = settings.segment_bytes is not None and end >= settings.segment_bytes
        if settings.segment_age is not None and not due:
            age = settings.segment_age
            due = time.time() // age != active.created_ns / 1e9 // age
        if due:
            self.roll(now)

    def roll(self, now: float) -> None:
        """Start file ``active + 1``: header (with the new base) durable, and
        its name, before any address maps to it."""
        ring = self.ring
        files = self.files
        number = files.active.number + 1
        name = _files.file_path(files.path, number)
        try:
            fd = _files.open_next(name)
        except OSError as exc:
            self._roll_refused(name, exc, now)
            return
        if _faults.ENABLED:
            _faults.reached("roll.opened")
        # The switch: fills closed before this load have addresses below it and
        # stay in the old file; later ones get addresses from here on.
        boundary = ring.header(L.H_NEXT_ADDRESS)
        base = boundary - _format.DATA_START
        created = time.time_ns()
        try:
            _files.start_file(
                fd, name, L.read_stream_id(ring.view), created_ns=created, number=number, base=base
            )
        except OSError as exc:
            os.close(fd)
            self._roll_refused(name, exc, now)
            return
        if _faults.ENABLED:
            _faults.reached("roll.headed")
        if self.direct:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        files.add(_files.OpenFile(number, base, fd, created, _format.DATA_START))
        self.fd = fd
        self.can_preallocate = True
        if _faults.ENABLED:
            _faults.reached("roll.switched")

    def _roll_refused(self, name: str, exc: OSError, now: float) -> None:
        print(f"shmflush: cannot roll to {name}: {exc}; retrying in 10 s", file=sys.stderr)
        self.roll_refused_until = now + 10.0

    def finish_closed(self) -> None:
        """Close every old file whose addresses are all written (and durable):
        cut its preallocated tail, sync, release its lock, run the hook, apply
        retention."""
        files = self.files
        closed: list[str] = []
        while len(files.files) > 1:
            old, after = files.files[0], files.files[1]
            end = after.base + _format.DATA_START
            if self.ring.header(L.H_WRITTEN_BELOW) < end:
                break
            try:
                if os.fstat(old.fd).st_size > end - old.base:
                    os.ftruncate(old.fd, end - old.base)
                os.fdatasync(old.fd)
            except OSError:
                pass  # its records are durable already; only the zero tail stays
            files.drop_oldest()
            os.close(old.fd)
            closed.append(_files.file_path(files.path, old.number))
        if closed and _faults.ENABLED:
            _faults.reached("roll.finished")
        for name in closed:
            self.run_hook(name)
        if closed and self.settings.retains:
            try:
                _files.apply(files.path, self.settings, warn=_warn_stderr)
            except OSError as exc:
                print(f"shmflush: retention failed: {exc}", file=sys.stderr)

    def run_hook(self, name: str) -> None:
        """Start ``on_segment_closed`` + [name] in the background.  It never
        holds up or stops flushing: a hook that fails to start, fails or hangs
        is reported on stderr and otherwise ignored."""
        self.reap_hooks()
        argv = self.settings.on_segment_closed
        if not argv:
            return
        try:
            self.hooks.append(
                subprocess.Popen(
                    [*argv, name], stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True
                )
            )
        except OSError as exc:
            print(f"shmflush: on_segment_closed hook {argv!r} failed: {exc}", file=sys.stderr)

    def reap_hooks(self) -> None:
        for proc in list(self.hooks):
            status = proc.poll()
            if status is None:
                continue
            self.hooks.remove(proc)
            if status:
                print(
                    f"shmflush: on_segment_closed hook {proc.args!r} exited with {status}",
                    file=sys.stderr,
                )

    def wait_for_hooks(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in list(self.hooks):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        self.reap_hooks()

    # -- main loop -----------------------------------------------------------------

    def resume(self) -> None:
        """Pick up what a dead predecessor left: fills it had taken (FLUSHING) are
        written again.  Rewriting the same bytes at the same address is harmless,
        and each such fill's commit base is recomputed the way take_ready sets it,
        so doing this twice changes nothing."""
        ring = self.ring
        words = ring.words
        for i in range(ring.geometry.buffers):
            if not ring.state(i) & L.FLUSHING or i in self.pending:
                continue
            ring.rebase(i)
            if words[ring.durable_w[i]] == words[ring.fill_w[i]]:
                self.reset(i)  # written and synced; maybe half zeroed: just finish
            else:
                self.pending.append(i)
        ring.post_space()

    def run(self, give_up_after: float = 30.0) -> int:
        """Flush until the owner closes the ring (or dies); returns an exit status."""
        try:
            return self._loop(give_up_after)
        finally:
            self.quiesce()

    def _loop(self, give_up_after: float) -> int:
        ring = self.ring
        sem = ring.flush_sem
        assert sem is not None
        owner = ring.header(L.H_OWNER_PID), ring.header(L.H_OWNER_START)
        idle_wait = wait = min(max(self.interval / 2, 0.001), 0.05)
        next_owner_check = 0.0
        closing_since = 0.0
        while True:
            acquire(sem, wait)
            now = time.monotonic()
            ring.set_header(L.H_HEARTBEAT_NS, time.monotonic_ns())
            if now >= next_owner_check:
                next_owner_check = now + 0.25
                if not _proc.is_alive(*owner) and not ring.status() & L.STATUS_CLOSING:
                    # The owner died without close(): drain what is committed, then
                    # stop, and tell writers why instead of letting them hang.
                    ring.set_status(L.STATUS_CLOSING | L.STATUS_BROKEN | L.STATUS_OWNER_DEAD)
            closing = bool(ring.status() & L.STATUS_CLOSING)
            self.seal_due(now, closing)
            incomplete = self.take_ready()
            self.pump(now, closing)
            self.maybe_roll(now)
            self.check_file(now)
            if now >= self.next_recovery:
                self.next_recovery = now + min(0.05, self.recovery.timeout / 4)
                self.recovery.run(now)
            if now >= self.next_sweep:
                self.next_sweep = (
                    now + 0.25
                )  # frees dead and orphaned slots (acquire_lease waits for it)
                self.recovery.sweep()
            # A closed fill waits for writers still copying (microseconds): look
            # again soon rather than after a whole interval.
            wait = 0.0002 if incomplete else idle_wait
            if closing:
                if not closing_since:
                    closing_since = now
                if self.all_idle():
                    self.finish_closed()
                    if not ring.status() & L.STATUS_BROKEN:
                        self.trim()
                        # Every batch is synced already; this only makes the cut
                        # durable, and a zero tail left by a failure reads as a
                        # clean end of file.
                        if self.sync_data:
                            with contextlib.suppress(OSError):
                                os.fdatasync(self.fd)
                    ring.set_status(L.STATUS_FLUSHER_DONE)
                    return 0
                # Broken (an I/O error that did not heal): retry a little longer,
                # but do not hold up the owner's close() for long.  Stalled (the
                # disk is full) is not broken: space may come back, so it waits
                # as long as for a slow writer, and the owner's timeout decides.
                limit = give_up_after / 6 if ring.status() & L.STATUS_BROKEN else give_up_after
                if now - closing_since > limit:
                    # A writer that never releases its claim, or a disk that stays
                    # full: report instead of hanging the owner's close().  A batch
                    # in flight is accounted for first, so close() names only
                    # what is really not durable.
                    self.release(self.finish_batch(now, wait=True))
                    ring.set_status(L.STATUS_FLUSHER_DONE)
                    return 1
                wait = 0.001


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _wait_for_leases(ring: Ring, timeout: float) -> None:
    g = ring.geometry
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = False
        for k in range(g.max_writers):
            at = g.lease(k)
            pid = L.holder_pid(ring.words[(at + L.L_PID) // 8])
            if pid and _proc.is_alive(pid, ring.words[(at + L.L_START) // 8]):
                live = True
                break
        if not live:
            return
        time.sleep(0.05)


class _Gaps:
    """Keeps the file free of holes.

    A closer killed between taking a file address (fetch-and-add on
    next_address) and storing it leaves an address range that no fill will ever
    write: a zero hole that readers would report as damage.  The flusher tracks
    which ranges it wrote; ``H_WRITTEN_BELOW`` in shared memory is the end of the
    gap-free prefix.  When that mark stays below a range that no descriptor
    claims for as long as the recovery timeout, the range is filled with 4 KiB
    filler segments (one ABANDONED record each): block-sized, so that a real
    segment that does land there later simply replaces whole fillers.
    """

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.ring = flusher.ring
        self.extents: dict[int, int] = {}  # start -> end, above the mark
        self.stuck_at = -1
        self.stuck_since = 0.0

    def written(self, start: int, end: int) -> None:
        ring = self.ring
        mark = ring.header(L.H_WRITTEN_BELOW)
        if end <= mark:
            return
        self.extents[max(start, mark)] = end
        while mark in self.extents:
            mark = max(mark, self.extents.pop(mark))
        ring.set_header(L.H_WRITTEN_BELOW, mark)

    def written_end(self) -> int:
        """The end of the furthest range written (the file is at least this long)."""
        return max(self.ring.header(L.H_WRITTEN_BELOW), max(self.extents.values(), default=0))

    def rebuild(self, path: bytes) -> None:
        """After a restart: find the segments a predecessor wrote above the mark."""
        ring = self.ring
        mark = ring.header(L.H_WRITTEN_BELOW)
        end = ring.header(L.H_NEXT_ADDRESS)
        files = self.flusher.files
        stream_id = L.read_stream_id(ring.view)
        # Our own descriptors may be O_DIRECT (no 64-byte reads): read through new ones.
        readers: dict[int, int] = {}
        try:
            p = mark
            while p < end:
                fd, at = files.locate(p)
                if fd not in readers:
                    readers[fd] = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                head = os.pread(readers[fd], 64, at)
                header = _format.parse_segment_header(head, at, stream_id)
                if isinstance(header, str):
                    p += _format.BLOCK
                    continue
                size = _format.segment_size(header.used)
                self.written(p, p + size)
                p += size
        except OSError:
            return
        finally:
            for reader in readers.values():
                os.close(reader)

    def check(self, now: float, closing: bool) -> None:
        ring = self.ring
        mark = ring.header(L.H_WRITTEN_BELOW)
        end = ring.header(L.H_NEXT_ADDRESS)
        if mark >= end:
            self.stuck_at = -1
            return
        if mark != self.stuck_at:
            self.stuck_at, self.stuck_since = mark, now
            return
        if now - self.stuck_since < self.flusher.recovery.timeout and not (
            closing and self.flusher.all_idle()
        ):
            return
        # The hole runs up to the next range that is written or still owned by a
        # fill (an extent stored in a descriptor that is not yet reset).
        limit = min([end, *(s for s in self.extents if s > mark)])
        for i in range(ring.geometry.buffers):
            st = ring.state(i)
            if st & L.IDLE or ring.words[ring.extent_of_w[i]] != ring.words[ring.fill_w[i]]:
                continue
            start = ring.words[ring.address_w[i]]
            if start >= mark and ring.words[ring.used_w[i]]:
                limit = min(limit, start)
        if limit <= mark:
            return
        try:
            self.fill(mark, limit)
        except OSError:
            return  # the disk error path reports it; try again later
        self.written(mark, limit)
        ring.header_add(L.H_RECOVERED, 1)

    def fill(self, start: int, end: int) -> None:
        block = mmap.mmap(-1, _format.BLOCK)
        view = memoryview(block)
        try:
            used = _format.BLOCK - _format.SEGMENT_HEADER_SIZE
            _format.pack_record_header(
                view,
                _format.SEGMENT_HEADER_SIZE,
                used - _format.RECORD_HEADER_SIZE,
                _format.KIND_ABANDONED,
            )
            stream_id = L.read_stream_id(self.ring.view)
            for at in range(start, end, _format.BLOCK):
                fd, offset = self.flusher.files.locate(at)
                _format.write_segment_header(
                    view,
                    0,
                    used=used,
                    seq=0,
                    address=offset,
                    stream_id=stream_id,
                    sealed_ns=time.time_ns(),
                )
                os.pwrite(fd, view, offset)
            if self.flusher.sync_data:
                self.flusher.files.sync()
        finally:
            view.release()
            block.close()


def _open_for_restart(ring: Ring) -> int | None:
    """Open and lock the ring's file by the path in its header; None if another
    flusher holds the lock (it is alive: nothing to do)."""
    path = L.read_path(ring.view)
    if not path:
        raise ShmflushError(f"ring {ring.name!r} has no file path to restart a flusher on")
    fd = os.open(_files.active_file(os.fsdecode(path))[1], os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmflush flusher")
    parser.add_argument("name")
    parser.add_argument("--fd", type=int, help="inherited, locked file (first start)")
    parser.add_argument(
        "--restart", action="store_true", help="open the file named in the ring's header"
    )
    args = parser.parse_args(argv)
    if (args.fd is None) == (not args.restart):
        parser.error("give exactly one of --fd and --restart")
    # Ctrl-C in a terminal goes to the whole foreground process group; the owner
    # handles it by closing the ring, which needs the flusher alive to drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ring = attach_ring(args.name)
    fd = args.fd
    flusher: Flusher | None = None
    try:
        if fd is None:
            # The file lock makes restarts exclusive: of several processes that
            # saw the flusher dead at once, one wins and the others' flushers exit.
            fd = _open_for_restart(ring)
            if fd is None:
                return 0
            ring.header_add(L.H_RESTARTS, 1)
        ring.set_header(L.H_FLUSHER_START, _proc.start_time(os.getpid()))
        ring.set_header(L.H_FLUSHER_PID, os.getpid())
        ring.set_header(L.H_RESTART_AT, 0)  # the restart (if any) is done
        flusher = Flusher(ring, fd)
        try:
            flusher.enable_direct_io()
        except OSError as exc:
            ring.set_header(L.H_ERROR_ERRNO, exc.errno or E.EIO)
            ring.set_status(L.STATUS_BROKEN | L.STATUS_FLUSHER_DONE)
            return 1
        if args.restart:
            flusher.files.open_older(ring.header(L.H_WRITTEN_BELOW))
        flusher.resume()
        if args.restart:
            flusher.gaps.rebuild(L.read_path(ring.view))
        status = flusher.run()
        if ring.status() & L.STATUS_BROKEN and not _proc.is_alive(
            ring.header(L.H_OWNER_PID), ring.header(L.H_OWNER_START)
        ):
            # Nobody else will unlink it: the owner is gone.  Writers still attached
            # get RingBrokenError; give them a moment to let go of their leases,
            # then unlink, but only if the name still means *this* ring:
            # create(exist_ok=True) may have replaced it.
            _wait_for_leases(ring, 10.0)
            L.unlink_segment_if_same(args.name, ring.header(L.H_RING_ID))
        flusher.wait_for_hooks(10.0)
        return status
    finally:
        if flusher is not None:
            flusher.files.close_all()  # fd among them
        elif fd is not None:
            os.close(fd)
        ring.unmap()
