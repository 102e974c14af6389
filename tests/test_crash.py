"""Crash tests: kill a process at every named crash point, then check the file
record by record.

A writer process runs with ``SHMFLUSH_CRASH_AT`` set and dies (``os._exit``) at
the point; after each append returns it reports the sequence number through a
pipe, unbuffered, so the test knows exactly which appends returned.  A second,
live writer keeps appending through the crash and must not stall for longer than
the recovery timeout.  Then the owner closes, and:

* every record whose append returned is in the file, exactly once;
* nothing is duplicated, and each writer's records are in order;
* the dead writer's unfinished claim shows up, at most, as an abandoned record.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import shmflush
from shmflush import _faults

WRITER = """
import os, struct, sys
import shmflush
ring = shmflush.attach(sys.argv[1])
out = int(sys.argv[2])
use_reserve = sys.argv[3] == "reserve"
for seq in range(int(sys.argv[4])):
    record = struct.pack("<II", 1, seq) + bytes([seq % 251]) * (seq * 37 % 700)
    if use_reserve:
        with ring.reserve(len(record), timeout=20) as view:
            view[:] = record
    else:
        ring.append(record, timeout=20)
    os.write(out, struct.pack("<I", seq))
ring.close()
"""

WRITER_POINTS = sorted(p for p in _faults.POINTS if not p.startswith(("flush.", "roll.")))


def _live_writer(
    ring: shmflush.Ring, stop: threading.Event, done: list[int], gaps: list[float]
) -> None:
    seq = 0
    last = time.monotonic()
    while not stop.is_set() and seq < 20000:
        ring.append(struct.pack("<II", 2, seq) + b"L" * (seq % 300), timeout=20)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        seq += 1
    done.append(seq)


def _check(path: Path, returned: int, live: int) -> None:
    seen: dict[int, list[int]] = {1: [], 2: []}
    reader = shmflush.read(path)
    for record in reader:
        writer, seq = struct.unpack_from("<II", record)
        seen[writer].append(seq)
        if writer == 1:
            assert record[8:] == bytes([seq % 251]) * (seq * 37 % 700), f"record 1/{seq} torn"
        else:
            assert record[8:] == b"L" * (seq % 300), f"record 2/{seq} torn"
    assert seen[2] == list(range(live)), "the live writer lost or reordered records"
    crashed = seen[1]
    assert crashed == sorted(set(crashed)), (
        "the crashed writer's records are duplicated or out of order"
    )
    # Every append that returned is there; at most the one in flight beyond.
    assert crashed[:returned] == list(range(returned))
    assert len(crashed) <= returned + 1


@pytest.mark.parametrize("point", WRITER_POINTS)
def test_writer_killed_at_crash_point_loses_nothing_that_returned(
    ring_name: str, tmp_path: Path, point: str
) -> None:
    path = tmp_path / "crash.log"
    mode = "reserve" if point == "reserve.open" else "append"
    # The 3rd time for the per-record points; the 1st for the rarer ones.
    nth = 3 if point.startswith(("append.", "reserve.")) else 1
    with shmflush.create(
        ring_name,
        path,
        buffer_size=8192,
        buffers=6,
        lanes=2,
        recovery_timeout=0.2,
        flush_interval=0.02,
    ) as ring:
        read_end, write_end = os.pipe()
        env = dict(os.environ, SHMFLUSH_CRASH_AT=f"{point}@{nth}")
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, ring_name, str(write_end), mode, "400"],
            pass_fds=(write_end,),
            env=env,
        )
        os.close(write_end)
        stop = threading.Event()
        done: list[int] = []
        gaps: list[float] = []
        live = threading.Thread(target=_live_writer, args=(ring, stop, done, gaps))
        live.start()
        try:
            assert child.wait(30) == _faults.CRASH_STATUS, (
                "the writer did not reach its crash point"
            )
            returned = 0
            while chunk := os.read(read_end, 4096):
                returned = struct.unpack_from("<I", chunk, len(chunk) - 4)[0] + 1
            time.sleep(0.6)  # let the live writer run past the recovery
        finally:
            stop.set()
            live.join(60)
            os.close(read_end)
            if child.poll() is None:
                child.kill()
                child.wait()
        assert not live.is_alive()
        assert done, "the live writer did not finish"
        ring.sync(timeout=10)
    _check(path, returned, done[0])
    # Nobody stalled much longer than the recovery timeout (generous for slow CI).
    assert max(gaps) < 5.0


FLUSHER_POINTS = sorted(p for p in _faults.POINTS if p.startswith("flush."))


@pytest.mark.parametrize("point", FLUSHER_POINTS)
def test_flusher_killed_at_crash_point_is_restarted_and_loses_nothing(
    ring_name: str, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "flusher.log"
    # Only the first flusher inherits the crash point: restarts run clean.
    monkeypatch.setenv("SHMFLUSH_CRASH_AT", f"{point}@2")
    ring = shmflush.create(ring_name, path, buffer_size=8192, buffers=4, flush_interval=0.01)
    monkeypatch.delenv("SHMFLUSH_CRASH_AT")
    with ring:
        first = ring.stats().flusher_pid
        records = [struct.pack("<II", 1, seq) + b"f" * (seq % 500) for seq in range(3000)]
        for k, record in enumerate(records):
            ring.append(record, timeout=30)
            if k % 500 == 0:
                # From another thread: this one's chunk is then an idle
                # writer's, which the flusher takes back (flush.chunk_taken).
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(ring.sync, 30).result(60)
        ring.sync(timeout=30)
        stats = ring.stats()
        assert stats.flusher_restarts >= 1
        assert stats.flusher_pid != first
    assert list(shmflush.read(path)) == records


def test_flusher_killed_by_sigkill_is_restarted(ring_name: str, tmp_path: Path) -> None:
    import signal

    path = tmp_path / "kill.log"
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        records = [struct.pack("<I", seq) * 10 for seq in range(2000)]
        for k, record in enumerate(records):
            if k % 400 == 200:
                # The pid may already be gone (the last restart is still starting).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ring.stats().flusher_pid, signal.SIGKILL)
            ring.append(record, timeout=30)
        ring.sync(timeout=30)
        assert ring.stats().flusher_restarts >= 1
    assert list(shmflush.read(path)) == records
