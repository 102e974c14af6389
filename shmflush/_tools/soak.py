"""``scripts/soak.py``: abuse writers and the flusher at random under a live load, the
way real users do, then check the file record by record.

This process is the ring's owner.  It keeps a pool of writer processes appending
(``append``, ``reserve`` and ``append_many`` batches, with an occasional
``sync``) and, every so often, does one of these to a random victim:

* SIGKILL a writer process (which it replaces with a new one) or the flusher
  (which the owner's watchdog restarts);
* inject an exception into a writer: SIGUSR1, whose handler raises ``_Injected``
  in the writer's main thread or sends it to one of its appending threads, or
  SIGINT, which raises ``KeyboardInterrupt`` like Ctrl-C.  The writer catches it
  around the operation and goes on appending;
* SIGSTOP a writer for 0.05 to 1 s, then SIGCONT it.

The ring's geometry is picked per run, mostly the ``create()`` defaults (what
users run), sometimes small or large buffers; record sizes run from 0 bytes to
a good part of a buffer.  About half the writer processes churn threads: each
thread appends for a short while and exits, and new ones keep starting, so
writer slots are taken and given back all the time.

Every thread appends under a writer id of its own (process index * 65536 +
thread number; thread 0 is the process's main thread), so the sequence numbers
of one id belong to one thread, in order.  After each operation returns, the
thread acknowledges the sequence numbers it covered through a pipe: 12 bytes in
one write(2) (atomic, being under PIPE_BUF).  An operation an exception
interrupted is never acknowledged, and its sequence numbers are never used
again: its records may or may not be in the file, but never torn or twice.  The
owner thus knows, per writer id, the highest sequence number acknowledged and
the stretches below it that were not.

At the end the owner stops the writers, syncs, closes the ring and reads the file
back (strictly).  An acknowledged record that is missing is *lost*; a record
seen twice is *duplicated*; a record of one writer that comes before one with a
higher sequence number is *out of order*; a record whose bytes are not what its
writer wrote is *corrupt*.  A record that is in the file but was never
acknowledged (its writer died or was interrupted while appending it) is allowed.
Records shorter than the 12-byte (writer id, seq) header cannot say whose they
are: they are checked for content, and counted.  The records and the check are
the tools' shared workload (mixed sizes) and checker (partial expectations:
:mod:`shmflush._tools.workload`, :mod:`shmflush._tools.checker`).  The one-line
verdict goes to stdout; progress and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

import shmflush

from .. import _format, _proc, _supervisor
from .. import _layout as L
from .._api import _default_lanes
from .._ring import Ring, attach_ring
from .checker import Expected, Verdict
from .checker import check_file as checker_check_file
from .workload import HEADER, MAX_LARGE, Workload

# -- the records -------------------------------------------------------------------

# The records are the tools' mixed workload (shmflush._tools.workload): every
# record of 12 bytes or more starts with (writer id, sequence number).  The
# acknowledgements use the same struct: (writer id, first seq | count << 48).
_SEQ_BITS = 48
_SEQ_MASK = (1 << _SEQ_BITS) - 1
# Writer ids: process index * _IDS_PER_PROCESS + thread number (0: main thread).
# Id 0 is no writer: its messages are events (_EVENT_*), value = kind << 48 | index.
_IDS_PER_PROCESS = 1 << 16
_MAX_PROCESSES = (1 << 32) // _IDS_PER_PROCESS
_EVENT_READY = 1  # the process has its signal handlers: exceptions may be injected
_EVENT_IN_OP = 2  # an injected exception landed inside an operation and was caught
_EVENT_ESCAPED = 3  # one landed between a thread's operations and ended the thread
_EVENT_IN_LIBRARY = 4  # one landed inside shmflush's code (also an _EVENT_IN_OP)

# The most records one operation appends (append_many).
_MAX_BATCH = 8


def large_limit(buffer_size: int) -> int:
    """The largest record the soak appends to a ring of *buffer_size*: 64 KiB, or
    half of what a buffer can hold if that is less."""
    capacity = buffer_size - _format.SEGMENT_HEADER_SIZE - _format.RECORD_HEADER_SIZE
    return max(HEADER.size, min(MAX_LARGE, capacity // 2))


def workload(large: int) -> Workload:
    """The soak's records (mixed sizes, up to *large*) in the tools' workload."""
    return Workload(mixed=True, large=large)


# -- the writer process ------------------------------------------------------------

# Writers give up on an append after this long: a wedged ring then shows up as
# writer errors instead of a silent hang.
_APPEND_TIMEOUT_S = 60.0
# Writers look at the stop file once per this many operations.
_STOP_CHECK_EVERY = 16
# A stopping writer process waits this long for its threads.
_THREAD_JOIN_S = 8.0
# A churning process keeps this many threads appending; each does this many
# operations, then exits.
_THREADS = (2, 6)
_THREAD_OPS = (1, 60)
_RETIRED = 3  # exit status: the process used up its writer ids; replace it
_PR_SET_PDEATHSIG = 1

_WRITER_CODE = (
    "import sys; from shmflush._tools.soak import writer_main; sys.exit(writer_main(sys.argv[1:]))"
)


class _Injected(Exception):  # noqa: N818  (an interrupt, like KeyboardInterrupt)
    """The exception the soak injects into a writer's append (SIGUSR1)."""


class _Sequence:
    """The records of one writer id, appended by one thread, in order."""

    __slots__ = ("armed", "ident", "rng", "seq", "writer_id")

    def __init__(self, writer_id: int, seed: int) -> None:
        self.writer_id = writer_id
        self.seq = 0  # the next sequence number; never reused, even if interrupted
        self.rng = random.Random(seed)
        # True while the thread is inside an operation (its try block): only then
        # may an injected exception land, so the writer always knows what it hit.
        self.armed = False
        self.ident = 0  # the appending thread's identifier


class _WriterProcess:
    """One writer process: its main thread appends, and (churning) starts threads
    that append for a while and exit."""

    def __init__(self, ring: shmflush.Ring, argv: Sequence[str]) -> None:
        _, index, fd, stop, seed, batches, churn, large = argv
        self.ring = ring
        self.index, self.fd, self.stop_path = int(index), int(fd), stop
        self.large = int(large)
        self.record = workload(self.large).record
        self.churn = churn == "1"
        self.batch_share = 0.25 if batches == "1" else 0.0
        self.rng = random.Random(int(seed))
        self.parent = os.getppid()
        self.next_thread = 0
        self.main = self.new_sequence()
        self.main.ident = threading.get_ident()
        self.workers: list[tuple[threading.Thread, _Sequence]] = []
        self.stopping = False
        self.failure: BaseException | None = None
        self.failure_lock = threading.Lock()

    def new_sequence(self) -> _Sequence:
        writer_id = self.index * _IDS_PER_PROCESS + self.next_thread
        self.next_thread += 1
        return _Sequence(writer_id, self.rng.getrandbits(63))

    # -- injected exceptions ---------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1 and SIGINT: raise in the main thread, or (SIGUSR1, half the time
        in a churning process) in an appending thread, if it is inside an
        operation; otherwise do nothing.

        Python runs this in the main thread between two bytecodes, so the main
        thread's ``armed`` is exact.  A thread gets the exception asynchronously
        (PyThreadState_SetAsyncExc) at its next check, which is almost always
        still inside the operation; if not, it ends the thread (_EVENT_ESCAPED).
        The target is disarmed first, so one operation takes one exception.
        """
        if signum == signal.SIGUSR1 and (not self.main.armed or self.rng.random() < 0.5):
            armed = [s for _, s in self.workers if s.armed]
            if armed:
                target = self.rng.choice(armed)
                target.armed = False
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(target.ident), ctypes.py_object(_Injected)
                )
                return
        if self.main.armed:
            self.main.armed = False
            raise KeyboardInterrupt if signum == signal.SIGINT else _Injected()

    def event(self, kind: int) -> None:
        os.write(self.fd, HEADER.pack(0, kind << _SEQ_BITS | self.index))

    # -- appending -------------------------------------------------------------

    def step(self, s: _Sequence) -> None:
        """One operation of *s*, armed: an injected exception is caught here, and
        the next operation goes on with the next sequence number."""
        try:
            s.armed = True  # inside the try: whatever lands from here on is caught
            self.operate(s)
            s.armed = False
        except (_Injected, KeyboardInterrupt) as exc:
            s.armed = False
            self.event(_EVENT_IN_OP)
            if _landed_in_library(exc):
                self.event(_EVENT_IN_LIBRARY)
        except BaseException:
            # A real failure: the process ends, and no signal may raise in the
            # code that winds it up.
            s.armed = False
            raise

    def operate(self, s: _Sequence) -> None:
        ring, rng, writer_id, record_of = self.ring, s.rng, s.writer_id, self.record
        timeout = _APPEND_TIMEOUT_S
        roll = rng.random()
        first = s.seq
        # The sequence numbers are taken before the operation starts: if it is
        # interrupted, they are not used again (their records may be in the file).
        if roll < 0.75 - self.batch_share:
            count = 1
            s.seq = first + 1
            ring.append(record_of(writer_id, first), timeout=timeout)
        elif roll < 1.0 - self.batch_share:
            count = 1
            s.seq = first + 1
            record = record_of(writer_id, first)
            with ring.reserve(len(record), timeout=timeout) as view:
                # Two stores, like a caller building its record in place.
                view[: HEADER.size] = record[: HEADER.size]
                view[HEADER.size :] = record[HEADER.size :]
        else:
            count = rng.randint(2, _MAX_BATCH)
            s.seq = first + count
            ring.append_many(
                [record_of(writer_id, q) for q in range(first, first + count)],
                timeout=timeout,
            )
        os.write(self.fd, HEADER.pack(writer_id, first | count << _SEQ_BITS))
        if roll > 0.997:
            ring.sync(timeout=timeout)

    def should_stop(self) -> bool:
        if self.failure is not None or os.path.exists(self.stop_path):
            return True
        return os.getppid() != self.parent

    def run(self) -> int:
        """Append until told to stop; returns the exit status."""
        self.event(_EVENT_READY)
        try:
            status = self.load()
        finally:
            # Whatever ended the load, no thread may use the ring once it closes.
            self.stopping = True
            joined = self.join()
        return joined or status

    def load(self) -> int:
        ops = 0
        width = self.rng.randint(*_THREADS) if self.churn else 0
        while not (ops % _STOP_CHECK_EVERY == 0 and self.should_stop()):
            ops += 1
            if width:
                self.workers = [w for w in self.workers if w[0].is_alive()]
                while len(self.workers) < width:
                    if self.next_thread >= _IDS_PER_PROCESS:
                        return _RETIRED
                    self.start_thread()
            self.step(self.main)
        return 0

    def start_thread(self) -> None:
        s = self.new_sequence()
        ops = self.rng.randint(*_THREAD_OPS)
        thread = threading.Thread(target=self.thread_main, args=(s, ops), daemon=True)
        thread.start()
        self.workers.append((thread, s))

    def thread_main(self, s: _Sequence, ops: int) -> None:
        s.ident = threading.get_ident()
        try:
            for _ in range(ops):
                if self.stopping:
                    break
                self.step(s)
        except _Injected:
            # Sent just as the thread left an operation: it only ends early.
            with contextlib.suppress(_Injected):
                self.event(_EVENT_ESCAPED)
        except BaseException as exc:
            with self.failure_lock:
                if self.failure is None:
                    self.failure = exc
                    print(
                        f"soak: writer {s.writer_id} (thread) failed:\n"
                        + "".join(traceback.format_exception(exc)),
                        file=sys.stderr,
                        flush=True,
                    )

    def join(self) -> int:
        """Wait for the threads; the exit status: 0, or 1 if any failed or hangs."""
        deadline = time.monotonic() + _THREAD_JOIN_S
        for thread, s in self.workers:
            thread.join(max(deadline - time.monotonic(), 0.01))
            if thread.is_alive():
                print(f"soak: writer {s.writer_id} (thread) did not stop", file=sys.stderr)
                os._exit(1)  # closing the ring under a running thread could crash
        return 1 if self.failure is not None else 0


_TOOLS = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIBRARY = os.path.dirname(_TOOLS.rstrip(os.sep)) + os.sep


def _landed_in_library(exc: BaseException) -> bool:
    """Whether *exc* was raised in shmflush's own code (not the tools', not the
    standard library's): the innermost frame of its traceback, the signal
    handler's excepted."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code is not _WriterProcess.on_signal.__code__:
            where = code.co_filename
        tb = tb.tb_next
    where = os.path.abspath(where)
    return where.startswith(_LIBRARY) and not where.startswith(_TOOLS)


def writer_main(argv: Sequence[str]) -> int:
    """Body of one writer process:
    ``NAME INDEX ACK_FD STOP_FILE SEED BATCHES CHURN LARGE``.

    Appends under writer ids ``INDEX * 65536 + thread number`` until the stop file
    appears (or its parent goes away), acknowledging each operation that returned
    on ACK_FD.  Injected exceptions (SIGUSR1, SIGINT) are caught around each
    operation; any other error makes the process exit non-zero, and the soak
    counts it.  Exit status 3: the process used up its writer ids.
    """
    parent = os.getppid()
    # Die with the owner, even while stopped: a SIGSTOPped orphan would never
    # look at its parent again.
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 0
    ring = shmflush.attach(argv[0])
    writer = _WriterProcess(ring, argv)
    # Python's own SIGINT handler raises KeyboardInterrupt at any bytecode, the
    # writer's bookkeeping included, where the soak could not tell what it hit;
    # this one raises it only inside an operation, which is what the soak tests.
    signal.signal(signal.SIGUSR1, writer.on_signal)
    signal.signal(signal.SIGINT, writer.on_signal)
    try:
        return writer.run()
    finally:
        # From here on a late signal must not decide the exit status: Python puts
        # back the default handlers (which kill) while it shuts down, unless the
        # signal is ignored.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ring.close()


# -- checking the file ---------------------------------------------------------------

_EXAMPLES = 5


def check_file(
    path: str,
    acked: Mapping[int, int],
    known: Callable[[int], bool],
    *,
    unacked: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    large: int = MAX_LARGE,
    strict: bool = True,
) -> Verdict:
    """Read *path* and compare it with the acknowledgements, with the tools' checker.

    *acked* maps a writer id to the highest sequence number acknowledged (writers
    that acknowledged nothing may be absent); *unacked* maps a writer id to the
    sorted, disjoint stretches ``[lo, hi)`` below that which were not
    acknowledged (interrupted operations): their records may be missing.
    *known* tells whether a writer id was ever started; *large* is the
    ``large_limit`` the writers used.  Writers were killed, so records past what
    one acknowledged may be in the file (``unreported``), never torn or twice.
    """
    expected = Expected(
        {w: top + 1 for w, top in acked.items()},
        unreported=unacked or {},
        writers=known,
        complete=False,
    )
    return checker_check_file(path, workload(large), expected, strict=strict)


class Acks:
    """The acknowledgements as the owner receives them, per writer id.

    ``top``: the highest sequence number acknowledged; ``holes``: the stretches
    ``[lo, hi)`` below it that never were (an interrupted operation, or one whose
    acknowledgement an exception cut short); ``count``: records acknowledged.
    A thread acknowledges its operations in order, so a stretch it skips is a
    hole for good.
    """

    def __init__(self) -> None:
        self.top: dict[int, int] = {}
        self.holes: dict[int, list[tuple[int, int]]] = {}
        self.count = 0
        self.errors: list[str] = []

    def add(self, writer_id: int, first: int, count: int) -> None:
        """Operation ``first .. first + count - 1`` of *writer_id* returned."""
        top = self.top.get(writer_id, -1)
        if first != top + 1:
            if first <= top or count < 1:
                self.errors.append(
                    f"writer {writer_id} acknowledged seq {first}+{count} after {top}"
                )
                return
            self.holes.setdefault(writer_id, []).append((top + 1, first))
        self.top[writer_id] = first + count - 1
        self.count += count

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Take in whole 12-byte messages from the front of *data* (the caller keeps
        the rest); returns the events among them, as (kind, process index)."""
        events: list[tuple[int, int]] = []
        tops, holes = self.top, self.holes
        counted = 0
        # add(), inlined: the owner has to keep up with every writer thread.
        for writer_id, value in HEADER.iter_unpack(data[: len(data) - len(data) % HEADER.size]):
            if not writer_id:
                events.append((value >> _SEQ_BITS, value & _SEQ_MASK))
                continue
            first, count = value & _SEQ_MASK, value >> _SEQ_BITS
            top = tops.get(writer_id, -1)
            if first != top + 1:
                if first <= top or count < 1:
                    self.add(writer_id, first, count)  # records the error
                    continue
                holes.setdefault(writer_id, []).append((top + 1, first))
            tops[writer_id] = first + count - 1
            counted += count
        self.count += counted
        return events


# -- the owner ---------------------------------------------------------------------

_STOP_FILE = "stop"
_LOG_FILE = "soak.log"
_STOP_GRACE_S = 10.0
_REAP_S = 30.0  # a SIGKILLed process is gone long before this
_CLOSE_TIMEOUT_S = 120.0
# The final sync: recovery of a dead writer's claim takes well under a second.
_SYNC_TIMEOUT_S = 30.0
_PROGRESS_EVERY_S = 10.0
# No acknowledgement for this long while writers run: dump the ring's state.
_STALL_S = 20.0
# A buffer whose state, fill and commits stay the same this long under one live
# flusher, while recovery settles a dead writer's claim within recovery_timeout
# (0.2 s) and no writer is stopped for more than _PAUSE_S, is stuck: dump the ring.
_STUCK_S = 5.0
# A restarted flusher is a new Python process: on a loaded machine it takes a
# second or two to start.  No live flusher for this long is an error.
_DOWN_S = 15.0
# Share of kills aimed at the flusher rather than a writer.
_FLUSHER_SHARE = 0.2
# How long a SIGSTOPped writer stays stopped.
_PAUSE_S = (0.05, 1.0)


@dataclass(frozen=True)
class Geometry:
    """The ring's shape; ``None`` leaves a parameter to ``create()``'s default."""

    buffer_size: int | None = None
    buffers: int | None = None
    lanes: int | None = None

    @property
    def is_default(self) -> bool:
        return self.buffer_size is None and self.buffers is None and self.lanes is None

    def resolved(self) -> tuple[int, int, int]:
        """(buffer_size, buffers, lanes) as ``create()`` will make them."""
        defaults = inspect.signature(shmflush.create).parameters
        buffer_size = self.buffer_size or int(defaults["buffer_size"].default)
        buffers = self.buffers or int(defaults["buffers"].default)
        return buffer_size, buffers, self.lanes or _default_lanes(buffers)

    def label(self) -> str:
        """``1M/8/1``: buffer size, buffers, lanes."""
        buffer_size, buffers, lanes = self.resolved()
        return f"{_size_label(buffer_size)}/{buffers}/{lanes}"


# --geometry random: the create() defaults (what users run) well over half the
# time, else one of these, from the smallest buffer to four times the default.
_DEFAULT_WEIGHT = 65
_GEOMETRIES = (
    (Geometry(4 << 10, 8, 2), 6),
    (Geometry(16 << 10, 8, 2), 7),
    (Geometry(64 << 10, 4, 1), 5),
    (Geometry(256 << 10, 16, 4), 6),
    (Geometry(1 << 20, 2, 1), 5),
    (Geometry(4 << 20, 4, 2), 6),
)


def pick_geometry(seed: int) -> Geometry:
    """The geometry of a ``--geometry random`` run with *seed*."""
    choices = [(Geometry(), _DEFAULT_WEIGHT), *_GEOMETRIES]
    rng = random.Random(f"geometry:{seed}")
    return rng.choices([g for g, _ in choices], [w for _, w in choices])[0]


def _size_label(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass
class _Incarnation:
    """One writer process."""

    index: int  # its writer ids are index * _IDS_PER_PROCESS + thread number
    churn: bool
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False  # its signal handlers are in place
    stopped_until: float = 0.0  # SIGSTOPped until then (0: running)
    ended: float = 0.0
    end: str = ""  # "killed", "stopped", "retired", "exit N", "straggler"


class _Soak:
    def __init__(
        self, args: argparse.Namespace, path: str, stop_path: str, geometry: Geometry
    ) -> None:
        self.args = args
        self.name: str = args.name
        self.path = path
        self.stop_path = stop_path
        self.geometry = geometry
        self.large = large_limit(geometry.resolved()[0])
        self.rng = random.Random(args.seed)
        self.ring: shmflush.Ring | None = None
        self.running: list[_Incarnation] = []
        self.history: dict[int, _Incarnation] = {}  # process index -> incarnation
        self.next_index = 1
        self.acks = Acks()
        self.acked = self.acks.top  # writer id -> highest seq acknowledged
        self.ack_read = -1
        self.ack_write = -1
        self.ack_thread: threading.Thread | None = None
        self.writer_kills = 0
        self.flusher_kills: list[tuple[float, int]] = []  # (time, pid)
        self.injected = 0  # SIGUSR1 and SIGINT sent
        self.in_ops = 0  # injected exceptions caught inside an operation
        self.in_library = 0  # of those, the ones raised inside shmflush's own code
        self.escaped = 0  # injected exceptions that ended a thread between operations
        self.stops = 0  # SIGSTOPs sent
        self.errors: list[str] = []
        self.watch: Ring | None = None  # our own mapping, to look at the state words
        self.stuck_seen: dict[int, tuple[tuple[int, int, int, int], float]] = {}
        self.down_since = 0.0  # when the ring last lost its live flusher (0: it has one)
        self.down_max = 0.0  # longest time without a live flusher
        self.down_periods = 0
        self.down_reported = False
        self.stuck_reported: set[tuple[int, int]] = set()  # (buffer, fill)
        self.began = time.monotonic()
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # Only the soak kills: a crash point inherited from the environment would
        # make writers die in ways the acknowledgements cannot describe.
        env.pop("SHMFLUSH_CRASH_AT", None)
        self.env = env

    # -- set-up and tear-down ------------------------------------------------------

    def start(self) -> None:
        g = self.geometry
        if g.is_default:
            # What users run: nothing about the shape passed at all.
            self.ring = shmflush.create(
                self.name, self.path, flush_interval=0.01, recovery_timeout=0.2
            )
        else:
            buffer_size, buffers, _ = g.resolved()
            self.ring = shmflush.create(
                self.name,
                self.path,
                buffer_size,
                buffers,
                lanes=g.lanes,
                flush_interval=0.01,
                recovery_timeout=0.2,
            )
        self.watch = attach_ring(self.name)
        self.ack_read, self.ack_write = os.pipe2(os.O_CLOEXEC)
        self.ack_thread = threading.Thread(target=self._read_acks, name="soak-acks", daemon=True)
        self.ack_thread.start()
        for _ in range(self.args.writers):
            self._spawn()

    def _read_acks(self) -> None:
        # Runs until every write end is closed: ours (after the writers stop) and
        # the writers' (when they exit).
        pending = b""
        while chunk := os.read(self.ack_read, HEADER.size * 5000):
            data = pending + chunk
            for kind, index in self.acks.feed(data):
                self._on_event(kind, index)
            pending = data[len(data) - len(data) % HEADER.size :]

    def _on_event(self, kind: int, index: int) -> None:
        if kind == _EVENT_READY:
            inc = self.history.get(index)
            if inc is not None:
                inc.ready = True
        elif kind == _EVENT_IN_OP:
            self.in_ops += 1
        elif kind == _EVENT_ESCAPED:
            self.escaped += 1
        elif kind == _EVENT_IN_LIBRARY:
            self.in_library += 1
        else:
            self.errors.append(f"writer process {index} sent unknown event {kind}")

    def _spawn(self) -> None:
        index = self.next_index
        if index >= _MAX_PROCESSES:
            raise RuntimeError(f"the soak ran out of writer ids after {index} processes")
        self.next_index += 1
        seed = self.rng.getrandbits(63)
        churn = self.rng.random() < self.args.churn_share
        argv = [self.name, str(index), str(self.ack_write), self.stop_path, str(seed)]
        argv += ["1" if self.args.batches else "0", "1" if churn else "0", str(self.large)]
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER_CODE, *argv],
            pass_fds=(self.ack_write,),
            stdin=subprocess.DEVNULL,
            env=self.env,
            # The owner stops the writers itself; a terminal's Ctrl-C must not.
            start_new_session=True,
        )
        incarnation = _Incarnation(index, churn, proc, time.monotonic())
        self.running.append(incarnation)
        self.history[index] = incarnation

    def known(self, writer_id: int) -> bool:
        """Whether *writer_id* belongs to a writer process this soak started."""
        return writer_id // _IDS_PER_PROCESS in self.history

    def _continue_all(self) -> None:
        for inc in self.running:
            if inc.stopped_until:
                inc.stopped_until = 0.0
                with contextlib.suppress(OSError):
                    inc.proc.send_signal(signal.SIGCONT)

    def stop_writers(self) -> None:
        """Ask the writers to stop, kill the ones that do not, and reap them all."""
        self._continue_all()
        with open(self.stop_path, "wb"):
            pass
        deadline = time.monotonic() + _STOP_GRACE_S
        for inc in self.running:
            try:
                code = inc.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                inc.proc.kill()
                inc.proc.wait(_REAP_S)
                inc.end = "straggler"
                self.errors.append(
                    f"writer process {inc.index} did not stop within {_STOP_GRACE_S} s"
                )
            else:
                inc.end = {0: "stopped", _RETIRED: "retired"}.get(code, f"exit {code}")
                if code not in (0, _RETIRED):
                    self.errors.append(f"writer process {inc.index} exited with status {code}")
            inc.ended = time.monotonic()
        self.running = []

    def drain_acks(self) -> None:
        if self.ack_write >= 0:
            os.close(self.ack_write)
            self.ack_write = -1
        if self.ack_thread is not None:
            self.ack_thread.join(30)
            if self.ack_thread.is_alive():
                self.errors.append("the acknowledgement pipe did not reach end of file")
        self.errors.extend(self.acks.errors)
        self.acks.errors = []

    def cleanup(self) -> None:
        """Idempotent; runs whatever happened before."""
        self._continue_all()
        for inc in self.running:
            with contextlib.suppress(OSError):
                inc.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                inc.proc.wait(10)
        self.running = []
        if self.watch is not None:
            self.watch.unmap()
            self.watch = None
        if self.ring is not None:
            try:
                self.ring.close(timeout=_CLOSE_TIMEOUT_S)
            except shmflush.ShmflushError as exc:
                self.errors.append(f"close: {exc}")
        if self.ack_write >= 0:
            os.close(self.ack_write)
            self.ack_write = -1
        if self.ack_thread is not None:
            self.ack_thread.join(10)
        if self.ack_read >= 0 and (self.ack_thread is None or not self.ack_thread.is_alive()):
            os.close(self.ack_read)
            self.ack_read = -1

    # -- the load and the events ---------------------------------------------------

    def run(self, seconds: float) -> None:
        ring = self.ring
        assert ring is not None
        rng = self.rng
        mean = self.args.event_interval
        self.began = now = time.monotonic()
        end = now + seconds
        next_event = now + rng.expovariate(1 / mean)
        next_progress = now + _PROGRESS_EVERY_S
        last_acked, last_progress_at, dumped = -1, now, False
        while now < end:
            wake = min(next_event, end, now + 0.05)
            for inc in self.running:
                if inc.stopped_until:
                    wake = min(wake, inc.stopped_until)
            time.sleep(max(wake - now, 0.0))
            now = time.monotonic()
            self._continue_due(now)
            self._replace_exited()
            if now >= next_event and now < end:
                self._event(now)
                next_event = time.monotonic() + rng.expovariate(1 / mean)
            if now >= next_progress:
                next_progress += _PROGRESS_EVERY_S
                self._progress(now)
            self._look_for_stuck_buffers(now)
            acked = self.appended
            if acked != last_acked:
                last_acked, last_progress_at, dumped = acked, now, False
            elif now - last_progress_at > _STALL_S and not dumped:
                dumped = True
                print(f"soak: no append acknowledged for {_STALL_S:.0f} s:", file=sys.stderr)
                print(describe_ring(self.name, self.pids()), file=sys.stderr, flush=True)

    def _event(self, now: float) -> None:
        roll = self.rng.random()
        if roll < self.args.exception_share:
            self._inject()
        elif roll < self.args.exception_share + self.args.stop_share:
            self._pause(now)
        elif self.rng.random() < _FLUSHER_SHARE:
            self._kill_flusher()
        else:
            self._kill_writer()

    @property
    def appended(self) -> int:
        """Records acknowledged so far."""
        return self.acks.count

    def _progress(self, now: float) -> None:
        ring = self.ring
        assert ring is not None
        stats = ring.stats()
        print(
            f"soak: {now - self.began:.0f}s kills={self.writer_kills + len(self.flusher_kills)} "
            f"(writers={self.writer_kills} flusher={len(self.flusher_kills)}) "
            f"appended={self.appended} flushed={stats.buffers_flushed} "
            f"recovered={stats.recovered} restarts={stats.flusher_restarts} "
            f"injected={self.injected} (in_ops={self.in_ops} in_library={self.in_library}) "
            f"stops={self.stops} "
            f"threads={self.threads} flusher_down_max={self.down_max:.1f}s "
            f"errors={len(self.errors)}",
            file=sys.stderr,
            flush=True,
        )

    @property
    def threads(self) -> int:
        """Threads other than main threads that acknowledged at least one record."""
        return sum(1 for w in list(self.acked) if w % _IDS_PER_PROCESS)

    def pids(self) -> dict[int, int]:
        return {inc.proc.pid: index for index, inc in self.history.items()}

    def _watch_flusher(self, now: float) -> int:
        """Track how long the ring goes without a live flusher; returns the live
        flusher's pid, or 0 if there is none."""
        core = self.watch
        if core is None:
            return 0
        pid = _supervisor.flusher_pid(core)
        if pid:
            if self.down_since:
                self.down_periods += 1
                self.down_max = max(self.down_max, now - self.down_since)
                self.down_since = 0.0
            return pid
        if not self.down_since:
            self.down_since = now
        elif now - self.down_since > _DOWN_S and not self.down_reported:
            self.down_reported = True
            self.errors.append(f"no live flusher for {_DOWN_S:.0f} s")
            print(
                f"soak: {now - self.began:.1f}s: no live flusher for {_DOWN_S:.0f} s:\n"
                f"{describe_ring(self.name, self.pids())}",
                file=sys.stderr,
                flush=True,
            )
        return 0

    def _look_for_stuck_buffers(self, now: float) -> None:
        core = self.watch
        flusher = self._watch_flusher(now)
        if core is None or not flusher:
            # Without a live flusher nothing moves; that is restart time, which
            # _watch_flusher accounts for.
            self.stuck_seen.clear()
            return
        for i in range(core.geometry.buffers):
            st = core.state(i)
            if st & L.IDLE:
                self.stuck_seen.pop(i, None)
                continue
            fill = core.words[core.fill_w[i]]
            signature = (st, fill, core.committed(i), flusher)
            seen = self.stuck_seen.get(i)
            if seen is None or seen[0] != signature:
                self.stuck_seen[i] = (signature, now)
            elif now - seen[1] > _STUCK_S and (i, fill) not in self.stuck_reported:
                self.stuck_reported.add((i, fill))
                self.errors.append(f"buffer {i} stuck at fill {fill} for {_STUCK_S:.0f} s")
                print(
                    f"soak: {now - self.began:.1f}s: buffer {i} fill {fill} has not moved for "
                    f"{_STUCK_S:.0f} s under flusher {flusher}:\n"
                    f"{describe_ring(self.name, self.pids())}",
                    file=sys.stderr,
                    flush=True,
                )

    def _replace_exited(self) -> None:
        for inc in list(self.running):
            code = inc.proc.poll()
            if code is None:
                continue
            inc.ended = time.monotonic()
            if code == _RETIRED:
                inc.end = "retired"
            else:
                inc.end = f"exit {code}"
                self.errors.append(
                    f"writer process {inc.index} exited with status {code} during the load"
                )
            self.running.remove(inc)
            self._spawn()

    def _kill_writer(self) -> None:
        inc = self.rng.choice(self.running)
        inc.proc.kill()  # a stopped process dies as well
        try:
            inc.proc.wait(_REAP_S)
        except subprocess.TimeoutExpired:
            self.errors.append(f"writer process {inc.index} survived SIGKILL for {_REAP_S} s")
        inc.end, inc.ended = "killed", time.monotonic()
        self.writer_kills += 1
        self.running.remove(inc)
        self._spawn()

    def _inject(self) -> None:
        """SIGUSR1 or SIGINT to a writer whose handlers are in place (before that,
        either signal would just kill it)."""
        ready = [inc for inc in self.running if inc.ready]
        if not ready:
            return
        inc = self.rng.choice(ready)
        inc.proc.send_signal(signal.SIGINT if self.rng.random() < 0.5 else signal.SIGUSR1)
        self.injected += 1

    def _pause(self, now: float) -> None:
        """SIGSTOP a running writer; _continue_due sends SIGCONT."""
        candidates = [inc for inc in self.running if not inc.stopped_until]
        if not candidates:
            return
        inc = self.rng.choice(candidates)
        inc.stopped_until = now + self.rng.uniform(*_PAUSE_S)
        inc.proc.send_signal(signal.SIGSTOP)
        self.stops += 1

    def _continue_due(self, now: float) -> None:
        for inc in self.running:
            if inc.stopped_until and inc.stopped_until <= now:
                inc.stopped_until = 0.0
                inc.proc.send_signal(signal.SIGCONT)

    def _kill_flusher(self) -> None:
        ring = self.ring
        assert ring is not None
        pid = ring.stats().flusher_pid
        # The pid in the header may be stale (a flusher that died and was reaped,
        # its pid reused): pin the process with a pidfd, then make sure it is this
        # ring's flusher and still running before signalling it.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone: the watchdog is restarting it
        try:
            if not _is_flusher_of(pid, self.name):
                return
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            return
        finally:
            os.close(pidfd)
        self.flusher_kills.append((time.monotonic(), pid))

    # -- the end -------------------------------------------------------------------

    def finish(self) -> shmflush.Stats | None:
        """Stop the load, sync and close the ring; returns its last stats."""
        self.stop_writers()
        self.drain_acks()
        ring = self.ring
        assert ring is not None
        stats: shmflush.Stats | None = None
        try:
            ring.sync(timeout=_SYNC_TIMEOUT_S)
        except shmflush.ShmflushError as exc:
            self.errors.append(f"final sync: {exc}")
            print(describe_ring(self.name, self.pids()), file=sys.stderr, flush=True)
        with contextlib.suppress(shmflush.ShmflushError):
            stats = ring.stats()
        try:
            ring.close(timeout=_CLOSE_TIMEOUT_S)
        except shmflush.ShmflushError as exc:
            self.errors.append(f"close: {exc}")
        return stats

    def check(self, *, strict: bool = True) -> Verdict:
        return check_file(
            self.path,
            self.acks.top,
            self.known,
            unacked=self.acks.holes,
            large=self.large,
            strict=strict,
        )

    def explain(self, check: Verdict) -> None:
        """Print the first examples of each problem, with the writers' histories."""
        for kind, examples in check.examples.items():
            for example in examples:
                print(f"soak: {kind}: {example}", file=sys.stderr)
        for writer_id in list(check.lost_by_writer)[:_EXAMPLES]:
            inc = self.history.get(writer_id // _IDS_PER_PROCESS)
            if inc is None:
                continue
            near = [
                f"{t - self.began:.2f}s (pid {pid})"
                for t, pid in self.flusher_kills
                if inc.started - 1 <= t <= (inc.ended or t) + 1
            ]
            thread = writer_id % _IDS_PER_PROCESS
            print(
                f"soak: writer {writer_id} (process {inc.index} pid {inc.proc.pid}, "
                f"{f'thread {thread}' if thread else 'main thread'}) ran "
                f"{inc.started - self.began:.2f}s..{inc.ended - self.began:.2f}s, "
                f"ended {inc.end or '?'}, acked up to {self.acked.get(writer_id)}, "
                f"not acked: {self.acks.holes.get(writer_id, [])[:_EXAMPLES]}; "
                f"flusher kills near it: {', '.join(near) or 'none'}",
                file=sys.stderr,
            )
        for error in self.errors[:20]:
            print(f"soak: error: {error}", file=sys.stderr)
        sys.stderr.flush()


def _is_flusher_of(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"flusher" in argv and os.fsencode(name) in argv and _proc.is_alive(pid, 0)


def describe_ring(name: str, pids: Mapping[int, int] | None = None) -> str:
    """A multi-line dump of ring *name*: state words, lanes, leases, and the record
    headers of every buffer that is not idle (for stalls and stuck buffers).

    *pids* maps writer pids to writer process indexes, to name them in the dump.
    """
    try:
        core = attach_ring(name)
    except shmflush.ShmflushError as exc:
        return f"  cannot attach to ring {name!r}: {exc}"
    try:
        lines = _describe(core, pids or {})
    finally:
        core.unmap()
    lines.extend(f"  flusher process {p}" for p in _flusher_processes(name))
    return "\n".join(lines)


def _flusher_processes(name: str) -> list[str]:
    """``pid (parent, state, age)`` of every running flusher of ring *name*."""
    found = []
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime", "rb") as f:
        uptime = float(f.read().split()[0])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if b"flusher" not in argv or os.fsencode(name) not in argv:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        age = uptime - int(fields[19]) / ticks
        found.append(f"{entry} (parent {int(fields[1])}, {fields[0].decode()}, {age:.1f} s old)")
    return found


def _describe(core: Ring, pids: Mapping[int, int]) -> list[str]:
    g = core.geometry
    words = core.words
    flusher = core.header(L.H_FLUSHER_PID)
    lines = [
        f"  status={core.status():#x} flusher={flusher} "
        f"alive={_proc.is_alive(flusher, core.header(L.H_FLUSHER_START))} "
        f"waiters={core.header(L.H_WAITERS)} recovered={core.header(L.H_RECOVERED)} "
        f"restarts={core.header(L.H_RESTARTS)} next_address={core.header(L.H_NEXT_ADDRESS)}"
    ]
    flags = [
        (L.SEALED, "SEALED"),
        (L.FLUSHING, "FLUSHING"),
        (L.CLOSED, "CLOSED"),
        (L.IDLE, "IDLE"),
        (L.RESERVED, "RESERVED"),
    ]
    for i in range(g.buffers):
        st = core.state(i)
        names = "|".join(n for bit, n in flags if st & bit) or "open"
        lines.append(
            f"  buffer {i}: {names} offset={st >> L.OFFSET_SHIFT} "
            f"fill={words[core.fill_w[i]]} used={words[core.used_w[i]]} "
            f"extent_of={words[core.extent_of_w[i]]} committed={core.committed(i)} "
            f"address={words[core.address_w[i]]}"
        )
        if not st & L.IDLE:
            lines.append(f"    records: {_walk_records(core, i)}")
    for lane, w in enumerate(core.lane_w):
        word = words[w]
        lines.append(
            f"  lane {lane}: buffer {word & L.LANE_INDEX_MASK} fill {word >> L.LANE_FILL_SHIFT}"
        )
    for k in range(g.max_writers):
        at = g.lease(k)
        pid = L.holder_pid(words[(at + L.L_PID) // 8])
        intent = words[(at + L.L_INTENT) // 8]
        if pid or intent:
            alive = _proc.is_alive(pid, words[(at + L.L_START) // 8])
            who = f" (writer process {pids[pid]})" if pid in pids else ""
            lines.append(
                f"  lease {k}: pid {pid}{who} {'alive' if alive else 'dead'} "
                f"intent={intent:#x} (fill tag {intent >> 32}, "
                f"size {intent & 0xFFFFFFFF & ~L.INTENT_KIND_MASK}, "
                f"kind {(intent & L.INTENT_KIND_MASK) >> 30})"
            )
    return lines


def _walk_records(core: Ring, i: int) -> str:
    """The record headers of buffer *i* from offset 0: ``offset:size:kind[writer/seq]``
    up to the first header that is not a valid record (shown as ``offset:?``)."""
    view = core.view
    start = core.records_at[i]
    out: list[str] = []
    p = 0
    while p + _format.RECORD_HEADER_SIZE <= core.capacity and len(out) < 400:
        length, kind, mark = _format.RECORD_HEADER.unpack_from(view, start + p)
        if mark != _format.RECORD_MARK or kind not in _format.RECORD_KINDS:
            rest = bytes(view[start + p : start + core.capacity])
            nonzero = [k for k, b in enumerate(rest) if b]
            tail = f"next nonzero at {p + nonzero[0]}" if nonzero else "zeros to the end"
            out.append(f"{p}:? ({length},{kind},{mark:#x}; {tail})")
            break
        size = _format.record_size(length)
        what = "A"
        if kind == _format.KIND_DATA and length >= HEADER.size:
            writer_id, seq = HEADER.unpack_from(view, start + p + _format.RECORD_HEADER_SIZE)
            what = f"{writer_id}/{seq}"
        elif kind == _format.KIND_DATA:
            what = f"tiny{length}"
        out.append(f"{p}:{size}:{what}")
        p += size
    return " ".join(out)


# -- the command line -----------------------------------------------------------------


def _size(text: str) -> int:
    """Parse ``16384``, ``16K`` or ``1M`` (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number = text.strip().upper()
    scale = units.get(number[-1:], 1)
    if scale != 1:
        number = number[:-1]
    try:
        return int(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _geometry_spec(text: str) -> str:
    if text in ("random", "default"):
        return text
    parts = text.split("/")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"not random, default or BUFFER_SIZE/BUFFERS/LANES (like 16K/8/2): {text!r}"
        )
    _size(parts[0])
    for part in parts[1:]:
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"not a count: {part!r} in {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/soak.py",
        description="Under a live load, SIGKILL writers and the flusher, inject "
        "exceptions into appends, SIGSTOP writers and churn writer threads, at random, "
        "for a while; then check that no acknowledged record was lost, duplicated, "
        "reordered or damaged.  Prints a one-line verdict; exits 0 if it is clean.",
    )
    parser.add_argument(
        "--seconds", type=_positive(float), default=60.0, help="load time (default 60)"
    )
    parser.add_argument(
        "--writers", type=_positive(int), default=4, help="writer processes (default 4)"
    )
    parser.add_argument(
        "--dir",
        help="directory for the file (default: a new temporary directory under the "
        "current one, on a file system where O_DIRECT can reach a disk)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: a random one)")
    parser.add_argument(
        "--event-interval",
        "--kill-interval",
        dest="event_interval",
        type=_positive(float),
        default=0.2,
        help="mean seconds between events: kills, injected exceptions, stops (default 0.2)",
    )
    parser.add_argument(
        "--exception-share",
        type=_share,
        default=0.3,
        help="share of events that inject an exception (SIGUSR1 or SIGINT) into a "
        "writer's append (default 0.3)",
    )
    parser.add_argument(
        "--stop-share",
        type=_share,
        default=0.15,
        help="share of events that SIGSTOP a writer for 0.05 to 1 s (default 0.15); the "
        "other events are SIGKILLs, a fifth of them of the flusher",
    )
    parser.add_argument(
        "--churn-share",
        type=_share,
        default=0.5,
        help="share of writer processes that keep starting short-lived appending "
        "threads (default 0.5)",
    )
    parser.add_argument(
        "--geometry",
        type=_geometry_spec,
        default="random",
        help="random (default: create()'s defaults most of the time, else a small or "
        "large one, picked by the seed), default, or BUFFER_SIZE/BUFFERS/LANES",
    )
    parser.add_argument(
        "--buffer-size",
        type=_size,
        help="force the bytes per buffer (the rest: create()'s defaults)",
    )
    parser.add_argument(
        "--buffers", type=_positive(int), help="force the buffers (the rest: defaults)"
    )
    parser.add_argument("--lanes", type=_positive(int), help="force the lanes (the rest: defaults)")
    parser.add_argument(
        "--batches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let writers use append_many batches as well as append and reserve (default on)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--name", default=f"soak-{os.getpid()}", help=argparse.SUPPRESS)
    return parser


def _geometry(args: argparse.Namespace) -> tuple[Geometry, str]:
    """The run's geometry and where it came from."""
    if args.buffer_size is not None or args.buffers is not None or args.lanes is not None:
        return Geometry(args.buffer_size, args.buffers, args.lanes), "forced"
    if args.geometry == "default":
        return Geometry(), "create() defaults"
    if args.geometry == "random":
        picked = pick_geometry(args.seed)
        return picked, "create() defaults" if picked.is_default else "picked at random"
    size, buffers, lanes = args.geometry.split("/")
    return Geometry(_size(size), int(buffers), int(lanes)), "forced"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; returns 0 if the verdict is clean, 1 if not, 2 on bad usage."""
    args = _parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    if args.exception_share + args.stop_share > 1.0:
        print("--exception-share plus --stop-share must be at most 1", file=sys.stderr)
        return 2
    geometry, origin = _geometry(args)
    try:
        max_writers = inspect.signature(shmflush.create).parameters["max_writers"].default
        L.check_geometry(*geometry.resolved(), int(max_writers))
    except ValueError as exc:
        print(f"bad geometry {geometry.label()}: {exc}", file=sys.stderr)
        return 2
    made_dir = args.dir is None
    directory = tempfile.mkdtemp(prefix="shmflush-soak-", dir=os.getcwd()) if made_dir else args.dir
    path = os.path.join(directory, _LOG_FILE)
    stop_path = os.path.join(directory, _STOP_FILE)
    if not made_dir:
        os.makedirs(directory, exist_ok=True)
        for existing in (path, stop_path):
            if os.path.lexists(existing):
                print(f"{existing} exists; remove it or pick another --dir", file=sys.stderr)
                return 2
    print(
        f"soak: {args.seconds:g} s, {args.writers} writer processes ({args.churn_share:.0%} "
        f"churning threads), an event every {args.event_interval:g} s on average "
        f"({args.exception_share:.0%} exceptions, {args.stop_share:.0%} stops, the rest "
        f"kills), geometry {geometry.label()} ({origin}), seed {args.seed}, file {path}",
        file=sys.stderr,
        flush=True,
    )
    soak = _Soak(args, path, stop_path, geometry)
    try:
        status = _run(soak, args)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        status = 130
    finally:
        soak.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stop_path)
        if not args.keep:
            if made_dir:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return status


def _run(soak: _Soak, args: argparse.Namespace) -> int:
    soak.start()
    soak.run(args.seconds)
    seconds = time.monotonic() - soak.began
    stats = soak.finish()
    print("soak: reading the file back", file=sys.stderr, flush=True)
    check = soak.check()
    if check.read_error:
        soak.errors.append(f"strict read: {check.read_error}")
    kills = soak.writer_kills + len(soak.flusher_kills)
    print(
        f"kills={kills} (writers={soak.writer_kills} flusher={len(soak.flusher_kills)}) "
        f"appended={soak.appended} in_file={check.records} lost={check.lost} "
        f"duplicated={check.duplicated} out_of_order={check.out_of_order} "
        f"corrupt={check.corrupt + check.foreign} abandoned={check.abandoned} "
        f"recovered={stats.recovered if stats else '?'} "
        f"restarts={stats.flusher_restarts if stats else '?'} seconds={seconds:.1f} "
        f"unacked_in_file={check.unreported} errors={len(soak.errors)} "
        f"seed={args.seed} geometry={soak.geometry.label()} injected={soak.injected} "
        f"(in_ops={soak.in_ops} in_library={soak.in_library} escaped={soak.escaped}) "
        f"stops={soak.stops} "
        f"threads={soak.threads}",
        flush=True,
    )
    print(
        f"soak: the ring had no live flusher {soak.down_periods} times, for up to "
        f"{soak.down_max:.1f} s; {check.tiny} tiny records in the file, "
        f"{check.tiny_reported} acknowledged",
        file=sys.stderr,
    )
    soak.explain(check)
    if check.read_error:
        # The strict read stops at the first damage; look past it, to tell the
        # records really lost from those only hidden behind the damage.
        lenient = soak.check(strict=False)
        print(
            f"soak: read past the damage (strict=False): in_file={lenient.records} "
            f"lost={lenient.lost} duplicated={lenient.duplicated} "
            f"out_of_order={lenient.out_of_order} corrupt={lenient.corrupt + lenient.foreign} "
            f"{lenient.read_error}",
            file=sys.stderr,
        )
        for example in lenient.examples.get("lost", []):
            print(f"soak: lost (strict=False): {example}", file=sys.stderr)
    return 0 if check.ok and not soak.errors else 1
