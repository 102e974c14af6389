"""shmflush.LogHandler (shmflush/_logging.py) and the structlog renderer."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import logging.config
import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmflush
from shmflush import _logging

JOIN_S = 60.0
# orjson is in the test extra; without it only the stdlib encoder is tested.
ENCODERS = [_logging.encode_stdlib, *filter(None, [getattr(_logging, "encode_orjson", None)])]
SCHEMA = {"time", "level", "logger", "message", "pid", "thread", "thread_name", "file", "line"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in shmflush.read(path)]


@contextlib.contextmanager
def _logger(handler: logging.Handler, name: str = "test.shmflush") -> Iterator[logging.Logger]:
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


class _Recording(shmflush.LogHandler):
    """A LogHandler that keeps the exceptions handleError() got."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[BaseException] = []

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        import sys

        error = sys.exc_info()[1]
        assert error is not None
        self.errors.append(error)


# -- configuration and schema ------------------------------------------------------------


def test_dictconfig_with_a_ring_name_writes_json_records(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    with shmflush.create(ring_name, path):
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"ring": {"()": "shmflush.LogHandler", "ring": ring_name}},
                "loggers": {"svc": {"handlers": ["ring"], "level": "INFO", "propagate": False}},
            }
        )
        try:
            logging.getLogger("svc").info("user %s logged in", "ada")
            logging.getLogger("svc").debug("below the level: not written")
        finally:
            logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    (doc,) = _documents(path)
    assert doc.keys() >= SCHEMA
    assert doc["message"] == "user ada logged in"
    assert doc["level"] == "INFO"
    assert doc["logger"] == "svc"
    assert doc["pid"] == os.getpid()
    assert doc["thread"] == threading.get_ident()
    assert doc["func"] == "test_dictconfig_with_a_ring_name_writes_json_records"
    assert abs(doc["time"] - time.time()) < 600
    assert "exc_text" not in doc
    assert "extra" not in doc


def test_a_ring_object_is_used_as_given_and_left_open(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    with shmflush.create(ring_name, path) as ring:
        with _logger(shmflush.LogHandler(ring)) as logger:
            logger.warning("through the owner's handle")
        assert not ring.closed  # the handler's close() leaves a given ring alone
        assert ring.stats().records == 1
    assert [d["message"] for d in _documents(path)] == ["through the owner's handle"]


def test_the_handler_takes_no_lock(ring_name: str, tmp_path: Path) -> None:
    with shmflush.create(ring_name, tmp_path / "f"):
        handler = shmflush.LogHandler(ring_name)
        assert handler.lock is None
        handler.acquire()  # logging.shutdown() calls these: harmless without a lock
        handler.release()
        handler.close()


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(TypeError, match="ring must be"):
        shmflush.LogHandler(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_full"):
        shmflush.LogHandler("app", on_full="wait")
    with pytest.raises(ValueError, match="timeout"):
        shmflush.LogHandler("app", timeout=-1)


def test_a_ring_that_does_not_exist_goes_through_handle_error(ring_name: str) -> None:
    handler = _Recording(ring_name)
    with _logger(handler) as logger:
        logger.error("nowhere to go")  # must not raise into the caller
    assert len(handler.errors) == 1
    assert isinstance(handler.errors[0], shmflush.RingNotFoundError)


def test_exception_text_and_stack_are_in_the_record(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    with shmflush.create(ring_name, path), _logger(shmflush.LogHandler(ring_name)) as logger:
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            logger.exception("division failed")
        logger.info("where am I", stack_info=True)
    failed, stacked = _documents(path)
    assert failed["message"] == "division failed"
    assert failed["exc_text"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in failed["exc_text"]
    assert "exc_text" not in stacked
    assert stacked["stack"].startswith("Stack (most recent call last):")


@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda e: e.__name__)
def test_extra_fields_are_written_and_unsafe_ones_made_json(
    ring_name: str, tmp_path: Path, encoder: Any
) -> None:
    path = tmp_path / "f"
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC)
    ident = uuid.UUID(int=7)
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    extra = {
        "user": "ada",
        "count": 3,
        "ratio": 0.5,
        "tags": ("a", "b"),
        "nested": {"k": [1, None, True]},
        "when": when,
        "ident": ident,
        "blob": b"\x00\xff",
        "thing": object.__new__(_Opaque),
        "nan": float("nan"),
        "huge": 1 << 80,
        "tuple_keys": {(1, 2): "x"},
        "cyclic": cyclic,
    }
    handler = shmflush.LogHandler(ring_name, encoder=encoder)
    with shmflush.create(ring_name, path), _logger(handler) as logger:
        logger.info("with extras", extra=extra)
    (doc,) = _documents(path)
    got = doc["extra"]
    assert set(got) == set(extra)
    assert got["user"] == "ada"
    assert got["count"] == 3
    assert got["ratio"] == 0.5
    assert got["tags"] == ["a", "b"]
    assert got["nested"] == {"k": [1, None, True]}
    assert got["when"] == "2024-05-06T07:08:09.123456+00:00"
    assert got["ident"] == str(ident)
    assert got["blob"] == repr(b"\x00\xff")
    assert got["thing"] == "<opaque>"
    assert got["nan"] is None
    assert got["huge"] == str(1 << 80)
    assert got["tuple_keys"] == {"(1, 2)": "x"}
    assert isinstance(got["cyclic"], list)  # cut at a bounded depth, not a crash


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def test_both_encoders_write_the_same_document() -> None:
    pytest.importorskip("orjson")
    handler = logging.Handler()
    record = logging.getLogger("x").makeRecord(
        "x",
        logging.INFO,
        "/a.py",
        1,
        "m %s",
        ("a",),
        None,
        extra={"when": datetime.date(2024, 1, 2)},
    )
    doc = shmflush.LogHandler.document(handler, record)  # type: ignore[arg-type]
    stdlib, fast = (json.loads(_logging.encode(doc, e)) for e in ENCODERS)
    assert stdlib == fast
    assert stdlib["extra"] == {"when": "2024-01-02"}


def test_a_record_too_large_for_the_ring_is_truncated_with_a_marker(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "f"
    handler = _Recording(ring_name)
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=2) as ring:
        limit = ring.max_record
        with _logger(handler) as logger:
            logger.info("x" * (3 * limit), extra={"user": "ada"})
            logger.info("small")
    assert handler.errors == []
    big, small = shmflush.read(path)
    assert len(big) <= limit
    doc = json.loads(big)
    assert doc["truncated"] > 3 * limit
    assert doc["message"].endswith(_logging.TRUNCATED_MARK)
    assert doc["message"].startswith("xxxx")
    assert doc["extra"] == {"user": "ada"}  # the short fields are kept whole
    assert json.loads(small)["message"] == "small"


# -- threads, processes --------------------------------------------------------------------


def test_threads_each_keep_their_order(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    threads, each = 4, 300
    with shmflush.create(ring_name, path), _logger(shmflush.LogHandler(ring_name)) as logger:

        def work(t: int) -> None:
            for k in range(each):
                logger.info("t%d k%d", t, k, extra={"t": t, "k": k})

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(JOIN_S)
            assert not w.is_alive()
    seen: dict[int, list[int]] = {}
    for doc in _documents(path):
        seen.setdefault(doc["extra"]["t"], []).append(doc["extra"]["k"])
    assert seen == {t: list(range(each)) for t in range(threads)}


_worker_handler: logging.Handler | None = None


def _pool_init(handler: logging.Handler | None) -> None:
    global _worker_handler
    if handler is not None:  # spawn: the handler came pickled, by ring name
        _worker_handler = handler
    logger = logging.getLogger("test.pool")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if _worker_handler not in logger.handlers:
        assert _worker_handler is not None
        logger.addHandler(_worker_handler)


def _pool_task(task: int) -> tuple[int, bool]:
    assert isinstance(_worker_handler, shmflush.LogHandler)
    attached_before = _worker_handler.sink._ring is not None
    for k in range(50):
        logging.getLogger("test.pool").info("task %d record %d", task, k, extra={"task": task})
    return os.getpid(), attached_before


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_log_through_a_handler_made_in_the_parent(
    ring_name: str, tmp_path: Path, method: str
) -> None:
    global _worker_handler
    path = tmp_path / "f"
    tasks = 8
    ctx = multiprocessing.get_context(method)
    with shmflush.create(ring_name, path):
        handler = shmflush.LogHandler(ring_name)
        _worker_handler = handler
        try:
            with _logger(handler, "test.pool") as logger:
                logger.info("parent, before the pool")  # attaches here first
                assert handler.sink._ring is not None
                with ctx.Pool(2, _pool_init, (None if method == "fork" else handler,)) as pool:
                    results = pool.map(_pool_task, range(tasks), chunksize=1)
                    pool.close()
                    pool.join()
        finally:
            _worker_handler = None
    docs = _documents(path)
    assert docs[0]["message"] == "parent, before the pool"
    counts: dict[int, int] = {}
    for doc in docs[1:]:
        assert doc["pid"] != os.getpid()
        counts[doc["extra"]["task"]] = counts.get(doc["extra"]["task"], 0) + 1
    assert counts == dict.fromkeys(range(tasks), 50)
    assert {pid for pid, _ in results} == {d["pid"] for d in docs[1:]}
    # A worker's first task finds the handler unattached: the fork hook dropped
    # the parent's handle (spawn: the handler was unpickled by name).
    first = {}
    for pid, attached in results:
        first.setdefault(pid, attached)
    assert not any(first.values())


def test_a_pickled_handler_reattaches_by_name(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    with shmflush.create(ring_name, path) as ring:
        handler = shmflush.LogHandler(ring, level=logging.WARNING, on_full="drop", timeout=1.0)
        copy = pickle.loads(pickle.dumps(handler))
        assert copy.sink._ring is None
        assert (copy.sink.name, copy.sink.on_full, copy.level) == (
            ring_name,
            "drop",
            logging.WARNING,
        )
        with _logger(copy) as logger:
            logger.warning("from the copy")
            assert copy.sink._ring is not ring  # its own handle
    assert [d["message"] for d in _documents(path)] == ["from the copy"]


def _log_then_exit(name: str, count: int) -> None:
    logger = logging.getLogger("test.exit")
    logger.propagate = False
    logger.addHandler(shmflush.LogHandler(name))
    for k in range(count):
        logger.warning("record %d", k)
    os._exit(0)  # no atexit, no logging.shutdown(), no close(): nothing flushed


def _log_then_wait(name: str, count: int, logged: Any) -> None:
    logger = logging.getLogger("test.kill")
    logger.propagate = False
    logger.addHandler(shmflush.LogHandler(name))
    for k in range(count):
        logger.warning("record %d", k)
    logged.set()
    time.sleep(JOIN_S)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_records_survive_the_producers_os_exit(ring_name: str, tmp_path: Path, method: str) -> None:
    path = tmp_path / "f"
    ctx = multiprocessing.get_context(method)
    with shmflush.create(ring_name, path):
        child = ctx.Process(target=_log_then_exit, args=(ring_name, 500))
        child.start()
        child.join(JOIN_S)
        assert child.exitcode == 0
    assert [d["message"] for d in _documents(path)] == [f"record {k}" for k in range(500)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_records_survive_the_producers_sigkill(ring_name: str, tmp_path: Path, method: str) -> None:
    path = tmp_path / "f"
    ctx = multiprocessing.get_context(method)
    with shmflush.create(ring_name, path, recovery_timeout=0.05):
        logged = ctx.Event()
        child = ctx.Process(target=_log_then_wait, args=(ring_name, 500, logged))
        child.start()
        try:
            assert logged.wait(JOIN_S)
            os.kill(child.pid or 0, signal.SIGKILL)  # right after its last log call returned
            child.join(JOIN_S)
            assert child.exitcode == -signal.SIGKILL
        finally:
            if child.is_alive():
                child.kill()
                child.join(JOIN_S)
    assert [d["message"] for d in _documents(path)] == [f"record {k}" for k in range(500)]


# -- a full ring ---------------------------------------------------------------------------


@contextlib.contextmanager
def _stopped_flusher(ring: shmflush.Ring) -> Iterator[int]:
    pid = ring.stats().flusher_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_drop_mode_counts_drops_in_stats_and_keeps_the_rest(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    total = 400
    handler = _Recording(ring_name, on_full="drop")
    with (
        shmflush.create(ring_name, path, buffer_size=8192, buffers=2, lanes=1) as ring,
        _logger(handler) as logger,
    ):
        with _stopped_flusher(ring):
            started = time.monotonic()
            for k in range(total):
                logger.info("record %d", k, extra={"k": k})
            assert time.monotonic() - started < 30  # never blocked
            stats = handler.sink.ring().stats()
        assert stats.dropped > 0
        assert handler.errors == []  # drops are counted, not reported
        kept = total - stats.dropped
    ks = [d["extra"]["k"] for d in _documents(path)]
    assert len(ks) == kept
    assert ks == sorted(ks)
    assert ks[0] == 0  # the first records fit


def test_block_mode_waits_then_counts_and_reports_a_timeout(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    handler = _Recording(ring_name, on_full="block", timeout=0.2)
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=2, lanes=1) as ring:
        with _logger(handler) as logger, _stopped_flusher(ring):
            for k in range(200):
                logger.info("record %d %s", k, "y" * 200)
                if handler.errors:
                    break
            stats = handler.sink.ring().stats()
        assert len(handler.errors) == 1
        assert isinstance(handler.errors[0], shmflush.RingTimeoutError)
        assert stats.dropped == 1
    assert len(_documents(path)) == k  # every record before the timed-out one


def test_block_mode_resumes_when_the_flusher_does(ring_name: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    handler = _Recording(ring_name, on_full="block", timeout=JOIN_S)
    total = 200
    with (
        shmflush.create(ring_name, path, buffer_size=8192, buffers=2, lanes=1) as ring,
        _logger(handler) as logger,
        _stopped_flusher(ring) as pid,
    ):
        resume = threading.Timer(0.3, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            for k in range(total):
                logger.info("record %d %s", k, "y" * 200)
        finally:
            resume.cancel()
            resume.join(JOIN_S)
        stats = handler.sink.ring().stats()
    assert handler.errors == []
    assert stats.dropped == 0
    assert stats.waits > 0  # it did block
    assert len(_documents(path)) == total


# -- structlog -------------------------------------------------------------------------------


def test_structlog_renderer_appends_the_event_dict_unformatted(
    ring_name: str, tmp_path: Path
) -> None:
    structlog = pytest.importorskip("structlog")
    from shmflush.structlog import RingRenderer

    path = tmp_path / "f"
    called: list[Any] = []

    class Wrapped:
        def msg(self, *args: Any, **kwargs: Any) -> None:
            called.append((args, kwargs))

        info = error = msg

    renderer = RingRenderer(ring_name)
    with shmflush.create(ring_name, path):
        logger = structlog.wrap_logger(
            Wrapped(),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
        logger.info("user logged in", user="ada", attempts=2, roles=["ops"], thing=_Opaque())
        try:
            _ = {}["missing"]
        except KeyError:
            logger.error("lookup failed", exc_info=True)
        renderer.close()
    assert called == []  # DropEvent: the wrapped logger never sees the event
    first, second = _documents(path)
    assert first == {
        "event": "user logged in",
        "user": "ada",
        "attempts": 2,
        "roles": ["ops"],
        "thing": "<opaque>",
        "level": "info",
    }
    assert second["level"] == "error"
    assert "KeyError: 'missing'" in second["exception"]


def test_structlog_renderer_pickles_by_name(ring_name: str) -> None:
    pytest.importorskip("structlog")
    from shmflush.structlog import RingRenderer

    copy = pickle.loads(pickle.dumps(RingRenderer(ring_name, on_full="drop")))
    assert (copy.sink.name, copy.sink.on_full, copy.sink._ring) == (ring_name, "drop", None)
