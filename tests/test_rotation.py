"""Rotation and retention (docs/rotation.md): rolls by size and by age under
live writers, a flusher killed mid-roll, retention and cursors, prune, the hook."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import shmflush
from shmflush import _faults, _files, _format
from shmflush._follow import Position, store_cursor

ROOT = Path(__file__).resolve().parent.parent
ROLL_POINTS = sorted(p for p in _faults.POINTS if p.startswith("roll."))


def _writer(ring: shmflush.Ring, writer: int, n: int, errors: list[BaseException]) -> None:
    try:
        for seq in range(n):
            ring.append(struct.pack("<II", writer, seq) + b"w" * (seq % 200), timeout=30)
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def _check_per_writer(records: list[bytes], counts: dict[int, int]) -> None:
    seen: dict[int, list[int]] = {w: [] for w in counts}
    for record in records:
        writer, seq = struct.unpack_from("<II", record)
        assert record[8:] == b"w" * (seq % 200), f"record {writer}/{seq} torn"
        seen[writer].append(seq)
    for w, n in counts.items():
        assert seen[w] == list(range(n)), f"writer {w} lost, repeated or reordered records"


def _numbers(path: Path) -> list[int]:
    return [n for n, _ in _files.list_files(str(path))]


def _prune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmflush", "prune", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )


def test_rolls_by_size_under_live_writers_read_and_follow_get_every_record_once(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "app.log"
    ring = shmflush.create(ring_name, path, buffer_size=8192, buffers=4, segment_bytes=8 * 4096)
    followed: list[bytes] = []
    follow_errors: list[BaseException] = []

    def follow() -> None:
        try:
            with shmflush.follow(path, cursor="live") as records:
                for record in records:
                    followed.append(record.payload)
                    if len(followed) % 250 == 0:
                        records.commit()
        except BaseException as exc:
            follow_errors.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    errors: list[BaseException] = []
    writers = [threading.Thread(target=_writer, args=(ring, w, 3000, errors)) for w in range(3)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    ring.close()
    follower.join(60)
    assert not follower.is_alive(), "the follower did not end after the ring closed"
    assert not errors, errors
    assert not follow_errors, follow_errors
    assert len(_numbers(path)) >= 3, "the stream did not roll"
    records = list(shmflush.read(path))
    _check_per_writer(records, {0: 3000, 1: 3000, 2: 3000})
    assert followed == records
    # Every file is its own valid file of the one stream, numbered in its header.
    streams = set()
    for number, name in _files.list_files(str(path)):
        header = _files.header_of(name)
        assert header is not None
        assert header.file_no == number
        streams.add(header.stream_id)
    assert len(streams) == 1


def test_rolls_by_age_on_the_wall_clock(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "age.log"
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4, segment_age=1) as ring:
        deadline = time.monotonic() + 3.5
        seq = 0
        while time.monotonic() < deadline:
            ring.append(struct.pack("<II", 0, seq) + b"w" * (seq % 200), timeout=30)
            seq += 1
            if seq % 100 == 0:
                time.sleep(0.01)
    files = _files.list_files(str(path))
    assert len(files) >= 2, "no roll in 3.5 s with segment_age=1"
    seconds = [_files.header_of(name).created_ns // 10**9 for _, name in files]  # type: ignore[union-attr]
    # Aligned: each file after the first starts in a later whole second.
    assert seconds == sorted(set(seconds))
    _check_per_writer(list(shmflush.read(path)), {0: seq})


@pytest.mark.parametrize("point", ROLL_POINTS)
def test_flusher_killed_mid_roll_loses_nothing(
    ring_name: str, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "crash.log"
    monkeypatch.setenv("SHMFLUSH_CRASH_AT", point)  # restarts run clean
    ring = shmflush.create(ring_name, path, buffer_size=8192, buffers=4, segment_bytes=6 * 4096)
    monkeypatch.delenv("SHMFLUSH_CRASH_AT")
    errors: list[BaseException] = []
    with ring:
        _writer(ring, 0, 4000, errors)
        ring.sync(timeout=30)
        assert ring.stats().flusher_restarts >= 1, "the flusher never reached the crash point"
    assert not errors
    _check_per_writer(list(shmflush.read(path)), {0: 4000})
    # The next create() appends to the stream's active file and rolls on.
    with shmflush.create(ring_name, path, buffer_size=8192, segment_bytes=6 * 4096) as ring:
        _writer(ring, 1, 500, errors)
    _check_per_writer(list(shmflush.read(path)), {0: 4000, 1: 500})


def _rolled_stream(ring_name: str, path: Path, **options: object) -> None:
    with shmflush.create(
        ring_name, path, buffer_size=8192, buffers=4, segment_bytes=4 * 4096, **options
    ) as ring:
        _writer(ring, 0, 3000, [])


def test_retention_never_deletes_a_file_a_cursor_needs(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "kept.log"
    # A cursor in file 0, before the stream has even rolled.
    with shmflush.create(ring_name, path, buffer_size=8192) as ring:
        ring.append(b"first")
    stream = _files.header_of(str(path)).stream_id  # type: ignore[union-attr]
    store_cursor(str(path) + ".cursors/slow", Position(stream, 4096, 0, 0))
    _rolled_stream(ring_name, path, retain_files=2)
    assert _numbers(path)[0] == 0, "retention deleted the file the cursor points into"
    assert len(_numbers(path)) > 2
    # Once the cursor moves on, retention (here: prune) deletes down to the limit.
    last = _numbers(path)[-1]
    store_cursor(str(path) + ".cursors/slow", Position(stream, 4096, 0, last))
    done = _prune(str(path))
    assert done.returncode == 0, done.stderr
    assert _numbers(path) == [last - 1, last]
    records = list(shmflush.read(path))
    assert records
    assert b"first" not in records


def test_retention_deletes_oldest_files_after_a_roll(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "ret.log"
    _rolled_stream(ring_name, path, retain_files=3)
    numbers = _numbers(path)
    # At most one over: the last roll's retention runs once its file is finished.
    assert len(numbers) <= 3 + 1, numbers
    assert numbers[0] > 0
    assert numbers == list(range(numbers[0], numbers[-1] + 1))


def test_retention_wins_warns(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "wins.log"
    _rolled_stream(ring_name, path)
    stream = _files.header_of(str(path)).stream_id  # type: ignore[union-attr]
    store_cursor(str(path) + ".cursors/slow", Position(stream, 4096, 0, 0))
    settings = _files.Settings(retain_files=2, retention_wins=True)
    with pytest.warns(shmflush.RetentionWarning, match="slow"):
        _files.apply(str(path), settings)
    assert len(_numbers(path)) == 2
    # And the command line says so on stderr.
    _rolled_stream(ring_name, path)
    store_cursor(str(path) + ".cursors/slow", Position(stream, 4096, 0, _numbers(path)[0]))
    done = _prune(str(path), "--retain-files", "1", "--retention-wins")
    assert done.returncode == 0
    assert "slow" in done.stderr
    assert "retention_wins" in done.stderr
    assert len(_numbers(path)) == 1


def test_prune_dry_run_deletes_nothing_and_lists_what_it_would(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "dry.log"
    _rolled_stream(ring_name, path)
    before = sorted(os.listdir(tmp_path))
    done = _prune(str(path), "--retain-files", "2", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == before
    lines = done.stdout.splitlines()
    closed = len(_numbers(path)) - 1
    assert sum(line.startswith("would delete") for line in lines) == closed - 1
    assert sum(line.startswith("keep") for line in lines) == 1
    assert lines[-1] == f"{closed - 1} of {closed} closed file(s) would be deleted (dry run)"
    assert str(path) in lines[0]
    # Without --dry-run it does what it listed.
    done = _prune(str(path), "--retain-files", "2")
    assert done.returncode == 0
    assert len(_numbers(path)) == 2
    # With no rule anywhere it refuses (exit 2), deleting nothing.
    refused = _prune(str(path))
    assert refused.returncode == 2
    assert "no retention rule" in refused.stderr


def test_hook_runs_once_per_closed_file(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "hook.log"
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (
        "import os, sys; p = sys.argv[1]; "
        f"open(os.path.join({str(marks)!r}, os.path.basename(p)), 'x').close()"
    )
    _rolled_stream(ring_name, path, on_segment_closed=[sys.executable, "-c", script])
    closed = {os.path.basename(name) for _, name in _files.list_files(str(path))[:-1]}
    assert closed
    assert set(os.listdir(marks)) == closed


def test_failing_hook_does_not_stop_the_ring(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    for hook in ([sys.executable, "-c", "raise SystemExit(3)"], [str(tmp_path / "missing")]):
        _rolled_stream(ring_name, path, on_segment_closed=hook)
    records = list(shmflush.read(path))
    assert len(records) == 6000
    assert len(_numbers(path)) >= 3


def test_create_refuses_bad_rotation_settings(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.log"
    with pytest.raises(ValueError, match="multiple of 4096"):
        shmflush.create(ring_name, path, segment_bytes=10000)
    with pytest.raises(TypeError, match="on_segment_closed"):
        shmflush.create(ring_name, path, on_segment_closed="gzip")  # type: ignore[arg-type]
    assert not path.exists()


def test_cat_and_verify_read_every_file_of_the_stream(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "cli.log"
    with shmflush.create(
        ring_name, path, buffer_size=8192, buffers=4, segment_bytes=2 * 4096
    ) as ring:
        for i in range(400):
            ring.append(b"line %d" % i)
            if i % 50 == 49:
                ring.sync(timeout=30)  # a fill per batch, so that the stream rolls
    assert len(_numbers(path)) >= 3
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cat = subprocess.run(
        [sys.executable, "-m", "shmflush", "cat", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout.splitlines() == [f"line {i}" for i in range(400)]
    verify = subprocess.run(
        [sys.executable, "-m", "shmflush", "verify", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout
    assert '"records": 400' in verify.stdout


def test_retention_keeps_a_closed_file_a_flusher_still_holds(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "held.log"
    _rolled_stream(ring_name, path)
    oldest = _files.list_files(str(path))[0][1]
    fd = os.open(oldest, os.O_RDONLY)
    try:
        assert _files.lock_exclusive(fd)  # as a flusher holds a file it has not finished
        verdicts = _files.apply(str(path), _files.Settings(retain_files=1))
        assert verdicts
        assert not any(v.delete for v in verdicts)  # and so none after it: no hole
        assert os.path.exists(oldest)
    finally:
        os.close(fd)
    assert all(v.delete for v in _files.apply(str(path), _files.Settings(retain_files=1)))
    assert len(_numbers(path)) == 1


def test_a_cursor_survives_rotation(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "cur.log"
    ring = shmflush.create(ring_name, path, buffer_size=8192, buffers=4, segment_bytes=2 * 4096)
    try:
        for i in range(300):
            ring.append(b"a%d" % i)
        ring.sync(timeout=30)
        with shmflush.follow(path, cursor="ship", wait=False) as records:
            first = [r.payload for _, r in zip(range(200), records, strict=False)]
            records.commit()
        for i in range(300):
            ring.append(b"b%d" % i)
            if i % 60 == 59:
                ring.sync(timeout=30)  # more fills, more rolls
    finally:
        ring.close()
    assert len(_numbers(path)) >= 3
    with shmflush.follow(path, cursor="ship") as records:
        rest = [r.payload for r in records]
    assert first + rest == [b"a%d" % i for i in range(300)] + [b"b%d" % i for i in range(300)]


def test_a_torn_header_left_by_a_crashed_roll_is_skipped_by_readers_and_reused(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "torn.log"
    _rolled_stream(ring_name, path)
    last = _numbers(path)[-1]
    torn = Path(_files.file_path(str(path), last + 1))
    torn.write_bytes(_format.pack_file_header(bytes(16), 1, last + 1, 0)[:40])
    want = list(shmflush.read(path))
    assert len(want) == 3000
    with shmflush.follow(path) as records:
        assert [r.payload for r in records] == want
    # The next ring appends to the real active file, and its roll reuses the name.
    with shmflush.create(ring_name, path, buffer_size=8192, segment_bytes=2 * 4096) as ring:
        for i in range(300):
            ring.append(b"more %d" % i)
            if i % 60 == 59:
                ring.sync(timeout=30)
    header = _files.header_of(str(torn))
    assert header is not None
    assert header.file_no == last + 1
    assert list(shmflush.read(path)) == want + [b"more %d" % i for i in range(300)]
