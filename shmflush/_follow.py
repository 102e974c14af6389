"""Reading a file while a ring writes it: :func:`follow` and its durable cursors.

The walk is ``docs/format.md`` section 9's: records come out in file order, and
at an invalid segment (a hole, a write in progress, the zero tail) the follower
keeps its position and looks again later, so a hole below a segment that is
already written never makes it skip a record that lands there afterwards.

When does a hole count as permanent (damage)?  Only when no ring writes the
file any more, which the follower learns from the ring's lock: the flusher holds
an exclusive ``flock(2)`` on the file for as long as the ring lives, so a
non-blocking shared ``flock`` on the follower's own open file description
succeeds exactly when nobody writes.  After it succeeds the follower re-reads
once more (the last segments may have landed just before the ring let go) and
from then on reads the file as :func:`shmflush.read` does.  Optionally, a hole
that outlives ``hole_timeout`` while a ring still writes counts as damage too.

The follower waits by sleeping, with a backoff from 1 ms to 50 ms (no inotify:
it is not in the standard library), so an idle follower costs at most a few
dozen wake-ups a second and never spins a core.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import _files
from ._errors import CorruptFileError, CursorError
from ._format import (
    BLOCK,
    DATA_START,
    KIND_DATA,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_MARK,
    SEGMENT_HEADER_SIZE,
    SegmentHeader,
    crc,
    parse_segment_header,
    record_size,
    segment_size,
    skip_padding,
)
from ._reader import _WHOLE_SEGMENT_LIMIT, Damage, Reader

POLL_MIN = 0.001
POLL_MAX = 0.05
CURSOR_FORMAT = "shmflush-cursor"
CURSOR_VERSION = 1
_CURSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# A cursor file is a few hundred bytes; anything far larger is not one.
_CURSOR_MAX = 1 << 16
_unpack_record = RECORD_HEADER.unpack_from


@dataclass(frozen=True, slots=True)
class Record:
    """One DATA record that :func:`follow` yields.

    ``payload`` is the record's bytes as appended; ``offset`` the file offset of
    its record header (unique per record of a file, increasing in file order);
    ``segment`` the file offset of its segment, ``seq`` and ``sealed_ns`` that
    segment's seal number and seal time (CLOCK_REALTIME ns: the record was
    appended at or before it).
    """

    payload: bytes
    offset: int
    segment: int
    seq: int
    sealed_ns: int


@dataclass(frozen=True, slots=True)
class Position:
    """Where a follower resumes: the record area offset ``record`` of the
    segment at file offset ``segment``, in file number ``file`` (always 0 until
    files rotate) of the stream ``stream_id``."""

    stream_id: bytes
    segment: int
    record: int = 0
    file: int = 0

    def token(self) -> str:
        """The position as one word: ``STREAMHEX:FILE:SEGMENT:RECORD``."""
        return f"{self.stream_id.hex()}:{self.file}:{self.segment}:{self.record}"

    @classmethod
    def parse(cls, token: str) -> Position:
        """The inverse of :meth:`token`; raises ValueError on anything else."""
        parts = token.strip().split(":")
        if len(parts) != 4:
            raise ValueError(f"not a cursor position: {token[:80]!r}")
        stream = bytes.fromhex(parts[0])
        if len(stream) != 16:
            raise ValueError(f"not a 16-byte stream id: {parts[0][:80]!r}")
        file, segment, record = (int(x) for x in parts[1:])
        return cls(stream, segment, record, file)


def cursor_path(path: str, name: str, directory: str | None = None) -> str:
    """The file that holds the cursor ``name`` of the log ``path``:
    ``<path>.cursors/<name>``, or ``<directory>/<name>``."""
    if not isinstance(name, str) or not _CURSOR_NAME.fullmatch(name):
        raise ValueError(
            f"cursor name must be 1 to 128 of letters, digits, '.', '_' and '-', not "
            f"starting with '.' or '-': got {name!r}"
        )
    return os.path.join(directory if directory is not None else path + ".cursors", name)


def load_cursor(where: str) -> Position | None:
    """The position stored in the cursor file ``where``; None if there is none.
    Raises :class:`CursorError` if the file is not a cursor."""
    try:
        with open(where, "rb") as f:
            data = f.read(_CURSOR_MAX + 1)
    except FileNotFoundError:
        return None
    try:
        position = _parse_cursor(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CursorError(where, f"not a shmflush cursor file ({exc})") from None
    if (
        position.segment < DATA_START
        or position.segment % BLOCK
        or position.record < 0
        or position.record % 8
        or position.file < 0
    ):
        raise CursorError(where, f"names no record position: {position.token()}")
    return position


def _parse_cursor(data: bytes) -> Position:
    if len(data) > _CURSOR_MAX:
        raise ValueError("too large")
    fields = json.loads(data)
    if fields.get("format") != CURSOR_FORMAT or fields.get("version") != CURSOR_VERSION:
        raise ValueError(f"format {fields.get('format')!r} version {fields.get('version')!r}")
    return Position.parse(fields["position"])


def store_cursor(where: str, position: Position) -> None:
    """Write ``position`` to the cursor file ``where`` durably: a temporary file
    in the same directory, fsync, rename over the old one, fsync the directory.
    A crash leaves the old cursor or the new one, never a mix."""
    directory = os.path.dirname(where) or "."
    os.makedirs(directory, exist_ok=True)
    body = json.dumps(
        {
            "format": CURSOR_FORMAT,
            "version": CURSOR_VERSION,
            "position": position.token(),
            "stream_id": position.stream_id.hex(),
            "file": position.file,
            "segment": position.segment,
            "record": position.record,
        }
    ).encode()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(where) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, where)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ring_writes(fd: int) -> bool:
    """Does a ring write the file open at ``fd`` right now?

    The ring's flusher holds an exclusive flock on the file while the ring
    lives.  A shared, non-blocking flock on a *new* open file description of
    the same inode (``/proc/self/fd``: a rename or unlink of the path does not
    fool it) tells; it is released at once, because ``create()`` and a flusher
    restart refuse a file that anybody holds locked.
    """
    probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(probe)  # releases the probe's lock, if it got it
    return False


class _Scan(Reader):
    """A :class:`Reader` whose view of the file can be refreshed: the follower
    uses its segment checks, its window and its large-segment streaming."""

    def __init__(self, path: str, strict: bool) -> None:
        super().__init__(path, strict=strict)
        self._gen.close()  # the Reader's own scan is not used

    def refresh(self) -> None:
        self._size = os.fstat(self._fd).st_size
        self._buf = b""
        self._buf_start = 0
        self._nonzero_end_cache = -1

    #: Leave the record walk of small segments to the caller (``cat``'s fast
    #: path walks each record once, checking as it goes).
    defer_walk = False

    def _check_segment(self, p: int) -> SegmentHeader | str:
        if not self.defer_walk:
            return super()._check_segment(p)
        left = self._size - p
        header = parse_segment_header(self._get(p, min(SEGMENT_HEADER_SIZE, left)), p, self._stream)
        if isinstance(header, str) or SEGMENT_HEADER_SIZE + header.used > _WHOLE_SEGMENT_LIMIT:
            return header if isinstance(header, str) else super()._check_segment(p)
        if SEGMENT_HEADER_SIZE + header.used > left:
            return "segment record area runs past the end of the file"
        if crc(self._get(p + SEGMENT_HEADER_SIZE, header.used)) != header.payload_crc:
            return "payload CRC mismatch"
        return header

    def check(self, p: int) -> SegmentHeader | str:
        if p >= self._size:
            return "end of file"
        try:
            return self._check_segment(p)
        except CorruptFileError as exc:  # the file shrank under the read
            return exc.reason

    def spans(self, p: int, used: int) -> Iterator[tuple[int, int, Any]]:
        """``(record-area offset, kind, payload)`` of a validated segment."""
        body_start = p + SEGMENT_HEADER_SIZE
        if SEGMENT_HEADER_SIZE + used <= _WHOLE_SEGMENT_LIMIT:
            body = self._get(body_start, used)
            pos = 0
            while pos < used:
                length, kind, mark = _unpack_record(body, pos)
                if mark != RECORD_MARK:  # a padding word (validated a moment ago)
                    pos = skip_padding(body, pos, used)
                    continue
                yield pos, kind, body[pos + RECORD_HEADER_SIZE : pos + RECORD_HEADER_SIZE + length]
                pos += record_size(length)
        else:
            yield from self._large(body_start, used)

    def _large(self, body_start: int, used: int) -> Iterator[tuple[int, int, Any]]:
        """As :meth:`Reader._large_records`, with each record's offset: a large
        segment is read a record at a time, so memory stays bounded."""
        pos = 0
        while pos < used:
            length, kind, mark = _unpack_record(self._get(body_start + pos, RECORD_HEADER_SIZE))
            if mark != RECORD_MARK:
                n = min(1 << 20, used - pos)
                pos += skip_padding(self._get(body_start + pos, n), 0, n)
                continue
            if record_size(length) > used - pos:  # rewritten under us since the check
                raise CorruptFileError(
                    self.path, body_start - SEGMENT_HEADER_SIZE, "segment changed while being read"
                )
            payload = b""
            if kind == KIND_DATA:
                payload = bytes(self._get(body_start + pos + RECORD_HEADER_SIZE, length))
            yield pos, kind, payload
            pos += record_size(length)


class Follower:
    """The iterator and context manager :func:`follow` returns.

    Iterating yields :class:`Record` items.  :meth:`commit` stores the position
    after the last record yielded in the named cursor, durably.
    ``damaged`` lists the :class:`~shmflush.Damage` stretches skipped
    (``strict=False``); ``stream_id`` is the file's stream id once known.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        cursor: str | None = None,
        *,
        start: str | int | _dt.datetime | Position = "beginning",
        cursor_dir: str | None = None,
        wait: bool = True,
        strict: bool = True,
        hole_timeout: float | None = None,
        poll_max: float = POLL_MAX,
    ) -> None:
        self.path = os.fspath(path)
        self.cursor_file = None if cursor is None else cursor_path(self.path, cursor, cursor_dir)
        self._start = _check_start(start)
        self.wait = wait
        self.strict = strict
        self.hole_timeout = hole_timeout
        self.poll_max = max(POLL_MIN, poll_max)
        self.damaged: list[Damage] = []
        self.stream_id: bytes | None = None
        # (segment, record-area offset) after the last record yielded: a
        # tuple, not a Position, because it changes once per record.
        self._at: tuple[int, int] | None = None
        self._committed: Position | None = None
        self._scan: _Scan | None = None
        # The number of the stream's file being read (docs/rotation.md).
        self._file = 0
        self._closed = False
        self._final = False
        self._gen = self._records()

    def __iter__(self) -> Follower:
        return self

    def __next__(self) -> Record:
        if self._closed:
            raise ValueError("I/O operation on a closed follower")
        return next(self._gen)

    def __enter__(self) -> Follower:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop following and close the file (no implicit commit).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._gen.close()
        if self._scan is not None:
            self._scan.close()

    @property
    def position(self) -> Position | None:
        """Where the follower stands: after the last record yielded (None
        until the file's stream id and a position are known)."""
        if self._at is None or self.stream_id is None:
            return None
        return Position(self.stream_id, self._at[0], self._at[1], self._file)

    def commit(self) -> None:
        """Make the cursor durable at the position after the last record yielded:
        a follower restarted with the same cursor resumes there.  Raises
        ValueError if this follower has no cursor; does nothing before the
        position is known."""
        if self.cursor_file is None:
            raise ValueError("this follower has no cursor to commit (pass cursor=NAME)")
        position = self.position
        if position is None or position == self._committed:
            return
        store_cursor(self.cursor_file, position)
        self._committed = position

    # -- the walk ------------------------------------------------------------

    def _open(self) -> _Scan | None:
        """Open the file and check its header, waiting for a header while a
        ring writes the file; None for an empty (or all-zero) file that nobody
        writes."""
        delay = POLL_MIN
        while True:
            try:
                scan = _Scan(_files.file_path(self.path, self._file), self.strict)
            except FileNotFoundError:
                if not self.wait:
                    raise
            else:
                try:
                    scan._open_file_header()
                    if scan._stream is not None or scan.damaged:
                        self.damaged.extend(scan.damaged)
                        scan.refresh()
                        return scan
                    if not (self.wait and ring_writes(scan._fd)):
                        scan.close()
                        return None
                except BaseException:
                    scan.close()
                    raise
                scan.close()
            time.sleep(delay)
            delay = min(delay * 2, self.poll_max)

    def _records(self) -> Generator[Record, None, None]:
        for segment, header, skip, scan in self._batches():
            seq, sealed_ns = header.seq, header.sealed_ns
            first = segment + SEGMENT_HEADER_SIZE
            for pos, kind, payload in scan.spans(segment, header.used):
                if kind != KIND_DATA or pos < skip:
                    continue
                self._at = (segment, pos + record_size(len(payload)))
                yield Record(bytes(payload), first + pos, segment, seq, sealed_ns)

    def _batches(self, defer_walk: bool = False) -> Iterator[tuple[int, SegmentHeader, int, _Scan]]:
        """``(segment, header, skip, scan)`` for each valid segment to read
        from the start position on: its records at record-area offsets below
        ``skip`` were delivered before.  The position moves past the segment
        when the caller asks for the next one (so ``cat`` can print a whole
        segment's records at once)."""
        resumed = None if self.cursor_file is None else load_cursor(self.cursor_file)
        if resumed is None and isinstance(self._start, Position):
            resumed = self._start
        files = _files.list_files(self.path)
        numbers = [n for n, _ in files]
        if resumed is not None:
            later = [n for n in numbers if n >= resumed.file]
            self._file = later[0] if later else resumed.file
        elif self._start == "end" or isinstance(self._start, int):
            self._file = numbers[-1] if numbers else 0
        else:
            self._file = numbers[0] if numbers else 0
        if resumed is not None and self._file != resumed.file:
            # Retention deleted the cursor's file (retention_wins): resume at the
            # start of the next one.
            resumed = Position(resumed.stream_id, DATA_START, 0, self._file)
        first = True
        while True:
            scan = self._open()
            if scan is None:
                return
            try:
                yield from self._file_batches(scan, resumed, first, defer_walk)
            finally:
                scan.close()
            first = False
            later = [
                n
                for n, name in _files.list_files(self.path)
                if n > self._file and not _files.interrupted_roll(n, name)
            ]
            if not later:
                return
            self._file = later[0]
            self._final = False
            self._at = (DATA_START, 0)

    def _file_batches(
        self, scan: _Scan, resumed: Position | None, first: bool, defer_walk: bool
    ) -> Iterator[tuple[int, SegmentHeader, int, _Scan]]:
        self._scan = scan
        if not first:
            if self.stream_id is not None and scan._stream not in {None, self.stream_id}:
                if self.strict:
                    raise CorruptFileError(scan.path, 0, "a file of another stream")
                self.damaged.append(Damage(0, scan._size, "a file of another stream"))
                return
            resumed = None
        stream = self.stream_id = scan._stream
        p, skip, since_ns = DATA_START, 0, -1
        if not first:
            since_ns = _time_ns(self._start) if isinstance(self._start, _dt.datetime) else -1
        elif resumed is not None:
            if stream is not None and resumed.stream_id != stream:
                raise CursorError(
                    self.cursor_file or "(start position)",
                    f"belongs to stream {resumed.stream_id.hex()}, but {self.path} is "
                    f"stream {stream.hex()} (another file, or the file was replaced): "
                    "delete the cursor or use another name to read this file from a "
                    "start position",
                )
            p, skip = resumed.segment, resumed.record
            self._committed = resumed
        elif isinstance(self._start, _dt.datetime):
            since_ns = _time_ns(self._start)
        elif self._start == "end" or isinstance(self._start, int):
            p, skip = self._locate(scan, self._start)
        self._at = (p, skip)
        scan.defer_walk = defer_walk
        for segment, header in self._segments(scan, p):
            self.stream_id = scan._stream
            if header.sealed_ns >= since_ns:
                yield segment, header, skip, scan
            skip = 0
            self._at = (segment + segment_size(header.used), 0)

    def _locate(self, scan: _Scan, start: str | int) -> tuple[int, int]:
        """The position of ``"end"`` (the end so far) or of the last ``-start``
        records, found by walking what the file holds now without waiting."""
        want = -start if isinstance(start, int) else 0
        # (segment, used, DATA records) of the last segments that hold `want`.
        tail: collections.deque[tuple[int, int, int]] = collections.deque()
        held = 0
        end = DATA_START
        for segment, header in self._segments(scan, DATA_START, wait=False):
            end = segment + segment_size(header.used)
            if want:
                n = sum(1 for _, kind, _ in scan.spans(segment, header.used) if kind == KIND_DATA)
                tail.append((segment, header.used, n))
                held += n
                while tail and held - tail[0][2] >= want:
                    held -= tail.popleft()[2]
        self._final = False
        if not tail:
            return end, 0
        segment, used, n = tail[0]
        drop = held - want  # records of the first kept segment before the last `want`
        for pos, kind, _ in scan.spans(segment, used):
            if kind == KIND_DATA:
                if drop <= 0:
                    return segment, pos
                drop -= 1
        return segment + segment_size(used), 0

    def _segments(
        self, scan: _Scan, p: int, wait: bool | None = None
    ) -> Iterator[tuple[int, SegmentHeader]]:
        """Valid segments from ``p`` on, in file order, waiting at holes while a
        ring writes the file (section 9 of docs/format.md)."""
        wait = self.wait if wait is None else wait
        delay = POLL_MIN
        hole_since = -1.0
        refreshed = False
        while True:
            checked = scan.check(p)
            if not isinstance(checked, str):
                yield p, checked
                p += segment_size(checked.used)
                delay, hole_since, refreshed = POLL_MIN, -1.0, False
                continue
            if not refreshed:
                # The view may be stale (size, window): look again before judging.
                scan.refresh()
                refreshed = True
                continue
            if not self._final:
                if ring_writes(scan._fd):
                    if not wait:
                        return  # the end so far (or a hole that may still fill)
                    now = time.monotonic()
                    if hole_since < 0:
                        hole_since = now
                    timed_out = (
                        self.hole_timeout is not None
                        and now - hole_since >= self.hole_timeout
                        and p < scan._nonzero_end()
                    )
                    if not timed_out:
                        time.sleep(delay)
                        delay = min(delay * 2, self.poll_max)
                        refreshed = False
                        continue
                else:
                    # Nobody writes: what the file holds now is final.  Look
                    # once more, for segments that landed just before the ring
                    # let go of the file.
                    self._final = True
                    refreshed = False
                    continue
            if p >= scan._nonzero_end():
                return  # the zero tail: a clean end
            p = self._damage(scan, p, checked)

    def _damage(self, scan: _Scan, p: int, reason: str) -> int:
        """Damage at ``p``: raise (strict) or skip to the next valid segment."""
        if self.strict:
            raise CorruptFileError(self.path, p, reason)
        start = p
        end = scan._nonzero_end()
        p += BLOCK
        while p < end and isinstance(scan.check(p), str):
            p += BLOCK
        torn = p >= end and scan._stream is not None and scan._looks_torn(start)
        self.damaged.append(Damage(start, min(p, scan._size), reason, torn))
        return p


def _check_start(start: object) -> str | int | _dt.datetime | Position:
    if start in {"beginning", "end"}:
        return str(start)
    if isinstance(start, (_dt.datetime, Position)):
        return start
    if isinstance(start, int) and not isinstance(start, bool) and start < 0:
        return start
    raise ValueError(
        "start must be 'beginning', 'end', a negative int -N (the last N records) or a "
        f"datetime (records of segments sealed at or after it), got {start!r}"
    )


def _time_ns(when: _dt.datetime) -> int:
    if when.tzinfo is None:
        when = when.astimezone()  # naive: local time
    return int(when.timestamp() * 1e9)


def follow(
    path: str | os.PathLike[str],
    cursor: str | None = None,
    *,
    start: str | int | _dt.datetime | Position = "beginning",
    cursor_dir: str | None = None,
    wait: bool = True,
    strict: bool = True,
    hole_timeout: float | None = None,
    poll_max: float = POLL_MAX,
) -> Follower:
    """Follow the records of ``path`` as a ring writes them (``tail -f``).

    Returns a :class:`Follower`, an iterator of records (``.payload``,
    ``.offset``, ``.segment``, ``.seq``, ``.sealed_ns``) and a context manager.

    Guarantees:

    * every DATA record of the file is yielded exactly once per pass, in file
      order, once the flusher has written its segment; never a record of a
      torn, foreign or damaged segment;
    * a hole (a segment not yet written below one already written: the flusher
      writes several at once) is waited on, never skipped, while a ring writes
      the file; it counts as damage only once no ring writes the file (the
      ring's flock is free), or after ``hole_timeout`` seconds if that is set;
    * with ``wait=True`` (default) iteration ends once no ring writes the file
      and every record has been yielded; with ``wait=False`` it ends at the end
      of what the file holds now (at the first hole, while a ring writes it);
    * it waits by sleeping, backing off from 1 ms to ``poll_max`` (50 ms).

    ``start``: ``"beginning"`` (default), ``"end"`` (only records written
    after the end so far), ``-N`` (the last N records, then on) or a
    :class:`datetime.datetime` (records of segments sealed at or after it;
    naive means local time), or a :class:`Position` (a follower's
    ``position``: resume after it).  With a ``cursor`` whose file exists, the follower
    resumes after the last committed record and ``start`` is ignored.

    ``cursor`` names a durable cursor, stored in ``<path>.cursors/<name>`` (or
    ``<cursor_dir>/<name>``) and keyed by the file's stream id: a cursor of
    another stream raises :class:`~shmflush.CursorError`.  ``commit()`` stores
    the position after the last record yielded; delivery is at least once:
    after a crash, exactly the records after the last commit come again.

    Damage (once final): ``strict=True`` raises
    :class:`~shmflush.CorruptFileError` after the records before it;
    ``strict=False`` skips it and appends a :class:`~shmflush.Damage` to
    ``damaged``.
    """
    return Follower(
        path,
        cursor,
        start=start,
        cursor_dir=cursor_dir,
        wait=wait,
        strict=strict,
        hole_timeout=hole_timeout,
        poll_max=poll_max,
    )
