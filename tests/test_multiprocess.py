"""Several processes (and threads) appending to one ring.

Writers are real processes, started with both ``spawn`` and ``fork``.  Each
record says who wrote it and its sequence number, so that the file can be
checked record by record: every record exactly once, bytes intact, and each
writer's records in the order it appended them.  Small buffers force many
rotations and waits for space.  Every wait has a deadline; children still
running when a test fails are killed in a ``finally``.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest

import shmflush

START_METHODS = ["spawn", "fork"]
# Small geometry: 16 KiB buffers, six of them, two lanes open at once.
GEOMETRY: dict[str, Any] = {"buffer_size": 16384, "buffers": 6, "lanes": 2}
WRITERS = 3
THREADS = 4
RECORDS_PER_WRITER = 500
SEED = 20240611
# Deadlines: for children to finish their work, and for any single blocking call.
JOIN_DEADLINE_S = 60.0
APPEND_TIMEOUT_S = 30.0

# Record layout: writer id (u32) and sequence number (u64) in the first 12 bytes,
# then filler cut from a fixed pseudo-random pattern at an offset that depends on
# (writer, seq), so that a record copied to the wrong place or torn shows up.
HEADER = struct.Struct("<IQ")
_PATTERN = random.Random(SEED).randbytes(1 << 16)


def _sizes(writer: int, count: int, max_record: int) -> list[int]:
    """Record sizes of one writer: mostly small, some big, a few near max_record."""
    rng = random.Random(SEED * 1000 + writer)
    sizes = []
    for _ in range(count):
        r = rng.random()
        if r < 0.10:
            sizes.append(rng.randint(0, HEADER.size - 1))
        elif r < 0.80:
            sizes.append(rng.randint(HEADER.size, 300))
        elif r < 0.95:
            sizes.append(rng.randint(300, 4000))
        else:
            sizes.append(rng.randint(max_record - 2000, max_record))
    return sizes


def _record(writer: int, seq: int, size: int) -> bytes:
    if size < HEADER.size:
        # Too small to carry the header: a deterministic content, checked by counting.
        return bytes((writer * 31 + seq * 7 + i) & 0xFF for i in range(size))
    start = (writer * 7919 + seq * 104729) % (len(_PATTERN) - size)
    return HEADER.pack(writer, seq) + _PATTERN[start : start + size - HEADER.size]


def _expected(writer: int, count: int, max_record: int) -> list[bytes]:
    return [
        _record(writer, seq, size) for seq, size in enumerate(_sizes(writer, count, max_record))
    ]


def _append_records(ring: shmflush.Ring, writer: int, count: int) -> None:
    for record in _expected(writer, count, ring.max_record):
        ring.append(record, timeout=APPEND_TIMEOUT_S)


# -- child process targets (module level, so that spawn can import them) -----------------


def _writer_with_ring(ring: shmflush.Ring, writer: int, count: int) -> None:
    try:
        _append_records(ring, writer, count)
    finally:
        ring.close()


def _writer_by_name(name: str, writer: int, count: int) -> None:
    ring = shmflush.attach(name)
    try:
        _append_records(ring, writer, count)
    finally:
        ring.close()


def _append_sync_and_report(ring: shmflush.Ring, records: list[bytes], conn: Any) -> None:
    try:
        for record in records:
            ring.append(record, timeout=APPEND_TIMEOUT_S)
        ring.sync(timeout=10)
        conn.send(ring.stats().records)
    finally:
        ring.close()
        conn.close()


# -- helpers -------------------------------------------------------------------------


def _run_processes(processes: Sequence[BaseProcess]) -> None:
    """Start, then join every process by one deadline; kill stragglers on the way out."""
    try:
        for p in processes:
            p.start()
        deadline = time.monotonic() + JOIN_DEADLINE_S
        for p in processes:
            p.join(timeout=max(deadline - time.monotonic(), 0.0))
        stuck = [p.pid for p in processes if p.is_alive()]
        assert not stuck, f"writer processes {stuck} did not finish within {JOIN_DEADLINE_S} s"
        codes = [p.exitcode for p in processes]
        assert codes == [0] * len(processes), f"writer exit codes: {codes}"
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def _check_file(path: Path, expected: dict[int, list[bytes]]) -> None:
    """Every expected record exactly once, intact, each writer's in append order."""
    reader = shmflush.read(path)
    with reader:
        records = list(reader)
    assert reader.damaged == []
    want = sum(len(v) for v in expected.values())
    assert len(records) == want, f"{len(records)} records in the file, {want} appended"

    last_seq = dict.fromkeys(expected, -1)
    headed = Counter[int]()
    small = Counter[bytes]()
    for position, record in enumerate(records):
        if len(record) < HEADER.size:
            small[record] += 1
            continue
        writer, seq = HEADER.unpack_from(record)
        assert writer in expected, f"record {position}: unknown writer {writer}"
        assert seq < len(expected[writer]), f"record {position}: writer {writer} seq {seq}"
        assert seq > last_seq[writer], (
            f"record {position}: writer {writer} seq {seq} after seq {last_seq[writer]}"
        )
        last_seq[writer] = seq
        assert record == expected[writer][seq], (
            f"record {position} (writer {writer} seq {seq}): bytes differ"
        )
        headed[writer] += 1

    for writer, records_of_writer in expected.items():
        want = sum(1 for r in records_of_writer if len(r) >= HEADER.size)
        assert headed[writer] == want, f"writer {writer}: {headed[writer]} of {want} records"
    want_small = Counter(r for rs in expected.values() for r in rs if len(r) < HEADER.size)
    assert small == want_small


def _ctx(start_method: str) -> BaseContext:
    import multiprocessing

    return multiprocessing.get_context(start_method)


# -- tests -----------------------------------------------------------------------------


def test_record_sizes_cover_empty_small_and_near_max_records() -> None:
    # Guards the workload itself: the checks below mean little without these sizes.
    max_record = 16384 - 72
    sizes = [s for w in range(WRITERS) for s in _sizes(w, RECORDS_PER_WRITER, max_record)]
    assert 0 in sizes
    assert any(0 < s < HEADER.size for s in sizes)
    assert any(s > max_record - 2000 for s in sizes)
    assert max(sizes) <= max_record


@pytest.mark.parametrize("start_method", START_METHODS)
def test_writer_processes_given_the_ring_lose_and_reorder_nothing(
    ring_name: str, tmp_path: Path, start_method: str
) -> None:
    path = tmp_path / "log"
    ctx = _ctx(start_method)
    with shmflush.create(ring_name, path, **GEOMETRY) as ring:
        expected = {w: _expected(w, RECORDS_PER_WRITER, ring.max_record) for w in range(WRITERS)}
        _run_processes(
            [
                ctx.Process(target=_writer_with_ring, args=(ring, w, RECORDS_PER_WRITER))
                for w in range(WRITERS)
            ]
        )
        # Far more data than the ring holds went through it.
        assert ring.stats().buffers_flushed > GEOMETRY["buffers"]
    _check_file(path, expected)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_writer_processes_that_attach_by_name_lose_and_reorder_nothing(
    ring_name: str, tmp_path: Path, start_method: str
) -> None:
    path = tmp_path / "log"
    ctx = _ctx(start_method)
    with shmflush.create(ring_name, path, **GEOMETRY) as ring:
        expected = {w: _expected(w, RECORDS_PER_WRITER, ring.max_record) for w in range(WRITERS)}
        _run_processes(
            [
                ctx.Process(target=_writer_by_name, args=(ring_name, w, RECORDS_PER_WRITER))
                for w in range(WRITERS)
            ]
        )
    _check_file(path, expected)


def test_writer_threads_sharing_one_ring_lose_and_reorder_nothing(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    errors: list[BaseException] = []

    def work(ring: shmflush.Ring, writer: int) -> None:
        try:
            _append_records(ring, writer, RECORDS_PER_WRITER)
        except BaseException as exc:
            errors.append(exc)

    with shmflush.create(ring_name, path, **GEOMETRY) as ring:
        expected = {w: _expected(w, RECORDS_PER_WRITER, ring.max_record) for w in range(THREADS)}
        threads = [threading.Thread(target=work, args=(ring, w)) for w in range(THREADS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + JOIN_DEADLINE_S
        for t in threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))
        assert not [t for t in threads if t.is_alive()], "writer threads did not finish"
        assert errors == []
        stats = ring.stats()
        assert stats.records == THREADS * RECORDS_PER_WRITER
        assert stats.bytes == sum(len(r) for rs in expected.values() for r in rs)
    _check_file(path, expected)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_sync_in_a_child_puts_its_records_in_the_file(
    ring_name: str, tmp_path: Path, start_method: str
) -> None:
    path = tmp_path / "log"
    ctx = _ctx(start_method)
    records = [_record(7, seq, 40 + seq) for seq in range(20)]
    # A long flush interval and a big buffer: only the child's sync() writes them.
    with shmflush.create(
        ring_name, path, buffer_size=65536, buffers=4, lanes=1, flush_interval=3600
    ) as ring:
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_append_sync_and_report, args=(ring, records, child_conn))
        try:
            child.start()
            child_conn.close()
            assert parent_conn.poll(JOIN_DEADLINE_S), "the child did not report its sync()"
            assert parent_conn.recv() == len(records)
            reader = shmflush.read(path, strict=False)
            with reader:
                in_file = list(reader)
            assert in_file == records
            child.join(timeout=JOIN_DEADLINE_S)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
            parent_conn.close()


def test_append_times_out_while_the_flusher_is_stopped_and_resumes_after(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    appended: list[bytes] = []
    with shmflush.create(
        ring_name, path, buffer_size=8192, buffers=2, lanes=1, flush_interval=3600, sync="data"
    ) as ring:
        flusher = ring.stats().flusher_pid
        os.kill(flusher, signal.SIGSTOP)
        try:
            timed_out = False
            # Two 8 KiB buffers hold 16 of these; the bound only stops a runaway loop.
            for k in range(200):
                record = struct.pack("<I", k) + bytes([k & 0xFF]) * 1000
                started = time.monotonic()
                try:
                    ring.append(record, timeout=0.2)
                except shmflush.RingTimeoutError:
                    elapsed = time.monotonic() - started
                    timed_out = True
                    break
                appended.append(record)
            assert timed_out, "200 appends into two stopped 8 KiB buffers all succeeded"
            assert elapsed >= 0.19  # it waited for its timeout before giving up
            assert len(appended) >= 2
        finally:
            os.kill(flusher, signal.SIGCONT)
        for k in range(200, 210):
            record = struct.pack("<I", k) + bytes([k & 0xFF]) * 1000
            ring.append(record, timeout=APPEND_TIMEOUT_S)
            appended.append(record)
        ring.sync(timeout=10)
    reader = shmflush.read(path)
    with reader:
        records = list(reader)
    # Every append that returned is in the file, in order; the timed-out one is not.
    assert len(records) == len(appended)
    assert records == appended


def test_stats_counts_a_wait_for_space_that_ended_in_a_timeout(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    with shmflush.create(
        ring_name, path, buffer_size=8192, buffers=2, lanes=1, flush_interval=3600
    ) as ring:
        flusher = ring.stats().flusher_pid
        os.kill(flusher, signal.SIGSTOP)
        try:
            for _ in range(200):
                try:
                    ring.append(bytes(1000), timeout=0.2)
                except shmflush.RingTimeoutError:
                    break
            else:
                pytest.fail("200 appends into two stopped 8 KiB buffers all succeeded")
            # Stats.waits: "times this process blocked because every buffer was full".
            # The append above did exactly that, for 0.2 s.
            assert ring.stats().waits >= 1
        finally:
            os.kill(flusher, signal.SIGCONT)
