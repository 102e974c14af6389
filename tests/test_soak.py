"""The crash-safety soak (scripts/soak.py), short: CI runs this; the long one is
run by hand (``python scripts/soak.py --seconds 600``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import shmflush
from shmflush import _soak

VERDICT = re.compile(
    r"^kills=(?P<kills>\d+) \(writers=(?P<writer_kills>\d+) flusher=\d+\) "
    r"appended=(?P<appended>\d+) in_file=(?P<in_file>\d+) lost=(?P<lost>\d+) "
    r"duplicated=(?P<duplicated>\d+) out_of_order=(?P<out_of_order>\d+) "
    r"corrupt=(?P<corrupt>\d+) abandoned=\d+ recovered=\d+ restarts=\d+ seconds=[\d.]+ "
    r"unacked_in_file=\d+ errors=(?P<errors>\d+) seed=\d+ geometry=(?P<geometry>\S+)$",
    re.MULTILINE,
)


def test_short_soak_with_random_kills_loses_and_duplicates_nothing(
    ring_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _soak.main(
        [
            *("--seconds", "8", "--writers", "3", "--seed", "1", "--geometry", "16K/8/2"),
            *("--dir", str(tmp_path), "--name", ring_name),
        ]
    )
    captured = capsys.readouterr()
    verdict = VERDICT.search(captured.out)
    assert verdict, f"no verdict line in {captured.out!r}"
    got = {k: v if k == "geometry" else int(v) for k, v in verdict.groupdict().items()}
    assert got["geometry"] == "16K/8/2"
    assert got["kills"] > 0
    assert got["writer_kills"] > 0
    problems = got["lost"], got["duplicated"], got["out_of_order"], got["corrupt"]
    assert problems == (0, 0, 0, 0), captured.err[-4000:]
    assert got["errors"] == 0, captured.err[-4000:]
    assert got["appended"] > 0
    assert got["in_file"] >= got["appended"]
    assert status == 0, captured.out
    assert not (tmp_path / "soak.log").exists(), "the file was not removed"


def test_check_file_counts_lost_duplicated_reordered_and_corrupt_records(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "check.log"
    large = _soak.large_limit(8192)
    good = [_soak.expected_record(1, seq, large) for seq in range(6)]
    damaged = bytearray(_soak.expected_record(2, 0, large))
    damaged[-1:] = b"\x00" if damaged[-1:] != b"\x00" else b"\x01"
    assert not any(_soak.is_tiny(1, seq) for seq in range(6))
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        # writer 1: 0 1 3 2 3 (4 and 5 acked but missing); writer 2: damaged seq 0
        for record in (good[0], good[1], good[3], good[2], good[3], bytes(damaged)):
            ring.append(record)
    check = _soak.check_file(str(path), {1: 5, 2: 0}, {1, 2}.__contains__, large=large)
    assert check.in_file == 6
    assert check.lost == 2
    assert check.out_of_order == 1
    assert check.duplicated == 1
    assert check.corrupt == 1
    assert not check.read_error
    assert not check.ok


def test_check_file_checks_tiny_records_in_aggregate(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "check.log"
    large = _soak.large_limit(16384)
    writer = 3
    tiny = [seq for seq in range(40) if _soak.is_tiny(writer, seq)]
    assert len(tiny) == 5
    # All 40 were acknowledged, but 30..34 are missing, and so are the tiny ones
    # in 20..29.
    missing = {*range(30, 35), *(s for s in tiny if 20 <= s < 30)}
    with shmflush.create(ring_name, path, buffer_size=16384, buffers=4) as ring:
        for seq in range(40):
            if seq not in missing:
                ring.append(_soak.expected_record(writer, seq, large))
        ring.append(b"tiny-recorX"[:11])  # a tiny record with the wrong bytes
    check = _soak.check_file(str(path), {writer: 39}, {writer}.__contains__, large=large)
    full_lost = sum(1 for s in range(30, 35) if not _soak.is_tiny(writer, s))
    tiny_lost = [s for s in tiny if s in missing]
    assert tiny_lost, "the test lost no tiny record"
    assert check.lost == full_lost + len(tiny_lost)
    assert check.lost_by_writer[writer] == [(30, full_lost)]
    assert check.tiny == len(tiny) - len(tiny_lost)  # the bad one is corrupt
    assert check.tiny_acked == len(tiny)
    assert check.corrupt == 1
    assert (check.duplicated, check.out_of_order, check.unacked_in_file) == (0, 0, 0)


def test_random_geometry_is_the_create_defaults_most_of_the_time() -> None:
    picks = [_soak.pick_geometry(seed) for seed in range(1000)]
    assert sum(g.is_default for g in picks) > 550
    labels = {g.label() for g in picks}
    assert len(labels) == 1 + len(_soak._GEOMETRIES), labels  # each one is drawn
    sizes = [g.resolved()[0] for g in picks]
    assert min(sizes) == 4096
    assert max(sizes) > 1 << 20


def test_record_lengths_run_from_empty_to_large_and_tiny_counts_add_up() -> None:
    large = _soak.large_limit(1 << 20)
    lengths = {}
    for writer in (1 << 16, 5 << 16 | 3):
        for seq in range(5000):
            record = _soak.expected_record(writer, seq, large)
            assert len(record) == _soak.record_length(writer, seq, large) <= large
            assert (len(record) < _soak.HEADER.size) == _soak.is_tiny(writer, seq)
            lengths[len(record)] = lengths.get(len(record), 0) + 1
        for lo, hi in ((0, 0), (0, 1), (3, 40), (7, 8), (100, 4999)):
            brute = sum(1 for q in range(lo, hi) if _soak.is_tiny(writer, q))
            assert _soak.tiny_count(writer, lo, hi) == brute
    assert lengths.get(0, 0) > 0  # empty records
    assert all(lengths.get(n, 0) for n in range(1, _soak.HEADER.size))  # 1..11 bytes
    assert lengths[_soak.HEADER.size] > 1000  # header and no filler
    assert max(lengths) > large // 2
