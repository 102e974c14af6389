"""``python -m shmflush cat``: print a file's records, optionally following it.

Output formats (``-o``), one record per line except ``raw``:

* ``text`` (default): a LogHandler record (a JSON object with ``time``,
  ``level``, ``logger`` and ``message``) as ``TIME LEVEL LOGGER MESSAGE``
  (UTC, ISO 8601, milliseconds), its traceback on the lines after; any other
  payload decoded as UTF-8 with replacement characters, newlines kept.
* ``json``: a payload that is one compact JSON object (what LogHandler
  writes) exactly as written, with no decode or re-encode; any other payload
  as ``{"offset": N, "text": "..."}`` if it is UTF-8, else
  ``{"offset": N, "payload_b64": "..."}``.
* ``raw``: the payloads as written, back to back, nothing added.

Exit status, as ``verify``'s: 0 for a clean file, 1 if damage was skipped
(reported on stderr), 2 for an error (unreadable file, bad arguments, a
cursor of another stream).  Torn or damaged segments are never printed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from ._errors import ShmflushError
from ._follow import Follower, follow
from ._format import (
    KIND_DATA,
    RECORD_HEADER,
    RECORD_KINDS,
    RECORD_MARK,
    SEGMENT_HEADER_SIZE,
    segment_size,
)
from ._reader import _WHOLE_SEGMENT_LIMIT, Damage

PROG = "python -m shmflush cat"
EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_ERROR = 2
# How often a following cat commits its cursor (it always does at exit).
_COMMIT_EVERY = 1.0

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is an optional extra
    _loads = json.loads


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Print the records of a shmflush file (journalctl/kcat style)."
    )
    parser.add_argument("path", help="the file that create() was given")
    parser.add_argument("-o", "--output", choices=("text", "json", "raw"), default="text")
    parser.add_argument(
        "-f", "--follow", action="store_true", help="wait for more while a ring writes the file"
    )
    parser.add_argument(
        "--from",
        dest="start",
        default=None,
        metavar="beginning|end|-N|TIME",
        help="where to start: the beginning (default), the end, the last N records, or "
        "an ISO 8601 time or @SECONDS (records of segments sealed at or after it)",
    )
    parser.add_argument("-n", "--lines", type=int, metavar="N", help="the last N records")
    parser.add_argument(
        "--cursor", metavar="NAME", help="resume after the cursor NAME and store it at exit"
    )
    parser.add_argument("--cursor-dir", metavar="DIR", help="where cursors live")
    parser.add_argument(
        "--show-cursor", action="store_true", help="print the final position on stderr"
    )
    parser.add_argument("--grep", metavar="RE", help="only records whose text matches RE")
    parser.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only JSON records whose KEY (dots for nested keys) equals VALUE; repeatable",
    )
    return parser


def _start(args: argparse.Namespace) -> str | int | _dt.datetime:
    text: str | None
    if args.lines is not None:
        if args.lines < 1:
            raise ValueError(f"-n must be at least 1, got {args.lines}")
        return -int(args.lines)
    text = args.start
    if text is None or text == "beginning":
        return "beginning"
    if text == "end":
        return "end"
    if re.fullmatch(r"-\d+", text) and int(text) < 0:
        return int(text)
    if text.startswith("@"):
        return _dt.datetime.fromtimestamp(float(text[1:]), _dt.UTC)
    try:
        return _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--from takes beginning, end, -N, an ISO 8601 time or @SECONDS, not {text!r}"
        ) from None


def _iso(seconds: float) -> str:
    try:
        when = _dt.datetime.fromtimestamp(seconds, _dt.UTC)
    except (OverflowError, OSError, ValueError):
        return repr(seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _as_log_line(fields: Any) -> str | None:
    """A LogHandler record as one text line (plus traceback lines); None if
    ``fields`` is not one."""
    if not isinstance(fields, dict) or "message" not in fields or "level" not in fields:
        return None
    stamp = fields.get("time")
    when = _iso(stamp) if isinstance(stamp, (int, float)) else str(stamp)
    line = f"{when} {fields.get('level')} {fields.get('logger')} {fields.get('message')}"
    for extra in ("exc_text", "stack"):
        if isinstance(fields.get(extra), str):
            line += "\n" + fields[extra]
    return line


def _parse_json(payload: bytes) -> Any:
    try:
        return _loads(payload)
    except (ValueError, RecursionError):
        return None


def _text(payload: bytes) -> bytes:
    if payload[:1] == b"{":
        line = _as_log_line(_parse_json(payload))
        if line is not None:
            return line.encode("utf-8", "replace") + b"\n"
    return payload.decode("utf-8", "replace").encode() + b"\n"


def _is_json_line(payload: bytes) -> bool:
    # One compact JSON object: what LogHandler writes.  A newline inside
    # would break "one object per line"; the parse rejects anything else.
    return (
        payload[:1] == b"{"
        and payload[-1:] == b"}"
        and b"\n" not in payload
        and _parse_json(payload) is not None
    )


def _json(payload: bytes, offset: int) -> bytes:
    if _is_json_line(payload):
        return payload + b"\n"
    try:
        fields: dict[str, Any] = {"offset": offset, "text": payload.decode("utf-8")}
    except UnicodeDecodeError:
        fields = {"offset": offset, "payload_b64": base64.b64encode(payload).decode()}
    return json.dumps(fields).encode() + b"\n"


def _lookup(fields: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(fields, dict) or part not in fields:
            return _MISSING
        fields = fields[part]
    return fields


_MISSING = object()


def _matcher(grep: str | None, matches: list[str]) -> Callable[[bytes], bool] | None:
    if grep is None and not matches:
        return None
    pattern = None if grep is None else re.compile(grep.encode("utf-8"))
    pairs = []
    for item in matches:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--match takes KEY=VALUE, not {item!r}")
        pairs.append((key, value))

    def keep(payload: bytes) -> bool:
        if pattern is not None and pattern.search(payload) is None:
            return False
        if pairs:
            fields = _parse_json(payload) if payload[:1] == b"{" else None
            for key, value in pairs:
                found = _lookup(fields, key)
                if found is _MISSING:
                    return False
                shown = found if isinstance(found, str) else json.dumps(found)
                if shown != value:
                    return False
        return True

    return keep


def _run(args: argparse.Namespace, out: BinaryIO) -> int:
    start = _start(args)
    keep = _matcher(args.grep, args.match)
    records = follow(
        args.path,
        args.cursor,
        start=start,
        cursor_dir=args.cursor_dir,
        wait=args.follow,
        strict=False,
    )
    try:
        with records:
            if keep is None and args.output == "json":
                _json_batches(args, records, out)
            else:
                _one_by_one(args, records, out, keep)
            out.flush()
            _finish(args, records)
    except KeyboardInterrupt:
        out.flush()
        _finish(args, records)
    for damage in records.damaged:
        kind = "torn write" if damage.torn else "damage"
        print(
            f"{PROG}: {args.path}: {kind} at bytes [{damage.start}, {damage.end}): "
            f"{damage.reason}; records there were skipped",
            file=sys.stderr,
        )
    return EXIT_DAMAGED if records.damaged else EXIT_OK


def _one_by_one(
    args: argparse.Namespace,
    records: Follower,
    out: BinaryIO,
    keep: Callable[[bytes], bool] | None,
) -> None:
    write = out.write
    output = args.output
    committed = time.monotonic()
    for record in records:
        payload = record.payload
        if keep is not None and not keep(payload):
            continue
        if output == "json":
            write(_json(payload, record.offset))
        elif output == "raw":
            write(payload)
        else:
            write(_text(payload))
        if args.follow and args.cursor and time.monotonic() - committed > _COMMIT_EVERY:
            out.flush()
            records.commit()
            committed = time.monotonic()


def _json_batches(args: argparse.Namespace, records: Follower, out: BinaryIO) -> None:
    """``-o json`` without filters, a segment at a time: each record's bytes go
    out as written (LogHandler records are JSON already), one write per
    segment, and no Record object per record."""
    committed = time.monotonic()
    unpack = RECORD_HEADER.unpack_from
    loads = _loads
    for segment, header, skip, scan in records._batches(defer_walk=True):
        used = header.used
        if SEGMENT_HEADER_SIZE + used > _WHOLE_SEGMENT_LIMIT:
            lines = [
                _json(bytes(payload), segment + SEGMENT_HEADER_SIZE + pos)
                for pos, kind, payload in scan.spans(segment, used)
                if kind == KIND_DATA and pos >= skip
            ]
        else:
            body = scan._get(segment + SEGMENT_HEADER_SIZE, used).tobytes()
            lines = []
            append = lines.append
            pos = 0
            # The payload CRC matched, but the record walk is done here, once,
            # checking each header as it goes (scan.defer_walk): a segment that
            # does not parse prints nothing and counts as damage.
            while pos < used:
                length, kind, mark = unpack(body, pos)
                end = pos + 8 + length
                if mark != RECORD_MARK or kind not in RECORD_KINDS or end > used:
                    if not (length or kind or mark):  # a padding word
                        pos += 8
                        continue
                    lines = []
                    records.damaged.append(
                        Damage(segment, segment + segment_size(used), "malformed record area")
                    )
                    break
                if kind == KIND_DATA and pos >= skip:
                    payload = body[pos + 8 : end]
                    # One compact JSON object, checked by a parse: passed through.
                    if body[pos + 8] == 0x7B and body[end - 1] == 0x7D and b"\n" not in payload:
                        try:
                            loads(payload)
                        except ValueError:
                            payload = _json(payload, segment + SEGMENT_HEADER_SIZE + pos)[:-1]
                    else:
                        payload = _json(payload, segment + SEGMENT_HEADER_SIZE + pos)[:-1]
                    append(payload)
                pos = end + (-length & 7)
        if lines:
            lines.append(b"")
            out.write(b"\n".join(lines))
        # The position moves past this segment at the next step; commit here
        # would store the one before it, so commit after asking for the next.
        if args.follow and args.cursor and time.monotonic() - committed > _COMMIT_EVERY:
            out.flush()
            records._at = (segment + segment_size(used), 0)
            records.commit()
            committed = time.monotonic()
    # Past the last segment printed.


def _finish(args: argparse.Namespace, records: Follower) -> None:
    # Only after the output is flushed: the cursor never runs ahead of what
    # was printed (at least once).
    if args.cursor:
        records.commit()
    if args.show_cursor and records.position is not None:
        print(f"-- cursor: {records.position.token()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``cat`` with command-line arguments *argv*; return the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    # A closed pipe (cat ... | head) ends the output quietly, as cat(1) does.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return _run(args, sys.stdout.buffer)
    except (OSError, ShmflushError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_ERROR
