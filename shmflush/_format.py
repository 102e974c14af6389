"""On-disk byte layout of shmflush files: segments and records.

Pure layout, no I/O.  The writers' hot path and the flusher import this module, so
it depends on nothing but :mod:`struct` and :mod:`crc32c` and does as little work
per call as it can.  ``docs/format.md`` is the normative description; the tables below
mirror it.

A file starts with a one-block *file header* and continues with a dense
sequence of *segments*, each starting at a multiple of :data:`BLOCK`, so that
every segment write stays 4 KiB-aligned for O_DIRECT::

    file header (block 0, little-endian)
    off size field
      0    8 magic        b"SHMFLFIL"                  never moves
      8    2 version      u16 = 3                      never moves
     10    2 reserved     zero
     12    4 data_start   u32 = 4096: file offset of the first segment
     16   16 stream_id    random, the same in every segment of the file
     32    8 created_ns   u64  CLOCK_REALTIME ns since the epoch
     40   20 reserved     zero
     60    4 header_crc   u32  CRC-32C of header bytes [0, 60)
     64 4032 reserved     zero, not checked

A segment is one buffer fill::

    segment header (64 bytes, little-endian)
    off size field
      0    8 magic        b"SHMFLSEG"                  never moves
      8    2 version      u16 = 3                      never moves
     10    2 header_size  u16 = 64
     12    4 used         u32  bytes of record area after the header, multiple of 8
     16    8 seq          u64  seal sequence number
     24    8 address      u64  file offset of this segment (self-locating check)
     32   16 stream_id    the file header's: bytes inside a payload cannot pass
                               for a segment of this file without it
     48    8 sealed_ns    u64  CLOCK_REALTIME ns when the flusher stamped the
                               header, after the fill was sealed, before its write
     56    4 payload_crc  u32  CRC-32C of segment bytes [64, 64 + used)
     60    4 header_crc   u32  CRC-32C of header bytes [0, 60)
    record area (used bytes), then zeros up to pad_block(64 + used)

The record area holds records back to back, each 8-aligned::

    off size field
      0    4 length  u32  payload bytes
      4    2 kind    u16  KIND_DATA, KIND_ABANDONED or KIND_ARRAY
      6    2 mark    u16  RECORD_MARK
      8    length payload, then zeros up to a multiple of 8

Where a record header would start, 8 zero bytes are *padding*: readers skip
them and look for the next header 8 bytes on.  A valid header is never all
zero (its mark is not), so padding cannot be mistaken for a record.  Padding is
what a claim leaves whose writer died before writing any of it: dead-writer
recovery commits such ranges without having to find them (see _recovery).

A KIND_ARRAY record describes the ``rows`` DATA records right after it:
``Ring.append_array`` writes one at the start of each batch of rows it claims
(payload: u32 row size, u32 rows, then ASCII text ``repr((descr, shape))`` of
the element dtype, as ``numpy.lib.format.dtype_to_descr`` gives it, and the
row shape ``array.shape[1:]``; empty when too long).  ``read`` skips it;
``read_array`` uses it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import crc32c as _crc32c

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

BLOCK = 4096
FILE_MAGIC = b"SHMFLFIL"
SEGMENT_MAGIC = b"SHMFLSEG"
FORMAT_VERSION = 3
# The file header fills block 0, so the first segment (and so every segment) is
# 4 KiB-aligned.
FILE_HEADER_SIZE = BLOCK
DATA_START = FILE_HEADER_SIZE
STREAM_ID_SIZE = 16
SEGMENT_HEADER_SIZE = 64
RECORD_HEADER_SIZE = 8
RECORD_ALIGN = 8
KIND_DATA = 1
KIND_ABANDONED = 2
KIND_ARRAY = 3
RECORD_MARK = 0x5AF1

# ``used`` is a u32 and 64 + used must still fit in a u32, so a segment's unpadded
# size is always representable.
MAX_USED = 2**32 - 1 - SEGMENT_HEADER_SIZE

RECORD_HEADER = struct.Struct("<IHH")

# Everything before header_crc.  The file header's pad bytes ("2x", "20x") are
# written as zeros by pack_into, which is what the reserved fields must hold.
_SEGMENT_HEAD = struct.Struct("<8sHHIQQ16sQI")
_FILE_HEAD = struct.Struct("<8sH2xI16sQI4xQ4x")
_HEADER_CRC = struct.Struct("<I")
_HEADER_CRC_OFFSET = 60
assert _SEGMENT_HEAD.size == _HEADER_CRC_OFFSET
assert _FILE_HEAD.size == _HEADER_CRC_OFFSET
assert _HEADER_CRC_OFFSET + _HEADER_CRC.size == SEGMENT_HEADER_SIZE
# The array descriptor's fixed part: row size, rows; then the dtype text.
ARRAY_DESCRIPTOR = struct.Struct("<II")
# A descriptor's dtype text is bounded, so that the reader never evaluates (or
# allocates for) a large hostile one.
MAX_DTYPE_TEXT = 4000

RECORD_KINDS = frozenset((KIND_DATA, KIND_ABANDONED, KIND_ARRAY))

# Bound once: pack_record_header runs once per appended record.
_pack_record_into = RECORD_HEADER.pack_into
_unpack_record_from = RECORD_HEADER.unpack_from


def crc(data: ReadableBuffer, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of *data*, continuing from the CRC *value* of the bytes
    before it: ``crc(b, crc(a)) == crc(a + b)``.  The only CRC of the format (both
    header fields); ``docs/format.md`` section 4 defines it.

    Hardware-assisted (SSE 4.2, ARMv8 CRC) where the CPU has it.  Takes any
    buffer, a memoryview of shared memory included, without copying it, and
    releases the GIL for buffers of 32 KiB and more, so the flusher's write threads
    compute CRCs in parallel with each other and with pwrite(2).
    """
    return _crc32c.crc32c(data, value)


def record_size(n: int) -> int:
    """Bytes a record with ``n`` payload bytes occupies: header plus payload padded to 8."""
    return RECORD_HEADER_SIZE + ((n + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1))


def pad_block(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`BLOCK` (4096)."""
    return (n + BLOCK - 1) & ~(BLOCK - 1)


def segment_size(used: int) -> int:
    """On-disk size of a segment whose record area is ``used`` bytes (header included,
    padded to a whole number of blocks).  The next segment starts this many bytes later."""
    return pad_block(SEGMENT_HEADER_SIZE + used)


def pack_record_header(
    buf: WriteableBuffer, offset: int, length: int, kind: int = KIND_DATA
) -> None:
    """Write a record header (``length``, ``kind``, mark) at ``buf[offset:offset + 8]``.

    The payload and its zero padding are the caller's business.  Raises
    :class:`struct.error` if ``length`` does not fit in a u32 or ``offset`` is out
    of range.
    """
    _pack_record_into(buf, offset, length, kind, RECORD_MARK)


def write_segment_header(
    buf: WriteableBuffer,
    offset: int,
    *,
    used: int,
    seq: int,
    address: int,
    stream_id: bytes,
    sealed_ns: int,
) -> None:
    """Fill in the 64-byte segment header at ``buf[offset:]`` for a finished fill.

    ``stream_id`` is the file header's (16 bytes); ``sealed_ns`` the time stamp
    (CLOCK_REALTIME ns since the epoch) that ``docs/format.md`` defines.

    The record area ``buf[offset + 64 : offset + 64 + used]`` must already hold its
    final bytes: its CRC is computed here, in place, without copying it.  The
    padding up to :func:`segment_size` is not touched; the caller guarantees it is
    zero.

    Raises :class:`ValueError` if ``used`` is not a multiple of 8, exceeds
    :data:`MAX_USED` or runs past the end of ``buf``, or if ``address`` is not a
    non-negative multiple of :data:`BLOCK`.
    """
    if used % RECORD_ALIGN or not 0 <= used <= MAX_USED:
        raise ValueError(f"used must be a multiple of 8 in [0, {MAX_USED}], got {used}")
    if address % BLOCK or address < 0:
        raise ValueError(f"address must be a non-negative multiple of {BLOCK}, got {address}")
    if len(stream_id) != STREAM_ID_SIZE:
        raise ValueError(f"stream_id must be {STREAM_ID_SIZE} bytes, got {len(stream_id)}")
    body_start = offset + SEGMENT_HEADER_SIZE
    with memoryview(buf) as view:
        if offset < 0 or body_start + used > view.nbytes:
            raise ValueError(
                f"segment at offset {offset} with used={used} does not fit in a "
                f"buffer of {view.nbytes} bytes"
            )
        # Explicit release of every slice: buf is usually an mmap, which refuses to
        # close while a memoryview of it is alive.
        with view[body_start : body_start + used] as body:
            payload_crc = crc(body)
        _SEGMENT_HEAD.pack_into(
            buf,
            offset,
            SEGMENT_MAGIC,
            FORMAT_VERSION,
            SEGMENT_HEADER_SIZE,
            used,
            seq,
            address,
            stream_id,
            sealed_ns,
            payload_crc,
        )
        with view[offset : offset + _HEADER_CRC_OFFSET] as head:
            header_crc = crc(head)
    _HEADER_CRC.pack_into(buf, offset + _HEADER_CRC_OFFSET, header_crc)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The fields of a segment header that passed every self-check."""

    used: int
    seq: int
    address: int
    payload_crc: int
    sealed_ns: int = 0
    stream_id: bytes = bytes(STREAM_ID_SIZE)


# One early return per check reads better than a combined condition.
def parse_segment_header(  # noqa: PLR0911
    data: ReadableBuffer, expected_address: int, stream_id: bytes | None
) -> SegmentHeader | str:
    """Check the segment header at the start of ``data`` (at least 64 bytes).

    Returns the header if magic, version, header size, header CRC, ``used``, the
    stream id (must equal ``stream_id``, the file header's) and the
    self-declared address (must equal ``expected_address``) all check out;
    ``stream_id=None`` accepts any stream (a tolerant reader whose file header
    is damaged).  Otherwise returns a short reason string; never raises on bad
    content.  The payload CRC is *not* checked here (the body is not part of
    ``data``).
    """
    with memoryview(data) as view:
        if view.nbytes < SEGMENT_HEADER_SIZE:
            return f"truncated segment header ({view.nbytes} of {SEGMENT_HEADER_SIZE} bytes)"
        (magic, version, header_size, used, seq, address, stream, sealed_ns, payload_crc) = (
            _SEGMENT_HEAD.unpack_from(view)
        )
        if magic != SEGMENT_MAGIC:
            return "bad magic"
        # Version and size come before the CRC: a future version may move the CRC.
        if version != FORMAT_VERSION:
            return f"unsupported format version {version}"
        if header_size != SEGMENT_HEADER_SIZE:
            return f"header size {header_size}, expected {SEGMENT_HEADER_SIZE}"
        (header_crc,) = _HEADER_CRC.unpack_from(view, _HEADER_CRC_OFFSET)
        with view[:_HEADER_CRC_OFFSET] as head:
            if crc(head) != header_crc:
                return "header CRC mismatch"
    if used % RECORD_ALIGN:
        return f"used length {used} is not a multiple of {RECORD_ALIGN}"
    if used > MAX_USED:
        return f"used length {used} exceeds the maximum {MAX_USED}"
    if stream_id is not None and stream != stream_id:
        # Intact, but not this file's: a payload that carries a header-shaped
        # pattern, or a segment copied in from another file.
        return "segment of another stream"
    if address != expected_address:
        # A valid header in the wrong place: a stale copy, or a header-shaped
        # payload found while resynchronising.
        return f"segment claims address {address}"
    return SegmentHeader(
        used=used,
        seq=seq,
        address=address,
        payload_crc=payload_crc,
        sealed_ns=sealed_ns,
        stream_id=bytes(stream),
    )


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The fields of a file header.  ``version`` may differ from
    :data:`FORMAT_VERSION` (then nothing else was checked and the other fields
    are zero): the caller refuses the file, naming both versions."""

    version: int
    stream_id: bytes = bytes(STREAM_ID_SIZE)
    created_ns: int = 0
    #: The file's number in its stream (0: the path create() was given; n:
    #: ``<path>.<n:06d>``, see shmflush/_files.py and docs/rotation.md).
    file_no: int = 0
    #: The flusher's address of file offset 0 (0 for file 0): a fill whose
    #: address is A lies at file offset A - base of the file that holds A.
    base: int = 0


def pack_file_header(stream_id: bytes, created_ns: int, file_no: int = 0, base: int = 0) -> bytes:
    """The :data:`FILE_HEADER_SIZE` bytes of a version 3 file header."""
    if len(stream_id) != STREAM_ID_SIZE:
        raise ValueError(f"stream_id must be {STREAM_ID_SIZE} bytes, got {len(stream_id)}")
    block = bytearray(FILE_HEADER_SIZE)
    _FILE_HEAD.pack_into(
        block, 0, FILE_MAGIC, FORMAT_VERSION, DATA_START, stream_id, created_ns, file_no, base
    )
    _HEADER_CRC.pack_into(block, _HEADER_CRC_OFFSET, crc(block[:_HEADER_CRC_OFFSET]))
    return bytes(block)


def parse_file_header(data: ReadableBuffer) -> FileHeader | str:
    """Check the file header at the start of ``data`` (its first 64 bytes).

    Returns the header, or a short reason string; never raises on bad content.
    The magic and the version are read first, at offsets that no version moves:
    a header of another version is returned as ``FileHeader(version)`` without
    further checks, since this version cannot know that one's layout.
    """
    with memoryview(data) as view:
        if view.nbytes < SEGMENT_HEADER_SIZE:
            return f"truncated file header ({view.nbytes} of {SEGMENT_HEADER_SIZE} bytes)"
        magic, version, data_start, stream_id, created_ns, file_no, base = _FILE_HEAD.unpack_from(
            view
        )
        if magic != FILE_MAGIC:
            return "bad file magic"
        if version != FORMAT_VERSION:
            return FileHeader(version)
        (header_crc,) = _HEADER_CRC.unpack_from(view, _HEADER_CRC_OFFSET)
        with view[:_HEADER_CRC_OFFSET] as head:
            if crc(head) != header_crc:
                return "file header CRC mismatch"
    if data_start != DATA_START:
        return f"data start {data_start}, expected {DATA_START}"
    return FileHeader(version, bytes(stream_id), created_ns, file_no, base)


def pack_array_descriptor(row_size: int, rows: int, dtype_text: str) -> bytearray:
    """Payload of a KIND_ARRAY record: u32 row size, u32 rows, then the dtype
    text (ASCII; dropped, leaving the row size alone, if over MAX_DTYPE_TEXT)."""
    text = dtype_text.encode("ascii", "replace")
    if len(text) > MAX_DTYPE_TEXT:
        text = b""
    return bytearray(ARRAY_DESCRIPTOR.pack(row_size, rows) + text)


@dataclass(frozen=True, slots=True)
class ArrayDescriptor:
    """A KIND_ARRAY record: the next ``rows`` DATA records are rows of
    ``row_size`` bytes, of the dtype ``dtype_text`` describes ("" if unknown)."""

    row_size: int
    rows: int
    dtype_text: str


def parse_array_descriptor(payload: ReadableBuffer) -> ArrayDescriptor | None:
    """The descriptor in a KIND_ARRAY payload, or None if malformed."""
    with memoryview(payload) as view:
        if not ARRAY_DESCRIPTOR.size <= view.nbytes <= ARRAY_DESCRIPTOR.size + MAX_DTYPE_TEXT:
            return None
        row_size, rows = ARRAY_DESCRIPTOR.unpack_from(view)
        try:
            text = bytes(view[ARRAY_DESCRIPTOR.size :]).decode("ascii")
        except UnicodeDecodeError:
            return None
    return ArrayDescriptor(row_size, rows, text)


# Development builds wrote files without a file header: a segment at offset 0.
# Version 2 used zlib's CRC-32 for header_crc; version 3 before the file header,
# CRC-32C with the 24 reserved bytes where stream_id and sealed_ns are now.
# Enough to recognise their files, not to read them.
_HEADERLESS_VERSIONS = {2: zlib.crc32, 3: crc}


def headerless_version(data: ReadableBuffer) -> int | None:
    """The version, if ``data`` (the start of a file) is an intact segment header
    of a development build that wrote no file header (magic, size and that
    version's header CRC all check out); else None.  Tells "written by an older
    shmflush" from damage and from foreign files: a flipped version field fails
    the old CRC too.
    """
    with memoryview(data) as view:
        if view.nbytes < SEGMENT_HEADER_SIZE:
            return None
        magic, version, header_size, *_ = _SEGMENT_HEAD.unpack_from(view)
        old_crc = _HEADERLESS_VERSIONS.get(version)
        if magic != SEGMENT_MAGIC or header_size != SEGMENT_HEADER_SIZE or old_crc is None:
            return None
        (header_crc,) = _HEADER_CRC.unpack_from(view, _HEADER_CRC_OFFSET)
        with view[:_HEADER_CRC_OFFSET] as head:
            return version if old_crc(head) == header_crc else None


_PAD_SCAN = 1 << 16


def skip_padding(body: memoryview, pos: int, end: int) -> int:
    """The first offset at or after *pos* (8-aligned, at most *end*) whose 8 bytes
    are not all zero: the end of a run of padding words.  Runs at C speed, a
    64 KiB window at a time, so a long zero stretch costs no Python loop."""
    while pos < end:
        stop = min(end, pos + _PAD_SCAN)
        window = body[pos:stop].tobytes()
        rest = len(window.lstrip(b"\0"))
        if rest:
            return pos + ((len(window) - rest) & ~(RECORD_ALIGN - 1))
        pos = stop
    return end


def is_padding(length: int, kind: int, mark: int) -> bool:
    return not (length or kind or mark)


def _record_spans(body: memoryview) -> Iterator[tuple[int, int, int]]:
    """Yield ``(kind, payload_start, length)`` for each record of a record area.

    Zero padding words are skipped.  Raises :class:`ValueError` naming the
    record's offset in the record area as soon as a record is malformed; records
    before it have been yielded.
    """
    end = body.nbytes
    pos = 0
    while pos < end:
        if end - pos < RECORD_HEADER_SIZE:
            raise ValueError(
                f"record at record-area offset {pos}: header runs past the end ({end} bytes)"
            )
        length, kind, mark = _unpack_record_from(body, pos)
        if not (length or kind or mark):
            pos = skip_padding(body, pos, end)
            continue
        if mark != RECORD_MARK:
            raise ValueError(f"record at record-area offset {pos}: bad mark 0x{mark:04x}")
        if kind not in RECORD_KINDS:
            raise ValueError(f"record at record-area offset {pos}: unknown kind {kind}")
        size = record_size(length)
        if size > end - pos:
            raise ValueError(
                f"record at record-area offset {pos}: length {length} runs past the end "
                f"({end} bytes)"
            )
        yield kind, pos + RECORD_HEADER_SIZE, length
        pos += size


def check_records(body: ReadableBuffer) -> str | None:
    """Walk a record area without materialising payloads.

    Returns ``None`` if it is exactly tiled by well-formed records, else the reason
    :func:`iter_records` would raise.
    """
    with memoryview(body) as view:
        try:
            for _ in _record_spans(view):
                pass
        except ValueError as exc:
            return str(exc)
    return None


def iter_records(body: ReadableBuffer) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(kind, payload)`` for each record of a record area (exactly ``used`` bytes).

    ``payload`` is a read-only view into ``body`` (no copy), valid as long as
    ``body`` is.  ABANDONED records are yielded too: callers must skip them, their
    payload bytes are meaningless.  Raises :class:`ValueError` (reason includes the
    offset in the record area) at the first malformed record; records before it
    have been yielded, so validate with :func:`check_records` first when a
    segment must be all-or-nothing.
    """
    view = memoryview(body).toreadonly()
    for kind, start, length in _record_spans(view):
        yield kind, view[start : start + length]
