"""The public API in one process (shmflush._api): create, attach, Ring, Stats.

Every ring writes to a file under pytest's ``tmp_path`` (ext4 here, where
O_DIRECT works) and is named by the ``ring_name`` fixture.  Every wait has a
deadline, so a wedged flusher fails the test instead of hanging the run.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import posix_ipc
import pytest

import shmflush
from shmflush import _format
from shmflush import _layout as L

SHM_DIR = "/dev/shm"
# How long a flusher may take to exit, or a time-based seal to reach the file.
EXIT_DEADLINE_S = 10.0
TIME_SEAL_DEADLINE_S = 2.0


# -- helpers ---------------------------------------------------------------------------


def _create(name: str, path: Path, **kwargs: Any) -> shmflush.Ring:
    """A small ring (many rotations, little memory) unless the test says otherwise."""
    kwargs.setdefault("buffer_size", 8192)
    kwargs.setdefault("buffers", 4)
    kwargs.setdefault("lanes", 1)
    return shmflush.create(name, path, **kwargs)


def _read_all(path: Path, *, strict: bool = True) -> tuple[list[bytes], shmflush.Reader]:
    reader = shmflush.read(path, strict=strict)
    with reader:
        records = list(reader)
    return records, reader


def _process_alive(pid: int) -> bool:
    """True while *pid* runs; a zombie counts as gone (it never touches memory again)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _wait_for(predicate: Callable[[], bool], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _shm_entries_for(name: str) -> list[str]:
    return [entry for entry in os.listdir(SHM_DIR) if name in entry]


# -- round trip and argument checks ----------------------------------------------------


def test_every_bytes_like_kind_round_trips_in_order(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    matrix = np.arange(12, dtype=np.float64).reshape(3, 4) * 1.5
    assert matrix.flags.c_contiguous
    payloads: list[Any] = [
        b"plain bytes",
        bytearray(b"a bytearray"),
        memoryview(b"a memoryview"),
        np.arange(256, dtype=np.uint8),
        matrix,
        b"",
        array.array("i", [1, -2, 3]),  # a memoryview of format "i": cast to bytes
        b"last",
    ]
    expected = [bytes(memoryview(p).cast("B")) for p in payloads]
    assert expected[4] == matrix.tobytes()

    with _create(ring_name, path) as ring:
        for payload in payloads:
            ring.append(payload)

    records, reader = _read_all(path)
    assert records == expected
    assert reader.abandoned == 0
    assert reader.damaged == []


def test_append_many_appends_in_order_and_returns_the_count(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    payloads = [bytes([i]) * i for i in range(50)]
    with _create(ring_name, path) as ring:
        assert ring.append_many(payloads) == 50
        assert ring.append_many(iter([b"x", b"y"])) == 2
    assert _read_all(path)[0] == [*payloads, b"x", b"y"]


def test_append_many_checks_every_record_before_appending_any(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        with pytest.raises(TypeError):
            ring.append_many([b"one", b"two", "three", b"four"])
        with pytest.raises(shmflush.RecordTooLargeError):
            ring.append_many([b"one", b"x" * (ring.max_record + 1)])
        assert ring.append_many([b"one", bytearray(b"two"), memoryview(b"three")]) == 3
    assert _read_all(path)[0] == [b"one", b"two", b"three"]


@pytest.mark.parametrize("bad", ["text", 7, None, [1, 2, 3]], ids=["str", "int", "None", "list"])
def test_append_rejects_a_non_bytes_like_object_with_type_error(
    ring_name: str, tmp_path: Path, bad: object
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"before")
        with pytest.raises(TypeError, match="bytes-like"):
            ring.append(bad)
        ring.append(b"after")
    assert _read_all(path)[0] == [b"before", b"after"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: memoryview(b"abcdefgh")[::2],
        lambda: np.arange(20, dtype=np.uint8)[::3],
        lambda: np.zeros((4, 6), dtype=np.float64)[:, 1:3],
    ],
    ids=["memoryview-step", "numpy-step", "numpy-2d-column-slice"],
)
def test_append_rejects_a_non_contiguous_buffer_with_value_error(
    ring_name: str, tmp_path: Path, make: Callable[[], Any]
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"before")
        with pytest.raises(ValueError, match="contiguous"):
            ring.append(make())
        ring.append(b"after")
    assert _read_all(path)[0] == [b"before", b"after"]


_OBJECT_ARRAYS: list[Callable[[], Any]] = [
    lambda: np.array([object(), object()]),
    lambda: np.zeros(3, dtype=[("Oxygen", "f8"), ("label", "O")]),
]


@pytest.mark.parametrize("make", _OBJECT_ARRAYS, ids=["dtype-object", "structured-object-field"])
@pytest.mark.parametrize(
    "call",
    [
        lambda ring, array: ring.append(array),
        lambda ring, array: ring.append_many([b"fine", array]),
        lambda ring, array: ring.append_array(array),
    ],
    ids=["append", "append_many", "append_array"],
)
def test_append_refuses_an_object_array_instead_of_writing_its_pointers(
    ring_name: str,
    tmp_path: Path,
    make: Callable[[], Any],
    call: Callable[[shmflush.Ring, Any], object],
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"before")
        array = make()
        with pytest.raises(TypeError, match="must not hold Python objects"):
            call(ring, array)
        # A field name with an O in it is not an object field.
        ring.append(np.array([(1.5,)], dtype=[("Oxygen", "f8")]))
    assert _read_all(path)[0] == [b"before", np.float64(1.5).tobytes()]


def test_a_record_of_max_record_bytes_fits_and_one_more_byte_does_not(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    rng = random.Random(7)
    with _create(ring_name, path) as ring:
        biggest = rng.randbytes(ring.max_record)
        ring.append(b"before")
        with pytest.raises(shmflush.RecordTooLargeError, match="max_record"):
            ring.append(bytes(ring.max_record + 1))
        ring.append(biggest)
        with pytest.raises(shmflush.RecordTooLargeError):
            ring.append(np.zeros(ring.max_record + 1, dtype=np.uint8))
        ring.append(b"after")
        assert ring.stats().records == 3
    records = _read_all(path)[0]
    assert len(records) == 3
    assert records[0] == b"before"
    assert records[1] == biggest
    assert records[2] == b"after"


def test_record_too_large_error_is_a_shmflush_error_and_a_value_error() -> None:
    assert issubclass(shmflush.RecordTooLargeError, shmflush.ShmflushError)
    assert issubclass(shmflush.RecordTooLargeError, ValueError)


# -- closing -----------------------------------------------------------------------------


def test_append_sync_and_reserve_after_close_raise_ring_closed_error(
    ring_name: str, tmp_path: Path
) -> None:
    ring = _create(ring_name, tmp_path / "log")
    ring.append(b"x")
    ring.close()
    assert ring.closed
    with pytest.raises(shmflush.RingClosedError):
        ring.append(b"y")
    with pytest.raises(shmflush.RingClosedError):
        ring.sync(timeout=5)
    with pytest.raises(shmflush.RingClosedError), ring.reserve(4):
        pass
    with pytest.raises(shmflush.RingClosedError):
        ring.stats()


def test_close_twice_is_a_no_op(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    ring = _create(ring_name, path)
    ring.append(b"only")
    ring.close()
    ring.close()
    assert ring.closed
    assert _read_all(path)[0] == [b"only"]


def test_attach_after_the_owner_closed_raises_ring_not_found(
    ring_name: str, tmp_path: Path
) -> None:
    ring = _create(ring_name, tmp_path / "log")
    ring.close()
    with pytest.raises(shmflush.RingNotFoundError):
        shmflush.attach(ring_name)


def test_attach_to_a_name_that_never_existed_raises_ring_not_found(ring_name: str) -> None:
    with pytest.raises(shmflush.RingNotFoundError):
        shmflush.attach(ring_name)


def test_an_attached_handle_cannot_append_once_the_owner_closed(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    owner = _create(ring_name, path)
    attached = shmflush.attach(ring_name)
    try:
        attached.append(b"from the attached handle")
        owner.close()
        with pytest.raises(shmflush.RingClosedError):
            attached.append(b"too late")
    finally:
        attached.close()
        owner.close()
    assert _read_all(path)[0] == [b"from the attached handle"]


def test_close_removes_the_shared_memory_and_stops_the_flusher(
    ring_name: str, tmp_path: Path
) -> None:
    ring = _create(ring_name, tmp_path / "log")
    pid = ring.stats().flusher_pid
    assert _shm_entries_for(ring_name)  # the segment and semaphores exist while open
    ring.append(b"x")
    ring.close()
    assert _shm_entries_for(ring_name) == []
    assert _wait_for(lambda: not _process_alive(pid), EXIT_DEADLINE_S), (
        f"flusher {pid} still running after close()"
    )


def test_the_owner_context_manager_closes_the_ring(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"inside")
        assert not ring.closed
    assert ring.closed
    with pytest.raises(shmflush.RingClosedError):
        ring.append(b"outside")
    assert _shm_entries_for(ring_name) == []
    assert _read_all(path)[0] == [b"inside"]


def test_a_pickled_ring_attaches_by_name_and_can_append(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as owner:
        owner.append(b"owner first")
        copy = pickle.loads(pickle.dumps(owner))
        assert copy is not owner
        assert copy.name == ring_name
        assert "attached" in repr(copy)
        copy.append(b"from the copy")
        copy.sync(timeout=5)
        copy.close()
        assert copy.closed
        # Closing an attached handle leaves the ring open for everybody else.
        owner.append(b"owner after")
    assert _read_all(path)[0] == [b"owner first", b"from the copy", b"owner after"]


# -- reserve ---------------------------------------------------------------------------


def test_reserve_yields_a_writable_view_committed_on_normal_exit(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        with ring.reserve(11) as view:
            assert len(view) == 11
            assert not view.readonly
            view[:] = b"hello world"
        with ring.reserve(0) as empty:
            assert len(empty) == 0
        ring.append(b"appended")
        assert ring.stats().records == 3
    assert _read_all(path)[0] == [b"hello world", b"", b"appended"]


def test_reserve_releases_the_view_after_the_block(ring_name: str, tmp_path: Path) -> None:
    with _create(ring_name, tmp_path / "log") as ring:
        with ring.reserve(8) as view:
            view[:] = b"12345678"
        with pytest.raises(ValueError, match="released"):
            view[0] = 1
        with pytest.raises(ValueError, match="released"):
            bytes(view)


def test_an_exception_in_reserve_abandons_the_record_and_propagates(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"

    class WriterFailedError(Exception):
        pass

    views: list[memoryview] = []

    def fill_half_then_fail(ring: shmflush.Ring) -> None:
        with ring.reserve(16) as view:
            views.append(view)
            view[:8] = b"half-wri"
            raise WriterFailedError

    with _create(ring_name, path) as ring:
        ring.append(b"before")
        with pytest.raises(WriterFailedError):
            fill_half_then_fail(ring)
        with pytest.raises(ValueError, match="released"):
            views[0][0] = 1
        ring.append(b"after")
        stats = ring.stats()
        assert stats.abandoned == 1
        assert stats.records == 2
    records, reader = _read_all(path)
    assert records == [b"before", b"after"]
    assert reader.abandoned == 1


def test_reserve_rejects_a_negative_size_with_value_error(ring_name: str, tmp_path: Path) -> None:
    with _create(ring_name, tmp_path / "log") as ring:
        with pytest.raises(ValueError, match=r"reserve\(\) size"), ring.reserve(-1):
            pass
        assert ring.stats().records == 0


@pytest.mark.parametrize("bad", ["x", 4.0, None, True])
def test_reserve_rejects_a_non_int_size_with_type_error(
    ring_name: str, tmp_path: Path, bad: object
) -> None:
    with _create(ring_name, tmp_path / "log") as ring:
        with pytest.raises(TypeError, match=r"reserve\(\) size"), ring.reserve(bad):  # type: ignore[arg-type]
            pass
        assert ring.stats().records == 0


def test_reserve_of_more_than_max_record_raises_record_too_large(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        with pytest.raises(shmflush.RecordTooLargeError), ring.reserve(ring.max_record + 1):
            pass
        ring.append(b"still works")
    assert _read_all(path)[0] == [b"still works"]


# -- durability: sync and the time-based seal ------------------------------------------


def test_sync_puts_records_in_the_file_before_any_buffer_is_full(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    payloads = [b"first", b"second", bytes(100)]
    # flush_interval=3600: the flusher's timer cannot be what writes them.
    with _create(ring_name, path, buffer_size=65536, flush_interval=3600) as ring:
        for payload in payloads:
            ring.append(payload)
        assert path.stat().st_size == 4096  # the file header only: the buffer is far from full
        ring.sync(timeout=5)
        records, reader = _read_all(path, strict=False)
        assert records == payloads
        assert reader.damaged == []
        assert ring.stats().syncs >= 1  # sync="data" by default: fdatasync ran
        # A second sync with nothing new returns at once and changes nothing.
        ring.sync(timeout=5)
        assert _read_all(path, strict=False)[0] == payloads


def test_sync_with_nothing_appended_returns(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path, flush_interval=3600) as ring:
        ring.sync(timeout=5)
        assert ring.stats().buffers_flushed == 0
    assert _read_all(path)[0] == []


def test_a_quiet_record_reaches_the_file_after_the_flush_interval(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path, buffer_size=65536, flush_interval=0.05) as ring:
        ring.append(b"lonely record")
        assert _wait_for(
            lambda: _read_all(path, strict=False)[0] == [b"lonely record"], TIME_SEAL_DEADLINE_S
        ), f"the record did not reach the file within {TIME_SEAL_DEADLINE_S} s without sync()"
        # The file shows the record as soon as it is written; the counter follows.
        assert _wait_for(lambda: ring.stats().buffers_flushed >= 1, TIME_SEAL_DEADLINE_S)


# -- stats and the flusher ---------------------------------------------------------------


def test_stats_is_a_frozen_snapshot_of_this_process_and_the_ring(
    ring_name: str, tmp_path: Path
) -> None:
    with _create(ring_name, tmp_path / "log", buffer_size=16384, buffers=6, lanes=2) as ring:
        ring.append(bytes(10))
        ring.append(b"")
        ring.append(np.zeros(25, dtype=np.float64))  # 200 bytes
        ring.sync(timeout=5)
        stats = ring.stats()
        assert isinstance(stats, shmflush.Stats)
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.records = 0  # type: ignore[misc]
        assert stats.name == ring_name
        assert (stats.buffer_size, stats.buffers, stats.lanes) == (16384, 6, 2)
        assert stats.records == 3
        assert stats.bytes == 210
        assert stats.abandoned == 0
        assert stats.buffers_flushed > 0
        assert stats.bytes_written > 0
        assert stats.bytes_written % 4096 == 0  # whole blocks, as O_DIRECT requires
        assert stats.direct_io is True
        assert stats.broken is False
        assert stats.flusher_pid not in (0, os.getpid())
        assert _process_alive(stats.flusher_pid)

        # Counters are per ring object: another handle in this process starts at zero.
        other = shmflush.attach(ring_name)
        try:
            other.append(b"12345")
            assert other.stats().records == 1
            assert other.stats().bytes == 5
            assert ring.stats().records == 3
            assert other.stats().flusher_pid == stats.flusher_pid
        finally:
            other.close()


def test_the_flusher_writes_the_file_with_o_direct(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        pid = ring.stats().flusher_pid
        target = os.path.realpath(path)
        flags = None
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:  # an fd closed while we looked
                continue
            if link == target:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("flags:"):
                            flags = int(line.split()[1], 8)
                break
        assert flags is not None, f"flusher {pid} holds no descriptor for {target}"
        assert flags & os.O_DIRECT, f"flags {flags:#o} lack O_DIRECT ({os.O_DIRECT:#o})"
        assert ring.stats().direct_io is True


@pytest.fixture
def ramfs_dir(tmp_path: Path) -> Any:
    """A ramfs mount, which refuses O_DIRECT; skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs to test the O_DIRECT fallback needs root")
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "ramfs", "none", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a ramfs to test the O_DIRECT fallback: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs to test the O_DIRECT fallback: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30, check=False)


def test_a_file_system_without_o_direct_falls_back_with_a_warning(
    ring_name: str, ramfs_dir: Path
) -> None:
    path = ramfs_dir / "log"
    payloads = [bytes([i]) * (i * 97) for i in range(60)]  # several buffers' worth
    with pytest.warns(shmflush.DirectIOWarning, match="O_DIRECT"):
        ring = _create(ring_name, path)
    try:
        assert ring.stats().direct_io is False
        for payload in payloads:
            ring.append(payload)
        ring.sync(timeout=5)
        assert _read_all(path, strict=False)[0] == payloads
    finally:
        ring.close()
    assert _read_all(path)[0] == payloads


# -- create: argument checks and conflicts -------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"buffer_size": 1000}, ValueError, "buffer_size"),
        ({"buffer_size": 8192 + 512}, ValueError, "buffer_size"),
        ({"buffer_size": 0}, ValueError, "buffer_size"),
        ({"buffer_size": "8192"}, TypeError, "buffer_size"),
        ({"buffers": 1}, ValueError, "buffers"),
        ({"buffers": 4.0}, TypeError, "buffers"),
        ({"buffers": True}, TypeError, "buffers"),
        ({"lanes": 0}, ValueError, "lanes"),
        ({"lanes": 4}, ValueError, "lanes"),  # must be below buffers (4)
        ({"lanes": "1"}, TypeError, "lanes"),
        ({"flush_interval": 0}, ValueError, "flush_interval"),
        ({"flush_interval": -1.0}, ValueError, "flush_interval"),
        ({"flush_interval": float("nan")}, ValueError, "flush_interval"),
        ({"flush_interval": 10_000}, ValueError, "flush_interval"),
        ({"flush_interval": "0.1"}, (TypeError, ValueError), "flush_interval"),
        ({"sync": "full"}, ValueError, "sync"),
        ({"sync": None}, (TypeError, ValueError), "sync"),
        ({"mode": 0o1000}, ValueError, "mode"),
        ({"mode": -1}, ValueError, "mode"),
        ({"mode": "0600"}, (TypeError, ValueError), "mode"),
        ({"max_writers": 0}, ValueError, "max_writers"),
        ({"name": ""}, ValueError, "name"),
        ({"name": "a/b"}, ValueError, "name"),
        ({"name": ".hidden"}, ValueError, "name"),
        ({"name": "x" * 201}, ValueError, "name"),
        ({"name": 5}, TypeError, "name"),
        ({"path": 5}, TypeError, "path"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v),
)
def test_create_rejects_a_bad_argument_naming_the_parameter(
    ring_name: str,
    tmp_path: Path,
    kwargs: dict[str, Any],
    error: type[Exception] | tuple[type[Exception], ...],
    param: str,
) -> None:
    args: dict[str, Any] = {
        "name": ring_name,
        "path": tmp_path / "log",
        "buffer_size": 8192,
        "buffers": 4,
        "lanes": 1,
    }
    args.update(kwargs)
    with pytest.raises(error, match=rf"^{param}\b"):
        shmflush.create(**args)
    assert _shm_entries_for(ring_name) == []


def test_create_with_the_name_of_a_live_ring_raises_ring_exists(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"kept")
        with pytest.raises(shmflush.RingExistsError, match="exist_ok"):
            _create(ring_name, tmp_path / "other")
        # exist_ok only replaces a ring whose owner is dead: this one is alive.
        with pytest.raises(shmflush.RingExistsError):
            _create(ring_name, tmp_path / "other", exist_ok=True)
        # The failed attempts left the live ring intact and reachable.
        attached = shmflush.attach(ring_name)
        attached.append(b"via attach")
        attached.close()
        ring.append(b"still open")
    # Two handles are two writer slots, each appending into its own chunk:
    # order holds per handle (the owner's two records), not across them.
    records = _read_all(path)[0]
    assert sorted(records) == sorted([b"kept", b"via attach", b"still open"])
    assert records.index(b"kept") < records.index(b"still open")


def test_exist_ok_with_a_live_owner_does_not_tell_the_user_to_pass_exist_ok(
    ring_name: str, tmp_path: Path
) -> None:
    with _create(ring_name, tmp_path / "log") as ring:
        with pytest.raises(shmflush.RingExistsError) as info:
            _create(ring_name, tmp_path / "other", exist_ok=True)
        assert info.value.strerror == (
            f"a shmflush ring named {ring_name!r} exists and its owner (pid {os.getpid()}) "
            "is alive; exist_ok=True only replaces rings whose owner died"
        )
        ring.append(b"still the owner")
    assert _read_all(tmp_path / "log")[0] == [b"still the owner"]


def test_two_rings_cannot_append_to_the_same_file(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"first ring")
        with pytest.raises(shmflush.ShmflushError, match="in use"):
            _create(ring_name + "-b", path)
        assert _shm_entries_for(ring_name + "-b") == []
        ring.append(b"first ring again")
    assert _read_all(path)[0] == [b"first ring", b"first ring again"]


@pytest.mark.parametrize("removal", ["segment and semaphores", "segment only"])
def test_owner_close_does_not_unlink_a_new_ring_that_took_its_name(
    ring_name: str, tmp_path: Path, removal: str
) -> None:
    first = _create(ring_name, tmp_path / "first")
    try:
        first.append(b"first ring")
        # Removed behind the owner's back (cleanup-like, or by hand), then the
        # name is created again for another file.
        if removal == "segment only":
            posix_ipc.unlink_shared_memory(L.shm_name(ring_name))
        else:
            L.unlink_segment(ring_name)
        second = _create(ring_name, tmp_path / "second")
    finally:
        first.close()
    try:
        assert _shm_entries_for(ring_name)  # the new ring is still there
        second.append(b"second ring")
        attached = shmflush.attach(ring_name)
        attached.append(b"second ring, attached")
        attached.close()
    finally:
        second.close()
    assert _read_all(tmp_path / "first")[0] == [b"first ring"]
    assert _read_all(tmp_path / "second")[0] == [b"second ring", b"second ring, attached"]
    assert _shm_entries_for(ring_name) == []


# -- appending to an existing file ----------------------------------------------------


def _first_and_second_run(
    ring_name: str, path: Path, between: Callable[[], None] | None = None
) -> list[bytes]:
    rng = random.Random(3)
    first = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(40)]
    second = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(40)]
    with _create(ring_name, path) as ring:
        ring.append_many(first)
    if between is not None:
        between()
    with _create(ring_name + "-2", path) as ring:
        ring.append_many(second)
    return first + second


def test_a_second_ring_appends_after_the_records_of_the_first(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    expected = _first_and_second_run(ring_name, path)
    records, reader = _read_all(path)
    assert records == expected
    assert reader.damaged == []


def _stream_of(path: Path) -> bytes:
    header = _format.parse_file_header(path.read_bytes()[:64])
    assert isinstance(header, _format.FileHeader)
    return header.stream_id


def _torn_segment(path: Path) -> bytes:
    """The first block of a two-block segment of *path*'s stream at its end: what
    a crash in the middle of that segment's write leaves (the second block never
    landed)."""
    size = path.stat().st_size
    segment = bytearray(2 * _format.BLOCK)
    used = 6000
    _format.pack_record_header(segment, 64, used - 8)
    segment[72 : 64 + used] = b"\x5a" * (used - 8)
    _format.write_segment_header(
        segment, 0, used=used, seq=9, address=size, stream_id=_stream_of(path), sealed_ns=1
    )
    return bytes(segment[: _format.BLOCK])


def test_a_torn_tail_is_cut_off_before_appending(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"

    def tear() -> None:
        with open(path, "ab") as f:
            f.write(_torn_segment(path))
        # The torn file is damaged as it stands ...
        with pytest.raises(shmflush.CorruptFileError):
            _read_all(path)

    expected = _first_and_second_run(ring_name, path, between=tear)
    # ... and reads strictly, with every record of both runs, once the ring appended.
    records, reader = _read_all(path)
    assert records == expected
    assert reader.damaged == []
    assert list(tmp_path.glob("log.cut-*")) == []  # a torn write: nothing to keep


def test_bit_rot_in_the_last_segment_is_kept_in_a_sibling_file_not_cut_off_silently(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path, buffer_size=1 << 16) as ring:
        ring.append(b"first")
        ring.sync(timeout=10)
        ring.append(b"x" * 9000)  # a three-block segment, every sector non-zero
    data = bytearray(path.read_bytes())
    last = _format.DATA_START + _format.BLOCK
    assert data[last : last + 8] == _format.SEGMENT_MAGIC
    data[last + 64 + 5000] ^= 0x04  # one flipped bit, deep in the last segment
    path.write_bytes(bytes(data))
    with pytest.warns(shmflush.DamagedTailWarning, match=r"log\.cut-8192") as caught:
        ring = _create(ring_name + "-2", path)
    with ring:
        ring.append(b"after")
    kept = tmp_path / f"log.cut-{last}"
    assert str(kept) in str(caught[0].message)
    end = last + 64 + 9016
    assert kept.read_bytes() == bytes(data[last : min(len(data), _format.pad_block(end))])
    assert path.read_bytes()[:last] == bytes(data[:last])  # nothing before it changed
    records, _ = _read_all(path)
    assert records == [b"first", b"after"]
    # A second reopen finds nothing more to keep.
    with _create(ring_name + "-3", path):
        pass
    assert sorted(p.name for p in tmp_path.glob("log.cut-*")) == [kept.name]


def _fingerprint(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


FOREIGN = {
    "text log": b"".join(
        b"2024-05-01 12:00:%02d INFO job %d done\n" % (i % 60, i) for i in range(400)
    ),
    "random bytes": random.Random(5).randbytes(10_000),
    "one zero byte": b"\0",
    "a file of zeros": bytes(3 * 4096 + 5),
    "zeros then text": bytes(4096) + b"log line\n",
    "a short text": b"hi\n",
    "segment magic at 0, not intact": b"SHMFLSEG" + bytes(100),
}


@pytest.mark.parametrize("content", FOREIGN.values(), ids=FOREIGN.keys())
def test_create_refuses_a_file_that_is_not_ours_and_leaves_it_byte_for_byte(
    ring_name: str, tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(content)
    before = _fingerprint(path)
    with pytest.raises(shmflush.ForeignFileError) as info:
        _create(ring_name, path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a shmflush file: {len(content)} byte")
    assert "no shmflush file header" in message
    assert "move it away or pick another path" in message
    assert info.value.path == str(path)
    assert _fingerprint(path) == before
    assert _shm_entries_for(ring_name) == []  # no segment, semaphores or flusher left


def test_create_refuses_a_file_of_a_newer_format_version_leaving_it_byte_for_byte(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"from the future")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x04\x00")  # version 4
    before = _fingerprint(path)
    with pytest.raises(shmflush.UnsupportedFormatError, match=r"version 4.*reads format version 3"):
        _create(ring_name + "-2", path)
    assert _fingerprint(path) == before


def test_create_refuses_a_file_whose_file_header_is_damaged_leaving_it_byte_for_byte(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"kept")
    with open(path, "r+b") as f:
        f.seek(20)  # inside the stream id
        f.write(b"\xff")
    before = _fingerprint(path)
    with pytest.raises(shmflush.CorruptFileError, match="file header CRC mismatch") as info:
        _create(ring_name + "-2", path)
    assert info.value.offset == 0
    assert _fingerprint(path) == before
    assert _read_all(path, strict=False)[0] == [b"kept"]  # still readable


def test_create_writes_a_file_header_with_a_fresh_stream_id_on_a_new_file(
    ring_name: str, tmp_path: Path
) -> None:
    before = time.time_ns()
    with _create(ring_name, tmp_path / "a") as ring:
        ring.append(b"a")
    with _create(ring_name, tmp_path / "b") as ring:
        ring.append(b"b")
    after = time.time_ns()
    headers = []
    for name in ("a", "b"):
        data = (tmp_path / name).read_bytes()
        header = _format.parse_file_header(data[:64])
        assert isinstance(header, _format.FileHeader)
        assert before <= header.created_ns <= after
        segment = _format.parse_segment_header(
            data[_format.DATA_START : _format.DATA_START + 64], _format.DATA_START, header.stream_id
        )
        assert isinstance(segment, _format.SegmentHeader)  # the stream id in every segment
        assert header.created_ns <= segment.sealed_ns <= after
        headers.append(header)
    assert headers[0].stream_id != headers[1].stream_id


def test_segments_carry_the_time_they_were_sealed(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    stamps = []
    with _create(ring_name, path) as ring:
        for i in range(3):
            t0 = time.time_ns()
            ring.append(b"r%d" % i)
            ring.sync(timeout=10)
            stamps.append((t0, time.time_ns()))
    data = path.read_bytes()
    stream = _stream_of(path)
    p, sealed = _format.DATA_START, []
    while p < len(data) and data[p : p + 8] == _format.SEGMENT_MAGIC:
        header = _format.parse_segment_header(data[p : p + 64], p, stream)
        assert isinstance(header, _format.SegmentHeader)
        sealed.append(header.sealed_ns)
        p += _format.segment_size(header.used)
    assert len(sealed) == 3
    # Each stamp lies between the append and the return of the sync that wrote it.
    for (t0, t1), stamp in zip(stamps, sealed, strict=True):
        assert t0 <= stamp <= t1


def test_create_rewrites_the_header_of_a_file_whose_creation_was_interrupted(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    path.write_bytes(_format.pack_file_header(bytes(16), 1)[:40])  # the header write, torn
    with _create(ring_name, path) as ring:
        ring.append(b"after the crash")
    assert _read_all(path)[0] == [b"after the crash"]
    assert _stream_of(path) != bytes(16)


def test_create_starts_over_on_a_shmflush_file_whose_only_segment_is_torn(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with _create(ring_name, path) as ring:
        ring.append(b"\x01" * 6000)  # a two-block segment
    # What a crash in the middle of the first write leaves: the header block
    # made it to disk, the second block did not.
    os.truncate(path, _format.DATA_START + _format.BLOCK)
    with pytest.raises(shmflush.CorruptFileError):
        _read_all(path)
    with _create(ring_name + "-2", path) as ring:
        ring.append(b"after the crash")
    records, reader = _read_all(path)
    assert records == [b"after the crash"]
    assert reader.damaged == []
    assert list(tmp_path.glob("log.cut-*")) == []


def _special_path(kind: str, tmp_path: Path) -> Path:
    if kind == "directory":
        (tmp_path / "dir").mkdir()
        return tmp_path / "dir"
    if kind == "FIFO":
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo"
    return Path(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("/dev/null", "not a regular file (a character device)"),
        ("directory", "not a regular file (a directory)"),
        ("FIFO", "not a regular file (a FIFO)"),
        ("/proc/version", "its file system cannot make it durable"),
    ],
)
def test_create_refuses_a_path_that_is_not_a_regular_file_fast_leaving_nothing_behind(
    ring_name: str, tmp_path: Path, kind: str, reason: str
) -> None:
    path = _special_path(kind, tmp_path)
    before = os.stat(path)
    # Only root may open /proc/version for writing; anyone else is refused by open(2).
    expected: type[Exception] = (
        PermissionError
        if kind == "/proc/version" and os.geteuid() != 0
        else shmflush.ForeignFileError
    )
    started = time.monotonic()
    with pytest.raises(expected) as info:
        _create(ring_name, path)
    # It used to be accepted, and close() hung for a minute on a flusher that
    # could not fdatasync; a FIFO must not block the open either.
    assert time.monotonic() - started < 5.0
    if expected is shmflush.ForeignFileError:
        assert str(info.value).startswith(f"{path}: {reason}")
    after = os.stat(path)
    assert (after.st_mode, after.st_ino, after.st_size) == (
        before.st_mode,
        before.st_ino,
        before.st_size,
    )
    assert _shm_entries_for(ring_name) == []  # no segment, semaphores or flusher left


# -- a dead owner -----------------------------------------------------------------------


def _create_and_hang(name: str, path: str, conn: Any) -> None:
    """Child: create a ring, append one record, report the flusher, wait to be killed."""
    ring = shmflush.create(name, path, buffer_size=8192, buffers=4, lanes=1)
    ring.append(b"appended before the crash")
    conn.send(ring.stats().flusher_pid)
    time.sleep(60)  # SIGKILLed long before this ends


def test_exist_ok_replaces_a_ring_whose_owner_was_killed(ring_name: str, tmp_path: Path) -> None:
    old_path = tmp_path / "crashed"
    new_path = tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_create_and_hang, args=(ring_name, str(old_path), child_conn))
    child.start()
    old_flusher = 0
    try:
        assert parent_conn.poll(30), "the child did not create its ring within 30 s"
        old_flusher = parent_conn.recv()
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
            child.join(timeout=10)
        parent_conn.close()
        child_conn.close()

    try:
        ring = _create(ring_name, new_path, exist_ok=True)
        try:
            ring.append(b"new owner")
            # The dead owner's flusher is not our child: it notices on its own,
            # drains what was committed and exits.
            assert _wait_for(lambda: not _process_alive(old_flusher), EXIT_DEADLINE_S), (
                f"the dead owner's flusher {old_flusher} still runs"
            )
            # Its exit must not take the replacement ring's name away.
            attached = shmflush.attach(ring_name)
            attached.append(b"attached to the new ring")
            attached.close()
            ring.append(b"new owner again")
        finally:
            ring.close()
    finally:
        # Whatever failed, let the old flusher finish before the next test starts.
        _wait_for(lambda: not _process_alive(old_flusher), EXIT_DEADLINE_S)
    records = _read_all(new_path)[0]  # in order per handle (see above)
    assert sorted(records) == sorted(
        [b"new owner", b"attached to the new ring", b"new owner again"]
    )
    assert records.index(b"new owner") < records.index(b"new owner again")
    assert _read_all(old_path)[0] == [b"appended before the crash"]
    assert _shm_entries_for(ring_name) == []
