"""The reliability soak (scripts/soak.py), short: CI runs this; the long one is run
by hand (``python scripts/soak.py --seconds 600``)."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import shmflush
from shmflush._tools import soak as _soak

VERDICT = re.compile(
    r"^kills=(?P<kills>\d+) \(writers=(?P<writer_kills>\d+) flusher=\d+\) "
    r"appended=(?P<appended>\d+) in_file=(?P<in_file>\d+) lost=(?P<lost>\d+) "
    r"duplicated=(?P<duplicated>\d+) out_of_order=(?P<out_of_order>\d+) "
    r"corrupt=(?P<corrupt>\d+) abandoned=\d+ recovered=\d+ restarts=\d+ seconds=[\d.]+ "
    r"unacked_in_file=\d+ errors=(?P<errors>\d+) seed=\d+ geometry=(?P<geometry>\S+) "
    r"injected=(?P<injected>\d+) \(in_ops=(?P<in_ops>\d+) in_library=\d+ escaped=\d+\) "
    r"stops=(?P<stops>\d+) threads=(?P<threads>\d+)$",
    re.MULTILINE,
)


def test_short_soak_with_kills_exceptions_stops_and_thread_churn_at_default_geometry(
    ring_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _soak.main(
        [
            *("--seconds", "9", "--writers", "3", "--seed", "1", "--geometry", "default"),
            *("--event-interval", "0.15", "--churn-share", "0.5"),
            *("--dir", str(tmp_path), "--name", ring_name),
        ]
    )
    captured = capsys.readouterr()
    verdict = VERDICT.search(captured.out)
    assert verdict, f"no verdict line in {captured.out!r}"
    got = {k: v if k == "geometry" else int(v) for k, v in verdict.groupdict().items()}
    assert got["geometry"] == _soak.Geometry().label()  # create()'s defaults
    assert got["writer_kills"] > 0
    assert got["in_ops"] > 0, "no injected exception landed inside an operation"
    assert got["stops"] > 0
    assert got["threads"] > 50, "too few short-lived writer threads"
    problems = got["lost"], got["duplicated"], got["out_of_order"], got["corrupt"]
    assert problems == (0, 0, 0, 0), captured.err[-4000:]
    assert got["errors"] == 0, captured.err[-4000:]
    assert got["appended"] > 0
    assert got["in_file"] >= got["appended"]
    assert status == 0, captured.out
    assert not (tmp_path / "soak.log").exists(), "the file was not removed"


class _InterruptingRing:
    """Stands in for the ring of a soak writer: raises the soak's injected
    exception before, part-way through or after a real operation, and counts the
    records of interrupted operations that landed anyway."""

    def __init__(self, ring: shmflush.Ring, seed: int, share: float) -> None:
        self.ring = ring
        self.rng = random.Random(seed)
        self.share = share
        self.landed = 0  # records (of 12 bytes or more) of interrupted operations
        self.raised = False

    def _where(self) -> str:
        if self.rng.random() >= self.share:
            return "nowhere"
        return self.rng.choice(["before", "middle", "after"])

    def _interrupt(self, landed: Iterable[bytes]) -> None:
        self.landed += sum(1 for record in landed if len(record) >= _soak.HEADER.size)
        self.raised = True
        raise _soak._Injected

    def append(self, data: bytes, *, timeout: float | None = None) -> None:
        where = self._where()
        if where == "before":
            self._interrupt([])
        self.ring.append(data, timeout=timeout)
        if where != "nowhere":
            self._interrupt([data])

    def append_many(self, records: Iterable[bytes], *, timeout: float | None = None) -> int:
        batch = list(records)
        where = self._where()
        if where == "before":
            self._interrupt([])
        done = self.rng.randint(1, len(batch) - 1) if where == "middle" else len(batch)
        self.ring.append_many(batch[:done], timeout=timeout)
        if where != "nowhere":
            self._interrupt(batch[:done])
        return done

    @contextmanager
    def reserve(self, n: int, *, timeout: float | None = None) -> Iterator[memoryview]:
        where = self._where()
        with self.ring.reserve(n, timeout=timeout) as view:
            yield view
            if where in ("before", "middle"):
                self._interrupt([])  # raised inside the block: the record is abandoned
        if where == "after":
            self._interrupt([b"x" * n])

    def sync(self, timeout: float | None = None) -> None:
        self.ring.sync(timeout=timeout)


def test_soak_writer_never_reuses_the_sequence_numbers_of_an_interrupted_operation(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "writer.log"
    large = _soak.large_limit(16384)
    read_fd, write_fd = os.pipe()
    interrupted: set[int] = set()
    interruptions = 0
    try:
        with shmflush.create(ring_name, path, buffer_size=16384, buffers=4, lanes=1) as ring:
            fake = _InterruptingRing(ring, seed=7, share=0.2)
            stop = str(tmp_path / "stop")
            argv = [ring_name, "1", str(write_fd), stop, "3", "1", "0", str(large)]
            writer: Any = _soak._WriterProcess(fake, argv)
            s = writer.main
            for _ in range(300):
                before, fake.raised = s.seq, False
                writer.step(s)
                if fake.raised:
                    interruptions += 1
                    interrupted.update(range(before, s.seq))
            fake.share = 0.0
            writer.step(s)  # acknowledged: every interrupted stretch is below it
        os.close(write_fd)
        write_fd = -1
        data = b""
        while chunk := os.read(read_fd, 1 << 16):
            data += chunk
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    acks = _soak.Acks()
    events = acks.feed(data)
    writer_id = s.writer_id
    assert not acks.errors
    assert acks.top == {writer_id: s.seq - 1}
    holes = {q for lo, hi in acks.holes.get(writer_id, []) for q in range(lo, hi)}
    assert interrupted, "the fake ring never interrupted anything"
    assert fake.landed > 0, "no interrupted operation landed"
    assert holes == interrupted
    assert events.count((_soak._EVENT_IN_OP, 1)) == interruptions
    check = _soak.check_file(
        str(path), acks.top, {writer_id}.__contains__, unacked=acks.holes, large=large
    )
    assert check.ok, check.summary()
    assert check.unreported == fake.landed
    assert check.tiny >= check.tiny_reported


def test_random_geometry_is_the_create_defaults_most_of_the_time() -> None:
    picks = [_soak.pick_geometry(seed) for seed in range(1000)]
    assert sum(g.is_default for g in picks) > 550
    labels = {g.label() for g in picks}
    assert len(labels) == 1 + len(_soak._GEOMETRIES), labels  # each one is drawn
    sizes = [g.resolved()[0] for g in picks]
    assert min(sizes) == 4096
    assert max(sizes) > 1 << 20
