"""``python -m shmflush cleanup``: find rings whose owner and flusher are both
dead, write out what they hold, and remove them."""

from __future__ import annotations

import argparse
import os
import subprocess

from . import _layout as L
from . import _proc, _supervisor
from ._errors import ShmflushError
from ._ring import attach_ring

SHM_DIR = "/dev/shm"


def _rings() -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n.removeprefix("shmflush.") for n in names if n.startswith("shmflush."))


def _drain(name: str, timeout: float) -> str:
    """Run a flusher on the dead ring: it sees the owner dead, drains every
    committed fill to the ring's file and unlinks the ring."""
    status, stderr = _supervisor.drain(name, timeout)
    if status:
        return f"drain failed ({stderr.strip().splitlines()[-1:]})"
    return "drained to its file"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shmflush cleanup",
        description="Remove shmflush rings whose owner and flusher are both dead, "
        "after writing their committed records to their file.",
    )
    parser.add_argument("--dry-run", action="store_true", help="only list what would be done")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per ring drain")
    args = parser.parse_args(argv)
    removed = 0
    for name in _rings():
        try:
            core = attach_ring(name)
        except ShmflushError as exc:
            print(f"{name}: not a usable ring ({exc}); removing")
            if not args.dry_run:
                L.unlink_segment(name)
                removed += 1
            continue
        except PermissionError:
            print(f"{name}: belongs to another user; skipped")
            continue
        try:
            owner = _proc.is_alive(core.header(L.H_OWNER_PID), core.header(L.H_OWNER_START))
            flusher = _supervisor.flusher_alive(core)
            path = L.read_path(core.view).decode(errors="replace")
            ring_id = core.header(L.H_RING_ID)
        finally:
            core.unmap()
        if owner or flusher:
            print(
                f"{name}: in use (owner {'alive' if owner else 'dead'}, "
                f"flusher {'alive' if flusher else 'dead'}); left alone"
            )
            continue
        if args.dry_run:
            print(f"{name}: owner and flusher dead; would drain to {path} and remove")
            continue
        try:
            outcome = _drain(name, args.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            outcome = f"drain failed ({exc})"
        # The drain may take a while: by now the name may belong to a new ring.
        found = L.unlink_segment_if_same(name, ring_id)
        removed += 1
        print(f"{name}: {outcome}; {'removed' if found else 'already removed'}")
    print(f"{removed} ring(s) removed")
    return 0
