"""The crash-safety soak (scripts/soak.py), short: CI runs this; the long one is
run by hand (``python scripts/soak.py --seconds 600``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shmflush import _soak


def test_short_soak_with_random_kills_loses_and_duplicates_nothing(
    ring_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _soak.main(
        [
            *("--seconds", "8", "--writers", "3", "--seed", "1"),
            *("--dir", str(tmp_path), "--name", ring_name),
        ]
    )
    out = capsys.readouterr().out
    verdict = re.search(
        r"^kills=(\d+) \(writers=(\d+) flusher=(\d+)\) appended=(\d+) in_file=(\d+) "
        r"lost=(\d+) duplicated=(\d+) out_of_order=(\d+) corrupt=(\d+) abandoned=(\d+) ",
        out,
        re.MULTILINE,
    )
    assert verdict, f"no verdict line in {out!r}"
    kills, writer_kills, _, appended, in_file, lost, duplicated, disorder, corrupt, _ = map(
        int, verdict.groups()
    )
    assert status == 0, out
    assert kills > 0
    assert writer_kills > 0
    assert appended > 0
    assert in_file >= appended
    assert (lost, duplicated, disorder, corrupt) == (0, 0, 0, 0)
    assert not (tmp_path / "soak.log").exists(), "the file was not removed"


def test_check_file_counts_lost_duplicated_reordered_and_corrupt_records(
    ring_name: str, tmp_path: Path
) -> None:
    import shmflush

    path = tmp_path / "check.log"
    good = [_soak.expected_record(1, seq) for seq in range(6)]
    damaged = bytearray(_soak.expected_record(2, 0))
    damaged[-1:] = b"\x00" if damaged[-1:] != b"\x00" else b"\x01"
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        # writer 1: 0 1 3 2 3 (4 and 5 acked but missing); writer 2: damaged seq 0
        for record in (good[0], good[1], good[3], good[2], good[3], bytes(damaged)):
            ring.append(record)
    check = _soak.check_file(str(path), {1: 5, 2: 0}, {1, 2}.__contains__)
    assert check.in_file == 6
    assert check.lost == 2
    assert check.out_of_order == 1
    assert check.duplicated == 1
    assert check.corrupt == 1
    assert not check.read_error
    assert not check.ok
