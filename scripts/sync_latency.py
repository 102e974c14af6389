"""sync() and close() latency of whichever shmflush is first on sys.path.

Compare two trees on the same machine, interleaved:

    for i in 1 2 3; do for t in OLD NEW; do PYTHONPATH=$t python scripts/sync_latency.py; done; done

Each run creates a ring (sync="data") three times, appends one 100 B record
and calls sync() N/3 times per ring (default N=300), then times close() after
one more append.  Prints sync() p50/p99 and close()'s median, in µs.
Set LATDIR to measure on another file system (default /tmp).
"""

import os
import sys
import tempfile
import time

import shmflush

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
where = tempfile.mkdtemp(dir=os.environ.get("LATDIR", "/tmp"))
lat: list[int] = []
closes: list[int] = []
for rep in range(3):
    ring = shmflush.create(
        f"synclat{os.getpid()}x{rep}", os.path.join(where, f"l{rep}.log"), sync="data"
    )
    ring.append(b"x" * 100)
    ring.sync(timeout=10)
    for _ in range(N // 3):
        ring.append(b"x" * 100)
        t = time.perf_counter_ns()
        ring.sync(timeout=10)
        lat.append(time.perf_counter_ns() - t)
    ring.append(b"y" * 100)
    t = time.perf_counter_ns()
    ring.close(timeout=30)
    closes.append(time.perf_counter_ns() - t)
lat.sort()
closes.sort()
print(
    f"{shmflush.__file__}: sync p50 {lat[len(lat) // 2] / 1e3:.0f} us "
    f"p99 {lat[int(len(lat) * 0.99)] / 1e3:.0f} us; close median {closes[1] / 1e3:.0f} us"
)
