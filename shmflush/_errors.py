"""Exception hierarchy.

Every error that shmflush raises on purpose derives from :class:`ShmflushError`,
except argument errors, which are plain :class:`ValueError` / :class:`TypeError`
naming the parameter (the Python convention for bad arguments).
"""

from __future__ import annotations

import errno as _errno
import os

from ._format import FORMAT_VERSION


class ShmflushError(Exception):
    """Base class of every shmflush error."""


class RingClosedError(ShmflushError):
    """The ring was closed by this process, or its owner closed it for everybody."""


class RingBrokenError(ShmflushError):
    """The ring cannot make progress because of someone else.

    Examples: the flusher died, or the disk is full.  ``errno`` and ``strerror``
    are set when an OS error is the cause; the original :class:`OSError` is chained
    as ``__cause__`` where this process saw it, and rebuilt from the errno the
    flusher stored in shared memory otherwise.
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        self.errno = errno
        self.strerror = os.strerror(errno) if errno else ""
        super().__init__(message, errno)

    def __str__(self) -> str:
        return str(self.args[0])


class RingTimeoutError(ShmflushError, TimeoutError):
    """A blocking call ran out of its ``timeout``."""


class RecordTooLargeError(ShmflushError, ValueError):
    """A record does not fit in one buffer of the ring."""


class RingNotFoundError(ShmflushError, FileNotFoundError):
    """No ring of that name exists on this host."""

    def __init__(self, name: str) -> None:
        super().__init__(_errno.ENOENT, f"no shmflush ring named {name!r} on this host", name)

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Rebuild from the name, so the error crosses process boundaries (pickle).
        return type(self), (str(self.filename),)


class RingExistsError(ShmflushError, FileExistsError):
    """A ring of that name already exists.

    Without a *reason* the message suggests ``exist_ok=True``; ``create`` passes
    a reason when that would not help (the owner is alive), and the message then
    says why the ring was kept: "a shmflush ring named 'x' exists and <reason>".
    """

    def __init__(self, name: str, reason: str | None = None) -> None:
        self.reason = reason
        message = (
            f"a shmflush ring named {name!r} already exists; pass exist_ok=True to replace it"
            if reason is None
            else f"a shmflush ring named {name!r} exists and {reason}"
        )
        super().__init__(_errno.EEXIST, message, name)

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return type(self), (str(self.filename), self.reason)


class CorruptRingError(ShmflushError):
    """A shared-memory segment is not a valid shmflush ring (wrong magic,
    unknown version, or a field out of range)."""


class ForeignFileError(ShmflushError):
    """:func:`shmflush.create` refuses a path that is not a shmflush file.

    Raised for a path that is not a regular file (a directory, a device, a FIFO),
    for a file on a file system that cannot make it durable (``/proc``, where
    fdatasync(2) fails), and for a non-empty file that holds no valid shmflush
    segment (somebody else's log or database, given by mistake: appending would
    mean truncating it).  The file is left exactly as it was.  ``path`` names
    the file and ``reason`` says why it was refused.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.reason)


class CorruptFileError(ShmflushError):
    """The file holds a damaged or torn stretch.

    ``offset`` is the byte offset in the file where the damage starts.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"{path}: corrupt data at byte offset {offset}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:
        return type(self), (self.path, self.offset, self.reason)


class UnsupportedFormatError(CorruptFileError):
    """The file was written in an earlier version of the file format.

    Its segments are intact but laid out or checksummed the way that version
    was, so they cannot be read as this version's: no record is returned, even
    by a tolerant reader (skipping them all as damage would hide the cause).
    ``version`` is the file's format version; ``offset`` the segment that has it.
    """

    def __init__(self, path: str, offset: int, version: int) -> None:
        self.path = path
        self.offset = offset
        self.version = version
        self.reason = f"written in file format version {version}"
        # Not CorruptFileError's "corrupt data at ...": nothing is corrupt.
        ShmflushError.__init__(
            self,
            f"{path}: written in shmflush file format version {version} (segment at byte "
            f"offset {offset}); this shmflush reads format version {FORMAT_VERSION} only: "
            "read it with the shmflush version that wrote it",
        )

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:  # type: ignore[override]
        return type(self), (self.path, self.offset, self.version)
