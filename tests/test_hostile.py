"""Hostile input: scribbled shared memory, out-of-range and wrong-typed arguments,
and other users (shmflush._api, _ring, _flusher, _layout).

Attach-time validation of the ring header is in test_layout.py; this file covers
what is read from shared memory *after* attach (lane words, descriptors, header
fields the protocol uses), arguments at the edges of the public API, and the
permission bits that keep other users out.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pwd
import signal
import stat
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmflush
from shmflush import _atomic, _flusher, _ring
from shmflush import _layout as L

SHM_DIR = "/dev/shm"
FLUSHER_DEADLINE_S = 10.0
# A ring whose flusher cannot drain closes with an error after this long.
CLOSE_TIMEOUT_S = 2.0
CHILD_DEADLINE_S = 20


def _create(name: str, path: Path, **kwargs: Any) -> shmflush.Ring:
    kwargs.setdefault("buffer_size", 8192)
    kwargs.setdefault("buffers", 4)
    kwargs.setdefault("lanes", 1)
    with warnings.catch_warnings():
        # tmp_path may be on a file system without O_DIRECT; that is not under test.
        warnings.simplefilter("ignore", shmflush.DirectIOWarning)
        return shmflush.create(name, path, **kwargs)


def _read(path: Path) -> list[bytes]:
    with shmflush.read(path, strict=False) as reader:
        return list(reader)


@pytest.fixture
def ring(ring_name: str, tmp_path: Path) -> Iterator[shmflush.Ring]:
    """An owned ring on ``tmp_path / "log"`` holding one synced record, b"first"."""
    r = _create(ring_name, tmp_path / "log")
    try:
        r.append(b"first")
        r.sync(timeout=10)
        yield r
    finally:
        with contextlib.suppress(shmflush.ShmflushError):
            r.close(timeout=30)


def _core(ring: shmflush.Ring) -> Any:
    core = ring._core
    assert core is not None
    return core


# -- a scribbled lane word ---------------------------------------------------------------


@contextlib.contextmanager
def _lane_index(ring: shmflush.Ring, index: int) -> Iterator[None]:
    """Lane 0's word names buffer *index* (keeping its fill number) until exit."""
    core = _core(ring)
    w = core.lane_w[0]
    original = core.words[w]
    core.words[w] = (original & ~L.LANE_INDEX_MASK) | index
    try:
        yield
    finally:
        core.words[w] = original


def _reserve_one(ring: shmflush.Ring) -> None:
    with ring.reserve(4) as view:
        view[:] = b"rsrv"


LANE_CALLS: list[Any] = [
    pytest.param(
        lambda r: r.append(b"x"),
        id="append",
    ),
    pytest.param(lambda r: r.append_many([b"x", b"y"]), id="append_many"),
    pytest.param(lambda r: r.append_array(np.zeros((3, 4), np.uint8)), id="append_array"),
    pytest.param(_reserve_one, id="reserve"),
]


@pytest.mark.parametrize("call", LANE_CALLS)
def test_a_lane_word_naming_a_buffer_out_of_range_raises_a_shmflush_error(
    ring: shmflush.Ring, tmp_path: Path, call: Callable[[shmflush.Ring], None]
) -> None:
    # One past the last buffer, and the largest index the lane word can hold.
    for index in (_core(ring).geometry.buffers, L.LANE_INDEX_MASK):
        with _lane_index(ring, index), pytest.raises(shmflush.ShmflushError, match="lane word"):
            call(ring)
    # Nothing was written anywhere; restored, the ring works.
    ring.append(b"last")
    ring.close(timeout=30)
    assert _read(tmp_path / "log") == [b"first", b"last"]


# -- scribbled descriptors and header fields seen by the flusher ------------------------


def _close_fill_with(ring: shmflush.Ring, *, used: int, address: int) -> None:
    """Make lane 0's open fill look closed with a hostile extent, commit counters
    matching it, and wake the flusher: what a process with write access to the
    shared memory could do."""
    core = _core(ring)
    i = core.words[core.lane_w[0]] & L.LANE_INDEX_MASK
    assert core.state(i) >> 32, "the fill holds a record"
    total = int(core.commits[:, i].sum(dtype=np.uint64))
    core.words[core.base_w[i]] = (total - used) & L.WORD_MASK
    core.words[core.used_w[i]] = used
    core.words[core.address_w[i]] = address
    core.words[core.seq_w[i]] = 1
    _atomic.fetch_or(core.state_addr[i], L.SEALED | L.CLOSED, _atomic.SEQ_CST)
    core.wake_flusher()


def _flusher_died_or_broke(ring: shmflush.Ring) -> bool:
    """Wait until the first flusher exited or marked the ring broken."""
    core = _core(ring)
    flusher = ring._supervisor.flusher
    assert flusher is not None
    deadline = time.monotonic() + FLUSHER_DEADLINE_S
    while time.monotonic() < deadline:
        if flusher.poll() is not None or core.status() & L.STATUS_BROKEN:
            return True
        time.sleep(0.01)
    return False


HOSTILE_EXTENTS = [
    pytest.param({"used": 8192 - 64 + 8}, id="used-capacity-plus-8"),
    pytest.param({"used": 1 << 40}, id="used-1TiB"),
    pytest.param({"used": 2**64 - 8}, id="used-u64-max"),
    pytest.param({"address": 4096 + 8}, id="address-misaligned"),
]


@pytest.mark.parametrize("extent", HOSTILE_EXTENTS)
def test_write_fill_refuses_a_hostile_extent_before_writing(
    tmp_path: Path, extent: dict[str, int]
) -> None:
    # The flusher's write step alone, on an anonymous mapping: fast and independent
    # of how the flusher process reacts to the refusal (see the tests below).
    geometry = L.Geometry(8192, 4, 1, 4)
    mm = mmap.mmap(-1, geometry.total_size)
    core = _ring.Ring("unused", mm, geometry)
    fd = os.open(tmp_path / "log", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        extent = {"used": 16, "address": 0, **extent}
        core.words[core.used_w[1]] = extent["used"]
        core.words[core.address_w[1]] = extent["address"]
        flusher = _flusher.Flusher(core, fd)
        with pytest.raises((ValueError, shmflush.ShmflushError), match=r"used|address"):
            flusher.write_fill(1)
        assert os.fstat(fd).st_size == 0
        # The buffer's neighbours in the mapping are untouched.
        assert mm[geometry.buffer(2) : geometry.buffer(3)] == bytes(8192)
    finally:
        os.close(fd)
        core.unmap()


def test_the_flusher_never_writes_a_fill_whose_used_exceeds_capacity(
    ring: shmflush.Ring, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    size = path.stat().st_size
    ring.append(b"victim")
    _close_fill_with(ring, used=_core(ring).capacity + 8, address=size)
    assert _flusher_died_or_broke(ring)
    assert path.stat().st_size == size  # not a byte written, in bounds or out
    with pytest.raises(shmflush.ShmflushError):
        ring.close(timeout=CLOSE_TIMEOUT_S)
    assert _read(path) == [b"first"]


def test_a_fill_the_flusher_refuses_marks_the_ring_broken(
    ring: shmflush.Ring, tmp_path: Path
) -> None:
    ring.append(b"victim")
    _close_fill_with(ring, used=1 << 40, address=tmp_path.joinpath("log").stat().st_size)
    try:
        assert _flusher_died_or_broke(ring)
        assert _core(ring).status() & L.STATUS_BROKEN
        with pytest.raises(shmflush.RingBrokenError):
            ring.append(b"after")
    finally:
        with contextlib.suppress(shmflush.ShmflushError):
            ring.close(timeout=CLOSE_TIMEOUT_S)


def test_a_misaligned_next_address_fails_sync_and_close_without_writing(
    ring: shmflush.Ring, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    size = path.stat().st_size
    _core(ring).set_header(L.H_NEXT_ADDRESS, size + 8)
    ring.append(b"victim")
    with pytest.raises(shmflush.ShmflushError):
        ring.sync(timeout=CLOSE_TIMEOUT_S)
    # The flusher may preallocate (zeros past the end); it must write no data.
    assert not any(path.read_bytes()[size:])
    with pytest.raises(shmflush.ShmflushError):
        ring.close(timeout=CLOSE_TIMEOUT_S)
    assert _read(path) == [b"first"]


# -- arguments at the edges ------------------------------------------------------------


RESERVE_SIZES: list[tuple[object, type[Exception]]] = [
    (-1, ValueError),
    (-(2**63), ValueError),
    (2**32, shmflush.RecordTooLargeError),
    (2**64 + 1, shmflush.RecordTooLargeError),
    (True, TypeError),
    (4.0, TypeError),
    ("4", TypeError),
    (None, TypeError),
]


def test_reserve_rejects_sizes_out_of_range_before_claiming(
    ring: shmflush.Ring, tmp_path: Path
) -> None:
    for n, error in RESERVE_SIZES:
        with pytest.raises(error, match=r"size|max_record"), ring.reserve(n):  # type: ignore[arg-type]
            pytest.fail(f"reserve({n!r}) yielded")
    # Nothing was claimed: the next record follows the first one directly.
    ring.append(b"last")
    ring.close(timeout=30)
    assert _read(tmp_path / "log") == [b"first", b"last"]


BAD_NAMES = ["", "/", "a/b", "../x", "a\x00b", "\x00", "x" * 201, "x" * 4096, " ", "a\nb"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_attach_and_create_reject_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        shmflush.attach(name)
    with pytest.raises(ValueError, match="name"):
        _create(name, tmp_path / "log")
    assert not (tmp_path / "log").exists()


# Calls on a live ring: (call, error, what the message must name).
RING_CALLS: list[Any] = [
    pytest.param(lambda r: r.append(object()), TypeError, "bytes-like", id="append-object"),
    pytest.param(
        lambda r: r.append(b"x", timeout="x"),
        TypeError,
        "timeout",
        id="append-timeout-str",
    ),
    pytest.param(
        lambda r: r.append_many(5),
        TypeError,
        "records",
        id="append_many-int",
    ),
    pytest.param(
        lambda r: r.append_many([b"x", 5]), TypeError, "bytes-like", id="append_many-item"
    ),
    pytest.param(
        lambda r: r.append_many([b"x"], timeout="x"),
        TypeError,
        "timeout",
        id="append_many-timeout-str",
    ),
    pytest.param(lambda r: r.append_array([1, 2]), TypeError, "array", id="append_array-list"),
    pytest.param(
        lambda r: r.append_array(np.zeros(3, np.uint8), timeout="x"),
        TypeError,
        "timeout",
        id="append_array-timeout-str",
    ),
    pytest.param(
        lambda r: r.reserve(4, timeout="x").__enter__(),
        TypeError,
        "timeout",
        id="reserve-timeout-str",
    ),
    pytest.param(
        lambda r: r.sync(timeout="x"),
        TypeError,
        "timeout",
        id="sync-timeout-str",
    ),
]


@pytest.mark.parametrize(("call", "error", "param"), RING_CALLS)
def test_ring_methods_reject_wrong_types_naming_the_parameter(
    ring: shmflush.Ring,
    tmp_path: Path,
    call: Callable[[shmflush.Ring], object],
    error: type[Exception],
    param: str,
) -> None:
    with pytest.raises(error, match=param):
        call(ring)
    # The ring is untouched by the rejected call.
    ring.append(b"last")
    ring.close(timeout=30)
    assert _read(tmp_path / "log") == [b"first", b"last"]


def _any(value: object) -> Any:
    """*value*, typed so that a deliberately wrong argument passes the type checker."""
    return value


# Calls that need no live ring: (call(ring name, directory), error, what to name).
MODULE_CALLS: list[Any] = [
    pytest.param(lambda n, d: shmflush.attach(_any(5)), TypeError, "name", id="attach-int"),
    pytest.param(lambda n, d: shmflush.attach(_any(b"ring")), TypeError, "name", id="attach-bytes"),
    pytest.param(
        lambda n, d: list(shmflush.read(_any(5))),
        TypeError,
        "path",
        id="read-int",
    ),
    pytest.param(
        lambda n, d: shmflush.read_array(d, "no such dtype"),
        TypeError,
        "data type",
        id="read_array-dtype",
    ),
    pytest.param(
        lambda n, d: _create(n, d / "log", sync=[]),
        (TypeError, ValueError),
        "sync",
        id="create-sync-list",
    ),
    pytest.param(lambda n, d: _create(n, _any(None)), TypeError, "path", id="create-path-none"),
    pytest.param(
        lambda n, d: _create(n, _any(os.fsencode(d / "log"))),
        TypeError,
        "path",
        id="create-path-bytes",
    ),
    pytest.param(
        lambda n, d: _create(n, d / "log", mode=0.5), ValueError, "mode", id="create-mode"
    ),
    pytest.param(
        lambda n, d: _create(n, d / "log", max_writers=None),
        TypeError,
        "max_writers",
        id="create-max_writers-none",
    ),
]


@pytest.mark.parametrize(("call", "error", "param"), MODULE_CALLS)
def test_module_functions_reject_wrong_types_naming_the_parameter(
    ring_name: str,
    tmp_path: Path,
    call: Callable[[str, Path], object],
    error: type[Exception] | tuple[type[Exception], ...],
    param: str,
) -> None:
    with pytest.raises(error, match=param):
        call(ring_name, tmp_path)
    assert not os.path.exists(os.path.join(SHM_DIR, f"shmflush.{ring_name}"))


def test_close_with_a_bad_timeout_raises_before_closing(ring: shmflush.Ring) -> None:
    flusher = ring._supervisor.flusher
    assert flusher is not None
    spare = shmflush.attach(ring.name)  # to clean up if close() leaves the ring behind
    try:
        with pytest.raises(TypeError, match="timeout"):
            ring.close(timeout="x")  # type: ignore[arg-type]
        assert not ring.closed
    finally:
        if ring.closed and os.path.exists(os.path.join(SHM_DIR, f"shmflush.{ring.name}")):
            # What _shutdown would have done: stop the owner's flusher watchdog
            # (it would touch the unmapped ring), then drain, stop and unlink.
            ring._supervisor.stop_watching()
            spare_core = _core(spare)
            spare_core.set_status(L.STATUS_CLOSING)
            spare_core.wake_flusher()
            flusher.wait(FLUSHER_DEADLINE_S)
            L.unlink_segment(ring.name)
        spare.close()


# -- permissions -----------------------------------------------------------------------


def _modes(name: str) -> dict[str, int]:
    entries = [f"shmflush.{name}", f"sem.shmflush.{name}.flush", f"sem.shmflush.{name}.space"]
    return {e: stat.S_IMODE(os.stat(os.path.join(SHM_DIR, e)).st_mode) for e in entries}


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_shared_memory_and_semaphores_are_created_0o600(ring_name: str, tmp_path: Path) -> None:
    # A umask of 0 cannot widen the default: only the owner's user may open them.
    with _umask(0), _create(ring_name, tmp_path / "log"):
        modes = _modes(ring_name)
    assert modes == dict.fromkeys(modes, 0o600)


def test_an_explicit_mode_is_honoured_exactly_for_semaphores_too(
    ring_name: str, tmp_path: Path
) -> None:
    with _umask(0o077), _create(ring_name, tmp_path / "log", mode=0o660):
        modes = _modes(ring_name)
    assert modes == dict.fromkeys(modes, 0o660)


def _in_child_as(uid: int, gid: int, action: Callable[[], str]) -> str:
    """Run *action* in a forked child that first drops to *uid*/*gid* (no
    supplementary groups); returns what it returned, or 'error: ...'.

    A fork rather than a new interpreter: the child needs no access to the
    interpreter or the virtual environment (which may live under a 0700 home)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.close(read_end)
            signal.alarm(CHILD_DEADLINE_S)  # a wedged child dies instead of hanging the test
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            except OSError as exc:
                result = f"setuid failed: {exc}"
            else:
                try:
                    result = action()
                except BaseException as exc:
                    result = f"error: {type(exc).__module__}.{type(exc).__qualname__}: {exc}"
            os.write(write_end, result.encode(errors="replace"))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        result = reader.read().decode()
    os.waitpid(pid, 0)
    if result.startswith("setuid failed"):
        pytest.skip(f"cannot drop privileges in a child: {result}")
    return result


def _attach_and_append(name: str) -> Callable[[], str]:
    def action() -> str:
        with shmflush.attach(name) as ring:
            ring.append(b"from another user")
        return "attached"

    return action


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a child as another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this host")


def test_another_user_cannot_attach(
    ring_name: str, tmp_path: Path, nobody: pwd.struct_passwd
) -> None:
    with _create(ring_name, tmp_path / "log") as ring:
        result = _in_child_as(nobody.pw_uid, nobody.pw_gid, _attach_and_append(ring_name))
        ring.append(b"owner")
    assert result.startswith("error: builtins.PermissionError: no permission to attach")
    assert _read(tmp_path / "log") == [b"owner"]


def test_another_user_can_attach_when_the_mode_allows_it(
    ring_name: str, tmp_path: Path, nobody: pwd.struct_passwd
) -> None:
    # The control for the test above: the same child succeeds when the mode lets it.
    with _umask(0), _create(ring_name, tmp_path / "log", mode=0o666):
        result = _in_child_as(nobody.pw_uid, nobody.pw_gid, _attach_and_append(ring_name))
    assert result == "attached"
    assert _read(tmp_path / "log") == [b"from another user"]


def test_a_semaphore_without_permission_raises_permission_error(
    ring_name: str, tmp_path: Path, nobody: pwd.struct_passwd
) -> None:
    # Shared memory open to the group, semaphores not: the state the umask bug above
    # leaves behind.  A group member gets past the segment, then fails on a semaphore.
    with _umask(0), _create(ring_name, tmp_path / "log", mode=0o660):
        for sem in ("flush", "space"):
            os.chmod(os.path.join(SHM_DIR, f"sem.shmflush.{ring_name}.{sem}"), 0o600)
        result = _in_child_as(nobody.pw_uid, os.getegid(), _attach_and_append(ring_name))
    assert result.startswith("error: builtins.PermissionError"), result


def test_header_parameters_scribbled_after_attach_are_not_read_again(
    ring: shmflush.Ring, tmp_path: Path
) -> None:
    # The header is validated at attach; later scribbles on it are not re-read by
    # appends, which must keep working on the geometry they validated.
    core = _core(ring)
    struct.pack_into("<Q", core.view, L.H_BUFFERS, 2**64 - 1)
    struct.pack_into("<Q", core.view, L.H_BUFFER_SIZE, 3)
    ring.append(b"still fine")
    ring.close(timeout=30)
    assert _read(tmp_path / "log") == [b"first", b"still fine"]


# -- hostile payloads --------------------------------------------------------------------


def _forged_segment(address: int, stream_id: bytes, payload: bytes) -> bytes:
    """A complete, valid-looking segment of one DATA record, claiming *address*,
    with its own matching CRCs: what an attacker who can write record payloads,
    and has even read the file's stream id, can put inside a record."""
    from shmflush import _format

    used = _format.record_size(len(payload))
    forged = bytearray(64 + used)
    _format.pack_record_header(forged, 64, len(payload))
    forged[72 : 72 + len(payload)] = payload
    _format.write_segment_header(
        forged, 0, used=used, seq=1 << 40, address=address, stream_id=stream_id, sealed_ns=1
    )
    return bytes(forged)


def test_a_payload_crafted_as_a_segment_header_cannot_move_the_append_point(
    ring_name: str, tmp_path: Path
) -> None:
    from shmflush import _format

    path = tmp_path / "log"
    with _create(ring_name, path, buffer_size=1 << 16) as ring:
        ring.append(b"before")
        ring.sync(timeout=10)
    real_start = path.stat().st_size  # the next segment goes here
    stream = path.read_bytes()[16:32]  # the strongest attacker knows the stream id
    # The hostile record is the first of the next segment: its payload starts at
    # real_start + 64 + 8.  A forged segment at the next block boundary inside it,
    # claiming that address and a segment that ends well inside the real one.
    forged_at = real_start + _format.BLOCK
    lead = forged_at - (real_start + 64 + 8)
    forged = _forged_segment(forged_at, stream, b"FAKE RECORD")
    hostile = b"\x01" * lead + forged + b"\x02" * 9000
    with _create(ring_name + "-2", path, buffer_size=1 << 16) as ring:
        ring.append(hostile)
        ring.sync(timeout=10)
    data = path.read_bytes()
    assert data[forged_at : forged_at + len(forged)] == forged  # where it would be trusted
    real_end = real_start + _format.segment_size(_format.record_size(len(hostile)))
    assert forged_at + _format.segment_size(len(forged) - 64) < real_end  # inside the real one
    # Reopen and append: the forward walk jumps over the real segment whole.
    with _create(ring_name + "-3", path, buffer_size=1 << 16) as ring:
        ring.append(b"after")
    with shmflush.read(path) as reader:  # strict: no damage anywhere
        records = list(reader)
    assert records == [b"before", hostile, b"after"]
    assert b"FAKE RECORD" not in records
    assert path.read_bytes()[real_start:real_end] == data[real_start:real_end]  # untouched
