"""``python -m shmflush bench``: shmflush against its peers, in one run, on one disk.

Every method moves the same records (same sizes, same number of writer processes,
same start method) into a file in the same directory, and every timed run follows
the same rules:

* The processes are started and do all their set-up (attaching, building their
  records) before the clock starts; the clock starts when they are released
  together, so process start-up is never timed.
* The clock stops only when the data is durable: for shmflush after the owner's
  ``Ring.close()`` returns (it drains the ring and fdatasyncs), for a peer after
  its writer has written everything and called fsync(2).
* Afterwards the file is read back and checked: the right number of records, each
  writer's records in the order it wrote them and every byte of them.  A run whose
  check fails is reported as FAILED, and the exit status is 1.

Methods run interleaved (size, writers, repetition, then method), so that a slow
spell of the machine hits all of them alike.  The limit is the device's sequential
O_DIRECT write bandwidth, measured from Python with 1 MiB aligned writes.  The
report is a table of medians with their spread, ratios of each shmflush method to
each peer and to the limit, a JSON file with every repetition, and a PNG chart.

``--goals`` runs only the cells of the performance issue's goals table (2 writers:
the shmflush methods, ``append_fallback``, ``mp_queue`` and ``o_append`` at 100 B;
``append`` and ``o_append`` at 64 KiB), the 100 B append latency and the sync()
latency, and prints that table: every row a ratio against a peer measured in the
same run, plus the latencies and the flusher's CPU seconds per GB written (its
utime + stime from /proc/<pid>/stat, from the release of the writers until a
sync() returns, just before close()).  ``append_fallback`` is ``append`` with
``SHMFLUSH_FENCE=off`` in the environment of its ring's flusher and its writers,
which the library reads at create/attach to force the fallback path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import json
import logging
import logging.handlers
import math
import mmap
import multiprocessing
import multiprocessing.queues
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event, Semaphore
from typing import Any, Final

import shmflush
from shmflush import _format

from .checker import Expected, check_file, check_records
from .workload import Workload

# -- records -------------------------------------------------------------------------
#
# The tools' one workload (shmflush._tools.workload): binary records for every
# method, log lines of the same size for the logging peer.

#: The smallest record size the benchmark accepts (a log line needs its header,
#: at least one filler character and its newline).
MIN_SIZE: Final = 32

_KIB: Final = 1 << 10
_MIB: Final = 1 << 20
_UNITS: Final = {"": 1, "K": _KIB, "M": _MIB, "G": 1 << 30}


def workload(kind: str, size: int) -> Workload:
    """The records of *kind* ("binary" or "text"; "json": LogHandler records, whose
    messages are "text" lines) and *size* bytes."""
    return Workload(size=size, text=kind == "text")


# -- methods -------------------------------------------------------------------------

# The library reads this at ring create/attach; "off" forces the fallback path
# (one atomic per record).  The append_fallback method sets it for its ring and
# its writer processes.
_FENCE_VARIABLE: Final = "SHMFLUSH_FENCE"


@dataclass(frozen=True)
class Method:
    """One way of getting records from writer processes into a durable file."""

    name: str
    family: str  # "shmflush" or "peer"
    kind: str  # "binary" records or "text" log lines
    label: str
    # In the groups all, shmflush and peers; the others run when named (or --goals).
    grouped: bool = True


METHODS: Final = (
    Method("append", "shmflush", "binary", "shmflush Ring.append, one record per call"),
    Method("append_many", "shmflush", "binary", "shmflush Ring.append_many, batches"),
    Method("reserve", "shmflush", "binary", "shmflush Ring.reserve, payload copied into the view"),
    Method("append_array", "shmflush", "binary", "shmflush Ring.append_array, 2-D uint8 batches"),
    Method(
        "append_fallback",
        "shmflush",
        "binary",
        f"shmflush Ring.append with {_FENCE_VARIABLE}=off: the fallback path, one atomic "
        "per record",
        grouped=False,
    ),
    Method("mp_queue", "peer", "binary", "multiprocessing.Queue -> one writer process, fsync"),
    Method("faster_fifo", "peer", "binary", "faster_fifo.Queue -> one writer process, fsync"),
    Method("o_append", "peer", "binary", "os.write on an O_APPEND fd per process, fsync at end"),
    Method("logging", "peer", "text", "logging QueueHandler -> QueueListener + FileHandler"),
    # The logging goal's row and its second peer (issue 9): run them by name,
    # --methods loghandler,logging,filehandler.
    Method(
        "loghandler",
        "shmflush",
        "json",
        "shmflush.LogHandler: logging calls appending JSON records",
        grouped=False,
    ),
    Method(
        "filehandler",
        "peer",
        "text",
        "logging FileHandler per process on one shared file (O_APPEND), fsync at end",
        grouped=False,
    ),
)
_BY_NAME: Final = {m.name: m for m in METHODS}
#: The methods of the groups all, shmflush and peers.
GROUPED: Final = tuple(m for m in METHODS if m.grouped)
_APPEND_ARRAY: Final = "append_array"  # may not exist yet in this shmflush


def _availability() -> dict[str, str]:
    """Methods that cannot run here, each with the reason."""
    missing: dict[str, str] = {}
    if not hasattr(shmflush.Ring, _APPEND_ARRAY):
        missing["append_array"] = "not available: shmflush.Ring has no append_array()"
    try:
        importlib.import_module("faster_fifo")
    except ImportError:
        missing["faster_fifo"] = (
            "not available: faster_fifo does not import (pip install faster-fifo)"
        )
    return missing


# -- worker processes ------------------------------------------------------------------
#
# Each runs in a child process: it does its set-up, releases `ready`, waits for
# `start`, does its timed work and releases `done`.  The main process watches the
# children's exit codes while it waits, so a dead child fails the run at once.

_WAIT_S: Final = 600.0  # the longest any child waits for the main process


def _wait_for_start(start: Event) -> None:
    if not start.wait(_WAIT_S):
        raise TimeoutError(f"no start signal within {_WAIT_S:.0f} s")


def _shmflush_writer(
    *,
    method: str,
    ring: shmflush.Ring,
    writer_id: int,
    count: int,
    size: int,
    batch: int,
    results: multiprocessing.queues.SimpleQueue[dict[str, int | bool]],
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    # Under spawn *ring* arrived pickled by name and attached on unpickling; under
    # fork it is the owner's object, and closing it here closes only this mapping.
    with ring:
        records = [] if method == "loghandler" else Workload(size=size).records(writer_id, count)
        batches = [records[i : i + batch] for i in range(0, count, batch)]
        arrays: list[Any] = []
        if method == "append_array":
            np = importlib.import_module("numpy")
            table = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(count, size)
            arrays = [table[i : i + batch] for i in range(0, count, batch)]
        if method == "loghandler":
            _log_through_ring(ring, writer_id, count, size, ready=ready, start=start)
        else:
            ready.release()
            _wait_for_start(start)
        if method == "loghandler":
            pass  # logged above
        elif method in ("append", "append_fallback"):
            append = ring.append
            for record in records:
                append(record)
        elif method == "append_many":
            append_many = ring.append_many
            for chunk in batches:
                append_many(chunk)
        elif method == "reserve":
            reserve = ring.reserve
            for record in records:
                with reserve(size) as view:
                    view[:] = record
        elif method == "append_array":
            append_array: Callable[[Any], object] = getattr(ring, _APPEND_ARRAY)
            for array in arrays:
                append_array(array)
        else:
            raise ValueError(f"not a shmflush method: {method!r}")
        stats = ring.stats()
    results.put(
        {
            "writer": writer_id,
            "waits": stats.waits,
            "abandoned": stats.abandoned,
            "fence_off": os.environ.get(_FENCE_VARIABLE) == "off",
        }
    )
    done.release()


def _log_through_ring(
    ring: shmflush.Ring, writer_id: int, count: int, size: int, *, ready: Semaphore, start: Event
) -> None:
    """The loghandler method's timed part: one logging call per line, through a
    shmflush.LogHandler on *ring* (every record is in shared memory when it returns)."""
    lines = Workload(size=size, text=True).lines(writer_id, count)
    logger = logging.getLogger(f"shmflush.bench.{writer_id}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = shmflush.LogHandler(ring)
    logger.addHandler(handler)
    ready.release()
    _wait_for_start(start)
    info = logger.info
    for line in lines:
        info(line)
    logger.removeHandler(handler)
    dropped = ring.stats().dropped
    if dropped:
        raise RuntimeError(f"LogHandler dropped {dropped} records")


def _o_append_writer(
    *,
    path: str,
    writer_id: int,
    count: int,
    size: int,
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    records = Workload(size=size).records(writer_id, count)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        ready.release()
        _wait_for_start(start)
        write = os.write
        for record in records:
            # One write(2) per record: O_APPEND makes each one land whole at the end.
            if write(fd, record) != size:
                raise OSError(f"short write of a {size}-byte record")
    finally:
        os.close(fd)
    done.release()


def _file_handler_producer(
    *,
    path: str,
    writer_id: int,
    count: int,
    size: int,
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    # What many services do without a listener: every process opens the same file
    # with its own FileHandler (mode "a": O_APPEND, one write(2) per record, since
    # StreamHandler flushes after each).
    lines = Workload(size=size, text=True).lines(writer_id, count)
    logger = logging.getLogger(f"shmflush.bench.{writer_id}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, mode="a", encoding="ascii")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    ready.release()
    _wait_for_start(start)
    info = logger.info
    for line in lines:
        info(line)
    handler.close()
    done.release()


def _queue_producer(
    *,
    queue: Any,
    timeout: float | None,
    writer_id: int,
    count: int,
    size: int,
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    # *timeout*: None for multiprocessing.Queue (unbounded, never blocks); a number
    # for faster_fifo, whose put() blocks while its buffer is full.
    records = Workload(size=size).records(writer_id, count)
    ready.release()
    _wait_for_start(start)
    put = queue.put
    if timeout is None:
        for record in records:
            put(record)
    else:
        for record in records:
            put(record, timeout=timeout)


def _queue_writer(
    *,
    queue: Any,
    many: bool,
    path: str,
    total: int,
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    # The peers' single writer process: take records off the queue, write them to
    # the file, fsync once everything is written.
    with open(path, "wb", buffering=_MIB) as file:
        ready.release()
        write = file.write
        if many:  # faster_fifo: take what is there, up to 1024 at a time
            got = 0
            while got < total:
                chunk = queue.get_many(max_messages_to_get=min(1024, total - got), timeout=_WAIT_S)
                for record in chunk:
                    write(record)
                got += len(chunk)
        else:
            get = queue.get  # blocking; the main process stops us if a producer dies
            for _ in range(total):
                write(get())
        file.flush()
        os.fsync(file.fileno())
    done.release()


def _log_producer(
    *,
    queue: multiprocessing.queues.Queue[Any],
    writer_id: int,
    count: int,
    size: int,
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    lines = Workload(size=size, text=True).lines(writer_id, count)
    logger = logging.getLogger(f"shmflush.bench.{writer_id}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.handlers.QueueHandler(queue))
    ready.release()
    _wait_for_start(start)
    info = logger.info
    for line in lines:
        info(line)


class _CountingFileHandler(logging.FileHandler):
    """A FileHandler that fsyncs and releases *done* after its *total*-th line."""

    def __init__(self, path: str, total: int, done: Semaphore) -> None:
        super().__init__(path, mode="w", encoding="ascii")
        self.left = total
        self.done = done

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.left -= 1
        if self.left == 0:
            self.flush()
            if self.stream is not None:
                os.fsync(self.stream.fileno())
            self.done.release()


def _log_listener(
    *,
    queue: multiprocessing.queues.Queue[Any],
    path: str,
    total: int,
    stop: Event,
    ready: Semaphore,
    start: Event,
    done: Semaphore,
) -> None:
    handler = _CountingFileHandler(path, total, done)
    handler.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(queue, handler)
    listener.start()
    try:
        ready.release()
        if not stop.wait(_WAIT_S):
            raise TimeoutError(f"no stop signal within {_WAIT_S:.0f} s")
    finally:
        listener.stop()
        handler.close()


# -- one timed run ---------------------------------------------------------------------


class _RunError(Exception):
    """A run could not complete: a child died, or a deadline passed."""


class _Session:
    """The child processes of one timed run and the signals that pace them."""

    def __init__(self, ctx: BaseContext, deadline: float) -> None:
        self.ctx = ctx
        self.deadline = deadline
        self.ready = ctx.Semaphore(0)
        self.start = ctx.Event()
        self.done = ctx.Semaphore(0)
        self.processes: list[tuple[str, BaseProcess]] = []

    def spawn(self, role: str, target: Callable[..., None], **kwargs: object) -> None:
        process = self.ctx.Process(  # type: ignore[attr-defined]
            target=target,
            kwargs={**kwargs, "ready": self.ready, "start": self.start, "done": self.done},
            name=f"shmflush-bench-{role}",
            daemon=True,
        )
        process.start()
        self.processes.append((role, process))

    def release(self) -> float:
        """Wait until every child is ready, then start them all; returns the start time."""
        self._acquire(self.ready, len(self.processes), "ready")
        started = time.perf_counter()
        self.start.set()
        return started

    def await_done(self, count: int) -> None:
        self._acquire(self.done, count, "done")

    def _acquire(self, semaphore: Semaphore, count: int, what: str) -> None:
        left = count
        while left:
            # Returns as soon as a release happens: the poll interval adds no delay.
            if semaphore.acquire(timeout=0.05):
                left -= 1
                continue
            self._check()
            if time.monotonic() > self.deadline:
                raise _RunError(f"{left} of {count} processes not {what} by the deadline")

    def _check(self) -> None:
        failed = [
            f"{role} exited with code {p.exitcode}"
            for role, p in self.processes
            if p.exitcode not in (None, 0)
        ]
        if failed:
            raise _RunError("; ".join(failed))

    def join(self) -> None:
        """Wait for every child to exit, and fail if one did not exit cleanly."""
        for role, p in self.processes:
            p.join(max(self.deadline - time.monotonic(), 0.0))
            if p.exitcode is None:
                raise _RunError(f"{role} still running at the deadline")
        self._check()

    def close(self) -> None:
        """Stop (SIGTERM, then SIGKILL) every child still running, and reap them all."""
        for _, p in self.processes:
            if p.is_alive():
                p.terminate()
        grace = time.monotonic() + 5.0
        for _, p in self.processes:
            p.join(max(grace - time.monotonic(), 0.0))
        for _, p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for _, p in self.processes:
            with contextlib.suppress(ValueError):  # still running after SIGKILL
                p.close()


@dataclass(frozen=True)
class _Setup:
    """What every run of one benchmark shares."""

    ctx: BaseContext
    workdir: str
    timeout: float
    buffer_size: int
    buffers: int
    batch: int
    keep: bool  # keep every output file for inspection


_ring_serial = 0


def _ring_name() -> str:
    global _ring_serial
    _ring_serial += 1
    return f"bench-{os.getpid()}-{_ring_serial}"


def _time_shmflush(job: _Job, setup: _Setup) -> tuple[float, dict[str, Any]]:
    writers, count, size = job.writers, job.count, job.size
    session = _Session(setup.ctx, time.monotonic() + setup.timeout)
    fallback = job.method.name == "append_fallback"
    with contextlib.ExitStack() as stack:
        # The fallback row: the ring (its flusher) and the writers, started while
        # the variable is set, inherit it; the main process's is put back after.
        environment = _environment(_FENCE_VARIABLE, "off") if fallback else contextlib.nullcontext()
        with environment, warnings.catch_warnings():
            # A file system without O_DIRECT: the JSON says direct_io=false.
            warnings.simplefilter("ignore", shmflush.DirectIOWarning)
            ring = shmflush.create(
                _ring_name(), job.path, buffer_size=setup.buffer_size, buffers=setup.buffers
            )
            # Unwinds in reverse: the children are stopped before the owner closes.
            stack.callback(_close_quietly, ring)
            stack.callback(session.close)
            results: multiprocessing.queues.SimpleQueue[dict[str, int | bool]] = (
                setup.ctx.SimpleQueue()
            )
            stack.callback(results.close)
            for w in range(writers):
                session.spawn(
                    f"writer {w}",
                    _shmflush_writer,
                    method=job.method.name,
                    ring=ring,
                    writer_id=w,
                    count=count,
                    size=size,
                    batch=setup.batch,
                    results=results,
                )
        flusher = ring.stats().flusher_pid
        flusher_fence_off = _environ_of(flusher).get(_FENCE_VARIABLE) == "off"
        cpu_before = _cpu_seconds(flusher)
        started = session.release()
        session.await_done(writers)
        stats = ring.stats()
        # Everything is appended: once sync() returns the flusher has written it
        # all, and its CPU time is read before close() stops it.  close() then
        # has only its fdatasync left: the clock still stops when it returns.
        ring.sync(timeout=max(session.deadline - time.monotonic(), 1.0))
        cpu_after = _cpu_seconds(flusher) if ring.stats().flusher_pid == flusher else None
        ring.close()  # drains every buffer and fdatasyncs: the records are durable
        elapsed = time.perf_counter() - started
        session.join()
        per_writer = [results.get() for _ in range(writers)]
    file_bytes = os.path.getsize(job.path)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return elapsed, {
        "direct_io": stats.direct_io,
        # On-disk bytes, framing and padding included (the ring's own counters
        # cannot be read after close() and miss the final drain before it).
        "file_bytes": file_bytes,
        "waits": sum(int(r["waits"]) for r in per_writer),
        "abandoned": sum(int(r["abandoned"]) for r in per_writer),
        # utime + stime of the flusher from release to the last byte written
        # (None if it could not be read, or a restarted flusher replaced it).
        "flusher_cpu_s": cpu,
        "flusher_cpu_s_per_gb": None if cpu is None else cpu / (file_bytes / 1e9),
        "fence_off": {
            "writers": all(bool(r["fence_off"]) for r in per_writer),
            "flusher": flusher_fence_off,
        },
    }


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set environment variable *name* to *value* for the block (and the processes
    it starts), then put back what was there."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of process *pid* from /proc/<pid>/stat, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields 14 and 15 (utime, stime, in clock ticks), counted after the
    # parenthesised command name, which may itself hold spaces.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _environ_of(pid: int) -> dict[str, str]:
    """The environment process *pid* started with (empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _close_quietly(ring: shmflush.Ring) -> None:
    # Cleanup after a failed run; the run's own error is what gets reported.
    with contextlib.suppress(shmflush.ShmflushError):
        ring.close(timeout=30.0)


def _time_o_append(job: _Job, setup: _Setup) -> tuple[float, dict[str, Any]]:
    """o_append and filehandler: every process appends to one O_APPEND file; one
    fsync(2) at the end makes it durable."""
    path, writers = job.path, job.writers
    target = _file_handler_producer if job.method.name == "filehandler" else _o_append_writer
    session = _Session(setup.ctx, time.monotonic() + setup.timeout)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with contextlib.closing(session):
            for w in range(writers):
                session.spawn(
                    f"writer {w}",
                    target,
                    path=path,
                    writer_id=w,
                    count=job.count,
                    size=job.size,
                )
            started = session.release()
            session.await_done(writers)
            os.fsync(fd)  # one fsync(2) makes every process's writes durable
            elapsed = time.perf_counter() - started
            session.join()
    finally:
        os.close(fd)
    return elapsed, {}


def _time_queue(job: _Job, setup: _Setup) -> tuple[float, dict[str, Any]]:
    writers, count, size = job.writers, job.count, job.size
    session = _Session(setup.ctx, time.monotonic() + setup.timeout)
    many = job.method.name == "faster_fifo"
    queue: Any
    if many:
        faster_fifo = importlib.import_module("faster_fifo")
        # As much buffer memory as the shmflush ring has (at least room for a record).
        room = setup.buffers * setup.buffer_size
        queue = faster_fifo.Queue(max_size_bytes=max(room, 4 * (size + 64)))
    else:
        queue = setup.ctx.Queue()
    with contextlib.closing(session):
        session.spawn(
            "writer process",
            _queue_writer,
            queue=queue,
            many=many,
            path=job.path,
            total=writers * count,
        )
        for w in range(writers):
            session.spawn(
                f"producer {w}",
                _queue_producer,
                queue=queue,
                timeout=setup.timeout if many else None,
                writer_id=w,
                count=count,
                size=size,
            )
        started = session.release()
        session.await_done(1)  # the writer process wrote everything and fsynced
        elapsed = time.perf_counter() - started
        session.join()
    return elapsed, {}


def _time_logging(job: _Job, setup: _Setup) -> tuple[float, dict[str, Any]]:
    writers = job.writers
    session = _Session(setup.ctx, time.monotonic() + setup.timeout)
    queue: multiprocessing.queues.Queue[Any] = setup.ctx.Queue()
    stop = setup.ctx.Event()
    with contextlib.closing(session):
        session.spawn(
            "listener",
            _log_listener,
            queue=queue,
            path=job.path,
            total=writers * job.count,
            stop=stop,
        )
        for w in range(writers):
            session.spawn(
                f"logger {w}",
                _log_producer,
                queue=queue,
                writer_id=w,
                count=job.count,
                size=job.size,
            )
        started = session.release()
        session.await_done(1)  # the listener wrote every line and fsynced
        elapsed = time.perf_counter() - started
        stop.set()
        session.join()
    return elapsed, {}


@dataclass(frozen=True)
class _Job:
    """One timed run: *writers* processes each write *count* records of *size* bytes."""

    method: Method
    writers: int
    count: int
    size: int
    rep: int
    path: str


def _run_once(job: _Job, setup: _Setup) -> dict[str, Any]:
    """One timed run and the check of its file; returns its JSON entry."""
    method, writers, count, size, path = job.method, job.writers, job.count, job.size, job.path
    entry: dict[str, Any] = {"rep": job.rep}
    try:
        if method.family == "shmflush":
            elapsed, extra = _time_shmflush(job, setup)
        elif method.name in ("o_append", "filehandler"):
            elapsed, extra = _time_o_append(job, setup)
        elif method.name == "logging":
            elapsed, extra = _time_logging(job, setup)
        else:
            elapsed, extra = _time_queue(job, setup)
    except Exception as exc:  # reported as a FAILED run; the grid goes on
        entry.update(ok=False, check=f"run failed: {type(exc).__name__}: {exc}")
        if not setup.keep:
            _remove(path)
        return entry
    total = writers * count
    entry.update(
        elapsed_s=elapsed,
        records=total,
        bytes=total * size,
        records_per_s=total / elapsed,
        mb_per_s=total * size / elapsed / 1e6,
        **extra,
    )
    try:
        check = verify_file(
            path, family=method.family, kind=method.kind, writers=writers, count=count, size=size
        )
    except (shmflush.ShmflushError, OSError) as exc:
        check = Check(False, f"file unreadable: {exc}")
    entry.update(ok=check.ok, check=check.detail)
    if not setup.keep:
        _remove(path)  # a full default run would otherwise hold gigabytes until the end
    return entry


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- checks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """The verdict on one output file."""

    ok: bool
    detail: str


def _peer_records(path: str, size: int) -> Iterator[bytes]:
    """A peer's file cut into *size*-byte records (a torn tail comes out short)."""
    chunk = size * max(1, _MIB // size)
    with open(path, "rb") as file:
        while block := file.read(chunk):
            for at in range(0, len(block), size):
                yield block[at : at + size]


def verify_file(path: str, *, family: str, kind: str, writers: int, count: int, size: int) -> Check:
    """Check that the file holds exactly *writers* x *count* records of *size* bytes,
    each writer's in the order it wrote them and byte for byte as written.

    The tools' checker does it: a shmflush file through shmflush.read, a peer's
    file cut into *size*-byte records.
    """
    records = workload("text" if kind == "json" else kind, size)
    expected = Expected.every(writers, count)
    problems: list[str] = []
    if kind == "json":
        # LogHandler records: each message is a log line of the text workload.
        lines = ((json.loads(p)["message"] + "\n").encode() for p in shmflush.read(path))
        verdict = check_records(lines, records, expected)
    elif family == "shmflush":
        verdict = check_file(path, records, expected)
    else:
        actual = os.path.getsize(path)
        if actual != writers * count * size:
            problems.append(f"file is {actual} bytes, expected {writers * count * size}")
        verdict = check_records(_peer_records(path, size), records, expected)
    if verdict.records != writers * count:
        problems.append(f"{verdict.records} records, expected {writers * count}")
    problems += verdict.problems()
    if problems:
        return Check(False, "; ".join(problems))
    return Check(True, verdict.summary())


# -- the device limit -----------------------------------------------------------------


def write_bandwidth(
    directory: str, total: int, *, direct: bool, block: int = _MIB
) -> dict[str, Any]:
    """Write *total* bytes sequentially in *block*-byte write(2)s, then fsync(2).

    With *direct*, the file is opened with O_DIRECT and the block comes from mmap
    (page-aligned, as O_DIRECT needs); if the file system refuses O_DIRECT, the
    writes go through the page cache and the result says ``"direct": false``.
    Returns the bandwidth in bytes/s.
    """
    path = os.path.join(directory, f"limit-{'direct' if direct else 'buffered'}.dat")
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))  # incompressible, in case the device compresses
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    used_direct = direct
    note = ""
    try:
        try:
            fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL:
                raise
            used_direct, note = False, "O_DIRECT refused by the file system; buffered writes"
            fd = os.open(path, flags, 0o644)
        try:
            blocks = max(1, total // block)
            started = time.perf_counter()
            for _ in range(blocks):
                if os.write(fd, buf) != block:
                    raise OSError(f"short write to {path}")
            os.fsync(fd)
            elapsed = time.perf_counter() - started
        finally:
            os.close(fd)
    finally:
        buf.close()
        _remove(path)
    result: dict[str, Any] = {
        "direct": used_direct,
        "bytes": blocks * block,
        "elapsed_s": elapsed,
        "bytes_per_s": blocks * block / elapsed,
    }
    if note:
        result["note"] = note
    return result


# -- latency ---------------------------------------------------------------------------


def _percentile(ordered: Sequence[int | float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return float(ordered[index])


def _clock_overhead_ns() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(10_000):
        t = clock()
        samples.append(clock() - t)
    return float(statistics.median(samples))


def append_latency(directory: str, size: int, appends: int, buffers: int) -> dict[str, Any]:
    """Time single appends of *size* bytes with perf_counter_ns, one writer, no back-pressure.

    The ring has *buffers* 1 MiB buffers and ``sync="none"``; every buffer is
    filled twice before timing starts (so fresh shared-memory pages fault outside
    the timed calls), and at most half the ring is appended, so the writer never
    waits for the flusher.  ``waits`` in the result says whether it did anyway.
    """
    path = os.path.join(directory, f"latency-{size}B.dat")
    framed = _format.RECORD_HEADER_SIZE + ((size + 7) & -8)
    count = max(1, min(appends, buffers * _MIB // 2 // framed))
    records = Workload(size=size).records(0, count)
    samples = [0] * count
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", shmflush.DirectIOWarning)
            ring = shmflush.create(
                _ring_name(), path, buffer_size=_MIB, buffers=buffers, sync="none"
            )
        with ring:
            warm = bytes(32 * _KIB)
            for _ in range(2 * buffers * _MIB // len(warm)):
                ring.append(warm)
            ring.sync(timeout=60.0)
            waits = ring.stats().waits
            clock = time.perf_counter_ns
            append = ring.append
            for i, record in enumerate(records):
                t = clock()
                append(record)
                samples[i] = clock() - t
            waits = ring.stats().waits - waits
    finally:
        _remove(path)
    samples.sort()
    return {
        "size": size,
        "appends": count,
        "waits": waits,
        "p50_ns": _percentile(samples, 0.50),
        "p99_ns": _percentile(samples, 0.99),
        "p999_ns": _percentile(samples, 0.999) if count >= 1000 else None,
        "max_ns": float(samples[-1]),
        "mean_ns": statistics.fmean(samples),
    }


def sync_latency(directory: str, syncs: int) -> dict[str, Any]:
    """Time ``sync()`` right after one 100-byte append, *syncs* times (``sync="data"``)."""
    path = os.path.join(directory, "latency-sync.dat")
    record = Workload(size=100).record(0, 0)
    samples: list[int] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", shmflush.DirectIOWarning)
            ring = shmflush.create(_ring_name(), path, sync="data")
        with ring:
            direct_io = ring.stats().direct_io
            clock = time.perf_counter_ns
            for _ in range(syncs):
                ring.append(record)
                t = clock()
                ring.sync(timeout=60.0)
                samples.append(clock() - t)
    finally:
        _remove(path)
    samples.sort()
    return {
        "syncs": syncs,
        "direct_io": direct_io,
        "p50_us": _percentile(samples, 0.50) / 1e3,
        "p99_us": _percentile(samples, 0.99) / 1e3,
        "max_us": samples[-1] / 1e3,
        "mean_us": statistics.fmean(samples) / 1e3,
    }


# -- the machine -----------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model", "Hardware"):
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _mount_of(directory: str) -> dict[str, str]:
    """The /proc/mounts entry whose mount point holds *directory* (the longest match)."""
    target = os.path.realpath(directory)
    best = {"device": "?", "mount_point": "?", "fs_type": "unknown", "options": ""}
    longest = -1
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4:
                continue
            # /proc/mounts escapes space, tab, newline and backslash as octal.
            point = fields[1].encode().decode("unicode_escape")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= longest:  # later mounts shadow earlier ones
                longest = len(point)
                best = {
                    "device": fields[0],
                    "mount_point": point,
                    "fs_type": fields[2],
                    "options": fields[3],
                }
    return best


def _version(distribution: str) -> str | None:
    import importlib.metadata  # noqa: PLC0415  (slow to import; the workers never need it)

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(directory: str) -> dict[str, Any]:
    """What the figures were measured on."""
    uname = os.uname()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": f"{uname.sysname} {uname.release} {uname.version}",
        "machine": uname.machine,
        "directory": os.path.realpath(directory),
        "file_system": _mount_of(directory),
        "python": sys.version.replace("\n", " "),
        "versions": {
            "shmflush": shmflush.__version__,
            "numpy": _version("numpy"),
            "faster-fifo": _version("faster-fifo"),
            "matplotlib": _version("matplotlib"),
        },
    }


# -- options ---------------------------------------------------------------------------


def _size(text: str) -> int:
    """Parse ``100``, ``4K``, ``64KiB`` or ``1M`` (binary units)."""
    number, unit = text.strip().upper().removesuffix("B").removesuffix("I"), ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = int(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def _record_sizes(text: str) -> list[int]:
    sizes = [_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    if small := [s for s in sizes if s < MIN_SIZE]:
        raise argparse.ArgumentTypeError(f"record sizes must be at least {MIN_SIZE}, got {small}")
    return sorted(set(sizes))


def _writer_counts(text: str) -> list[int]:
    counts = []
    for item in text.split(","):
        part = item.strip().lower()
        if part in ("cpu", "cpus", "ncpu"):
            counts.append(os.cpu_count() or 1)
            continue
        try:
            counts.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a writer count: {part!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"writer counts must be at least 1, got {text!r}")
    return sorted(set(counts))


def _method_names(text: str) -> list[str]:
    names: list[str] = []
    for item in text.split(","):
        part = item.strip()
        if part == "all":
            names += [m.name for m in GROUPED]
        elif part in ("shmflush", "peers"):
            family = "shmflush" if part == "shmflush" else "peer"
            names += [m.name for m in GROUPED if m.family == family]
        elif part in _BY_NAME:
            names.append(part)
        else:
            choices = ", ".join(["all", "shmflush", "peers", *_BY_NAME])
            raise argparse.ArgumentTypeError(f"unknown method {part!r} (choose from {choices})")
    return [m.name for m in METHODS if m.name in names]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _at_least_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


#: The goals table: record sizes, writers, and the (method, size) cells it needs.
GOAL_SMALL: Final = 100
GOAL_LARGE: Final = 64 * _KIB
GOAL_WRITERS: Final = 2
GOAL_CELLS: Final = (
    *(
        (name, GOAL_SMALL)
        for name in (
            "append",
            "append_many",
            "append_array",
            "reserve",
            "append_fallback",
            "mp_queue",
            "o_append",
        )
    ),
    ("append", GOAL_LARGE),
    ("o_append", GOAL_LARGE),
)


@dataclass(frozen=True)
class _Profile:
    sizes: list[int]
    writers: list[int]
    reps: int
    bytes_per_writer: int
    max_records: int
    limit_size: int
    latency_appends: int
    latency_buffers: int
    syncs: int
    timeout: float


def _profiles() -> dict[str, _Profile]:
    return {
        "full": _Profile(
            sizes=[100, _KIB, 4 * _KIB, 64 * _KIB],
            writers=sorted({1, 2, os.cpu_count() or 1}),
            reps=3,
            bytes_per_writer=32 * _MIB,
            max_records=200_000,
            limit_size=512 * _MIB,
            latency_appends=100_000,
            latency_buffers=64,
            syncs=200,
            timeout=600.0,
        ),
        # --goals: only the cells of the goals table, 2 writers; about a minute and
        # a half on 2 cores.
        "goals": _Profile(
            sizes=[GOAL_SMALL, GOAL_LARGE],
            writers=[GOAL_WRITERS],
            reps=3,
            bytes_per_writer=32 * _MIB,
            max_records=200_000,
            limit_size=512 * _MIB,
            latency_appends=100_000,
            latency_buffers=64,
            syncs=200,
            timeout=600.0,
        ),
        "quick": _Profile(
            sizes=[100, 4 * _KIB],
            writers=[1, 2],
            reps=1,
            bytes_per_writer=256 * _KIB,
            max_records=2_000,
            limit_size=16 * _MIB,
            latency_appends=5_000,
            latency_buffers=16,
            syncs=20,
            timeout=120.0,
        ),
    }


def _parser() -> argparse.ArgumentParser:
    full = _profiles()["full"]
    parser = argparse.ArgumentParser(
        prog="python -m shmflush bench",
        description="Measure shmflush append, append_many, reserve and append_array against "
        "multiprocessing.Queue, faster-fifo, O_APPEND writes and logging's QueueListener, "
        "and against the device's O_DIRECT write bandwidth, in one run on one file system. "
        "Every figure counts until the data is durable, and every output file is checked.",
    )
    add = parser.add_argument
    add(
        "--dir",
        help="directory on the file system to measure; a fresh subdirectory is made in it "
        "(default: a fresh temporary directory under the current directory)",
    )
    add(
        "--sizes",
        type=_record_sizes,
        help=f"record sizes, comma-separated, e.g. 100,1K,4K,64K (at least {MIN_SIZE}; "
        "default 100,1K,4K,64K)",
    )
    add(
        "--writers",
        type=_writer_counts,
        help="writer process counts, comma-separated; 'cpu' means os.cpu_count() "
        f"(default 1,2,cpu = {','.join(map(str, full.writers))})",
    )
    add(
        "--methods",
        type=_method_names,
        help="methods to run, comma-separated: "
        + ", ".join(m.name for m in METHODS)
        + ", or the groups all, shmflush, peers (default all; append_fallback runs only "
        "when named)",
    )
    add("--reps", type=_positive, help="repetitions of each cell (default 3)")
    add(
        "--records",
        type=_positive,
        help="records per writer per cell, for every size (default: --bytes-per-writer "
        "divided by the size, at most --max-records)",
    )
    add(
        "--bytes-per-writer",
        type=_size,
        help="payload each writer appends per cell, when --records is not given (default 32M)",
    )
    add(
        "--max-records",
        type=_positive,
        help="cap on records per writer per cell (default 200000)",
    )
    add(
        "--batch",
        type=_positive,
        default=256,
        help="records per append_many / append_array call (default 256)",
    )
    add(
        "--limit-size",
        type=_size,
        help="bytes written to measure the device limit (default 512M)",
    )
    add(
        "--latency-appends",
        type=_at_least_zero,
        help="timed appends per size for the latency figures; 0 skips them (default 100000)",
    )
    add("--syncs", type=_at_least_zero, help="timed sync() calls; 0 skips them (default 200)")
    add(
        "--buffer-size",
        type=_size,
        default=_MIB,
        help="shmflush ring buffer size for the throughput runs (default 1M)",
    )
    add(
        "--buffers",
        type=_positive,
        default=8,
        help="shmflush ring buffers for the throughput runs (default 8)",
    )
    add(
        "--start-method",
        choices=("spawn", "fork", "forkserver"),
        default="spawn",
        help="multiprocessing start method of every method's processes (default spawn)",
    )
    add("--timeout", type=float, help="seconds one run may take before it fails (default 600)")
    add(
        "--json",
        default="shmflush-bench.json",
        help="where to write every figure as JSON (default ./shmflush-bench.json)",
    )
    add(
        "--chart",
        default="shmflush-bench.png",
        help="where to draw the PNG chart (default ./shmflush-bench.png)",
    )
    add("--no-chart", action="store_true", help="do not draw the chart")
    add("--keep", action="store_true", help="keep the directory with every output file")
    add(
        "--goals",
        action="store_true",
        help="measure only what the goals table needs, with 2 writers, and print it: append, "
        "append_many, append_array, reserve and append_fallback against O_APPEND and "
        "multiprocessing.Queue at 100 B, append against O_APPEND+fsync and the device at "
        "64 KiB, append and sync() p99 latency, flusher CPU seconds per GB; --sizes, "
        "--writers and --methods do not apply, the other options do (a full run takes "
        "about 1.5 minutes on 2 cores)",
    )
    add(
        "--quick",
        action="store_true",
        help="a tiny run (sizes 100,4K, writers 1,2, one repetition, small files) for tests; "
        "options given explicitly still apply",
    )
    return parser


@dataclass(frozen=True)
class Settings:
    """The resolved options of one benchmark run."""

    sizes: list[int]
    writers: list[int]
    methods: list[str]
    reps: int
    records: dict[int, int]  # records per writer, by size
    batch: int
    limit_size: int
    latency_appends: int
    latency_buffers: int
    syncs: int
    buffer_size: int
    buffers: int
    start_method: str
    timeout: float
    # The (method, size, writers) cells to run, in this order within a repetition.
    cells: list[tuple[str, int, int]]
    latency_sizes: list[int]
    goals: bool


def _settings(args: argparse.Namespace) -> Settings:
    profile = _profiles()["goals" if args.goals else "quick" if args.quick else "full"]

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    sizes: list[int] = pick(args.sizes, profile.sizes)
    writers: list[int] = pick(args.writers, profile.writers)
    methods: list[str] = args.methods or [m.name for m in GROUPED]
    bytes_per_writer: int = pick(args.bytes_per_writer, profile.bytes_per_writer)
    max_records: int = pick(args.max_records, profile.max_records)
    records = {
        size: args.records or max(1, min(max_records, bytes_per_writer // size)) for size in sizes
    }
    if args.goals:
        wanted = {name for name, _ in GOAL_CELLS}
        methods = [m.name for m in METHODS if m.name in wanted]
        cells = [(name, size, GOAL_WRITERS) for name, size in GOAL_CELLS]
        latency_sizes = [GOAL_SMALL]
    else:
        cells = [(name, size, w) for size in sizes for w in writers for name in methods]
        latency_sizes = sizes
    return Settings(
        sizes=sizes,
        writers=writers,
        methods=methods,
        reps=pick(args.reps, profile.reps),
        records=records,
        batch=args.batch,
        limit_size=pick(args.limit_size, profile.limit_size),
        latency_appends=pick(args.latency_appends, profile.latency_appends),
        latency_buffers=profile.latency_buffers,
        syncs=pick(args.syncs, profile.syncs),
        buffer_size=args.buffer_size,
        buffers=args.buffers,
        start_method=args.start_method,
        timeout=pick(args.timeout, profile.timeout),
        cells=cells,
        latency_sizes=latency_sizes,
        goals=args.goals,
    )


# -- reporting -------------------------------------------------------------------------


def _fmt_size(size: int) -> str:
    if size % _MIB == 0:
        return f"{size // _MIB} MiB"
    if size % _KIB == 0:
        return f"{size // _KIB} KiB"
    return f"{size} B"


def _fmt_rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _fmt_us(ns: float | None) -> str:
    if ns is None:
        return "-"  # too few samples for this percentile
    return f"{ns / 1e3:.2f}us" if ns < 1e6 else f"{ns / 1e6:.2f}ms"


def _fmt_ratio(value: float) -> str:
    return f"{value:.3g}x" if value >= 0.01 else f"{value:.2g}x"


def _summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of the repetitions that completed."""
    done = [r for r in reps if "records_per_s" in r]
    if not done:
        return {}
    out: dict[str, Any] = {}
    for key in ("records_per_s", "mb_per_s", "elapsed_s"):
        values = [r[key] for r in done]
        out[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def _ratios(cells: list[dict[str, Any]], limit_bps: float | None) -> list[dict[str, Any]]:
    """Each shmflush method's median over each peer's median, and over the limit."""
    found = {
        (c["method"], c["size"], c["writers"]): c["summary"]["records_per_s"]["median"]
        for c in cells
        if c["status"] == "ok"
    }
    out = []
    for (method, size, writers), rate in found.items():
        if _BY_NAME[method].family != "shmflush":
            continue
        for peer in (m.name for m in METHODS if m.family == "peer"):
            if (peer, size, writers) in found:
                out.append(
                    {
                        "method": method,
                        "size": size,
                        "writers": writers,
                        "versus": peer,
                        "ratio": rate / found[(peer, size, writers)],
                    }
                )
        if limit_bps:
            out.append(
                {
                    "method": method,
                    "size": size,
                    "writers": writers,
                    "versus": "limit",
                    "ratio": rate * size / limit_bps,
                }
            )
    return out


def _print_tables(
    settings: Settings,
    cells: list[dict[str, Any]],
    ratios: list[dict[str, Any]],
    limit: dict[str, Any] | None,
) -> None:
    by_key = {(c["method"], c["size"], c["writers"]): c for c in cells}
    ran = [m for m in settings.methods if any(c["method"] == m for c in cells)]
    measured = [m for m in ran if any(c["method"] == m and c["summary"] for c in cells)]
    peers = [m for m in measured if _BY_NAME[m].family == "peer"]
    ours = [m for m in measured if _BY_NAME[m].family == "shmflush"]
    ratio_of = {(r["method"], r["size"], r["writers"], r["versus"]): r["ratio"] for r in ratios}
    limit_bps = limit["bytes_per_s"] if limit else None
    if limit is not None:
        buffered = limit["buffered_fsync"]["bytes_per_s"]
        print(
            f"\ndevice limit: {limit['bytes_per_s'] / 1e6:.0f} MB/s "
            f"({limit['min_bytes_per_s'] / 1e6:.0f} .. {limit['max_bytes_per_s'] / 1e6:.0f}), "
            f"{'O_DIRECT' if limit['direct'] else 'buffered (no O_DIRECT here)'} 1 MiB writes "
            f"of {_fmt_size(limit['runs'][0]['bytes'])} + fsync; "
            f"for comparison, buffered writes + fsync: {buffered / 1e6:.0f} MB/s"
        )
    print("\nthroughput: median of repetitions (min .. max); MB/s counts payload bytes")
    for size in settings.sizes:
        print(f"\n{_fmt_size(size)} records, {settings.records[size]} per writer")
        print(
            f"  {'writers':>7}  {'method':<15} {'records/s':>10}  {'(min .. max)':<22} {'MB/s':>9}"
        )
        for writers in settings.writers:
            for name in ran:
                cell = by_key.get((name, size, writers))
                if cell is None:
                    continue
                if cell["status"] == "skipped":
                    print(f"  {writers:>7}  {name:<15} {'-':>10}  {cell['note']}")
                    continue
                s = cell.get("summary", {})
                if s:
                    rate = s["records_per_s"]
                    spread = f"({_fmt_rate(rate['min'])} .. {_fmt_rate(rate['max'])})"
                    line = (
                        f"  {writers:>7}  {name:<15} {_fmt_rate(rate['median']):>10}  "
                        f"{spread:<22} {s['mb_per_s']['median']:>9.1f}"
                    )
                else:
                    line = f"  {writers:>7}  {name:<15} {'-':>10}  {'':<22} {'-':>9}"
                if cell["status"] == "FAILED":
                    line += "  FAILED"
                print(line)
        if limit is not None and limit_bps:
            print(
                f"  {'limit':>7}  {'O_DIRECT' if limit['direct'] else 'buffered':<15} "
                f"{_fmt_rate(limit_bps / size):>10}  {'(records/s equivalent)':<22} "
                f"{limit_bps / 1e6:>9.1f}"
            )
    if not ours or not (peers or limit_bps):
        return
    versus = [*peers, *(["limit"] if limit_bps else [])]
    print("\nratios: shmflush median / peer median (limit: share of the device bandwidth)")
    for size in settings.sizes:
        print(f"\n{_fmt_size(size)} records")
        print(f"  {'writers':>7}  {'method':<15} " + " ".join(f"{v:>11}" for v in versus))
        for writers in settings.writers:
            for name in ours:
                if (name, size, writers) not in by_key:
                    continue
                row = []
                for v in versus:
                    ratio = ratio_of.get((name, size, writers, v))
                    if ratio is None:
                        row.append(f"{'-':>11}")
                    elif v == "limit":
                        row.append(f"{ratio * 100:>10.1f}%")
                    else:
                        row.append(f"{_fmt_ratio(ratio):>11}")
                print(f"  {writers:>7}  {name:<15} " + " ".join(row))


def _print_latency(
    latency: list[dict[str, Any]], sync: dict[str, Any] | None, clock: float
) -> None:
    if latency:
        print(
            f"\nappend latency, 1 writer, sync='none', no back-pressure "
            f"(perf_counter_ns around each call; the clock pair itself costs {clock:.0f} ns)"
        )
        print(f"  {'size':>7} {'appends':>8} {'p50':>9} {'p99':>9} {'p99.9':>9} {'max':>9} waits")
        for row in latency:
            cells = [_fmt_us(row[key]) for key in ("p50_ns", "p99_ns", "p999_ns", "max_ns")]
            print(
                f"  {_fmt_size(row['size']):>7} {row['appends']:>8} "
                + " ".join(f"{c:>9}" for c in cells)
                + f" {row['waits']:>5}"
            )
    if sync:
        print(
            f"\nsync() latency after one 100 B append, sync='data', "
            f"direct_io={sync['direct_io']}, {sync['syncs']} calls: "
            f"p50 {sync['p50_us']:.0f} us, p99 {sync['p99_us']:.0f} us, "
            f"max {sync['max_us']:.0f} us"
        )


def draw_chart(
    path: str, settings: Settings, cells: list[dict[str, Any]], limit: dict[str, Any] | None
) -> str | None:
    """Draw MB/s against writers, one panel per record size; returns a note if it cannot."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    panels = len(settings.sizes)
    fig, axes = plt.subplots(
        1, panels, figsize=(4.2 * panels, 4.2), squeeze=False, constrained_layout=True
    )
    for ax, size in zip(axes[0], settings.sizes, strict=True):
        for name in settings.methods:
            points = sorted(
                (c["writers"], c["summary"]["mb_per_s"])
                for c in cells
                if c["method"] == name and c["size"] == size and c.get("summary")
            )
            if not points:
                continue
            xs = [w for w, _ in points]
            mid = [s["median"] for _, s in points]
            low = [s["median"] - s["min"] for _, s in points]
            high = [s["max"] - s["median"] for _, s in points]
            style = "-o" if _BY_NAME[name].family == "shmflush" else "--s"
            ax.errorbar(xs, mid, yerr=[low, high], fmt=style, capsize=3, label=name)
        if limit:
            ax.axhline(
                limit["bytes_per_s"] / 1e6,
                color="black",
                linestyle=":",
                label="device limit" + ("" if limit["direct"] else " (buffered)"),
            )
        ax.set_yscale("log")
        ax.set_xticks(settings.writers)
        ax.set_title(f"{_fmt_size(size)} records")
        ax.set_xlabel("writer processes")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("MB/s until durable (payload, log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- main ------------------------------------------------------------------------------


def _print_header(
    machine: dict[str, Any], command: str, settings: Settings, workdir: str, notes: list[str]
) -> None:
    fs = machine["file_system"]
    print("shmflush bench")
    print(f"command:   {command}")
    print(
        f"machine:   {machine['cpu_model']}, {machine['cpu_count']} CPUs "
        f"({machine['cpus_usable']} usable), {machine['kernel'].split(' #')[0]}"
    )
    print(f"python:    {machine['python']}")
    print(
        f"directory: {workdir} ({fs['fs_type']} on {fs['device']}, mounted at {fs['mount_point']})"
    )
    records = ", ".join(f"{_fmt_size(s)}: {settings.records[s]}" for s in settings.sizes)
    print(
        f"grid:      sizes {', '.join(_fmt_size(s) for s in settings.sizes)}; writers "
        f"{', '.join(map(str, settings.writers))}; repetitions {settings.reps}; "
        f"records per writer {records}"
    )
    print(
        f"           start method {settings.start_method}; ring {_fmt_size(settings.buffer_size)} "
        f"x {settings.buffers} buffers, sync='data'; batches of {settings.batch}"
    )
    print(f"methods:   {', '.join(settings.methods)}")
    for note in notes:
        print(f"note:      {note}")
    sys.stdout.flush()


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _measure_limit(settings: Settings, workdir: str) -> dict[str, Any] | None:
    runs = []
    for _ in range(settings.reps):
        runs.append(write_bandwidth(workdir, settings.limit_size, direct=True))
    buffered = write_bandwidth(workdir, settings.limit_size, direct=False)
    rates = [r["bytes_per_s"] for r in runs]
    limit: dict[str, Any] = {
        "direct": all(r["direct"] for r in runs),
        "bytes_per_s": statistics.median(rates),
        "min_bytes_per_s": min(rates),
        "max_bytes_per_s": max(rates),
        "block": _MIB,
        "runs": runs,
        "buffered_fsync": buffered,
        "records_per_s_equivalent": {
            str(size): statistics.median(rates) / size for size in settings.sizes
        },
    }
    _progress(
        f"device limit: {limit['bytes_per_s'] / 1e6:.0f} MB/s "
        f"({'O_DIRECT' if limit['direct'] else 'buffered'}, 1 MiB writes + fsync); "
        f"buffered + fsync {buffered['bytes_per_s'] / 1e6:.0f} MB/s"
    )
    return limit


def _run_grid(
    settings: Settings, setup: _Setup, unavailable: dict[str, str]
) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int, int], dict[str, Any]] = {}
    for name, size, writers in settings.cells:
        cells[(name, size, writers)] = {
            "method": name,
            "family": _BY_NAME[name].family,
            "label": _BY_NAME[name].label,
            "size": size,
            "writers": writers,
            "records_per_writer": settings.records[size],
            "status": "skipped" if name in unavailable else "ok",
            "note": unavailable.get(name, ""),
            "reps": [],
        }
    # Interleaved: each repetition runs every method once before the next one starts.
    for size in settings.sizes:
        count = settings.records[size]
        for writers in settings.writers:
            for rep in range(settings.reps):
                for name in settings.methods:
                    cell = cells.get((name, size, writers))
                    if cell is None or cell["status"] == "skipped":
                        continue
                    path = os.path.join(setup.workdir, f"{name}-{size}B-{writers}w-rep{rep}.dat")
                    job = _Job(_BY_NAME[name], writers, count, size, rep, path)
                    entry = _run_once(job, setup)
                    cell["reps"].append(entry)
                    where = f"{_fmt_size(size):>7} {writers:>3}w {name:<15} rep {rep + 1}"
                    if entry["ok"]:
                        _progress(
                            f"{where}: {_fmt_rate(entry['records_per_s'])} records/s, "
                            f"{entry['mb_per_s']:.1f} MB/s, {entry['elapsed_s']:.3f} s"
                        )
                    else:
                        cell["status"] = "FAILED"
                        _progress(f"{where}: FAILED: {entry['check']}")
    for cell in cells.values():
        cell["summary"] = _summary(cell["reps"])
    return list(cells.values())


# -- the goals table --------------------------------------------------------------------


def goals(
    cells: list[dict[str, Any]],
    limit: dict[str, Any] | None,
    latency: list[dict[str, Any]],
    sync: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The goals table's rows, each measured against a peer of the same run.

    Each row: ``goal`` (what is compared), ``value`` (None if a side is missing),
    ``unit`` ("x": a ratio of medians, "%": of the device limit, "us", "s/GB"),
    ``detail`` (both sides) and ``target`` (the issue's, where it set one).
    """
    rate = {
        (c["method"], c["size"]): c["summary"]["records_per_s"]["median"]
        for c in cells
        if c["status"] == "ok" and c.get("summary") and c["writers"] == GOAL_WRITERS
    }
    limit_bps = limit["bytes_per_s"] if limit else None
    rows: list[dict[str, Any]] = []

    def versus(
        method: str, peer: str, size: int, target: str | None, peer_name: str | None = None
    ) -> None:
        ours, theirs = rate.get((method, size)), rate.get((peer, size))
        value = ours / theirs if ours and theirs else None
        rows.append(
            {
                "goal": f"{method} {_fmt_size(size)} vs {peer_name or peer}",
                "value": value,
                "unit": "x",
                "detail": f"{_fmt_rate(ours) if ours else '-'}/s against "
                f"{_fmt_rate(theirs) if theirs else '-'}/s",
                "target": target,
            }
        )

    def of_limit(method: str, size: int, target: str | None) -> None:
        ours = rate.get((method, size))
        value = 100 * ours * size / limit_bps if ours and limit_bps else None
        rows.append(
            {
                "goal": f"{method} {_fmt_size(size)} of the device limit",
                "value": value,
                "unit": "%",
                "detail": f"{ours * size / 1e6 if ours else 0:.0f} MB/s of "
                f"{limit_bps / 1e6 if limit_bps else 0:.0f} MB/s",
                "target": target,
            }
        )

    # The targets are issue "Protocol v3"'s (docs/performance.md); the other rows
    # track figures it set no number for.  Every o_append run ends with one fsync(2).
    versus("append", "o_append", GOAL_SMALL, ">= 1.5x", "O_APPEND")
    versus("append", "mp_queue", GOAL_SMALL, ">= 10x", "mp.Queue")
    versus("append_many", "o_append", GOAL_SMALL, ">= 4x", "O_APPEND")
    of_limit("append_array", GOAL_SMALL, ">= 80 %")
    of_limit("append", GOAL_LARGE, ">= 90 %")
    versus("append", "o_append", GOAL_LARGE, ">= 1.0x", "O_APPEND+fsync")
    versus("reserve", "append", GOAL_SMALL, ">= 1.0x")
    versus("append_fallback", "o_append", GOAL_SMALL, None, "O_APPEND")
    small = next((row for row in latency if row["size"] == GOAL_SMALL), None)
    rows.append(
        {
            "goal": f"append {_fmt_size(GOAL_SMALL)} p99 latency",
            "value": small["p99_ns"] / 1e3 if small else None,
            "unit": "us",
            "detail": f"{small['appends']} appends, 1 writer, p50 {small['p50_ns'] / 1e3:.2f} us"
            if small
            else "-",
            "target": "<= 5 us",
        }
    )
    rows.append(
        {
            "goal": "sync() p99 latency",
            "value": sync["p99_us"] if sync else None,
            "unit": "us",
            "detail": f"{sync['syncs']} calls after a 100 B append, p50 {sync['p50_us']:.0f} us"
            if sync
            else "-",
            "target": "no worse than before",
        }
    )
    by_cell = {(c["method"], c["size"]): c for c in cells if c["writers"] == GOAL_WRITERS}
    for size in (GOAL_SMALL, GOAL_LARGE):
        per_gb = [
            r["flusher_cpu_s_per_gb"]
            for r in by_cell.get(("append", size), {}).get("reps", [])
            if r.get("flusher_cpu_s_per_gb") is not None
        ]
        rows.append(
            {
                "goal": f"flusher CPU per GB written (append {_fmt_size(size)})",
                "value": statistics.median(per_gb) if per_gb else None,
                "unit": "s/GB",
                "detail": f"utime+stime from /proc, median of {len(per_gb)} runs",
                "target": None,
            }
        )
    return rows


def _print_goals(rows: list[dict[str, Any]], settings: Settings) -> None:
    print(
        f"\ngoals: {GOAL_WRITERS} writers, medians of {settings.reps} repetitions; every "
        "ratio is against a peer measured in this run"
    )
    width = max(len(row["goal"]) for row in rows)
    for row in rows:
        value, unit = row["value"], row["unit"]
        if value is None:
            shown = "-"
        elif unit == "x":
            shown = _fmt_ratio(value)
        elif unit == "%":
            shown = f"{value:.1f} %"
        else:
            shown = f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        target = f"  (goal {row['target']})" if row["target"] else ""
        print(f"  {row['goal']:<{width}}  {shown:>10}  {row['detail']}{target}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments *argv*; return the exit status.

    0 when every run's file passed its check, 1 when any run failed (its cells are
    marked FAILED in the table and the JSON), 2 for bad arguments.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.goals:
        given = [
            option
            for option, value in (
                ("--sizes", args.sizes),
                ("--writers", args.writers),
                ("--methods", args.methods),
                ("--quick", args.quick or None),
            )
            if value is not None
        ]
        if given:
            parser.error(f"--goals picks its own cells; drop {', '.join(given)}")
    settings = _settings(args)
    command = shlex.join(sys.orig_argv)
    if argv is not None:  # called as a function: the equivalent command line
        command = shlex.join(["python", "-m", "shmflush", "bench", *argv])
    unavailable = {m: why for m, why in _availability().items() if m in settings.methods}
    base = args.dir or "."
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="shmflush-bench-", dir=base)
    try:
        return _main(
            args,
            argv=argv,
            settings=settings,
            command=command,
            workdir=workdir,
            unavailable=unavailable,
        )
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _main(
    args: argparse.Namespace,
    *,
    argv: list[str] | None,
    settings: Settings,
    command: str,
    workdir: str,
    unavailable: dict[str, str],
) -> int:
    machine = machine_info(workdir)
    notes = [f"{name}: {why}" for name, why in unavailable.items()]
    if args.quick:
        notes.append(
            "--quick: tiny files, so fixed costs (closing the ring, fsync, process wake-ups) "
            "dominate; these figures test the harness and do not compare the methods"
        )
    _print_header(machine, command, settings, workdir, notes)
    setup = _Setup(
        ctx=multiprocessing.get_context(settings.start_method),
        workdir=workdir,
        timeout=settings.timeout,
        buffer_size=settings.buffer_size,
        buffers=settings.buffers,
        batch=settings.batch,
        keep=args.keep,
    )
    limit = _measure_limit(settings, workdir)
    cells = _run_grid(settings, setup, unavailable)
    latency = [
        append_latency(workdir, size, settings.latency_appends, settings.latency_buffers)
        for size in (settings.latency_sizes if settings.latency_appends else [])
    ]
    sync = sync_latency(workdir, settings.syncs) if settings.syncs else None
    clock = _clock_overhead_ns()
    ratios = _ratios(cells, limit["bytes_per_s"] if limit else None)

    _print_tables(settings, cells, ratios, limit)
    _print_latency(latency, sync, clock)
    goal_rows = goals(cells, limit, latency, sync) if settings.goals else None
    if goal_rows is not None:
        _print_goals(goal_rows, settings)
    chart = None
    if not args.no_chart:
        note = draw_chart(args.chart, settings, cells, limit)
        if note:
            notes.append(note)
            print(f"\n{note}")
        else:
            chart = args.chart
    report = {
        "command": command,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "orig_argv": list(sys.orig_argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "records"},
            "records_per_writer": {str(k): v for k, v in settings.records.items()},
        },
        "notes": notes,
        "limit": limit,
        "cells": cells,
        "ratios": ratios,
        "latency": {"append": latency, "sync": sync, "clock_pair_ns": clock},
        "goals": goal_rows,
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"\nfigures:   {args.json}" + (f"\nchart:     {chart}" if chart else ""))
    failed = [c for c in cells if c["status"] == "FAILED"]
    if failed:
        print(f"\n{len(failed)} cells FAILED:")
        for c in failed:
            for r in c["reps"]:
                if not r["ok"]:
                    print(
                        f"  FAILED {c['method']} {_fmt_size(c['size'])} {c['writers']} writers "
                        f"rep {r['rep'] + 1}: {r['check']}"
                    )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
