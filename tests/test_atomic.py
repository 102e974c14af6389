"""8-byte atomics on shared memory through libatomic (shmflush._atomic)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import posix_ipc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shmflush import ShmflushError, _atomic
from shmflush._atomic import SEQ_CST

U64 = st.integers(0, 2**64 - 1)
MOD = 2**64
# Bytes around the word under test; a binding that wrote 4 or 16 bytes, or at the
# wrong place, would change them.
FILL = 0xA5
WORD_AT = 64


def _read(m: mmap.mmap, at: int = WORD_AT) -> int:
    # Independent of the bindings: what the memory holds, as little-endian u64.
    value: int = struct.unpack_from("<Q", m, at)[0]
    return value


def _assert_neighbours_untouched(m: mmap.mmap) -> None:
    assert m[:WORD_AT] == bytes([FILL]) * WORD_AT
    assert m[WORD_AT + 8 : WORD_AT + 72] == bytes([FILL]) * 64


@contextlib.contextmanager
def _word(initial: int) -> Iterator[tuple[mmap.mmap, int]]:
    """An anonymous mapping with *initial* at WORD_AT; yields (mapping, address)."""
    m = mmap.mmap(-1, 4096)
    m.write(bytes([FILL]) * 4096)
    struct.pack_into("<Q", m, WORD_AT, initial)
    # The ctypes object pins the mapping (mmap refuses to close while it is
    # exported), so the address stays valid for as long as we hold it.
    anchor = ctypes.c_char.from_buffer(m)
    try:
        yield m, ctypes.addressof(anchor) + WORD_AT
    finally:
        del anchor
        m.close()


# -- single-process semantics -------------------------------------------------------


@given(U64)
def test_load_returns_the_stored_bytes_as_u64(value: int) -> None:
    with _word(value) as (m, addr):
        assert _atomic.load(addr, SEQ_CST) == value
        _assert_neighbours_untouched(m)


@given(U64, U64)
def test_store_writes_exactly_the_eight_bytes_of_the_word(initial: int, value: int) -> None:
    with _word(initial) as (m, addr):
        assert _atomic.store(addr, value, SEQ_CST) is None
        assert _read(m) == value
        _assert_neighbours_untouched(m)


@given(U64, U64)
@example(2**64 - 1, 1)  # wraps to zero
@example(0xFFFF_FFFF, 1)  # carry from the low into the high half
@example(2**63, 2**63)
def test_fetch_add_returns_previous_value_and_adds_mod_2_64(initial: int, delta: int) -> None:
    with _word(initial) as (m, addr):
        assert _atomic.fetch_add(addr, delta, SEQ_CST) == initial
        assert _read(m) == (initial + delta) % MOD
        _assert_neighbours_untouched(m)


@given(U64, U64)
@example(0, 1)  # wraps to 2**64 - 1
@example(2**32, 1)  # borrow from the high into the low half
def test_fetch_sub_returns_previous_value_and_subtracts_mod_2_64(initial: int, delta: int) -> None:
    with _word(initial) as (m, addr):
        assert _atomic.fetch_sub(addr, delta, SEQ_CST) == initial
        assert _read(m) == (initial - delta) % MOD
        _assert_neighbours_untouched(m)


@given(U64, U64)
def test_fetch_or_returns_previous_value_and_sets_bits(initial: int, bits: int) -> None:
    with _word(initial) as (m, addr):
        assert _atomic.fetch_or(addr, bits, SEQ_CST) == initial
        assert _read(m) == initial | bits
        _assert_neighbours_untouched(m)


@given(U64, U64)
def test_fetch_and_returns_previous_value_and_clears_bits(initial: int, mask: int) -> None:
    with _word(initial) as (m, addr):
        assert _atomic.fetch_and(addr, mask, SEQ_CST) == initial
        assert _read(m) == initial & mask
        _assert_neighbours_untouched(m)


def test_wraparound_at_2_64_in_both_directions() -> None:
    with _word(2**64 - 1) as (m, addr):
        assert _atomic.fetch_add(addr, 1, SEQ_CST) == 2**64 - 1
        assert _read(m) == 0
        assert _atomic.fetch_sub(addr, 1, SEQ_CST) == 0
        assert _read(m) == 2**64 - 1
        # Adding 2**64 - 1 is subtracting one.
        assert _atomic.fetch_add(addr, 2**64 - 1, SEQ_CST) == 2**64 - 1
        assert _read(m) == 2**64 - 2


@given(U64, U64)
def test_compare_exchange_swaps_when_the_word_equals_expected(value: int, desired: int) -> None:
    with _word(value) as (m, addr):
        assert _atomic.compare_exchange(addr, value, desired) == (True, value)
        assert _read(m) == desired
        _assert_neighbours_untouched(m)


@given(U64, U64, U64)
def test_compare_exchange_fails_and_reports_the_observed_value(
    value: int, expected: int, desired: int
) -> None:
    if expected == value:
        expected = (value + 1) % MOD
    with _word(value) as (m, addr):
        assert _atomic.compare_exchange(addr, expected, desired) == (False, value)
        assert _read(m) == value
        _assert_neighbours_untouched(m)


def test_compare_exchange_distinguishes_words_differing_only_in_the_high_half() -> None:
    # A 32-bit compare would call these equal.
    with _word(0x1_0000_0005) as (m, addr):
        assert _atomic.compare_exchange(addr, 0x5, 0x7) == (False, 0x1_0000_0005)
        assert _atomic.compare_exchange(addr, 0x1_0000_0005, 0x7) == (True, 0x1_0000_0005)
        assert _read(m) == 0x7


def test_check_lock_free_accepts_an_aligned_word() -> None:
    with _word(0) as (_, addr):
        assert addr % 8 == 0
        _atomic.check_lock_free(addr)  # raises if it refuses


@pytest.mark.parametrize("misalignment", [1, 4, 7])
def test_check_lock_free_rejects_a_misaligned_word(misalignment: int) -> None:
    with _word(0) as (_, addr), pytest.raises(ShmflushError, match="not 8-byte aligned"):
        _atomic.check_lock_free(addr + misalignment)


# -- across processes ------------------------------------------------------------------

WORKERS = 4
ITERATIONS = 20_000
# Offsets in the shared segment, each on its own cache line.
COUNTER = 0
READY = 64
PREV_SUMS = 128  # one line per worker
DEADLINE_S = 20.0
# Values whose sums carry across bit 32 (and bit 64) all the time.
CARRY_DELTAS = (
    1,
    0xFFFF_FFFF,
    0x8000_0001,
    1 << 32,
    0x1_0000_0001,
    0xDEAD_BEEF_CAFE,
    (1 << 63) + 12345,
    2**64 - 1,
)


def _hammer(shm_name: str, worker: int, deltas: tuple[int, ...]) -> None:
    """Child: wait for every worker, then fetch_add ITERATIONS times on COUNTER.

    Stores the sum of the previous values it saw in its PREV_SUMS slot.
    """
    shm = posix_ipc.SharedMemory(shm_name)
    try:
        m = mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()
    anchor = ctypes.c_char.from_buffer(m)
    try:
        base = ctypes.addressof(anchor)
        # Start together, so the increments really interleave.
        _atomic.fetch_add(base + READY, 1, SEQ_CST)
        deadline = time.monotonic() + DEADLINE_S
        while _atomic.load(base + READY, SEQ_CST) < WORKERS:
            if time.monotonic() > deadline:
                raise TimeoutError("the other workers did not start")
            time.sleep(0.0002)
        fetch_add = _atomic.fetch_add
        counter = base + COUNTER
        n = len(deltas)
        prev_sum = 0
        last = -1
        for k in range(ITERATIONS):
            prev = fetch_add(counter, deltas[(k + worker) % n], SEQ_CST)
            if n == 1 and prev <= last:
                raise AssertionError(f"counter went from {last} back to {prev}")
            last = prev
            prev_sum += prev
        _atomic.store(base + PREV_SUMS + 64 * worker, prev_sum % MOD, SEQ_CST)
    finally:
        del anchor
        m.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("deltas", [(1,), CARRY_DELTAS], ids=["ones", "carries"])
def test_fetch_add_from_four_processes_loses_no_update(
    ring_name: str, start_method: str, deltas: tuple[int, ...]
) -> None:
    shm_name = "/shmflush." + ring_name
    shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, size=4096)
    m: mmap.mmap | None = None
    ctx = multiprocessing.get_context(start_method)
    started: list[multiprocessing.process.BaseProcess] = []
    try:
        m = mmap.mmap(shm.fd, 4096)
        shm.close_fd()
        for worker in range(WORKERS):
            p = ctx.Process(target=_hammer, args=(shm_name, worker, deltas))
            p.start()
            started.append(p)
        deadline = time.monotonic() + DEADLINE_S
        for p in started:
            p.join(max(deadline - time.monotonic(), 0.0))
        assert [p.exitcode for p in started] == [0] * WORKERS

        expected = sum(
            deltas[(k + w) % len(deltas)] for w in range(WORKERS) for k in range(ITERATIONS)
        )
        assert _read(m, COUNTER) == expected % MOD
        if deltas == (1,):
            # Every value 0 .. N-1 was handed out once: the previous values the
            # workers saw add up to N(N-1)/2.
            total = WORKERS * ITERATIONS
            seen = sum(_read(m, PREV_SUMS + 64 * w) for w in range(WORKERS))
            assert seen == total * (total - 1) // 2
    finally:
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        if m is not None:
            m.close()
        if shm.fd >= 0:
            shm.close_fd()
        # Already gone only if something else removed it; that is no leak of ours.
        with contextlib.suppress(posix_ipc.ExistentialError):
            shm.unlink()


# -- loading libatomic -----------------------------------------------------------------

_WITHOUT_LIBATOMIC = textwrap.dedent(
    """
    import ctypes
    import ctypes.util

    real_find_library = ctypes.util.find_library

    def without_libatomic(real):
        def load(name, *args, **kwargs):
            if name is not None and "atomic" in str(name):
                raise OSError(f"{name}: cannot open shared object file: No such file")
            return real(name, *args, **kwargs)
        return load

    ctypes.CDLL = without_libatomic(ctypes.CDLL)
    ctypes.PyDLL = without_libatomic(ctypes.PyDLL)
    ctypes.util.find_library = lambda name: None if name == "atomic" else real_find_library(name)

    try:
        import shmflush._atomic
    except Exception as exc:
        print(" ".join(cls.__name__ for cls in type(exc).__mro__))
        print(exc)
    else:
        print("imported")
    """
)


def test_missing_libatomic_raises_an_error_naming_the_package() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LIBATOMIC],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    mro, _, message = result.stdout.partition("\n")
    assert "ShmflushError" in mro.split()
    assert "libatomic1" in message
