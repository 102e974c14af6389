"""shmflush.follow: reading a file while a ring writes it, with durable cursors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

import shmflush
from shmflush._format import BLOCK, DATA_START


def _write(ring: shmflush.Ring, n: int, start: int = 0) -> list[bytes]:
    sent = []
    for i in range(start, start + n, 50):
        batch = [b"r%07d" % j for j in range(i, min(i + 50, start + n))]
        if i % 100:
            ring.append_many(batch)
        else:
            for record in batch:
                ring.append(record)
        if i % 1000 == 0:
            ring.sync()
        sent.extend(batch)
    return sent


def test_follow_beside_live_writers_gets_every_record_once_in_file_order(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    # Small buffers, several lanes: many fills in flight, flushed out of order.
    ring = shmflush.create(ring_name, path, buffer_size=1 << 13, buffers=16, lanes=4)
    got: list[bytes] = []
    offsets: list[int] = []
    ready = threading.Event()

    def reader() -> None:
        with shmflush.follow(path) as records:
            ready.set()
            for record in records:
                got.append(record.payload)
                offsets.append(record.offset)

    t = threading.Thread(target=reader)
    t.start()
    assert ready.wait(30)
    writers = [threading.Thread(target=_write, args=(ring, 4000, k * 10**6)) for k in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    ring.close()
    t.join(60)
    assert not t.is_alive()  # follow ended once the ring closed
    assert offsets == sorted(offsets)
    assert len(got) == len(set(got)) == 12000
    assert got == list(shmflush.read(path))


def test_start_positions(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, buffer_size=1 << 13)
    sent = _write(ring, 3000)
    ring.close()
    assert [r.payload for r in shmflush.follow(path)] == sent
    assert [r.payload for r in shmflush.follow(path, start=-7)] == sent[-7:]
    assert [r.payload for r in shmflush.follow(path, start=-5000)] == sent
    assert list(shmflush.follow(path, start="end")) == []
    import datetime

    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    assert list(shmflush.follow(path, start=future)) == []
    past = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    assert len(list(shmflush.follow(path, start=past))) == 3000
    with pytest.raises(ValueError, match="start must be"):
        shmflush.follow(path, start=5)


def test_cursor_resumes_after_the_last_commit(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, buffer_size=1 << 13)
    sent = _write(ring, 1000)
    ring.close()
    with shmflush.follow(path, "ship") as records:
        for i, _record in enumerate(records):
            if i == 499:
                records.commit()
            if i == 600:
                break
    assert (tmp_path / "log.cursors" / "ship").exists()
    assert [r.payload for r in shmflush.follow(path, "ship")] == sent[500:]


def test_a_cursor_of_another_stream_is_refused(ring_name: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        ring = shmflush.create(ring_name, p)
        ring.append(b"x")
        ring.close()
    cursors = str(tmp_path / "cursors")
    with shmflush.follow(a, "c", cursor_dir=cursors) as records:
        next(records)
        records.commit()
    with pytest.raises(shmflush.CursorError, match="belongs to stream"):
        list(shmflush.follow(b, "c", cursor_dir=cursors))


def test_follow_waits_at_a_hole_and_never_skips_the_record_that_fills_it(
    tmp_path: Path,
) -> None:
    # A hand-made live file: segment 2 is written, segment 1 (below it) not yet.
    from tests.test_follow_helpers import segment_bytes

    path = tmp_path / "log"
    head, seg1, seg2, _stream = segment_bytes()
    path.write_bytes(head + bytes(len(seg1)) + seg2)
    import fcntl

    holder = os.open(path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # plays the ring's flusher
    got: list[bytes] = []
    records = shmflush.follow(path)
    t = threading.Thread(target=lambda: got.extend(r.payload for r in records))
    t.start()
    t.join(0.3)
    assert got == []  # waits at the hole, does not jump to segment 2
    with open(path, "r+b") as f:
        f.seek(DATA_START)
        f.write(seg1)
    t.join(0.5)
    assert got == [b"one", b"two"]
    os.close(holder)  # the "ring" goes away: follow ends
    t.join(30)
    assert not t.is_alive()


_KILLED_FOLLOWER = """
import sys, shmflush
out = open(sys.argv[2], "ab", buffering=0)
with shmflush.follow(sys.argv[1], "k") as records:
    for i, record in enumerate(records):
        out.write(record.payload + b"\\n")
        if i % 7 == 0:
            out.write(b"COMMITTING\\n")
            records.commit()
            out.write(b"COMMIT\\n")
"""


def test_a_follower_killed_at_random_repeats_only_records_after_its_last_commit(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, buffer_size=1 << 13)
    sent = _write(ring, 3000)
    ring.close()
    log = tmp_path / "seen"
    rng = random.Random(9)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_FOLLOWER, str(path), str(log)], env=env
        )
        try:
            proc.wait(rng.uniform(0.2, 0.8))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        with open(log, "ab") as f:
            f.write(b"RESTART\n")
    subprocess.run(
        [sys.executable, "-c", _KILLED_FOLLOWER, str(path), str(log)],
        env=env,
        timeout=120,
        check=True,
    )
    # Replay the log: after each restart, delivery resumes right after the
    # last COMMIT (a record written before the commit marker counts).  A kill
    # between COMMITTING and COMMIT may or may not have made that commit
    # durable: the restart may resume at either point, and nowhere else.
    delivered: list[bytes] = []
    committed = 0
    maybe: int | None = None
    resumed: set[int] | None = None
    for line in log.read_bytes().splitlines():
        if line == b"COMMITTING":
            maybe = len(delivered)
        elif line == b"COMMIT":
            committed = len(delivered)
            maybe = None
        elif line == b"RESTART":
            resumed = {committed} if maybe is None else {committed, maybe}
            maybe = None
        else:
            if resumed is not None:
                start = sent.index(line)
                assert start in resumed, f"resumed at record {start}, not at {sorted(resumed)}"
                delivered = delivered[:start]
                committed = start
                resumed = None
            delivered.append(line)
            assert line == sent[len(delivered) - 1]  # nothing lost, nothing out of order
    assert delivered == sent


def test_damaged_files_never_crash_follow_nor_yield_a_corrupt_payload_nor_allocate_unbounded(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    ring = shmflush.create(ring_name, path, buffer_size=1 << 13)
    sent = set(_write(ring, 2000))
    ring.close()
    good = path.read_bytes()
    rng = random.Random(3)
    bad = tmp_path / "bad"
    for trial in range(40):
        data = bytearray(good)
        how = trial % 4
        if how == 0:
            data = data[: rng.randrange(len(data))]
        elif how == 1:
            at = rng.randrange(len(data) // BLOCK) * BLOCK
            data[at : at + BLOCK] = bytes(BLOCK)
        elif how == 2:
            for _ in range(5):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:  # a crafted header: huge used, valid-looking magic
            at = DATA_START + rng.randrange(len(data) // BLOCK - 1) * BLOCK
            data[at : at + 16] = b"SHMFLSEG\x03\x00\x40\x00\xf8\xff\xff\xff"
        bad.write_bytes(bytes(data))
        # Allocation stays bounded by what the file holds, whatever a damaged
        # or crafted header claims (the crafted one claims 4 GiB).
        tracemalloc.start()
        try:
            with shmflush.follow(bad, strict=False) as records:
                out = [r.payload for r in records]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * len(data) + (4 << 20), f"trial {trial}: {peak} bytes at peak"
        assert set(out) <= sent
        with pytest.raises(shmflush.CorruptFileError) if how in (1, 3) else _maybe():
            list(shmflush.follow(bad))


class _maybe:  # noqa: N801  (a context manager that tolerates CorruptFileError)
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is shmflush.CorruptFileError
