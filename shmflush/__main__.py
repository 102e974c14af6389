"""Command line: ``python -m shmflush {cat,top,prune,demo,bench,verify,cleanup,flusher}``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

USAGE = """usage: python -m shmflush COMMAND [ARGS]

commands:
  cat       print a file's records (text, json or raw), -f to follow, with cursors
  top       live view of a running ring: rates, buffers, flusher lag, drops
  prune     delete a rotated stream's oldest files by its retention rules
  demo      spawn writer processes, append, verify the file, print throughput
  bench     compare shmflush with its peers (python -m shmflush bench --help)
  verify    check a file written by shmflush and report damaged stretches
  cleanup   drain and remove rings whose owner and flusher are both dead
  flusher   (internal) the flusher process that create() starts
"""


COMMANDS = {
    "cat": "._cat",
    "top": "._top",
    "prune": "._prune",
    "demo": "._tools.demo",
    "bench": "._tools.bench",
    "verify": "._verify",
    "cleanup": "._cleanup",
    "flusher": "._flusher",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    module = COMMANDS.get(command)
    if module is None:
        print(
            f"python -m shmflush: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr
        )
        return 2
    # Each command imports only its own module: the flusher starts fast, and the
    # demo or bench pull in what they need.
    run: Callable[[list[str]], int] = importlib.import_module(module, __package__).main
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
