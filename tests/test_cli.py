"""The cat and top commands, run as subprocesses."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import shmflush

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "shmflush", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _log_file(ring_name: str, path: Path) -> None:
    ring = shmflush.create(ring_name, path)
    handler = shmflush.LogHandler(ring)
    log = logging.getLogger("test_cli.svc")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(5):
            log.info("user %s logged in", f"u{i}")
        ring.append(b"plain text")
        ring.append(b"\xff\xfe")
    finally:
        log.removeHandler(handler)
        ring.close()


def test_cat_json_text_raw_and_filters(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    _log_file(ring_name, path)
    out = _run("cat", str(path), "-o", "json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [x.get("message") for x in lines[:5]] == [f"user u{i} logged in" for i in range(5)]
    assert lines[5]["text"] == "plain text"
    assert "offset" in lines[5]
    assert lines[6]["payload_b64"] == "//4="
    text = _run("cat", str(path), "-n", "3")
    assert text.returncode == 0
    first = text.stdout.splitlines()[0]
    assert first.endswith("INFO test_cli.svc user u4 logged in")
    assert text.stdout.splitlines()[1:] == ["plain text", "\ufffd\ufffd"]
    raw = subprocess.run(
        [sys.executable, "-m", "shmflush", "cat", str(path), "-o", "raw", "--from", "-1"],
        capture_output=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert raw.stdout == b"\xff\xfe"
    grep = _run("cat", str(path), "--grep", "u[23]", "-o", "json")
    assert [json.loads(x)["message"] for x in grep.stdout.splitlines()] == [
        "user u2 logged in",
        "user u3 logged in",
    ]
    match = _run("cat", str(path), "--match", "message=user u1 logged in", "-o", "json")
    assert len(match.stdout.splitlines()) == 1


def test_cat_cursor_resumes_and_shows_itself(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    _log_file(ring_name, path)
    first = _run("cat", str(path), "--cursor", "ops", "--show-cursor", "-n", "2")
    assert first.returncode == 0
    assert "-- cursor: " in first.stderr
    again = _run("cat", str(path), "--cursor", "ops")
    assert again.stdout == ""  # nothing new since the cursor
    assert (tmp_path / "log.cursors" / "ops").exists()


def test_cat_exits_1_on_damage_and_never_prints_a_torn_record(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, buffer_size=1 << 12)
    for i in range(200):
        ring.append(b"rec%04d" % i)
        ring.sync()
    ring.close()
    data = bytearray(path.read_bytes())
    data[4096 * 3 + 100] ^= 0x10  # bit rot in the third segment
    path.write_bytes(bytes(data))
    out = _run("cat", str(path))
    assert out.returncode == 1
    assert "damage at bytes [12288" in out.stderr
    printed = out.stdout.splitlines()
    assert all(line.startswith("rec") and len(line) == 7 for line in printed)
    assert len(printed) < 200
    bad = _run("cat", str(tmp_path / "missing"))
    assert bad.returncode == 2


def test_top_once_shows_a_running_ring(ring_name: str, tmp_path: Path) -> None:
    ring = shmflush.create(ring_name, tmp_path / "log")
    try:
        ring.append(b"x")
        ring.sync()
        out = _run("top", ring_name, "--once")
    finally:
        ring.close()
    assert out.returncode == 0, out.stderr
    assert f"ring {ring_name}" in out.stdout
    assert "records/s" in out.stdout
    assert "buffers 8 x" in out.stdout
    assert "heartbeat" in out.stdout
    assert "lag" in out.stdout
    gone = _run("top", ring_name, "--once")
    assert gone.returncode == 2
    assert ring_name in gone.stderr
