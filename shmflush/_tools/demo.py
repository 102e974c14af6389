"""``python -m shmflush demo``: several processes append to one file, then we check it.

The demo is a smoke test a person can run: it starts writer processes, lets them
append numbered records through one ring, closes the ring (which drains every
record to disk), reads the file back and checks it record by record.

The records are the tools' one workload (:mod:`shmflush._tools.workload`): each
names its writer and sequence number, and the rest of its bytes follow from
those, so the checker (:mod:`shmflush._tools.checker`) rebuilds each record and
compares it whole: a lost, doubled, reordered, damaged or foreign record is
caught without keeping the records in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event, Semaphore

import shmflush

from .checker import Expected, Verdict, check_file
from .workload import Workload

MIN_SIZE = 16

# Everything that waits (worker start-up, the run, the final sync) fits in this.
_DEADLINE_S = 600.0
_APPEND_TIMEOUT_S = 60.0
_STOP_GRACE_S = 5.0
# Writers look at the stop event once per this many records: often enough to
# stop within milliseconds, rarely enough to cost nothing measurable.
_STOP_CHECK_EVERY = 1024

_DEFAULT_PATH = "shmflush-demo.log"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class Check:
    """One line of the verification report."""

    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def checks(verdict: Verdict, writers: int, records: int, size: int) -> list[Check]:
    """The checker's *verdict* on a demo file, as the demo's report lines."""
    expected_total = writers * records

    def detail(*kinds: str) -> str:
        return "; ".join(line for kind in kinds if (line := verdict.describe(kind)))

    return [
        Check(
            "record count",
            verdict.records == expected_total,
            f"{verdict.records} records read, {expected_total} written "
            f"({writers} writers x {records} records)",
        ),
        Check(
            "each record present exactly once",
            not (verdict.lost or verdict.duplicated or verdict.foreign),
            detail("lost", "duplicated", "foreign") or f"{expected_total} distinct records",
        ),
        Check(
            "per-writer order strictly increasing",
            not verdict.out_of_order,
            detail("out_of_order") or f"{writers} writers in append order",
        ),
        Check(
            "payload bytes intact",
            not verdict.corrupt,
            detail("corrupt") or f"every record is its {size} expected bytes",
        ),
    ]


def verify(path: str, writers: int, records: int, size: int) -> list[Check]:
    """Check the demo file *path*: exactly the demo's records, in per-writer order."""
    verdict = check_file(path, Workload(size=size), Expected.every(writers, records))
    out = checks(verdict, writers, records, size)
    if verdict.read_error:
        out.append(Check("file readable", False, verdict.read_error))
    return out


@dataclass(frozen=True)
class _Signals:
    """What the owner and the writers coordinate with."""

    ready: Semaphore  # each writer releases it once, when it is ready to append
    start: Event  # set by the owner: go (or, with stop set, give up)
    stop: Event  # set by the owner: finish the current record and leave


def _worker(
    ring: shmflush.Ring, *, writer_id: int, records: int, size: int, signals: _Signals
) -> None:
    # Runs in a child process.  Under spawn/forkserver *ring* arrived pickled by
    # name and attached on unpickling; under fork it is the owner's object copied
    # by fork(), and closing it here closes only this process's mapping.
    #
    # A Ctrl-C in the terminal reaches every process of the group.  Leave it to
    # the owner, which stops the writers through signals.stop: a writer killed
    # inside append() leaves a claim that the flusher has to wait out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ring:
        workload = Workload(size=size)
        record = workload.record
        signals.ready.release()
        if not signals.start.wait(_DEADLINE_S):
            raise TimeoutError(f"writer {writer_id}: no start signal in {_DEADLINE_S:.0f} s")
        for seq in range(records):
            if seq % _STOP_CHECK_EVERY == 0 and signals.stop.is_set():
                return
            ring.append(record(writer_id, seq), timeout=_APPEND_TIMEOUT_S)


def _stop(processes: Sequence[BaseProcess], signals: _Signals) -> None:
    """Stop every writer still running, and reap them all.

    Asks first (signals.stop), then terminates (SIGTERM), then kills (SIGKILL),
    each with a grace period.  Costs nothing once the writers have finished.
    """
    signals.stop.set()
    signals.start.set()  # a writer still waiting to start then sees stop
    for step in (None, BaseProcess.terminate, BaseProcess.kill):
        running = [p for p in processes if p.is_alive()]  # is_alive() reaps the rest
        for p in running:
            if step is not None:
                step(p)
        deadline = time.monotonic() + _STOP_GRACE_S
        for p in running:
            p.join(max(deadline - time.monotonic(), 0.0))


def _failed(processes: Sequence[BaseProcess]) -> list[str]:
    return [
        f"writer {i} exited with code {p.exitcode}"
        for i, p in enumerate(processes)
        if p.exitcode not in (None, 0)
    ]


def _await_ready(processes: Sequence[BaseProcess], ready: Semaphore, deadline: float) -> None:
    # Wait for every writer to attach, noticing one that dies on the way (a
    # Barrier would just wait for it until the deadline).
    waiting = len(processes)
    while waiting:
        if ready.acquire(timeout=0.1):
            waiting -= 1
            continue
        if failed := _failed(processes):
            raise _DemoError("; ".join(failed))
        if time.monotonic() > deadline:
            raise _DemoError(f"{waiting} writers not ready by the deadline")


def _await_writers(processes: Sequence[BaseProcess], deadline: float) -> None:
    running = list(processes)
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DemoError(f"{len(running)} writers still running at the deadline")
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=left)
        running = [p for p in running if p.exitcode is None]
        # Stop at the first failure: the others may be stuck behind it.
        if failed := _failed(processes):
            raise _DemoError("; ".join(failed))


class _DemoError(Exception):
    """The run itself failed (a writer died, or a deadline passed)."""


def _size(text: str) -> int:
    """Parse ``4096``, ``64K``, ``1M`` or ``1G`` (binary units)."""
    number, unit = text.upper().rstrip("IB"), ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        return int(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shmflush demo",
        description="Start writer processes that append numbered records to one file "
        "through a shmflush ring, then read the file back and verify every record.",
    )
    parser.add_argument(
        "--writers", type=_at_least(1), default=2, help="writer processes (default 2)"
    )
    parser.add_argument(
        "--records",
        type=_at_least(1),
        default=200_000,
        help="records per writer (default 200000)",
    )
    parser.add_argument(
        "--size",
        type=_at_least(MIN_SIZE),
        default=100,
        help=f"bytes per record, at least {MIN_SIZE} (default 100)",
    )
    parser.add_argument(
        "--path",
        default=_DEFAULT_PATH,
        help=f"file to write; must not exist yet (default ./{_DEFAULT_PATH}, on the "
        "current directory's file system so that O_DIRECT can reach a real disk)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument(
        "--start-method",
        choices=("spawn", "fork", "forkserver"),
        default="spawn",
        help="multiprocessing start method for the writers (default spawn)",
    )
    parser.add_argument(
        "--buffer-size", type=_size, default=1 << 20, help="bytes per buffer (default 1M)"
    )
    parser.add_argument(
        "--buffers", type=_at_least(1), default=16, help="buffers in the ring (default 16)"
    )
    parser.add_argument(
        "--sync",
        choices=("none", "data"),
        default="data",
        help="durability of each flush: 'data' = fdatasync (default), 'none'",
    )
    return parser


def _close(ring: shmflush.Ring) -> None:
    # After a failure: the owner's close() still unlinks the ring when it raises
    # (say, for the claim of a killed writer); report that, and do not mask the
    # failure (or a KeyboardInterrupt) that got us here.  A no-op after success.
    try:
        ring.close()
    except shmflush.ShmflushError as exc:
        print(f"FAIL  close: {exc}", flush=True)


def _run(args: argparse.Namespace, deadline_s: float) -> int:
    ctx = multiprocessing.get_context(args.start_method)
    total = args.writers * args.records
    print(
        f"shmflush demo: {args.writers} writers x {args.records} records of {args.size} B "
        f"({args.start_method}) -> {args.path}; "
        f"{args.buffers} buffers of {args.buffer_size} B, sync={args.sync}",
        flush=True,
    )
    signals = _Signals(ready=ctx.Semaphore(0), start=ctx.Event(), stop=ctx.Event())
    try:
        ring = shmflush.create(
            f"demo-{os.getpid()}",
            args.path,
            buffer_size=args.buffer_size,
            buffers=args.buffers,
            sync=args.sync,
        )
    except (shmflush.ShmflushError, OSError, ValueError) as exc:
        print(f"FAIL  create ring: {exc}", flush=True)
        return 1
    processes: list[BaseProcess] = []
    try:
        processes = [
            ctx.Process(
                target=_worker,
                args=(ring,),
                kwargs={
                    "writer_id": w,
                    "records": args.records,
                    "size": args.size,
                    "signals": signals,
                },
                name=f"shmflush-demo-writer-{w}",
                daemon=True,
            )
            for w in range(args.writers)
        ]
        deadline = time.monotonic() + deadline_s
        for p in processes:
            p.start()
        _await_ready(processes, signals.ready, deadline)

        began = time.perf_counter()
        signals.start.set()
        _await_writers(processes, deadline)
        ring.sync(timeout=max(deadline - time.monotonic(), 1.0))
        stats = ring.stats()
        ring.close()  # drains to disk: the clock includes durability
        elapsed = time.perf_counter() - began
    except (_DemoError, shmflush.ShmflushError) as exc:
        print(f"FAIL  run: {exc}", flush=True)
        return 1
    finally:
        _stop(processes, signals)
        _close(ring)

    print(
        f"wrote {total} records in {elapsed:.3f} s: {total / elapsed:,.0f} records/s, "
        f"{total * args.size / elapsed / 1e6:,.1f} MB/s "
        f"({args.writers} writers, {args.size} B records, "
        f"direct_io={stats.direct_io}, buffers_flushed={stats.buffers_flushed})",
        flush=True,
    )
    try:
        report = verify(args.path, args.writers, args.records, args.size)
    except shmflush.ShmflushError as exc:  # not a shmflush file at all
        report = [Check("file readable", False, str(exc))]
    for check in report:
        print(check, flush=True)
    if all(check.ok for check in report):
        return 0
    print(
        "verification failed" + ("" if args.keep else "; rerun with --keep to inspect the file"),
        flush=True,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line arguments *argv*; return the exit status.

    0 when every check passes, 1 when a check fails or the run itself fails (a
    writer dies, or a deadline passes), 130 on Ctrl-C.  Whatever happens, the
    writers are stopped and the ring is closed, so nothing is left in ``/dev/shm``.
    """
    args = _parser().parse_args(argv)
    if os.path.lexists(args.path):
        print(
            f"{args.path} exists; remove it or pass another --path "
            "(the demo checks a file that holds only its own records)",
            file=sys.stderr,
        )
        return 1
    try:
        return _run(args, _DEADLINE_S)
    except KeyboardInterrupt:
        # _run has stopped the writers and closed the ring on the way out.
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.path)
