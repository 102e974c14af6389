"""The shared-memory layout: state and lane words, geometry, names and attach
validation (shmflush._layout)."""

from __future__ import annotations

import contextlib
import mmap
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import posix_ipc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import shmflush
from shmflush import _format, _layout, _ring
from shmflush._layout import (
    CLOSED,
    FLAG_MASK,
    FLUSHING,
    HEADER_SIZE,
    IDLE,
    LANE_FILL_SHIFT,
    LANE_INDEX_MASK,
    LAYOUT_VERSION,
    LINE,
    MAX_BUFFER_SIZE,
    MAX_BUFFERS,
    MAX_COMMIT_COUNTERS,
    MAX_WRITERS,
    MIN_BUFFER_SIZE,
    OFFSET_MASK,
    PAGE,
    RESERVED,
    SEALED,
    WORD_MASK,
    Geometry,
    check_geometry,
    check_name,
    claim_delta,
    lane_word,
    offset,
    pack_state,
)

OFFSETS = st.integers(0, 2**32 - 1)
FLAGS = st.integers(0, 255)
SIZES = st.integers(0, 2**32 - 1)


def fetch_add(word: int, delta: int) -> int:
    """What an atomic fetch-and-add leaves in a 64-bit word."""
    return (word + delta) & WORD_MASK


def fetch_sub(word: int, delta: int) -> int:
    return (word - delta) & WORD_MASK


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    buffers = draw(st.integers(2, MAX_BUFFERS))
    return Geometry(
        buffer_size=PAGE * draw(st.integers(MIN_BUFFER_SIZE // PAGE, MAX_BUFFER_SIZE // PAGE)),
        buffers=buffers,
        lanes=draw(st.integers(1, buffers - 1)),
        max_writers=draw(st.integers(1, min(MAX_WRITERS, MAX_COMMIT_COUNTERS // buffers - 1))),
    )


def faa_limit(g: Geometry) -> int:
    """The largest claim that uses fetch-and-add, exactly as _ring.Ring computes it."""
    return min(g.capacity, ((1 << 32) - 1 - g.capacity) // g.max_writers)


# -- state word ------------------------------------------------------------------------


def test_state_word_fields_partition_the_word() -> None:
    assert FLAG_MASK & OFFSET_MASK == 0
    assert FLAG_MASK | OFFSET_MASK | (((1 << 24) - 1) << 8) == WORD_MASK  # bits 31..8 unused
    flags = [SEALED, FLUSHING, CLOSED, IDLE, RESERVED]
    assert len(set(flags)) == len(flags)
    for flag in flags:
        assert flag & FLAG_MASK == flag
        assert flag & (flag - 1) == 0  # one bit each


@given(OFFSETS, FLAGS)
def test_pack_state_round_trips_offset_and_flags(off: int, flags: int) -> None:
    state = pack_state(off, flags)
    assert 0 <= state <= WORD_MASK
    assert offset(state) == off
    assert state & FLAG_MASK == flags


@given(SIZES)
def test_claim_delta_never_touches_the_flags(size: int) -> None:
    delta = claim_delta(size)
    assert delta & ~OFFSET_MASK == 0
    assert delta <= WORD_MASK
    assert offset(delta) == size


@given(OFFSETS, FLAGS, SIZES)
@example(0, SEALED, 0)
@example(2**32 - 1, IDLE | SEALED, 1)  # the offset wraps
def test_claim_adds_size_to_offset_only(off: int, flags: int, size: int) -> None:
    after = fetch_add(pack_state(off, flags), claim_delta(size))
    assert after & ~OFFSET_MASK == flags
    assert offset(after) == (off + size) % 2**32


@given(st.data(), FLAGS)
def test_claim_that_overflows_the_offset_wraps_only_the_offset(
    data: st.DataObject, flags: int
) -> None:
    off = data.draw(st.integers(1, 2**32 - 1), label="offset")
    size = data.draw(st.integers(2**32 - off, 2**32 - 1), label="size")
    after = fetch_add(pack_state(off, flags), claim_delta(size))
    # The carry out of bit 63 is lost; the fields below the offset are untouched.
    assert after == pack_state(off + size - 2**32, flags)


@given(geometries())
@example(Geometry(MAX_BUFFER_SIZE, 2, 1, MAX_WRITERS))
@example(Geometry(MAX_BUFFER_SIZE, 2, 1, 1))
@example(Geometry(MIN_BUFFER_SIZE, 2, 1, MAX_WRITERS))
@example(Geometry(MIN_BUFFER_SIZE, 2, 1, 1))
def test_overshoot_bound_keeps_a_crossed_offset_below_2_32(g: Geometry) -> None:
    # _ring's bound: with every writer's failed fetch-and-add claim in the offset
    # on top of a full fill, the 32-bit offset field still does not wrap.
    limit = faa_limit(g)
    assert limit >= 1  # small records always take the fetch-and-add path
    assert g.capacity + g.max_writers * limit < 2**32


@pytest.mark.parametrize(
    "geometry",
    [Geometry(8192, 4, 1, 1024), Geometry(PAGE, 2, 1, MAX_WRITERS), Geometry(1 << 20, 3, 2, 1)],
    ids=str,
)
def test_ring_uses_the_faa_limit_that_the_overshoot_bound_assumes(geometry: Geometry) -> None:
    ring = _ring.Ring("unused", mmap.mmap(-1, geometry.total_size), geometry)
    try:
        assert ring.faa_limit == faa_limit(geometry)
    finally:
        ring.unmap()


# -- lane word -------------------------------------------------------------------------


@given(st.integers(0, 2**48 - 1), st.integers(0, LANE_INDEX_MASK))
def test_lane_word_round_trips_fill_and_index(fill: int, index: int) -> None:
    word = lane_word(fill, index)
    assert 0 <= word <= WORD_MASK
    assert word & LANE_INDEX_MASK == index
    assert word >> LANE_FILL_SHIFT == fill


def test_lane_word_index_field_holds_every_buffer_index() -> None:
    assert MAX_BUFFERS - 1 <= LANE_INDEX_MASK


# -- header and geometry ---------------------------------------------------------------


def _constants(prefix: str) -> dict[str, int]:
    return {
        name: value
        for name, value in vars(_layout).items()
        if name.startswith(prefix) and isinstance(value, int)
    }


def test_header_fields_are_distinct_aligned_words_inside_the_header() -> None:
    fields = _constants("H_")
    assert len(fields) >= 20
    assert len(set(fields.values())) == len(fields)
    for name, at in fields.items():
        assert at % 8 == 0, name
        assert 0 <= at <= HEADER_SIZE - 8, name
    assert HEADER_SIZE % LINE == 0


def test_claim_counters_have_a_header_line_to_themselves() -> None:
    hot = {"H_NEXT_ADDRESS", "H_NEXT_SEQ", "H_FILL_COUNTER"}
    fields = _constants("H_")
    lines = {fields[name] // LINE for name in hot}
    assert len(lines) == 1
    others = {name for name, at in fields.items() if at // LINE in lines}
    assert others == hot


@pytest.mark.parametrize("prefix", ["D_", "L_"])
def test_descriptor_and_lease_fields_fit_in_one_line(prefix: str) -> None:
    fields = _constants(prefix)
    assert fields
    assert len(set(fields.values())) == len(fields)
    for name, at in fields.items():
        assert at % 8 == 0, name
        assert at + 8 <= LINE, name


@given(geometries(), st.data())
@example(Geometry(PAGE, 2, 1, 1), None)
@example(
    Geometry(MAX_BUFFER_SIZE, MAX_BUFFERS, MAX_BUFFERS - 1, MAX_COMMIT_COUNTERS // MAX_BUFFERS - 1),
    None,
)
def test_geometry_regions_are_in_order_and_do_not_overlap(
    g: Geometry, data: st.DataObject | None
) -> None:
    # header | lanes | descriptors | leases | padding | buffers, each region ending
    # where the next begins.
    assert g.lanes_offset == HEADER_SIZE
    assert g.lane(g.lanes - 1) + LINE == g.descriptors_offset
    assert g.descriptor(g.buffers - 1) + LINE == g.leases_offset
    assert g.lease(g.max_writers - 1) + LINE == g.commits_offset
    # One row per lease slot, plus the flusher's row (recovery commits there).
    commits_end = g.commit(g.recovery_row, g.buffers - 1) + 8
    assert commits_end == g.commits_offset + 8 * (g.max_writers + 1) * g.buffers
    assert commits_end <= g.data_offset < commits_end + PAGE
    assert g.buffer(0) == g.data_offset
    assert g.buffer(g.buffers - 1) + g.buffer_size == g.total_size
    assert g.total_size == g.data_offset + g.buffer_size * g.buffers
    assert g.capacity == g.buffer_size - _format.SEGMENT_HEADER_SIZE
    assert g.max_record == g.capacity - _format.RECORD_HEADER_SIZE

    draw = data.draw if data is not None else (lambda s, label: 0)
    lane = draw(st.integers(0, g.lanes - 1), label="lane")
    buffer = draw(st.integers(0, g.buffers - 1), label="buffer")
    lease = draw(st.integers(0, g.max_writers - 1), label="lease")
    # Each lane, descriptor and lease on its own 64-byte line; buffers page-aligned.
    for at, first, nxt in (
        (g.lane(lane), g.lanes_offset, g.lane(lane + 1)),
        (g.descriptor(buffer), g.descriptors_offset, g.descriptor(buffer + 1)),
        (g.lease(lease), g.leases_offset, g.lease(lease + 1)),
    ):
        assert at % LINE == 0
        assert at >= first
        assert nxt - at == LINE
    assert g.buffer(buffer) % PAGE == 0
    assert g.buffer(buffer + 1) - g.buffer(buffer) == g.buffer_size


GOOD = {"buffer_size": 8192, "buffers": 4, "lanes": 1, "max_writers": 8}


@pytest.mark.parametrize(
    ("bad", "error", "parameter", "allowed"),
    [
        ({"buffer_size": 8192 + 1}, ValueError, "buffer_size", "multiple of 4096"),
        ({"buffer_size": 6000}, ValueError, "buffer_size", "multiple of 4096"),
        ({"buffer_size": 0}, ValueError, "buffer_size", f"between {MIN_BUFFER_SIZE}"),
        ({"buffer_size": -PAGE}, ValueError, "buffer_size", f"between {MIN_BUFFER_SIZE}"),
        ({"buffer_size": MAX_BUFFER_SIZE + PAGE}, ValueError, "buffer_size", str(MAX_BUFFER_SIZE)),
        ({"buffers": 1}, ValueError, "buffers", f"between 2 and {MAX_BUFFERS}"),
        ({"buffers": MAX_BUFFERS + 1}, ValueError, "buffers", f"between 2 and {MAX_BUFFERS}"),
        ({"lanes": 4}, ValueError, "lanes", "buffers - 1 = 3"),
        ({"lanes": 5}, ValueError, "lanes", "buffers - 1 = 3"),
        ({"lanes": 0}, ValueError, "lanes", "between 1"),
        ({"max_writers": 0}, ValueError, "max_writers", f"between 1 and {MAX_WRITERS}"),
        ({"max_writers": MAX_WRITERS + 1}, ValueError, "max_writers", str(MAX_WRITERS)),
        ({"buffer_size": 8192.0}, TypeError, "buffer_size", "int, not float"),
        ({"buffers": True}, TypeError, "buffers", "int, not bool"),
        ({"lanes": 1.0}, TypeError, "lanes", "int, not float"),
        ({"max_writers": False}, TypeError, "max_writers", "int, not bool"),
        ({"buffers": "4"}, TypeError, "buffers", "int, not str"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_check_geometry_rejects_a_bad_parameter_naming_it(
    bad: dict[str, object], error: type[Exception], parameter: str, allowed: str
) -> None:
    params = {**GOOD, **bad}
    for check in (check_geometry, Geometry):
        with pytest.raises(error) as info:
            check(**params)  # type: ignore[arg-type]
        message = str(info.value)
        assert message.split(maxsplit=1)[0] == parameter
        assert allowed in message


@pytest.mark.parametrize(
    "params",
    [
        {"buffer_size": MIN_BUFFER_SIZE},
        {"buffer_size": MAX_BUFFER_SIZE},
        {"buffers": 2},
        {"buffers": MAX_BUFFERS, "lanes": MAX_BUFFERS - 1, "max_writers": 63},
        {"lanes": 3},
        {"max_writers": 1},
        {"max_writers": MAX_WRITERS},
    ],
    ids=repr,
)
def test_check_geometry_accepts_the_limits(params: dict[str, int]) -> None:
    check_geometry(**{**GOOD, **params})


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", ValueError),
        ("a/b", ValueError),
        ("/ring", ValueError),
        ("a\x00b", ValueError),
        (".x", ValueError),
        ("..", ValueError),
        ("a b", ValueError),
        ("ring\N{LATIN SMALL LETTER E WITH ACUTE}", ValueError),
        ("x" * 201, ValueError),
        (b"ring", TypeError),
        (None, TypeError),
        (5, TypeError),
    ],
    ids=repr,
)
def test_check_name_rejects_names_that_are_not_safe_shm_names(
    name: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="name"):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "x" * 200, "A-b_c.1", "ring.", "0"], ids=repr)
def test_check_name_accepts_and_returns_safe_names(name: str) -> None:
    assert check_name(name) == name


# -- attach validation -----------------------------------------------------------------


@contextlib.contextmanager
def _mapped(shm_path: str) -> Iterator[mmap.mmap]:
    shm = posix_ipc.SharedMemory(shm_path)
    try:
        m = mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def owned_ring(ring_name: str, tmp_path: Path) -> Iterator[str]:
    """A live ring owned by this process (buffer_size 8192, 4 buffers)."""
    with warnings.catch_warnings():
        # tmp_path may be on a file system without O_DIRECT; that is not under test.
        warnings.simplefilter("ignore", shmflush.DirectIOWarning)
        ring = shmflush.create(ring_name, tmp_path / "f.log", buffer_size=8192, buffers=4)
    try:
        yield ring_name
    finally:
        ring.close(timeout=30)


def _word(m: mmap.mmap, field: int) -> int:
    value: int = struct.unpack_from("<Q", m, field)[0]
    return value


def _grown_by_one_buffer(m: mmap.mmap) -> dict[int, int]:
    # A self-consistent header for 5 buffers, in a segment sized for 4.
    g = Geometry(
        _word(m, _layout.H_BUFFER_SIZE),
        _word(m, _layout.H_BUFFERS) + 1,
        _word(m, _layout.H_LANES),
        _word(m, _layout.H_MAX_WRITERS),
    )
    return {_layout.H_BUFFERS: g.buffers, _layout.H_TOTAL_SIZE: g.total_size}


CORRUPTIONS = [
    pytest.param(
        lambda m: {_layout.H_MAGIC: int.from_bytes(b"NOTARING", "little")}, "bad magic", id="magic"
    ),
    pytest.param(
        lambda m: {_layout.H_VERSION: LAYOUT_VERSION + 1},
        f"layout version {LAYOUT_VERSION + 1}",
        id="version",
    ),
    pytest.param(
        lambda m: {_layout.H_BUFFER_SIZE: 8192 + 8},
        "buffer_size",
        id="buffer_size-not-page-multiple",
    ),
    pytest.param(lambda m: {_layout.H_BUFFER_SIZE: 1 << 40}, "buffer_size", id="buffer_size-huge"),
    pytest.param(lambda m: {_layout.H_BUFFER_SIZE: 0}, "buffer_size", id="buffer_size-zero"),
    pytest.param(lambda m: {_layout.H_BUFFERS: 0}, "buffers", id="buffers-zero"),
    pytest.param(lambda m: {_layout.H_BUFFERS: 2**64 - 1}, "buffers", id="buffers-huge"),
    pytest.param(lambda m: {_layout.H_LANES: 4}, "lanes", id="lanes-equal-buffers"),
    pytest.param(lambda m: {_layout.H_LANES: 0}, "lanes", id="lanes-zero"),
    pytest.param(lambda m: {_layout.H_MAX_WRITERS: 0}, "max_writers", id="max_writers-zero"),
    pytest.param(
        lambda m: {_layout.H_TOTAL_SIZE: _word(m, _layout.H_TOTAL_SIZE) + PAGE},
        "header says",
        id="total-size-off-by-a-page",
    ),
    pytest.param(lambda m: {_layout.H_TOTAL_SIZE: 0}, "header says 0 bytes", id="total-size-zero"),
    pytest.param(_grown_by_one_buffer, "segment has", id="geometry-larger-than-segment"),
    pytest.param(lambda m: {_layout.H_SYNC: 7}, "unknown sync level 7", id="sync-level"),
]


@pytest.mark.parametrize(("corrupt", "message"), CORRUPTIONS)
def test_attach_rejects_a_corrupted_header(
    owned_ring: str, corrupt: Callable[[mmap.mmap], dict[int, int]], message: str
) -> None:
    with _mapped(_layout.shm_name(owned_ring)) as m:
        original = m[:HEADER_SIZE]
        try:
            for field, value in corrupt(m).items():
                struct.pack_into("<Q", m, field, value)
            with pytest.raises(shmflush.CorruptRingError, match=message) as info:
                shmflush.attach(owned_ring)
            assert repr(owned_ring) in str(info.value)
        finally:
            m[:HEADER_SIZE] = original
    # Restored, the same segment attaches: the error was about the corruption.
    shmflush.attach(owned_ring).close()


@contextlib.contextmanager
def _raw_segment(name: str, size: int, content: bytes) -> Iterator[None]:
    shm = posix_ipc.SharedMemory(_layout.shm_name(name), posix_ipc.O_CREX, size=size)
    try:
        with mmap.mmap(shm.fd, size) as m:
            m[: len(content)] = content
        shm.close_fd()
        yield
    finally:
        if shm.fd >= 0:
            shm.close_fd()
        shm.unlink()


def test_attach_rejects_a_segment_too_small_for_the_header(ring_name: str) -> None:
    with (
        _raw_segment(ring_name, 100, _layout.MAGIC),
        pytest.raises(shmflush.CorruptRingError, match="100 bytes is too small"),
    ):
        shmflush.attach(ring_name)


def test_attach_rejects_a_zero_filled_segment_as_bad_magic(ring_name: str) -> None:
    with (
        _raw_segment(ring_name, PAGE, b""),
        pytest.raises(shmflush.CorruptRingError, match="bad magic"),
    ):
        shmflush.attach(ring_name)


def test_attach_rejects_a_bare_magic_with_an_unset_version(ring_name: str) -> None:
    # What a reader sees if the creator died after the magic but before the rest
    # (init_header writes the magic last, so this only comes from outside).
    with (
        _raw_segment(ring_name, PAGE, _layout.MAGIC),
        pytest.raises(shmflush.CorruptRingError, match="layout version 0"),
    ):
        shmflush.attach(ring_name)


def test_attach_to_a_missing_ring_raises_ring_not_found_naming_it(ring_name: str) -> None:
    with pytest.raises(shmflush.RingNotFoundError) as info:
        shmflush.attach(ring_name)
    assert ring_name in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.errno == 2
