"""Tests of ``python -m shmflush demo`` (``shmflush/_tools/demo.py``).

The checker itself is tested in test_workload.py; here, that the demo's report
lines say what the checker found, and the demo end to end in a subprocess, as a
user would run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmflush._tools import demo as _demo
from shmflush._tools.checker import Expected, check_records
from shmflush._tools.workload import Workload

WRITERS = 3
RECORDS = 40
SIZE = 50

CHECK_NAMES = (
    "record count",
    "each record present exactly once",
    "per-writer order strictly increasing",
    "payload bytes intact",
)
DEMO_TIMEOUT_S = 120
SHM_DIR = "/dev/shm"


def _failed(stream: list[bytes]) -> dict[str, str]:
    verdict = check_records(stream, Workload(size=SIZE), Expected.every(WRITERS, RECORDS))
    checks = _demo.checks(verdict, WRITERS, RECORDS, SIZE)
    assert [c.name for c in checks] == list(CHECK_NAMES)
    return {c.name: c.detail for c in checks if not c.ok}


def _stream() -> list[bytes]:
    workload = Workload(size=SIZE)
    return [workload.record(w, seq) for seq in range(RECORDS) for w in range(WRITERS)]


def test_report_passes_every_line_for_a_correct_file() -> None:
    assert _failed(_stream()) == {}


def test_report_fails_the_count_and_once_lines_for_a_missing_record() -> None:
    stream = _stream()
    del stream[7]  # writer 1, seq 2
    failed = _failed(stream)
    assert set(failed) == {"record count", "each record present exactly once"}
    assert failed["each record present exactly once"].startswith("1 lost (first: writer 1:")


def test_report_fails_the_order_line_for_two_records_of_one_writer_swapped() -> None:
    stream = _stream()
    stream[0], stream[WRITERS] = stream[WRITERS], stream[0]  # writer 0: seq 1 before seq 0
    failed = _failed(stream)
    assert set(failed) == {"per-writer order strictly increasing"}
    assert "writer 0 seq 0" in failed["per-writer order strictly increasing"]


def test_report_fails_the_bytes_line_for_a_flipped_byte() -> None:
    stream = _stream()
    stream[10] = stream[10][:-1] + bytes([stream[10][-1] ^ 1])
    failed = _failed(stream)
    assert set(failed) == {"payload bytes intact"}
    assert failed["payload bytes intact"].startswith("1 corrupt")


def test_report_fails_the_once_line_for_a_foreign_record() -> None:
    stranger = Workload(size=SIZE).record(WRITERS, 0)  # no writer 3 in this run
    failed = _failed([*_stream(), stranger])
    assert "1 foreign" in failed["each record present exactly once"]


def _demo_command(path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "shmflush", "demo", "--path", str(path), *options]


def _run_demo(command: list[str]) -> subprocess.CompletedProcess[str]:
    # A session of its own, so that a wedged demo goes down with its writers.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        finally:
            # The demo names its ring after its pid.  The leak check in conftest
            # cannot tell a dead demo's ring from another run's, so look here.
            leaked = [
                name for name in os.listdir(SHM_DIR) if f"shmflush.demo-{process.pid}" in name
            ]
            for name in leaked:
                os.unlink(os.path.join(SHM_DIR, name))
    assert not leaked, f"the demo left {leaked} in {SHM_DIR}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_demo_verifies_every_record_of_two_writers(tmp_path: Path, start_method: str) -> None:
    path = tmp_path / "d.log"
    command = _demo_command(path, "--writers", "2", "--records", "2000")
    if start_method != "spawn":  # spawn is the default; run it exactly as documented
        command += ["--start-method", start_method]
    result = _run_demo(command)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in CHECK_NAMES:
        assert f"PASS  {name}:" in result.stdout, output
    assert "FAIL" not in result.stdout, output
    assert "4000 records" in result.stdout, output
    assert "records/s" in result.stdout, output
    assert not path.exists(), "the demo removes its file unless --keep"


def test_demo_with_keep_leaves_the_file_it_checked(tmp_path: Path) -> None:
    path = tmp_path / "kept.log"
    result = _run_demo(
        _demo_command(path, "--writers", "2", "--records", "300", "--size", "16", "--keep")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = _demo.verify(str(path), 2, 300, 16)
    assert all(check.ok for check in checks), [str(check) for check in checks]


def test_demo_refuses_to_touch_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "precious.log"
    path.write_bytes(b"not a demo file")
    result = _run_demo(_demo_command(path, "--records", "10"))
    assert result.returncode == 1
    assert "exists" in result.stderr
    assert path.read_bytes() == b"not a demo file"


def test_demo_rejects_records_smaller_than_the_header() -> None:
    result = _run_demo([sys.executable, "-m", "shmflush", "demo", "--size", "15"])
    assert result.returncode == 2
    assert "--size" in result.stderr
