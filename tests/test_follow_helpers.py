"""Hand-made file bytes for the follow tests."""

from __future__ import annotations

import os

from shmflush._format import (
    BLOCK,
    DATA_START,
    pack_file_header,
    pack_record_header,
    record_size,
    write_segment_header,
)


def _segment(address: int, payload: bytes, stream: bytes) -> bytes:
    buf = bytearray(BLOCK)
    pack_record_header(buf, 64, len(payload))
    buf[72 : 72 + len(payload)] = payload
    write_segment_header(
        buf,
        0,
        used=record_size(len(payload)),
        seq=0,
        address=address,
        stream_id=stream,
        sealed_ns=1,
    )
    return bytes(buf)


def segment_bytes() -> tuple[bytes, bytes, bytes, bytes]:
    """File header and two one-block segments (b"one" at 4096, b"two" at 8192)."""
    stream = os.urandom(16)
    return (
        pack_file_header(stream, 1),
        _segment(DATA_START, b"one", stream),
        _segment(DATA_START + BLOCK, b"two", stream),
        stream,
    )
