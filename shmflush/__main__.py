"""Command line: ``python -m shmflush {demo,flusher}``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m shmflush COMMAND [ARGS]

commands:
  demo      spawn writer processes, append, verify the file, print throughput
  bench     compare shmflush with its peers (python -m shmflush bench --help)
  flusher   (internal) the flusher process that create() starts
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from ._demo import main as demo  # noqa: PLC0415  (each command imports only its own)

        return demo(rest)
    if command == "bench":
        from ._bench import main as bench  # noqa: PLC0415

        return bench(rest)
    if command == "flusher":
        from ._flusher import main as flusher  # noqa: PLC0415

        return flusher(rest)
    print(f"python -m shmflush: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
