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


def test_a_flusher_that_dies_after_its_file_was_deleted_breaks_the_ring_and_says_so(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    said = f"the file {path} was deleted while the ring was writing it"
    ring = shmflush.create(ring_name, path, buffer_size=8192, buffers=4, lanes=1)
    pid = ring.stats().flusher_pid
    close_error: shmflush.ShmflushError | None = None
    try:
        ring.append(b"durable")
        ring.sync(timeout=DEADLINE_S)
        # Stopped first, so that it cannot see the deletion itself: the flusher
        # that finds the file gone is the restarted one.  A restart opens the
        # file by its path, and used to die on ENOENT every few seconds for
        # ever while writers and close() waited out their timeouts.
        os.kill(pid, signal.SIGSTOP)
        ring.append(b"in shared memory only")
        path.unlink()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE_S
        while not ring.stats().broken:
            assert time.monotonic() < deadline, "the ring never said its file is gone"
            time.sleep(0.01)
        with pytest.raises(shmflush.RingBrokenError, match=re.escape(said)):
            ring.append(b"refused", timeout=DEADLINE_S)
        with pytest.raises(shmflush.RingBrokenError, match=re.escape(said)):
            ring.sync(timeout=DEADLINE_S)
        assert ring.stats().flusher_restarts == 0
    finally:
        started = time.monotonic()
        try:
            ring.close(timeout=DEADLINE_S)
        except shmflush.ShmflushError as exc:
            close_error = exc
        closing = time.monotonic() - started
    assert isinstance(close_error, shmflush.RingBrokenError)
    assert said in str(close_error)
    assert "1 record" in str(close_error)  # the one only in shared memory
    assert closing < DEADLINE_S, "close() waited for a flusher that can never run"
