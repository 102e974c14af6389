"""Batch and numpy appends: append_many, append_array, read_array."""

from __future__ import annotations

import multiprocessing
import struct
from pathlib import Path

import numpy as np
import pytest

import shmflush
from shmflush import _ring

RECORD = np.dtype([("writer", "<u4"), ("seq", "<u8"), ("value", "<f8"), ("tag", "S5")])


def test_append_many_round_trips_records_of_every_size(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    rng = np.random.default_rng(7)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 3000, size=2000)]
    records += [b"", b"tail"]
    with shmflush.create(ring_name, path, buffer_size=16384, buffers=4, lanes=1) as ring:
        big = b"B" * ring.max_record
        assert ring.append_many([*records[:1000], big, *records[1000:]]) == len(records) + 1
        assert ring.stats().records == len(records) + 1
    assert list(shmflush.read(path)) == [*records[:1000], big, *records[1000:]]


def test_append_many_claims_up_to_what_is_left_of_the_buffer(
    ring_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1000 records of 100 B (112 KiB) in a 1 MiB buffer: one claim takes them
    # all (up to what is left of the fill), or, in fallback mode, one per
    # batch of up to 64 KiB: far fewer fetch-and-adds than records.
    path = tmp_path / "c.log"
    calls = 0
    real = _ring.Writer.claim

    def counting(self: _ring.Writer, need: int, want: int, deadline: float | None) -> None:
        nonlocal calls
        calls += 1
        real(self, need, want, deadline)

    monkeypatch.setattr(_ring.Writer, "claim", counting)
    with shmflush.create(ring_name, path, buffer_size=1 << 20, buffers=4, lanes=1) as ring:
        ring.append_many([bytes([k % 256]) * 100 for k in range(1000)])
        fenced = ring._tls.slot.fenced
    assert 1 <= calls <= (1 if fenced else 3)
    assert list(shmflush.read(path)) == [bytes([k % 256]) * 100 for k in range(1000)]


def test_append_array_round_trips_a_structured_array(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    rows = np.zeros(5000, dtype=RECORD)
    rows["writer"] = 3
    rows["seq"] = np.arange(5000)
    rows["value"] = np.linspace(0, 1, 5000)
    rows["tag"] = b"abcde"
    with shmflush.create(ring_name, path, buffer_size=16384, buffers=4) as ring:
        assert ring.append_array(rows[:10]) == 10
        assert ring.append_array(rows[10:]) == 4990
        assert ring.append_array(rows[:0]) == 0
    back = shmflush.read_array(path, RECORD)
    assert back.dtype == RECORD
    np.testing.assert_array_equal(back, rows)
    back["seq"][0] = 99  # writable


def test_append_array_round_trips_rows_of_a_2d_uint8_array(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "u.log"
    data = np.random.default_rng(1).integers(0, 256, size=(3000, 13), dtype=np.uint8)
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        ring.append_array(data)
    assert list(shmflush.read(path)) == [row.tobytes() for row in data]
    np.testing.assert_array_equal(shmflush.read_array(path, (np.uint8, (13,))), data)


def test_append_array_rejects_bad_arrays(ring_name: str, tmp_path: Path) -> None:
    with shmflush.create(ring_name, tmp_path / "b.log", buffer_size=8192, buffers=4) as ring:
        with pytest.raises(TypeError, match="numpy array"):
            ring.append_array([b"abc"])
        with pytest.raises(ValueError, match="C-contiguous"):
            ring.append_array(np.zeros((10, 10), np.uint8)[:, ::2])
        with pytest.raises(ValueError, match="at least one dimension"):
            ring.append_array(np.array(3, np.uint8))
        with pytest.raises(shmflush.RecordTooLargeError):
            ring.append_array(np.zeros((2, ring.max_record + 1), np.uint8))


def test_read_array_names_a_record_of_the_wrong_size(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        ring.append(b"x" * 8)
        ring.append(b"y" * 9)
    with pytest.raises(ValueError, match="record 1 has 9 bytes"):
        shmflush.read_array(path, np.uint64)


def _batch_writer(ring: shmflush.Ring, writer: int, batches: int, per_batch: int) -> None:
    seq = 0
    for b in range(batches):
        if b % 2:
            rows = np.zeros(per_batch, dtype=RECORD)
            rows["writer"] = writer
            rows["seq"] = np.arange(seq, seq + per_batch)
            ring.append_array(rows, timeout=30)
        else:
            ring.append_many(
                [
                    np.array([(writer, seq + k, 0.0, b"")], dtype=RECORD).tobytes()
                    for k in range(per_batch)
                ],
                timeout=30,
            )
        seq += per_batch
    ring.close()


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_batches_keep_per_writer_order_across_lanes(
    ring_name: str, tmp_path: Path, start_method: str
) -> None:
    path = tmp_path / "o.log"
    ctx = multiprocessing.get_context(start_method)
    writers, batches, per_batch = 4, 40, 50
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=8, lanes=3) as ring:
        procs = [
            ctx.Process(target=_batch_writer, args=(ring, w, batches, per_batch))
            for w in range(writers)
        ]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
                assert p.exitcode == 0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
    rows = shmflush.read_array(path, RECORD)
    assert len(rows) == writers * batches * per_batch
    for w in range(writers):
        seqs = rows["seq"][rows["writer"] == w]
        np.testing.assert_array_equal(seqs, np.arange(batches * per_batch))
    assert struct.calcsize("<IQd5s") == RECORD.itemsize


def test_read_array_without_a_dtype_gets_dtype_and_row_shape_from_the_descriptors(
    ring_name: str, tmp_path: Path
) -> None:
    rows = np.zeros(3000, dtype=RECORD)
    rows["seq"] = np.arange(3000)
    rows["tag"] = b"xyz"
    grid = np.arange(2000 * 6, dtype=">f4").reshape(2000, 2, 3)
    with shmflush.create(ring_name, tmp_path / "s.log", buffer_size=8192, buffers=4) as ring:
        ring.append_array(rows)
    with shmflush.create(ring_name, tmp_path / "g.log", buffer_size=8192, buffers=4) as ring:
        ring.append_array(grid)
    back = shmflush.read_array(tmp_path / "s.log")
    assert back.dtype == RECORD
    np.testing.assert_array_equal(back, rows)
    back_grid = shmflush.read_array(tmp_path / "g.log")
    assert (back_grid.dtype, back_grid.shape) == (np.dtype(">f4"), (2000, 2, 3))
    np.testing.assert_array_equal(back_grid, grid)


def test_read_array_without_a_dtype_refuses_records_that_append_wrote(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "m.log"
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        ring.append_array(np.arange(4, dtype="<u8"))
        ring.append(b"z" * 8)
    with pytest.raises(ValueError, match=r"record 4 carries no dtype.*pass dtype="):
        shmflush.read_array(path)
    assert shmflush.read_array(path, "<u8").tolist() == [
        0,
        1,
        2,
        3,
        int.from_bytes(b"z" * 8, "little"),
    ]


def test_read_array_without_a_dtype_refuses_rows_of_two_dtypes(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "d.log"
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        ring.append_array(np.arange(4, dtype="<u8"))
        ring.append_array(np.arange(4, dtype="<f8"))
    with pytest.raises(ValueError, match="record 4 is a row of dtype float64"):
        shmflush.read_array(path)


def test_each_array_batch_starts_with_a_descriptor_in_its_segment_that_read_skips(
    ring_name: str, tmp_path: Path
) -> None:
    from shmflush import _format

    path = tmp_path / "b.log"
    data = np.arange(5000 * 3, dtype="<i2").reshape(5000, 3)
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        ring.append_array(data)
    assert list(shmflush.read(path)) == [row.tobytes() for row in data]
    raw = path.read_bytes()
    stream = raw[16:32]
    p, covered, descriptors = _format.DATA_START, 0, 0
    while p < len(raw) and raw[p : p + 8] == _format.SEGMENT_MAGIC:
        header = _format.parse_segment_header(raw[p : p + 64], p, stream)
        assert isinstance(header, _format.SegmentHeader)
        left = 0  # rows the last descriptor still covers, within this segment
        for kind, payload in _format.iter_records(raw[p + 64 : p + 64 + header.used]):
            if kind == _format.KIND_ARRAY:
                assert left == 0
                desc = _format.parse_array_descriptor(payload)
                assert desc is not None
                assert (desc.row_size, desc.dtype_text) == (6, "('<i2', (3,))")
                left = desc.rows
                descriptors += 1
            elif kind == _format.KIND_DATA:
                assert left > 0  # every row is described
                left -= 1
                covered += 1
        assert left == 0
        p += _format.segment_size(header.used)
    assert covered == 5000
    assert descriptors > 1  # one per claimed batch


def test_append_array_refuses_a_row_that_fits_only_without_its_descriptor(
    ring_name: str, tmp_path: Path
) -> None:
    with shmflush.create(ring_name, tmp_path / "t.log", buffer_size=8192, buffers=4) as ring:
        with pytest.raises(shmflush.RecordTooLargeError, match="array descriptor"):
            ring.append_array(np.zeros((2, ring.max_record), np.uint8))
        assert ring.append_array(np.zeros((2, ring.max_record - 64), np.uint8)) == 2
