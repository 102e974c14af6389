"""A bare ring for protocol tests: shared memory and a ``Flusher`` object, but no
flusher process, so a test drives every step by hand (imported by the tests and
by conftest's ``bare`` fixture)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import shmflush
from shmflush import _format, _proc
from shmflush import _layout as L
from shmflush._api import Ring
from shmflush._flusher import Flusher
from shmflush._ring import Ring as Core


@dataclass
class Bare:
    core: Core
    ring: Ring
    flusher: Flusher
    path: Path
    fd: int

    def flush(self) -> None:
        """One flusher pass, without the time-based seal."""
        self.flusher.take_ready()
        self.flusher.flush_pending(0.0)

    def records(self) -> list[bytes]:
        return list(shmflush.read(self.path))


def make_bare(  # noqa: PLR0917  (a geometry and where to put it)
    name: str,
    path: Path,
    buffer_size: int = 8192,
    buffers: int = 4,
    lanes: int = 1,
    max_writers: int = 16,
) -> Bare:
    g = L.Geometry(buffer_size, buffers, lanes, max_writers)
    mm = L.create_segment(name, g.total_size, 0o600, exist_ok=False)
    view = memoryview(mm)
    # A file as create() starts it: the file header, then segments from DATA_START.
    stream_id = os.urandom(_format.STREAM_ID_SIZE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, _format.pack_file_header(stream_id, time.time_ns()), 0)
    L.init_header(
        view,
        g,
        sync=0,
        flush_interval_ns=10**9,
        owner=os.getpid(),
        owner_start=_proc.start_time(os.getpid()),
        next_address=_format.DATA_START,
        next_seq=0,
        stream_id=stream_id,
    )
    view.release()
    core = Core(name, mm, g)
    core.create_semaphores(0o600)
    # "The flusher" is this process: writers that wait check that it is alive.
    core.set_header(L.H_FLUSHER_PID, os.getpid())
    return Bare(core, Ring(core), Flusher(core, fd), path, fd)


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def dead_claim(core: Core, k: int, lane_word: int, size: int) -> int:
    """Give lease slot *k* to a writer that claims a chunk of exactly *size*
    bytes in its lane's fill (*lane_word* names it) with the production code
    (``Writer.claim``), then dies before writing any of it; returns the chunk's
    byte offset in the mapping."""
    from shmflush._ring import Writer

    lease = core.geometry.lease(k)
    writer = Writer(core, k)
    core.words[(lease + L.L_PID) // 8] = writer.holder
    assert core.words[writer.lane_w] == lane_word, "slot k does not claim in that lane"
    writer.target = 0  # exactly *size*: no larger chunk
    writer.claim(size, size, None)
    at = writer.pos
    writer.core = None  # it dies: nothing is released
    core.words[(lease + L.L_PID) // 8] = dead_pid()
    return at
