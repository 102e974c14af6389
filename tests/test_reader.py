"""Reading files and finding the append point (shmflush._reader)."""

from __future__ import annotations

import errno
import os
import random
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmflush
from shmflush import _reader
from shmflush._errors import CorruptFileError
from shmflush._format import (
    BLOCK,
    DATA_START,
    FORMAT_VERSION,
    KIND_ABANDONED,
    KIND_DATA,
    pack_file_header,
    pack_record_header,
    record_size,
    segment_size,
    write_segment_header,
)
from shmflush._reader import AppendPoint, Damage, find_append_point, read

# The stream id of the files built here, and their file header.
STREAM = bytes(range(16))
HEADER = pack_file_header(STREAM, 1)
D = DATA_START

Records = list[tuple[int, bytes]]


@dataclass
class Layout:
    """A built file and where its segments are."""

    data: bytearray
    starts: list[int]
    useds: list[int]
    segments: list[Records]

    def data_of(self, index: int) -> list[bytes]:
        return [p for k, p in self.segments[index] if k == KIND_DATA]

    def all_data(self) -> list[bytes]:
        return [p for i in range(len(self.segments)) for p in self.data_of(i)]


def build_segment(records: Records, *, seq: int, address: int, stream: bytes = STREAM) -> bytearray:
    used = sum(record_size(len(p)) for _, p in records)
    buf = bytearray(segment_size(used))
    pos = 64
    for kind, payload in records:
        pack_record_header(buf, pos, len(payload), kind)
        buf[pos + 8 : pos + 8 + len(payload)] = payload
        pos += record_size(len(payload))
    write_segment_header(
        buf, 0, used=used, seq=seq, address=address, stream_id=stream, sealed_ns=seq + 1
    )
    return buf


def build_file(segments: list[Records], *, first_seq: int = 0, header: bool = True) -> Layout:
    """A file of *segments*, after a file header (from offset 0 without one, the way
    development builds wrote files)."""
    data = bytearray(HEADER if header else b"")
    starts: list[int] = []
    useds: list[int] = []
    for i, records in enumerate(segments):
        starts.append(len(data))
        seg = build_segment(records, seq=first_seq + i, address=len(data))
        useds.append(sum(record_size(len(p)) for _, p in records))
        data += seg
    return Layout(data, starts, useds, segments)


def write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def payloads(seed: int, sizes: list[int]) -> Records:
    rng = random.Random(seed)
    return [(KIND_DATA, rng.randbytes(n)) for n in sizes]


def read_all(path: Path, *, strict: bool) -> tuple[list[bytes], _reader.Reader]:
    with read(path, strict=strict) as reader:
        return list(reader), reader


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["default", "small-chunks"])
def limits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the real read sizes and with tiny ones, so that multi-chunk
    segments take the streamed two-pass path and find_append_point uses many windows."""
    if request.param == "small-chunks":
        monkeypatch.setattr(_reader, "_READ_CHUNK", 2 * BLOCK)
        monkeypatch.setattr(_reader, "_WHOLE_SEGMENT_LIMIT", BLOCK)
        monkeypatch.setattr(_reader, "_BACK_CHUNK", 2 * BLOCK)
    return str(request.param)


# -- round trip ------------------------------------------------------------------

RECORD = st.tuples(
    st.sampled_from([KIND_DATA, KIND_DATA, KIND_DATA, KIND_ABANDONED]),
    st.integers(0, 5000).map(lambda n: bytes([n % 251]) * n) | st.binary(max_size=40),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(segments=st.lists(st.lists(RECORD, max_size=8), min_size=0, max_size=6))
def test_round_trip_returns_data_payloads_in_order(
    tmp_path: Path, limits: str, segments: list[Records]
) -> None:
    layout = build_file(segments)
    path = write(tmp_path / "f", layout.data)
    for strict in (True, False):
        got, reader = read_all(path, strict=strict)
        assert got == layout.all_data()
        assert reader.records == len(got)
        assert reader.abandoned == sum(k == KIND_ABANDONED for s in segments for k, _ in s)
        assert reader.segments == len(segments)
        assert reader.damaged == []


def test_abandoned_payload_is_never_returned(tmp_path: Path) -> None:
    layout = build_file([[(KIND_DATA, b"a"), (KIND_ABANDONED, b"junk" * 10), (KIND_DATA, b"b")]])
    got, reader = read_all(write(tmp_path / "f", layout.data), strict=True)
    assert got == [b"a", b"b"]
    assert reader.abandoned == 1


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    got, reader = read_all(write(tmp_path / "f", b""), strict=True)
    assert got == []
    assert reader.segments == 0


def test_iteration_is_lazy_and_counters_grow(tmp_path: Path) -> None:
    layout = build_file([payloads(1, [10, 20]), payloads(2, [30])])
    reader = read(write(tmp_path / "f", layout.data))
    assert reader.segments == 0
    assert next(reader) == layout.all_data()[0]
    assert (reader.segments, reader.records) == (1, 1)
    assert list(reader) == layout.all_data()[1:]
    assert (reader.segments, reader.records) == (2, 3)
    assert list(reader) == []  # single pass


# -- zero tails and partial files -------------------------------------------------


def test_zero_tail_is_a_clean_end(tmp_path: Path) -> None:
    layout = build_file([payloads(3, [100, 200]), payloads(4, [5])])
    for tail in (1, 63, BLOCK, 5 * BLOCK + 17):
        got, reader = read_all(write(tmp_path / "f", layout.data + bytes(tail)), strict=True)
        assert got == layout.all_data()
        assert reader.damaged == []


def test_all_zero_file_is_empty_not_damaged(tmp_path: Path) -> None:
    got, reader = read_all(write(tmp_path / "f", bytes(3 * BLOCK)), strict=True)
    assert (got, reader.damaged) == ([], [])


def test_zero_hole_followed_by_data_is_damage(tmp_path: Path) -> None:
    # A crash can leave a segment unwritten (a hole) while a later one made it out.
    layout = build_file([payloads(5, [10]), payloads(6, [10]), payloads(7, [10])])
    data = layout.data
    data[layout.starts[1] : layout.starts[2]] = bytes(BLOCK)
    path = write(tmp_path / "f", data)
    with pytest.raises(CorruptFileError) as info:
        read_all(path, strict=True)
    assert info.value.offset == layout.starts[1]
    assert info.value.reason == "bad magic"
    got, reader = read_all(path, strict=False)
    assert got == layout.data_of(0) + layout.data_of(2)
    assert reader.damaged == [Damage(layout.starts[1], layout.starts[2], "bad magic")]


def test_trailing_nonzero_partial_block_is_damage(tmp_path: Path) -> None:
    layout = build_file([payloads(8, [10])])
    path = write(tmp_path / "f", layout.data + b"\0\0garbage")
    got, reader = read_all(path, strict=False)
    assert got == layout.data_of(0)
    end = len(layout.data)
    assert reader.damaged == [
        Damage(end, end + 9, "truncated segment header (9 of 64 bytes)", torn=True)
    ]


# -- truncation at every offset ----------------------------------------------------


def test_truncation_at_every_offset(tmp_path: Path) -> None:
    # Segment 1 spans two blocks, so cuts land in a second body block too.
    layout = build_file([payloads(9, [100, 0, 37]), payloads(10, [3000, 1500]), payloads(11, [9])])
    path = write(tmp_path / "f", layout.data)
    ends = [s + 64 + u for s, u in zip(layout.starts, layout.useds, strict=True)]
    # Truncate in place from the end down, one file for all cuts (down to the file
    # header: test_a_cut_file_header_is_damage covers cuts below).
    for cut in range(len(layout.data), D - 1, -1):
        os.truncate(path, cut)
        intact = [i for i, end in enumerate(ends) if end <= cut]
        torn = [i for i, (s, e) in enumerate(zip(layout.starts, ends, strict=True)) if s < cut < e]
        expected = [p for i in intact for p in layout.data_of(i)]

        got, reader = read_all(path, strict=False)
        assert got == expected, cut
        if torn:
            (damage,) = reader.damaged
            assert damage.start == layout.starts[torn[0]], cut
            assert damage.start < damage.end <= cut, cut
        else:
            assert reader.damaged == [], cut

        if torn:
            with pytest.raises(CorruptFileError) as info:
                read_all(path, strict=True)
            assert info.value.offset == layout.starts[torn[0]], cut
        else:
            assert read_all(path, strict=True)[0] == expected, cut


# -- damage in the middle ----------------------------------------------------------


def test_zeroed_block_in_the_middle(tmp_path: Path, limits: str) -> None:
    layout = build_file([payloads(i, [50, 60, 5000 * (i == 2)]) for i in range(5)])
    assert layout.useds[2] + 64 > BLOCK  # segment 2 spans two blocks
    for block in (layout.starts[2], layout.starts[2] + BLOCK, layout.starts[3]):
        data = bytearray(layout.data)
        data[block : block + BLOCK] = bytes(BLOCK)
        path = write(tmp_path / "f", data)
        hit = 3 if block == layout.starts[3] else 2
        got, reader = read_all(path, strict=False)
        assert got == [p for i in range(5) if i != hit for p in layout.data_of(i)]
        (damage,) = reader.damaged
        assert damage.start == layout.starts[hit]
        assert damage.end == layout.starts[hit + 1]
        expected_reason = "bad magic" if block == layout.starts[hit] else "payload CRC mismatch"
        assert damage.reason == expected_reason
        with pytest.raises(CorruptFileError) as info:
            read_all(path, strict=True)
        assert info.value.offset == layout.starts[hit]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_bit_flip_loses_at_most_its_segment(
    tmp_path: Path, limits: str, data: st.DataObject
) -> None:
    layout = build_file([payloads(20, [700, 900]), payloads(21, [5000, 300]), payloads(22, [1])])
    # Past the file header: test_any_bit_flip_in_the_file_header_... covers that.
    bit = data.draw(st.integers(D * 8, len(layout.data) * 8 - 1))
    corrupted = bytearray(layout.data)
    corrupted[bit // 8] ^= 1 << (bit % 8)
    path = write(tmp_path / "f", corrupted)
    got, reader = read_all(path, strict=False)

    offset = bit // 8
    k = max(i for i, s in enumerate(layout.starts) if s <= offset)
    if offset >= layout.starts[k] + 64 + layout.useds[k]:
        # Padding is not covered by any check and not read.
        assert got == layout.all_data()
        assert reader.damaged == []
        return
    assert got == [p for i in range(3) if i != k for p in layout.data_of(i)]
    (damage,) = reader.damaged
    assert damage.start == layout.starts[k]
    next_start = layout.starts[k + 1] if k + 1 < 3 else len(layout.data)
    assert layout.starts[k] < damage.end <= next_start


def test_payload_bit_flip_is_reported_and_skipped(tmp_path: Path, limits: str) -> None:
    layout = build_file([payloads(30, [100]), payloads(31, [6000, 10]), payloads(32, [100])])
    data = bytearray(layout.data)
    data[layout.starts[1] + 64 + 8 + 5000] ^= 0x10
    got, reader = read_all(write(tmp_path / "f", data), strict=False)
    assert got == layout.data_of(0) + layout.data_of(2)
    assert reader.damaged == [Damage(layout.starts[1], layout.starts[2], "payload CRC mismatch")]
    assert reader.segments == 2


def craft_header(
    *, used: int, address: int, payload_crc: int, seq: int = 0, stream: bytes = STREAM
) -> bytes:
    head = b"SHMFLSEG" + struct.pack("<HHIQQ", FORMAT_VERSION, 64, used, seq, address)
    head += stream + struct.pack("<QI", 0, payload_crc)
    return head + struct.pack("<I", crc32c.crc32c(head))


def test_malformed_records_under_a_valid_crc_are_damage(tmp_path: Path, limits: str) -> None:
    # A writer bug rather than disk damage, but the reader must not trust it.
    body = bytearray(16)
    struct.pack_into("<IHH", body, 0, 8, 0, 0x5AF1)  # kind 0
    seg = bytearray(craft_header(used=16, address=D, payload_crc=crc32c.crc32c(body)))
    seg += body + bytes(BLOCK - 80)
    good = build_segment(payloads(40, [8]), seq=1, address=D + BLOCK)
    got, reader = read_all(write(tmp_path / "f", HEADER + seg + good), strict=False)
    assert got == [p for _, p in payloads(40, [8])]
    assert reader.damaged == [
        Damage(D, D + BLOCK, "malformed record at record-area offset 0: unknown kind 0")
    ]


def test_malformed_record_deep_in_a_large_segment_is_damage(tmp_path: Path, limits: str) -> None:
    # Past the first read chunk, so the streamed check must catch it too.
    records = payloads(41, [3000, 3000, 3000, 10])
    seg = build_segment(records, seq=0, address=D)
    bad_at = 3 * record_size(3000)  # record-area offset of the last record
    struct.pack_into("<H", seg, 64 + bad_at + 6, 0x1234)  # its mark
    used = 3 * record_size(3000) + record_size(10)
    # The CRC covers the bad mark.
    write_segment_header(seg, 0, used=used, seq=0, address=D, stream_id=STREAM, sealed_ns=0)
    good = build_segment(payloads(42, [8]), seq=1, address=D + len(seg))
    got, reader = read_all(write(tmp_path / "f", HEADER + seg + good), strict=False)
    assert got == [p for _, p in payloads(42, [8])]
    assert reader.damaged == [
        Damage(D, D + len(seg), f"malformed record at record-area offset {bad_at}: bad mark 0x1234")
    ]


def test_resynchronises_after_several_blocks_of_garbage(tmp_path: Path, limits: str) -> None:
    garbage = bytearray(random.Random(50).randbytes(3 * BLOCK + 100))
    seg = build_segment(payloads(51, [2000, 2000, 2000]), seq=0, address=D + len(garbage) + 3996)
    data = HEADER + garbage + bytes(3996) + seg
    got, reader = read_all(write(tmp_path / "f", data), strict=False)
    assert got == [p for _, p in payloads(51, [2000, 2000, 2000])]
    assert reader.damaged == [Damage(D, D + 4 * BLOCK, "bad magic")]


def test_misplaced_segment_is_not_read(tmp_path: Path) -> None:
    # A valid segment copied to the wrong offset fails its self-locating check.
    seg = build_segment(payloads(52, [10]), seq=0, address=D)
    got, reader = read_all(write(tmp_path / "f", HEADER + seg + seg), strict=False)
    assert got == [p for _, p in payloads(52, [10])]
    assert reader.damaged == [Damage(D + BLOCK, D + 2 * BLOCK, f"segment claims address {D}")]


# -- hostile lengths -----------------------------------------------------------------


@pytest.mark.parametrize("used", [2**32 - 1 - 64 - 7, 1 << 30, 8 * BLOCK])
def test_huge_used_is_a_clean_damage_report(tmp_path: Path, used: int) -> None:
    # Valid header CRC, so only the "fits in the file" check stands in the way.
    bad = craft_header(used=used, address=D, payload_crc=0) + b"\x01" * (BLOCK - 64)
    good = build_segment(payloads(60, [10]), seq=1, address=D + BLOCK)
    path = write(tmp_path / "f", HEADER + bad + good)
    tracemalloc.start()
    try:
        got, reader = read_all(path, strict=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert got == [p for _, p in payloads(60, [10])]
    (damage,) = reader.damaged
    assert (damage.start, damage.end) == (D, D + BLOCK)
    assert "runs past the end of the file" in damage.reason
    with pytest.raises(CorruptFileError, match="runs past the end of the file") as info:
        read_all(path, strict=True)
    assert info.value.offset == D


# -- resource handling ---------------------------------------------------------------


def test_reader_closes_its_fd(tmp_path: Path) -> None:
    path = write(tmp_path / "f", build_file([payloads(70, [1, 2])]).data)
    before = open_fds()
    reader = read(path)
    assert open_fds() == before + 1
    list(reader)
    assert open_fds() == before  # exhausted: closed
    with read(path) as reader:
        next(reader)
        assert open_fds() == before + 1
    assert open_fds() == before
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(reader)


def test_strict_error_closes_the_fd(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"x" * 100)
    before = open_fds()
    reader = read(path)
    with pytest.raises(CorruptFileError):
        list(reader)
    assert open_fds() == before


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing")


# -- find_append_point ----------------------------------------------------------------


def find(path: Path) -> AppendPoint:
    fd = os.open(path, os.O_RDONLY)
    try:
        return find_append_point(fd, STREAM)
    finally:
        os.close(fd)


def append_point(path: Path) -> tuple[int, int]:
    point = find(path)
    return point.address, point.next_seq


def three_segments() -> Layout:
    return build_file(
        [payloads(80, [100]), payloads(81, [9000, 50]), payloads(82, [7])], first_seq=41
    )


def test_append_point_of_empty_file(tmp_path: Path) -> None:
    assert find(write(tmp_path / "f", b"")) == AppendPoint(D, 0, "none", D)
    assert find(write(tmp_path / "f", HEADER)) == AppendPoint(D, 0, "none", D)


def test_append_point_of_clean_file(tmp_path: Path, limits: str) -> None:
    layout = three_segments()
    assert append_point(write(tmp_path / "f", layout.data)) == (len(layout.data), 44)


def test_append_point_skips_a_torn_last_segment(tmp_path: Path, limits: str) -> None:
    layout = three_segments()
    end_of_1 = layout.starts[2]
    # Cut inside segment 1's body: segments 0 is the last complete one.
    cut_1 = layout.starts[1] + 64 + 5000
    point = find(write(tmp_path / "f", layout.data[:cut_1]))
    assert (point.address, point.next_seq, point.tail) == (layout.starts[1], 42, "torn")
    # Last segment's header cut short.
    point = find(write(tmp_path / "f", layout.data[: end_of_1 + 30]))
    assert (point.address, point.next_seq, point.tail) == (end_of_1, 43, "torn")


def test_append_point_calls_bit_rot_in_the_last_segment_damage_not_a_torn_tail(
    tmp_path: Path, limits: str
) -> None:
    layout = three_segments()
    data = bytearray(layout.data)
    data[layout.starts[2] + 64 + 8] ^= 1  # every byte is there, the payload CRC fails
    point = find(write(tmp_path / "f", data))
    assert (point.address, point.next_seq, point.tail) == (layout.starts[2], 43, "damage")
    assert layout.starts[2] < point.nonzero_end <= layout.starts[2] + 64 + layout.useds[2]


def test_append_point_accepts_a_last_segment_without_its_padding(tmp_path: Path) -> None:
    layout = three_segments()
    cut = layout.starts[2] + 64 + layout.useds[2]
    assert append_point(write(tmp_path / "f", layout.data[:cut])) == (len(layout.data), 44)


def test_append_point_with_trailing_zeros(tmp_path: Path, limits: str) -> None:
    layout = three_segments()
    for tail in (1, BLOCK, 40 * BLOCK + 5):
        path = write(tmp_path / "f", layout.data + bytes(tail))
        assert find(path) == AppendPoint(len(layout.data), 44, "zero", len(layout.data))


def test_append_point_without_any_valid_segment(tmp_path: Path, limits: str) -> None:
    noise = HEADER + random.Random(90).randbytes(5 * BLOCK)
    assert find(write(tmp_path / "f", noise)) == AppendPoint(D, 0, "damage", len(noise))
    assert find(write(tmp_path / "f", HEADER + bytes(7 * BLOCK))) == AppendPoint(D, 0, "zero", D)


def test_append_point_after_a_hole_is_past_the_last_valid_segment(tmp_path: Path) -> None:
    # Out-of-order writes: segment 1 never made it, segment 2 did.
    layout = three_segments()
    data = bytearray(layout.data)
    data[layout.starts[1] : layout.starts[2]] = bytes(layout.starts[2] - layout.starts[1])
    assert append_point(write(tmp_path / "f", data)) == (len(layout.data), 44)


def test_append_point_ignores_a_misplaced_segment(tmp_path: Path) -> None:
    layout = three_segments()
    stale = build_segment(payloads(91, [5]), seq=99, address=D)
    path = write(tmp_path / "f", layout.data + stale)
    assert append_point(path) == (len(layout.data), 44)
    assert find(path).tail == "damage"  # a whole segment in the wrong place: no torn write


def test_append_point_does_not_move_the_file_position(tmp_path: Path) -> None:
    path = write(tmp_path / "f", three_segments().data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 123, os.SEEK_SET)
        find_append_point(fd, STREAM)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 123
    finally:
        os.close(fd)


def test_append_point_works_on_an_o_direct_fd(tmp_path: Path, limits: str) -> None:
    # The flusher's own fd is opened with O_DIRECT; unaligned reads would fail.
    layout = three_segments()
    path = write(tmp_path / "f", layout.data[: layout.starts[2] + 40])
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip("file system does not support O_DIRECT")
        raise
    try:
        point = find_append_point(fd, STREAM)
        assert (point.address, point.next_seq, point.tail) == (layout.starts[2], 43, "torn")
    finally:
        os.close(fd)


# -- files of an earlier format version ----------------------------------------------


def as_version_2(segment: bytearray) -> bytearray:
    """*segment* rewritten the way format version 2 wrote it: version 2, both CRCs
    zlib's CRC-32."""
    (used,) = struct.unpack_from("<I", segment, 12)
    struct.pack_into("<H", segment, 8, 2)
    # Version 2's layout: payload_crc at 32, then 24 reserved zero bytes.
    segment[32:60] = struct.pack("<I", zlib.crc32(segment[64 : 64 + used])) + bytes(24)
    struct.pack_into("<I", segment, 60, zlib.crc32(segment[:60]))
    return segment


@pytest.mark.parametrize("strict", [True, False])
def test_a_version_2_file_is_refused_with_an_error_naming_both_versions(
    tmp_path: Path, strict: bool
) -> None:
    layout = build_file([payloads(1, [10, 20]), payloads(2, [30])], header=False)
    old = bytearray()
    for i, start in enumerate(layout.starts):
        end = layout.starts[i + 1] if i + 1 < len(layout.starts) else len(layout.data)
        old += as_version_2(layout.data[start:end])
    path = write(tmp_path / "old", old)
    with read(path, strict=strict) as reader:
        with pytest.raises(shmflush.UnsupportedFormatError) as info:
            list(reader)
        assert reader.damaged == []
    error = info.value
    assert isinstance(error, shmflush.CorruptFileError)  # old handlers still catch it
    assert (error.version, error.offset, error.path) == (2, 0, str(path))
    assert "format version 2" in str(error)
    assert f"reads format version {FORMAT_VERSION} only" in str(error)
    assert "corrupt" not in str(error)


def test_a_version_field_damaged_to_2_is_damage_not_an_old_file(tmp_path: Path) -> None:
    layout = build_file([payloads(1, [10]), payloads(2, [30])])
    struct.pack_into("<H", layout.data, D + 8, 2)  # version 2, but version 3's CRCs
    got, reader = read_all(write(tmp_path / "f", layout.data), strict=False)
    assert got == layout.data_of(1)
    assert reader.damaged == [Damage(D, layout.starts[1], "unsupported format version 2")]


# -- the file header ----------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_a_file_of_a_newer_version_is_refused_naming_both_versions(
    tmp_path: Path, strict: bool
) -> None:
    data = build_file([payloads(1, [10])]).data
    struct.pack_into("<H", data, 8, FORMAT_VERSION + 1)  # a later version may move the CRC
    path = write(tmp_path / "new", data)
    with (
        read(path, strict=strict) as reader,
        pytest.raises(shmflush.UnsupportedFormatError) as info,
    ):
        list(reader)
    error = info.value
    assert (error.version, error.offset) == (FORMAT_VERSION + 1, 0)
    assert f"format version {FORMAT_VERSION + 1}" in str(error)
    assert f"reads format version {FORMAT_VERSION} only" in str(error)
    assert "newer shmflush" in str(error)


def test_a_headerless_file_of_a_development_build_of_version_3_is_refused(
    tmp_path: Path,
) -> None:
    # Version 3 before the file header: a segment at offset 0, CRC-32C, 24 zero
    # bytes where stream_id and sealed_ns are now.
    body = bytearray(16)
    pack_record_header(body, 0, 8)
    head = bytearray(b"SHMFLSEG" + struct.pack("<HHIQQI", 3, 64, 16, 0, 0, crc32c.crc32c(body)))
    head += bytes(24)
    head += struct.pack("<I", crc32c.crc32c(head))
    path = write(tmp_path / "old", head + body + bytes(BLOCK - 80))
    with pytest.raises(shmflush.UnsupportedFormatError, match="without a file header") as info:
        read_all(path, strict=False)
    assert info.value.headerless


@pytest.mark.parametrize("byte", [0, 12, 16, 31, 32, 59, 60])
def test_a_damaged_file_header_is_damage_and_a_tolerant_reader_still_reads_the_segments(
    tmp_path: Path, byte: int
) -> None:
    layout = build_file([payloads(1, [10, 20]), payloads(2, [3000])])
    layout.data[byte] ^= 0x40
    path = write(tmp_path / "f", layout.data)
    with pytest.raises(CorruptFileError) as info:
        read_all(path, strict=True)
    assert info.value.offset == 0
    got, reader = read_all(path, strict=False)
    assert got == layout.all_data()
    assert [(d.start, d.end) for d in reader.damaged] == [(0, D)]


def test_a_cut_file_header_is_damage(tmp_path: Path) -> None:
    for cut in (1, 8, 63):
        with pytest.raises(CorruptFileError, match="file header") as info:
            read_all(write(tmp_path / "f", HEADER[:cut]), strict=True)
        assert info.value.offset == 0


def test_the_reserved_rest_of_the_file_header_block_is_ignored(tmp_path: Path) -> None:
    layout = build_file([payloads(1, [10])])
    layout.data[64:D] = b"\xee" * (D - 64)
    assert read_all(write(tmp_path / "f", layout.data), strict=True)[0] == layout.all_data()


def test_an_intact_segment_of_another_stream_is_damage_not_records(tmp_path: Path) -> None:
    # A segment copied in from another file, at the right address, CRCs intact.
    layout = build_file([payloads(1, [10]), payloads(2, [20]), payloads(3, [30])])
    other = build_segment(payloads(9, [20]), seq=1, address=layout.starts[1], stream=bytes(16))
    layout.data[layout.starts[1] : layout.starts[2]] = other
    got, reader = read_all(write(tmp_path / "f", layout.data), strict=False)
    assert got == layout.data_of(0) + layout.data_of(2)
    assert reader.damaged == [
        Damage(layout.starts[1], layout.starts[2], "segment of another stream")
    ]


def test_a_torn_tail_is_marked_torn_and_bit_rot_in_the_last_segment_is_not(
    tmp_path: Path,
) -> None:
    layout = build_file([payloads(1, [10]), payloads(2, [6000, 3000])])
    last = layout.starts[1]
    # A write that lost its second block (reads as zeros): torn.
    torn = bytearray(layout.data)
    torn[last + BLOCK : last + 2 * BLOCK] = bytes(BLOCK)
    _, reader = read_all(write(tmp_path / "f", torn), strict=False)
    assert [(d.start, d.torn) for d in reader.damaged] == [(last, True)]
    # Every block there, one bit flipped: bit rot, not a torn write.
    rot = bytearray(layout.data)
    rot[last + 64 + 5000] ^= 1
    _, reader = read_all(write(tmp_path / "f", rot), strict=False)
    assert [(d.start, d.torn) for d in reader.damaged] == [(last, False)]
    # The same flip with a segment after it: damage in the middle, never torn.
    middle = rot + build_segment(payloads(3, [5]), seq=9, address=len(rot))
    _, reader = read_all(write(tmp_path / "f", middle), strict=False)
    assert [(d.start, d.torn) for d in reader.damaged] == [(last, False)]


def test_the_append_point_walk_never_looks_inside_a_valid_segment(tmp_path: Path) -> None:
    # A payload holding a complete, valid header of this very stream at a block
    # boundary, with its own matching payload CRC: a backward scan would take it.
    layout = build_file([payloads(1, [10])])
    forged_at = len(layout.data) + BLOCK
    forged = build_segment([(KIND_DATA, b"fake")], seq=500, address=forged_at)
    payload = bytes(BLOCK - 64 - 8) + bytes(forged) + b"\x01" * 100
    real = build_segment([(KIND_DATA, payload)], seq=1, address=len(layout.data))
    assert real[BLOCK : BLOCK + len(forged)] == forged  # at the boundary, inside the payload
    path = write(tmp_path / "f", layout.data + real)
    point = find(path)
    assert (point.address, point.next_seq) == (len(layout.data) + len(real), 2)
    assert read_all(path, strict=True)[0] == [*layout.all_data(), payload]
