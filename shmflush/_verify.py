"""Command line: ``python -m shmflush verify FILE``.

Scans a shmflush file the way a tolerant reader does (``read(path,
strict=False)``, see ``docs/format.md`` section 6) and reports what it holds:
valid segments, DATA records and their payload bytes, ABANDONED records, and
every damaged stretch with its byte range and the reason its first segment was
rejected.

Exit status: 0 when the file has no damage, 1 when it has some, 2 on a usage
error or when the file cannot be read (missing, not a regular file, I/O error,
changed while being read, written in an earlier format version).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import _files
from ._errors import CorruptFileError, UnsupportedFormatError
from ._reader import Damage, read

PROG = "python -m shmflush verify"

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_ERROR = 2


@dataclass
class Report:
    """What one scan of a file found."""

    path: str
    size: int = 0
    segments: int = 0
    records: int = 0
    payload_bytes: int = 0
    abandoned: int = 0
    damaged: list[Damage] = field(default_factory=list)

    @property
    def damaged_bytes(self) -> int:
        return sum(d.end - d.start for d in self.damaged)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "size": self.size,
            "segments": self.segments,
            "records": self.records,
            "payload_bytes": self.payload_bytes,
            "abandoned": self.abandoned,
            "damaged_bytes": self.damaged_bytes,
            "damaged": [{"start": d.start, "end": d.end, "reason": d.reason} for d in self.damaged],
        }

    def summary(self) -> str:
        counts = (
            f"{self.segments} segments, {self.records} records "
            f"({self.payload_bytes} payload bytes), {self.abandoned} abandoned, "
            f"{self.size} bytes"
        )
        if self.ok:
            return f"OK {self.path}: {counts}"
        stretches = "stretch" if len(self.damaged) == 1 else "stretches"
        return (
            f"DAMAGED {self.path}: {len(self.damaged)} damaged {stretches} "
            f"({self.damaged_bytes} bytes); {counts}"
        )


def scan(path: str) -> Report:
    """Read every record of *path* tolerantly and count what was found.

    Raises :class:`OSError` if the file cannot be opened or read, and
    :class:`~shmflush.CorruptFileError` only if the file changed under the scan
    (damage as such is reported, not raised), or its subclass
    :class:`~shmflush.UnsupportedFormatError` for a file of an earlier format
    version.
    """
    # A rotated stream: its active file stands for it (retention may have taken `path`).
    st = os.stat(_files.active_file(os.fspath(path))[1])
    # A FIFO or device would block or never end; a directory reads as EISDIR later.
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path}: not a regular file")
    report = Report(path)
    with read(path, strict=False) as reader:
        for payload in reader:
            report.payload_bytes += len(payload)
        # The size the reader scanned, fixed when it opened the file.
        report.size = reader._size
        report.segments = reader.segments
        report.records = reader.records
        report.abandoned = reader.abandoned
        report.damaged = list(reader.damaged)
    return report


def _print_report(report: Report, out: TextIO) -> None:
    print(f"file:      {report.path}", file=out)
    print(f"size:      {report.size} bytes", file=out)
    print(f"segments:  {report.segments}", file=out)
    print(f"records:   {report.records} ({report.payload_bytes} payload bytes)", file=out)
    print(f"abandoned: {report.abandoned}", file=out)
    for d in report.damaged:
        print(
            f"damaged:   [{d.start}, {d.end}) ({d.end - d.start} bytes): {d.reason}",
            file=out,
        )
    print(report.summary(), file=out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a shmflush file: count its segments and records and list every "
        "damaged stretch (torn write, zeroed hole, bit rot) with its byte offsets. "
        "Exit status 0: no damage; 1: damage found; 2: usage or I/O error.",
    )
    parser.add_argument("file", help="the file to check")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", "-q", action="store_true", help="print only the summary line")
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: path, ok, size, segments, records, payload_bytes, "
        "abandoned, damaged_bytes and damaged (a list of {start, end, reason}); on an "
        "error, path, ok (false) and error",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``verify`` with command-line arguments *argv*; return the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2, message printed).
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    path: str = args.file
    try:
        report = scan(path)
    except (OSError, CorruptFileError) as exc:
        if isinstance(exc, UnsupportedFormatError):
            message = str(exc)
        elif isinstance(exc, CorruptFileError):
            message = f"{path}: {exc.reason} at byte offset {exc.offset}; run verify again"
        elif exc.strerror:
            message = f"cannot read {path}: {exc.strerror}"
        else:
            message = str(exc)
        print(f"{PROG}: {message}", file=sys.stderr)
        if args.json:
            json.dump({"path": path, "ok": False, "error": message}, sys.stdout)
            print()
        return EXIT_ERROR
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        print()
    elif args.quiet:
        print(report.summary())
    else:
        _print_report(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_DAMAGED


if __name__ == "__main__":
    sys.exit(main())
