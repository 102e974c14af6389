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

from ._errors import CorruptFileError, UnsupportedFormatError
from ._format import (
    BLOCK,
    KIND_ABANDONED,
    KIND_DATA,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MARK,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SegmentHeader,
    check_records,
    crc,
    is_padding,
    iter_records,
    older_version,
    pad_block,
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
# Window of the backward scan in find_append_point.
_BACK_CHUNK = 1 << 20

assert _READ_CHUNK % BLOCK == 0
assert _BACK_CHUNK % BLOCK == 0


@dataclass(frozen=True, slots=True)
class Damage:
    """A stretch ``[start, end)`` of the file that held no readable segment.

    ``reason`` says why the segment expected at ``start`` was rejected.  Records
    inside the stretch are lost; the scan resumed at ``end``.
    """

    start: int
    end: int
    reason: str


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
        header = parse_segment_header(self._get(p, min(SEGMENT_HEADER_SIZE, left)), p)
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
            if kind == KIND_DATA:
                payload = bytes(self._get(body_start + pos + RECORD_HEADER_SIZE, length))
            yield kind, payload
            pos += record_size(length)

    def _scan(self) -> Generator[bytes, None, None]:
        try:
            yield from self._scan_inner()
        finally:
            self._release_fd()

    def _scan_inner(self) -> Iterator[bytes]:
        size = self._size
        p = 0
        damage_start = -1
        damage_reason = ""
        while p < size:
            checked = self._check_segment(p)
            if isinstance(checked, str):
                if checked.startswith("unsupported format version"):
                    version = older_version(self._get(p, SEGMENT_HEADER_SIZE))
                    if version is not None:
                        # Not damage: every segment would fail the same way, and a
                        # tolerant reader would return nothing without saying why.
                        raise UnsupportedFormatError(self.path, p, version)
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
            if damage_start >= 0:
                self.damaged.append(Damage(damage_start, p, damage_reason))
                damage_start = -1
            self.segments += 1
            used = checked.used
            body_start = p + SEGMENT_HEADER_SIZE
            p += segment_size(used)
            if SEGMENT_HEADER_SIZE + used <= _WHOLE_SEGMENT_LIMIT:
                body = self._get(body_start, used)
                for kind, payload in iter_records(body):
                    if kind == KIND_DATA:
                        self.records += 1
                        yield bytes(payload)
                    else:
                        self.abandoned += 1
            else:
                for kind, data in self._large_records(body_start, used):
                    if kind == KIND_DATA:
                        self.records += 1
                        yield data
                    else:
                        self.abandoned += 1
        if damage_start >= 0:
            self.damaged.append(Damage(damage_start, min(p, size), damage_reason))


def _record_problem(pos: int, length: int, kind: int, mark: int, used: int) -> str | None:
    """The same checks as :func:`shmflush._format.iter_records`, for one header."""
    if mark != RECORD_MARK:
        return f"record at record-area offset {pos}: bad mark 0x{mark:04x}"
    if kind not in (KIND_DATA, KIND_ABANDONED):
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

    A segment written in an earlier version of the file format (an intact header
    of that version) is not damage: iteration raises
    :class:`~shmflush.UnsupportedFormatError` there, in both modes.

    Guarantee: no payload is ever returned from a segment whose header CRC,
    self-declared address, payload CRC or record structure fails.

    Raises :class:`OSError` if the file cannot be opened.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    return Reader(path, strict=strict)


def read_array(
    path: str | os.PathLike[str], dtype: Any, *, strict: bool = True
) -> np.ndarray[Any, Any]:
    """Read every DATA record of *path* as one element of a numpy array.

    The counterpart of :meth:`Ring.append_array`: every record must be exactly
    ``numpy.dtype(dtype).itemsize`` bytes, else :class:`ValueError` names the
    first record that is not.  For rows of a 2-D ``uint8`` array of width w, pass
    ``dtype=(numpy.uint8, (w,))`` to get the rows back as shape ``(N, w)``.
    Damage is handled as in :func:`read`.
    """
    import numpy as np  # noqa: PLC0415  (only array users pay for numpy)

    dt = np.dtype(dtype)
    chunks: list[bytes] = []
    with read(path, strict=strict) as reader:
        for index, record in enumerate(reader):
            if len(record) != dt.itemsize:
                raise ValueError(
                    f"{os.fspath(path)}: record {index} has {len(record)} bytes, "
                    f"dtype {dt} needs {dt.itemsize}"
                )
            chunks.append(record)
    # bytearray.join: one copy, and the array is writable.
    return np.frombuffer(bytearray().join(chunks), dtype=dt)


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


def find_append_point(fd: int) -> tuple[int, int]:
    """Where to append to an existing file: ``(address, next_seq)``.

    ``address`` is the end (padded size) of the last valid segment in the file and
    ``next_seq`` that segment's seq + 1; ``(0, 0)`` for an empty file or one with
    no valid segment.  Whatever lies after the last valid segment (a torn
    segment, zeros) is not part of the file's contents: truncate the file to
    ``address`` (ftruncate(2)) before appending, or leftovers of a torn tail
    longer than the new segments would remain behind them and read as damage.

    ``fd`` must be open for reading; it may use O_DIRECT.  Its file position is not
    used or changed.  The scan runs backward from the end, a block at a time, so
    its cost depends on the size of the torn or zero tail, not of the file.

    A segment counts as valid if its header checks out (magic, version, header
    CRC), its self-declared address equals its offset, its record area fits in the
    file and its payload CRC matches.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, 0
    # A backward scan trusts the first valid-looking header it meets.  A record
    # payload crafted to contain, at a 4 KiB boundary, a complete segment header
    # with the right address and a matching payload CRC would be taken for a real
    # segment.  Accepted: it needs deliberate crafting (the address self-check and
    # both CRCs rule out accidents), and a forward scan would cost the whole file.
    reader = _AlignedReader(fd, size)
    try:
        top = ((size - 1) // BLOCK) * BLOCK  # last block boundary inside the file
        while top >= 0:
            lo = max(0, top - (_BACK_CHUNK - BLOCK))
            found = _scan_window_backward(reader, lo, top)
            if found is not None:
                return found
            top = lo - BLOCK
        return 0, 0
    finally:
        reader.close()


def _scan_window_backward(reader: _AlignedReader, lo: int, top: int) -> tuple[int, int] | None:
    """Check candidates top, top - BLOCK, ..., lo (all block-aligned)."""
    headers: list[tuple[int, SegmentHeader]] = []
    with reader.read(lo, top + BLOCK) as window:
        for candidate in range(top, lo - 1, -BLOCK):
            rel = candidate - lo
            # Cheap reject first: almost every block is payload or zeros.
            if window[rel : rel + len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
                continue
            header = parse_segment_header(window[rel : rel + SEGMENT_HEADER_SIZE], candidate)
            if not isinstance(header, str):
                headers.append((candidate, header))
    # The window's view is released before the body reads reuse the buffer.
    for candidate, header in headers:
        if SEGMENT_HEADER_SIZE + header.used > reader.size - candidate:
            continue
        if _payload_crc(reader, candidate, header.used) == header.payload_crc:
            return candidate + segment_size(header.used), header.seq + 1
    return None


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
