"""An exception can arrive at any bytecode of a ring call (shmflush._api).

Ctrl-C raises KeyboardInterrupt, and a signal handler may raise anything, at any
bytecode boundary of the main thread.  The library guarantees that wherever such
an exception lands inside ``append``, ``append_many``, ``append_array``,
``reserve`` (inside or around the ``with`` block), ``sync`` and ``close``:

* the call raises it, or completes if it arrived after the work was done;
* each record of the interrupted call is in the file whole or not at all, and at
  most once; a writer's records stay in order;
* every record whose call returned is in the file exactly once, and no other
  writer loses anything;
* nothing wedges: the same thread can keep appending, ``sync(timeout=1)`` and
  the owner's ``close(timeout=1)`` return within about a second.  (A claim left
  unsettled by a second interrupt inside the library's own handler is settled by
  the thread's next call, its handle's close, interpreter exit or the flusher's
  recovery; the rings here use ``recovery_timeout=0.01`` so that this fits.)

The exhaustive test injects the exception itself, with ``sys.settrace``: opcode
and line events of every frame whose code lives in the shmflush package (plus,
for ``reserve``, the ``contextlib`` frames that run the ``with`` protocol, and
for the ``with`` body, the body's own frame).  It only uses the public API, so it
keeps working however the append path is built.  The real-signal test does the
same with ``SIGALRM`` every millisecond in a spawned writer process.

Every payload says who wrote it and its sequence number, followed by filler cut
from a fixed pattern at a place derived from both, so a torn, misplaced or
duplicated record shows up byte for byte.
"""

from __future__ import annotations

import contextlib
import dis
import multiprocessing
import os
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import numpy as np
import pytest

import shmflush

_PACKAGE_DIR = os.path.dirname(os.path.abspath(shmflush.__file__)) + os.sep
_CONTEXTLIB_FILE = os.path.abspath(contextlib.__file__)

# Record layout: writer id (u32) and sequence number (u64), then filler.
HEADER = struct.Struct("<IQ")
_PATTERN = random.Random(20240611).randbytes(1 << 16)

# Injection points (see _fire_points): every event up to EXHAUSTIVE_EVENTS, then
# the first event at each instruction not met before, at most MAX_FIRE_POINTS in
# all.  The longest calls here (append_many, the waiting appends) run two to three
# thousand events but only 900 to 1,200 distinct instructions.
EXHAUSTIVE_EVENTS = 400
MAX_FIRE_POINTS = 1200
# The double-interrupt scenarios try the second interrupt this many events after the
# tracing comes back (see _Tracer), at a thinner set of first interrupts.
SECOND_AFTER = (1, 2, 3, 5, 8, 13, 21, 34)
DOUBLE_FIRST_POINTS = 60

# The shortest recovery_timeout create() accepts: a claim that only the flusher's
# recovery settles costs a round this long, and some rounds may need it.
RECOVERY_TIMEOUT_S = 0.01
APPEND_TIMEOUT_S = 2.0  # follow-up appends: a wedged ring fails fast
SYNC_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 1.0
# "Did not hang" bounds (seconds) for calls that should take milliseconds.
CLOSE_BOUND_S = 2.0
THREAD_JOIN_S = 10.0
# The timeout of the append that times out waiting for space, and the longest the
# flusher stays stopped if the waiting append never reports a wait.
WAIT_TIMEOUT_S = 0.003
STOPPED_AT_MOST_S = 0.05

# Writer ids (the u32 in each record): a scenario's number times this, plus a role.
ROLE_SPAN = 10_000
MAIN, OTHER, HANDLE, THREADS = 1, 2, 3, 100

Key = tuple[int, int]


class _Interrupt(KeyboardInterrupt):
    """The KeyboardInterrupt the tracer injects (a subclass, to tell it from a real one)."""


# -- records ---------------------------------------------------------------------------


def _payload(writer: int, seq: int, extra: int) -> bytes:
    start = (writer * 7919 + seq * 104729) % (len(_PATTERN) - extra + 1)
    return HEADER.pack(writer, seq) + _PATTERN[start : start + extra]


class _Book:
    """What each writer tried to append, and which of those calls returned."""

    def __init__(self) -> None:
        self.attempted: dict[Key, bytes] = {}
        self.returned: set[Key] = set()
        self._next: dict[int, int] = {}
        self._lock = threading.Lock()

    def new(self, writer: int, extra: int) -> tuple[Key, bytes]:
        with self._lock:
            seq = self._next.get(writer, 0)
            self._next[writer] = seq + 1
            key = (writer, seq)
            self.attempted[key] = data = _payload(writer, seq, extra)
        return key, data

    def done(self, keys: list[Key]) -> None:
        with self._lock:
            self.returned.update(keys)


def _check_file(path: Path, book: _Book) -> None:
    """Every record of a returned call exactly once; every record whole, known, at
    most once, and in its writer's order."""
    with shmflush.read(path) as reader:
        records = list(reader)
    problems: list[str] = []
    seen: set[Key] = set()
    last: dict[int, int] = {}
    for position, record in enumerate(records):
        if len(record) < HEADER.size:
            problems.append(f"record {position}: {len(record)} bytes, too short for a header")
            continue
        writer, seq = HEADER.unpack_from(record)
        key = (writer, seq)
        want = book.attempted.get(key)
        if want is None:
            problems.append(f"record {position}: writer {writer} seq {seq} was never appended")
        elif record != want:
            problems.append(
                f"record {position} (writer {writer} seq {seq}): {len(record)} bytes differ "
                f"from the {len(want)} appended"
            )
        if key in seen:
            problems.append(f"record {position}: writer {writer} seq {seq} is a duplicate")
        elif seq < last.get(writer, -1):
            problems.append(
                f"record {position}: writer {writer} seq {seq} comes after seq {last[writer]}"
            )
        seen.add(key)
        last[writer] = max(seq, last.get(writer, -1))
    missing = sorted(book.returned - seen)
    if missing:
        problems.append(
            f"{len(missing)} records whose call returned are missing, first {missing[:5]}"
        )
    assert not problems, f"{path}: " + "; ".join(problems[:10])


# -- the tracer ------------------------------------------------------------------------


def _in_package(code: CodeType) -> bool:
    return os.path.abspath(code.co_filename).startswith(_PACKAGE_DIR)


def _in_package_or_contextlib(code: CodeType) -> bool:
    return _in_package(code) or os.path.abspath(code.co_filename) == _CONTEXTLIB_FILE


def _describe(frame: FrameType, event: str) -> str:
    code = frame.f_code
    at = frame.f_lasti
    op = dis.opname[code.co_code[at]] if 0 <= at < len(code.co_code) else "?"
    return (
        f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_qualname} "
        f"({event} event, {op} at offset {at})"
    )


class _Tracer:
    """Counts line and opcode events of the frames in scope; raises at one of them.

    ``fire_at`` (1-based) is the event at which the first _Interrupt is raised.
    CPython switches tracing off for the thread when a trace function raises, so a
    second interrupt (``then_after``) needs tracing turned back on: a profile
    hook does that at the next call or return event after the first interrupt
    (the first moment the interpreter lets a hook run again), and the second
    interrupt is raised ``then_after`` events later.
    """

    def __init__(
        self,
        scope: Callable[[CodeType], bool],
        fire_at: int | None = None,
        then_after: int | None = None,
    ) -> None:
        self.scope = scope
        self.fire_at = fire_at
        self.then_after = then_after
        self.events = 0
        self.locations: list[tuple[CodeType, int]] = []  # per event, if recording
        self.recording = fire_at is None
        self.fired: list[str] = []
        self._wanted: dict[CodeType, bool] = {}
        self._rearmed_events = -1  # events since tracing came back; -1: not back

    def _wants(self, code: CodeType) -> bool:
        wanted = self._wanted.get(code)
        if wanted is None:
            wanted = self._wanted[code] = self.scope(code)
        return wanted

    def on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not self._wants(frame.f_code):
            return None
        # Not inside a finalizer: the collector runs __del__ at arbitrary points
        # of any thread, and CPython never lets an exception out of one, so an
        # interrupt there interrupts no writer path.
        f: FrameType | None = frame
        while f is not None:
            if f.f_code.co_name == "__del__":
                return None
            f = f.f_back
        frame.f_trace_opcodes = True
        return self.on_event

    def on_event(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event not in ("line", "opcode"):
            return self.on_event
        self.events += 1
        if self.recording:
            self.locations.append((frame.f_code, frame.f_lasti))
        if self._rearmed_events >= 0:
            self._rearmed_events += 1
            if self._rearmed_events == self.then_after:
                self.fired.append(_describe(frame, event))
                raise _Interrupt(f"second injected interrupt at {self.fired[-1]}")
        elif self.events == self.fire_at:
            self.fired.append(_describe(frame, event))
            raise _Interrupt(f"injected interrupt at {self.fired[-1]}")
        return self.on_event

    def on_profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.fired or self._rearmed_events >= 0:
            return
        sys.setprofile(None)
        self._rearmed_events = 0
        # Frames already running keep their own trace function; the one that raised
        # lost it, so give it back to every frame in scope on the stack.
        f: FrameType | None = frame
        while f is not None:
            if self._wants(f.f_code):
                f.f_trace = self.on_event
                f.f_trace_opcodes = True
            f = f.f_back
        sys.settrace(self.on_call)

    def run(self, op: Callable[[], object]) -> BaseException | None:
        """Run *op* under this tracer; return what it raised (None: it returned)."""

        # Inside a generator, so that the thread's "exception being handled" is the
        # generator's own: an exception raised at the POP_EXCEPT that ends an
        # except block (an opcode no real signal lands on) leaves that block's
        # exception as the one being handled, and every later exception of the
        # thread would be chained to it.  The generator's state goes with it.
        def confined() -> Iterator[BaseException | None]:
            sys.settrace(self.on_call)
            if self.then_after is not None:
                sys.setprofile(self.on_profile)
            outcome: BaseException | None = None
            try:
                op()
            except (_Interrupt, Exception) as exc:
                outcome = exc
            finally:
                sys.settrace(None)
                sys.setprofile(None)
            yield outcome

        return next(confined())


def _spread(items: list[int], n: int) -> list[int]:
    """*n* of *items*, evenly spaced, the last one included."""
    if len(items) <= n:
        return items
    return [items[-(-i * len(items) // n) - 1] for i in range(1, n + 1)]


def _fire_points(locations: list[tuple[CodeType, int]]) -> list[int]:
    """Events (1-based) to interrupt, from the dry run's event locations.

    Every event up to EXHAUSTIVE_EVENTS; after that, the first event at each
    instruction not seen before (a loop's second pass runs the same bytecodes),
    thinned evenly so that there are at most MAX_FIRE_POINTS in all.
    """
    head = min(len(locations), EXHAUSTIVE_EVENTS)
    seen = set(locations[:head])
    fresh = []
    for index in range(head, len(locations)):
        if locations[index] not in seen:
            seen.add(locations[index])
            fresh.append(index + 1)
    return list(range(1, head + 1)) + _spread(fresh, MAX_FIRE_POINTS - head)


# -- scenarios -------------------------------------------------------------------------


@dataclass
class _Env:
    """One scenario's ring and what the attempts share."""

    number: int
    name: str
    ring: shmflush.Ring
    book: _Book
    other: ThreadPoolExecutor
    round: int = 0
    writer: int = 0
    handles: list[shmflush.Ring] = field(default_factory=list)
    previous: str = "the ring's first records"  # what the last round did, for messages

    def role(self, role: int) -> int:
        return self.number * ROLE_SPAN + role

    def new(self, extra: int) -> tuple[Key, bytes]:
        return self.book.new(self.writer, extra)

    def append(self, extra: int) -> None:
        """An append outside the traced call, which must simply work."""
        key, data = self.new(extra)
        self.ring.append(data, timeout=APPEND_TIMEOUT_S)
        self.book.done([key])

    def fill_to(self, room: int) -> None:
        """Open a fresh fill and leave about *room* bytes free in it.

        A record of max_record bytes fills a buffer on its own, so one of
        ``max_record - room`` bytes leaves about *room* (the record header and
        alignment are a few bytes of that) without knowing the format's sizes.
        """
        self.append(self.ring.max_record - room - HEADER.size)


@dataclass
class _Attempt:
    op: Callable[[], object]
    keys: list[Key]  # the records the traced call carries
    scope: Callable[[CodeType], bool] = _in_package
    allowed: tuple[type[Exception], ...] = ()  # outcomes other than the interrupt
    after: Callable[[], None] | None = None  # untraced, after the call, whatever it did


@contextlib.contextmanager
def _peek(name: str) -> Iterator[Any]:
    """A second, read-only use of ring *name*'s shared memory (named offsets from
    shmflush._layout), for what the public API does not tell."""
    from shmflush import _ring

    core = _ring.attach_ring(name)
    try:
        yield core
    finally:
        core.unmap()


def _slots_in_use(name: str) -> int:
    """Lease slots with a holder (nonzero pid)."""
    from shmflush import _layout

    with _peek(name) as core:
        g = core.geometry
        return sum(1 for k in range(g.max_writers) if core.words[(g.lease(k) + _layout.L_PID) // 8])


def _wait_until_every_buffer_is_free(name: str) -> None:
    """Wait (with a deadline) until every buffer is IDLE: flushed and free."""
    from shmflush import _layout

    deadline = time.monotonic() + SYNC_TIMEOUT_S
    with _peek(name) as core:
        g = core.geometry
        states = [(g.descriptor(i) + _layout.D_STATE) // 8 for i in range(g.buffers)]
        while not all(core.words[w] & _layout.IDLE for w in states):
            busy = [i for i, w in enumerate(states) if not core.words[w] & _layout.IDLE]
            assert time.monotonic() < deadline, (
                f"buffers {busy} not free {SYNC_TIMEOUT_S} s after a sync returned"
            )
            time.sleep(0.0005)


def _flusher_state(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return b"?"
    return stat[stat.rfind(b")") + 2 :].split()[0]


def _stop_flusher(env: _Env) -> int:
    pid = env.ring.stats().flusher_pid
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + THREAD_JOIN_S
    while _flusher_state(pid) != b"T":
        assert time.monotonic() < deadline, f"flusher {pid} did not stop after SIGSTOP"
        time.sleep(0.0005)
    return pid


def _continue_flusher(env: _Env) -> None:
    with contextlib.suppress(shmflush.ShmflushError, ProcessLookupError):
        os.kill(env.ring.stats().flusher_pid, signal.SIGCONT)


def _append_fast_path(env: _Env) -> _Attempt:
    env.append(5)  # opens a fill with room: the traced append takes the fast path
    key, data = env.new(env.round * 7 % 40)
    return _Attempt(lambda: env.ring.append(data), [key])


def _append_after_seal(env: _Env) -> _Attempt:
    # The previous round's sync sealed the lane's fill: the claim fails and the
    # append rotates the lane onto a fresh fill.
    key, data = env.new(env.round * 11 % 60)
    return _Attempt(lambda: env.ring.append(data), [key])


def _append_crossing(env: _Env) -> _Attempt:
    env.fill_to(64)
    key, data = env.new(120 + env.round % 40)  # does not fit: crosses the fill's end
    return _Attempt(lambda: env.ring.append(data), [key])


def _stopped_flusher_and_full_ring(env: _Env) -> None:
    # Two buffers: a big record fills the first, a second big record crosses it
    # into the second; with the flusher stopped the next append finds no space.
    # That needs both free first: a buffer that an interrupt left behind is freed
    # by the flusher's recovery, which a stopped flusher does not run.
    _wait_until_every_buffer_is_free(env.name)
    _stop_flusher(env)
    env.fill_to(64)
    env.fill_to(64)


def _continue_once_waiting(env: _Env, waits: int, done: threading.Event) -> None:
    """Let the flusher go on once the append reports a wait for space (Stats.waits
    grows), so every round takes the waiting path and no round waits long."""
    deadline = time.monotonic() + STOPPED_AT_MOST_S
    with contextlib.suppress(shmflush.ShmflushError):
        while env.ring.stats().waits == waits and not done.is_set():
            if time.monotonic() > deadline:
                break
            time.sleep(0.0002)
    _continue_flusher(env)


def _append_waiting(env: _Env) -> _Attempt:
    _stopped_flusher_and_full_ring(env)
    key, data = env.new(120 + env.round % 40)
    done = threading.Event()
    watcher = threading.Thread(
        target=_continue_once_waiting, args=(env, env.ring.stats().waits, done)
    )
    watcher.start()

    def after() -> None:
        done.set()
        watcher.join(THREAD_JOIN_S)
        _continue_flusher(env)

    return _Attempt(lambda: env.ring.append(data, timeout=APPEND_TIMEOUT_S), [key], after=after)


def _append_timing_out(env: _Env) -> _Attempt:
    _stopped_flusher_and_full_ring(env)
    key, data = env.new(120 + env.round % 40)
    return _Attempt(
        lambda: env.ring.append(data, timeout=WAIT_TIMEOUT_S),
        [key],
        allowed=(shmflush.RingTimeoutError,),
        after=lambda: _continue_flusher(env),
    )


def _append_first_of_thread(env: _Env) -> _Attempt:
    # Runs in a new thread (see SCENARIOS): the traced append takes its writer slot.
    key, data = env.new(env.round * 7 % 40)
    return _Attempt(lambda: env.ring.append(data), [key])


def _append_many(env: _Env) -> _Attempt:
    # About 1 KiB in batches of about 500 bytes (an eighth of a 4 KiB buffer): the
    # first batch fits in what is left of the fill, the second crosses its end.
    env.fill_to(600)
    new = [env.new((env.round + j) * 37 % 150) for j in range(10)]
    return _Attempt(lambda: env.ring.append_many([data for _, data in new]), [k for k, _ in new])


def _append_array(env: _Env) -> _Attempt:
    env.fill_to(600)
    row = 100 + env.round % 5 * 8
    new = [env.new(row - HEADER.size) for _ in range(16)]
    array = np.frombuffer(b"".join(data for _, data in new), dtype=np.uint8).reshape(16, row)
    return _Attempt(lambda: env.ring.append_array(array), [k for k, _ in new])


def _reserve(env: _Env) -> _Attempt:
    env.append(5)
    key, data = env.new(env.round * 5 % 23)

    def op() -> None:
        with env.ring.reserve(len(data)) as view:
            view[:] = data

    return _Attempt(op, [key], scope=_in_package_or_contextlib)


def _reserve_body(env: _Env) -> _Attempt:
    env.append(5)
    key, data = env.new(20 + env.round % 23)

    def op() -> None:
        with env.ring.reserve(len(data)) as view:
            view[: HEADER.size] = data[: HEADER.size]  # two steps: a half-written record
            view[HEADER.size :] = data[HEADER.size :]

    return _Attempt(op, [key], scope=lambda code: code is op.__code__)


def _sync(env: _Env) -> _Attempt:
    env.append(3)
    env.append(30)  # an open, non-empty fill: sync seals it
    return _Attempt(lambda: env.ring.sync(timeout=SYNC_TIMEOUT_S), [])


def _close_attached(env: _Env) -> _Attempt:
    before = _slots_in_use(env.name)
    handle = shmflush.attach(env.name)
    env.handles.append(handle)
    for extra in (0, 17):
        key, data = env.book.new(env.role(HANDLE), extra)
        handle.append(data, timeout=APPEND_TIMEOUT_S)
        env.book.done([key])

    def after() -> None:
        started = time.monotonic()
        handle.close()  # must finish what the interrupted close left, and not raise
        elapsed = time.monotonic() - started
        assert elapsed < CLOSE_BOUND_S, f"the second close() took {elapsed:.1f} s"
        assert handle.closed, "the handle is not closed after a second close()"
        try:
            handle.append(b"after close")
        except shmflush.RingClosedError:
            pass
        else:
            raise AssertionError("append on the closed handle did not raise RingClosedError")
        assert _slots_in_use(env.name) == before, "the closed handle kept its writer slot"

    return _Attempt(handle.close, [], after=after)


@dataclass(frozen=True)
class _Scenario:
    prepare: Callable[[_Env], _Attempt]
    create: dict[str, Any] = field(default_factory=dict)
    new_thread: bool = False  # each attempt in a new thread (its first append)
    twice: bool = False  # a second interrupt after the first (see _Tracer)


_SMALL = {"buffer_size": 4096, "buffers": 4}
# Two buffers, for the appends that wait for space.  The flusher is stopped while
# the traced call runs, so its time-based seals cannot change the call's path, and
# a short interval makes it react within a millisecond once it runs again (it
# polls at half the interval, at most every 50 ms).
_TWO = {"buffer_size": 4096, "buffers": 2, "flush_interval": 0.002}
SCENARIOS = {
    "append_fast_path": _Scenario(_append_fast_path, {"buffer_size": 1 << 16}),
    "append_rotates_past_a_sealed_fill": _Scenario(_append_after_seal, _SMALL),
    "append_crosses_the_end_of_a_fill": _Scenario(_append_crossing, _SMALL),
    "append_waits_for_space": _Scenario(_append_waiting, _TWO),
    "append_times_out_waiting_for_space": _Scenario(_append_timing_out, _TWO),
    "first_append_of_a_thread": _Scenario(
        _append_first_of_thread, {"buffer_size": 1 << 16, "max_writers": 8}, new_thread=True
    ),
    "append_many_across_fills": _Scenario(_append_many, _SMALL),
    "append_array_across_fills": _Scenario(_append_array, _SMALL),
    "reserve": _Scenario(_reserve, _SMALL),
    "reserve_with_block_body": _Scenario(_reserve_body, _SMALL),
    "sync": _Scenario(_sync, _SMALL),
    "close_of_an_attached_handle": _Scenario(_close_attached, {**_SMALL, "max_writers": 4}),
    "append_fast_path_interrupted_twice": _Scenario(
        _append_fast_path, {"buffer_size": 1 << 16}, twice=True
    ),
    "append_crossing_interrupted_twice": _Scenario(_append_crossing, _SMALL, twice=True),
}


# -- the runner ------------------------------------------------------------------------


def _attempt(env: _Env, scenario: _Scenario, tracer: _Tracer) -> int:
    """Prepare, run the traced call, then check the thread and the ring go on.

    Returns how many events the tracer counted.  Raises AssertionError, naming the
    injection point, when an outcome breaks a guarantee.
    """
    try:
        attempt = scenario.prepare(env)
    except Exception as exc:
        raise AssertionError(
            f"round {env.round}: getting ready raised {exc!r}, after {env.previous}"
        ) from exc
    tracer.scope = attempt.scope
    outcome = tracer.run(attempt.op)
    where = " then ".join(tracer.fired) or "no event (the call ended first)"
    context = f"round {env.round}, interrupt at event {tracer.fire_at} [{where}]"
    if tracer.fire_at is None:
        context = f"dry run of round {env.round}"
    env.previous = context
    try:
        if attempt.after is not None:
            attempt.after()
    except Exception as exc:
        raise AssertionError(f"{context}: after the call: {exc!r}") from exc
    if outcome is None:
        env.book.done(attempt.keys)
    elif not isinstance(outcome, (_Interrupt, *attempt.allowed)):
        raise AssertionError(
            f"{context}: the call raised {outcome!r} instead of the KeyboardInterrupt"
        ) from outcome
    step = "the first follow-up append"
    try:
        env.append(0)
        step = "the second follow-up append"
        env.append(41)
        step = "another thread's append"
        key, data = env.book.new(env.role(OTHER), env.round % 13)
        env.other.submit(env.ring.append, data, timeout=APPEND_TIMEOUT_S).result(
            timeout=THREAD_JOIN_S
        )
        env.book.done([key])
        step = f"sync(timeout={SYNC_TIMEOUT_S})"
        env.ring.sync(timeout=SYNC_TIMEOUT_S)
    except Exception as exc:
        raise AssertionError(f"{context}: afterwards {step} raised {exc!r}") from exc
    return tracer.events


def _attempt_in_thread(env: _Env, scenario: _Scenario, tracer: _Tracer) -> int:
    result: list[int] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            result.append(_attempt(env, scenario, tracer))
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"writer-{env.round}")
    thread.start()
    thread.join(THREAD_JOIN_S)
    assert not thread.is_alive(), f"round {env.round}: the writer thread did not finish"
    if failure:
        raise failure[0]
    return result[0]


def _next_round(env: _Env, scenario: _Scenario, tracer: _Tracer) -> int:
    env.round += 1
    if scenario.new_thread:
        env.writer = env.role(THREADS + env.round)
        return _attempt_in_thread(env, scenario, tracer)
    env.writer = env.role(MAIN)
    return _attempt(env, scenario, tracer)


def _plan(
    scenario: _Scenario, locations: list[tuple[CodeType, int]]
) -> list[tuple[int, int | None]]:
    points = _fire_points(locations)
    if not scenario.twice:
        return [(k, None) for k in points]
    return [(k, j) for k in _spread(points, DOUBLE_FIRST_POINTS) for j in SECOND_AFTER]


# An interrupt between open() returning and the with statement taking the file (the
# library reads /proc/<pid>/stat that way) leaves the file to the garbage collector:
# a window no Python code can close, and not what these tests are about.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("scenario_id", list(SCENARIOS))
def test_an_interrupt_at_any_bytecode_tears_loses_and_wedges_nothing(
    ring_name: str, tmp_path: Path, scenario_id: str
) -> None:
    """A dry run counts the call's events; then, for each event k, the call runs
    again with KeyboardInterrupt raised at event k, and the same thread appends,
    another thread appends, and sync(timeout=1) must return.  At the end the
    owner's close(timeout=1) must return cleanly and the file is checked record
    by record.

    Thinned, deterministically, to keep the module within about a minute (the
    rotating, waiting and batch calls run one to three thousand events): every
    event up to EXHAUSTIVE_EVENTS (400), then the first event at each instruction
    not met before (a loop's later passes run the same bytecodes), spread evenly
    down to MAX_FIRE_POINTS (1200) in all if there are more.  The double-interrupt
    scenarios take DOUBLE_FIRST_POINTS (60) of those, spread evenly, each with
    every second-interrupt offset in SECOND_AFTER.
    """
    scenario = SCENARIOS[scenario_id]
    path = tmp_path / "log"
    kwargs: dict[str, Any] = {
        "buffers": 4,
        "lanes": 1,
        "flush_interval": 60,  # no time-based seal: each round takes the same path
        "sync": "none",  # written is enough here; fdatasync would only cost time
        "recovery_timeout": RECOVERY_TIMEOUT_S,
        **scenario.create,
    }
    number = list(SCENARIOS).index(scenario_id) + 1
    ring = shmflush.create(ring_name, path, **kwargs)
    other = ThreadPoolExecutor(max_workers=1, thread_name_prefix="other-writer")
    env = _Env(number, ring_name, ring, _Book(), other)
    try:
        env.writer = env.role(MAIN)
        env.append(0)
        ring.sync(timeout=SYNC_TIMEOUT_S)
        dry = _Tracer(_in_package)
        assert _next_round(env, scenario, dry) > 0, (
            "the dry run traced no event: the scope matches no library code"
        )
        for k, j in _plan(scenario, dry.locations):
            _next_round(env, scenario, _Tracer(_in_package, k, j))
        started = time.monotonic()
        ring.close(timeout=CLOSE_TIMEOUT_S)
        elapsed = time.monotonic() - started
        assert elapsed < CLOSE_BOUND_S, f"the owner's close(timeout=1) took {elapsed:.1f} s"
    finally:
        sys.settrace(None)
        sys.setprofile(None)
        _continue_flusher(env)
        for handle in env.handles:
            with contextlib.suppress(Exception):
                handle.close()
        with contextlib.suppress(Exception):
            ring.close(timeout=CLOSE_TIMEOUT_S)
        other.shutdown(wait=True)
    _check_file(path, env.book)


# -- a real signal ---------------------------------------------------------------------

ALARM_PERIOD_S = 0.001
ALARM_WRITER = 7
ALARM_RUN_S = 1.5
ALARM_MIN_INTERRUPTS = 50  # below this the test would prove little
CHILD_DEADLINE_S = 60.0


class _AlarmError(Exception):
    """Raised by the spawned writer's SIGALRM handler."""


# True while the spawned writer is between unblocking SIGALRM and blocking it
# again around ring.append.  CPython runs a Python handler at a bytecode
# boundary after the C handler ran, which can fall after the call returned;
# the handler then raises only inside the window, so the test's own
# bookkeeping is never the one interrupted.
_in_window = [False]


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _in_window[0]:
        raise _AlarmError


def _alarm_extra(seq: int) -> int:
    # Mostly small records, every 50th near a quarter buffer, so fills cross often.
    return 1000 if seq % 50 == 0 else seq * 37 % 200


def _append_under_alarms(ring: shmflush.Ring, conn: Any, seconds: float) -> None:
    """Spawned writer: appends while SIGALRM raises _AlarmError every millisecond.

    The signal is unblocked only around ``ring.append``, so the exception can land
    only inside the call (or the two pthread_sigmask calls, which then runs the
    handler), never in this loop's bookkeeping.  The child has no other thread
    that could take the signal while the main thread blocks it.
    """
    alarm = {signal.SIGALRM}
    signal.pthread_sigmask(signal.SIG_BLOCK, alarm)
    signal.signal(signal.SIGALRM, _on_alarm)
    acked: list[int] = []
    interrupts = 0
    error: str | None = None
    seq = 0
    # Every thread the kernel could pick for the signal, not only Python's:
    # numpy's BLAS starts its own at import (the test turns them off).
    threads = len(os.listdir("/proc/self/task"))
    signal.setitimer(signal.ITIMER_REAL, ALARM_PERIOD_S, ALARM_PERIOD_S)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = _payload(ALARM_WRITER, seq, _alarm_extra(seq))
            seq += 1
            returned = False
            try:
                try:
                    # Inside the try: a handler that runs as the unblock call
                    # returns raises from it, and the finally blocks again.
                    _in_window[0] = True
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, alarm)
                    ring.append(data, timeout=APPEND_TIMEOUT_S)
                    returned = True
                finally:
                    _in_window[0] = False
                    signal.pthread_sigmask(signal.SIG_BLOCK, alarm)
            except _AlarmError:
                interrupts += 1
            except Exception as exc:
                error = f"append of seq {seq - 1} raised {exc!r}"
                break
            if returned:
                acked.append(seq - 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
    conn.send((seq, acked, interrupts, error, threads))
    conn.close()
    ring.close()


def test_appends_interrupted_by_a_real_signal_tear_lose_and_wedge_nothing(
    ring_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    # A BLAS worker thread (numpy starts one at import) does not block SIGALRM:
    # the kernel would hand it the signals the main thread blocks, and the
    # handler would then run anywhere in the writer's loop.  One thread only.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    ctx = multiprocessing.get_context("spawn")
    ring = shmflush.create(
        ring_name,
        path,
        buffer_size=4096,
        buffers=4,
        lanes=1,
        sync="none",
        recovery_timeout=RECOVERY_TIMEOUT_S,
    )
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_append_under_alarms, args=(ring, sender, ALARM_RUN_S))
    try:
        child.start()
        sender.close()
        assert receiver.poll(CHILD_DEADLINE_S), "the writer reported nothing in time"
        seqs, acked, interrupts, error, threads = receiver.recv()
        child.join(CHILD_DEADLINE_S)
        assert child.exitcode == 0, f"the writer exited with {child.exitcode}"
        started = time.monotonic()
        try:
            ring.close(timeout=CLOSE_TIMEOUT_S)
        except shmflush.ShmflushError as exc:
            close_error: Exception | None = exc
        else:
            close_error = None
        elapsed = time.monotonic() - started
    finally:
        if child.is_alive():
            child.kill()
            child.join(THREAD_JOIN_S)
        receiver.close()
        with contextlib.suppress(Exception):
            ring.close(timeout=CLOSE_TIMEOUT_S)
    assert threads == 1, f"the writer had {threads} threads; one could take the signal"
    assert error is None, f"under SIGALRM every {ALARM_PERIOD_S * 1e3:.0f} ms: {error}"
    assert interrupts >= ALARM_MIN_INTERRUPTS, f"only {interrupts} appends were interrupted"
    assert close_error is None, f"the owner's close(timeout=1) raised {close_error!r}"
    assert elapsed < CLOSE_BOUND_S, f"the owner's close(timeout=1) took {elapsed:.1f} s"
    book = _Book()
    for seq in range(seqs):
        key, _ = book.new(ALARM_WRITER, _alarm_extra(seq))
        assert key == (ALARM_WRITER, seq)
    book.done([(ALARM_WRITER, seq) for seq in acked])
    _check_file(path, book)
