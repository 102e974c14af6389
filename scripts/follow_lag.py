"""How far ``shmflush.follow`` lags behind its writers (issue "Log aggregation").

Two writer processes append 100 B records through ``append_many`` (batches of
256, then a ``--pause``) for ``--seconds``; each record carries the wall-clock
time of the call that appended it.  A follower in this process follows the file
from the beginning and notes, for every record, how long after its append it
arrived: the lag behind the writers, an upper bound of the lag behind the
durable end (it includes the ring's flush_interval and the fdatasync).

    python scripts/follow_lag.py --seconds 10 --pause 0.001

Prints the records, whether each came exactly once and in order, and the
median, p90 and p99 lag.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import tempfile
import threading
import time
from typing import Any

import shmflush

_RECORD = struct.Struct("<IQQ")  # writer, sequence, append time (ns since the epoch)


def _writer(name: str, writer: int, seconds: float, pause: float, out: Any) -> None:
    ring = shmflush.attach(name)
    seq = 0
    pad = b"." * (100 - _RECORD.size)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = time.time_ns()
        ring.append_many([_RECORD.pack(writer, seq + k, now) + pad for k in range(256)], timeout=30)
        seq += 256
        time.sleep(pause)
    ring.close()
    out.put(seq)


def main() -> None:
    parser = argparse.ArgumentParser(description="follow()'s lag behind two writers")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=0.001, help="sleep between batches (s)")
    parser.add_argument("--dir", default=None, help="directory for the file")
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(dir=args.dir), "lag.log")
    name = f"lag{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    lags: list[int] = []
    seen = {1: 0, 2: 0}
    in_order = True
    ring = shmflush.create(name, path)
    writers = [
        ctx.Process(target=_writer, args=(name, w, args.seconds, args.pause, done)) for w in (1, 2)
    ]
    for p in writers:
        p.start()
    sent: list[int] = []

    def close_when_done() -> None:
        # The follower ends once no ring writes the file: close it after the
        # writers are done.
        sent.extend(done.get(timeout=args.seconds + 60) for _ in writers)
        for p in writers:
            p.join(30)
        ring.close()

    closer = threading.Thread(target=close_when_done)
    closer.start()
    with shmflush.follow(path) as records:
        for record in records:
            arrived = time.time_ns()
            writer, seq, appended = _RECORD.unpack_from(record.payload)
            in_order &= seq == seen[writer]
            seen[writer] = seq + 1
            lags.append(arrived - appended)
    closer.join()
    total = sum(seen.values())
    lags.sort()
    n = len(lags)
    print(
        f"followed={n} sent={sum(sent)} exactly_once_in_order={in_order and total == sum(sent)} "
        f"lag median={lags[n // 2] / 1e6:.1f} ms p90={lags[int(n * 0.9)] / 1e6:.1f} ms "
        f"p99={lags[int(n * 0.99)] / 1e6:.1f} ms (pause {args.pause} s)"
    )


if __name__ == "__main__":
    main()
