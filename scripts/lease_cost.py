"""Measure what dead-writer recovery's lease bookkeeping costs on the append path.

``Ring.append`` stores the claim's *intent* in the writer's lease slot before its
fetch-and-add and clears it after the commit (see docs/design.md).  This script
times the real method against a copy of it with exactly those two stores removed
(an AST transformation of the method's source, so nothing else differs), in one
process, interleaved, several repetitions, and prints medians and their ratio.

    python scripts/lease_cost.py [--records 200000] [--reps 7] [--size 100]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import statistics
import tempfile
import textwrap
import time
from typing import Any

import shmflush
from shmflush import _api


class _DropIntentStores(ast.NodeTransformer):
    """Remove ``words[slot.intent_w] = ...`` assignments."""

    removed = 0

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        target = node.targets[0]
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.slice, ast.Attribute)
            and target.slice.attr == "intent_w"
        ):
            self.removed += 1
            return None
        return node


def _append_without_intents() -> Any:
    source = textwrap.dedent(inspect.getsource(_api.Ring.append))
    tree = ast.parse(source)
    dropper = _DropIntentStores()
    tree = dropper.visit(tree)
    if dropper.removed != 2:
        raise SystemExit(f"expected to remove 2 intent stores, removed {dropper.removed}")
    namespace: dict[str, Any] = {}
    exec(
        compile(ast.fix_missing_locations(tree), "<append without intents>", "exec"),
        vars(_api),
        namespace,
    )
    return namespace["append"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    plain = _append_without_intents()
    record = b"x" * args.size
    times: dict[str, list[float]] = {"with leases": [], "without": []}
    with tempfile.TemporaryDirectory(dir=".") as d:
        path = os.path.join(d, "lease.log")
        # Large ring, sync none: the appends never wait, so only the path is timed.
        with shmflush.create(
            f"lease-cost-{os.getpid()}", path, buffer_size=1 << 20, buffers=64, sync="none"
        ) as ring:
            variants = {"with leases": ring.append, "without": plain.__get__(ring)}
            for _ in range(args.reps):
                for name, append in variants.items():
                    start = time.perf_counter()
                    for _ in range(args.records):
                        append(record)
                    times[name].append((time.perf_counter() - start) / args.records)
                    ring.sync(timeout=60)
    with_ns = statistics.median(times["with leases"]) * 1e9
    without_ns = statistics.median(times["without"]) * 1e9
    print(f"append of {args.size} B, {args.records} records x {args.reps} reps, medians:")
    for name, values in times.items():
        ns = [v * 1e9 for v in values]
        print(
            f"  {name:12} {statistics.median(ns):7.0f} ns  (min {min(ns):.0f}, max {max(ns):.0f})"
        )
    print(f"  ratio with/without: {with_ns / without_ns:.3f}  (+{with_ns - without_ns:.0f} ns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
