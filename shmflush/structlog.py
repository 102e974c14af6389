"""structlog integration (``pip install shmflush[structlog]``): :class:`RingRenderer`,
the last processor of a structlog chain, appends the event dict to a shmflush ring
as one JSON object.

The event dict goes to the ring as the processor chain left it: no
pre-formatting into a string, no queue, and no ``QueueHandler.prepare()`` that
flattens it (hynek/structlog#702)::

    import structlog, shmflush.structlog

    structlog.configure(processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        structlog.processors.format_exc_info,
        shmflush.structlog.RingRenderer("app"),
    ])
    structlog.get_logger().info("user logged in", user="ada")
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, NoReturn

import structlog

from . import _logging
from ._api import Ring

__all__ = ["RingRenderer"]


class RingRenderer:
    """A structlog processor that appends the event dict to a ring and ends the
    chain (it raises :class:`structlog.DropEvent`, as structlog expects of a
    processor that consumed the event: the wrapped logger is never called).

    *ring*, *on_full*, *timeout* and *encoder* are as for
    :class:`shmflush.LogHandler`: a ring name attaches on the first event in the
    process that logs (and again after ``fork()``; a pickled renderer re-attaches
    by name).  Values JSON cannot hold are written as docs/logging.md says
    (``repr()`` for most); an event larger than the ring's ``max_record`` is cut
    to fit and marked.  Unlike the handler, errors propagate to the caller, as
    any structlog processor's do: with ``on_full="block"``, a full ring past
    *timeout* raises :class:`shmflush.RingTimeoutError` (the event is counted
    as dropped).  Once the logging call returns the event is in shared memory
    and survives the process's ``os._exit()`` or SIGKILL.
    """

    def __init__(
        self,
        ring: Ring | str,
        *,
        on_full: str = "block",
        timeout: float | None = 5.0,
        encoder: Callable[[Any], bytes] | None = None,
    ) -> None:
        self.sink = _logging.Sink(ring, on_full=on_full, timeout=timeout)
        self.encoder = _logging.ENCODE if encoder is None else encoder

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> NoReturn:
        doc = event_dict if type(event_dict) is dict else dict(event_dict)
        self.sink.put(doc, self.encoder)
        raise structlog.DropEvent

    def close(self) -> None:
        """Detach the ring handle this renderer attached by name (a later event
        attaches again)."""
        self.sink.close()
