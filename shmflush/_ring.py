"""Layer 2: the claim / seal / close / rotate protocol on a mapped ring.

This is the LLAMA flush-buffer protocol (design notes section 2) adapted to
processes.  The life of one *fill* of a buffer::

    IDLE|SEALED --reserve--> RESERVED|SEALED --install in a lane, open--> open
      ^                                                                    |
      |                                                           seal (fetch_or)
      |                                                                    v
    reset (flusher, after the write is durable)  <--  FLUSHING  <--  SEALED|CLOSED
                                                 take: all claims committed

Claims.  A writer adds ``size << 32`` to the state word with one fetch-and-add.
The claim succeeded iff the previous word was unsealed and the range fits.
Otherwise the claim failed, and exactly one of the failed claims is the
*crossing* claim: the first whose previous offset was still within capacity.
Offsets only grow while a fill is open, so the crossing claim is unique, and the
fill's used length is its previous offset.

Closing.  The party that fixes the used length *closes* the fill: it stores used
length, file address and seal sequence, then sets CLOSED with an atomic RMW that
publishes those plain stores.  The closer is the crossing writer, or whoever set
SEALED while the offset was still within capacity (time-based seal, sync, close,
a large claim that does not fit).  Those two cases exclude each other, so every
fill is closed exactly once (I3), and its address is assigned before the flusher
can take it, because the flusher only takes CLOSED fills (the Rust crate's stale
address bug).

Chunks (protocol v3).  A writer thread claims a *chunk* of its lane's fill
with one fetch-and-add and appends records into it with plain stores only
(``Writer.put``).  Its lease slot says where it is: ``L_AT`` holds its position,
with ``AT_BUSY`` set while it is inside an append, and ``L_CHUNK`` names the
chunk.  Per record: store the position with AT_BUSY, load the fill's state
word (sealed?) and the slot's own chunk word (taken back?), copy the payload,
write the header last, set the commit counter (position + size, plus the
offset the counter had at the chunk's start), store the new position without
AT_BUSY.  A counter never runs ahead of the bytes it covers: on x86-64 stores
become visible in program order.  The header comes last so that a writer
killed mid-copy leaves a zero header, never a valid-looking record.

The chunk's unused tail is returned, as zero bytes (padding in the file): by
the writer when the next record does not fit or it sees the fill sealed, by
a writer that seals (sync) for its own chunk, and by the flusher for writers
outside an append (``Ring.return_chunks``): it seals, then calls
``membarrier(2)`` (``_fence``) so that every writer's "inside an append" store
is visible or its next check sees the seal, then takes each tail whose
writer's position reads without AT_BUSY.  Whoever wins a compare-and-swap on
the chunk word commits the tail: the writer in its own row, the flusher in
its row.  So a writer stopped outside an append holds up nothing, and one
stopped inside holds up only its own fill.  Without membarrier (fallback),
every chunk is exactly one claim, written under AT_BUSY from the claim on, so
the flusher never has a tail to take: one fetch-and-add per record.

Handing over.  The flusher takes a fill once it is SEALED|CLOSED and the commit
counters of its buffer add up to ``base + used``: every successful claim is then
committed (I2).  Closing posts the flusher's semaphore; the flusher also scans,
so a lost post costs latency, never data.

Rotation.  A lane word holds (fill number, buffer index).  A lane moves on only
once the fill it names is *done* (CLOSED or later).  Addresses are assigned at
close, so every fill a lane opens later gets a later address: that gives I8.  A
writer can read a lane word, be descheduled, and claim after the buffer was
recycled into somebody else's fill.  It would then write into a fill that may be
closed later than the writer's next record.  So after a successful claim the
writer compares the descriptor's fill number with the one it read; on a mismatch
it turns its range into an ABANDONED record and retries (the Rust crate's
"claim in a buffer that is not current" bug).

Overshoot bound.  Failed claims leave their size in the offset field.  A failed
claim on a fill that is still unsealed seals it before retrying (``reject``), so
while a fill is open each of the at most ``max_writers`` writers (one lease slot
each, one claim in flight) adds at most once beyond capacity, and an offset never exceeds
``capacity + max_writers * faa_limit < 2**32``;
claims larger than ``faa_limit`` use a compare-and-swap that never overshoots.
Sealed buffers may accumulate anything there: opening resets the offset.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import posix_ipc

from . import _atomic, _faults, _fence, _format, _proc
from . import _layout as L
from ._errors import (
    CorruptRingError,
    RingBrokenError,
    RingClosedError,
    RingTimeoutError,
    ShmflushError,
)

SEQ_CST: Final = _atomic.SEQ_CST
_fetch_add = _atomic.fetch_add
_fetch_sub = _atomic.fetch_sub
_fetch_or = _atomic.fetch_or
_load = _atomic.load
_cas = _atomic.compare_exchange
_pack = _format.RECORD_HEADER.pack_into
_MARK: Final = _format.RECORD_MARK
_KIND_DATA: Final = _format.KIND_DATA
_BUSY: Final = L.AT_BUSY
# Bound at import: the crash points cost one global load each when off.
_FAULTS: Final = _faults.ENABLED

# Chunk sizes (bytes) a writer claims for single records: it starts small, so
# that an idle writer's returned tail (padding in the file) stays small, and
# doubles each time it fills a chunk itself.  At 16 KiB the fetch-and-add costs
# a few nanoseconds per 100-byte record.
CHUNK_MIN: Final = 1024
CHUNK_MAX: Final = 16384

# Results of Ring.rotate().
MOVED: Final = 0  # the lane now names another fill (we or somebody else moved it)
NOT_DONE: Final = 1  # the lane's fill is still open or being closed
NO_SPACE: Final = 2  # no idle buffer: wait for the flusher

# Results of Ring.take().
NOT_READY: Final = 0  # not a closed fill (or somebody else took it)
TAKEN: Final = 1
WAITING: Final = 2  # closed, but a claim in it is not yet committed


# Signals held back while the main thread waits on a semaphore (see acquire):
# all but the unblockable ones and the faults a thread raises on itself.
_HELD_SIGNALS: Final = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
}
# The longest the main thread waits with them held: how late a handler may run.
_SIGNAL_SLICE: Final = 0.1


# The main thread's signal mask from before acquire() blocked signals, while
# blocked (see acquire).
_mask_to_restore: list[set[int | signal.Signals] | None] = [None]


def restore_signal_mask() -> None:
    """Unblock what an acquire() of the main thread blocked, if an exception cut
    it short before it could (idempotent; a no-op in other threads)."""
    mask = _mask_to_restore[0]
    if mask is not None and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _mask_to_restore[0] = None


def acquire(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    """Take *sem*, waiting at most *timeout* seconds (sem_timedwait(3)); returns
    False if the time ran out.  Every semaphore wait in the package uses this.

    A signal neither ends the wait nor loses its handler's exception, as with
    Python's own blocking calls (PEP 475).  posix_ipc alone does neither: on
    EINTR it runs the handlers itself and raises SignalError in place of any
    exception they raise except KeyboardInterrupt (a SIGTERM handler's
    SystemExit would be lost).  So the main thread, the only one where handlers
    run, waits in slices of at most 0.1 s with signals blocked
    (pthread_sigmask(3)); unblocking between slices runs the pending handlers
    as Python code, so a handler that returns lets the wait go on and one that
    raises stops it with its own exception.  (If the slice took the semaphore
    just before, that post is spent: a waiter re-checks within a slice anyway.)
    Another thread can still get EINTR when the kernel picks it to take a
    signal; its handler runs later in the main thread, and the wait goes on.
    """
    deadline = time.monotonic() + timeout
    main = threading.current_thread() is threading.main_thread()
    while True:
        try:
            if main:
                restore_signal_mask()
                # The mask to go back to is on record before anything is
                # blocked: an exception anywhere below leaves it there, and the
                # next wait (or the writer path's exception handler) restores it.
                _mask_to_restore[0] = signal.pthread_sigmask(signal.SIG_BLOCK, ())
                signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
                try:
                    sem.acquire(min(timeout, _SIGNAL_SLICE))
                finally:
                    restore_signal_mask()
            else:
                sem.acquire(timeout)
        except posix_ipc.BusyError:
            pass
        except posix_ipc.SignalError:
            pass  # EINTR in a thread that does not run handlers: wait on
        else:
            return True
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False


def _base_address(mm: mmap.mmap) -> int:
    # from_buffer pins the mapping only while the ctypes object lives; the address
    # stays valid for as long as the mapping does, which Ring guarantees.
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class Ring:
    """A mapped ring and the protocol operations shared by writers and flusher.

    Not thread-safe as an object to *close*; every protocol operation is safe to
    call from any number of threads and processes at once.
    """

    def __init__(self, name: str, mm: mmap.mmap, geometry: L.Geometry) -> None:
        self.name = name
        self.geometry = g = geometry
        self.mm: mmap.mmap | None = mm
        self.view = memoryview(mm)
        self.words = self.view.cast("Q")
        self.base = base = _base_address(mm)
        _atomic.check_platform()
        _atomic.check_lock_free(base + L.H_STATUS)
        self.capacity = g.capacity
        self.max_record = g.max_record
        # A multiple of 8, like every claim (chunk sizes are capped by it).
        self.faa_limit = min(g.capacity, ((1 << 32) - 1 - g.capacity) // g.max_writers) & -8
        n = g.buffers
        self.state_addr = [base + g.descriptor(i) + L.D_STATE for i in range(n)]
        self.state_w = [(g.descriptor(i) + L.D_STATE) // 8 for i in range(n)]
        self.fill_w = [(g.descriptor(i) + L.D_FILL) // 8 for i in range(n)]
        self.used_w = [(g.descriptor(i) + L.D_USED) // 8 for i in range(n)]
        self.address_w = [(g.descriptor(i) + L.D_ADDRESS) // 8 for i in range(n)]
        self.seq_w = [(g.descriptor(i) + L.D_SEQ) // 8 for i in range(n)]
        self.base_w = [(g.descriptor(i) + L.D_BASE) // 8 for i in range(n)]
        self.extent_of_w = [(g.descriptor(i) + L.D_EXTENT_OF) // 8 for i in range(n)]
        self.durable_w = [(g.descriptor(i) + L.D_DURABLE) // 8 for i in range(n)]
        # commits[k, i]: lease k's commit counter for buffer i (see _layout).
        self.commits: np.ndarray[Any, np.dtype[np.uint64]] | None = np.frombuffer(
            mm, dtype=np.uint64, count=(g.max_writers + 1) * n, offset=g.commits_offset
        ).reshape(g.max_writers + 1, n)
        # The whole mapping as bytes, for vectorised writes (append_array).
        self.u8: np.ndarray[Any, np.dtype[np.uint8]] | None = np.frombuffer(mm, dtype=np.uint8)
        # Byte offset of the first record of each buffer.
        self.records_at = [g.buffer(i) + _format.SEGMENT_HEADER_SIZE for i in range(n)]
        self.buffer_at = [g.buffer(i) for i in range(n)]
        self.lane_w = [g.lane(k) // 8 for k in range(g.lanes)]
        self.lane_addr = [base + g.lane(k) for k in range(g.lanes)]
        self.status_w = L.H_STATUS // 8
        self.zero_w = L.H_ZERO // 8
        # Writers append into chunks only if the ring was created so (the
        # creator could register for membarrier); see Writer and return_chunks.
        self.fence_on = self.words[L.H_FENCE // 8] == L.FENCE_ON
        # The lease table as (slot, word), for the flusher's scans.
        self.leases: np.ndarray[Any, np.dtype[np.uint64]] | None = np.frombuffer(
            mm, dtype=np.uint64, count=g.max_writers * 8, offset=g.lease(0)
        ).reshape(g.max_writers, 8)
        self.waits = 0  # times this handle blocked for space (Stats.waits)
        self.abandoned = 0  # claims this handle gave up as ABANDONED (Stats.abandoned)
        self._lease_hint = 0
        self._taking = -1  # the slot acquire_lease is taking (release_untaken_lease)
        # Set when the API handle that owns this mapping is closed: every wait
        # and every general-path claim then raises RingClosedError.
        self.handle_closed = False
        # Set by the API layer: starts a new flusher process (layers above us
        # know how to spawn one; we only know when one is needed).
        self.restart_flusher: Callable[[], None] | None = None
        flush_name, space_name = L.semaphore_names(name)
        self.flush_sem: posix_ipc.Semaphore | None = None
        self.space_sem: posix_ipc.Semaphore | None = None
        self._flush_sem_name = flush_name
        self._space_sem_name = space_name

    # -- lifecycle ---------------------------------------------------------------

    def create_semaphores(self, mode: int) -> None:
        self.flush_sem = posix_ipc.Semaphore(
            self._flush_sem_name, posix_ipc.O_CREAT, mode=mode, initial_value=0
        )
        self.space_sem = posix_ipc.Semaphore(
            self._space_sem_name, posix_ipc.O_CREAT, mode=mode, initial_value=0
        )
        # posix_ipc applies the umask to mode; set the bits exactly, as for the
        # segment.  glibc keeps named semaphores at /dev/shm/sem.<name>.
        for sem_name in (self._flush_sem_name, self._space_sem_name):
            os.chmod(f"/dev/shm/sem.{sem_name.lstrip('/')}", mode)

    def open_semaphores(self) -> None:
        try:
            self.flush_sem = posix_ipc.Semaphore(self._flush_sem_name)
            self.space_sem = posix_ipc.Semaphore(self._space_sem_name)
        except posix_ipc.PermissionsError as exc:
            self.close_semaphores()
            raise PermissionError(
                f"no permission to open the semaphores of ring {self.name!r}: {exc}"
            ) from None
        except posix_ipc.ExistentialError:
            self.close_semaphores()
            raise RingBrokenError(
                f"ring {self.name!r}: its semaphores are missing; the owner has closed "
                "it or the segment is left over from a crash (python -m shmflush cleanup)"
            ) from None

    def close_semaphores(self) -> None:
        # Forget them first: repeated after an exception, this closes nothing twice.
        sems = (self.flush_sem, self.space_sem)
        self.flush_sem = self.space_sem = None
        for sem in sems:
            if sem is not None:
                with contextlib.suppress(posix_ipc.ExistentialError):
                    sem.close()

    def unmap(self) -> None:
        """Release the views, then the mapping, each exactly once."""
        self.close_semaphores()
        if self.mm is None:
            return
        self.commits = self.u8 = self.leases = None  # drops numpy's exports of the mapping
        self.words.release()
        self.view.release()
        self.mm.close()
        self.mm = None

    # -- header ------------------------------------------------------------------

    def header(self, field: int) -> int:
        return self.words[field // 8]

    def set_header(self, field: int, value: int) -> None:
        self.words[field // 8] = value

    def header_add(self, field: int, delta: int) -> int:
        return int(_fetch_add(self.base + field, delta & L.WORD_MASK, SEQ_CST))

    def status(self) -> int:
        return self.words[self.status_w]

    def set_status(self, bits: int) -> None:
        _fetch_or(self.base + L.H_STATUS, bits, SEQ_CST)

    def check_status(self) -> None:
        """Raise if the ring can no longer accept records."""
        if self.handle_closed:
            raise RingClosedError(f"ring {self.name!r} is closed")
        status = self.words[self.status_w]
        if status & L.STATUS_BROKEN:
            raise self.broken_error()
        if status & (L.STATUS_CLOSING | L.STATUS_FLUSHER_DONE):
            raise RingClosedError(f"ring {self.name!r} was closed by its owner")

    def broken_reason(self) -> str:
        """Why the ring is broken, in words, from the cause the flusher stored (the
        ring's name is not in it)."""
        kind = self.header(L.H_ERROR_KIND)
        if kind in (L.ERROR_FILE_DELETED, L.ERROR_FILE_TRUNCATED):
            path = os.fsdecode(L.read_path(self.view)) or "of the ring"
            if kind == L.ERROR_FILE_DELETED:
                return f"the file {path} was deleted while the ring was writing it"
            return (
                f"the file {path} was truncated to {self.header(L.H_ERROR_SIZE)} bytes "
                f"below {self.header(L.H_ERROR_WRITTEN)} bytes already written"
            )
        errno = self.header(L.H_ERROR_ERRNO)
        if not errno and self.status() & L.STATUS_OWNER_DEAD:
            path = L.read_path(self.view).decode(errors="replace")
            return (
                f"its owner (pid {self.header(L.H_OWNER_PID)}) died without close(); "
                f"committed records are drained to {path}"
            )
        if not errno:
            return "the flusher stopped"
        buffer = self.header(L.H_ERROR_BUFFER)
        what = "write and sync a batch" if buffer == L.NO_BUFFER else f"write buffer {buffer}"
        return f"the flusher failed to {what}: [Errno {errno}] {os.strerror(errno)}"

    def broken_error(self) -> RingBrokenError:
        reason = f"ring {self.name!r}: {self.broken_reason()}"
        if self.header(L.H_ERROR_KIND) != L.ERROR_IO:
            return RingBrokenError(f"{reason}; the ring takes no more records")
        errno = self.header(L.H_ERROR_ERRNO)
        if not errno:
            return RingBrokenError(f"{reason}, the ring takes no more")
        err = RingBrokenError(
            f"{reason}; records still in shared memory are kept and retried, but the "
            "ring takes no more",
            errno,
        )
        err.__cause__ = OSError(errno, os.strerror(errno))
        return err

    def timeout_error(self, message: str) -> RingTimeoutError:
        """A RingTimeoutError for *message*, saying why when the flusher is stalled
        (``H_STALL_ERRNO``: typically a full disk), with that OSError chained."""
        errno = self.header(L.H_STALL_ERRNO)
        if not errno:
            return RingTimeoutError(message)
        path = os.fsdecode(L.read_path(self.view)) or "the ring's file"
        if errno == _errno.ENOSPC:
            hint = f"free space on the file system of {path}"
        elif errno == _errno.EDQUOT:
            hint = f"free space or raise the disk quota for {path}"
        else:
            hint = f"check the device that holds {path}"
        err = RingTimeoutError(
            f"{message}: the flusher cannot write: [Errno {errno}] {os.strerror(errno)}; "
            f"it retries ({hint})"
        )
        err.__cause__ = OSError(errno, os.strerror(errno))
        return err

    def flusher_alive(self) -> bool:
        return _proc.is_alive(self.header(L.H_FLUSHER_PID), self.header(L.H_FLUSHER_START))

    def wake_flusher(self) -> None:
        sem = self.flush_sem
        if sem is not None:
            sem.release()

    # -- state words -------------------------------------------------------------

    def state(self, i: int) -> int:
        return int(_load(self.state_addr[i], SEQ_CST))

    def bytes_view(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        if self.u8 is None:
            raise RingClosedError(f"ring {self.name!r} is closed")
        return self.u8

    def commit_total(self, i: int) -> int:
        """Sum of every lease's commit counter for buffer *i*."""
        commits = self.commits
        assert commits is not None
        # uint64 sums wrap modulo 2**64, like the counters themselves.
        return int(commits[:, i].sum(dtype=np.uint64))

    def committed(self, i: int) -> int:
        """Bytes committed into buffer *i*'s current fill (see _layout)."""
        return (self.commit_total(i) - self.words[self.base_w[i]]) & L.WORD_MASK

    def close_extent(self, i: int, used: int) -> None:
        """Fix the fill's extent: used length, file address, seal sequence.

        The caller publishes these plain stores with the atomic RMW that sets
        CLOSED; the flusher reads them only after seeing CLOSED.
        """
        words = self.words
        if used:
            size = _format.segment_size(used)
            address = int(_fetch_add(self.base + L.H_NEXT_ADDRESS, size, SEQ_CST))
            seq = int(_fetch_add(self.base + L.H_NEXT_SEQ, 1, SEQ_CST))
        else:
            address = seq = 0  # an empty fill is recycled without a write
        words[self.used_w[i]] = used
        words[self.address_w[i]] = address
        words[self.seq_w[i]] = seq
        words[self.extent_of_w[i]] = words[self.fill_w[i]]

    def mark_closed(self, i: int) -> None:
        """Set CLOSED (after close_extent): publishes the extent's plain stores."""
        _fetch_or(self.state_addr[i], L.CLOSED, SEQ_CST)

    def close_crossing(self, i: int, used: int) -> None:
        """Close a fill on behalf of the crossing claim (whose bytes are not in it)."""
        _fetch_or(self.state_addr[i], L.SEALED, SEQ_CST)
        if _faults.ENABLED:
            _faults.reached("close.sealed")
        self.close_extent(i, used)
        if _faults.ENABLED:
            _faults.reached("close.addressed")
        _fetch_or(self.state_addr[i], L.CLOSED, SEQ_CST)
        self.wake_flusher()

    def reject(self, i: int, old: int) -> None:
        """Handle a failed claim that was not the crossing one (its previous word
        *old* was sealed, or already past capacity).

        Past capacity but not yet sealed means the crossing writer is between its
        fetch-and-add and its seal.  We seal on its behalf before we let go: were we
        to retry while the fill stays unsealed, every retry would add to the offset
        and could wrap it past 2**32, letting a claim land on existing records.  So
        each writer adds at most once to an over-full open fill, which is what the
        overshoot bound counts on.  The crossing writer still closes the fill.
        """
        if old & L.SEALED:
            return
        # Compare-and-swap, not fetch_or: by now the fill may have been closed,
        # flushed and its buffer reopened for a new fill, which must not be sealed
        # (nobody would close it).  Seal only while it is still over-full.
        addr = self.state_addr[i]
        st = int(_load(addr, SEQ_CST))
        while not st & L.SEALED and st >> L.OFFSET_SHIFT > self.capacity:
            ok, st = _cas(addr, st, st | L.SEALED)
            if ok:
                return

    def seal(self, i: int) -> bool:
        """Seal buffer *i*'s open fill (time-based seal, sync, close, large claims).

        Returns True if this call sealed an open fill.  If a crossing claim got
        there first, the crossing writer closes the fill instead.
        """
        prev = _fetch_or(self.state_addr[i], L.SEALED, SEQ_CST)
        if prev & L.SEALED:
            return False
        used = prev >> L.OFFSET_SHIFT
        if used > self.capacity:
            return True  # the crossing writer closes it
        self.close_extent(i, used)
        _fetch_or(self.state_addr[i], L.CLOSED, SEQ_CST)
        self.wake_flusher()
        return True

    def take(self, i: int) -> int:
        """The flusher takes buffer *i*'s fill for writing: SEALED|CLOSED becomes
        FLUSHING once every claim in it is committed and every chunk tail
        returned (I2).  Returns TAKEN, WAITING (closed, not yet all committed)
        or NOT_READY."""
        st = self.state(i)
        if (st & (L.SEALED | L.CLOSED | L.FLUSHING)) != L.SEALED | L.CLOSED:
            return NOT_READY
        words = self.words
        total = self.commit_total(i)
        if (total - words[self.base_w[i]]) & L.WORD_MASK != words[self.used_w[i]]:
            return WAITING
        ok, _ = _cas(self.state_addr[i], st, st | L.FLUSHING)
        if not ok:
            return NOT_READY
        # The next fill of this buffer counts from here.  Stored as the total
        # (not base + used) so that a restarted flusher can redo it.
        words[self.base_w[i]] = total
        if _FAULTS:
            _faults.reached("flush.taken")
        return TAKEN

    def rebase(self, i: int) -> None:
        """Redo take's base for a fill a dead flusher had taken (idempotent)."""
        self.words[self.base_w[i]] = self.commit_total(i)

    def reset(self, i: int) -> None:
        """Zero the written part of buffer *i* and make it IDLE (after its write
        is durable, I4).

        Zeroing before reuse keeps padding free of stale records (the Rust crate's
        stale-padding bug) and is what lets recovery and readers trust zeros.
        """
        used = self.words[self.used_w[i]]
        size = _format.segment_size(min(used, self.capacity))
        ctypes.memset(self.base + self.buffer_at[i], 0, size)
        if _FAULTS:
            _faults.reached("flush.zeroed")
        addr = self.state_addr[i]
        st = self.state(i)
        while True:
            # A loop, not a store: stale claims may be adding to the offset.
            ok, st = _cas(addr, st, L.IDLE | L.SEALED)
            if ok:
                return

    def abandon(self, at: int, size: int) -> None:
        """Turn a claimed range into an ABANDONED record (LLAMA's failed-flush marker)."""
        _format.pack_record_header(
            self.view, at, size - _format.RECORD_HEADER_SIZE, _format.KIND_ABANDONED
        )

    def return_chunks(self) -> int:
        """The flusher's half of the chunk protocol: take back the unused tails
        of chunks in sealed fills whose writers are not inside an append, and
        commit them in the flusher's row.  Returns how many it took.

        A writer stores its position with AT_BUSY, then checks that its fill is
        unsealed, with plain accesses that x86-64 may reorder (store buffer).
        Every fill considered here was sealed (an atomic RMW) before the
        barrier below, and membarrier(2) makes every running thread of a
        registered writer process execute a full barrier before it returns.
        So after it, a writer whose position reads without AT_BUSY is outside
        any append that could write into the chunk: a later one sees SEALED.
        A writer inside one (AT_BUSY) keeps its chunk; its fill waits for it.
        """
        leases = self.leases
        if not self.fence_on or leases is None:
            return 0
        g = self.geometry
        words = self.words
        found = []
        for k in np.flatnonzero(leases[:, L.L_CHUNK // 8]).tolist():
            c = int(leases[k, L.L_CHUNK // 8])
            if c & L.CHUNK_RETURNING:
                continue  # its holder won the tail and is committing it
            end = self._chunk_end(c)
            if end and self._returnable(k, c, end):
                found.append((k, c, end))
        if not found:
            return 0
        try:
            _fence.barrier()
        except OSError as exc:
            # The kernel refused (seccomp): tell writers to fall back to one
            # claim per record at their next claim; the chunks out now are
            # returned by their writers (next append, or when they end).
            print(
                f"shmflush: ring {self.name!r}: {exc}; writers fall back to one "
                "atomic per record, and idle writers' chunks are returned by "
                "their writers only",
                file=sys.stderr,
            )
            self.fence_on = False
            words[L.H_FENCE // 8] = L.FENCE_OFF
            return 0
        taken = 0
        for k, c, end in found:
            pos = self._returnable(k, c, end)
            if not pos:
                continue
            ok, _ = _cas(self.base + g.lease(k) + L.L_CHUNK, c, 0)
            if ok:
                if _FAULTS:
                    _faults.reached("flush.chunk_taken")
                w = g.commit(g.recovery_row, L.intent_buffer(c)) // 8
                words[w] = (words[w] + end - pos) & L.WORD_MASK
                taken += 1
        return taken

    def chunk_extent(self, c: int) -> tuple[int, int] | None:
        """Decode chunk word *c*: (buffer, mapping offset of the chunk's end), if
        it names the current fill of a buffer; else None (a chunk of an earlier
        fill, or a corrupt buffer index).  The end comes from shared memory:
        callers check it.  Ignores CHUNK_RETURNING."""
        i = L.intent_buffer(c)
        if i >= self.geometry.buffers:
            return None
        if L.intent_fill_tag(c) != self.words[self.fill_w[i]] & 0xFFFF:
            return None
        return i, self.records_at[i] + (c & L.INTENT_SIZE_MASK)

    def _chunk_end(self, c: int) -> int:
        """The mapping offset where chunk word *c* ends, if it names a chunk of
        a sealed fill not yet taken (the only ones return_chunks takes); else 0."""
        extent = self.chunk_extent(c)
        if extent is None:
            return 0
        i, end = extent
        st = self.words[self.state_w[i]]
        if (st & (L.SEALED | L.FLUSHING | L.IDLE | L.RESERVED)) != L.SEALED:
            return 0
        return end if end <= self.records_at[i] + self.capacity else 0

    def _returnable(self, k: int, c: int, end: int) -> int:
        """Slot *k*'s position in its chunk *c* ending at *end*, if it is
        outside an append and short of the end (a tail to take); else 0."""
        pos = self.words[(self.geometry.lease(k) + L.L_AT) // 8]
        start = self.records_at[L.intent_buffer(c)]
        if pos & _BUSY or pos % 8 or not start <= pos < end:
            return 0
        return pos

    def claim_succeeded(self, old: int, size: int) -> bool:
        """Did a claim of *size* bytes whose fetch-and-add returned *old* get its
        range?  (Unsealed, and the range fits; the fill check is separate.)"""
        return not old & L.SEALED and (old >> L.OFFSET_SHIFT) + size <= self.capacity

    def finished_prefix(self, at: int, end: int) -> int:
        """The mapping offset of the first unfinished record in the claimed range
        [at, end), or *end* if every record in it is finished.

        A claim holds one record (append, reserve) or a batch (append_many,
        append_array).  Records are finished in order and each header is
        written after its payload into bytes that were zero, so the headers met
        here are all real: a crafted payload cannot be read as one.
        """
        view = self.view
        while at + _format.RECORD_HEADER_SIZE <= end:
            length, kind, mark = _format.RECORD_HEADER.unpack_from(view, at)
            size = _format.record_size(length)
            if mark != _format.RECORD_MARK or kind not in _format.RECORD_KINDS or at + size > end:
                break
            at += size
        return at

    def claim_large(self, i: int, size: int) -> int:
        """Claim *size* bytes with compare-and-swap (no overshoot).  Returns the offset,
        or -1 after sealing a fill the record does not fit in, or -2 if sealed."""
        addr = self.state_addr[i]
        while True:
            st = int(_load(addr, SEQ_CST))
            if st & L.SEALED:
                return -2
            off = st >> L.OFFSET_SHIFT
            if off + size > self.capacity:
                self.seal(i)
                return -1
            ok, _ = _cas(addr, st, st + L.claim_delta(size))
            if ok:
                return off

    # -- rotation ----------------------------------------------------------------

    def fill_done(self, lane_word: int) -> bool:
        """Has the fill named by *lane_word* got its final extent (CLOSED or later)?"""
        i = lane_word & L.LANE_INDEX_MASK
        fill = lane_word >> L.LANE_FILL_SHIFT
        st = self.state(i)
        # Fill numbers of a buffer only grow, and are renumbered only after the fill
        # before was done; reading the state first makes the pair consistent.
        if self.words[self.fill_w[i]] != fill:
            return True
        return bool(st & (L.CLOSED | L.IDLE))

    def _reserve(self, prefer: int) -> int:
        """Take an IDLE buffer (IDLE -> RESERVED), or return -1."""
        n = self.geometry.buffers
        words = self.words
        pointed = {words[w] & L.LANE_INDEX_MASK for w in self.lane_w}
        # Prefer the lane's own buffer, then buffers no lane points at: a buffer
        # another lane still points at would make that lane's writers abandon a
        # record when they find a foreign fill in it.
        candidates = [prefer]
        candidates += [j for j in range(n) if j != prefer and j not in pointed]
        candidates += [j for j in range(n) if j != prefer and j in pointed]
        for j in candidates:
            addr = self.state_addr[j]
            st = int(_load(addr, SEQ_CST))
            while st & L.IDLE:
                ok, st = _cas(addr, st, (st & ~L.IDLE) | L.RESERVED)
                if ok:
                    return j
        return -1

    def unreserve(self, j: int) -> None:
        addr = self.state_addr[j]
        st = int(_load(addr, SEQ_CST))
        while True:
            ok, st = _cas(addr, st, (st & ~L.RESERVED) | L.IDLE)
            if ok:
                return

    def open_fill(self, j: int) -> None:
        """RESERVED|SEALED -> open with offset 0.  A compare-and-swap loop, because
        stale claims may still add to the (irrelevant) offset of the sealed word."""
        addr = self.state_addr[j]
        st = int(_load(addr, SEQ_CST))
        while True:
            ok, st = _cas(addr, st, 0)
            if ok:
                return

    def rotate(self, lane: int, lane_word: int, intent_w: int) -> int:
        """Move *lane* from the fill named by *lane_word* to a fresh fill.

        *intent_w* is the caller's lease intent word: it says "rotating" while a
        buffer may be RESERVED by us, so that recovery never opens or frees a
        reservation of a live rotator.
        """
        if self.words[self.status_w] & (L.STATUS_CLOSING | L.STATUS_FLUSHER_DONE):
            return NO_SPACE
        if not self.fill_done(lane_word):
            return NOT_DONE
        self.words[intent_w] = L.INTENT_ROTATING
        try:
            return self._rotate(lane, lane_word)
        finally:
            self.words[intent_w] = 0

    def _rotate(self, lane: int, lane_word: int) -> int:
        j = self._reserve(prefer=lane_word & L.LANE_INDEX_MASK)
        if j < 0:
            return NO_SPACE
        installed = False
        try:
            if _faults.ENABLED:
                _faults.reached("rotate.reserved")
            if self.words[self.status_w] & (L.STATUS_CLOSING | L.STATUS_FLUSHER_DONE):
                # Checked again after reserving: the flusher's final drain either
                # sees this buffer RESERVED (and waits) or we see CLOSING here (and
                # back off), so no fill opens after the last drain.
                self.unreserve(j)
                return NO_SPACE
            fill = int(_fetch_add(self.base + L.H_FILL_COUNTER, 1, SEQ_CST))
            # Plain store, published by the lane CAS below (and by the open CAS to
            # anyone who claims in this buffer).
            self.words[self.fill_w[j]] = fill
            installed, _ = _cas(self.lane_addr[lane], lane_word, L.lane_word(fill, j))
            if not installed:
                self.unreserve(j)
                return MOVED
            if _faults.ENABLED:
                _faults.reached("rotate.installed")
            self.open_fill(j)
        except BaseException:
            # An exception (Ctrl-C, a signal handler) between reserving and
            # opening: finish or undo, so the buffer is not left RESERVED until
            # recovery notices.  Both steps are idempotent compare-and-swaps.
            if self.state(j) & L.RESERVED:
                if installed:
                    self.open_fill(j)
                else:
                    self.unreserve(j)
            raise
        return MOVED

    def advance(self, lane: int, lane_word: int, deadline: float | None, intent_w: int) -> None:
        """After a failed claim: return once *lane* names another fill.

        Rotates the lane when possible, otherwise waits, for the closer of the
        current fill (microseconds) or for the flusher to free a buffer; each wait
        for space counts in ``self.waits``.  Never spins a core: waits for space
        block on a semaphore, waits for a closer sleep.
        """
        nap = 20e-6
        words = self.words
        lane_w = self.lane_w[lane]
        while True:
            self.check_status()
            if words[lane_w] != lane_word:
                return
            result = self.rotate(lane, lane_word, intent_w)
            if result == MOVED:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise self.timeout_error(f"ring {self.name!r}: no buffer space before timeout")
            if result == NOT_DONE:
                if not self.state(lane_word & L.LANE_INDEX_MASK) & L.SEALED:
                    return  # the fill is open again: retry the claim
                time.sleep(nap)
                nap = min(nap * 2, 2e-3)
                continue
            self.waits += 1
            self.wait_for_space(deadline, lane, lane_word, intent_w)

    def wait_for_space(
        self, deadline: float | None, lane: int, lane_word: int, intent_w: int
    ) -> None:
        """Block on the space semaphore until the flusher frees a buffer, the deadline
        passes, or 100 ms go by (then the caller re-checks everything)."""
        sem = self.space_sem
        if sem is None:
            raise RingClosedError(f"ring {self.name!r} is closed")
        self.header_add(L.H_WAITERS, 1)
        try:
            # Re-check after announcing ourselves: the flusher frees buffers before it
            # reads the waiter count, so either it posts for us or we see the space.
            if self.rotate(lane, lane_word, intent_w) == MOVED:
                return
            if not self.flusher_alive():
                self.check_status()
                if self.restart_flusher is None:
                    raise RingBrokenError(
                        f"ring {self.name!r}: the flusher process "
                        f"{self.header(L.H_FLUSHER_PID)} is not running"
                    )
                # A dead flusher loses nothing: its buffers wait in shared memory.
                # Start another one and keep waiting.
                self.restart_flusher()
            timeout = 0.1
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            acquire(sem, timeout)
        finally:
            self.header_add(L.H_WAITERS, -1)

    def post_space(self) -> None:
        """Wake every writer waiting for space (called by the flusher after a reset)."""
        sem = self.space_sem
        if sem is None:
            return
        # The waiter count can overstate: a writer SIGKILLed while waiting never
        # takes itself off.  So never let the semaphore run far ahead of what a
        # real crowd of waiters could use; a spurious wake-up only re-checks.
        want = min(self.header(L.H_WAITERS), 64)
        for _ in range(max(0, want - sem.value)):
            sem.release()

    # -- leases ------------------------------------------------------------------

    def acquire_lease(self) -> int:
        """Take a lease slot for the calling thread; returns its index.

        Slots of dead holders (pid gone or reused) and slots given up by live
        holders (ORPHANED) are reclaimed once they hold no claim.  The slot
        bounds how many claims can be in flight, which the overshoot bound
        relies on.
        """
        g = self.geometry
        pid = os.getpid()
        started = _own_start_time()
        tid = threading.get_native_id()
        me = L.holder_word(pid, tid)
        n = g.max_writers
        # Start where the last acquisition in this process ended: with thread
        # churn the low slots are the busy ones.
        first = self._lease_hint % n
        # Slots of dead or orphaned holders that still have a claim in flight
        # come free once the flusher has settled it (within a sweep, a quarter
        # of a second): wait that long before calling the slots exhausted.
        give_up = time.monotonic() + 2.0
        while True:
            k = self._take_lease(first, me, started, tid)
            if k >= 0:
                return k
            if time.monotonic() > give_up:
                break
            self.wake_flusher()
            time.sleep(0.01)
        raise ShmflushError(
            f"ring {self.name!r}: all {g.max_writers} writer slots are taken by live "
            "threads; create the ring with a larger max_writers"
        )

    def _take_lease(self, first: int, me: int, started: int, tid: int) -> int:
        """One pass of acquire_lease over the slots; returns one taken or -1."""
        g = self.geometry
        words = self.words
        n = g.max_writers
        self._taking = -1
        for reclaim in (False, True):
            for step in range(n):
                k = (first + step) % n
                at = g.lease(k)
                holder = words[(at + L.L_PID) // 8]
                # A dead holder's slot is reusable once it has no claim in flight
                # (its counters stay valid: the next holder keeps adding to them).
                if words[(at + L.L_CHUNK) // 8] or (
                    holder
                    and (
                        not reclaim
                        or words[(at + L.L_INTENT) // 8]
                        or (
                            not words[(at + L.L_FLAGS) // 8] & L.FLAG_ORPHANED
                            and holder_alive(holder, words[(at + L.L_START) // 8])
                        )
                    )
                ):
                    # Held, or still owing a chunk's tail (the flusher or
                    # recovery returns it, then the slot comes free).
                    continue
                self._taking = k
                ok, _ = _cas(self.base + at + L.L_PID, holder, me)
                if ok:
                    words[(at + L.L_START) // 8] = started
                    words[(at + L.L_TID) // 8] = tid
                    words[(at + L.L_LANE) // 8] = k % g.lanes
                    words[(at + L.L_AT) // 8] = 0
                    words[(at + L.L_FLAGS) // 8] = 0
                    self._lease_hint = k + 1
                    return k  # _taking stays k until the caller holds the slot
        return -1

    def release_untaken_lease(self) -> None:
        """After an exception inside acquire_lease: give back the slot whose
        compare-and-swap it was at, if that took it (the holder word names this
        very thread, so no other thread's slot can be mistaken for it)."""
        k, self._taking = self._taking, -1
        if k < 0:
            return
        at = self.geometry.lease(k)
        words = self.words
        me = L.holder_word(os.getpid(), threading.get_native_id())
        if not words[(at + L.L_INTENT) // 8]:
            self.release_lease(k, me)

    def release_lease(self, k: int, holder: int) -> None:
        """Give slot *k* back if *holder* (its holder word) still holds it.  The
        holder must have no claim in flight."""
        at = self.geometry.lease(k)
        _cas(self.base + at + L.L_PID, holder, 0)

    def free_lease(self, k: int, holder: int) -> None:
        """Recovery: free dead (or orphaned) holder *holder*'s slot *k* once
        nothing it left matters any more (claim, marker and chunk settled)."""
        at = self.geometry.lease(k)
        words = self.words
        # In this order: a thread that reclaims the slot checks the intent and
        # the chunk, so by then it sees the position cleared too (TSO), and
        # never has its own position overwritten.
        words[(at + L.L_AT) // 8] = 0
        words[(at + L.L_INTENT) // 8] = 0
        words[(at + L.L_CHUNK) // 8] = 0
        _cas(self.base + at + L.L_PID, holder, 0)

    def orphan_lease(self, k: int) -> None:
        """Give slot *k* up with whatever claim it has in flight: recovery settles
        it as if its holder had died (see _recovery), then frees the slot.  Used
        when an exception interrupted a claim at a point where the holder cannot
        tell how far it got."""
        at = self.geometry.lease(k)
        self.words[(at + L.L_FLAGS) // 8] = L.FLAG_ORPHANED
        self.wake_flusher()


class Writer:
    """One thread's lease slot on a ring, and the chunk it appends into.

    The writer side of the protocol, all of it: claiming a chunk, appending
    records into it, committing them, returning the chunk's unused tail, and
    settling whatever an exception left half-done.  The API layer, the tests
    and the model check all go through these methods; the crash points sit in
    them.

    A chunk is a range of the lane's current fill claimed with one
    fetch-and-add (``claim``).  Records go into it with plain stores only
    (``put``).  The lease slot says where the writer is: ``L_AT`` holds its
    position, with ``AT_BUSY`` set while it is inside an append, and
    ``L_CHUNK`` names the chunk.  The position is stored *before* the check
    that the fill is still unsealed; the flusher seals, then runs
    ``membarrier(2)`` (``_fence``), then trusts a position without AT_BUSY and
    takes the tail back (``Ring.return_chunks``).  Without the fence (fallback
    mode) every chunk is exactly one claim, written while AT_BUSY is set, so
    the flusher never has a tail to take: one fetch-and-add per record.

    Held by one thread only (its thread-local); released when the thread ends
    or its handle closes.  ``pending`` holds what the thread knew of a claim in
    flight, for ``settle``.
    """

    __slots__ = (
        "__weakref__",
        "at_w",
        "buf",
        "chunk_addr",
        "chunk_w",
        "commit_w",
        "core",
        "cw",
        "cword",
        "delta",
        "end",
        "fenced",
        "holder",
        "holder_w",
        "intent_w",
        "lane",
        "lane_w",
        "limit",
        "pending",
        "pid",
        "pos",
        "reservation",
        "returning",
        "seal_w",
        "slot",
        "target",
        "view",
        "words",
    )

    def __init__(self, core: Ring, slot: int) -> None:
        g = core.geometry
        self.core: Ring | None = core
        self.slot = slot
        self.pid = os.getpid()
        # The slot's holder word, as acquire_lease stored it (this thread's).
        self.holder = L.holder_word(self.pid, threading.get_native_id())
        self.lane = slot % g.lanes
        self.lane_w = core.lane_w[self.lane]
        lease = g.lease(slot)
        self.holder_w = (lease + L.L_PID) // 8
        self.intent_w = (lease + L.L_INTENT) // 8
        self.at_w = (lease + L.L_AT) // 8
        self.chunk_w = (lease + L.L_CHUNK) // 8
        self.chunk_addr = core.base + lease + L.L_CHUNK
        self.commit_w = g.commit(slot, 0) // 8  # + buffer index
        self.words = core.words
        self.view = core.view
        # Chunks need this process registered for the flusher's barrier.
        self.fenced = core.fence_on and _fence.register()
        # The chunk, as this thread knows it: mapping offsets of the next
        # record and of the end (0: no chunk), its buffer, its commit counter,
        # that counter minus the position (so the commit after a record ending
        # at e is the plain store counter = e + delta), its L_CHUNK word.
        self.pos = self.end = self.buf = self.cw = self.delta = self.cword = 0
        # put()'s bound: the end, or 0 while something an exception left in
        # flight is unsettled (every writer path's handler zeroes it first, so
        # the fast path never runs over an unsettled append).
        self.limit = 0
        # The word put() checks for SEALED: the chunk's state word, or
        # H_ZERO for a chunk whose claim has just succeeded (its first records
        # need no check: AT_BUSY was set before L_CHUNK named the chunk, so the
        # flusher cannot take it back meanwhile) and in fallback mode.
        self.seal_w = core.zero_w
        self.target = CHUNK_MIN
        # (buffer, fetch-and-add result or -1, commit counter before, size, fill)
        self.pending: tuple[int, int, int, int, int] | None = None
        self.returning = False  # inside return_chunk's compare-and-swap
        self.reservation: memoryview | None = None  # an open reserve() block's view

    # -- appending -----------------------------------------------------------------

    def put(self, data: Any, n: int, size: int) -> bool:
        """Append one record of *n* payload bytes (*size* with header and
        padding) into the chunk, with plain stores only.  False, with nothing
        written, if it does not fit or the fill was sealed: then ``claim``.

        On an exception the caller runs ``settle``: the record is then whole
        in the ring or not there.
        """
        pos = self.pos
        end = pos + size
        limit = self.limit
        if end > limit:
            return False
        # Armed until the append is done: an exception anywhere below, even
        # one that keeps the caller's handler from running, sends the next
        # call to the slow path, which settles this one first.
        self.limit = 0
        words = self.words
        at_w = self.at_w
        words[at_w] = pos | _BUSY  # "inside an append at pos", before the checks
        # Sealed: the flusher may be taking the chunk back.  Chunk word gone:
        # it did, and the buffer may hold a new, unsealed fill by now (read
        # second: x86 keeps loads in order, and the flusher clears the chunk
        # word before the fill can be taken, reset and reopened).
        if words[self.seal_w] & L.SEALED or words[self.chunk_w] != self.cword:
            words[at_w] = pos
            self.limit = limit
            return False
        if _FAULTS:
            _faults.reached("append.claimed")
        view = self.view
        view[pos + 8 : pos + 8 + n] = data
        if _FAULTS:
            _faults.reached("append.copied")
        _pack(view, pos, n, _KIND_DATA, _MARK)  # the header last
        if _FAULTS:
            _faults.reached("append.headed")
        words[self.cw] = end + self.delta  # the commit: after the bytes (TSO)
        if _FAULTS:
            _faults.reached("append.committed")
        self.pos = end
        words[at_w] = end
        self.limit = limit
        return True

    def open_range(self, size: int) -> int:
        """Enter an append of *size* bytes at the chunk's position without
        writing it (``reserve``, batches): returns the mapping offset, or -1
        (nothing done) if it does not fit or the fill was sealed.  The caller
        writes the records, headers last, then calls ``commit_to``."""
        pos = self.pos
        if pos + size > self.limit:
            return -1
        self.limit = 0  # armed until commit_to, as in put
        words = self.words
        words[self.at_w] = pos | _BUSY
        if words[self.seal_w] & L.SEALED or words[self.chunk_w] != self.cword:  # see put
            words[self.at_w] = pos
            self.limit = self.end
            return -1
        return pos

    def room(self) -> int:
        """Bytes left in the chunk (0 while something is unsettled)."""
        return max(0, self.limit - self.pos)

    def unsettled(self) -> bool:
        """Did an exception leave something in flight that settle must see to?"""
        core = self.core
        return core is not None and (
            self.limit != self.end
            or self.pending is not None
            or self.returning
            or bool(core.words[self.intent_w])
        )

    def commit_to(self, end: int) -> None:
        """Commit the records written from the position up to *end* (each
        finished, header last) and leave the append.  Idempotent."""
        words = self.words
        words[self.cw] = end + self.delta
        if _FAULTS:
            _faults.reached("append.committed")
        self.pos = end
        words[self.at_w] = end
        self.limit = self.end

    def abandon_to(self, end: int) -> None:
        """Turn the range from the position to *end* into an ABANDONED record
        and commit it (a reserve() block that raised)."""
        core = self._core()
        core.abandon(self.pos, end - self.pos)
        core.abandoned += 1
        self.commit_to(end)

    def fresh(self) -> None:
        """The first records after ``claim`` have been written: from now on
        put() checks that the fill is unsealed."""
        if self.fenced:
            self.seal_w = self._core().state_w[self.buf]

    # -- claiming --------------------------------------------------------------------

    def _core(self) -> Ring:
        core = self.core
        if core is None:
            raise RingClosedError("this writer slot was given up")
        return core

    def claim(self, need: int, want: int, deadline: float | None) -> None:
        """Return the current chunk, then claim a new one in this thread's lane
        of at least *need* bytes: *want* (or the adaptive chunk size, if
        larger) where the fill has room, else what is left of it.  The chunk
        is installed AT_BUSY at its start: the caller writes its first
        records (``put`` or ``open_range``) and calls ``fresh``.

        Waits (rotation, space) as ``Ring.advance`` says; raises
        RingClosedError, RingBrokenError, RingTimeoutError.
        """
        core = self._core()
        self.limit = 0  # no fast path until a chunk is installed (see put)
        self.return_chunk()
        words = core.words
        if self.fenced and words[L.H_FENCE // 8] != L.FENCE_ON:
            self.fenced = False  # the flusher cannot fence: see return_chunks
        cap = core.capacity
        while True:
            core.check_status()
            lane_word = words[self.lane_w]
            i = lane_word & L.LANE_INDEX_MASK
            if i >= core.geometry.buffers:
                raise CorruptRingError(
                    f"ring {core.name!r}: corrupt lane word {lane_word:#x} "
                    "(buffer index out of range)"
                )
            fill = lane_word >> L.LANE_FILL_SHIFT
            size = need
            if self.fenced:
                # Up to what is left of the fill (a plain load: a stale value
                # only makes the claim cross, which closes the fill).
                left = cap - (words[core.state_w[i]] >> L.OFFSET_SHIFT)
                size = max(need, min(max(want, self.target), left, core.faa_limit))
            committed = words[self.commit_w + i]
            self.pending = (i, -1, committed, size, fill)
            words[self.intent_w] = L.claim_intent(lane_word, size)
            if size > core.faa_limit:
                off = core.claim_large(i, size)
                if off < 0:
                    words[self.intent_w] = 0
                    self.pending = None
                    core.advance(self.lane, lane_word, deadline, self.intent_w)
                    continue
                old = off << L.OFFSET_SHIFT
            else:
                old = _fetch_add(core.state_addr[i], size << L.OFFSET_SHIFT, SEQ_CST)
            self.pending = (i, old, committed, size, fill)
            if core.claim_succeeded(old, size) and words[core.fill_w[i]] == fill:
                self._install(core, i, old, committed, size, fill)
                return
            self._claim_failed(core, i, old, size, lane_word, deadline)

    def _install(  # noqa: PLR0917  (the claim's whole state)
        self, core: Ring, i: int, old: int, committed: int, size: int, fill: int
    ) -> None:
        """Make a successful claim this thread's chunk.  Idempotent (settle
        repeats it after an interrupt)."""
        words = core.words
        off = old >> L.OFFSET_SHIFT
        start = core.records_at[i] + off
        # The position before the chunk word: a chunk is never seen with the
        # position of the one before it.
        words[self.at_w] = start | _BUSY
        cword = L.claim_intent(L.lane_word(fill, i), off + size)
        words[self.chunk_w] = cword
        self.cword = cword
        self.buf = i
        self.cw = self.commit_w + i
        self.delta = committed - start
        self.pos = start
        self.end = start + size
        self.seal_w = core.zero_w
        words[self.intent_w] = 0
        self.pending = None
        self.limit = self.end  # last: the fast path may use the chunk from here

    def _claim_failed(  # noqa: PLR0917  (what claim already has)
        self, core: Ring, i: int, old: int, size: int, lane_word: int, deadline: float | None
    ) -> None:
        """Settle a claim that cannot be used, then wait until the lane moves on.
        ``pending`` describes the claim on entry, for settle."""
        words = core.words
        off = old >> L.OFFSET_SHIFT
        if core.claim_succeeded(old, size):
            # A valid claim, but in a fill that is not our lane's: we read the lane
            # word, and the buffer was recycled into another lane's fill before our
            # claim landed.  Writing there could reorder our records (I8): give the
            # range up as an abandoned record, commit it, and move the lane on.
            assert self.pending is not None
            core.abandon(core.records_at[i] + off, size)
            words[self.commit_w + i] = (self.pending[2] + size) & L.WORD_MASK
            words[self.intent_w] = 0
            self.pending = None
            core.abandoned += 1
            core.rotate(self.lane, lane_word, self.intent_w)
            return
        if not old & L.SEALED and off <= core.capacity:
            # We crossed capacity: we close the fill.  The lease says so while we
            # do: were we to die half-way, recovery finishes the close; an
            # exception here orphans the slot for the same reason.
            words[self.intent_w] = L.INTENT_SEALING | (i << 32)
            self.pending = None
            core.close_crossing(i, off)
            words[self.intent_w] = 0
        else:
            words[self.intent_w] = 0
            self.pending = None
            core.reject(i, old)
        core.advance(self.lane, lane_word, deadline, self.intent_w)

    def return_chunk(self) -> None:
        """Give the chunk's unused tail back: commit it (its bytes are zero:
        padding in the file) unless the flusher took it first.  Idempotent."""
        end = self.end
        if not end:
            return
        core = self._core()
        if core.words[self.seal_w] & L.SEALED or core.words[self.chunk_w] != self.cword:
            self.target = CHUNK_MIN  # its fill was sealed early: the tail is padding
        elif self.target < CHUNK_MAX:
            self.target *= 2  # used up by this thread: claim more at a time
        if self.pos < end:
            # The flusher may be taking this tail right now (the fill is
            # sealed): the compare-and-swap decides which of us commits it.
            self.returning = True
            ok, _ = _cas(self.chunk_addr, self.cword, self.cword | L.CHUNK_RETURNING)
            if ok:
                if _FAULTS:
                    _faults.reached("chunk.returned")
                core.words[self.cw] = end + self.delta
                core.words[self.chunk_w] = 0
            self.returning = False
        else:
            core.words[self.chunk_w] = 0  # nothing left for anyone to take
        self.pos = self.end = self.limit = 0

    # -- exceptions and release ----------------------------------------------------

    def settle(self) -> None:
        """Settle what an exception left in flight, from shared memory: keep
        finished records, turn unfinished ones into an ABANDONED record, commit,
        and leave the append.  Where this thread cannot tell how far it got,
        orphan the slot (recovery settles it as a dead writer's)."""
        core = self.core
        if core is None or core.mm is None or self.pid != os.getpid():
            return
        words = core.words
        if words[self.holder_w] != self.holder:
            # Not ours any more (recovery freed it after this thread ended, and
            # somebody else may hold it now): touch nothing.
            self.core = None
            return
        if self.returning:
            self.returning = False
            chunk = words[self.chunk_w]
            if chunk == self.cword:
                self.return_chunk()  # the compare-and-swap did not happen
            elif chunk == self.cword | L.CHUNK_RETURNING:
                words[self.cw] = self.end + self.delta  # ours: finish it
                words[self.chunk_w] = 0
            # else 0: done, by this thread or by the flusher
            self.pos = self.end = self.limit = 0
        if words[self.intent_w] and not self._settle_claim(core):
            self._orphan(core)
            return
        self.pending = None
        if self.end and words[self.at_w] & _BUSY:
            self._settle_chunk(core)
        if self.core is not None:
            self.limit = self.end

    def _settle_claim(self, core: Ring) -> bool:
        """Settle the claim in flight (the intent is set).  False where only
        recovery can: the fetch-and-add's result is unknown, or the claim
        crossed capacity and so must close its fill, or a marker (sealing,
        rotating) was left."""
        pending = self.pending
        if pending is None:
            return False
        i, old, committed, size, fill = pending
        words = core.words
        if old < 0:
            return False
        off = old >> L.OFFSET_SHIFT
        if not core.claim_succeeded(old, size):
            if not old & L.SEALED and off <= core.capacity:
                return False  # the crossing claim: its fill waits for a closer
            words[self.intent_w] = 0
            core.reject(i, old)
            return True
        if words[core.fill_w[i]] != fill:
            core.abandon(core.records_at[i] + off, size)  # a stale claim: never data
            words[self.commit_w + i] = (committed + size) & L.WORD_MASK
            words[self.intent_w] = 0
            return True
        # A chunk installed or about to be: finish installing it; its first
        # append then settles below like any other.
        self._install(core, i, old, committed, size, fill)
        return True

    def _settle_chunk(self, core: Ring) -> None:
        """The append at the position (AT_BUSY) was interrupted."""
        words = core.words
        at = words[self.at_w] & ~_BUSY
        end = self.end
        if at % 8 or not core.records_at[self.buf] <= at <= end:
            self._orphan(core)  # not a position this thread stored
            return
        first = core.finished_prefix(at, end)
        u8 = core.bytes_view()
        # Past the finished records: zero bytes are padding and the chunk goes
        # on; anything else is a record cut short.  In fallback mode a chunk is
        # one claim and never stays open past its append.
        if first < end and (u8[first:end].any() or not self.fenced):
            if u8[first:end].any():
                core.abandon(first, end - first)
            first = end
        self.commit_to(first)
        self.fresh()

    def _orphan(self, core: Ring) -> None:
        self.pending = None
        core.orphan_lease(self.slot)  # idempotent; first, so nothing leaks
        self.core = None  # the slot is recovery's now: never release it
        self.pos = self.end = self.limit = 0

    def release(self) -> None:
        """Give the slot back: settle, return the chunk, free the slot."""
        view, self.reservation = self.reservation, None
        if view is not None:
            # The handle closes under an open reserve() block: its owner may not
            # write there any more (the claim is settled as abandoned).
            view.release()
        self.settle()
        core = self.core
        if core is not None and core.mm is not None and self.pid == os.getpid():
            self.return_chunk()
            # A compare-and-swap from this slot's own holder word: repeating it
            # (a release interrupted and run again) never frees a slot that
            # another thread has taken since.
            core.release_lease(self.slot, self.holder)
        self.core = None

    def __del__(self) -> None:
        # Never raises: CPython would only print the exception, from whatever
        # code the collector interrupted.  A KeyboardInterrupt that lands here
        # is lost the same way; the slot's claim is then recovery's to settle.
        try:  # noqa: SIM105  (not suppress(): no __exit__ call for an exception to hit)
            self.release()
        except BaseException:
            pass


def holder_alive(holder: int, started: int) -> bool:
    """Is the thread named by L_PID word *holder* still running?  A slot can
    outlive its thread (a traceback kept alive holds its _ThreadSlot), and a
    slot of a thread that ended is as free as one of a dead process."""
    pid = L.holder_pid(holder)
    if not _proc.is_alive(pid, started):
        return False
    tid = holder >> 32
    return not tid or os.path.exists(f"/proc/{pid}/task/{tid}")


_start_time_cache: list[int] = [0, 0]  # [pid, start time]


def _own_start_time() -> int:
    """This process's start time (cached per pid: a forked child has its own)."""
    pid = os.getpid()
    if _start_time_cache[0] != pid:
        _start_time_cache[:] = [pid, _proc.start_time(pid)]
    return _start_time_cache[1]


def attach_ring(name: str) -> Ring:
    mm, geometry = L.open_segment(name)
    try:
        ring = Ring(name, mm, geometry)
    except BaseException:
        mm.close()
        raise
    try:
        ring.open_semaphores()
    except BaseException:
        ring.unmap()
        raise
    return ring
