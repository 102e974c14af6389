"""``python -m shmflush prune PATH``: apply retention to a stream's closed files.

The rules are the stream's own (``<path>.rotation``, written by ``create()``),
each overridable by an option.  Like the flusher, prune never deletes the
active file, deletes only from the oldest file on (the stream never gets a
hole), and keeps every file a named cursor in ``<path>.cursors/`` still needs,
unless ``--retention-wins``.  ``--dry-run`` lists and deletes nothing.

Output: one line per closed file, ``delete``/``keep``, its size and name, and
for a file kept for a cursor, the cursors that need it.  Exit status 0, or 2
for bad arguments (no rule at all included).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import _files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shmflush prune",
        description="delete a stream's oldest closed files by its retention rules",
    )
    parser.add_argument("path", help="the path create() was given")
    parser.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    parser.add_argument("--retain-files", type=int, metavar="N", help="keep at most N files")
    parser.add_argument("--retain-bytes", type=int, metavar="B", help="keep at most B bytes")
    parser.add_argument("--retain-age", type=float, metavar="S", help="closed at most S s ago")
    parser.add_argument(
        "--retention-wins",
        action="store_true",
        help="delete files that cursors still need too (their followers lose records)",
    )
    args = parser.parse_args(argv)
    settings = _files.load_settings(args.path)
    overrides = {
        "retain_files": args.retain_files,
        "retain_bytes": args.retain_bytes,
        "retain_age": args.retain_age,
    }
    settings = dataclasses.replace(
        settings,
        **{k: v for k, v in overrides.items() if v is not None},
        retention_wins=settings.retention_wins or args.retention_wins,
    )
    if not settings.retains:
        parser.error(
            f"no retention rule: {args.path}{_files.SETTINGS_SUFFIX} names none; give "
            "--retain-files, --retain-bytes or --retain-age"
        )
    if not _files.list_files(args.path):
        print(f"prune: {args.path}: no such stream", file=sys.stderr)
        return 1

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    verdicts = _files.apply(args.path, settings, dry_run=args.dry_run, warn=warn)
    verb = "would delete" if args.dry_run else "delete"
    for v in verdicts:
        what = verb if v.delete else "keep"
        needed = f"  (needed by cursor {', '.join(v.needed_by)})" if v.needed_by else ""
        print(f"{what:12} {v.size:>12} {v.name}{needed}")
    deleted = sum(v.delete for v in verdicts)
    if args.dry_run:
        print(f"{deleted} of {len(verdicts)} closed file(s) would be deleted (dry run)")
    else:
        print(f"{deleted} of {len(verdicts)} closed file(s) deleted")
    return 0
