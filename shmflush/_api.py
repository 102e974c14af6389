"""Layer 5: the public API — create, attach, Ring, Stats."""

from __future__ import annotations

import atexit
import contextlib
import errno as _errno
import fcntl
import functools
import itertools
import math
import os
import re
import stat
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

from . import _faults, _fence, _files, _format, _proc, _supervisor
from . import _layout as L
from ._errors import (
    CorruptFileError,
    ForeignFileError,
    RecordTooLargeError,
    RingBrokenError,
    RingClosedError,
    RingExistsError,
    RingTimeoutError,
    ShmflushError,
    UnsupportedFormatError,
)
from ._reader import find_append_point
from ._ring import Ring as _Core
from ._ring import Writer, attach_ring
from ._ring import restore_signal_mask as _restore_signal_mask

__all__ = ["DamagedTailWarning", "DirectIOWarning", "Ring", "Stats", "attach", "create"]

_HDR: Final = _format.RECORD_HEADER_SIZE
_NUMBERS: Final = (int, float)  # exact types: bool is refused by _check_timeout
_KIND_DATA: Final = _format.KIND_DATA
_MARK: Final = _format.RECORD_MARK
_KIND_ABANDONED: Final = _format.KIND_ABANDONED
# append_many and append_array claim at most this much with one fetch-and-add (or
# an eighth of a buffer, if less): large enough to amortise the atomic, small
# enough that a claim that does not fit wastes little of a buffer.
_BATCH_BYTES: Final = 64 << 10


class DamagedTailWarning(RuntimeWarning):
    """:func:`create` cut off damaged bytes after a file's last valid segment,
    after copying them to a sibling file that the message names."""


class DirectIOWarning(RuntimeWarning):
    """The file system refused O_DIRECT; the flusher writes through the page cache."""


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of one ring.

    ``records``, ``bytes``, ``waits`` and ``abandoned`` count what *this process*
    did through this ring object; the other fields are ring-wide.
    """

    name: str
    records: int  #: records this process appended
    bytes: int  #: payload bytes this process appended
    waits: int  #: times this process blocked because every buffer was full
    abandoned: int  #: ranges this process turned into abandoned records
    buffers_flushed: int  #: fills the flusher wrote (ring-wide)
    bytes_written: int  #: bytes the flusher wrote to the file, padding included
    syncs: int  #: fdatasync calls the flusher made
    direct_io: bool  #: whether the flusher writes with O_DIRECT
    flusher_pid: int
    buffer_size: int
    buffers: int
    lanes: int
    broken: bool  #: the flusher hit an error; appends raise RingBrokenError
    #: errno the flusher is retrying without breaking the ring (ENOSPC: the disk is
    #: full); appends wait for space meanwhile.  0 while it writes.
    stalled: int
    recovered: int  #: stuck fills the flusher recovered from dead writers
    flusher_restarts: int  #: times a flusher was restarted after dying
    #: records a shmflush.LogHandler (or the structlog renderer) appending through
    #: this ring object dropped because the ring was full (this process)
    dropped: int


_live_rings: weakref.WeakSet[Ring] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's mapping (MAP_SHARED survives fork) but must not
    # use the parent's lease slots, nor act as the owner.
    for ring in list(_live_rings):
        ring._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Ring:
    """A handle on a shmflush ring in this process.

    Get one from :func:`create` (the owner) or :func:`attach` (anyone else on the
    host running as the same user).  A ring pickles by name, so passing it to a
    ``multiprocessing`` worker attaches there.  All methods are safe to call from
    several threads; each thread takes its own writer slot on its first append.

    Guarantees:

    * A record whose ``append`` returned is written to the file by the flusher,
      unless the ring reports itself broken; after the owner's ``close()`` (or a
      ``sync()``) returns, it is on disk to the ring's sync level.
    * Records appended by one thread through one handle appear in the file in
      the order of the calls.  (Two handles on the same ring in one process
      are two writers: each keeps its own order.)
    * Nothing is dropped while a call reports success: every failure raises.
    """

    def __init__(self, core: _Core, *, owner: bool = False) -> None:
        # Sentinels first, so that close() works on a half-built object.
        self._core: _Core | None = core
        self._owner_pid = os.getpid() if owner else 0
        self._pid = os.getpid()
        # The flusher processes this handle starts, and the owner's watchdog.
        self._supervisor = _supervisor.Supervisor(core.name)
        # close() takes no lock (an exception can leave no lock held): the first
        # closer claims this dict's key with setdefault, which is atomic.
        self._closer: dict[str, int] = {}
        self._closing_core: _Core | None = None  # kept until close() finished
        self._tls = threading.local()
        # Weak references, by slot index: a thread's slot lives as long as the
        # thread's locals do, so a thread that ends gives its slot back (thread
        # churn).  Single dict operations are atomic, so no lock is needed.
        self._slots: dict[int, weakref.ref[Writer]] = {}
        self._records = 0
        # Records the logging integration dropped on a full ring (_logging.Sink).
        self._dropped = 0
        self._bytes = 0
        self.name = core.name
        self._ring_id = core.header(L.H_RING_ID)
        # Hot-path constants and bound callables, cached once.
        self._words = core.words
        self._view = core.view
        self._status_w = core.status_w
        self._capacity = core.capacity
        self._max_record = core.max_record
        self._pack = _format.RECORD_HEADER.pack_into
        # A writer of this handle that waits for space and finds the flusher dead
        # restarts it through our supervisor.
        self._supervisor.hook(core)
        _live_rings.add(self)

    # -- lifecycle -----------------------------------------------------------------

    def _forked(self) -> None:
        self._tls = threading.local()
        self._slots = {}
        self._closer = {}
        self._supervisor.forked()
        self._records = self._bytes = self._dropped = 0
        if self._core is not None:
            self._core.waits = self._core.abandoned = 0

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _unpickle, (self.name,)

    def __repr__(self) -> str:
        state = "closed" if self._core is None else ("owner" if self._is_owner() else "attached")
        return f"<shmflush.Ring {self.name!r} {state}>"

    def _is_owner(self) -> bool:
        return self._owner_pid == os.getpid()

    @property
    def closed(self) -> bool:
        return self._core is None

    def _live_core(self) -> _Core:
        core = self._core
        if core is None:
            raise RingClosedError(f"ring {self.name!r} is closed")
        return core

    def _slot(self) -> Writer:
        """This thread's writer slot, after settling whatever an exception left
        in flight in it (an interrupted claim is settled by the next call)."""
        reservation: _Reservation | None = getattr(self._tls, "reservation", None)
        if reservation is not None and reservation.is_stale():
            # Its with statement ended without __exit__: settle it as abandoned.
            held = reservation._slot
            if held is not None:
                reservation._abandon(held)
            else:
                self._tls.reservation = None
            reservation = None
        if reservation is not None:
            raise ShmflushError(
                f"ring {self.name!r}: this thread has a reserve() block open on this ring; "
                "finish it before appending again"
            )
        slot: Writer | None = getattr(self._tls, "slot", None)
        if slot is not None:
            if slot.unsettled():
                slot.settle()
            if slot.core is not None:
                return slot
            del self._tls.slot  # orphaned: its claim is recovery's to settle
        core = self._live_core()
        # An exception between the compare-and-swap that takes the slot and the
        # moment this thread holds its Writer would leak the slot to a live
        # thread forever (found by tests/test_interrupts.py): give it back.
        try:
            slot = Writer(core, core.acquire_lease())
            self._tls.slot = slot
        except BaseException:
            held = getattr(self._tls, "slot", None)
            if held is None or held.core is not core or held.slot != core._taking:
                core.release_untaken_lease()
            raise
        core._taking = -1
        self._slots[slot.slot] = weakref.ref(slot)
        return slot

    def _interrupted(self, slot: Writer) -> None:
        """Run by every writer path's exception handler (after it zeroed
        ``slot.limit``): settle the claim the exception interrupted, or hand
        it to recovery."""
        slot.limit = 0
        with suppress(Exception):
            _restore_signal_mask()
            slot.settle()
        if slot.core is None and getattr(self._tls, "slot", None) is slot:
            del self._tls.slot

    def close(self, timeout: float | None = 60.0) -> None:
        """Close this handle.  Idempotent, and safe to call from several threads.

        Other threads of this process that are appending through this handle get
        :class:`RingClosedError` from their next call; a call already inside the
        library is let finish first (at most a few seconds), and a claim that an
        exception left in flight is settled.

        In the owner, this then drains every buffer to the file, stops the flusher
        and unlinks the shared memory and semaphores: when it returns without
        raising, every record appended through the ring, by any process, is on
        disk.  Other processes' later appends raise :class:`RingClosedError`.
        Raises :class:`RingBrokenError` if the flusher could not write everything
        and :class:`RingTimeoutError` if it did not finish within *timeout*
        seconds; the shared memory is unlinked in every case.

        A full disk does not fail the drain by itself: the flusher retries until
        space comes back or *timeout* runs out.  When close() raises, its message
        says why and exactly what was lost: how many fills, records and bytes of
        records were still in shared memory, not durably written, when the flusher
        stopped (they go away with the shared memory; every other record is in
        the file), or that nothing was lost.  ``errno`` and the chained
        :class:`OSError` give the flusher's error, where it had one.

        In any other process, this releases the handle's writer slots and unmaps.
        """
        _deadline(timeout)  # check the argument before touching anything
        me = threading.get_ident()
        if self._closer.setdefault("thread", me) != me:
            self._await_other_closer(timeout)
            return
        try:
            self._close(timeout)
        finally:
            self._closer.pop("thread", None)

    def _await_other_closer(self, timeout: float | None) -> None:
        """Another thread is closing this handle: return once it is done (or
        after *timeout*, or 60 s, if it is stuck)."""
        limit = time.monotonic() + (60.0 if timeout is None else timeout)
        while self._closer and (self._core is not None or self._closing_core is not None):
            if time.monotonic() > limit:
                return
            time.sleep(0.001)

    def _close(self, timeout: float | None) -> None:
        # Every step is idempotent: a close() that an exception interrupted is
        # finished by the next one.
        core = self._core if self._core is not None else self._closing_core
        if core is None:
            return
        self._closing_core = core
        deadline = _deadline(timeout)
        # Divert later calls: the fast path reads a non-zero status from the
        # stand-in words and takes the general path, which finds no core.
        self._words = _CLOSED_WORDS
        self._core = None
        core.handle_closed = True
        error: ShmflushError | None = None
        unmap = self._wait_for_callers(deadline)
        # Only now: a call still inside used the real view to the end.
        self._view = _CLOSED_VIEW
        for ref in list(self._slots.values()):
            slot = ref()
            if slot is not None:
                slot.release()
        self._slots = {}
        if self._is_owner():
            error = self._shutdown(core, timeout)
        # A flusher this handle restarted runs on after we close (the owner's
        # were stopped by _shutdown): the supervisor reaps it later.
        self._supervisor.release()
        self._tls = threading.local()
        _forget_attached(self)
        if unmap:
            # BufferError: a numpy view is still referenced somewhere; the
            # mapping goes away when that last reference does.
            with contextlib.suppress(BufferError):
                core.unmap()
        else:
            core.close_semaphores()
        self._closing_core = None
        if error is not None:
            raise error

    def _wait_for_callers(self, deadline: float | None) -> bool:
        """Wait until no other thread is inside a method of this handle.

        Other threads see the handle closed on their next step; one already in a
        call finishes it (microseconds), one waiting for space wakes within
        100 ms and raises.  Returns False if some thread is still inside after
        a few seconds: the mapping must then outlive it (no unmap).
        """
        me = threading.get_ident()
        limit = time.monotonic() + 5.0
        if deadline is not None:
            limit = min(limit, max(deadline, time.monotonic() + 0.5))
        while True:
            busy = False
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                f: Any = frame
                while f is not None:
                    if f.f_code in _RING_CODES:
                        owner = f.f_locals.get("self")
                        if owner is self or (
                            isinstance(owner, _Reservation) and owner._ring is self
                        ):
                            busy = True
                            break
                    f = f.f_back
                if busy:
                    break
            if not busy:
                return True
            if time.monotonic() > limit:
                return False
            time.sleep(0.001)

    def _shutdown(self, core: _Core, timeout: float | None) -> ShmflushError | None:
        error: ShmflushError | None = None
        deadline = _deadline(timeout)
        supervisor = self._supervisor
        try:
            # From here on this thread restarts the flusher, not the watchdog.
            supervisor.stop_watching(wait=False)
            core.set_status(L.STATUS_CLOSING)
            core.wake_flusher()
            # Wait for the flusher (whichever process runs it now: it may have been
            # restarted) to report that it drained everything.
            while not core.status() & L.STATUS_FLUSHER_DONE:
                if not _supervisor.flusher_alive(core):
                    supervisor.restart(core)
                if deadline is not None and time.monotonic() > deadline:
                    error = RingTimeoutError(
                        f"ring {self.name!r}: the flusher did not drain within {timeout} s"
                    )
                    break
                time.sleep(0.005)
            supervisor.stop(drained=error is None)
            error = _drain_error(core, error)
        finally:
            # Only if the name is still ours: the segment may have been removed
            # behind our back and the name given to a new ring.
            L.unlink_segment_if_same(self.name, core.header(L.H_RING_ID))
        return error

    def __del__(self) -> None:
        # Safety net only: never raises, never blocks, does nothing in a forked
        # child.  An owner dropped without close() asks the flusher to drain.
        try:
            core = self._core
            if core is None or self._pid != os.getpid():
                return
            if self._is_owner() and core.mm is not None:
                core.set_status(L.STATUS_CLOSING)
                core.wake_flusher()
        except Exception:
            pass

    # -- appending -----------------------------------------------------------------

    def append(self, data: Any, *, timeout: float | None = None) -> None:
        """Append one record: *data* is any C-contiguous bytes-like object.

        Copies *data* into shared memory and returns; the flusher writes it to the
        file later (``sync()`` waits for that).  Zero-length records are allowed.
        Blocks while every buffer is full, at most *timeout* seconds (``None``:
        no limit) and raises :class:`RingTimeoutError` after that.

        When the call returns, the record is in shared memory: it reaches the
        file even if this process is killed right after.  An exception that
        interrupts the call (``KeyboardInterrupt``, or one raised by a signal
        handler) leaves the record either whole in the file or not there at
        all, never torn or twice; the ring and this thread go on working.

        Raises :class:`TypeError` for non-bytes-like input,
        :class:`RecordTooLargeError` for a record larger than ``max_record``,
        :class:`RingClosedError` and :class:`RingBrokenError` as their names say.
        """
        if type(data) is bytes:
            n = len(data)
        else:
            data = _as_bytes(data)
            n = data.nbytes
        # Checked even where this call will not block; a plain number passes
        # without a call (LogHandler passes one on every record).
        if timeout is not None and not (type(timeout) in _NUMBERS and timeout >= 0):
            _check_timeout(timeout)
        size = _HDR + ((n + 7) & -8)
        try:
            slot: Writer = self._tls.slot
        except AttributeError:
            slot = self._slot()
        # The hot path: plain stores into this thread's chunk (_ring.Writer.put).
        try:
            if not self._words[self._status_w] and slot.put(data, n, size):
                self._records += 1
                self._bytes += n
                return
        except BaseException:
            slot.limit = 0  # first: the next call must not run over this one
            self._interrupted(slot)
            raise
        if n > self._max_record:
            raise self._too_large(n)
        deadline = _deadline(timeout)
        slot = self._slot()
        try:
            while True:
                slot.claim(size, size, deadline)
                if slot.put(data, n, size):
                    break
            slot.fresh()
        except BaseException:
            slot.limit = 0
            self._interrupted(slot)
            raise
        self._records += 1
        self._bytes += n

    def _too_large(self, n: int) -> RecordTooLargeError:
        core = self._live_core()
        return RecordTooLargeError(
            f"record of {n} bytes does not fit in a buffer of ring {self.name!r} "
            f"(max_record is {core.max_record} bytes for buffer_size "
            f"{core.geometry.buffer_size})"
        )

    def _open_range(
        self, slot: Writer, need: int, want: int, fits: Any, deadline: float | None
    ) -> tuple[int, int, bool]:
        """Enter an append of consecutive records in this thread's chunk.

        ``fits(room)`` says how many bytes of the pending records fit in *room*
        bytes (at least *need*, the first record, where that fits).  Returns
        (mapping offset, bytes, claimed): the range is AT_BUSY until
        ``slot.commit_to``; *claimed*: a new chunk was claimed for it (of up to
        *want* bytes and what is left of the fill), so call ``slot.fresh()``
        after the commit.
        """
        total = fits(slot.room())
        if total:
            at = slot.open_range(total)
            if at >= 0:
                return at, total, False
        if not slot.fenced:
            # Fallback mode: a chunk is exactly one claim, all of it written
            # in this append (see _ring.Writer): claim what the records take.
            need = want = fits(max(need, min(want, _BATCH_BYTES, self._capacity // 8)))
        slot.claim(need, want, deadline)
        total = fits(slot.room())
        at = slot.open_range(total)
        assert at >= 0, "a fresh chunk always takes its first record"
        return at, total, True

    def append_many(self, records: Iterable[Any], *, timeout: float | None = None) -> int:
        """Append each of *records* in order; returns how many were appended.

        Same guarantees and errors as :meth:`append`, per record.  Every record is
        checked (type, size) before any is appended.  Consecutive records are
        claimed together, up to what is left of the buffer, and committed with
        one store, so this is much faster than calling :meth:`append` in a loop.
        If the ring fails part-way (closed, broken, timed out, or an exception such
        as ``KeyboardInterrupt``), the records of earlier batches are appended and
        the rest are not; the count (when the call returns) tells how many.
        """
        items: list[Any] = []
        sizes: list[int] = []
        max_record = self._max_record
        if isinstance(records, (bytes, bytearray, memoryview, str)) or not isinstance(
            records, Iterable
        ):
            raise TypeError(
                f"records must be an iterable of bytes-like records, not {type(records).__name__}"
            )
        for record in records:
            item: bytes | memoryview = record if type(record) is bytes else _as_bytes(record)
            n = item.nbytes if isinstance(item, memoryview) else len(item)
            if n > max_record:
                raise self._too_large(n)
            items.append(item)
            sizes.append(n)
        count = len(items)
        if not count:
            return 0
        deadline = _deadline(timeout)
        spans = [_HDR + ((n + 7) & -8) for n in sizes]
        left = sum(spans)
        pack = self._pack
        done = 0
        slot = self._slot()

        def fits(room: int) -> int:
            total = 0
            for span in itertools.islice(spans, done, None):
                if total + span > room:
                    break
                total += span
            return total

        try:
            while done < count:
                at, total, claimed = self._open_range(slot, spans[done], left, fits, deadline)
                view = self._view
                end = at + total
                k = done
                while at < end:
                    n = sizes[k]
                    view[at + _HDR : at + _HDR + n] = items[k]
                    pack(view, at, n, _KIND_DATA, _MARK)  # each header after its payload
                    at += spans[k]
                    k += 1
                slot.commit_to(end)
                if claimed:
                    slot.fresh()
                self._records += k - done
                self._bytes += sum(sizes[done:k])
                left -= total
                done = k
        except BaseException:
            slot.limit = 0
            self._interrupted(slot)
            raise
        return count

    def append_array(self, array: Any, *, timeout: float | None = None) -> int:
        """Append each row of a C-contiguous numpy array as one record.

        *array* is typically a 1-D structured array (one record per element) or a
        2-D ``uint8`` array (one record per row).  Every record has the row's size,
        ``array.itemsize * prod(array.shape[1:])`` bytes.  Rows are claimed
        together, up to what is left of the buffer, and their payloads and
        headers are written with one vectorised assignment each through a
        structured view of shared memory.  Returns the number of rows appended;
        on a failure part-way (an exception such as ``KeyboardInterrupt``
        included), the rows of earlier batches are appended, each whole.

        Each batch starts with an array descriptor record (row size, row count,
        dtype and row shape), which :func:`shmflush.read` skips and
        :func:`shmflush.read_array` uses, so the rows read back without a dtype
        argument.  Row and descriptor share one buffer: a row of nearly
        :attr:`max_record` bytes may not fit with it (:class:`RecordTooLargeError`).
        """
        import numpy as np  # noqa: PLC0415  (numpy is only paid for by its users)

        if not isinstance(array, np.ndarray):
            raise TypeError(f"append_array() needs a numpy array, not {type(array).__name__}")
        if array.dtype.hasobject:
            raise TypeError(
                f"append_array() array must not hold Python objects (dtype {array.dtype}): "
                "object pointers mean nothing in a file; use a numeric or structured dtype"
            )
        if array.ndim < 1:
            raise ValueError("append_array() needs an array with at least one dimension")
        if not array.flags.c_contiguous:
            raise ValueError("append_array() needs a C-contiguous array (np.ascontiguousarray)")
        rows = int(array.shape[0])
        n = array.nbytes // rows if rows else 0
        if n > self._max_record:
            raise self._too_large(n)
        if not rows:
            return 0
        core = self._live_core()
        deadline = _deadline(timeout)
        span = _HDR + ((n + 7) & -8)
        record, payload, header = _array_layout(n)
        # The rows as one void item each: one assignment copies them all.
        payloads = array.reshape(rows, -1).view(np.uint8).view(payload).reshape(rows) if n else None
        # Each batch starts with a KIND_ARRAY record (row size, row count, dtype),
        # in the same claimed range, so a reader needs no guess (docs/format.md 3).
        descriptor = _format.pack_array_descriptor(n, 0, _dtype_text(np, array))
        dlen = len(descriptor)
        dspan = _HDR + ((dlen + 7) & -8)
        if dspan + span > self._capacity:
            raise RecordTooLargeError(
                f"append_array() row of {n} bytes and its {dspan}-byte array descriptor do "
                f"not fit in one buffer of ring {self.name!r} (capacity {self._capacity} bytes)"
            )
        mapped = core.bytes_view()
        done = 0
        slot = self._slot()

        def fits(room: int) -> int:
            k = min(rows - done, (room - dspan) // span) if room > dspan else 0
            return dspan + k * span if k > 0 else 0

        try:
            while done < rows:
                at, total, claimed = self._open_range(
                    slot, dspan + span, dspan + (rows - done) * span, fits, deadline
                )
                k = (total - dspan) // span
                _format.ARRAY_DESCRIPTOR.pack_into(descriptor, 0, n, k)
                mapped[at + _HDR : at + _HDR + dlen] = descriptor
                rows_at = at + dspan
                target = mapped[rows_at : at + total].view(record)
                if payloads is not None:
                    target["p"] = payloads[done : done + k]
                target["h"] = header  # every header after every payload
                self._pack(self._view, at, dlen, _format.KIND_ARRAY, _MARK)
                slot.commit_to(at + total)
                if claimed:
                    slot.fresh()
                self._records += k
                self._bytes += k * n
                done += k
        except BaseException:
            slot.limit = 0
            self._interrupted(slot)
            raise
        finally:
            del mapped
        return rows

    def reserve(self, n: int, *, timeout: float | None = None) -> _Reservation:
        """Claim *n* bytes; ``with ring.reserve(n) as view:`` gives a writable
        memoryview of exactly them.

        Zero-copy: the view is the record's place in shared memory.  On normal exit
        the record is committed as it stands; if the block raises, the range
        becomes an abandoned record that readers skip, and the exception
        propagates.  The view is released on exit (and when the handle is
        closed: a later write to it raises ``ValueError``).  Keep the block
        short: the buffer cannot be flushed while a reservation in it is open.
        Appending to the same ring from inside the block raises
        :class:`ShmflushError`.
        """
        if type(n) is not int or not 0 <= n <= self._max_record:
            if not isinstance(n, int) or isinstance(n, bool):
                raise TypeError(f"reserve() size must be an int, not {type(n).__name__}")
            if n < 0:
                raise ValueError(f"reserve() size must be >= 0, got {n}")
            if n > self._max_record:
                raise self._too_large(n)
        if timeout is not None and not (type(timeout) in _NUMBERS and timeout >= 0):
            _check_timeout(timeout)
        return _Reservation(self, n, timeout)

    # -- durability ----------------------------------------------------------------

    def sync(self, timeout: float | None = None) -> None:
        """Return once every record this process appended before the call is in the
        file, to the ring's sync level ("data": fdatasync'd; "none": written).

        Seals partly filled buffers to get there, so it also pushes out other
        processes' records.  Raises :class:`RingTimeoutError` after *timeout*
        seconds and :class:`RingBrokenError` if the flusher cannot write.
        """
        core = self._live_core()
        deadline = _deadline(timeout)
        if core.status() & L.STATUS_BROKEN:
            # Even with nothing left to wait for: the file may be gone or cut.
            raise core.broken_error()
        waiting: list[tuple[int, int]] = []
        for i in range(core.geometry.buffers):
            st = core.state(i)
            fill = core.words[core.fill_w[i]]
            if st & (L.IDLE | L.RESERVED):
                continue
            if not st & L.SEALED:
                if not st >> 32:
                    continue  # open and empty: none of our records is in it
                # Say so in our lease while we seal: if we die half-way, recovery
                # knows nobody else will finish closing this fill.
                slot = self._slot()
                core.words[slot.intent_w] = L.INTENT_SEALING | (i << 32)
                try:
                    core.seal(i)
                except BaseException:
                    # Interrupted half-way: the slot goes to recovery, which
                    # finishes a sealer's close as it does a dead one's.
                    self._interrupted(slot)
                    raise
                core.words[slot.intent_w] = 0
            waiting.append((i, fill))
        # This thread's own chunk, in a fill just sealed: give its tail back
        # now rather than wait for the flusher to take it.
        mine: Writer | None = getattr(self._tls, "slot", None)
        if (
            mine is not None
            and mine.end
            and not mine.unsettled()
            and core.state(mine.buf) & L.SEALED
        ):
            try:
                mine.return_chunk()
            except BaseException:
                mine.limit = 0
                self._interrupted(mine)
                raise
        core.wake_flusher()
        nap = 50e-6
        while waiting:
            status = core.status()
            if core.handle_closed:
                raise RingClosedError(f"ring {self.name!r} was closed during sync()")
            if status & L.STATUS_BROKEN:
                raise core.broken_error()
            waiting = [
                (i, fill)
                for i, fill in waiting
                if core.words[core.fill_w[i]] == fill and not core.state(i) & L.IDLE
            ]
            if not waiting:
                return
            if status & L.STATUS_FLUSHER_DONE:
                raise RingBrokenError(f"ring {self.name!r}: the flusher stopped before sync")
            if not core.flusher_alive():
                self._supervisor.restart(core)
            if deadline is not None and time.monotonic() >= deadline:
                raise core.timeout_error(
                    f"ring {self.name!r}: {len(waiting)} buffers not durable within {timeout} s"
                )
            # Gently growing naps, capped at 1 ms: a batch's write and fdatasync
            # take about a millisecond here, and doubling naps up to 5 ms made
            # sync() return up to twice as late as the write became durable.
            time.sleep(nap)
            nap = min(nap * 1.5, 1e-3)

    def stats(self) -> Stats:
        """A snapshot of this ring's counters (see :class:`Stats`)."""
        core = self._live_core()
        g = core.geometry
        return Stats(
            name=self.name,
            records=self._records,
            bytes=self._bytes,
            waits=core.waits,
            abandoned=core.abandoned,
            buffers_flushed=core.header(L.H_BUFFERS_FLUSHED),
            bytes_written=core.header(L.H_BYTES_WRITTEN),
            syncs=core.header(L.H_SYNCS),
            direct_io=core.header(L.H_DIRECT_IO) == L.DIRECT_ON,
            flusher_pid=core.header(L.H_FLUSHER_PID),
            buffer_size=g.buffer_size,
            buffers=g.buffers,
            lanes=g.lanes,
            broken=bool(core.status() & L.STATUS_BROKEN),
            stalled=core.header(L.H_STALL_ERRNO),
            recovered=core.header(L.H_RECOVERED),
            flusher_restarts=core.header(L.H_RESTARTS),
            dropped=self._dropped,
        )

    @property
    def max_record(self) -> int:
        """The largest payload, in bytes, that one record may carry."""
        return self._max_record


class _Reservation:
    """The context manager :meth:`Ring.reserve` returns (a class, not a
    generator: it costs less than an append's own overhead)."""

    __slots__ = ("_at", "_claimed", "_frame", "_n", "_ring", "_size", "_slot", "_timeout")

    def __init__(self, ring: Ring, n: int, timeout: float | None) -> None:
        # The rest (_at, _claimed, _frame, _size) is set by __enter__.
        self._ring = ring
        self._n = n
        self._timeout = timeout
        self._slot: Writer | None = None

    def __enter__(self) -> memoryview:
        ring = self._ring
        tls = ring._tls
        slot: Writer | None = getattr(tls, "slot", None)
        # A chunk with room: straight in.  Else the general checks (an open
        # block, leftovers to settle, a new slot): limit is 0 without a chunk,
        # while anything is unsettled, and while a block is open (open_range).
        if slot is None or not slot.limit:
            slot = ring._slot()
        self._size = size = _HDR + ((self._n + 7) & -8)
        self._claimed = False
        try:
            # Inside an append at the chunk's position until __exit__ (AT_BUSY).
            at = slot.open_range(size)
            if at < 0:
                slot.claim(size, size, _deadline(self._timeout))
                at = slot.open_range(size)
                self._claimed = True
            view = ring._view[at + _HDR : at + _HDR + self._n]
            slot.reservation = view
            self._slot, self._at = slot, at
            # The frame of the with statement: while it runs, the block is open.
            self._frame = sys._getframe(1)
            ring._tls.reservation = self
            if _faults.ENABLED:
                _faults.reached("reserve.open")
            return view  # noqa: TRY300  (inside the try: an exception here is settled too)
        except BaseException:
            # No __exit__ will come: settle the claim (abandoned) here.
            slot.limit = 0
            self._abandon(slot)
            raise

    def _abandon(self, slot: Writer) -> None:
        ring = self._ring
        if getattr(ring._tls, "reservation", None) is self:
            ring._tls.reservation = None
        self._slot = None
        view, slot.reservation = slot.reservation, None
        if view is not None:
            view.release()
        ring._interrupted(slot)

    def is_stale(self) -> bool:
        """Has the with statement that opened this block ended without calling
        __exit__ (an exception between its last bytecodes)?"""
        frame = self._frame
        f: Any = sys._getframe(1)
        while f is not None:
            if f is frame:
                return False
            f = f.f_back
        return True

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        ring = self._ring
        slot = self._slot
        if slot is None:
            return
        self._slot = None
        view, slot.reservation = slot.reservation, None
        if view is None:
            # close() settled this claim (abandoned) from another thread.
            ring._tls.reservation = None
            if exc_type is None:
                raise _closed_during_reserve(ring.name)
            return
        try:
            view.release()
            at = self._at
            if exc_type is None:
                # The header goes last, as in append: until it is there, an
                # interrupt or a crash leaves a zero header, and the range is
                # abandoned.
                ring._pack(ring._view, at, self._n, _KIND_DATA, _MARK)
                slot.commit_to(at + self._size)
                ring._records += 1
                ring._bytes += self._n
            else:
                slot.abandon_to(at + self._size)
            if self._claimed:
                slot.fresh()
        except BaseException:
            slot.limit = 0
            ring._interrupted(slot)
            raise
        finally:
            ring._tls.reservation = None


def _closed_during_reserve(name: str) -> RingClosedError:
    return RingClosedError(f"ring {name!r} was closed while a reserve() block was open")


# What a closed handle's hot path reads instead of the ring: a non-zero status
# word sends every call to the general path, which raises RingClosedError.
_CLOSED_WORDS = memoryview(bytearray(L.HEADER_SIZE)).cast("Q")
_CLOSED_WORDS[L.H_STATUS // 8] = L.STATUS_CLOSING
_CLOSED_VIEW = memoryview(bytearray(0))
# Code objects of the handle's methods: close() waits until no other thread runs
# one of them on this handle (see Ring._wait_for_callers).
# (Not close() and its wait: a second closer waits for the first, touching nothing.)
_RING_CODES = frozenset(
    getattr(f, "__wrapped__", f).__code__
    for cls in (Ring, _Reservation)
    for f in vars(cls).values()
    if callable(f)
    and hasattr(getattr(f, "__wrapped__", f), "__code__")
    and f not in (Ring.close, Ring._await_other_closer)
)
# Handles unpickled in this process, by ring name: a ring passed to many pool
# tasks attaches once per worker process, not once per task.
_unpickled: dict[str, Ring] = {}


def _unpickle(name: str) -> Ring:
    """Rebuild a pickled ring: reuse this process's open handle on it, if any.

    No lock: single dict operations are atomic, and two threads unpickling at
    once at worst both attach (the spare is collected like any handle)."""
    ring = _unpickled.get(name)
    core = ring._core if ring is not None else None
    if (
        ring is not None
        and core is not None
        and ring._pid == os.getpid()
        and not core.status() & (L.STATUS_CLOSING | L.STATUS_FLUSHER_DONE)
    ):
        return ring
    fresh = attach(name)
    _unpickled[name] = fresh
    return fresh


def _forget_attached(ring: Ring) -> None:
    if _unpickled.get(ring.name) is ring:
        _unpickled.pop(ring.name, None)


@dataclass(frozen=True, slots=True)
class _Unwritten:
    """What is still in shared memory after the flusher stopped (see _drain_error)."""

    fills: int
    records: int
    bytes: int
    exact: bool  # every record header of those fills was walked

    def __str__(self) -> str:
        fills = f"{self.fills} fill{'s' * (self.fills != 1)}"
        records = f"{'' if self.exact else 'at least '}{self.records} record"
        records += "s" * (self.records != 1)
        return f"{fills} holding {records} ({self.bytes} bytes of records)"


# Record headers the loss report walks at most (about a tenth of a second).
_REPORT_RECORDS: Final = 1 << 18


def _unwritten(core: _Core) -> _Unwritten:
    """Count the fills the flusher left unwritten, their bytes and their records.

    A fill that is not IDLE after the flusher stopped was not made durable, except
    one taken whose durable marker is set (written and synced, reset cut short).
    Records are counted by walking the record headers in shared memory, bounded;
    the walk stops at a header that is not one (a claim whose writer never
    finished), and the count is then a lower bound.
    """
    fills = records = nbytes = 0
    exact = True
    budget = _REPORT_RECORDS
    words = core.words
    unpack = _format.RECORD_HEADER.unpack_from
    for i in range(core.geometry.buffers):
        st = core.state(i)
        if st & (L.IDLE | L.RESERVED):
            continue
        if st & L.FLUSHING and words[core.durable_w[i]] == words[core.fill_w[i]]:
            continue
        used = words[core.used_w[i]] if st & L.CLOSED else st >> L.OFFSET_SHIFT
        used = min(used, core.capacity) // _format.RECORD_ALIGN * _format.RECORD_ALIGN
        if not used:
            continue
        fills += 1
        nbytes += used
        at = core.records_at[i]
        end = at + used
        while at < end and budget:
            budget -= 1
            length, kind, mark = unpack(core.view, at)
            if _format.is_padding(length, kind, mark):
                at += _format.RECORD_ALIGN
                continue
            size = _format.record_size(length)
            if mark != _MARK or kind not in _format.RECORD_KINDS or size > end - at:
                break
            if kind == _KIND_DATA:
                records += 1
            at += size
        exact = exact and at >= end
    return _Unwritten(fills, records, nbytes, exact)


def _drain_error(core: _Core, timed_out: ShmflushError | None) -> ShmflushError | None:
    """The error the owner's close() raises once the flusher stopped, or None.

    It says why the drain failed (the flusher's error, a full disk it gave up
    on, a writer that never finished) and exactly what that cost: the fills,
    records and bytes still in shared memory, which go away with it.
    """
    lost = _unwritten(core)
    broken = core.status() & L.STATUS_BROKEN
    if not broken and not lost.fills:
        return timed_out  # None: a clean drain; else the flusher finished after all
    kind = core.header(L.H_ERROR_KIND) if broken else L.ERROR_IO
    errno = core.header(L.H_ERROR_ERRNO if broken else L.H_STALL_ERRNO)
    cause = OSError(errno, os.strerror(errno)) if errno else None
    if broken:
        why = core.broken_reason()
    elif cause is not None:
        why = f"it cannot write: [Errno {errno}] {cause.strerror}"
    else:
        why = "" if timed_out is not None else "a writer never finished its claim"
    if timed_out is not None:
        reason = f"{timed_out}; {why}" if why else str(timed_out)
    elif broken:
        reason = f"ring {core.name!r}: {why}"
    else:
        reason = f"ring {core.name!r}: the flusher gave up draining: {why}"
    unwritten = (
        f"{lost} were not written to the file durably and are lost with the shared memory"
        if lost.fills
        else ""
    )
    if kind == L.ERROR_FILE_DELETED:
        outcome = "every record written to it is gone with it"
    elif kind == L.ERROR_FILE_TRUNCATED:
        outcome = (
            f"the records in bytes {core.header(L.H_ERROR_SIZE)} to "
            f"{core.header(L.H_ERROR_WRITTEN)} of it are lost"
        )
    else:
        outcome = unwritten or "nothing was lost: every record whose append returned is in the file"
    if unwritten and kind != L.ERROR_IO:
        outcome += f"; and {unwritten}"
    message = f"{reason}; {outcome}"
    error: ShmflushError = (
        RingTimeoutError(message) if timed_out is not None else RingBrokenError(message, errno)
    )
    if cause is not None:
        error.__cause__ = cause
    return error


@functools.lru_cache(maxsize=64)
def _array_layout(n: int) -> tuple[Any, Any, int]:
    """For append_array rows of *n* bytes: the record as numpy sees it (the
    header as one little-endian word, then the payload, padded: assigning a
    field writes every row's at once), the payload as one void item, and the
    header word.  Cached: building a structured dtype costs more than
    copying a small batch."""
    import numpy as np  # noqa: PLC0415  (numpy is only paid for by its users)

    span = _HDR + ((n + 7) & -8)
    names, formats, offsets = ["h"], ["<u8"], [0]
    if n:
        names.append("p")
        formats.append(f"V{n}")
        offsets.append(_HDR)
    record = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": span})
    header = int.from_bytes(_format.RECORD_HEADER.pack(n, _KIND_DATA, _MARK), "little")
    return record, np.dtype(f"V{max(n, 1)}"), header


def _deadline(timeout: Any) -> float | None:
    """Check a ``timeout`` argument and turn it into a monotonic deadline."""
    if timeout is None:
        return None
    _check_timeout(timeout)
    return time.monotonic() + float(timeout)


def _check_timeout(timeout: Any) -> None:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
        )
    if not timeout >= 0:  # also catches NaN
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")


def _as_bytes(data: Any) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"a record must be a bytes-like object (bytes, bytearray, memoryview, numpy "
            f"array), not {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError(
            "a record must be C-contiguous; copy it first (bytes(x) or np.ascontiguousarray)"
        )
    if "O" in view.format and _holds_objects(view.format):
        # Object pointers (numpy dtype=object) mean nothing in a file, and the
        # objects they point to are not kept alive by it.
        raise TypeError(
            f"a record (data, or an item of records) must not hold Python objects: "
            f"{type(data).__name__} with buffer format {view.format!r} holds object "
            "pointers; serialise the objects first (pickle, json) or use a numeric dtype"
        )
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _dtype_text(np: Any, array: Any) -> str:
    """The dtype text of an array descriptor: ``repr((descr, row_shape))``."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    return repr((descr, tuple(int(d) for d in array.shape[1:])))


def _holds_objects(fmt: str) -> bool:
    """Does struct/PEP 3118 format *fmt* hold an ``O`` (Python object) code?

    Field names of structured formats (``T{<d:Oxygen:}``) sit between colons and
    are not codes.
    """
    return "O" in re.sub(r":[^:]*:", "", fmt)


def _default_lanes(buffers: int) -> int:
    return max(1, min(buffers // 2, (os.cpu_count() or 1) // 2, 16))


def create(
    name: str,
    path: str | os.PathLike[str],
    buffer_size: int = 1 << 20,
    buffers: int = 8,
    *,
    lanes: int | None = None,
    flush_interval: float = 0.01,
    sync: str = "data",
    mode: int = 0o600,
    exist_ok: bool = False,
    max_writers: int = 1024,
    recovery_timeout: float = 0.5,
    segment_bytes: int | None = None,
    segment_age: float | None = None,
    retain_age: float | None = None,
    retain_bytes: int | None = None,
    retain_files: int | None = None,
    retention_wins: bool = False,
    on_segment_closed: list[str] | None = None,
) -> Ring:
    """Create ring *name* appending to the file at *path*, and start its flusher.

    The calling process becomes the owner: its :meth:`Ring.close` drains and
    removes the ring.  A new or empty file gets a file header with a fresh random
    stream id, durable before any record.  An existing file is appended to, after
    its last complete segment: zeros and a write torn by a crash after it are cut
    off; other bytes there (bit rot, damage) are first copied to a sibling file
    ``<path>.cut-<offset>``, made durable, with a :class:`DamagedTailWarning`
    naming it (``docs/format.md`` section 10.2).

    * *buffer_size*: bytes per buffer, a multiple of 4096; a record may be up to
      ``buffer_size - 72`` bytes.
    * *buffers*: how many buffers; writers block when all are full.
    * *lanes*: how many buffers are open at once; each writer thread sticks to one
      lane (default: half the CPUs, at most ``buffers // 2``).
    * *flush_interval*: seconds after which a partly filled buffer is flushed.
    * *sync*: ``"data"`` (fdatasync after each batch of writes: a record is durable
      once ``sync()`` or the owner's ``close()`` returns) or ``"none"`` (written,
      but left to the OS to make durable).
    * *mode*: permission bits of the shared memory and semaphores.
    * *exist_ok*: replace a ring of that name left behind by a dead owner.
    * *max_writers*: how many threads, across all processes, may append at once.
    * *recovery_timeout*: seconds a fill may stay stuck on a writer that died
      between claiming and committing before the flusher turns the dead claim
      into an abandoned record.  A live writer's claim is never taken, however
      slow (or stopped) it is.
    * Rotation and retention (docs/rotation.md): the flusher rolls to a new
      file ``<path>.000001``, ``<path>.000002``, ... when the active one reaches
      *segment_bytes* (a multiple of 4096) or, with *segment_age* seconds, at
      each multiple of it on the wall clock (3600: on the hour).  After a roll
      it deletes the oldest closed files while there are more than
      *retain_files*, more than *retain_bytes* in all, or they were closed more
      than *retain_age* seconds ago, but never one a named cursor still needs,
      unless *retention_wins* (then with a warning on its stderr).
      *on_segment_closed* is an argv run (in the background, by the flusher)
      with each closed file's path appended; its failure never stops the ring.
      The settings are kept beside the file, in ``<path>.rotation``.

    Raises :class:`RingExistsError`, :class:`ValueError`/:class:`TypeError` for bad
    arguments, :class:`OSError` if the file cannot be opened,
    :class:`ForeignFileError` if *path* is not a regular file (a directory, a
    device, a FIFO), is on a file system that cannot make it durable (``/proc``),
    or is not empty yet does not start with a shmflush file header (a file of
    zero bytes included), :class:`UnsupportedFormatError` for a file of another
    format version, :class:`CorruptFileError` for a file whose file header is
    damaged (in these cases the file is left byte for byte as it was), and
    :class:`ShmflushError` if the file is in use by another ring.
    """
    L.check_name(name)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    path = os.fspath(path)
    if lanes is None:
        lanes = _default_lanes(buffers) if isinstance(buffers, int) else 1
    geometry = L.Geometry(buffer_size, buffers, lanes, max_writers)
    if not isinstance(flush_interval, (int, float)) or not (
        math.isfinite(flush_interval) and 0.0005 <= flush_interval <= 3600
    ):
        raise ValueError(
            f"flush_interval must be between 0.0005 and 3600 s, got {flush_interval!r}"
        )
    if not isinstance(recovery_timeout, (int, float)) or not (
        math.isfinite(recovery_timeout) and 0.01 <= recovery_timeout <= 3600
    ):
        raise ValueError(
            f"recovery_timeout must be between 0.01 and 3600 s, got {recovery_timeout!r}"
        )
    if not isinstance(sync, str) or sync not in L.SYNC_LEVELS:
        raise ValueError(f"sync must be one of {sorted(L.SYNC_LEVELS)}, got {sync!r}")
    rotation = _files.check_settings(
        segment_bytes=segment_bytes,
        segment_age=segment_age,
        retain_age=retain_age,
        retain_bytes=retain_bytes,
        retain_files=retain_files,
        retention_wins=retention_wins,
        on_segment_closed=on_segment_closed,
    )
    if not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits between 0 and 0o777, got {mode!r}")
    encoded = os.fsencode(os.path.abspath(path))
    if len(encoded) > L.MAX_PATH_BYTES:
        raise ValueError(f"path must be at most {L.MAX_PATH_BYTES} bytes, got {len(encoded)}")
    # Before opening: opening a FIFO or some devices blocks, or has side effects.
    with suppress(FileNotFoundError):
        _check_regular(os.stat(path).st_mode, path)
    if exist_ok:
        _remove_dead_ring(name)

    # O_NONBLOCK: a path swapped for a FIFO or a device after the stat must not
    # block the open either; it is cleared once fstat says the file is regular.
    # The stream's active file: the highest-numbered one once it has rotated.
    active_no, active = _files.active_file(path)
    fd = os.open(active, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, 0o666)
    core: _Core | None = None
    ring: Ring | None = None
    created = False
    try:
        _check_regular(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)
        _check_syncable(fd, path)
        try:
            # The flusher inherits this open file description, and with it the lock:
            # a second ring on the same file would interleave segments at the same
            # addresses.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShmflushError(f"{path} is in use by another shmflush ring") from None
        # A running ring may have rolled (and let go of the file we locked) meanwhile.
        _check_still_active(path, active_no)
        address, next_seq, stream_id = _open_stream(fd, active)
        # Addresses run on across the files of a stream (see _files).
        file_header = _files.read_header(fd)
        address += file_header.base if file_header is not None else 0
        _files.store_settings(path, rotation)
        mm = L.create_segment(name, geometry.total_size, mode, exist_ok=False)
        created = True
        view = memoryview(mm)
        try:
            L.init_header(
                view,
                geometry,
                sync=L.SYNC_LEVELS[sync],
                flush_interval_ns=int(flush_interval * 1e9),
                owner=os.getpid(),
                owner_start=_proc.start_time(os.getpid()),
                next_address=address,
                next_seq=next_seq,
                stream_id=stream_id,
                recovery_ns=int(recovery_timeout * 1e9),
                path=encoded,
                # Chunks only where this process can take part in the fence;
                # every other writer process checks for itself (see _ring.Writer).
                fence=L.FENCE_ON if _fence.register() else L.FENCE_OFF,
            )
        finally:
            view.release()
        try:
            core = _Core(name, mm, geometry)
        except BaseException:
            mm.close()
            raise
        core.create_semaphores(mode)
        ring = owner = Ring(core, owner=True)
        if not owner._supervisor.start(core, fd, path):
            warnings.warn(
                f"O_DIRECT is not supported by the file system of {path}; falling back to "
                "buffered writes plus fdatasync",
                DirectIOWarning,
                stacklevel=2,
            )
        owner._supervisor.watch(lambda: owner._core)
    except BaseException:
        if ring is not None:
            ring._supervisor.kill()
        if core is not None:
            core.unmap()
        if created:
            # Ours, made a moment ago: no other ring can have taken the name yet.
            L.unlink_segment(name)
        raise
    finally:
        os.close(fd)
    _owned.add(ring)
    return ring


_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_still_active(path: str, number: int) -> None:
    if _files.active_file(path)[0] != number:
        raise ShmflushError(f"{path} is in use by another shmflush ring")


def _check_regular(mode: int, path: str) -> None:
    """Raise :class:`ForeignFileError` unless *mode* (from stat(2)) is a regular file's."""
    if stat.S_ISREG(mode):
        return
    kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")
    raise ForeignFileError(
        path, f"not a regular file ({kind}); shmflush appends only to regular files"
    )


def _check_syncable(fd: int, path: str) -> None:
    """Refuse a regular file that cannot be made durable (``/proc``, ``/sys``).

    Such files pass every other check (``/proc/version`` is a regular, empty
    file), but fdatasync(2) fails on them with EINVAL and the flusher could never
    finish a batch.  One fdatasync of a file that has nothing to write is cheap.
    """
    try:
        os.fdatasync(fd)
    except OSError as exc:
        if exc.errno != _errno.EINVAL:
            raise
        raise ForeignFileError(
            path,
            f"its file system cannot make it durable (fdatasync(2): [Errno {exc.errno}] "
            f"{exc.strerror}); pick a path on a disk-backed file system, not under /proc "
            "or /sys",
        ) from exc


def _open_stream(fd: int, path: str) -> tuple[int, int, bytes]:
    """Make the locked file *fd* ready to append: ``(address, next_seq, stream_id)``.

    An empty file gets a file header (a fresh random stream id), written and
    made durable before any segment.  An existing one must start with a valid
    file header of this format version, else :class:`ForeignFileError`,
    :class:`UnsupportedFormatError` or :class:`CorruptFileError`, touching
    nothing.  What follows its last valid segment is cut (docs/format.md 7.1):
    zeros and a torn write silently; other bytes only after a copy of them is
    durable in a sibling file, with a :class:`DamagedTailWarning`.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, _format.FILE_HEADER_SIZE, 0)
    if size == 0 or _interrupted_creation(head, size):
        return _start_stream(fd, path)
    header = _format.parse_file_header(head)
    if isinstance(header, str):
        version = _format.headerless_version(head)
        if version is not None:
            raise UnsupportedFormatError(path, 0, version, headerless=True)
        if not head.startswith(_format.FILE_MAGIC):
            # Somebody else's file (a log, a database) given by mistake:
            # truncating or appending would destroy it.
            raise ForeignFileError(path, f"not a shmflush file: {_what_it_holds(head, size)}")
        raise CorruptFileError(
            path,
            0,
            f"{header}: the file header is damaged, so its segments cannot be told from "
            "look-alikes; create() does not append to it.  Read what is left with "
            "shmflush.read(path, strict=False), then move the file away",
        )
    if header.version != _format.FORMAT_VERSION:
        raise UnsupportedFormatError(path, 0, header.version)
    point = find_append_point(fd, header.stream_id)
    if point.tail == "damage":
        # Whole blocks, so that offsets in the copy keep the file's alignment.
        keep_end = min(size, _format.pad_block(point.nonzero_end))
        kept = _keep_cut_bytes(fd, path, point.address, keep_end)
        warnings.warn(
            f"{path}: the {keep_end - point.address} bytes after the last valid "
            f"segment (from byte offset {point.address}) hold no valid segment and are not "
            "a write torn by a crash (bit rot, or damage that cannot be told from it); "
            f"they were copied to {kept} before the file was cut there",
            DamagedTailWarning,
            stacklevel=3,
        )
    if size > point.address:
        os.ftruncate(fd, point.address)  # the tail holds no valid segment
    return point.address, point.next_seq, header.stream_id


def _start_stream(fd: int, path: str) -> tuple[int, int, bytes]:
    """Write a fresh file header on an empty file and make it durable."""
    stream_id = os.urandom(_format.STREAM_ID_SIZE)
    os.ftruncate(fd, 0)
    block = _format.pack_file_header(stream_id, time.time_ns())
    if os.pwrite(fd, block, 0) != len(block):
        raise OSError(_errno.EIO, f"{path}: short write of the file header")
    os.fdatasync(fd)
    _sync_directory(path)  # the new file's name must survive a crash too
    return _format.DATA_START, 0, stream_id


def _interrupted_creation(head: bytes, size: int) -> bool:
    """A file that an interrupted create() left: nothing past the first block, which
    starts with the file magic (the header write began) but fails its checks."""
    if size > _format.FILE_HEADER_SIZE or not head.startswith(_format.FILE_MAGIC):
        return False
    return isinstance(_format.parse_file_header(head), str)


def _what_it_holds(head: bytes, size: int) -> str:
    if head.count(0) == len(head) and size <= len(head):
        what = f"{size} bytes, all zero" if size != 1 else "1 byte, zero"
    elif head.count(0) == len(head):
        what = f"{size} bytes starting with {len(head)} zero bytes"
    else:
        what = f"{size} bytes starting with {head[:16]!r}"
    return (
        f"{what}, no shmflush file header (magic {_format.FILE_MAGIC!r} at offset 0). "
        "It was left as it was; move it away or pick another path"
    )


def _keep_cut_bytes(fd: int, path: str, start: int, end: int) -> str:
    """Copy file bytes ``[start, end)`` to a new sibling ``<path>.cut-<start>`` and make
    it durable (fsync, then its directory); returns its path.  A sibling that
    already holds exactly these bytes (a previous create() died before the cut)
    is reused."""
    base = f"{path}.cut-{start}"
    for n in range(1000):
        name = base if n == 0 else f"{base}.{n}"
        try:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if _same_bytes(fd, start, end, name):
                return name
            continue
        try:
            _copy_range(fd, start, end, out, path)
            os.fsync(out)
        except BaseException:
            os.close(out)
            with suppress(OSError):
                os.unlink(name)
            raise
        os.close(out)
        _sync_directory(name)
        return name
    raise ShmflushError(f"{path}: cannot find a free name for a copy of its damaged tail")


def _copy_range(fd: int, start: int, end: int, out: int, path: str) -> None:
    at = start
    while at < end:
        chunk = os.pread(fd, min(1 << 20, end - at), at)
        if not chunk:
            raise OSError(_errno.EIO, f"{path}: file shrank while its tail was copied")
        os.write(out, chunk)
        at += len(chunk)


def _same_bytes(fd: int, start: int, end: int, other: str) -> bool:
    try:
        if os.stat(other).st_size != end - start:
            return False
        with open(other, "rb") as f:
            at = start
            while at < end:
                want = min(1 << 20, end - at)
                if f.read(want) != os.pread(fd, want, at):
                    return False
                at += want
    except OSError:
        return False
    return True


def _sync_directory(path: str) -> None:
    """fsync(2) the directory holding *path*, so that its entry is durable."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _remove_dead_ring(name: str, wait: float = 10.0) -> None:
    """Unlink ring *name* if its owner is dead (for ``exist_ok=True``).

    A dead owner's flusher drains the ring on its own and then exits; wait for it,
    so that its data reaches its file and its lock on that file is gone.
    """
    try:
        core = attach_ring(name)
    except ShmflushError:
        L.unlink_segment(name)  # missing, half-made or corrupt: nothing to keep
        return
    try:
        owner = core.header(L.H_OWNER_PID)
        if _proc.is_alive(owner, core.header(L.H_OWNER_START)):
            raise RingExistsError(
                name,
                f"its owner (pid {owner}) is alive; exist_ok=True only replaces rings "
                "whose owner died",
            )
        deadline = time.monotonic() + wait
        while flusher := _supervisor.flusher_pid(core):
            if time.monotonic() > deadline:
                raise RingExistsError(
                    name,
                    f"its owner (pid {owner}) died, but its flusher (pid {flusher}) "
                    f"is still draining it after {wait:g} s; try again once it exits",
                )
            time.sleep(0.01)
    finally:
        core.unmap()
    L.unlink_segment(name)


def attach(name: str) -> Ring:
    """Attach to the existing ring *name* (created by :func:`create` in any process
    of this host, as the same user).

    Raises :class:`RingNotFoundError` if there is no such ring,
    :class:`CorruptRingError` if the shared memory is not a valid ring, and
    :class:`PermissionError` if it belongs to another user.
    """
    L.check_name(name)
    return Ring(attach_ring(name))


_owned: weakref.WeakSet[Ring] = weakref.WeakSet()


@atexit.register
def _settle_at_exit() -> None:
    # Registered first, so it runs last (after the owned rings are closed): a
    # claim an exception left in flight in an attached handle is settled at
    # interpreter exit rather than waiting for recovery.
    for ring in list(_live_rings):
        if ring._pid != os.getpid() or ring._core is None:
            continue
        for ref in list(ring._slots.values()):
            slot = ref()
            if slot is not None:
                with suppress(Exception):
                    slot.settle()


@atexit.register
def _close_owned_rings() -> None:
    # An owner that exits without close() would leave its records in shared memory;
    # drain them like multiprocessing joins its children at exit.
    for ring in list(_owned):
        if ring._is_owner():
            try:
                ring.close()
            except ShmflushError as exc:
                print(f"shmflush: closing ring {ring.name!r} at exit: {exc}", file=sys.stderr)
