"""The one workload of the demo, the benchmark, the soak and the tests.

Every record names its writer and its sequence number, and every other byte of it
follows from those two, so a checker (:mod:`shmflush._tools.checker`) can rebuild
it and compare it whole, without keeping the records in memory:

* binary flavour: ``struct.pack("<IQ", writer, seq)`` (:data:`HEADER`) and a
  filler;
* text flavour (log lines, for the ``logging`` peer of the benchmark):
  ``"wwwwwwww:ssssssssssssssss:"`` (writer and seq in hex) and a hex filler, then
  a newline.

The filler is a window into one fixed pseudo-random pattern, and where the
window starts depends on (writer, seq): neighbouring records differ in nearly
every byte, not only in the header, so a stretch of one record pasted into
another, a record shifted by a few bytes or one whose header was rewritten to
another writer's is caught wherever it lands.

Sizes are fixed (``Workload(size=100)``) or mixed (``Workload(mixed=True)``, the
soak's): from 0 bytes to *large*, mostly small.  A mixed workload has *tiny*
records, shorter than the header (:meth:`Workload.is_tiny`): they cannot say
whose they are, so a checker counts them in aggregate.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

#: Binary records start with (writer id, sequence number), little-endian.
HEADER: Final = struct.Struct("<IQ")
#: Log lines start with "wwwwwwww:ssssssssssssssss:" (writer id and seq in hex).
TEXT_HEADER_SIZE: Final = 26
#: The smallest text record: its header, one filler character and the newline.
MIN_TEXT_SIZE: Final = TEXT_HEADER_SIZE + 2
#: The largest record of a mixed workload, unless told otherwise.
MAX_LARGE: Final = 64 << 10
#: In a mixed workload, record *seq* of a writer is tiny (0 to 11 bytes) when
#: seq % TINY_EVERY is that writer's phase (1 to TINY_EVERY - 1: seq 0 never is).
TINY_EVERY: Final = 8
#: A tiny record of n bytes is TINY[:n].
TINY: Final = b"tiny-record"
assert len(TINY) == HEADER.size - 1

# Where a filler window starts: (writer * 131 + seq * 61) % _SPAN.  Prime, so that
# neighbouring records start far apart.
_SPAN: Final = 4093
_pattern = b""


def pattern(length: int) -> bytes:
    """At least *length* bytes of the fixed pattern that fillers are cut from.

    blake2b in counter mode: deterministic in every process and every run, and
    each call's result is a prefix of any longer one's.
    """
    global _pattern
    if len(_pattern) < length:
        blocks = range(len(_pattern) // 64, (length + 63) // 64)
        _pattern += b"".join(
            hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64, person=b"shmflush").digest()
            for i in blocks
        )
    return _pattern


def _mix(writer: int, seq: int) -> int:
    h = ((writer * 0x9E3779B1) ^ (seq * 0x85EBCA77)) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    return h ^ (h >> 15)


@dataclass(frozen=True)
class Workload:
    """The records writers append and a checker expects.

    *size*: bytes per record (binary: at least :data:`HEADER`'s 12; text: at
    least :data:`MIN_TEXT_SIZE`, newline included).  With *mixed*, *size* is
    ignored and record lengths run from 0 bytes to *large* (see
    :meth:`length`).  *text*: log lines instead of binary records.
    """

    size: int = 100
    mixed: bool = False
    large: int = MAX_LARGE
    text: bool = False

    def __post_init__(self) -> None:
        if self.mixed and self.text:
            raise ValueError("a mixed workload is binary: text=True needs mixed=False")
        if self.mixed:
            if self.large < HEADER.size:
                raise ValueError(f"large must be at least {HEADER.size}, got {self.large}")
        elif self.size < (MIN_TEXT_SIZE if self.text else HEADER.size):
            raise ValueError(
                f"size must be at least {MIN_TEXT_SIZE if self.text else HEADER.size} "
                f"for {'text' if self.text else 'binary'} records, got {self.size}"
            )

    # -- lengths and tiny records ----------------------------------------------------

    def length(self, writer: int, seq: int) -> int:
        """The length of record *seq* of *writer*.

        Fixed: *size*.  Mixed: 0 to 11 bytes if it is tiny, else the 12-byte header
        plus a filler of 0 bytes (often), a few bytes (mostly), up to a few KiB (now
        and then) or up to *large* in all (one in a hundred).
        """
        if not self.mixed:
            return self.size
        h = _mix(writer, seq)
        r = h >> 8
        if self.is_tiny(writer, seq):
            return 0 if h % 3 == 0 else 1 + r % (HEADER.size - 1)
        bucket = h % 100
        if bucket < 20:
            filler = 0
        elif bucket < 65:
            filler = 1 + r % 63
        elif bucket < 90:
            filler = 64 + r % 960
        elif bucket < 99:
            filler = 1024 + r % 3072
        else:
            filler = r % (self.large - HEADER.size + 1)
        return HEADER.size + min(filler, self.large - HEADER.size)

    def is_tiny(self, writer: int, seq: int) -> bool:
        """Whether record *seq* of *writer* is shorter than the header (mixed only).

        Such a record is ``TINY[:n]``: a checker can tell it is intact, but not
        whose it is.
        """
        return self.mixed and seq % TINY_EVERY == _tiny_phase(writer)

    def tiny_count(self, writer: int, lo: int, hi: int) -> int:
        """How many of the sequence numbers ``lo <= seq < hi`` of *writer* are tiny."""
        if not self.mixed or hi <= lo:
            return 0
        phase = _tiny_phase(writer)

        def below(x: int) -> int:  # tiny seqs in [0, x)
            return (x - phase + TINY_EVERY - 1) // TINY_EVERY if x > phase else 0

        return below(hi) - below(lo)

    # -- the records -----------------------------------------------------------------

    def record(self, writer: int, seq: int) -> bytes:
        """Record *seq* of *writer*, exactly as the writer appends it (and as the
        file holds it: a text record ends with its newline)."""
        if self.text:
            return (self.line(writer, seq) + "\n").encode("ascii")
        n = self.length(writer, seq)
        if n < HEADER.size:
            return TINY[:n]
        start = (writer * 131 + seq * 61) % _SPAN
        return HEADER.pack(writer, seq) + pattern(_SPAN + n)[start : start + n - HEADER.size]

    def records(self, writer: int, count: int, first: int = 0) -> list[bytes]:
        """Records ``first .. first + count - 1`` of *writer*."""
        if self.text or self.mixed:
            return [self.record(writer, seq) for seq in range(first, first + count)]
        # The benchmark builds hundreds of thousands of these before its clock
        # starts: the loop of record(), inlined.
        fill = self.size - HEADER.size
        source, pack = pattern(_SPAN + fill), HEADER.pack
        base = writer * 131
        out = []
        for seq in range(first, first + count):
            start = (base + seq * 61) % _SPAN
            out.append(pack(writer, seq) + source[start : start + fill])
        return out

    def line(self, writer: int, seq: int) -> str:
        """Text record *seq* of *writer* without its newline (what a logger logs)."""
        if not self.text:
            raise ValueError("line() is for text workloads (Workload(text=True))")
        fill = self.size - TEXT_HEADER_SIZE - 1
        start = (writer * 131 + seq * 61) % _SPAN
        filler = pattern(_SPAN + fill)[start : start + (fill + 1) // 2].hex()[:fill]
        return f"{writer:08x}:{seq:016x}:{filler}"

    def lines(self, writer: int, count: int) -> list[str]:
        """Text records 0 .. *count* - 1 of *writer*, without their newlines."""
        return [self.line(writer, seq) for seq in range(count)]

    def identify(self, payload: bytes) -> tuple[int, int] | None:
        """The (writer, seq) that *payload*'s header names, or None if it has no
        readable header (too short, or not a text header)."""
        if self.text:
            if len(payload) < TEXT_HEADER_SIZE or payload[8:9] != b":" or payload[25:26] != b":":
                return None
            try:
                return int(payload[:8], 16), int(payload[9:25], 16)
            except ValueError:
                return None
        if len(payload) < HEADER.size:
            return None
        writer, seq = HEADER.unpack_from(payload)
        return writer, seq


def _tiny_phase(writer: int) -> int:
    return TINY_EVERY - 1 - writer % (TINY_EVERY - 1)
