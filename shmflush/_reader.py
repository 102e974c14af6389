"""Reading shmflush files: the record iterator and the append-point scan.

The file is untrusted input.  Every length read from it is checked against the
bytes actually left in the file before anything is allocated or read, and no
payload is returned from a segment whose payload CRC fails.  ``docs/format.md``
describes the layout and the scan.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from . import _files
from ._errors import CorruptFileError, UnsupportedFormatError
from ._format import (
    BLOCK,
    DATA_START,
    FORMAT_VERSION,
    KIND_ABANDONED,
    KIND_DATA,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_KINDS,
    RECORD_MARK,
    SEGMENT_HEADER_SIZE,
    ArrayDescriptor,
    FileHeader,
    SegmentHeader,
    check_records,
    crc,
    headerless_version,
    is_padding,
    iter_records,
    pad_block,
    parse_array_descriptor,
    parse_file_header,
    parse_segment_header,
    record_size,
    segment_size,
    skip_padding,
)

# Read-ahead for the forward scan: large enough to amortise pread(2) over many
# small segments, small enough that reading a file never holds much memory.
_READ_CHUNK = 1 << 20
# Segments up to this size are read and checked in one piece; bigger ones are
# streamed twice (check, then yield) so memory stays bounded by the chunk size
# (or by the largest single record, which has to be returned whole anyway).
_WHOLE_SEGMENT_LIMIT = 4 << 20
# Window of the forward walk in find_append_point.
_BACK_CHUNK = 1 << 20
# Read-ahead of the forward walk of find_append_point over small segments.
_WALK_WINDOW = 1 << 16
# The unit a disk writes atomically, at best: a torn write misses whole sectors.
_SECTOR = 512

assert _READ_CHUNK % BLOCK == 0
assert _BACK_CHUNK % BLOCK == 0
assert _WALK_WINDOW <= _BACK_CHUNK


@dataclass(frozen=True, slots=True)
class Damage:
    """A stretch ``[start, end)`` of the file that held no readable segment.

    ``reason`` says why the segment expected at ``start`` was rejected.  Records
    inside the stretch are lost; the scan resumed at ``end``.  ``torn`` is true
    for a stretch that looks like a write cut short by a crash rather than
    damage: it ends the file's non-zero bytes, starts with a valid segment
    header, and some block of that segment is missing or all zero
    (``docs/format.md`` section 7.1).
    """

    start: int
    end: int
    reason: str
    torn: bool = False


class Reader:
    """Single-pass iterator over the DATA records of one file, in file order.

    Create it with :func:`read`.  Each item is one record's payload as
    :class:`bytes`.  The counters below grow as iteration proceeds and are final
    once the iterator is exhausted:

    * ``segments``: valid segments read;
    * ``records``: DATA records returned;
    * ``abandoned``: ABANDONED records skipped;
    * ``damaged``: :class:`Damage` stretches skipped (only with ``strict=False``).

    The file is read up to the size it had when it was opened.  The file
    descriptor is closed when iteration ends (normally or by an error), on
    :meth:`close`, or on leaving a ``with`` block.
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = True) -> None:
        # Sentinels first, so that close() and __del__ work if open() fails.
        self._fd = -1
        self._closed = False
        self._pid = os.getpid()
        self.path = os.fspath(path)
        self.strict = strict
        self.damaged: list[Damage] = []
        self.abandoned = 0
        self.segments = 0
        self.records = 0
        self._buf = b""
        self._buf_start = 0
        self._nonzero_end_cache = -1
        # The file header's stream id; None until known (a tolerant reader of a
        # file whose header is damaged adopts the first valid segment's).
        self._stream: bytes | None = None
        self.file_header: FileHeader | None = None
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            self._release_fd()
            raise
        self._gen = self._scan()

    # -- public surface ------------------------------------------------------

    def __iter__(self) -> Reader:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise ValueError("I/O operation on a closed Reader")
        return next(self._gen)

    def close(self) -> None:
        """Stop reading and close the file.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Runs the scan's finally clause, which releases the fd and the window.
        self._gen.close()
        self._release_fd()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net only.  A forked child shares nothing here worth closing.
        if getattr(self, "_pid", None) != os.getpid():
            return
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- internals -------------------------------------------------------------

    def _release_fd(self) -> None:
        self._buf = b""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _pread(self, offset: int, n: int) -> bytes:
        """pread(2) until ``n`` bytes or end of file."""
        if self._fd < 0:
            raise ValueError("I/O operation on a closed Reader")
        data = os.pread(self._fd, n, offset)
        if len(data) == n or not data:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = os.pread(self._fd, n - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _get(self, offset: int, n: int) -> memoryview:
        """View of file bytes ``[offset, offset + n)``; callers keep it within ``_size``.

        Served from the read-ahead window when possible, else the window is refilled
        at ``offset`` with at least ``n`` bytes.
        """
        rel = offset - self._buf_start
        if rel < 0 or rel + n > len(self._buf):
            want = min(max(n, _READ_CHUNK), self._size - offset)
            self._buf = self._pread(offset, want)
            self._buf_start = offset
            rel = 0
            if len(self._buf) < n:
                # Only a concurrent truncation gets here: _size was checked.
                raise CorruptFileError(self.path, offset, "file shrank while being read")
        return memoryview(self._buf)[rel : rel + n]

    def _nonzero_end(self) -> int:
        """Offset just past the last non-zero byte of the file (0 if all zero).

        Found once, scanning backward, so that "is everything from p on zero?" costs
        O(1) per resynchronisation step instead of a read to end of file.
        """
        if self._nonzero_end_cache >= 0:
            return self._nonzero_end_cache
        hi = self._size
        while hi > 0:
            lo = max(0, hi - _READ_CHUNK)
            chunk = self._pread(lo, hi - lo)
            if chunk.count(0) != len(chunk):
                hi = lo + len(chunk.rstrip(b"\0"))
                break
            hi = lo
        self._nonzero_end_cache = hi
        return hi

    def _check_segment(self, p: int) -> SegmentHeader | str:
        """Fully validate the segment expected at ``p``: header, fit, payload CRC, records."""
        left = self._size - p
        header = parse_segment_header(self._get(p, min(SEGMENT_HEADER_SIZE, left)), p, self._stream)
        if isinstance(header, str):
            return header
        used = header.used
        # Checked before any read of the body: a corrupt or hostile ``used`` must not
        # turn into a large read or allocation.
        if SEGMENT_HEADER_SIZE + used > left:
            return (
                f"segment record area of {used} bytes runs past the end of the file "
                f"({left - SEGMENT_HEADER_SIZE} bytes left)"
            )
        body_start = p + SEGMENT_HEADER_SIZE
        if SEGMENT_HEADER_SIZE + used <= _WHOLE_SEGMENT_LIMIT:
            body = self._get(body_start, used)
            if crc(body) != header.payload_crc:
                return "payload CRC mismatch"
            problem = check_records(body)
            return header if problem is None else f"malformed {problem}"
        return self._check_large_body(body_start, header)

    def _check_large_body(self, body_start: int, header: SegmentHeader) -> SegmentHeader | str:
        """Streamed CRC and record walk over a body bigger than ``_WHOLE_SEGMENT_LIMIT``."""
        used = header.used
        crc_so_far = 0
        next_record = 0  # record-area offset of the next record header
        pos = 0
        while pos < used:
            n = min(_READ_CHUNK, used - pos)
            chunk = self._get(body_start + pos, n)
            crc_so_far = crc(chunk, crc_so_far)
            # Records start 8-aligned and chunks are cut at multiples of 8, so a
            # record header never straddles two chunks.
            while next_record < pos + n:
                length, kind, mark = RECORD_HEADER.unpack_from(chunk, next_record - pos)
                if is_padding(length, kind, mark):
                    next_record = pos + skip_padding(chunk, next_record - pos, n)
                    continue
                problem = _record_problem(next_record, length, kind, mark, used)
                if problem is not None:
                    return f"malformed {problem}"
                next_record += record_size(length)
            pos += n
        if crc_so_far != header.payload_crc:
            return "payload CRC mismatch"
        return header

    def _large_records(self, body_start: int, used: int) -> Iterator[tuple[int, bytes]]:
        """Second pass over a large, already validated body: ``(kind, payload)``."""
        pos = 0
        while pos < used:
            length, kind, mark = RECORD_HEADER.unpack_from(
                self._get(body_start + pos, RECORD_HEADER_SIZE)
            )
            if is_padding(length, kind, mark):
                n = min(_READ_CHUNK, used - pos)
                pos += skip_padding(self._get(body_start + pos, n), 0, n)
                continue
            # The body was validated a moment ago; a difference now means someone
            # rewrote it under us, and nothing more of it can be trusted.
            if _record_problem(pos, length, kind, mark, used) is not None:
                raise CorruptFileError(
                    self.path, body_start - SEGMENT_HEADER_SIZE, "segment changed while being read"
                )
            payload = b""
            if kind != KIND_ABANDONED:
                payload = bytes(self._get(body_start + pos + RECORD_HEADER_SIZE, length))
            yield kind, payload
            pos += record_size(length)

    def _scan(self) -> Generator[bytes, None, None]:
        try:
            yield from self._scan_inner()
        finally:
            self._release_fd()

    def _open_file_header(self) -> None:
        """Read and check the file header; sets ``_stream``.  An all-zero or empty
        file holds nothing (``_size`` is set to 0); a damaged header is damage."""
        size = self._size
        if size == 0 or self._nonzero_end() == 0:
            self._size = 0
            return
        head = self._get(0, min(SEGMENT_HEADER_SIZE, size))
        header = parse_file_header(head)
        if isinstance(header, FileHeader):
            if header.version != FORMAT_VERSION:
                raise UnsupportedFormatError(self.path, 0, header.version)
            self.file_header = header
            self._stream = header.stream_id
            return
        version = headerless_version(head)
        if version is not None:
            # Not damage: every segment would fail the same way, and a tolerant
            # reader would return nothing without saying why.
            raise UnsupportedFormatError(self.path, 0, version, headerless=True)
        if self.strict:
            raise CorruptFileError(self.path, 0, header)
        # Tolerant: block 0 is damage, and the stream id is taken from the first
        # segment that checks out in every other way.  A payload cannot supply
        # it: it lies inside a segment that starts lower, which is found first
        # unless it is damaged too.
        self.damaged.append(Damage(0, min(DATA_START, size), header))

    def _scan_inner(self) -> Iterator[bytes]:
        self._open_file_header()
        size = self._size
        p = DATA_START
        damage_start = -1
        damage_reason = ""
        while p < size:
            checked = self._check_segment(p)
            if isinstance(checked, str):
                # A zero tail (preallocated, or never written) ends the file cleanly.
                if p >= self._nonzero_end():
                    break
                if damage_start < 0:
                    if self.strict:
                        raise CorruptFileError(self.path, p, checked)
                    damage_start, damage_reason = p, checked
                # Resynchronise: segments only ever start on a block boundary.
                p += BLOCK
                continue
            if self._stream is None:
                self._stream = checked.stream_id
            described: ArrayDescriptor | None = None
            described_left = 0  # a descriptor covers rows of its own segment only
            if damage_start >= 0:
                self.damaged.append(Damage(damage_start, p, damage_reason))
                damage_start = -1
            self.segments += 1
            used = checked.used
            body_start = p + SEGMENT_HEADER_SIZE
            p += segment_size(used)
            if SEGMENT_HEADER_SIZE + used <= _WHOLE_SEGMENT_LIMIT:
                records: Iterator[tuple[int, Any]] = iter_records(self._get(body_start, used))
            else:
                records = self._large_records(body_start, used)
            for kind, payload in records:
                if kind == KIND_DATA:
                    self.records += 1
                    if described_left:
                        described_left -= 1
                        self.row_descriptor = described
                    else:
                        self.row_descriptor = None
                    yield bytes(payload)
                elif kind == KIND_ABANDONED:
                    self.abandoned += 1
                else:  # KIND_ARRAY
                    described = parse_array_descriptor(payload)
                    described_left = described.rows if described is not None else 0
        if damage_start >= 0:
            end = min(p, size)
            torn = end >= self._nonzero_end() and self._looks_torn(damage_start)
            self.damaged.append(Damage(damage_start, end, damage_reason, torn))

    #: The array descriptor of the DATA record returned last, if append_array
    #: wrote it (the KIND_ARRAY record before it in its segment covers it).
    row_descriptor: ArrayDescriptor | None = None

    def _looks_torn(self, p: int) -> bool:
        """Is the damage at ``p``, which runs to the last non-zero byte, what an
        interrupted write of one segment leaves (docs/format.md section 7.1)?"""
        if self._stream is None:
            return False
        return tail_looks_torn(
            lambda at, n: bytes(self._get(at, min(n, self._size - at))),
            p,
            self._size,
            self._nonzero_end(),
            self._stream,
        )


def tail_looks_torn(get: Any, p: int, size: int, nonzero_end: int, stream_id: bytes) -> bool:
    """True if the bytes ``[p, nonzero_end)`` look like one segment whose write
    was cut short: a header at ``p`` that checks out (stream id, address), no
    non-zero byte past that segment's extent, and at least one block of its
    record area past the end of the file or all zero (a block that never
    landed).  A segment whose every block is there, non-zero, yet fails its
    payload CRC is bit rot, not a torn write.  ``get(offset, n)`` returns up to
    ``n`` file bytes at ``offset``.
    """
    if size - p < SEGMENT_HEADER_SIZE:
        # A header cut short: only a write that stopped inside block p's
        # first 64 bytes leaves that (a file that ends there).
        return True
    header = parse_segment_header(get(p, SEGMENT_HEADER_SIZE), p, stream_id)
    if isinstance(header, str):
        return False
    extent_end = p + segment_size(header.used)
    if nonzero_end > extent_end:
        return False
    body_end = p + SEGMENT_HEADER_SIZE + header.used
    if body_end > size:
        return True  # the file ends inside the record area
    # Disks tear writes at sector granularity (512 bytes, or 4096 on 4Kn
    # drives), so a sector of zeros is the trace of a missing piece.
    first = p + SEGMENT_HEADER_SIZE
    first += -first % _SECTOR
    for sector in range(first, body_end, _SECTOR):
        data = get(sector, min(_SECTOR, body_end - sector))
        if data.count(0) == len(data):
            return True
    return False


def _record_problem(pos: int, length: int, kind: int, mark: int, used: int) -> str | None:
    """The same checks as :func:`shmflush._format.iter_records`, for one header."""
    if mark != RECORD_MARK:
        return f"record at record-area offset {pos}: bad mark 0x{mark:04x}"
    if kind not in RECORD_KINDS:
        return f"record at record-area offset {pos}: unknown kind {kind}"
    if record_size(length) > used - pos:
        return (
            f"record at record-area offset {pos}: length {length} runs past the end ({used} bytes)"
        )
    return None


def read(path: str | os.PathLike[str], *, strict: bool = True) -> Reader:
    """Open ``path`` for reading its DATA records, in file order.

    Iterating the returned :class:`Reader` yields each DATA record's payload as
    :class:`bytes`; ABANDONED records are skipped and counted.  Records of one
    writer come out in the order it appended them.  The file is read lazily, a
    few MiB at a time, so files of any size can be read.

    A preallocated or never-written all-zero tail ends the file cleanly.  Any
    other stretch that does not hold a valid segment (torn write, zeroed hole
    followed by data, bit rot) is *damage*:

    * ``strict=True`` (default): iteration raises
      :class:`~shmflush.CorruptFileError` with the damage's start offset, after
      having yielded every record before it;
    * ``strict=False``: the stretch is skipped, the scan resynchronises at the next
      4 KiB boundary holding a valid segment, and a :class:`Damage` is appended
      to ``reader.damaged``.

    The file header (``docs/format.md`` section 2) is checked first.  A file of
    another format version (a newer one, or a development build that wrote no
    file header) is not damage: iteration raises
    :class:`~shmflush.UnsupportedFormatError`, naming both versions, in both
    modes.  A damaged file header is damage at offset 0; a tolerant reader goes
    on with the stream id of the first valid segment.  A segment of another
    stream (its stream id is not the file header's) is damage.

    Guarantee: no payload is ever returned from a segment whose header CRC,
    stream id, self-declared address, payload CRC or record structure fails,
    and bytes inside a valid segment are never read as a segment header.

    Raises :class:`OSError` if the file cannot be opened.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    if not isinstance(path, bytes):
        files = _files.list_files(os.fspath(path))
        if len(files) > 1 or (files and files[0][0] != 0):
            return StreamReader(os.fspath(path), files, strict=strict)
    return Reader(path, strict=strict)


class StreamReader(Reader):
    """A :class:`Reader` over every file of a rotated stream (``path``, then
    ``path.000001``, ...; docs/rotation.md), in order, as one sequence.  The
    counters add up over the files; ``damaged`` offsets are per file, and
    ``damaged_files`` names the file of each.  A file of another stream among
    them is damage at its offset 0 (strict: :class:`CorruptFileError`)."""

    def __init__(self, path: str, files: list[tuple[int, str]], *, strict: bool = True) -> None:
        # Reader's surface without a file of its own: each file gets a Reader.
        self._fd = -1
        self._closed = False
        self._pid = os.getpid()
        self.path = path
        self.strict = strict
        self.damaged = []
        self.damaged_files: list[str] = []
        self.abandoned = self.segments = self.records = 0
        self._buf = b""
        self._buf_start = 0
        self._nonzero_end_cache = -1
        self._stream = None
        self.file_header = None
        self._size = 0
        self.files = files
        self._gen = self._chain()

    def _chain(self) -> Generator[bytes, None, None]:
        for number, name in self.files:
            if _files.interrupted_roll(number, name):
                continue  # no record in it (docs/format.md section 2.1)
            try:
                part = Reader(name, strict=self.strict)
            except FileNotFoundError:
                continue  # retention deleted it since the listing
            try:
                header = _files.header_of(name)
                stream = None if header is None else header.stream_id
                if self._stream is None:
                    self._stream, self.file_header = stream, header
                elif stream is not None and stream != self._stream:
                    if self.strict:
                        raise CorruptFileError(name, 0, "a file of another stream")
                    self.damaged.append(Damage(0, part._size, "a file of another stream"))
                    self.damaged_files.append(name)
                    continue
                yield from part
            finally:
                self.abandoned += part.abandoned
                self.segments += part.segments
                self.records += part.records
                self._size += part._size
                self.damaged.extend(part.damaged)
                self.damaged_files.extend([name] * len(part.damaged))
                part.close()


def read_array(
    path: str | os.PathLike[str], dtype: Any = None, *, strict: bool = True
) -> np.ndarray[Any, Any]:
    """Read every DATA record of *path* as one row of a numpy array.

    The counterpart of :meth:`Ring.append_array`, which writes before each
    batch of rows an array descriptor: the row size, the element dtype and the
    row shape.  With ``dtype=None`` (default) the dtype comes from those
    descriptors: every record must be a row that append_array wrote, all with
    the same dtype and shape, else :class:`ValueError` names the first record
    that is not.  A row of shape ``s`` comes back as ``result[i]`` of shape
    ``s`` (a 2-D ``uint8`` array of width w reads back as shape ``(N, w)``).

    With a *dtype*, every record must be exactly ``numpy.dtype(dtype).itemsize``
    bytes (records that ``append`` wrote included), else :class:`ValueError`
    names the first record that is not; a descriptor's row size must agree.
    For rows of width w, ``dtype=(numpy.uint8, (w,))`` gives shape ``(N, w)``.
    Damage is handled as in :func:`read`.
    """
    import numpy as np  # noqa: PLC0415  (only array users pay for numpy)

    where = os.fspath(path)
    given = None if dtype is None else np.dtype(dtype)
    found: Any = None
    parsed: dict[str, Any] = {}
    chunks: list[bytes] = []
    with read(path, strict=strict) as reader:
        for index, record in enumerate(reader):
            desc = reader.row_descriptor
            if desc is not None and desc.row_size != len(record):
                raise ValueError(
                    f"{where}: record {index} has {len(record)} bytes, its array descriptor "
                    f"says rows of {desc.row_size}"
                )
            if given is not None:
                if len(record) != given.itemsize:
                    raise ValueError(
                        f"{where}: record {index} has {len(record)} bytes, "
                        f"dtype {given} needs {given.itemsize}"
                    )
            else:
                if desc is None or not desc.dtype_text:
                    raise ValueError(
                        f"{where}: record {index} carries no dtype (append_array did not "
                        "write it); pass dtype= to read_array"
                    )
                dt = parsed.get(desc.dtype_text)
                if dt is None:
                    dt = parsed[desc.dtype_text] = _descriptor_dtype(np, desc.dtype_text, where)
                if found is None:
                    found = dt
                elif dt != found:
                    raise ValueError(
                        f"{where}: record {index} is a row of dtype {dt}, earlier rows of "
                        f"{found}; pass dtype= to read them all as one"
                    )
                if dt.itemsize != len(record):
                    raise ValueError(
                        f"{where}: record {index} has {len(record)} bytes, its dtype {dt} "
                        f"needs {dt.itemsize}"
                    )
            chunks.append(record)
    dt_out = given if given is not None else (found if found is not None else np.dtype("V0"))
    # bytearray.join: one copy, and the array is writable.
    return np.frombuffer(bytearray().join(chunks), dtype=dt_out)


def _descriptor_dtype(np: Any, text: str, where: str) -> Any:
    """The row dtype an array descriptor's text names: ``repr((descr, shape))``."""
    import ast  # noqa: PLC0415

    try:
        descr, shape = ast.literal_eval(text)
        base = np.lib.format.descr_to_dtype(descr)
        return np.dtype((base, tuple(shape))) if shape else base
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{where}: unreadable array descriptor {text[:80]!r}: {exc}") from None


class _AlignedReader:
    """pread(2) into a page-aligned buffer at block-aligned offsets.

    find_append_point is handed the flusher's fd, which is typically opened with
    O_DIRECT; O_DIRECT reads need an aligned buffer, offset and length, which a
    plain os.pread cannot guarantee.  Aligned reads work on any fd.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        # Anonymous mmap: page-aligned memory.
        self.buf = mmap.mmap(-1, _BACK_CHUNK)

    def close(self) -> None:
        self.buf.close()

    def read(self, start: int, end: int) -> memoryview:
        """View of file bytes ``[start, end)``; start % BLOCK == 0, end - start <= chunk."""
        end = min(end, self.size)
        want = pad_block(end - start)
        got = 0
        with memoryview(self.buf) as whole:
            while got < want:
                with whole[got:want] as dest:
                    n = os.preadv(self.fd, [dest], start + got)
                got += n
                # Short read: end of file (or the file shrank).  A non-block
                # remainder could not be continued with O_DIRECT anyway.
                if n == 0 or n % BLOCK or start + got >= end:
                    break
        # A slice of a fresh memoryview: the caller must release it before close().
        return memoryview(self.buf)[: max(0, min(got, end - start))]


@dataclass(frozen=True, slots=True)
class AppendPoint:
    """Where a ring appends to an existing file, and what lies after that point.

    ``address`` is the end (padded size) of the last valid segment, or
    :data:`DATA_START` when there is none; ``next_seq`` that segment's seq + 1.
    ``tail`` says what ``[address, size)`` holds: ``"none"`` (nothing),
    ``"zero"`` (only zero bytes), ``"torn"`` (one segment whose write was cut
    short, see :func:`tail_looks_torn`) or ``"damage"`` (non-zero bytes that are
    not a torn write: bit rot, or a torn write that cannot be told from it).
    ``nonzero_end`` is the end of the last non-zero byte at or after ``address``.
    """

    address: int
    next_seq: int
    tail: str
    nonzero_end: int


def find_append_point(fd: int, stream_id: bytes) -> AppendPoint:
    """Where to append to an existing file whose header has ``stream_id``.

    Walks the segments forward from :data:`DATA_START`, one header at a time,
    by arithmetic: a segment whose header checks out (magic, version, header
    CRC, stream id, address) is jumped over whole, so no byte inside a payload
    is ever looked at as a header.  Only after damage (an invalid header with
    non-zero bytes after it) does the walk try each next block boundary, as a
    tolerant reader does; a candidate must then carry this file's stream id.
    The append point is the end of the last segment whose header *and* payload
    CRC check out.  Cost: one header read per segment, plus the payload CRC of
    the last segments.

    ``fd`` must be open for reading; it may use O_DIRECT.  Its file position is
    not used or changed.  Nothing is written: what to do with the tail is the
    caller's decision (see :class:`AppendPoint`).
    """
    size = os.fstat(fd).st_size
    reader = _AlignedReader(fd, size)
    try:
        nonzero_end = _nonzero_end_of(reader, size)
        walked: list[tuple[int, SegmentHeader]] = []
        p = DATA_START
        window, window_start = b"", 0
        read_ahead = _WALK_WINDOW
        while p < min(size, nonzero_end):
            rel = p - window_start
            if not 0 <= rel <= len(window) - SEGMENT_HEADER_SIZE:
                # Small segments: one read serves many headers.  Large ones: read
                # only the block that holds the header, not the payload around it.
                with reader.read(p, p + min(read_ahead, _BACK_CHUNK)) as chunk:
                    window, window_start, rel = bytes(chunk), p, 0
            header = parse_segment_header(window[rel : rel + SEGMENT_HEADER_SIZE], p, stream_id)
            if not isinstance(header, str) and SEGMENT_HEADER_SIZE + header.used <= size - p:
                walked.append((p, header))
                step = segment_size(header.used)
                read_ahead = BLOCK if step > _WALK_WINDOW // 4 else _WALK_WINDOW
                p += step
            else:
                p += BLOCK  # damage: resynchronise at the next block boundary
        address, next_seq = DATA_START, 0
        # Usually the last walked segment is whole; crashes can tear a few in flight.
        for start, header in reversed(walked):
            if _payload_crc(reader, start, header.used) == header.payload_crc:
                address, next_seq = start + segment_size(header.used), header.seq + 1
                break
        if address >= size:
            tail = "none"
        elif address >= nonzero_end:
            tail = "zero"
        else:

            def get(at: int, n: int) -> bytes:
                with reader.read(at - at % BLOCK, at + n) as chunk:
                    return bytes(chunk[at % BLOCK : at % BLOCK + n])

            torn = tail_looks_torn(get, address, size, nonzero_end, stream_id)
            tail = "torn" if torn else "damage"
        return AppendPoint(address, next_seq, tail, max(nonzero_end, address))
    finally:
        reader.close()


def _nonzero_end_of(reader: _AlignedReader, size: int) -> int:
    """Offset just past the last non-zero byte of the file, scanning backward."""
    hi = ((size + BLOCK - 1) // BLOCK) * BLOCK
    while hi > 0:
        lo = max(0, hi - _BACK_CHUNK)
        with reader.read(lo, hi) as chunk:
            data = bytes(chunk)
        if data.count(0) != len(data):
            return lo + len(data.rstrip(b"\0"))
        hi = lo
    return 0


def _payload_crc(reader: _AlignedReader, segment_start: int, used: int) -> int:
    """CRC of the record area of the segment at ``segment_start``, read in chunks."""
    crc_so_far = 0
    # Reads start at block boundaries (O_DIRECT); the header is skipped in the first.
    body_start = segment_start + SEGMENT_HEADER_SIZE
    body_end = body_start + used
    start = segment_start
    while start < body_end:
        end = min(start + _BACK_CHUNK, body_end)
        with reader.read(start, end) as chunk:
            skip = max(0, body_start - start)
            if chunk.nbytes < end - start:
                return -1  # file shrank: cannot match a real CRC
            with chunk[skip : end - start] as part:
                crc_so_far = crc(part, crc_so_far)
        start = end
    return crc_so_far
