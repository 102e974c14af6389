"""Encode typical log records with stdlib json and with orjson: which should
shmflush.LogHandler use?  Prints ns per record (CPU time), median of 5 runs.

    python scripts/log_encoding.py
"""

from __future__ import annotations

import logging
import statistics
import time
import timeit

from shmflush import _logging

RUNS = 5
CALLS = 20_000


def _records() -> dict[str, logging.LogRecord]:
    logger = logging.getLogger("svc.auth")
    args = ("ada", "10.0.0.7")
    where = ("/srv/app/auth.py", 42)
    plain = logger.makeRecord(
        "svc.auth", logging.INFO, *where, "user %s logged in from %s", args, None, "login"
    )
    extra = logger.makeRecord(
        "svc.auth",
        logging.INFO,
        *where,
        "user %s logged in from %s",
        args,
        None,
        "login",
        extra={"user_id": 1234, "request_id": "9f1c2a7e-5b", "roles": ["admin", "ops"], "ms": 12.5},
    )
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        import sys

        failed = logger.makeRecord(
            "svc.auth", logging.ERROR, *where, "login failed", (), sys.exc_info(), "login"
        )
    return {"plain": plain, "extra": extra, "exception": failed}


def _ns(call: object) -> float:
    runs = [
        timeit.timeit(call, number=CALLS, timer=time.process_time) / CALLS * 1e9  # type: ignore[arg-type]
        for _ in range(RUNS)
    ]
    return statistics.median(runs)


def main() -> None:
    handler = _logging.LogHandler("unused")  # document() needs no ring
    encoders = [_logging.encode_stdlib]
    if _logging._orjson is not None:
        encoders.append(_logging.encode_orjson)
    print(
        f"{'record':10} {'bytes':>5} {'document()':>11} "
        + " ".join(f"{e.__name__:>14}" for e in encoders)
    )
    for name, record in _records().items():
        doc = handler.document(record)
        size = len(encoders[0](doc))
        cells = [f"{_ns(lambda e=e, doc=doc: e(doc)):>11.0f} ns" for e in encoders]
        print(
            f"{name:10} {size:>5} {_ns(lambda record=record: handler.document(record)):>8.0f} ns "
            + " ".join(cells)
        )


if __name__ == "__main__":
    main()
