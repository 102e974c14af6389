"""``python -m shmflush top NAME``: a live view of a running ring.

Reads the ring's shared-memory header and buffer descriptors (read-only: it
takes no lease slot and changes nothing) and prints, updating in place with
ANSI escape codes: the flusher's write rates (records/s, from the segments it
wrote, counted by reading the file's new segments; bytes/s and fills/s from
its counters), buffers by state, writers blocked now, the flusher's heartbeat
age and its lag (bytes claimed but not yet written: next address minus the
gap-free written mark), and the ring's status.  ``--once`` prints one snapshot
without escape codes.  Ends on Ctrl-C and when the ring goes away.

Drops (``Stats.dropped``) and waits (``Stats.waits``) are counted per process
by the process that appends (its ``Ring.stats()``); shared memory holds no
ring-wide total, so ``top`` shows the writers blocked at this moment instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

from . import _layout as L
from ._errors import RingNotFoundError, ShmflushError
from ._follow import Position, follow

PROG = "python -m shmflush top"


def _word(view: memoryview, offset: int) -> int:
    return int.from_bytes(view[offset : offset + 8], "little")


def _snapshot(view: memoryview, g: L.Geometry) -> dict[str, Any]:
    counts = {"open": 0, "sealed": 0, "closed": 0, "flushing": 0, "idle": 0}
    for i in range(g.buffers):
        state = _word(view, g.descriptor(i) + L.D_STATE) & 0x1F
        if state & (1 << 3):
            counts["idle"] += 1
        elif state & (1 << 1):
            counts["flushing"] += 1
        elif state & (1 << 2):
            counts["closed"] += 1
        elif state & (1 << 0):
            counts["sealed"] += 1
        else:
            counts["open"] += 1
    status = _word(view, L.H_STATUS)
    return {
        "buffers": counts,
        "next_address": _word(view, L.H_NEXT_ADDRESS),
        "written_below": _word(view, L.H_WRITTEN_BELOW),
        "buffers_flushed": _word(view, L.H_BUFFERS_FLUSHED),
        "bytes_written": _word(view, L.H_BYTES_WRITTEN),
        "syncs": _word(view, L.H_SYNCS),
        "waiters": _word(view, L.H_WAITERS),
        "heartbeat_ns": _word(view, L.H_HEARTBEAT_NS),
        "flusher_pid": _word(view, L.H_FLUSHER_PID),
        "recovered": _word(view, L.H_RECOVERED),
        "restarts": _word(view, L.H_RESTARTS),
        "stalled": _word(view, L.H_STALL_ERRNO),
        "status": status,
        "path": L.read_path(view).decode("utf-8", "replace"),
    }


def _status_text(status: int) -> str:
    names = [
        name
        for bit, name in (
            (L.STATUS_CLOSING, "closing"),
            (L.STATUS_BROKEN, "BROKEN"),
            (L.STATUS_FLUSHER_DONE, "flusher done"),
            (L.STATUS_OWNER_DEAD, "owner dead"),
        )
        if status & bit
    ]
    return ", ".join(names) or "running"


def _render(name: str, g: L.Geometry, now: dict[str, Any], rates: dict[str, float]) -> str:
    b = now["buffers"]
    age = (time.monotonic_ns() - now["heartbeat_ns"]) / 1e9 if now["heartbeat_ns"] else -1.0
    lag = max(0, now["next_address"] - now["written_below"])
    lines = [
        f"ring {name}  file {now['path']}  status {_status_text(now['status'])}",
        f"records/s {rates['records']:12,.0f}   bytes/s {rates['bytes']:14,.0f}   "
        f"fills/s {rates['fills']:8,.1f}   syncs/s {rates['syncs']:8,.1f}",
        f"buffers {g.buffers} x {g.buffer_size}: open {b['open']}  sealed {b['sealed']}  "
        f"closed {b['closed']}  flushing {b['flushing']}  idle {b['idle']}",
        f"writers waiting now {now['waiters']}   flusher pid {now['flusher_pid']}   "
        f"heartbeat {age:.2f} s ago   lag {lag:,} bytes",
        f"recovered fills {now['recovered']}   flusher restarts {now['restarts']}   "
        f"stalled errno {now['stalled']}   drops: per process (Ring.stats().dropped)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``top`` with command-line arguments *argv*; return the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description="Live view of a running ring.")
    parser.add_argument("name", help="the ring's name")
    parser.add_argument("-i", "--interval", type=float, default=1.0, help="seconds per refresh")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        mm, g = L.open_segment(L.check_name(args.name))
    except (RingNotFoundError, ShmflushError, PermissionError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    view = memoryview(mm)
    try:
        return _loop(args, view, g)
    except KeyboardInterrupt:
        return 0
    finally:
        view.release()
        mm.close()


def _loop(args: argparse.Namespace, view: memoryview, g: L.Geometry) -> int:
    path = L.read_path(view).decode("utf-8", "replace")
    # Records/s: the records of the segments the flusher wrote since the last
    # refresh, read from the file (shared memory counts bytes, not records).
    at: Position | None = None
    if path and not args.once:
        with contextlib.suppress(OSError, ShmflushError):
            _, at = _count_new(path, None)
    interactive = not args.once and sys.stdout.isatty()
    prev = _snapshot(view, g)
    prev_t = time.monotonic()
    if not args.once:
        time.sleep(max(0.05, args.interval))
    while True:
        now = _snapshot(view, g)
        t = time.monotonic()
        dt = max(t - prev_t, 1e-6) if not args.once else 1.0
        records = 0
        if at is not None:
            with contextlib.suppress(OSError, ShmflushError):
                records, at = _count_new(path, at)
        rates = {
            "records": records / dt,
            "bytes": (now["bytes_written"] - prev["bytes_written"]) / dt,
            "fills": (now["buffers_flushed"] - prev["buffers_flushed"]) / dt,
            "syncs": (now["syncs"] - prev["syncs"]) / dt,
        }
        text = _render(args.name, g, now, rates)
        if interactive:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        gone = now["status"] & L.STATUS_FLUSHER_DONE or not os.path.exists(
            "/dev/shm/" + L.shm_name(args.name).lstrip("/")
        )
        if args.once or gone:
            return 0
        prev, prev_t = now, t
        time.sleep(max(0.05, args.interval))


def _count_new(path: str, at: Position | None) -> tuple[int, Position | None]:
    """Records written after ``at`` up to the end so far, and the new end."""
    n = 0
    start: Position | str = "end" if at is None else at
    with follow(path, start=start, wait=False, strict=False) as tail:
        for _ in tail:
            n += 1
        return n, tail.position
    return n
