"""The one checker of the demo, the benchmark, the soak and the tests.

It reads records (a shmflush file through the public :func:`shmflush.read`, or
any iterable of payloads, such as a peer's fixed-size records) and compares them
with what the writers of a :class:`~shmflush._tools.workload.Workload` report
they appended (:class:`Expected`).  Each record is rebuilt from the (writer, seq)
its header names and compared whole.  The :class:`Verdict` counts:

* *lost*: a record whose append was reported, missing from the file;
* *duplicated*: a record read more than once;
* *out of order*: a record that comes after a later record of its writer (each
  writer's records must be in the order it appended them);
* *corrupt*: a record whose bytes are not the ones its header says (torn,
  truncated, damaged), or that has no readable header;
* *foreign*: a well-formed record that no writer of this run wrote: an unknown
  writer id or, when the expectations are complete, a sequence number past what
  its writer appended.

Expectations may be partial: a writer that was killed, or interrupted inside an
append, could not report every record it appended.  Such records (past what it
reported, or in the stretches it skipped) may be present or absent, and are
counted as *unreported* when present; they may still never be torn, duplicated
or out of order.

Memory stays at a few counters per writer, plus a list of gaps that is empty
unless records are missing or out of order, whatever the file size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import shmflush

from .workload import TINY, Workload

#: Examples kept per kind of problem.
EXAMPLES = 5
#: The kinds of problem, as Verdict counts them.
KINDS = ("lost", "duplicated", "out_of_order", "corrupt", "foreign")
# Past every sequence number a header can hold (64 bits).
_BEYOND = 1 << 65


@dataclass(frozen=True)
class Expected:
    """What the writers report they appended.

    *appended*: writer id -> records reported appended, as the count *n* of
    sequence numbers ``0 .. n - 1`` (less the *unreported* stretches).
    *unreported*: writer id -> sorted, disjoint ``[lo, hi)`` stretches below *n*
    whose appends did not report (interrupted): their records may be missing.
    *writers*: which writer ids ran (default: the keys of *appended*).
    *complete*: no writer appended more than it reported (every writer
    finished); then a record past a writer's *n* is foreign.  False for a run
    whose writers were killed: such a record may be present.
    """

    appended: Mapping[int, int]
    unreported: Mapping[int, Sequence[tuple[int, int]]] = field(default_factory=dict)
    writers: Callable[[int], bool] | None = None
    complete: bool = True

    @classmethod
    def every(cls, writers: int, count: int) -> Expected:
        """Writers ``0 .. writers - 1`` each appended records ``0 .. count - 1``."""
        return cls(dict.fromkeys(range(writers), count))

    def ran(self, writer: int) -> bool:
        """Whether *writer* is a writer of this run."""
        return self.writers(writer) if self.writers is not None else writer in self.appended

    @property
    def total(self) -> int:
        """Records reported appended (less the unreported stretches)."""
        return sum(self.appended.values()) - sum(
            min(hi, self.appended.get(w, 0)) - lo
            for w, holes in self.unreported.items()
            for lo, hi in holes
            if lo < self.appended.get(w, 0)
        )


@dataclass
class Verdict:
    """What checking a file found; :attr:`ok` when nothing is wrong."""

    records: int = 0  #: payloads read
    lost: int = 0  #: reported records missing
    duplicated: int = 0  #: records read more than once
    out_of_order: int = 0  #: records that came after a later record of their writer
    corrupt: int = 0  #: records whose bytes are not the ones their header says
    foreign: int = 0  #: well-formed records that no writer of this run wrote
    unreported: int = 0  #: records present whose append was never reported
    tiny: int = 0  #: intact records shorter than the header (counted in records)
    tiny_reported: int = 0  #: tiny records whose append was reported
    abandoned: int = 0  #: ABANDONED records the reader skipped (shmflush files)
    read_error: str = ""  #: what reading raised or skipped, if anything
    #: kind of problem -> its first few examples
    examples: dict[str, list[str]] = field(default_factory=dict)
    #: writer id -> [(first missing seq, missing count), ...] for reported records
    lost_by_writer: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def note(self, kind: str, what: str) -> None:
        examples = self.examples.setdefault(kind, [])
        if len(examples) < EXAMPLES:
            examples.append(what)

    @property
    def ok(self) -> bool:
        return not (self.read_error or any(getattr(self, kind) for kind in KINDS))

    def describe(self, kind: str) -> str:
        """``"3 lost (first: ...)"`` for problem *kind* (:data:`KINDS`), or "" if none."""
        count = getattr(self, kind)
        if not count:
            return ""
        return f"{count} {kind.replace('_', ' ')} (first: {self.examples.get(kind, ['?'])[0]})"

    def problems(self) -> list[str]:
        """One line per kind of problem found: its count and first example."""
        out = [line for kind in KINDS if (line := self.describe(kind))]
        if self.read_error:
            out.append(f"read error: {self.read_error}")
        return out

    def summary(self) -> str:
        """One line: the problems, or that every record is intact."""
        problems = self.problems()
        if problems:
            return "; ".join(problems)
        return f"{self.records} records intact, in per-writer order"


def check_file(
    path: str, workload: Workload, expected: Expected, *, strict: bool = True
) -> Verdict:
    """Read the shmflush file *path* with :func:`shmflush.read` and check it.

    A read error (:class:`~shmflush.ShmflushError`) ends the check and goes into
    :attr:`Verdict.read_error`; with *strict* false, damaged stretches are
    skipped and listed there.
    """
    verdict = Verdict()
    reader = shmflush.read(path, strict=strict)
    checking = _Checking(workload, expected, verdict)
    try:
        checking.feed(reader)
    except shmflush.ShmflushError as exc:
        verdict.read_error = f"after record #{verdict.records}: {exc}"
    finally:
        reader.close()
        verdict.abandoned = reader.abandoned
    if reader.damaged:
        verdict.read_error = "damaged: " + ", ".join(
            f"[{d.start}, {d.end}) {d.reason}" for d in reader.damaged[:EXAMPLES]
        )
    checking.finish()
    return verdict


def check_records(payloads: Iterable[bytes], workload: Workload, expected: Expected) -> Verdict:
    """Check *payloads*, in file order; errors raised by the iterable propagate."""
    verdict = Verdict()
    checking = _Checking(workload, expected, verdict)
    checking.feed(payloads)
    checking.finish()
    return verdict


class _Checking:
    """One pass over the records: per writer, the next sequence number expected
    and the gaps not seen yet."""

    def __init__(self, workload: Workload, expected: Expected, verdict: Verdict) -> None:
        self.workload = workload
        self.expected = expected
        self.out = verdict
        self.following: dict[int, int] = {}  # writer -> next seq expected
        self.gaps: dict[int, list[list[int]]] = {}  # writer -> [[lo, hi), ...] not seen

    def feed(self, payloads: Iterable[bytes]) -> None:
        out, workload, expected = self.out, self.workload, self.expected
        appended, holes, complete = expected.appended, expected.unreported, expected.complete
        following, gaps = self.following, self.gaps
        record, is_tiny = workload.record, workload.is_tiny
        for payload in payloads:
            index = out.records
            out.records += 1
            named = workload.identify(payload)
            if named is None:
                if workload.mixed and payload == TINY[: len(payload)]:
                    out.tiny += 1
                else:
                    out.corrupt += 1
                    out.note("corrupt", f"record #{index}: {len(payload)} bytes, no header")
                continue
            writer, seq = named
            where = f"record #{index} (writer {writer} seq {seq})"
            if not expected.ran(writer):
                out.foreign += 1
                out.note("foreign", f"{where}: no such writer")
                continue
            if complete and seq >= appended.get(writer, 0):
                out.foreign += 1
                out.note("foreign", f"{where}: the writer appended {appended.get(writer, 0)}")
                continue
            if payload != record(writer, seq):
                out.corrupt += 1
                out.note("corrupt", f"{where}: {len(payload)} bytes, not as written")
                if is_tiny(writer, seq):
                    continue  # no such record was ever written: it says nothing of order
            next_seq = following.get(writer, 0)
            first_time = True
            if seq == next_seq or (seq == next_seq + 1 and is_tiny(writer, next_seq)):
                following[writer] = seq + 1
            elif seq > next_seq:
                gaps.setdefault(writer, []).append([next_seq, seq])
                following[writer] = seq + 1
            else:
                first_time = _fill_gap(gaps.get(writer, []), seq)
                if first_time:
                    out.out_of_order += 1
                    out.note("out_of_order", f"{where} after seq {next_seq - 1}")
                else:
                    out.duplicated += 1
                    out.note("duplicated", where)
            if first_time and (
                seq >= appended.get(writer, 0) or _inside(holes.get(writer, ()), seq)
            ):
                out.unreported += 1

    def finish(self) -> None:
        """Count what is missing: reported records not seen."""
        out, workload = self.out, self.workload
        tiny_count, is_tiny = workload.tiny_count, workload.is_tiny
        holes = self.expected.unreported
        for writer, count in sorted(self.expected.appended.items()):
            top = count - 1
            skipped = holes.get(writer, ())
            out.tiny_reported += tiny_count(writer, 0, count) - sum(
                tiny_count(writer, lo, min(hi, count)) for lo, hi in skipped
            )
            unseen = [(lo, min(hi, count)) for lo, hi in self.gaps.get(writer, []) if lo <= top]
            after = self.following.get(writer, 0)
            if after <= top:
                unseen.append((after, count))
            missing: list[tuple[int, int]] = []
            for lo, hi in unseen:
                for a, b in _subtract(lo, hi, skipped):
                    n = b - a - tiny_count(writer, a, b)  # tiny ones are counted below
                    if n:
                        missing.append((a + 1 if is_tiny(writer, a) else a, n))
            if missing:
                out.lost_by_writer[writer] = missing
                out.lost += sum(n for _, n in missing)
                for lo, n in missing:
                    out.note(
                        "lost", f"writer {writer}: {n} records from seq {lo} (appended {count})"
                    )
        # Tiny records cannot say whose they are: only their number can be wrong.
        if out.tiny < out.tiny_reported:
            out.lost += out.tiny_reported - out.tiny
            out.note("lost", f"{out.tiny_reported} tiny records reported, {out.tiny} in the file")
        elif out.tiny > out.tiny_reported and self.expected.complete:
            # Every writer reported all it appended: the extra ones were read twice.
            out.duplicated += out.tiny - out.tiny_reported
            out.note(
                "duplicated", f"{out.tiny} tiny records in the file, {out.tiny_reported} appended"
            )


def _fill_gap(gaps: list[list[int]], seq: int) -> bool:
    """Remove *seq* from the gap that holds it; False if no gap does (a duplicate)."""
    for k, (lo, hi) in enumerate(gaps):
        if lo <= seq < hi:
            pieces = [p for p in ([lo, seq], [seq + 1, hi]) if p[0] < p[1]]
            gaps[k : k + 1] = pieces
            return True
    return False


def _inside(ranges: Sequence[tuple[int, int]], seq: int) -> bool:
    """Whether *seq* is in one of the sorted, disjoint ``[lo, hi)`` *ranges*."""
    k = bisect.bisect_right(ranges, (seq, _BEYOND)) - 1
    return k >= 0 and ranges[k][0] <= seq < ranges[k][1]


def _subtract(lo: int, hi: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[lo, hi)`` less the sorted, disjoint *ranges*, as a list of ranges."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b <= lo:
            continue
        if a >= hi:
            break
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    if lo < hi:
        out.append((lo, hi))
    return out
