"""shmflush: many processes append records to one durable file at memory speed.

Records go into 4 KiB-aligned buffers in POSIX shared memory; a writer claims
its bytes with one atomic fetch-and-add; one flusher process writes full buffers
to the file with O_DIRECT.  See README.md and docs/.
"""

from ._api import DamagedTailWarning, DirectIOWarning, Ring, Stats, attach, create
from ._errors import (
    CorruptFileError,
    CorruptRingError,
    CursorError,
    ForeignFileError,
    RecordTooLargeError,
    RingBrokenError,
    RingClosedError,
    RingExistsError,
    RingNotFoundError,
    RingTimeoutError,
    ShmflushError,
    UnsupportedFormatError,
)
from ._files import RetentionWarning
from ._follow import Follower, Record, follow
from ._logging import LogHandler
from ._reader import Damage, Reader, read, read_array

__all__ = [
    "CorruptFileError",
    "CorruptRingError",
    "CursorError",
    "Damage",
    "DamagedTailWarning",
    "DirectIOWarning",
    "Follower",
    "ForeignFileError",
    "LogHandler",
    "Reader",
    "Record",
    "RecordTooLargeError",
    "RetentionWarning",
    "Ring",
    "RingBrokenError",
    "RingClosedError",
    "RingExistsError",
    "RingNotFoundError",
    "RingTimeoutError",
    "ShmflushError",
    "Stats",
    "UnsupportedFormatError",
    "attach",
    "create",
    "follow",
    "read",
    "read_array",
]

__version__ = "0.1.0"
