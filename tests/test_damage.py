"""Torn and damaged files written by the real library, read back with
``shmflush.read`` (tolerant and strict) and checked by ``python -m shmflush
verify`` (shmflush._verify).

The samples are made the way users make files: a ring appends records and its
flusher writes the segments.  The expected outcome of every kind of damage is
derived from the clean file alone: a segment is *intact* if all its ``64 + used``
bytes are in the damaged file and unchanged.  The tolerant reader must return the
DATA records of exactly the intact segments, in file order, and report one damaged
stretch per run of consecutive non-intact segments, starting at the first one's
offset (docs/format.md section 6).  A run that reaches the end of the file with
nothing but zeros from its start is a zero tail: no damage, by design.  The strict
reader must raise at the first stretch's start, after yielding every record before
it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import tracemalloc
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import crc32c
import pytest

import shmflush
from shmflush import _verify
from shmflush._format import (
    BLOCK,
    DATA_START,
    KIND_ABANDONED,
    KIND_DATA,
    RECORD_HEADER,
    SEGMENT_HEADER_SIZE,
    FileHeader,
    SegmentHeader,
    iter_records,
    pad_block,
    parse_file_header,
    parse_segment_header,
    segment_size,
    write_segment_header,
)

# -- samples ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One segment of a clean sample file."""

    start: int
    used: int
    seq: int
    records: list[tuple[int, bytes]]  # (kind, payload), ABANDONED ones included

    @property
    def end(self) -> int:
        """End of the bytes a reader needs: header and record area, no padding."""
        return self.start + SEGMENT_HEADER_SIZE + self.used

    @property
    def data(self) -> list[bytes]:
        return [payload for kind, payload in self.records if kind == KIND_DATA]

    @property
    def abandoned(self) -> int:
        return sum(kind == KIND_ABANDONED for kind, _ in self.records)


@dataclass(frozen=True)
class Sample:
    """A clean file and its segments, found by walking the headers."""

    data: bytes
    segments: list[Segment]

    def all_data(self) -> list[bytes]:
        return [p for seg in self.segments for p in seg.data]


def stream_of(data: bytes) -> bytes:
    header = parse_file_header(data)
    assert isinstance(header, FileHeader), header
    return header.stream_id


def segments_of(data: bytes) -> list[Segment]:
    """Walk a clean file by arithmetic, as docs/format.md section 1 describes."""
    segments = []
    stream = stream_of(data)
    p = DATA_START
    while p < len(data):
        header = parse_segment_header(data[p : p + SEGMENT_HEADER_SIZE], p, stream)
        assert isinstance(header, SegmentHeader), (p, header)
        body = data[p + SEGMENT_HEADER_SIZE : p + SEGMENT_HEADER_SIZE + header.used]
        records = [(kind, bytes(payload)) for kind, payload in iter_records(body)]
        segments.append(Segment(p, header.used, header.seq, records))
        p += segment_size(header.used)
    assert p == len(data)  # the flusher writes whole segments, padding included
    return segments


def _create(ring_name: str, path: Path, buffer_size: int) -> shmflush.Ring:
    with warnings.catch_warnings():
        # tmp_path may be on a file system without O_DIRECT; that is not under test.
        warnings.simplefilter("ignore", shmflush.DirectIOWarning)
        # No time-based seals: each sync() ends a segment, so the layout is the same
        # on every run.
        return shmflush.create(
            ring_name, path, buffer_size=buffer_size, buffers=4, lanes=1, flush_interval=3600
        )


def _abandon(ring: shmflush.Ring, n: int) -> None:
    """Leave an ABANDONED record of *n* bytes: the writer's block raises."""
    # The fixtures check that the sample does hold abandoned records.
    with contextlib.suppress(KeyError), ring.reserve(n) as view:
        view[:] = b"\xaa" * n
        raise KeyError("abandon")


def _write_small(ring_name: str, path: Path) -> None:
    """Six segments of one or two blocks: empty and odd-sized records, an abandoned
    one, a reserved one, a batch, and a record that nearly fills a buffer."""
    rng = random.Random(1)
    with _create(ring_name, path, 8192) as ring:
        for n in (0, 1, 7, 8, 9):
            ring.append(rng.randbytes(n))
        ring.sync(timeout=10)
        ring.append_many([rng.randbytes(n) for n in (3000, 2500, 100)])
        ring.sync(timeout=10)
        for _ in range(20):
            ring.append(rng.randbytes(50))
        _abandon(ring, 100)
        with ring.reserve(33) as view:
            view[:] = rng.randbytes(33)
        ring.sync(timeout=10)
        ring.append(rng.randbytes(8000))  # record area 8008 bytes: two blocks
        ring.sync(timeout=10)
        ring.append(rng.randbytes(5))
        ring.append(rng.randbytes(6))
        ring.sync(timeout=10)
        for n in (1200, 1300, 1400):
            ring.append(rng.randbytes(n))


def _write_large(ring_name: str, path: Path) -> None:
    """About 2 MiB: random record sizes, syncs at random points, full buffers."""
    rng = random.Random(2)
    with _create(ring_name, path, 64 << 10) as ring:
        written = 0
        while written < 2 << 20:
            n = rng.choice((0, rng.randrange(1, 64), rng.randrange(64, 4000)))
            ring.append(rng.randbytes(n))
            written += n
            if rng.random() < 0.01:
                ring.sync(timeout=10)
            if rng.random() < 0.005:
                _abandon(ring, rng.randrange(0, 300))


_SAMPLES: dict[str, Sample] = {}


def _sample(kind: str, ring_name: str, tmp_path: Path) -> Sample:
    """The sample file *kind*, made once per test session (by the first test that
    asks for it, with that test's ring name)."""
    if kind not in _SAMPLES:
        path = tmp_path / f"{kind}.sample"
        (_write_small if kind == "small" else _write_large)(ring_name, path)
        data = path.read_bytes()
        _SAMPLES[kind] = Sample(data, segments_of(data))
    return _SAMPLES[kind]


@pytest.fixture
def small(ring_name: str, tmp_path: Path) -> Sample:
    sample = _sample("small", ring_name, tmp_path)
    assert len(sample.segments) == 6
    assert any(seg.end - seg.start > BLOCK for seg in sample.segments)
    assert any(seg.abandoned for seg in sample.segments)
    return sample


@pytest.fixture
def large(ring_name: str, tmp_path: Path) -> Sample:
    sample = _sample("large", ring_name, tmp_path)
    assert len(sample.data) >= 2 << 20
    assert any(seg.abandoned for seg in sample.segments)
    return sample


# -- the oracle --------------------------------------------------------------------------


def _intact(seg: Segment, data: bytes, sample: Sample) -> bool:
    return seg.end <= len(data) and data[seg.start : seg.end] == sample.data[seg.start : seg.end]


def expected_damage(data: bytes, sample: Sample) -> list[tuple[int, int]]:
    """The ``[start, end)`` stretches a tolerant read of *data* must report."""
    size = len(data)
    stretches = []
    run = -1  # start of the current run of non-intact segments
    for seg in sample.segments:
        if seg.start >= size:
            break
        if _intact(seg, data, sample):
            if run >= 0:
                stretches.append((run, seg.start))
                run = -1
        elif run < 0:
            run = seg.start
    nonzero_end = len(data.rstrip(b"\0"))
    if run >= 0 and run < nonzero_end:
        # The scan steps a block at a time and stops at the zero tail or at EOF.
        stretches.append((run, min(size, run + pad_block(nonzero_end - run))))
    return stretches


def expected_records(data: bytes, sample: Sample, before: int | None = None) -> list[bytes]:
    """DATA payloads of the intact segments (that start before *before*)."""
    return [
        p
        for seg in sample.segments
        if (before is None or seg.start < before) and _intact(seg, data, sample)
        for p in seg.data
    ]


def check_read(path: Path, data: bytes, sample: Sample) -> list[shmflush.Damage]:
    """Read *path* (holding *data*) both ways and compare with the oracle; returns
    the damage the tolerant read reported."""
    damage = expected_damage(data, sample)
    records = expected_records(data, sample)
    intact = [seg for seg in sample.segments if _intact(seg, data, sample)]

    with shmflush.read(path, strict=False) as reader:
        got = list(reader)
    damaged = reader.damaged
    assert got == records
    assert [(d.start, d.end) for d in damaged] == damage
    assert reader.segments == len(intact)
    assert reader.records == len(records)
    assert reader.abandoned == sum(seg.abandoned for seg in intact)

    strict: list[bytes] = []
    if damage:
        with pytest.raises(shmflush.CorruptFileError) as info, shmflush.read(path) as reader:
            strict.extend(reader)
        assert info.value.offset == damage[0][0]
        assert strict == expected_records(data, sample, before=damage[0][0])
    else:
        with shmflush.read(path) as reader:
            strict.extend(reader)
        assert strict == records
    return damaged


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- truncation --------------------------------------------------------------------------


def test_a_cut_at_every_offset_keeps_exactly_the_segments_before_it(
    small: Sample, tmp_path: Path
) -> None:
    """Every offset from the full size down to the end of the file header
    (test_reader covers cuts inside it), truncating one file in place.

    A cut inside a segment's header or record area tears it (damage); a cut in its
    zero padding leaves it whole: the padding of the last segment may be missing
    (docs/format.md section 1)."""
    path = _write(tmp_path / "cut", small.data)
    torn_cuts = clean_cuts = 0
    for cut in range(len(small.data), DATA_START - 1, -1):
        os.truncate(path, cut)
        data = small.data[:cut]
        damaged = check_read(path, data, small)
        torn = [seg for seg in small.segments if seg.start < cut < seg.end]
        assert bool(damaged) == bool(torn), cut
        if torn:
            left = cut - torn[0].start
            reason = (
                f"truncated segment header ({left} of 64 bytes)"
                if left < SEGMENT_HEADER_SIZE
                else f"segment record area of {torn[0].used} bytes runs past the end of the "
                f"file ({left - SEGMENT_HEADER_SIZE} bytes left)"
            )
            assert damaged[0].reason == reason, cut
        torn_cuts += bool(torn)
        clean_cuts += not torn
    # Both outcomes were exercised, padding cuts included.
    padding = sum(segment_size(seg.used) - SEGMENT_HEADER_SIZE - seg.used for seg in small.segments)
    assert clean_cuts == len(small.segments) + 1 + padding
    assert torn_cuts == len(small.data) - DATA_START + 1 - clean_cuts


def test_a_cut_in_the_padding_of_the_last_segment_reads_cleanly(
    small: Sample, tmp_path: Path
) -> None:
    last = small.segments[-1]
    assert last.end < len(small.data)  # the sample's last segment has padding
    for cut in (last.end, last.end + 1, len(small.data) - 1):
        path = _write(tmp_path / "cut", small.data[:cut])
        with shmflush.read(path) as reader:
            assert list(reader) == small.all_data()
        assert reader.damaged == []
        assert _verify.main(["--quiet", str(path)]) == 0


def test_random_cuts_of_a_large_file(large: Sample, tmp_path: Path) -> None:
    rng = random.Random(3)
    cuts = {rng.randrange(len(large.data)) for _ in range(60)}
    # Also right before, at and after segment boundaries and record-area ends.
    for seg in rng.sample(large.segments, 8):
        cuts |= {seg.start - 1, seg.start, seg.start + 1, seg.start + 63, seg.start + 64}
        cuts |= {seg.end - 1, seg.end, seg.end + 1}
    path = _write(tmp_path / "cut", large.data)
    for cut in sorted((c for c in cuts if DATA_START <= c <= len(large.data)), reverse=True):
        os.truncate(path, cut)
        check_read(path, large.data[:cut], large)


# -- damage in place ---------------------------------------------------------------------


def _zero_blocks(data: bytes, blocks: list[int]) -> bytes:
    damaged = bytearray(data)
    for block in blocks:
        damaged[block * BLOCK : (block + 1) * BLOCK] = bytes(BLOCK)
    return bytes(damaged)


def test_zeroed_blocks_lose_only_their_segments(large: Sample, tmp_path: Path) -> None:
    rng = random.Random(4)
    blocks = len(large.data) // BLOCK
    reported = 0
    for _ in range(12):
        zeroed = rng.sample(range(1, blocks), rng.randint(1, 3))  # not the file header
        data = _zero_blocks(large.data, zeroed)
        check_read(_write(tmp_path / "zeroed", data), data, large)
        # Each stretch starts at the start of the segment holding a zeroed block.
        starts = {
            max(seg.start for seg in large.segments if seg.start <= b * BLOCK) for b in zeroed
        }
        damage = expected_damage(data, large)
        assert {start for start, _ in damage} <= starts
        reported += len(damage)
    assert reported >= 12


def test_a_zeroed_last_segment_is_a_zero_tail_not_damage(small: Sample, tmp_path: Path) -> None:
    # Documented (docs/format.md section 6): nothing tells a zeroed final segment
    # from space that was never written, so its records vanish without a report.
    last = small.segments[-1]
    data = small.data[: last.start] + bytes(len(small.data) - last.start)
    path = _write(tmp_path / "tail", data)
    with shmflush.read(path) as reader:
        assert list(reader) == [p for seg in small.segments[:-1] for p in seg.data]
    assert reader.damaged == []
    # Zero only its first block and the rest is damage again.
    data = small.data[: last.start] + bytes(BLOCK) + small.data[last.start + BLOCK :]
    if last.end > last.start + BLOCK:
        check_read(_write(tmp_path / "tail", data), data, small)
        assert expected_damage(data, small) == [(last.start, len(data))]


def _flip_bits(data: bytes, rng: random.Random, where: list[tuple[int, int]], flips: int) -> bytes:
    damaged = bytearray(data)
    for _ in range(flips):
        lo, hi = rng.choice(where)
        offset = rng.randrange(lo, hi)
        damaged[offset] ^= 1 << rng.randrange(8)
    return bytes(damaged)


@pytest.mark.parametrize("region", ["header", "records", "anywhere"])
def test_bit_flips_skip_and_report_the_damaged_segments(
    large: Sample, tmp_path: Path, region: str
) -> None:
    rng = random.Random(f"flips-{region}")
    for _ in range(10):
        segments = rng.sample(large.segments, rng.randint(1, 3))
        if region == "header":
            where = [(s.start, s.start + SEGMENT_HEADER_SIZE) for s in segments]
        elif region == "records":
            where = [(s.start + SEGMENT_HEADER_SIZE, s.end) for s in segments if s.used]
        else:
            where = [(DATA_START, len(large.data))]  # test_reader flips the file header
        data = _flip_bits(large.data, rng, where, rng.randint(1, 6))
        check_read(_write(tmp_path / "flipped", data), data, large)
        if region != "anywhere":
            assert expected_damage(data, large)


def test_bit_flips_in_every_byte_of_a_header(small: Sample, tmp_path: Path) -> None:
    seg = small.segments[2]
    for offset in range(seg.start, seg.start + SEGMENT_HEADER_SIZE):
        data = bytearray(small.data)
        data[offset] ^= 0x80
        check_read(_write(tmp_path / "flipped", bytes(data)), bytes(data), small)
        assert expected_damage(bytes(data), small) == [(seg.start, small.segments[3].start)]


# -- hostile lengths ---------------------------------------------------------------------


def _with_header(data: bytes, seg: Segment, *, used: int) -> bytes:
    """*data* with *seg*'s header rewritten to claim *used* bytes, header CRC valid
    (so only the checks after the CRC stand in the way)."""
    header = bytearray(data[seg.start : seg.start + SEGMENT_HEADER_SIZE])
    struct.pack_into("<I", header, 12, used)
    struct.pack_into("<I", header, 60, crc32c.crc32c(header[:60]))
    return data[: seg.start] + bytes(header) + data[seg.start + SEGMENT_HEADER_SIZE :]


def _with_record_length(data: bytes, seg: Segment, length: int) -> bytes:
    """*data* with the first record of *seg* claiming *length* payload bytes; both
    CRCs recomputed, so only the record walk can catch it."""
    segment = bytearray(data[seg.start : seg.start + segment_size(seg.used)])
    kind, _ = seg.records[0]
    RECORD_HEADER.pack_into(segment, SEGMENT_HEADER_SIZE, length, kind, 0x5AF1)
    write_segment_header(
        segment,
        0,
        used=seg.used,
        seq=seg.seq,
        address=seg.start,
        stream_id=stream_of(data),
        sealed_ns=0,
    )
    return data[: seg.start] + bytes(segment) + data[seg.start + len(segment) :]


def _read_traced(path: Path) -> tuple[list[bytes], list[shmflush.Damage], int]:
    tracemalloc.start()
    try:
        with shmflush.read(path, strict=False) as reader:
            got = list(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return got, reader.damaged, peak


@pytest.mark.parametrize(
    ("used", "reason"),
    [
        (2**32 - 65, "not a multiple of 8"),  # the u32 maximum allowed, but misaligned
        (2**32 - 72, "runs past the end of the file"),
        (1 << 31, "runs past the end of the file"),
        (64 << 20, "runs past the end of the file"),
    ],
)
def test_a_header_claiming_a_huge_record_area_is_damage_without_allocating(
    large: Sample, tmp_path: Path, used: int, reason: str
) -> None:
    seg = large.segments[len(large.segments) // 2]
    data = _with_header(large.data, seg, used=used)
    got, damaged, peak = _read_traced(_write(tmp_path / "huge", data))
    # The reader's window is 1 MiB; nothing near `used` is ever allocated.
    assert peak < 4 << 20
    assert got == [p for s in large.segments if s is not seg for p in s.data]
    (damage,) = damaged
    next_start = large.segments[large.segments.index(seg) + 1].start
    assert (damage.start, damage.end) == (seg.start, next_start)
    assert reason in damage.reason


@pytest.mark.parametrize("length", [2**32 - 1, 2**31, 8200])
def test_a_record_length_past_its_segment_is_damage_without_allocating(
    small: Sample, tmp_path: Path, length: int
) -> None:
    seg = small.segments[1]
    data = _with_record_length(small.data, seg, length)
    got, damaged, peak = _read_traced(_write(tmp_path / "long", data))
    assert peak < 1 << 20
    assert got == [p for s in small.segments if s is not seg for p in s.data]
    assert [(d.start, d.end) for d in damaged] == [(seg.start, small.segments[2].start)]
    assert f"length {length} runs past the end" in damaged[0].reason


# -- the verify command ------------------------------------------------------------------


@pytest.fixture
def damaged_file(small: Sample, tmp_path: Path) -> tuple[Path, list[tuple[int, int]]]:
    """The small sample with its second and fifth segments hit; their stretches."""
    data = bytearray(small.data)
    second, fifth = small.segments[1], small.segments[4]
    data[second.start + 100] ^= 1
    data[fifth.start : fifth.start + 8] = b"GARBAGE!"
    path = _write(tmp_path / "damaged", bytes(data))
    return path, [(second.start, small.segments[2].start), (fifth.start, small.segments[5].start)]


def test_verify_passes_a_clean_file(
    small: Sample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "clean", small.data)
    assert _verify.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"segments:  {len(small.segments)}" in out
    assert f"records:   {len(small.all_data())} " in out
    assert "abandoned: 1" in out
    assert "damaged" not in out
    assert out.splitlines()[-1].startswith(f"OK {path}:")


def test_verify_reports_every_damaged_stretch_and_exits_1(
    damaged_file: tuple[Path, list[tuple[int, int]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, stretches = damaged_file
    assert _verify.main([str(path)]) == 1
    out = capsys.readouterr().out
    for start, end in stretches:
        assert f"[{start}, {end})" in out
    assert "payload CRC mismatch" in out
    assert "bad magic" in out
    assert out.splitlines()[-1].startswith(f"DAMAGED {path}: 2 damaged stretches")


def test_verify_quiet_prints_only_the_summary(
    damaged_file: tuple[Path, list[tuple[int, int]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = damaged_file
    assert _verify.main(["--quiet", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("DAMAGED")


def test_verify_json_is_machine_readable(
    small: Sample,
    damaged_file: tuple[Path, list[tuple[int, int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, stretches = damaged_file
    assert _verify.main(["--json", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    kept = [small.segments[i] for i in (0, 2, 3, 5)]
    assert report["ok"] is False
    assert report["path"] == str(path)
    assert report["size"] == len(small.data)
    assert report["segments"] == 4
    assert report["records"] == sum(len(s.data) for s in kept)
    assert report["payload_bytes"] == sum(len(p) for s in kept for p in s.data)
    assert report["abandoned"] == sum(s.abandoned for s in kept)
    assert [(d["start"], d["end"]) for d in report["damaged"]] == stretches
    assert report["damaged_bytes"] == sum(end - start for start, end in stretches)
    assert all(isinstance(d["reason"], str) and d["reason"] for d in report["damaged"])


def test_verify_of_a_missing_file_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.log"
    assert _verify.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "No such file or directory" in err
    assert _verify.main(["--json", str(missing)]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert "No such file" in report["error"]


@pytest.mark.parametrize(
    "argv", [[], ["a", "b"], ["--bogus", "x"], ["--quiet", "--json", "x"]], ids=repr
)
def test_verify_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify.main(argv) == 2
    assert "usage: python -m shmflush verify" in capsys.readouterr().err


def test_verify_refuses_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify.main([str(tmp_path)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_verify_of_an_empty_file_is_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "empty", b"")
    assert _verify.main(["--quiet", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {path}: 0 segments, 0 records")


def test_verify_refuses_a_version_2_file_with_exit_2_and_says_why(
    small: Sample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What format version 2 wrote: no file header, segments from offset 0,
    # version 2, payload_crc at 32 then 24 zero bytes, zlib's CRC-32 for both CRCs.
    data = bytearray(small.data[DATA_START:])
    for seg in small.segments:
        at = seg.start - DATA_START
        struct.pack_into("<H", data, at + 8, 2)
        struct.pack_into("<Q", data, at + 24, at)
        body = data[at + SEGMENT_HEADER_SIZE : at + SEGMENT_HEADER_SIZE + seg.used]
        data[at + 32 : at + 60] = struct.pack("<I", zlib.crc32(body)) + bytes(24)
        struct.pack_into("<I", data, at + 60, zlib.crc32(data[at : at + 60]))
    path = _write(tmp_path / "v2", bytes(data))
    assert _verify.main(["--json", str(path)]) == 2
    captured = capsys.readouterr()
    assert "written in shmflush file format version 2" in captured.err
    assert "run verify again" not in captured.err
    assert '"ok": false' in captured.out
