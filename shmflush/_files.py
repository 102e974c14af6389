"""The files of one stream: naming, the rotation settings, retention.

A stream is the file ``create()`` was given (file number 0, at ``path``) and
the files the flusher rolled to after it, ``<path>.000001``, ``<path>.000002``
and so on (six digits or more).  The highest-numbered file is the active one;
the others are closed.  Nothing is ever renamed: a reader that opened a file
keeps reading the right bytes, and a crash in the middle of a roll leaves at
worst an extra, empty file (see docs/rotation.md).

The flusher's addresses run on across the files of a stream: file *n*'s header
holds ``base``, and the fill whose address is A lies at file offset A - base of
the highest-based file with base + 4096 <= A.  So the ring's protocol
(``H_NEXT_ADDRESS``, ``H_WRITTEN_BELOW``) does not know about files at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import _format

#: Sidecar with a stream's rotation and retention settings (JSON), written by
#: create() and read by the flusher and by ``prune``.
SETTINGS_SUFFIX: Final = ".rotation"
SETTINGS_FORMAT: Final = "shmflush-rotation"
_NUMBERED = re.compile(r"\.([0-9]{6,})")


class RetentionWarning(UserWarning):
    """Retention deleted a file that a named cursor still needed
    (``retention_wins=True``)."""


def file_path(path: str, number: int) -> str:
    """The name of file *number* of the stream created at *path*."""
    return path if number == 0 else f"{path}.{number:06d}"


def list_files(path: str) -> list[tuple[int, str]]:
    """``(number, name)`` of every file of the stream at *path* that exists, in order."""
    directory, base = os.path.split(os.path.abspath(path))
    found: list[tuple[int, str]] = []
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    for name in names:
        if name == base:
            found.append((0, path))
        elif name.startswith(base):
            m = _NUMBERED.fullmatch(name, len(base))
            if m:
                found.append((int(m.group(1)), file_path(path, int(m.group(1)))))
    return sorted(found)


def read_header(fd: int) -> _format.FileHeader | None:
    """The valid version 3 file header of *fd*, or None."""
    header = _format.parse_file_header(os.pread(fd, _format.SEGMENT_HEADER_SIZE, 0))
    if isinstance(header, str) or header.version != _format.FORMAT_VERSION:
        return None
    return header


def header_of(name: str) -> _format.FileHeader | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return read_header(fd)
    finally:
        os.close(fd)


def interrupted_roll(number: int, name: str) -> bool:
    """Is file *number* what a roll interrupted by a crash leaves: a numbered
    file of at most one block without a valid header?  It holds no record."""
    if number == 0:
        return False
    try:
        if os.stat(name).st_size > _format.FILE_HEADER_SIZE:
            return False
    except OSError:
        return False
    return header_of(name) is None


def active_file(path: str) -> tuple[int, str]:
    """The file a ring appends to: the highest-numbered file of the stream
    (``(0, path)`` when there is none).  A numbered file that holds no valid
    header is what a roll interrupted by a crash leaves (docs/rotation.md): it
    holds no record, and the one below it is the active file."""
    files = list_files(path)
    while files and files[-1][0] > 0:
        number, name = files[-1]
        if header_of(name) is not None:
            return number, name
        with contextlib.suppress(OSError):
            if os.stat(name).st_size <= _format.FILE_HEADER_SIZE:
                files.pop()
                continue
        return number, name  # not ours to judge: create() refuses it, saying why
    return 0, path


# -- settings ------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Rotation and retention settings of a stream (see :func:`shmflush.create`)."""

    segment_bytes: int | None = None
    segment_age: float | None = None
    retain_age: float | None = None
    retain_bytes: int | None = None
    retain_files: int | None = None
    retention_wins: bool = False
    on_segment_closed: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def rolls(self) -> bool:
        return self.segment_bytes is not None or self.segment_age is not None

    @property
    def retains(self) -> bool:
        return (
            self.retain_age is not None
            or self.retain_bytes is not None
            or self.retain_files is not None
        )

    def to_json(self) -> bytes:
        fields = {
            "format": SETTINGS_FORMAT,
            "version": 1,
            "segment_bytes": self.segment_bytes,
            "segment_age": self.segment_age,
            "retain_age": self.retain_age,
            "retain_bytes": self.retain_bytes,
            "retain_files": self.retain_files,
            "retention_wins": self.retention_wins,
            "on_segment_closed": self.on_segment_closed,
        }
        return json.dumps(fields).encode() + b"\n"


def check_settings(
    *,
    segment_bytes: object,
    segment_age: object,
    retain_age: object,
    retain_bytes: object,
    retain_files: object,
    retention_wins: object,
    on_segment_closed: object,
) -> Settings:
    """Validate create()'s rotation arguments (ValueError/TypeError)."""

    def number(name: str, value: object, low: float, integer: bool) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
            kind = "an int" if integer else "a number"
            raise TypeError(f"{name} must be {kind} or None, not {type(value).__name__}")
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"{name} must be at least {low}, got {value!r}")
        return value

    sb = number("segment_bytes", segment_bytes, 2 * _format.BLOCK, True)
    if sb is not None and sb % _format.BLOCK:
        raise ValueError(f"segment_bytes must be a multiple of 4096, got {sb}")
    hook = on_segment_closed
    if hook is not None:
        if isinstance(hook, (str, bytes)) or not isinstance(hook, (list, tuple)):
            raise TypeError("on_segment_closed must be a list of strings (an argv) or None")
        if not hook or not all(isinstance(a, str) for a in hook):
            raise ValueError("on_segment_closed must be a non-empty list of strings")
        hook = list(hook)
    if not isinstance(retention_wins, bool):
        raise TypeError("retention_wins must be a bool")
    return Settings(
        segment_bytes=sb,
        segment_age=number("segment_age", segment_age, 1, False),
        retain_age=number("retain_age", retain_age, 0, False),
        retain_bytes=number("retain_bytes", retain_bytes, 0, True),
        retain_files=number("retain_files", retain_files, 1, True),
        retention_wins=retention_wins,
        on_segment_closed=hook,
    )


def store_settings(path: str, settings: Settings) -> None:
    """Write the settings sidecar durably (temporary file, fsync, rename), or
    remove it when nothing rotates or is retained."""
    where = path + SETTINGS_SUFFIX
    if not settings.rolls and not settings.retains and settings.on_segment_closed is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        return
    tmp = f"{where}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(settings.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, where)
    sync_directory(where)


def load_settings(path: str) -> Settings:
    """The settings in the sidecar of *path* (none when it is missing or unreadable)."""
    if not path:
        return Settings()
    try:
        with open(path + SETTINGS_SUFFIX, "rb") as f:
            fields = json.loads(f.read(1 << 16))
        if fields.get("format") != SETTINGS_FORMAT:
            return Settings()
        return Settings(
            segment_bytes=fields.get("segment_bytes"),
            segment_age=fields.get("segment_age"),
            retain_age=fields.get("retain_age"),
            retain_bytes=fields.get("retain_bytes"),
            retain_files=fields.get("retain_files"),
            retention_wins=bool(fields.get("retention_wins")),
            on_segment_closed=fields.get("on_segment_closed"),
        )
    except (OSError, ValueError, AttributeError):
        return Settings()


def sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- retention -----------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What retention does with one closed file."""

    number: int
    name: str
    size: int
    delete: bool
    #: names of the cursors that still need it (it is kept unless retention wins)
    needed_by: tuple[str, ...] = ()


def cursor_files(path: str, stream_id: bytes) -> dict[str, int]:
    """cursor name -> file number, for every named cursor of this stream in
    ``<path>.cursors/``.  A cursor file that does not parse protects
    everything (file -1): retention cannot know what it needs."""
    directory = path + ".cursors"
    found: dict[str, int] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        if name.startswith("."):
            continue  # a cursor being written (store_cursor's temporary)
        try:
            with open(os.path.join(directory, name), "rb") as f:
                fields = json.loads(f.read(1 << 16))
            if bytes.fromhex(fields["stream_id"]) != stream_id:
                continue
            found[name] = int(fields["file"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            found[name] = -1
    return found


def plan(path: str, settings: Settings, *, now: float | None = None) -> list[Verdict]:
    """Retention's verdict on each closed file of the stream at *path* (all but
    the active one), oldest first.  A file goes when the files after it are
    enough to meet every limit: more than ``retain_files`` files, more than
    ``retain_bytes`` in all, or closed (its successor created) longer than
    ``retain_age`` seconds ago.  Files go oldest first only, so the stream
    never gets a hole.  A file that a cursor of this stream points into, or
    before, is kept unless ``retention_wins``."""
    now = time.time() if now is None else now
    files = list_files(path)
    if len(files) < 2:
        return []
    active_no, _ = active_file(path)
    closed = [(n, name) for n, name in files if n < active_no]
    sizes = {}
    created = {}
    stream: bytes | None = None
    for n, name in files:
        try:
            sizes[n] = os.stat(name).st_size
        except OSError:
            sizes[n] = 0
        header = header_of(name)
        created[n] = header.created_ns / 1e9 if header is not None else now
        if header is not None and n == active_no:
            stream = header.stream_id
    total = sum(sizes.values())
    count = len(files)
    cursors = cursor_files(path, stream) if stream is not None else {}
    verdicts: list[Verdict] = []
    deleting = True
    following = {n: m for (n, _), (m, _) in itertools.pairwise(files)}
    for n, name in closed:
        closed_at = created.get(following.get(n, active_no), now)
        over = (
            (settings.retain_files is not None and count > settings.retain_files)
            or (settings.retain_bytes is not None and total > settings.retain_bytes)
            or (settings.retain_age is not None and now - closed_at > settings.retain_age)
        )
        deleting = deleting and over
        needed = tuple(sorted(c for c, f in cursors.items() if f <= n))
        # A closed file whose lock is held still gets the fills addressed before
        # the roll (the flusher lets go of it once they are durable): never ours.
        delete = deleting and (not needed or settings.retention_wins) and not _in_use(name)
        if deleting and not delete:
            deleting = False  # keep this one, so keep all after it: no holes
        verdicts.append(Verdict(n, name, sizes[n], delete, needed))
        if delete:
            count -= 1
            total -= sizes[n]
    return verdicts


def apply(
    path: str,
    settings: Settings,
    *,
    dry_run: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[Verdict]:
    """Apply :func:`plan`: delete the files it condemns (unless *dry_run*).
    For each deleted file a cursor needed, *warn* is called with a message
    (default: a :class:`RetentionWarning`)."""
    verdicts = plan(path, settings)
    for v in verdicts:
        if not v.delete or dry_run:
            continue
        if v.needed_by:
            message = (
                f"shmflush: retention deletes {v.name}, which cursor(s) "
                f"{', '.join(v.needed_by)} still need (retention_wins=True): their "
                "followers lose the records in it"
            )
            if warn is None:
                warnings.warn(message, RetentionWarning, stacklevel=2)
            else:
                warn(message)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(v.name)
    if not dry_run and any(v.delete for v in verdicts):
        with contextlib.suppress(OSError):
            sync_directory(path)
    return verdicts


def open_next(name: str) -> int:
    """Open and lock the file a roll starts; OSError if it is locked or holds
    more than an interrupted roll leaves (at most a header: not ours)."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    problem = None
    if not lock_exclusive(fd):
        problem = "locked by another process"
    elif os.fstat(fd).st_size > _format.FILE_HEADER_SIZE:
        problem = "exists and holds data"
    if problem is not None:
        os.close(fd)
        raise OSError(f"{name}: {problem}")
    return fd


def start_file(
    fd: int, name: str, stream_id: bytes, *, created_ns: int, number: int, base: int
) -> None:
    """Write file *number*'s header and make it and the file's name durable."""
    os.ftruncate(fd, 0)
    block = _format.pack_file_header(stream_id, created_ns, number, base)
    if os.pwrite(fd, block, 0) != len(block):
        raise OSError(f"{name}: short write of the file header")
    os.fdatasync(fd)
    sync_directory(name)


def _in_use(name: str) -> bool:
    """Does a flusher still hold *name* locked?  (A shared, non-blocking probe,
    released at once; see _follow.ring_writes.)"""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_exclusive(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# -- the flusher's open files --------------------------------------------------


@dataclass
class OpenFile:
    number: int
    base: int
    fd: int
    created_ns: int
    #: how far it is preallocated (Flusher.preallocate)
    allocated: int = 0


class FileTable:
    """The files a flusher writes: the active one, and the closed ones that
    still have addresses below them unwritten (at most a roll's worth).

    Write threads call :meth:`locate` and :meth:`sync` while the main loop
    rolls and finishes files, so ``files`` is never changed in place (a new
    list replaces it) and ``dirty`` is changed under a lock."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        header = read_header(fd)
        # No header (a test's bare ring, or a file create() did not prepare):
        # it is file 0, whose addresses are its offsets.
        size = os.fstat(fd).st_size
        if header is None:
            self.files = [OpenFile(0, 0, fd, 0, size)]
        else:
            self.files = [OpenFile(header.file_no, header.base, fd, header.created_ns, size)]
        self.dirty: set[int] = set()
        self.lock = threading.Lock()

    @property
    def active(self) -> OpenFile:
        return self.files[-1]

    def open_older(self, written_below: int) -> None:
        """After a restart: open the closed files that hold addresses at or
        above *written_below* (a predecessor died before finishing them)."""
        number = self.active.number
        upper = self.active.base + _format.DATA_START
        while number > 0 and upper > written_below:
            number -= 1
            name = file_path(self.path, number)
            try:
                fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return  # retention took it: everything in it was written
            header = read_header(fd)
            if header is None or header.file_no != number:
                os.close(fd)
                return
            lock_exclusive(fd)  # ours: the predecessor is dead
            self.files = [OpenFile(number, header.base, fd, header.created_ns), *self.files]
            upper = header.base + _format.DATA_START

    def locate(self, address: int) -> tuple[int, int]:
        """``(fd, file offset)`` of the flusher address *address*."""
        for f in reversed(self.files):
            if address >= f.base + _format.DATA_START:
                with self.lock:
                    self.dirty.add(f.fd)
                return f.fd, address - f.base
        raise ValueError(f"address {address} lies in no open file of {self.path}")

    def sync(self) -> None:
        """fdatasync every file written since the last call."""
        with self.lock:
            dirty, self.dirty = self.dirty, set()
        try:
            for fd in dirty:
                os.fdatasync(fd)
        except BaseException:
            with self.lock:
                self.dirty |= dirty
            raise

    def add(self, new: OpenFile) -> None:
        """A roll: *new* becomes the active file."""
        self.files = [*self.files, new]

    def drop_oldest(self) -> OpenFile:
        """A finished file leaves the table (the caller closes it)."""
        old = self.files[0]
        self.files = self.files[1:]
        with self.lock:
            self.dirty.discard(old.fd)
        return old

    def close_all(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.files = []
