"""Owner death and ``python -m shmflush cleanup``."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shmflush
from shmflush import _proc

OWNER = """
import os, struct, sys
import shmflush
ring = shmflush.create(sys.argv[1], sys.argv[2], buffer_size=8192, buffers=4,
                       flush_interval=3600)
for seq in range(int(sys.argv[3])):
    ring.append(struct.pack("<I", seq) * 25)
print(ring.stats().flusher_pid, flush=True)
sys.stdin.read()  # wait to be killed
"""


def _start_owner(name: str, path: Path, records: int) -> tuple[subprocess.Popen[str], int]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, name, str(path), str(records)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, "the owner did not start"
    return owner, int(line)


def _append_until_refused(ring: shmflush.Ring) -> None:
    for _ in range(10000):
        ring.append(b"x" * 100, timeout=5)


def _reap(owner: subprocess.Popen[str]) -> None:
    if owner.poll() is None:
        owner.kill()
    owner.wait(10)
    for pipe in (owner.stdin, owner.stdout):
        if pipe is not None:
            pipe.close()


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _proc.is_alive(pid, 0):
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.02)


def test_owner_death_drains_committed_records_and_removes_the_ring(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "orphan.log"
    owner, flusher = _start_owner(ring_name, path, 500)
    writer = shmflush.attach(ring_name)
    try:
        writer.append(b"from an attached writer")
        owner.kill()
        owner.wait(10)
        _wait_gone(flusher)
        # The attached writer hears about it, instead of hanging.
        with pytest.raises((shmflush.RingBrokenError, shmflush.RingClosedError)):
            _append_until_refused(writer)
    finally:
        writer.close()
        _reap(owner)
    assert not os.path.exists(f"/dev/shm/shmflush.{ring_name}")
    records = list(shmflush.read(path))
    assert records[:500] == [struct.pack("<I", seq) * 25 for seq in range(500)]
    assert b"from an attached writer" in records


def test_writers_are_told_the_owner_died_not_that_the_flusher_stopped(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "orphan.log"
    owner, flusher = _start_owner(ring_name, path, 10)
    writer = shmflush.attach(ring_name)
    try:
        writer.append(b"before the owner died")
        owner.kill()
        owner.wait(10)
        with pytest.raises(shmflush.RingBrokenError) as info:
            _append_until_refused(writer)
    finally:
        writer.close()
        _reap(owner)
    _wait_gone(flusher)
    assert str(info.value) == (
        f"ring {ring_name!r}: its owner (pid {owner.pid}) died without close(); committed "
        f"records are drained to {path}, the ring takes no more"
    )
    assert info.value.errno == 0
    assert b"before the owner died" in list(shmflush.read(path))


def test_cleanup_drains_and_removes_a_ring_whose_owner_and_flusher_died(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "dead.log"
    owner, flusher = _start_owner(ring_name, path, 300)
    try:
        # Kill the flusher first, so it cannot drain; then the owner.
        os.kill(flusher, signal.SIGSTOP)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        os.kill(flusher, signal.SIGKILL)
        _wait_gone(flusher)
    finally:
        _reap(owner)
    assert os.path.exists(f"/dev/shm/shmflush.{ring_name}")
    listing = subprocess.run(
        [sys.executable, "-m", "shmflush", "cleanup", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"{ring_name}: owner and flusher dead" in listing.stdout
    done = subprocess.run(
        [sys.executable, "-m", "shmflush", "cleanup"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"{ring_name}: drained to its file" in done.stdout
    assert not os.path.exists(f"/dev/shm/shmflush.{ring_name}")
    assert list(shmflush.read(path)) == [struct.pack("<I", seq) * 25 for seq in range(300)]
