"""On-disk byte layout of shmflush files: segments and records.

Pure layout, no I/O.  The writers' hot path and the flusher import this module, so
it depends on nothing but :mod:`struct` and :mod:`crc32c` and does as little work
per call as it can.  ``docs/format.md`` is the normative description; the tables below
mirror it.

A file is a dense sequence of *segments*, each starting at a multiple of
:data:`BLOCK`.  A segment is one buffer fill::

    segment header (64 bytes, little-endian)
    off size field
      0    8 magic        b"SHMFLSEG"
      8    2 version      u16 = 3
     10    2 header_size  u16 = 64
     12    4 used         u32  bytes of record area after the header, multiple of 8
     16    8 seq          u64  seal sequence number
     24    8 address      u64  file offset of this segment (self-locating check)
     32    4 payload_crc  u32  CRC-32C of segment bytes [64, 64 + used)
     36   24 reserved     zero
     60    4 header_crc   u32  CRC-32C of header bytes [0, 60)
    record area (used bytes), then zeros up to pad_block(64 + used)

The record area holds records back to back, each 8-aligned::

    off size field
      0    4 length  u32  payload bytes
      4    2 kind    u16  KIND_DATA or KIND_ABANDONED
      6    2 mark    u16  RECORD_MARK
      8    length payload, then zeros up to a multiple of 8

Where a record header would start, 8 zero bytes are *padding*: readers skip
them and look for the next header 8 bytes on.  A valid header is never all
zero (its mark is not), so padding cannot be mistaken for a record.  Padding is
what a claim leaves whose writer died before writing any of it: dead-writer
recovery commits such ranges without having to find them (see _recovery).
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
SEGMENT_MAGIC = b"SHMFLSEG"
FORMAT_VERSION = 3
SEGMENT_HEADER_SIZE = 64
RECORD_HEADER_SIZE = 8
RECORD_ALIGN = 8
KIND_DATA = 1
KIND_ABANDONED = 2
RECORD_MARK = 0x5AF1

# ``used`` is a u32 and 64 + used must still fit in a u32, so a segment's unpadded
# size is always representable.
MAX_USED = 2**32 - 1 - SEGMENT_HEADER_SIZE

RECORD_HEADER = struct.Struct("<IHH")

# Everything up to and including the reserved bytes; the pad bytes ("24x") are
# written as zeros by pack_into, which is what the reserved field must hold.
_SEGMENT_HEAD = struct.Struct("<8sHHIQQI24x")
_HEADER_CRC = struct.Struct("<I")
_HEADER_CRC_OFFSET = 60
assert _SEGMENT_HEAD.size == _HEADER_CRC_OFFSET
assert _HEADER_CRC_OFFSET + _HEADER_CRC.size == SEGMENT_HEADER_SIZE

_VALID_KINDS = frozenset((KIND_DATA, KIND_ABANDONED))

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
    buf: WriteableBuffer, offset: int, *, used: int, seq: int, address: int
) -> None:
    """Fill in the 64-byte segment header at ``buf[offset:]`` for a finished fill.

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


# One early return per check reads better than a combined condition.
def parse_segment_header(  # noqa: PLR0911
    data: ReadableBuffer, expected_address: int
) -> SegmentHeader | str:
    """Check the segment header at the start of ``data`` (at least 64 bytes).

    Returns the header if magic, version, header size, header CRC, ``used`` and
    the self-declared address (must equal ``expected_address``) all check out.
    Otherwise returns a short reason string; never raises on bad content.  The
    payload CRC is *not* checked here (the body is not part of ``data``).
    """
    with memoryview(data) as view:
        if view.nbytes < SEGMENT_HEADER_SIZE:
            return f"truncated segment header ({view.nbytes} of {SEGMENT_HEADER_SIZE} bytes)"
        magic, version, header_size, used, seq, address, payload_crc = _SEGMENT_HEAD.unpack_from(
            view
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
    if address != expected_address:
        # A valid header in the wrong place: a stale copy, or a header-shaped
        # payload found while resynchronising.
        return f"segment claims address {address}"
    return SegmentHeader(used=used, seq=seq, address=address, payload_crc=payload_crc)


# Versions of the format that earlier development builds wrote, and the CRC each
# used for header_crc: enough to recognise their files, not to read them.
_OLDER_VERSIONS = {2: zlib.crc32}


def older_version(data: ReadableBuffer) -> int | None:
    """The version, if ``data`` starts with an intact segment header of an earlier,
    unreadable format version (magic, size and that version's header CRC all check
    out); else None.  Tells "written by an older shmflush" from damage: a flipped
    version field fails the old CRC too.
    """
    with memoryview(data) as view:
        if view.nbytes < SEGMENT_HEADER_SIZE:
            return None
        magic, version, header_size, *_ = _SEGMENT_HEAD.unpack_from(view)
        old_crc = _OLDER_VERSIONS.get(version)
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
        if kind not in _VALID_KINDS:
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
