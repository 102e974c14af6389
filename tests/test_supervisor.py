"""The flusher process's life (shmflush._supervisor): who starts it, and how it is
stopped.  Restarts after a crash are covered end to end by tests/test_crash.py,
the owner's death and ``cleanup`` by tests/test_owner_death.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

import shmflush
from shmflush import _supervisor

# Generous "did not hang" bounds, never timing assertions.
DEADLINE_S = 10.0


def test_only_the_supervisor_starts_flusher_processes() -> None:
    package = Path(shmflush.__file__).parent
    spawners = sorted(
        module.name
        for module in package.glob("*.py")
        if '"shmflush", "flusher"' in module.read_text()
    )
    assert spawners == ["_supervisor.py"]


def test_close_that_times_out_kills_the_flusher_at_its_timeout_not_5_s_later(
    ring_name: str, tmp_path: Path
) -> None:
    ring = shmflush.create(ring_name, tmp_path / "log", buffer_size=8192, buffers=4)
    pid = ring.stats().flusher_pid
    try:
        ring.append(b"never written")
        os.kill(pid, signal.SIGSTOP)  # alive but stuck: nothing restarts it
        started = time.monotonic()
        with pytest.raises(
            shmflush.RingTimeoutError, match=re.escape("did not drain within 0.5 s")
        ):
            ring.close(timeout=0.5)
        closing = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not _supervisor._proc.is_alive(pid, 0), "close() left the stuck flusher running"
    # It used to wait EXIT_GRACE (5 s) more for a flusher it already gave up on.
    assert closing < 0.5 + _supervisor.EXIT_GRACE - 1.0, f"close() took {closing:.1f} s"
