"""Byte layout of segments and records (shmflush._format)."""

from __future__ import annotations

import mmap
import struct
import zlib
from pathlib import Path
from typing import Any

import crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmflush import _format
from shmflush._format import (
    BLOCK,
    KIND_ABANDONED,
    KIND_DATA,
    MAX_USED,
    RECORD_MARK,
    SEGMENT_HEADER_SIZE,
    SegmentHeader,
    check_records,
    iter_records,
    pack_record_header,
    pad_block,
    parse_segment_header,
    record_size,
    segment_size,
    write_segment_header,
)

U64 = st.integers(0, 2**64 - 1)
# The stream id of the files these tests build.
STREAM = bytes(range(16))
OTHER_STREAM = bytes(range(1, 17))


def craft_header(
    *,
    magic: bytes = b"SHMFLSEG",
    version: int = 3,
    header_size: int = 64,
    used: int = 0,
    seq: int = 0,
    address: int = 0,
    stream_id: bytes = STREAM,
    sealed_ns: int = 0,
    payload_crc: int = 0,
    header_crc: int | None = None,
) -> bytes:
    """A segment header built straight from the spec table, independently of _format."""
    head = (
        magic
        + struct.pack("<HHIQQ", version, header_size, used, seq, address)
        + stream_id
        + struct.pack("<QI", sealed_ns, payload_crc)
    )
    assert len(head) == 60
    crc = crc32c.crc32c(head) if header_crc is None else header_crc
    return head + struct.pack("<I", crc)


def build_area(records: list[tuple[int, bytes]]) -> bytearray:
    area = bytearray(sum(record_size(len(p)) for _, p in records))
    pos = 0
    for kind, payload in records:
        pack_record_header(area, pos, len(payload), kind)
        area[pos + 8 : pos + 8 + len(payload)] = payload
        pos += record_size(len(payload))
    return area


# -- constants and sizes ---------------------------------------------------------


def test_constants_match_the_spec() -> None:
    assert BLOCK == 4096
    assert _format.SEGMENT_MAGIC == b"SHMFLSEG"
    assert _format.FORMAT_VERSION == 3
    assert SEGMENT_HEADER_SIZE == 64
    assert _format.RECORD_HEADER_SIZE == 8
    assert _format.RECORD_ALIGN == 8
    assert (KIND_DATA, KIND_ABANDONED) == (1, 2)
    assert RECORD_MARK == 0x5AF1
    assert _format.RECORD_HEADER.format == "<IHH"
    assert _format.RECORD_HEADER.size == 8
    assert MAX_USED == 2**32 - 1 - 64


@given(st.integers(0, 2**33))
def test_record_size_is_header_plus_payload_padded_to_8(n: int) -> None:
    size = record_size(n)
    assert size % 8 == 0
    assert 8 + n <= size < 8 + n + 8
    assert record_size(n + 1) >= size


def test_record_size_examples() -> None:
    assert [record_size(n) for n in (0, 1, 7, 8, 9, 16)] == [8, 16, 16, 16, 24, 24]


@given(st.integers(0, 2**40))
def test_pad_block_is_the_smallest_block_multiple_not_below_n(n: int) -> None:
    padded = pad_block(n)
    assert padded % BLOCK == 0
    assert n <= padded < n + BLOCK
    assert pad_block(padded) == padded


def test_pad_block_examples() -> None:
    assert [pad_block(n) for n in (0, 1, 4095, 4096, 4097)] == [0, 4096, 4096, 4096, 8192]


@given(st.integers(0, MAX_USED))
def test_segment_size_pads_header_plus_used(used: int) -> None:
    assert segment_size(used) == pad_block(64 + used)
    assert segment_size(used) >= BLOCK


# -- writing ---------------------------------------------------------------------


def test_pack_record_header_layout() -> None:
    buf = bytearray(b"\xee" * 20)
    pack_record_header(buf, 4, 0x01020304, KIND_ABANDONED)
    assert buf[4:12] == bytes.fromhex("04030201 0200 f15a".replace(" ", ""))
    assert buf[:4] == b"\xee" * 4
    assert buf[12:] == b"\xee" * 8
    pack_record_header(buf, 0, 5)
    assert buf[:8] == bytes.fromhex("05000000 0100 f15a".replace(" ", ""))


def test_pack_record_header_rejects_length_beyond_u32() -> None:
    with pytest.raises(struct.error):
        pack_record_header(bytearray(8), 0, 2**32)


@given(
    used_records=st.lists(st.binary(max_size=100), max_size=20),
    seq=U64,
    block_index=st.integers(0, 2**40),
    offset=st.integers(0, 3).map(lambda i: i * 8),
    sealed_ns=U64,
)
def test_write_segment_header_matches_the_spec_table(
    used_records: list[bytes], seq: int, block_index: int, offset: int, sealed_ns: int
) -> None:
    area = build_area([(KIND_DATA, p) for p in used_records])
    used = len(area)
    buf = bytearray(b"\xaa" * offset) + bytearray(64) + area + bytearray(16)
    address = block_index * BLOCK
    write_segment_header(
        buf, offset, used=used, seq=seq, address=address, stream_id=STREAM, sealed_ns=sealed_ns
    )
    expected = craft_header(
        used=used, seq=seq, address=address, sealed_ns=sealed_ns, payload_crc=crc32c.crc32c(area)
    )
    assert bytes(buf[offset : offset + 64]) == expected
    # Nothing outside the header is touched.
    assert buf[:offset] == b"\xaa" * offset
    assert buf[offset + 64 : offset + 64 + used] == area
    assert parse_segment_header(buf[offset:], address, STREAM) == SegmentHeader(
        used=used,
        seq=seq,
        address=address,
        payload_crc=crc32c.crc32c(area),
        sealed_ns=sealed_ns,
        stream_id=STREAM,
    )


def test_write_segment_header_leaves_no_export_on_an_mmap() -> None:
    m = mmap.mmap(-1, BLOCK)
    try:
        pack_record_header(m, 64, 3)
        m[72:75] = b"abc"
        write_segment_header(m, 0, used=16, seq=1, address=0, stream_id=STREAM, sealed_ns=1)
        assert parse_segment_header(m, 0, STREAM) != "header CRC mismatch"
    finally:
        m.close()  # raises BufferError if a memoryview of it were still alive
    assert m.closed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"used": 12, "seq": 0, "address": 0}, "used"),
        ({"used": -8, "seq": 0, "address": 0}, "used"),
        ({"used": MAX_USED + 1, "seq": 0, "address": 0}, "used"),
        ({"used": 4096, "seq": 0, "address": 0}, "does not fit"),
        ({"used": 8, "seq": 0, "address": 100}, "address"),
        ({"used": 8, "seq": 0, "address": -4096}, "address"),
        ({"used": 8, "seq": 0, "address": 0, "stream_id": bytes(15)}, "stream_id"),
    ],
)
def test_write_segment_header_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    buf = bytearray(BLOCK)
    with pytest.raises(ValueError, match=match):
        write_segment_header(buf, 0, **{"stream_id": STREAM, "sealed_ns": 0, **kwargs})


# -- parsing ---------------------------------------------------------------------


def test_parse_segment_header_reports_each_check() -> None:
    good = craft_header(used=16, seq=3, address=8192, sealed_ns=5, payload_crc=77)
    assert parse_segment_header(good, 8192, STREAM) == SegmentHeader(16, 3, 8192, 77, 5, STREAM)
    cases = {
        "bad magic": craft_header(magic=b"SHMFLSEH"),
        "unsupported format version 4": craft_header(version=4),
        "unsupported format version 2": craft_header(version=2),
        "unsupported format version 1": craft_header(version=1),
        "header size 128, expected 64": craft_header(header_size=128),
        "header CRC mismatch": craft_header(used=16, header_crc=1234),
        "used length 12 is not a multiple of 8": craft_header(used=12),
        f"used length {2**32 - 8} exceeds the maximum {MAX_USED}": craft_header(used=2**32 - 8),
        "segment claims address 4096": craft_header(address=4096),
        "segment of another stream": craft_header(stream_id=OTHER_STREAM),
        "truncated segment header (63 of 64 bytes)": good[:63],
    }
    for reason, data in cases.items():
        assert parse_segment_header(data, 0, STREAM) == reason


def test_parse_segment_header_accepts_the_largest_used() -> None:
    largest = MAX_USED - MAX_USED % 8
    header = parse_segment_header(craft_header(used=largest), 0, STREAM)
    assert isinstance(header, SegmentHeader)
    assert header.used == largest


@given(st.integers(0, 64 * 8 - 1))
def test_every_single_bit_flip_in_a_header_is_rejected(bit: int) -> None:
    data = bytearray(craft_header(used=64, seq=9, address=4096, payload_crc=5))
    data[bit // 8] ^= 1 << (bit % 8)
    assert isinstance(parse_segment_header(data, 4096, STREAM), str)


def test_parse_segment_header_ignores_bytes_after_the_header() -> None:
    data = craft_header(used=8) + b"\xff" * 100
    assert isinstance(parse_segment_header(data, 0, STREAM), SegmentHeader)


# -- records ---------------------------------------------------------------------

RECORDS = st.lists(
    st.tuples(st.sampled_from([KIND_DATA, KIND_ABANDONED]), st.binary(max_size=64)), max_size=30
)


@given(RECORDS)
def test_iter_records_round_trip(records: list[tuple[int, bytes]]) -> None:
    area = build_area(records)
    got = list(iter_records(area))
    assert [(k, bytes(v)) for k, v in got] == records
    assert all(v.readonly for _, v in got)
    assert check_records(area) is None


def test_iter_records_returns_views_not_copies() -> None:
    area = build_area([(KIND_DATA, b"hello")])
    ((_, view),) = iter_records(area)
    area[8] = ord("j")
    assert bytes(view) == b"jello"


def test_record_padding_is_zero_and_next_record_is_aligned() -> None:
    area = build_area([(KIND_DATA, b"abc"), (KIND_DATA, b"")])
    assert bytes(area) == bytes.fromhex("03000000 0100 f15a 61626300 00000000 00000000 0100 f15a")


def _bad(area: bytearray, match: str) -> None:
    assert check_records(area) is not None
    assert match in (check_records(area) or "")
    with pytest.raises(ValueError, match=match):
        list(iter_records(area))


def test_iter_records_rejects_bad_mark() -> None:
    area = build_area([(KIND_DATA, b"x"), (KIND_DATA, b"y")])
    area[16 + 6] ^= 1
    _bad(area, "record-area offset 16: bad mark")


@pytest.mark.parametrize("kind", [0, 4, 0xFFFF])
def test_iter_records_rejects_unknown_kind(kind: int) -> None:
    area = build_area([(KIND_DATA, b"x")])
    struct.pack_into("<H", area, 4, kind)
    _bad(area, f"record-area offset 0: unknown kind {kind}")


def test_iter_records_rejects_a_record_running_past_used() -> None:
    area = build_area([(KIND_DATA, b"12345678"), (KIND_DATA, b"abc")])
    struct.pack_into("<I", area, 16, 9)  # 9 bytes need 16, only 8 are left
    _bad(area, "record-area offset 16: length 9 runs past the end")


def test_iter_records_rejects_a_huge_length_without_allocating() -> None:
    area = build_area([(KIND_DATA, b"")])
    struct.pack_into("<I", area, 0, 2**32 - 1)
    _bad(area, "runs past the end")


def test_iter_records_rejects_a_partial_trailing_header() -> None:
    area = build_area([(KIND_DATA, b"ab")]) + bytearray(4)
    _bad(area, "record-area offset 16: header runs past the end")


def test_iter_records_yields_records_before_the_malformed_one() -> None:
    area = build_area([(KIND_DATA, b"ok"), (KIND_DATA, b"no")])
    area[16 + 6] = 0
    it = iter_records(area)
    assert bytes(next(it)[1]) == b"ok"
    with pytest.raises(ValueError, match="offset 16"):
        next(it)


def test_empty_record_area_has_no_records() -> None:
    assert list(iter_records(b"")) == []
    assert check_records(b"") is None


# -- golden bytes ----------------------------------------------------------------

EXAMPLE_STREAM = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
EXAMPLE_SEALED_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
EXAMPLE_CREATED_NS = EXAMPLE_SEALED_NS - 10**9

EXAMPLE_FILE_HEADER_DUMP = """\
00000000  53 48 4d 46 4c 46 49 4c  03 00 00 00 00 10 00 00  |SHMFLFIL........|
00000010  0f 1e 2d 3c 4b 5a 69 78  87 96 a5 b4 c3 d2 e1 f0  |..-<KZix........|
00000020  00 36 5f b2 51 72 86 18  00 00 00 00 00 00 00 00  |.6_.Qr..........|
00000030  00 00 00 00 00 00 00 00  00 00 00 00 33 7d 84 c0  |............3}..|
"""

EXAMPLE_DUMP = """\
00000000  53 48 4d 46 4c 53 45 47  03 00 40 00 38 00 00 00  |SHMFLSEG..@.8...|
00000010  07 00 00 00 00 00 00 00  00 20 00 00 00 00 00 00  |......... ......|
00000020  0f 1e 2d 3c 4b 5a 69 78  87 96 a5 b4 c3 d2 e1 f0  |..-<KZix........|
00000030  00 00 fa ed 51 72 86 18  79 34 11 f0 e9 b4 5b 7f  |....Qr..y4....[.|
00000040  05 00 00 00 01 00 f1 5a  68 65 6c 6c 6f 00 00 00  |.......Zhello...|
00000050  04 00 00 00 02 00 f1 5a  00 00 00 00 00 00 00 00  |.......Z........|
00000060  09 00 00 00 01 00 f1 5a  73 68 6d 66 6c 75 73 68  |.......Zshmflush|
00000070  21 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |!...............|
"""


def _undump(dump: str) -> bytes:
    return bytes.fromhex("".join(line[10:58] for line in dump.splitlines()).replace(" ", ""))


def test_worked_example_bytes_are_stable_and_documented() -> None:
    area = build_area(
        [(KIND_DATA, b"hello"), (KIND_ABANDONED, bytes(4)), (KIND_DATA, b"shmflush!")]
    )
    buf = bytearray(segment_size(len(area)))
    buf[64 : 64 + len(area)] = area
    write_segment_header(
        buf,
        0,
        used=len(area),
        seq=7,
        address=8192,
        stream_id=EXAMPLE_STREAM,
        sealed_ns=EXAMPLE_SEALED_NS,
    )
    expected = _undump(EXAMPLE_DUMP)
    assert bytes(buf[:128]) == expected
    assert buf[128:] == bytes(BLOCK - 128)
    # The CRCs the spec quotes, from the spec's definition (not from _format).
    assert reference_crc32c(expected[64:120]) == 0xF0113479
    assert reference_crc32c(expected[:60]) == 0x7F5BB4E9
    doc = Path(__file__).resolve().parent.parent / "docs" / "format.md"
    assert EXAMPLE_DUMP in doc.read_text()


def test_worked_example_file_header_is_stable_and_documented() -> None:
    block = _format.pack_file_header(EXAMPLE_STREAM, EXAMPLE_CREATED_NS)
    assert len(block) == BLOCK == _format.DATA_START
    expected = _undump(EXAMPLE_FILE_HEADER_DUMP)
    assert block[:64] == expected
    assert block[64:] == bytes(BLOCK - 64)
    assert reference_crc32c(expected[:60]) == 0xC0847D33
    doc = Path(__file__).resolve().parent.parent / "docs" / "format.md"
    assert EXAMPLE_FILE_HEADER_DUMP in doc.read_text()


# -- the file header -------------------------------------------------------------


def craft_file_header(
    *,
    magic: bytes = b"SHMFLFIL",
    version: int = 3,
    data_start: int = 4096,
    stream_id: bytes = STREAM,
    created_ns: int = 0,
    header_crc: int | None = None,
) -> bytes:
    """A file header built straight from the spec table, independently of _format."""
    head = (
        magic
        + struct.pack("<HHI", version, 0, data_start)
        + stream_id
        + struct.pack("<Q", created_ns)
        + bytes(20)
    )
    assert len(head) == 60
    crc = crc32c.crc32c(head) if header_crc is None else header_crc
    return head + struct.pack("<I", crc)


@given(stream_id=st.binary(min_size=16, max_size=16), created_ns=U64)
def test_file_header_matches_the_spec_table_and_round_trips(
    stream_id: bytes, created_ns: int
) -> None:
    block = _format.pack_file_header(stream_id, created_ns)
    assert block[:64] == craft_file_header(stream_id=stream_id, created_ns=created_ns)
    assert _format.parse_file_header(block) == _format.FileHeader(3, stream_id, created_ns)


def test_parse_file_header_reports_each_check() -> None:
    cases = {
        "bad file magic": craft_file_header(magic=b"SHMFLSEG"),
        "file header CRC mismatch": craft_file_header(header_crc=1),
        "data start 8192, expected 4096": craft_file_header(data_start=8192),
        "truncated file header (63 of 64 bytes)": craft_file_header()[:63],
    }
    for reason, data in cases.items():
        assert _format.parse_file_header(data) == reason


@pytest.mark.parametrize("version", [1, 2, 4, 0xFFFF])
def test_a_file_header_of_another_version_is_returned_unchecked_so_it_can_be_named(
    version: int,
) -> None:
    # The CRC is not checked: another version may have moved it.
    data = craft_file_header(version=version, header_crc=0)
    assert _format.parse_file_header(data) == _format.FileHeader(version)


@given(st.integers(0, 60 * 8 - 1))
def test_every_single_bit_flip_in_a_file_header_is_rejected_or_changes_the_version(
    bit: int,
) -> None:
    data = bytearray(craft_file_header(created_ns=123))
    data[bit // 8] ^= 1 << (bit % 8)
    got = _format.parse_file_header(data)
    assert isinstance(got, str) or (8 <= bit // 8 < 10 and got.version != 3)


def test_a_segment_of_another_stream_is_rejected_even_when_intact() -> None:
    seg = craft_header(used=0, address=4096, stream_id=OTHER_STREAM)
    assert parse_segment_header(seg, 4096, STREAM) == "segment of another stream"
    assert isinstance(parse_segment_header(seg, 4096, OTHER_STREAM), SegmentHeader)
    # A tolerant reader whose file header is damaged accepts any stream.
    assert isinstance(parse_segment_header(seg, 4096, None), SegmentHeader)


def test_array_descriptor_round_trips_and_bounds_its_text() -> None:
    payload = _format.pack_array_descriptor(24, 5, "('<f8', (3,))")
    assert _format.parse_array_descriptor(payload) == _format.ArrayDescriptor(
        24, 5, "('<f8', (3,))"
    )
    # A description too long to be worth storing leaves the row size alone.
    long = _format.pack_array_descriptor(8, 1, "x" * (_format.MAX_DTYPE_TEXT + 1))
    assert _format.parse_array_descriptor(long) == _format.ArrayDescriptor(8, 1, "")
    assert _format.parse_array_descriptor(b"\x01\x00") is None
    assert _format.parse_array_descriptor(payload + b"\xff") is None


# -- the CRC ---------------------------------------------------------------------


def reference_crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C exactly as docs/format.md section 4 defines it, bit by bit: reflected
    polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_the_crc_check_value_is_the_one_the_spec_quotes() -> None:
    assert reference_crc32c(b"123456789") == 0xE3069283
    assert _format.crc(b"123456789") == 0xE3069283
    assert _format.crc(b"") == 0


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_the_crc_is_the_spec_crc32c_and_continues_across_pieces(a: bytes, b: bytes) -> None:
    assert _format.crc(a + b) == reference_crc32c(a + b)
    assert _format.crc(b, _format.crc(a)) == _format.crc(a + b)


def test_the_crc_reads_shared_memory_in_place() -> None:
    # The flusher hands it a writable memoryview of an mmap (no copy).
    with mmap.mmap(-1, BLOCK) as m:
        m[:9] = b"123456789"
        with memoryview(m) as view, view[:9] as part:
            assert _format.crc(part) == 0xE3069283


def test_headerless_version_recognises_intact_segments_of_development_builds_only() -> None:
    v2 = bytearray(craft_header(version=2, used=16, address=0))
    struct.pack_into("<I", v2, 60, zlib.crc32(v2[:60]))  # version 2's header CRC
    assert _format.headerless_version(v2) == 2
    assert parse_segment_header(v2, 0, STREAM) == "unsupported format version 2"
    # Version 3 before the file header: CRC-32C, 24 reserved zero bytes at 36.
    old3 = bytearray(b"SHMFLSEG" + struct.pack("<HHIQQI", 3, 64, 16, 0, 0, 5) + bytes(24))
    old3 += struct.pack("<I", crc32c.crc32c(old3))
    assert _format.headerless_version(old3) == 3
    # A version field flipped to 2 by damage fails version 2's CRC: damage, not old.
    assert _format.headerless_version(craft_header(version=2, used=16, address=4096)) is None
    assert _format.headerless_version(craft_file_header()) is None
    assert _format.headerless_version(v2[:63]) is None
