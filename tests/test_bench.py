"""Tests of the benchmark harness (``shmflush/_tools/bench.py``).

No timing is asserted here: only that the harness runs every method, checks what
each one wrote, reports a failed check as FAILED, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shmflush._tools import bench as _bench

WRITERS = 2
COUNT = 30
SIZE = 64


def _peer_file(path: Path, kind: str = "binary") -> list[bytes]:
    """A correct peer file: both writers' records, interleaved round-robin."""
    records = [_bench.workload(kind, SIZE).records(w, COUNT) for w in range(WRITERS)]
    stream = [records[w][seq] for seq in range(COUNT) for w in range(WRITERS)]
    path.write_bytes(b"".join(stream))
    return stream


def _verify(path: Path, kind: str = "binary") -> _bench.Check:
    return _bench.verify_file(
        str(path), family="peer", kind=kind, writers=WRITERS, count=COUNT, size=SIZE
    )


@pytest.mark.parametrize("kind", ["binary", "text"])
def test_verify_passes_a_correct_interleaved_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ok.dat"
    _peer_file(path, kind)
    check = _verify(path, kind)
    assert check.ok, check.detail
    assert f"{WRITERS * COUNT} records" in check.detail


@pytest.mark.parametrize("kind", ["binary", "text"])
def test_verify_reports_a_flipped_byte(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "flip.dat"
    stream = _peer_file(path, kind)
    data = bytearray(b"".join(stream))
    data[7 * SIZE + SIZE - 2] ^= 0x01  # record #7 is writer 1's record 3
    path.write_bytes(bytes(data))
    check = _verify(path, kind)
    assert not check.ok
    assert check.detail.startswith("1 corrupt (first: record #7 (writer 1 seq 3)")


def test_verify_reports_a_missing_record(tmp_path: Path) -> None:
    path = tmp_path / "short.dat"
    stream = _peer_file(path)
    del stream[4]
    path.write_bytes(b"".join(stream))
    check = _verify(path)
    assert not check.ok
    assert f"{WRITERS * COUNT - 1} records, expected {WRITERS * COUNT}" in check.detail
    assert "1 lost (first: writer 0: 1 records from seq 2" in check.detail


def test_verify_reports_two_records_of_one_writer_swapped(tmp_path: Path) -> None:
    path = tmp_path / "swap.dat"
    stream = _peer_file(path)
    stream[0], stream[2] = stream[2], stream[0]  # writer 0's records 0 and 1
    path.write_bytes(b"".join(stream))
    check = _verify(path)
    assert not check.ok
    assert "1 out of order (first: record #2 (writer 0 seq 0)" in check.detail


def test_verify_reports_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "torn.dat"
    stream = _peer_file(path)
    path.write_bytes(b"".join(stream)[:-10])
    check = _verify(path)
    assert not check.ok
    assert "bytes, expected" in check.detail


def test_option_parsing_of_sizes_writers_and_methods() -> None:
    assert _bench._record_sizes("100,1K,4KiB,64k") == [100, 1024, 4096, 65536]
    assert _bench._writer_counts("2,1,cpu") == sorted({1, 2, os.cpu_count() or 1})
    assert _bench._method_names("peers,append") == [
        "append",
        "mp_queue",
        "faster_fifo",
        "o_append",
        "logging",
    ]
    assert "append_fallback" not in _bench._method_names("all,shmflush")
    assert _bench._method_names("append_fallback,append") == ["append", "append_fallback"]
    with pytest.raises(SystemExit):
        _bench.main(["--sizes", "16"])  # below the smallest record size


def test_goals_refuses_options_that_pick_other_cells(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _bench.main(["--goals", "--sizes", "4K", "--writers", "1"])
    assert exit_info.value.code == 2
    assert "drop --sizes, --writers" in capsys.readouterr().err


GOAL_ROWS = [
    "append 100 B vs O_APPEND",
    "append 100 B vs mp.Queue",
    "append_many 100 B vs O_APPEND",
    "append_array 100 B of the device limit",
    "append 64 KiB of the device limit",
    "append 64 KiB vs O_APPEND+fsync",
    "reserve 100 B vs append",
    "append_fallback 100 B vs O_APPEND",
    "append 100 B p99 latency",
    "sync() p99 latency",
    "flusher CPU per GB written (append 100 B)",
    "flusher CPU per GB written (append 64 KiB)",
]


def test_goals_run_measures_every_row_against_a_peer_of_the_same_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "goals.json"
    status = _bench.main(
        [
            "--goals",
            *("--reps", "1", "--records", "200", "--limit-size", "4M"),
            *("--latency-appends", "500", "--syncs", "3", "--no-chart"),
            *("--dir", str(tmp_path), "--json", str(json_path)),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith("shmflush bench\ncommand:   python -m shmflush bench --goals")
    assert "machine:" in out
    report = json.loads(json_path.read_text())
    rows = {row["goal"]: row for row in report["goals"]}
    assert list(rows) == GOAL_ROWS
    unavailable = _bench._availability()
    for goal, row in rows.items():
        if goal.startswith("append_array") and "append_array" in unavailable:
            continue
        assert row["value"] is not None, row
        # CPU time comes in clock ticks: a tiny run's flusher may not use one.
        assert row["value"] >= 0 if row["unit"] == "s/GB" else row["value"] > 0, row
        assert goal in out
    cells = {(c["method"], c["size"]): c for c in report["cells"]}
    assert set(cells) == set(_bench.GOAL_CELLS)
    assert {c["writers"] for c in report["cells"]} == {2}
    # The fallback row's ring (its flusher) and writers ran with SHMFLUSH_FENCE=off,
    # and only they.
    (fallback,) = cells[("append_fallback", 100)]["reps"]
    assert fallback["fence_off"] == {"writers": True, "flusher": True}
    (plain,) = cells[("append", 100)]["reps"]
    assert plain["fence_off"] == {"writers": False, "flusher": False}
    assert "SHMFLUSH_FENCE" not in os.environ
    assert plain["flusher_cpu_s"] is not None
    assert [r["size"] for r in report["latency"]["append"]] == [100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["goals.json"]


def test_quick_run_checks_every_method_and_writes_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "bench.json"
    chart_path = tmp_path / "bench.png"
    status = _bench.main(
        [
            "--quick",
            "--sizes",
            "100",
            "--writers",
            "1,2",
            "--latency-appends",
            "2000",
            "--syncs",
            "5",
            "--dir",
            str(tmp_path),
            "--json",
            str(json_path),
            "--chart",
            str(chart_path),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "FAILED" not in out
    assert out.startswith("shmflush bench\ncommand:   python -m shmflush bench --quick")

    report = json.loads(json_path.read_text())
    unavailable = _bench._availability()
    cells = report["cells"]
    assert {(c["method"], c["writers"]) for c in cells} == {
        (m.name, w) for m in _bench.GROUPED for w in (1, 2)
    }
    for cell in cells:
        if cell["method"] in unavailable:
            assert cell["status"] == "skipped"
            assert "not available" in cell["note"]
            assert cell["method"] in out  # the table says so too
            continue
        assert cell["status"] == "ok", cell
        assert len(cell["reps"]) == 1
        (rep,) = cell["reps"]
        assert rep["ok"], rep
        assert rep["records"] == cell["writers"] * cell["records_per_writer"]
        assert rep["records_per_s"] > 0
        assert cell["summary"]["records_per_s"]["median"] == rep["records_per_s"]
    ran = {c["method"] for c in cells if c["status"] == "ok"}
    assert {"append", "append_many", "reserve", "mp_queue", "o_append", "logging"} <= ran
    assert {r["versus"] for r in report["ratios"]} >= {"mp_queue", "o_append", "logging", "limit"}
    assert report["limit"]["bytes_per_s"] > 0
    assert report["latency"]["append"][0]["p50_ns"] > 0
    assert report["latency"]["sync"]["syncs"] == 5
    assert report["machine"]["file_system"]["fs_type"] != "unknown"
    if "no chart" not in out:
        assert chart_path.read_bytes().startswith(b"\x89PNG")
    # The run's own directory (and every file in it) is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (json_path, chart_path) if p.exists()
    )


def test_a_failed_check_marks_the_cell_failed_and_the_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def corrupt_file(path: str, **_: object) -> _bench.Check:
        return _bench.Check(False, "record #0 of this writer differs (made up by the test)")

    monkeypatch.setattr(_bench, "verify_file", corrupt_file)
    monkeypatch.setattr(_bench, "_availability", lambda: {"faster_fifo": "not available: test"})
    json_path = tmp_path / "bench.json"
    status = _bench.main(
        [
            "--quick",
            "--sizes",
            "100",
            "--writers",
            "1",
            "--methods",
            "o_append,faster_fifo",
            "--latency-appends",
            "0",
            "--syncs",
            "0",
            "--no-chart",
            "--dir",
            str(tmp_path),
            "--json",
            str(json_path),
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "FAILED o_append 100 B 1 writers rep 1: record #0" in out
    cells = {c["method"]: c for c in json.loads(json_path.read_text())["cells"]}
    assert cells["o_append"]["status"] == "FAILED"
    assert cells["faster_fifo"]["status"] == "skipped"
    assert cells["faster_fifo"]["note"] == "not available: test"
