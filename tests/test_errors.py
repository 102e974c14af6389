"""The exception classes: pickling (errors cross process boundaries) and fields."""

from __future__ import annotations

import errno
import pickle

import pytest

import shmflush


@pytest.mark.parametrize(
    "error",
    [
        shmflush.RingNotFoundError("jobs"),
        shmflush.RingExistsError("jobs"),
        shmflush.CorruptFileError("/x.log", 4096, "bad magic"),
        shmflush.ForeignFileError("/x.log", "not a shmflush file"),
        shmflush.RingBrokenError("disk full", errno.ENOSPC),
        shmflush.RingClosedError("closed"),
        shmflush.RingTimeoutError("late"),
        shmflush.RecordTooLargeError("big"),
        shmflush.CorruptRingError("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    for attr in ("errno", "strerror", "filename", "path", "offset", "reason"):
        assert getattr(copy, attr, None) == getattr(error, attr, None)


def test_broken_error_carries_errno_and_strerror() -> None:
    error = shmflush.RingBrokenError("disk full", errno.ENOSPC)
    assert error.errno == errno.ENOSPC
    assert error.strerror == "No space left on device"
    assert str(error) == "disk full"


def test_not_found_names_the_ring() -> None:
    error = shmflush.RingNotFoundError("jobs")
    assert "'jobs'" in str(error)
    assert error.errno == errno.ENOENT
