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
        shmflush.RingExistsError("jobs", "its owner (pid 7) is alive"),
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


def test_exists_error_suggests_exist_ok_only_when_no_reason_says_otherwise() -> None:
    plain = shmflush.RingExistsError("jobs")
    assert str(plain) == (
        "[Errno 17] a shmflush ring named 'jobs' already exists; pass exist_ok=True to "
        "replace it: 'jobs'"
    )
    assert plain.reason is None
    why = "its owner (pid 7) is alive; exist_ok=True only replaces rings whose owner died"
    alive = shmflush.RingExistsError("jobs", why)
    assert str(alive) == f"[Errno 17] a shmflush ring named 'jobs' exists and {why}: 'jobs'"
    assert alive.reason == why
    assert alive.filename == "jobs"
    assert alive.errno == errno.EEXIST
