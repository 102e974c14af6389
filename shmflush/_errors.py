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
    fdatasync(2) fails), and for a non-empty file that does not start with a
    shmflush file header (somebody else's log or database, or a file of zeros,
    given by mistake: appending would mean truncating it).  The file is left
    exactly as it was.  ``path`` names the file and ``reason`` says why it was
    refused.
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
    """The file was written in another version of the file format.

    An earlier version's file is intact but laid out or checksummed the way that
    version was; a later version's may be laid out in ways this one cannot
    know.  Either way it is not read as this version's: no record is returned,
    even by a tolerant reader (skipping them all as damage would hide the
    cause), and :func:`shmflush.create` does not append to it.  ``version`` is
    the file's format version; ``offset`` the header that has it.  ``headerless``
    marks a file of a development build that wrote no file header.
    """

    def __init__(self, path: str, offset: int, version: int, headerless: bool = False) -> None:
        self.path = path
        self.offset = offset
        self.version = version
        self.headerless = headerless
        self.reason = f"written in file format version {version}"
        if headerless:
            where = f"a development build without a file header, segment at byte offset {offset}"
            hint = "read it with the shmflush version that wrote it"
        elif version > FORMAT_VERSION:
            where = f"header at byte offset {offset}"
            hint = "read it with a newer shmflush"
        else:
            where = f"header at byte offset {offset}"
            hint = "read it with the shmflush version that wrote it"
        # Not CorruptFileError's "corrupt data at ...": nothing is corrupt.
        ShmflushError.__init__(
            self,
            f"{path}: written in shmflush file format version {version} ({where}); this "
            f"shmflush reads format version {FORMAT_VERSION} only: {hint}",
        )

    def __reduce__(self) -> tuple[type, tuple[str, int, int, bool]]:  # type: ignore[override]
        return type(self), (self.path, self.offset, self.version, self.headerless)


class CursorError(ShmflushError, ValueError):
    """A :func:`shmflush.follow` cursor that cannot be used for this file.

    Raised when a named cursor belongs to another stream (its stream id is not
    the file's: the file was replaced, or the cursor name is reused for another
    log), or when the cursor file is unreadable or names a position that no
    record of this file can have.  The cursor file is left as it was; delete it
    (or pick another name) to start afresh.  ``path`` is the cursor file.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        ShmflushError.__init__(self, f"cursor {path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.reason)
