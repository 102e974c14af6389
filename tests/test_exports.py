"""The public surface of the package (shmflush/__init__.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import shmflush

PUBLIC = {
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
}

ERRORS = {
    "CorruptFileError",
    "CorruptRingError",
    "CursorError",
    "ForeignFileError",
    "RecordTooLargeError",
    "RingBrokenError",
    "RingClosedError",
    "RingExistsError",
    "RingNotFoundError",
    "RingTimeoutError",
    "ShmflushError",
    "UnsupportedFormatError",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert len(shmflush.__all__) == len(set(shmflush.__all__))  # no duplicates
    assert set(shmflush.__all__) == PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_exported_name_exists_and_is_documented(name: str) -> None:
    doc = (getattr(shmflush, name).__doc__ or "").strip()
    assert doc
    # A dataclass without a docstring gets its signature as one.
    assert not doc.startswith(f"{name}(")


# Public submodules of optional extras: not imported by the package, so not in
# __all__, but an attribute of it once a user (or a test) imports them.
EXTRA_MODULES = {"structlog"}


def test_no_public_attribute_outside_all() -> None:
    public = {name for name in vars(shmflush) if not name.startswith("_")}
    assert public - set(shmflush.__all__) - EXTRA_MODULES == set()


def test_extra_modules_are_not_imported_by_the_package() -> None:
    # shmflush.structlog needs structlog: importing shmflush must not need it.
    code = "import shmflush, sys; assert 'shmflush.structlog' not in sys.modules"
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_version_matches_pyproject() -> None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    with pyproject.open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert shmflush.__version__ == version


def test_every_exported_exception_is_exactly_the_error_set() -> None:
    exceptions = {
        name
        for name in shmflush.__all__
        if isinstance(getattr(shmflush, name), type)
        and issubclass(getattr(shmflush, name), BaseException)
        and not issubclass(getattr(shmflush, name), Warning)
    }
    assert exceptions == ERRORS


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_derives_from_shmflush_error(name: str) -> None:
    assert issubclass(getattr(shmflush, name), shmflush.ShmflushError)


def test_shmflush_error_is_an_ordinary_exception() -> None:
    assert issubclass(shmflush.ShmflushError, Exception)


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (shmflush.RingTimeoutError, TimeoutError),
        (shmflush.RecordTooLargeError, ValueError),
        (shmflush.RingNotFoundError, FileNotFoundError),
        (shmflush.RingExistsError, FileExistsError),
    ],
    ids=lambda cls: cls.__name__,
)
def test_error_is_also_the_builtin_that_callers_catch(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, builtin)
    assert issubclass(error, shmflush.ShmflushError)


def test_direct_io_warning_is_a_warning_not_an_error() -> None:
    assert issubclass(shmflush.DirectIOWarning, RuntimeWarning)
    assert not issubclass(shmflush.DirectIOWarning, shmflush.ShmflushError)
