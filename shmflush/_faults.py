"""Fault injection: named crash points, switched on by an environment variable.

``SHMFLUSH_CRASH_AT=POINT`` (or ``POINT@N`` for the N-th time the point is
reached, counting from 1) makes the process that reaches it exit at once with
``os._exit(CRASH_STATUS)``: no cleanup, no flush, like a SIGKILL at that instant.
The crash tests and ``scripts/soak.py`` use it.

When the variable is unset, ``ENABLED`` is False and nothing here runs: each
crash point in the code is one load of a module constant (``_ring._FAULTS``)
and a branch.  The points sit in the path production runs (``_ring.Writer``,
the flusher), so a crash test kills the code that runs every day.
"""

from __future__ import annotations

import os
from typing import Final

CRASH_STATUS: Final = 86

POINTS: Final = frozenset(
    {
        "append.claimed",  # after a successful claim, before the payload
        "append.copied",  # after the payload, before the record header
        "append.headed",  # after the header, before the commit
        "append.committed",  # after the commit, before leaving the append
        "chunk.returned",  # a writer won its chunk's tail, before committing it
        "flush.chunk_taken",  # the flusher won a chunk's tail, before committing it
        "reserve.open",  # inside a reserve() block
        "close.sealed",  # crossing writer: after sealing, before the extent
        "close.addressed",  # after the extent is stored, before CLOSED
        "rotate.reserved",  # after reserving a buffer, before installing it
        "rotate.installed",  # after installing it in the lane, before opening it
        "flush.taken",  # flusher: fill taken, not written
        "flush.written",  # flusher: batch written, not synced
        "flush.synced",  # flusher: batch synced, buffers not reset
        "flush.zeroed",  # flusher: buffer zeroed, not yet IDLE
        "roll.opened",  # flusher: next file created and locked, no header yet
        "roll.headed",  # flusher: its header durable, no address maps to it yet
        "roll.switched",  # flusher: new addresses go to it, the old file not finished
        "roll.finished",  # flusher: old file cut and closed, hook and retention not run
    }
)


def _parse(spec: str) -> tuple[str, int]:
    point, _, nth = spec.partition("@")
    if point not in POINTS:
        raise ValueError(
            f"SHMFLUSH_CRASH_AT: unknown crash point {point!r}; known: {sorted(POINTS)}"
        )
    count = int(nth) if nth else 1
    if count < 1:
        raise ValueError(f"SHMFLUSH_CRASH_AT: N in {spec!r} must be >= 1")
    return point, count


_SPEC = os.environ.get("SHMFLUSH_CRASH_AT", "")
ENABLED: Final = bool(_SPEC)
_point, _remaining = _parse(_SPEC) if _SPEC else ("", 0)


def reached(point: str) -> None:
    """Crash here if this is the armed point (call only under ``if ENABLED``)."""
    global _remaining
    if point != _point:
        return
    _remaining -= 1
    if _remaining == 0:
        os._exit(CRASH_STATUS)
