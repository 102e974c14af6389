"""Tests of ``python -m shmflush demo`` (``shmflush/_tools/demo.py``).

The checker is tested on made-up record streams, each with one kind of damage;
the demo itself runs end to end in a subprocess, as a user would run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmflush._tools import demo as _demo

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


def _stream(writers: int = WRITERS, records: int = RECORDS, size: int = SIZE) -> list[bytes]:
    """Every writer's records, interleaved round-robin, as a correct file holds them."""
    patterns = [_demo.filler_pattern(w, size) for w in range(writers)]
    return [
        _demo.expected_record(w, seq, size, patterns[w])
        for seq in range(records)
        for w in range(writers)
    ]


def _failed(stream: list[bytes]) -> dict[str, str]:
    checks = _demo.verify(stream, WRITERS, RECORDS, SIZE)
    assert [c.name for c in checks] == list(CHECK_NAMES)
    return {c.name: c.detail for c in checks if not c.ok}


def test_verify_passes_interleaved_records_in_per_writer_order() -> None:
    assert _failed(_stream()) == {}


def test_verify_passes_records_of_one_writer_after_another() -> None:
    stream = sorted(_stream(), key=lambda r: _demo.HEADER.unpack_from(r)[0])
    assert _failed(stream) == {}


def test_consecutive_records_differ_in_nearly_every_filler_byte() -> None:
    first, second = _stream(writers=1, records=2, size=1012)
    same = sum(a == b for a, b in zip(first[12:], second[12:], strict=True))
    assert same < 50  # about 4 of the 1000 bytes match by chance


def test_verify_reports_a_missing_record() -> None:
    stream = _stream()
    del stream[7]  # writer 1, seq 2
    failed = _failed(stream)
    assert set(failed) == {"record count", "each record present exactly once"}
    assert "1 missing" in failed["each record present exactly once"]
    assert "writer 1 seq 2" in failed["each record present exactly once"]


def test_verify_reports_a_duplicated_record() -> None:
    stream = _stream()
    stream.append(stream[4])  # writer 1, seq 1, again at the end
    failed = _failed(stream)
    assert set(failed) == {
        "record count",
        "each record present exactly once",
        "per-writer order strictly increasing",
    }
    assert "1 duplicated" in failed["each record present exactly once"]


def test_verify_reports_two_records_of_one_writer_swapped() -> None:
    stream = _stream()
    stream[0], stream[WRITERS] = stream[WRITERS], stream[0]  # writer 0: seq 1 before seq 0
    failed = _failed(stream)
    assert set(failed) == {"per-writer order strictly increasing"}
    assert "writer 0 seq 0" in failed["per-writer order strictly increasing"]


@pytest.mark.parametrize("offset", [0, 5, 12, SIZE - 1])
def test_verify_reports_one_flipped_byte(offset: int) -> None:
    stream = _stream()
    damaged = bytearray(stream[10])
    damaged[offset] ^= 0x01
    stream[10] = bytes(damaged)
    failed = _failed(stream)
    assert "payload bytes intact" in failed
    assert "1 damaged" in failed["payload bytes intact"]


def test_verify_reports_a_truncated_record() -> None:
    stream = _stream()
    stream[10] = stream[10][:-1]
    assert set(_failed(stream)) == {"payload bytes intact"}


def test_verify_reports_a_record_no_writer_wrote() -> None:
    patterns = _demo.filler_pattern(WRITERS, SIZE)
    stranger = _demo.expected_record(WRITERS, 0, SIZE, patterns)
    failed = _failed([*_stream(), stranger])
    assert "1 unexpected" in failed["each record present exactly once"]
    assert "payload bytes intact" in failed


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
    import shmflush

    path = tmp_path / "kept.log"
    result = _run_demo(
        _demo_command(path, "--writers", "2", "--records", "300", "--size", "16", "--keep")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = _demo.verify(shmflush.read(str(path)), 2, 300, 16)
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
