"""Dead-writer recovery (shmflush/_recovery.py) at the settings users run.

Recovery works from the lease table alone (see the module docstring): it never
walks a fill's records, so its cost does not grow with the number of records in
a buffer.  These tests pin that at the default geometry and at the largest
buffer create() accepts, and pin the root cause of the 240-second soak's wedge.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bare import Bare, dead_claim, make_bare

import shmflush
from shmflush import _api, _atomic, _format
from shmflush import _layout as L
from shmflush._recovery import Recovery

_DIES_IN_RESERVE = """
import os, signal, struct, sys
import shmflush
ring = shmflush.attach(sys.argv[1])
for seq in range(int(sys.argv[2])):
    ring.append(struct.pack("<I", seq) + b"x" * 11)   # 15 bytes, like the report
os.write(int(sys.argv[3]), b"k")
with ring.reserve(16) as view:
    view[:4] = b"torn"
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_killed_inside_a_record_at_the_default_geometry_loses_nothing(
    ring_name: str, tmp_path: Path
) -> None:
    # Issue "Reliability" 1: 2,000 records of 15 B, then SIGKILL inside reserve().
    # Recovery used to recurse once per record (RecursionError, crash loop) and
    # close() timed out with none of the 2,000 records in the file.
    path = tmp_path / "default.log"
    count = 2000
    with shmflush.create(ring_name, path) as ring:  # the defaults: 1 MiB buffers
        read_end, write_end = os.pipe()
        child = subprocess.Popen(
            [sys.executable, "-c", _DIES_IN_RESERVE, ring_name, str(count), str(write_end)],
            pass_fds=(write_end,),
        )
        os.close(write_end)
        try:
            assert child.wait(60) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert os.read(read_end, 1) == b"k", "the writer died before appending"
        os.close(read_end)
        started = time.monotonic()
        ring.sync(timeout=20)
        assert time.monotonic() - started < 20
        assert ring.stats().recovered >= 1
    reader = shmflush.read(path)
    records = list(reader)
    assert records == [struct.pack("<I", seq) + b"x" * 11 for seq in range(count)]
    assert reader.abandoned == 1


def test_recovery_of_the_largest_buffer_full_of_the_smallest_records_is_bounded(
    ring_name: str, tmp_path: Path
) -> None:
    # The largest buffer create() accepts, filled with 8-byte (empty) records, and
    # a dead writer's claim at its end: recovery must not depend on the record
    # count (134 million here), neither in time nor in memory.
    bare = make_bare(ring_name, tmp_path / "big.log", buffer_size=L.MAX_BUFFER_SIZE, buffers=2)
    try:
        core = bare.core
        dead = _format.record_size(16)
        # append_array claims batches of _BATCH_BYTES on a bare ring (no fence:
        # one claim per batch), each starting with its array descriptor record.
        assert core.header(L.H_FENCE) == L.FENCE_OFF
        descriptor = _format.record_size(
            len(_format.pack_array_descriptor(0, 0, repr(("|u1", (0,)))))
        )
        batch = _api._BATCH_BYTES
        full, rest = divmod(core.capacity - dead, batch)
        per_batch = (batch - descriptor) // _format.RECORD_HEADER_SIZE
        rows = full * per_batch + (rest - descriptor) // _format.RECORD_HEADER_SIZE
        assert rows > 100_000_000
        assert bare.ring.append_array(np.zeros((rows, 0), np.uint8)) == rows
        lane_word = core.words[core.lane_w[0]]
        i = lane_word & L.LANE_INDEX_MASK
        at = dead_claim(core, 9, lane_word, dead)
        core.view[at + 8 : at + 12] = b"torn"  # died mid-copy: no header
        core.seal(i)
        recovery = Recovery(core)
        started = time.monotonic()
        for now in (0.0, 10.0):
            recovery.run(now)
        elapsed = time.monotonic() - started
        assert core.state(i) & L.CLOSED
        assert core.committed(i) == core.words[core.used_w[i]] == core.capacity
        length, kind, mark = _format.RECORD_HEADER.unpack_from(core.view, at)
        assert (length, kind, mark) == (dead - 8, _format.KIND_ABANDONED, _format.RECORD_MARK)
        assert elapsed < 5.0, f"recovery took {elapsed:.1f} s"
    finally:
        bare.ring.close()
        os.close(bare.fd)
        L.unlink_segment(ring_name)


def test_recovery_never_commits_the_claim_of_a_live_writer_with_a_stale_lane_word(
    bare: Bare,
) -> None:
    # The root cause of the 240 s soak's wedge ("buffer 1 stuck SEALED|CLOSED with
    # used=16256 but committed=17416").  A live writer read its lane word, was
    # descheduled, and claimed in the buffer after it had been recycled into a
    # later fill: its intent named the *old* fill.  Recovery matched live claims
    # by fill number, so it took that buffer's fill (stuck on a dead writer) for
    # one with no live claim, committed the live writer's range on the dead
    # writer's behalf, and then the live writer committed it again.
    core = bare.core
    bare.ring.append(b"first")
    lane_word = core.words[core.lane_w[0]]
    i = lane_word & L.LANE_INDEX_MASK
    # A stale lane word: same buffer, an older fill number.
    stale = L.lane_word((lane_word >> L.LANE_FILL_SHIFT) - 1, i)
    live = core.acquire_lease()
    lease = core.geometry.lease(live)
    size = _format.record_size(24)
    core.words[(lease + L.L_INTENT) // 8] = L.claim_intent(stale, size)
    old = _atomic.fetch_add(core.state_addr[i], size << 32, 5)
    live_at = core.records_at[i] + (old >> 32)
    dead_at = dead_claim(core, 9, lane_word, size)
    core.view[dead_at + 8 : dead_at + 12] = b"dead"
    core.seal(i)
    recovery = Recovery(core)
    for now in (0.0, 10.0, 20.0):
        recovery.run(now)
    # The live writer still has its claim in flight: recovery must leave the fill.
    assert core.committed(i) < core.words[core.used_w[i]]
    # The live writer finds the fill number changed and abandons its range, as
    # Ring._claim_failed does, committing it itself.
    core.words[(lease + L.L_AT) // 8] = live_at
    core.abandon(live_at, size)
    w = core.geometry.commit(live, i) // 8
    core.words[w] = core.words[w] + size
    core.words[(lease + L.L_AT) // 8] = 0
    core.words[(lease + L.L_INTENT) // 8] = 0
    for now in (30.0, 40.0):
        recovery.run(now)
    assert core.committed(i) == core.words[core.used_w[i]]
    bare.flush()
    reader = shmflush.read(bare.path)
    assert list(reader) == [b"first"]
    assert reader.abandoned == 2
    core.release_lease(live, L.holder_word(os.getpid(), threading.get_native_id()))


@pytest.mark.parametrize("known", [True, False], ids=["offset-known", "offset-unknown"])
def test_a_dead_claim_is_settled_whether_or_not_its_offset_reached_the_lease(
    bare: Bare, known: bool
) -> None:
    # A writer killed between its fetch-and-add and installing its chunk wrote
    # nothing: its range is zero padding, committed by the flusher's row.
    core = bare.core
    bare.ring.append(b"before")
    lane_word = core.words[core.lane_w[0]]
    i = lane_word & L.LANE_INDEX_MASK
    at = dead_claim(core, 9, lane_word, _format.record_size(40))
    if known:
        core.view[at + 8 : at + 20] = b"half-written"
    else:
        # Killed between its fetch-and-add and installing the chunk: the intent
        # is all its lease says.
        lease = core.geometry.lease(9)
        core.words[(lease + L.L_CHUNK) // 8] = 0
        core.words[(lease + L.L_AT) // 8] = 0
        core.words[(lease + L.L_INTENT) // 8] = L.claim_intent(lane_word, _format.record_size(40))
    bare.ring.append(b"after")
    core.seal(i)
    recovery = Recovery(core)
    for now in (0.0, 10.0):
        recovery.run(now)
    bare.flush()
    reader = shmflush.read(bare.path)
    assert list(reader) == [b"before", b"after"]
    assert reader.abandoned == (1 if known else 0)
    assert core.words[(core.geometry.lease(9) + L.L_PID) // 8] == 0
