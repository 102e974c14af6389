"""Layer 6: logging integration: :class:`LogHandler`, and the sink it shares with
the structlog renderer (:mod:`shmflush.structlog`).

Each log call is encoded to one JSON object and appended to a ring in the calling
thread: no queue, no listener thread, no lock.  Once the call returns the record is
in shared memory, so it reaches the file even if the process dies right after.
The record schema is in docs/logging.md.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Final

from . import _layout as L
from ._api import Ring, attach
from ._errors import RingTimeoutError

__all__ = ["LogHandler"]

_orjson: Any
try:  # the fast encoder, where the [log] extra installed it
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

#: How a too-large value is cut: its text ends with this (see :func:`shrink`).
TRUNCATED_MARK: Final = "...[truncated]"
#: The field a truncated record carries: the size in bytes it had whole.
TRUNCATED_FIELD: Final = "truncated"
_ON_FULL: Final = ("block", "drop")
_MAX_DEPTH: Final = 32  # deeper nesting is repr()'d (orjson refuses past 254)


def _default(value: Any) -> Any:
    """What a value JSON cannot hold becomes: the same under both encoders."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)


# One encoder object, reused: json.dumps with options builds a new one per call.
_stdlib_encoder = json.JSONEncoder(
    ensure_ascii=True,  # always valid UTF-8 out, lone surrogates included
    allow_nan=False,  # NaN is not JSON; the fallback below writes null, as orjson does
    separators=(",", ":"),
    default=_default,
)


def encode_stdlib(doc: Any) -> bytes:
    """*doc* as compact JSON with the standard library."""
    return _stdlib_encoder.encode(doc).encode("ascii")


if _orjson is not None:
    # Datetimes and dataclasses go through _default like under stdlib json, so
    # that both encoders write the same schema.
    _ORJSON_OPTIONS: Final = (
        _orjson.OPT_NON_STR_KEYS
        | _orjson.OPT_PASSTHROUGH_DATETIME
        | _orjson.OPT_PASSTHROUGH_DATACLASS
    )
    _orjson_dumps = _orjson.dumps

    def encode_orjson(doc: Any) -> bytes:
        """*doc* as compact JSON with orjson."""
        data: bytes = _orjson_dumps(doc, default=_default, option=_ORJSON_OPTIONS)
        return data

    ENCODE: Callable[[Any], bytes] = encode_orjson
else:  # pragma: no cover - depends on the environment
    ENCODE = encode_stdlib


def jsonable(value: Any, depth: int = 0) -> Any:  # noqa: PLR0911  (one return per kind)
    """*value* made safe for either encoder: used only when encoding failed.

    Non-finite floats become None (null), dict keys that are not scalars and
    values nested deeper than 32 levels are repr()'d, ints beyond 64 bits
    become strings (orjson cannot write them), and lone surrogates are
    backslash-escaped.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if value - value == 0 else None  # inf - inf and nan - nan are nan
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if depth >= _MAX_DEPTH:
        return jsonable(repr(value))
    if isinstance(value, dict):
        return {_key(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    converted = _default(value)
    return jsonable(converted, 0 if isinstance(converted, str) else depth + 1)


def _key(key: Any) -> str:
    """A dict key as both encoders write it (scalars), or its repr()."""
    if isinstance(key, str):
        return str(jsonable(key))
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, (int, float)):
        return str(key)
    return str(jsonable(repr(key)))


def encode(doc: dict[str, Any], encoder: Callable[[Any], bytes]) -> bytes:
    """*doc* as JSON; what the encoder refuses (NaN, a circular list, a tuple key,
    a huge int) is made safe with :func:`jsonable` first."""
    try:
        return encoder(doc)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return encoder(jsonable(doc))


def shrink(doc: dict[str, Any], data: bytes, limit: int, encoder: Callable[[Any], bytes]) -> bytes:
    """Cut *doc* (encoded: *data*) until it encodes to at most *limit* bytes.

    The longest value is cut first, to a string that ends with
    :data:`TRUNCATED_MARK`; the record gains ``"truncated": <bytes it had whole>``.
    """
    whole = len(data)
    doc = {**jsonable(doc), TRUNCATED_FIELD: whole}
    while len(data) > limit:
        sizes = {k: len(encoder(v)) for k, v in doc.items() if k != TRUNCATED_FIELD}
        key = max(sizes, key=sizes.__getitem__, default=None)
        excess = len(data) - limit
        if key is None or sizes[key] <= len(TRUNCATED_MARK) + 2:
            # Only keys are left to cut (a record of a million tiny fields).
            return encoder({TRUNCATED_FIELD: whole})
        value = doc[key]
        text = value if isinstance(value, str) else encoder(value).decode("utf-8")
        # Every character is at least one byte: cutting excess + the mark + 8
        # characters saves more than the excess, unless the value is shorter
        # (then the next longest is cut on the next round).
        keep = max(0, len(text) - excess - len(TRUNCATED_MARK) - 8)
        doc[key] = text[:keep] + TRUNCATED_MARK
        data = encoder(doc)
    return data


class Sink:
    """Where encoded records go: a :class:`Ring` given as an object, or a ring
    name, attached on the first append in the process that appends.

    Pickles by name (a pickled sink re-attaches), and after ``fork()`` a sink that
    attached by name attaches afresh in the child.
    """

    def __init__(self, ring: Ring | str, *, on_full: str = "block", timeout: float | None = 5.0):
        self._given: Ring | None = None
        self._ring: Ring | None = None
        # The handle this process attached: setdefault on this dict is atomic, so
        # two threads attaching at once keep one handle and close the other.
        self._box: dict[str, Ring] = {}
        if isinstance(ring, Ring):
            self._given = self._ring = ring
            self.name = ring.name
        elif isinstance(ring, str):
            L.check_name(ring)
            self.name = ring
        else:
            raise TypeError(
                f"ring must be a shmflush.Ring or a ring name, not {type(ring).__name__}"
            )
        if on_full not in _ON_FULL:
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0
        ):
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        self.on_full = on_full
        self.timeout = timeout
        # Drop mode never waits: timeout 0 tries to rotate to a free buffer once.
        self._wait: float | None = 0 if on_full == "drop" else timeout
        _sinks.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_sink, (self.name, self.on_full, self.timeout)

    def ring(self) -> Ring:
        """The ring handle to append through, attaching it if need be."""
        ring = self._ring
        if ring is None:
            fresh = attach(self.name)
            ring = self._box.setdefault("ring", fresh)
            if ring is not fresh:
                fresh.close()
            self._ring = ring
        return ring

    def forked(self) -> None:
        # The child attaches its own handle on its first append.  (The inherited
        # one would work too, the Ring resets its slots at fork, but it would
        # stay the parent's: no settle at the child's exit.)
        if self._given is None:
            self._ring = None
            self._box = {}

    def put(self, doc: dict[str, Any], encoder: Callable[[Any], bytes]) -> None:
        """Encode *doc* and append it: a record too large for the ring is cut
        (:func:`shrink`); a full ring blocks up to the timeout or drops.

        Raises :class:`RingTimeoutError` (after counting the record as dropped)
        when blocking timed out, and what ``Ring.append`` raises otherwise.
        """
        try:  # encode(), inlined: this is every log call's path
            data = encoder(doc)
        except (TypeError, ValueError, OverflowError, RecursionError):
            data = encoder(jsonable(doc))
        ring = self._ring or self.ring()
        if len(data) > ring._max_record:
            data = shrink(doc, data, ring._max_record, encoder)
        try:
            ring.append(data, timeout=self._wait)
        except RingTimeoutError:
            ring._dropped += 1
            if self._wait != 0:
                raise

    def close(self) -> None:
        """Close the handle this sink attached (never a ring it was given)."""
        ring = self._box.pop("ring", None)
        self._ring = self._given
        if ring is not None:
            ring.close()


def _rebuild_sink(name: str, on_full: str, timeout: float | None) -> Sink:
    return Sink(name, on_full=on_full, timeout=timeout)


_sinks: weakref.WeakSet[Sink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sink in list(_sinks):
        sink.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)

# LogRecord attributes that are not `extra` fields.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",  # Python 3.12+
}
_BASE_FIELDS: Final = len(logging.makeLogRecord({}).__dict__)
_fallback_formatter = logging.Formatter()


class LogHandler(logging.Handler):
    """A :class:`logging.Handler` that appends each record to a shmflush ring as one
    JSON object, in the thread that logs: no queue and no listener thread.

    *ring* is a :class:`shmflush.Ring` or a ring name.  A name is attached on the
    first record, in the process that logs, so the handler can be configured
    before the ring exists, in a parent before ``fork()``, or pickled to a
    ``spawn`` worker (it re-attaches by name).  Use it with
    ``logging.config.dictConfig`` as ``{"()": "shmflush.LogHandler", "ring": "app"}``.

    *on_full*: what a log call does while every buffer of the ring is full.
    ``"block"`` waits up to *timeout* seconds (``None``: no limit), then counts
    the record as dropped and reports it through :meth:`handleError`;
    ``"drop"`` drops it at once and counts it.  Drops show in
    ``Ring.stats().dropped`` of the handle the handler appends through.

    *encoder*: a function from a dict to JSON bytes; default orjson where it is
    installed (``pip install shmflush[log]``), else the standard library's json.
    Both write the same schema (docs/logging.md).

    Guarantees: once a logging call returns, its record is in shared memory: it
    reaches the file even if the process then calls ``os._exit()`` or is killed
    with SIGKILL.  Records of one thread appear in the file in the order logged.
    The handler takes no lock (``Ring.append`` is thread-safe), so a child
    forked while another thread was logging never inherits a held lock.  A
    record larger than the ring's ``max_record`` is cut to fit, its longest
    fields ending in ``...[truncated]`` and a ``"truncated"`` field giving its
    whole size; any other error goes through :meth:`handleError`, as logging
    expects, and never raises into the caller.
    """

    def __init__(
        self,
        ring: Ring | str,
        level: int | str = logging.NOTSET,
        *,
        on_full: str = "block",
        timeout: float | None = 5.0,
        encoder: Callable[[Any], bytes] | None = None,
    ) -> None:
        super().__init__(level)
        self.sink = Sink(ring, on_full=on_full, timeout=timeout)
        self.encoder = ENCODE if encoder is None else encoder

    def createLock(self) -> None:  # noqa: N802  (logging's name)
        # No lock at all: nothing here needs one (Ring.append is thread-safe), and
        # a lock held by another thread at fork() would be held forever in the
        # child.  Handler.acquire() and release() skip a None lock.
        self.lock = None

    def _at_fork_reinit(self) -> None:
        pass  # no lock to reinitialise

    def handle(self, record: logging.LogRecord) -> Any:
        """Filter *record* and emit it, taking no lock (see :meth:`createLock`)."""
        if not self.filters:  # the common case: no filter loop to run
            self.emit(record)
            return True
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):  # Python 3.12+: a filter may replace it
            record = rv
        if rv:
            self.emit(record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        """Append *record* as one JSON object (see docs/logging.md for the schema)."""
        try:
            self.sink.put(self.document(record), self.encoder)
        except RecursionError:  # as logging's own handlers do
            raise
        except Exception:
            self.handleError(record)

    def document(self, record: logging.LogRecord) -> dict[str, Any]:
        """The JSON object written for *record*, as a dict."""
        # Through the instance dict: LogRecord's many attributes defeat the
        # attribute cache, and these lookups are a third of this method's time.
        fields = record.__dict__
        doc: dict[str, Any] = {
            "time": fields["created"],
            "level": fields["levelname"],
            "logger": fields["name"],
            "message": record.getMessage(),
            "pid": fields["process"],
            "thread": fields["thread"],
            "thread_name": fields["threadName"],
            "file": fields["pathname"],
            "line": fields["lineno"],
            "func": fields["funcName"],
        }
        if fields["exc_info"] or fields["exc_text"]:
            if not record.exc_text:
                # Cached on the record, as Formatter.format does, for other handlers.
                record.exc_text = (self.formatter or _fallback_formatter).formatException(
                    record.exc_info  # type: ignore[arg-type]
                )
            doc["exc_text"] = record.exc_text
        stack = fields["stack_info"]
        if stack:
            doc["stack"] = (self.formatter or _fallback_formatter).formatStack(stack)
        # Most records carry only the standard attributes: skip the set
        # difference (half a microsecond) when there cannot be an extra one.
        if len(fields) > _BASE_FIELDS:
            names = fields.keys() - _STANDARD
            if names:
                doc["extra"] = {name: fields[name] for name in sorted(names)}
        return doc

    def close(self) -> None:
        """Detach the ring handle this handler attached by name (a ring given as an
        object stays open: it is its creator's to close).  A later record attaches
        again, as a closed FileHandler reopens its file."""
        try:
            self.sink.close()
        finally:
            super().close()

    def __repr__(self) -> str:
        level = logging.getLevelName(self.level)
        return f"<shmflush.LogHandler ring={self.sink.name!r} ({level})>"
