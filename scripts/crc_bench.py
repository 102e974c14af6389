"""Measure the CRC candidates for shmflush segments: speed by size, GIL release.

Standalone (imports nothing from shmflush): ``python scripts/crc_bench.py``.
Candidates that are not installed are skipped.  Each figure is the median of
``--runs`` runs; one run times enough calls to last ``--run-time`` seconds.

The flusher computes the CRC of a fill in place, over a memoryview of shared
memory, on a thread pool next to pwrite(2): so the input is a memoryview of an
mmap (not bytes), and the call must release the GIL on large buffers.
google-crc32c accepts only read-only buffers that need no release (bytes), so it
is timed on bytes and, separately, with the copy to bytes it would need.

GIL check: a worker thread makes one long call (about 0.1 s); the main thread
runs a Python loop meanwhile and records its longest stall.  A stall close to
the call's duration means the call held the GIL; a stall far shorter, that it
released it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import mmap
import os
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable

Crc = Callable[[memoryview], int]
SIZES = (64, 4096, 64 << 10, 1 << 20)


def candidates() -> dict[str, tuple[Crc, str]]:
    """name -> (function over a memoryview, description)."""
    found: dict[str, tuple[Crc, str]] = {
        "zlib.crc32": (zlib.crc32, f"CRC-32, zlib {zlib.ZLIB_RUNTIME_VERSION}"),
    }
    try:
        import crc32c
    except ImportError:
        pass
    else:
        how = "hardware" if crc32c.hardware_based else "software"
        found["crc32c.crc32c"] = (
            crc32c.crc32c,
            f"CRC-32C, crc32c {importlib.metadata.version('crc32c')} ({how})",
        )

        def holding(view: memoryview, _crc: Callable[..., int] = crc32c.crc32c) -> int:
            return _crc(view, gil_release_mode=0)

        # The control for the GIL check: the same call told to keep the GIL.
        found["crc32c (GIL kept)"] = (holding, "same, gil_release_mode=0 (control)")
    try:
        import google_crc32c
    except ImportError:
        pass
    else:
        version = importlib.metadata.version("google-crc32c")
        impl = google_crc32c.implementation
        extend = google_crc32c.extend

        def on_bytes(view: memoryview, _extend: Callable[[int, bytes], int] = extend) -> int:
            return _extend(0, view.obj)  # type: ignore[arg-type]

        def with_copy(view: memoryview, _extend: Callable[[int, bytes], int] = extend) -> int:
            return _extend(0, view.tobytes())

        found["google_crc32c (bytes)"] = (on_bytes, f"CRC-32C, google-crc32c {version} ({impl})")
        found["google_crc32c (+copy)"] = (with_copy, "same, with the copy to bytes")
    return found


def buffer(name: str, size: int) -> memoryview:
    """What the flusher hands the CRC: a memoryview of an mmap (or bytes, for google)."""
    data = os.urandom(size)
    if name == "google_crc32c (bytes)":
        return memoryview(data)
    m = mmap.mmap(-1, max(size, 1))
    m[:size] = data
    return memoryview(m)[:size]


def time_one(fn: Crc, view: memoryview, run_time: float) -> float:
    """Seconds per call, over calls lasting about run_time."""
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(view)
        took = time.perf_counter() - t0
        if took >= run_time:
            return took / calls
        calls *= 2 if took < run_time / 10 else max(2, int(run_time / took) + 1)


def gil_stall(fn: Crc, name: str, per_byte: float) -> tuple[float, float]:
    """(call seconds, longest main-thread stall seconds) for one ~0.1 s call."""
    size = min(max(int(0.1 / per_byte), 1 << 20), 512 << 20) & ~7
    view = buffer(name, size)
    go = threading.Event()
    done = threading.Event()
    span = [0.0, 0.0]

    def work() -> None:
        # Started only once the main thread is in its loop, or the whole call
        # could run while the main thread is still waiting to return from start().
        go.wait()
        span[0] = time.perf_counter()
        fn(view)
        span[1] = time.perf_counter()
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    worst = 0.0
    last = time.perf_counter()
    go.set()
    while not done.is_set():
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    worker.join()
    return span[1] - span[0], worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--run-time", type=float, default=0.2, help="seconds per run")
    args = parser.parse_args(argv)
    found = candidates()
    for name, (_, what) in found.items():
        print(f"{name}: {what}")
    check = memoryview(b"123456789")
    print()
    header = f"{'candidate':24}" + "".join(f"{_label(s):>16}" for s in SIZES)
    print(header + f"{'GIL (1 call)':>26}")
    for name, (fn, _) in found.items():
        # The catalogue check values of CRC-32 and CRC-32C.
        assert fn(check) == (0xCBF43926 if name == "zlib.crc32" else 0xE3069283), name
        cells = []
        per_byte = 1.0
        for size in SIZES:
            view = buffer(name, size)
            runs = [time_one(fn, view, args.run_time) for _ in range(args.runs)]
            t = statistics.median(runs)
            per_byte = t / size
            cells.append(_cell(t, size))
        call, stall = gil_stall(fn, name, per_byte)
        gil = "released" if stall < call / 4 else "held"
        print(
            f"{name:24}"
            + "".join(f"{c:>16}" for c in cells)
            + f"{gil:>10} ({stall * 1e3:.0f}/{call * 1e3:.0f} ms)"
        )
    print("\ncells: time per call, GB/s; GIL: longest main-thread stall / call duration")
    return 0


def _label(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _cell(t: float, size: int) -> str:
    if t < 1e-6:
        when = f"{t * 1e9:.0f} ns"
    elif t < 1e-3:
        when = f"{t * 1e6:.1f} us"
    else:
        when = f"{t * 1e3:.2f} ms"
    return f"{when} {size / t / 1e9:.1f}"


if __name__ == "__main__":
    sys.exit(main())
