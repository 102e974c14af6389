"""Layer 5: the public API — create, attach, Ring, Stats."""

from __future__ import annotations

import atexit
import contextlib
import errno as _errno
import fcntl
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

from . import _atomic, _faults, _format, _proc, _supervisor
from . import _layout as L
from ._errors import (
    CorruptRingError,
    ForeignFileError,
    RecordTooLargeError,
    RingBrokenError,
    RingClosedError,
    RingExistsError,
    RingTimeoutError,
    ShmflushError,
)
from ._reader import find_append_point
from ._ring import Ring as _Core
from ._ring import attach_ring
from ._ring import restore_signal_mask as _restore_signal_mask

__all__ = ["DirectIOWarning", "Ring", "Stats", "attach", "create"]

_fetch_add = _atomic.fetch_add
_SEALED: Final = L.SEALED
_FILL_TAG: Final = 0xFFFFFFFF
_INDEX_MASK: Final = L.LANE_INDEX_MASK
_FILL_SHIFT: Final = L.LANE_FILL_SHIFT
_HDR: Final = _format.RECORD_HEADER_SIZE
_INTENT_FROM_PID: Final = (L.L_INTENT - L.L_PID) // 8  # words from a lease's pid to its intent
_KIND_DATA: Final = _format.KIND_DATA
_MARK: Final = _format.RECORD_MARK
_KIND_ABANDONED: Final = _format.KIND_ABANDONED
# append_many and append_array claim at most this much with one fetch-and-add (or
# an eighth of a buffer, if less): large enough to amortise the atomic, small
# enough that a claim that does not fit wastes little of a buffer.
_BATCH_BYTES: Final = 64 << 10


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


class _ThreadSlot:
    """A lease slot held by one thread of this process.

    Released when the thread ends (its thread-local reference is the only
    strong one, so the slot dies with the thread's locals) or when its handle
    closes.  ``pending`` holds what the thread knew of the claim in flight when
    an exception interrupted it (see ``Ring._interrupted``).
    """

    __slots__ = (
        "__weakref__",
        "at_w",
        "commit_w",
        "core",
        "holder",
        "intent_w",
        "lane",
        "lane_w",
        "pending",
        "pid",
        "reservation",
        "slot",
    )

    def __init__(self, core: _Core, slot: int) -> None:
        self.core: _Core | None = core
        self.slot = slot
        self.pid = os.getpid()
        # The slot's holder word, as acquire_lease stored it (this thread's).
        self.holder = L.holder_word(self.pid, threading.get_native_id())
        self.lane = slot % core.geometry.lanes
        self.lane_w = core.lane_w[self.lane]
        g = core.geometry
        self.intent_w = (g.lease(slot) + L.L_INTENT) // 8
        self.at_w = (g.lease(slot) + L.L_AT) // 8
        self.commit_w = g.commit(slot, 0) // 8  # + buffer index
        # (buffer, fetch-and-add result or -1, commit counter before, size, fill)
        self.pending: tuple[int, int, int, int, int] | None = None
        self.reservation: memoryview | None = None  # an open reserve() block's view

    def settle(self) -> None:
        """Settle a claim an exception left in flight; orphan the slot (hand the
        claim to recovery) where that cannot be done here."""
        core = self.core
        if core is None or core.mm is None or self.pid != os.getpid():
            return
        if core.words[self.intent_w - _INTENT_FROM_PID] != self.holder:
            # Not ours any more (recovery freed it after this thread ended, and
            # somebody else may hold it now): touch nothing.
            self.core = None
            return
        if not core.words[self.intent_w]:
            self.pending = None
            return
        pending = self.pending
        if pending is not None:
            i, old, committed, size, fill = pending
            if core.settle_claim(self.slot, i, old, committed, size, fill):
                self.pending = None
                return
        self.pending = None
        core.orphan_lease(self.slot)  # idempotent; first, so nothing leaks
        self.core = None  # the slot is recovery's now: never release it

    def release(self) -> None:
        view, self.reservation = self.reservation, None
        if view is not None:
            # The handle closes under an open reserve() block: its owner may not
            # write there any more (the claim is settled as abandoned).
            view.release()
        self.settle()
        core = self.core
        if core is not None and core.mm is not None and self.pid == os.getpid():
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
    * Records appended by one thread appear in the file in the order of the calls.
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
        self._slots: dict[int, weakref.ref[_ThreadSlot]] = {}
        self._records = 0
        self._bytes = 0
        self._abandoned = 0
        self.name = core.name
        self._ring_id = core.header(L.H_RING_ID)
        # Hot-path constants and bound callables, cached once.
        self._words = core.words
        self._view = core.view
        self._status_w = core.status_w
        self._state_addr = core.state_addr
        self._fill_w = core.fill_w
        self._records_at = core.records_at
        self._capacity = core.capacity
        self._max_record = core.max_record
        # With fault injection on, every append takes the general path, which has
        # the crash points; the fast path has none (see _faults).
        self._faa_limit = -1 if _faults.ENABLED else core.faa_limit
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
        self._records = self._bytes = self._abandoned = 0
        if self._core is not None:
            self._core.waits = 0

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

    def _slot(self) -> _ThreadSlot:
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
        slot: _ThreadSlot | None = getattr(self._tls, "slot", None)
        if slot is not None:
            if slot.pending is not None or (
                slot.core is not None and slot.core.words[slot.intent_w]
            ):
                slot.settle()
            if slot.core is not None:
                return slot
            del self._tls.slot  # orphaned: its claim is recovery's to settle
        core = self._live_core()
        # An exception between the compare-and-swap that takes the slot and the
        # moment this thread holds its _ThreadSlot would leak the slot to a live
        # thread forever (found by tests/test_interrupts.py): give it back.
        try:
            slot = _ThreadSlot(core, core.acquire_lease())
            self._tls.slot = slot
        except BaseException:
            held = getattr(self._tls, "slot", None)
            if held is None or held.core is not core or held.slot != core._taking:
                core.release_untaken_lease()
            raise
        core._taking = -1
        self._slots[slot.slot] = weakref.ref(slot)
        return slot

    def _interrupted(self, slot: _ThreadSlot) -> None:
        """Run by every writer path's exception handler: settle the claim the
        exception interrupted, or hand it to recovery."""
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

        An exception that interrupts the call (``KeyboardInterrupt``, or one
        raised by a signal handler) leaves the record either whole in the file
        or not there at all, never torn or twice; the ring and this thread go
        on working.

        Raises :class:`TypeError` for non-bytes-like input,
        :class:`RecordTooLargeError` for a record larger than ``max_record``,
        :class:`RingClosedError` and :class:`RingBrokenError` as their names say.
        """
        if type(data) is bytes:
            n = len(data)
        else:
            data = _as_bytes(data)
            n = data.nbytes
        if timeout is not None:
            _check_timeout(timeout)  # even where this call will not block
        size = _HDR + ((n + 7) & -8)
        try:
            slot: _ThreadSlot = self._tls.slot
        except AttributeError:
            slot = self._slot()
        words = self._words
        # The hot path: one fetch-and-add, then plain stores (see _ring).  The
        # intent check sends a thread whose last call was interrupted to the
        # general path, which settles that claim first.
        if not words[self._status_w] and size <= self._faa_limit and not words[slot.intent_w]:
            lane_word = words[slot.lane_w]
            i = lane_word & _INDEX_MASK
            try:
                addr = self._state_addr[i]
            except IndexError:
                raise self._corrupt_lane(lane_word) from None
            cw = slot.commit_w + i
            committed = words[cw]
            old = -1
            words[slot.intent_w] = ((lane_word & 0xFFFFFFFF) << 32) | size  # claim_intent
            try:
                old = _fetch_add(addr, size << 32, 5)
                off = old >> 32
                if not old & _SEALED and off + size <= self._capacity:
                    at = self._records_at[i] + off
                    if words[self._fill_w[i]] == lane_word >> _FILL_SHIFT:
                        words[slot.at_w] = at  # the claim is known: before any byte
                        view = self._view
                        view[at + _HDR : at + _HDR + n] = data
                        self._pack(view, at, n, _KIND_DATA, _MARK)  # header last
                        words[cw] = committed + size
                        words[slot.at_w] = 0
                        words[slot.intent_w] = 0
                        self._records += 1
                        self._bytes += n
                        return
                deadline = _deadline(timeout)
                slot.pending = (i, old, committed, size, lane_word >> _FILL_SHIFT)
                self._claim_failed(slot, i, old, size, lane_word, deadline)
            except BaseException:
                # Plain stores first: no signal handler can run before them.
                slot.pending = (i, old, committed, size, lane_word >> _FILL_SHIFT)
                self._interrupted(slot)
                raise
        else:
            deadline = _deadline(timeout)
            if n > self._max_record:
                raise self._too_large(n)
        try:
            at, i, committed = self._claim(slot, size, deadline)
            slot = self._tls.slot  # _claim may have replaced an orphaned slot
            if _faults.ENABLED:
                _faults.reached("append.claimed")
            self._view[at + _HDR : at + _HDR + n] = data
            if _faults.ENABLED:
                _faults.reached("append.copied")
            self._pack(self._view, at, n, _KIND_DATA, _MARK)
            if _faults.ENABLED:
                _faults.reached("append.headed")
            self._commit(slot, i, committed, size)
        except BaseException:
            slot = getattr(self._tls, "slot", slot)
            self._interrupted(slot)
            raise
        self._records += 1
        self._bytes += n

    def _corrupt_lane(self, lane_word: int) -> ShmflushError:
        return CorruptRingError(
            f"ring {self.name!r}: corrupt lane word {lane_word:#x} (buffer index out of range)"
        )

    def _too_large(self, n: int) -> RecordTooLargeError:
        core = self._live_core()
        return RecordTooLargeError(
            f"record of {n} bytes does not fit in a buffer of ring {self.name!r} "
            f"(max_record is {core.max_record} bytes for buffer_size "
            f"{core.geometry.buffer_size})"
        )

    def _commit(self, slot: _ThreadSlot, i: int, committed: int, size: int) -> None:
        """Publish a claim: its commit counter covers it (see _ring), then the
        lease forgets it.  Idempotent: the counter is set, not added to."""
        core = self._live_core()
        words = core.words
        words[slot.commit_w + i] = (committed + size) & L.WORD_MASK
        if _faults.ENABLED:
            _faults.reached("append.committed")
        words[slot.at_w] = 0
        words[slot.intent_w] = 0
        slot.pending = None

    def _claim_failed(  # noqa: PLR0917  (the hot path passes what it already has)
        self,
        slot: _ThreadSlot,
        i: int,
        old: int,
        size: int,
        lane_word: int,
        deadline: float | None,
    ) -> None:
        """Settle a claim that cannot be used, then wait until the lane moves on.

        ``slot.pending`` describes the claim on entry, so that an exception
        anywhere in here is settled by the caller's handler.
        """
        core = self._live_core()
        words = core.words
        off = old >> 32
        if not old & _SEALED and off + size <= core.capacity:
            # A valid claim, but in a fill that is not our lane's: we read the lane
            # word, and the buffer was recycled into another lane's fill before our
            # claim landed.  Writing there could reorder our records (I8): give the
            # range up as an abandoned record, commit it, and move the lane on.
            at = core.records_at[i] + off
            words[slot.at_w] = at
            core.abandon(at, size)
            assert slot.pending is not None
            self._commit(slot, i, slot.pending[2], size)
            self._abandoned += 1
            core.rotate(slot.lane, lane_word, slot.intent_w)
            return
        if not old & _SEALED and off <= core.capacity:
            # We crossed capacity: we close the fill.  The lease says so while we
            # do: were we to die half-way, recovery finishes the close; an
            # exception here orphans the slot for the same reason.
            words[slot.intent_w] = L.INTENT_SEALING | (i << 32)
            slot.pending = None
            core.close_crossing(i, off)
            words[slot.intent_w] = 0
        else:
            words[slot.intent_w] = 0
            slot.pending = None
            core.reject(i, old)
        core.advance(slot.lane, lane_word, deadline, slot.intent_w)

    def _claim(self, slot: _ThreadSlot, size: int, deadline: float | None) -> tuple[int, int, int]:
        """Claim *size* bytes (at most a buffer's capacity) in this thread's lane.

        Returns (byte offset of the claimed range in the mapping, buffer index,
        the slot's commit counter for that buffer before the claim).  The caller
        writes the range, header last, then calls ``_commit``; on an exception
        its handler calls ``_interrupted`` (``slot.pending`` is kept current).
        """
        while True:
            core = self._live_core()
            slot = self._slot()
            words = core.words
            core.check_status()
            lane_word = words[slot.lane_w]
            i = lane_word & _INDEX_MASK
            if i >= core.geometry.buffers:
                raise self._corrupt_lane(lane_word)
            fill = lane_word >> _FILL_SHIFT
            committed = words[slot.commit_w + i]
            slot.pending = (i, -1, committed, size, fill)
            words[slot.intent_w] = L.claim_intent(lane_word, size)
            if size > core.faa_limit:
                off = core.claim_large(i, size)
                if off < 0:
                    words[slot.intent_w] = 0
                    slot.pending = None
                    core.advance(slot.lane, lane_word, deadline, slot.intent_w)
                    continue
                old = off << 32
            else:
                old = _fetch_add(core.state_addr[i], size << 32, 5)
                off = old >> 32
            slot.pending = (i, old, committed, size, fill)
            if not old & _SEALED and off + size <= core.capacity and words[core.fill_w[i]] == fill:
                at = core.records_at[i] + off
                words[slot.at_w] = at
                return at, i, committed
            self._claim_failed(slot, i, old, size, lane_word, deadline)

    def append_many(self, records: Iterable[Any], *, timeout: float | None = None) -> int:
        """Append each of *records* in order; returns how many were appended.

        Same guarantees and errors as :meth:`append`, per record.  Every record is
        checked (type, size) before any is appended.  Consecutive records are
        claimed together, with one fetch-and-add per batch of up to 64 KiB, so
        this is much faster than calling :meth:`append` in a loop.  If the ring
        fails part-way (closed, broken, timed out, or an exception such as
        ``KeyboardInterrupt``), the records of earlier batches are appended and
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
        deadline = _deadline(timeout)
        limit = max(_HDR, min(_BATCH_BYTES, self._capacity // 8))
        pack = self._pack
        done = 0
        count = len(items)
        slot = self._slot()
        try:
            while done < count:
                # The batch: as many records as fit under the limit (at least one).
                end = done
                total = 0
                while end < count:
                    size = _HDR + ((sizes[end] + 7) & -8)
                    if total and total + size > limit:
                        break
                    total += size
                    end += 1
                at, i, committed = self._claim(slot, total, deadline)
                slot = self._tls.slot
                view = self._view
                for k in range(done, end):
                    n = sizes[k]
                    view[at + _HDR : at + _HDR + n] = items[k]
                    pack(view, at, n, _KIND_DATA, _MARK)
                    at += _HDR + ((n + 7) & -8)
                self._commit(slot, i, committed, total)
                self._records += end - done
                self._bytes += sum(sizes[done:end])
                done = end
        except BaseException:
            self._interrupted(getattr(self._tls, "slot", slot))
            raise
        return count

    def append_array(self, array: Any, *, timeout: float | None = None) -> int:
        """Append each row of a C-contiguous numpy array as one record.

        *array* is typically a 1-D structured array (one record per element) or a
        2-D ``uint8`` array (one record per row).  Every record has the row's size,
        ``array.itemsize * prod(array.shape[1:])`` bytes.  Rows are claimed in
        batches (one fetch-and-add per up to 64 KiB) and their headers are written
        with one vectorised store per batch.  Returns the number of rows appended;
        on a failure part-way (an exception such as ``KeyboardInterrupt``
        included), the rows of earlier batches are appended, each whole.
        Read them back with :func:`shmflush.read_array`.
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
        rows = array.shape[0]
        n = array.nbytes // rows if rows else 0
        if n > self._max_record:
            raise self._too_large(n)
        if not rows:
            return 0
        core = self._live_core()
        deadline = _deadline(timeout)
        size = _HDR + ((n + 7) & -8)
        per_batch = max(1, min(_BATCH_BYTES, self._capacity // 8) // size)
        source = array.reshape(rows, -1).view(np.uint8)
        header = np.frombuffer(_format.RECORD_HEADER.pack(n, _KIND_DATA, _MARK), np.uint8)
        mapped = core.bytes_view()
        done = 0
        slot = self._slot()
        try:
            while done < rows:
                k = min(per_batch, rows - done)
                at, i, committed = self._claim(slot, k * size, deadline)
                slot = self._tls.slot
                target = mapped[at : at + k * size].reshape(k, size)
                target[:, _HDR : _HDR + n] = source[done : done + k]
                target[:, :_HDR] = header  # headers after the payloads
                self._commit(slot, i, committed, k * size)
                self._records += k
                self._bytes += k * n
                done += k
        except BaseException:
            self._interrupted(getattr(self._tls, "slot", slot))
            raise
        finally:
            del mapped
        return int(rows)

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
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"reserve() size must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"reserve() size must be >= 0, got {n}")
        if n > self._max_record:
            raise self._too_large(n)
        if timeout is not None:
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
            time.sleep(nap)
            nap = min(nap * 2, 5e-3)

    def stats(self) -> Stats:
        """A snapshot of this ring's counters (see :class:`Stats`)."""
        core = self._live_core()
        g = core.geometry
        return Stats(
            name=self.name,
            records=self._records,
            bytes=self._bytes,
            waits=core.waits,
            abandoned=self._abandoned,
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
        )

    @property
    def max_record(self) -> int:
        """The largest payload, in bytes, that one record may carry."""
        return self._max_record


class _Reservation:
    """The context manager :meth:`Ring.reserve` returns (a class, not a
    generator: it costs less than an append's own overhead)."""

    __slots__ = (
        "_at",
        "_committed",
        "_frame",
        "_i",
        "_n",
        "_ring",
        "_size",
        "_slot",
        "_timeout",
    )

    def __init__(self, ring: Ring, n: int, timeout: float | None) -> None:
        self._ring = ring
        self._n = n
        self._timeout = timeout
        self._slot: _ThreadSlot | None = None
        self._frame: Any = None
        self._at = self._i = self._committed = 0
        self._size = _HDR + ((n + 7) & -8)

    def __enter__(self) -> memoryview:
        ring = self._ring
        slot = ring._slot()
        deadline = _deadline(self._timeout)
        try:
            at, i, committed = ring._claim(slot, self._size, deadline)
            slot = ring._tls.slot
            view = ring._view[at + _HDR : at + _HDR + self._n]
            slot.reservation = view
            self._slot, self._at, self._i, self._committed = slot, at, i, committed
            # The frame of the with statement: while it runs, the block is open.
            self._frame = sys._getframe(1)
            ring._tls.reservation = self
            if _faults.ENABLED:
                _faults.reached("reserve.open")
            return view  # noqa: TRY300  (inside the try: an exception here is settled too)
        except BaseException:
            # No __exit__ will come: settle the claim (abandoned) here.
            self._abandon(getattr(ring._tls, "slot", slot))
            raise

    def _abandon(self, slot: _ThreadSlot) -> None:
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
            kind = _KIND_DATA if exc_type is None else _KIND_ABANDONED
            # The header goes last, as in append: until it is there, a crash leaves
            # a zero header, and recovery abandons the range.
            ring._pack(ring._view, self._at, self._n, kind, _MARK)
            ring._commit(slot, self._i, self._committed, self._size)
            if kind == _KIND_DATA:
                ring._records += 1
                ring._bytes += self._n
            else:
                ring._abandoned += 1
        except BaseException:
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
            if mark != _MARK or kind not in (_KIND_DATA, _KIND_ABANDONED) or size > end - at:
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
) -> Ring:
    """Create ring *name* appending to the file at *path*, and start its flusher.

    The calling process becomes the owner: its :meth:`Ring.close` drains and
    removes the ring.  An existing file is appended to, after its last complete
    segment (a torn tail left by a crash is cut off).

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

    Raises :class:`RingExistsError`, :class:`ValueError`/:class:`TypeError` for bad
    arguments, :class:`OSError` if the file cannot be opened,
    :class:`ForeignFileError` if *path* is not a regular file (a directory, a
    device, a FIFO), is on a file system that cannot make it durable (``/proc``),
    or is not empty yet holds no shmflush segment (the file is then left
    untouched; a file of only zero bytes counts as empty), and
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
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, 0o666)
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
        address, next_seq = _append_point(fd, path)
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
                recovery_ns=int(recovery_timeout * 1e9),
                path=encoded,
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


def _append_point(fd: int, path: str) -> tuple[int, int]:
    """Where the new ring appends to the locked file *fd*: ``(address, next_seq)``.

    Cuts what follows the last valid segment (a torn or zero tail), and raises
    :class:`ForeignFileError`, touching nothing, for a file that is not ours.
    """
    address, next_seq = find_append_point(fd)
    size = os.fstat(fd).st_size
    if not address and size and not _holds_nothing_or_a_torn_start(fd, size):
        # Not empty, yet no valid segment: somebody else's file (a log, a
        # database) given by mistake.  Truncating it would destroy it.
        raise ForeignFileError(
            path,
            f"not a shmflush file: no valid segment in {size} bytes; move it away "
            "or pick another path",
        )
    if size > address:
        os.ftruncate(fd, address)  # the tail holds no valid segment
    return address, next_seq


def _holds_nothing_or_a_torn_start(fd: int, size: int) -> bool:
    """For a file with no valid segment: may create() truncate it and start over?

    Yes if every byte is zero (a preallocated tail, nothing written), or if a
    segment header that checks out sits at offset 0: a shmflush file whose first
    segment was torn by a crash.  Anything else is not ours.
    """
    head = _format.parse_segment_header(os.pread(fd, _format.SEGMENT_HEADER_SIZE, 0), 0)
    if not isinstance(head, str):
        return True
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            return True  # shrank while we looked: what is gone held nothing
        if chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
    return True


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
