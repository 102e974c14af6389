"""Tests of the tools' one workload and one checker (``shmflush/_tools/``).

Each kind of damage the checker must catch has its own test, with exact counts:
a checker that stopped looking for it fails that test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import shmflush
from shmflush._tools.checker import Expected, Verdict, check_file, check_records
from shmflush._tools.workload import HEADER, MIN_TEXT_SIZE, TINY, Workload

WRITERS = 3
COUNT = 40
BINARY = Workload(size=50)
TEXT = Workload(size=64, text=True)


def _stream(workload: Workload = BINARY) -> list[bytes]:
    """Every writer's records, interleaved round-robin, as a correct file holds them."""
    return [workload.record(w, seq) for seq in range(COUNT) for w in range(WRITERS)]


def _check(stream: list[bytes], workload: Workload = BINARY) -> Verdict:
    return check_records(stream, workload, Expected.every(WRITERS, COUNT))


def _problems(verdict: Verdict) -> dict[str, int]:
    counts = {
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "out_of_order": verdict.out_of_order,
        "corrupt": verdict.corrupt,
        "foreign": verdict.foreign,
    }
    return {kind: n for kind, n in counts.items() if n}


# -- the workload ----------------------------------------------------------------------


@pytest.mark.parametrize("workload", [BINARY, TEXT, Workload(mixed=True, large=2000)])
def test_records_are_deterministic_and_name_their_writer_and_seq(workload: Workload) -> None:
    for writer, seq in ((0, 0), (2, 7), (70000, 123456)):
        record = workload.record(writer, seq)
        assert record == workload.record(writer, seq)
        assert len(record) == workload.length(writer, seq)
        if not workload.is_tiny(writer, seq):
            assert workload.identify(record) == (writer, seq)


def test_records_builds_exactly_what_record_builds() -> None:
    for workload in (BINARY, TEXT, Workload(mixed=True)):
        assert workload.records(1, 30, first=5) == [workload.record(1, q) for q in range(5, 35)]


def test_neighbouring_records_differ_in_nearly_every_filler_byte() -> None:
    workload = Workload(size=1012)
    first, second = workload.record(0, 0), workload.record(0, 1)
    other_writer = workload.record(1, 0)
    for other in (second, other_writer):
        same = sum(a == b for a, b in zip(first[12:], other[12:], strict=True))
        assert same < 50  # about 4 of the 1000 bytes match by chance


def test_text_records_are_log_lines_of_exactly_the_size() -> None:
    line = TEXT.line(3, 4)
    assert line.startswith("00000003:0000000000000004:")
    assert len(line) + 1 == TEXT.size  # a FileHandler adds the newline
    assert TEXT.record(3, 4) == (line + "\n").encode()
    assert TEXT.lines(3, 5)[4] == line


def test_workload_refuses_records_too_small_for_their_header() -> None:
    with pytest.raises(ValueError, match="at least 12"):
        Workload(size=HEADER.size - 1)
    with pytest.raises(ValueError, match=f"at least {MIN_TEXT_SIZE}"):
        Workload(size=MIN_TEXT_SIZE - 1, text=True)


def test_mixed_lengths_run_from_empty_to_large_and_tiny_counts_add_up() -> None:
    workload = Workload(mixed=True, large=1 << 19)
    lengths: dict[int, int] = {}
    for writer in (1 << 16, 5 << 16 | 3):
        for seq in range(5000):
            record = workload.record(writer, seq)
            assert len(record) == workload.length(writer, seq) <= workload.large
            assert (len(record) < HEADER.size) == workload.is_tiny(writer, seq)
            lengths[len(record)] = lengths.get(len(record), 0) + 1
        for lo, hi in ((0, 0), (0, 1), (3, 40), (7, 8), (100, 4999)):
            brute = sum(1 for q in range(lo, hi) if workload.is_tiny(writer, q))
            assert workload.tiny_count(writer, lo, hi) == brute
    assert lengths.get(0, 0) > 0  # empty records
    assert all(lengths.get(n, 0) for n in range(1, HEADER.size))  # 1..11 bytes
    assert lengths[HEADER.size] > 1000  # header and no filler
    assert max(lengths) > workload.large // 2


# -- the checker: what passes -----------------------------------------------------------


@pytest.mark.parametrize("workload", [BINARY, TEXT])
def test_checker_passes_interleaved_records_in_per_writer_order(workload: Workload) -> None:
    verdict = _check(_stream(workload), workload)
    assert verdict.ok, verdict.summary()
    assert verdict.records == WRITERS * COUNT
    assert verdict.summary() == f"{WRITERS * COUNT} records intact, in per-writer order"


def test_checker_passes_one_writers_records_after_another() -> None:
    stream = sorted(_stream(), key=lambda r: HEADER.unpack_from(r)[0])
    verdict = _check(stream)
    assert verdict.ok, verdict.summary()


# -- the checker: what it catches -------------------------------------------------------


def test_checker_catches_a_lost_record() -> None:
    stream = _stream()
    del stream[7]  # writer 1, seq 2
    verdict = _check(stream)
    assert _problems(verdict) == {"lost": 1}
    assert verdict.lost_by_writer == {1: [(2, 1)]}
    assert "writer 1: 1 records from seq 2" in verdict.summary()
    assert not verdict.ok


def test_checker_catches_lost_records_at_a_writers_end() -> None:
    stream = [r for r in _stream() if HEADER.unpack_from(r) < (2, COUNT - 3)]
    verdict = _check(stream)
    assert _problems(verdict) == {"lost": 3}
    assert verdict.lost_by_writer == {2: [(COUNT - 3, 3)]}


def test_checker_catches_a_duplicated_record() -> None:
    stream = _stream()
    stream.append(stream[4])  # writer 1, seq 1, again at the end
    verdict = _check(stream)
    assert _problems(verdict) == {"duplicated": 1}
    assert verdict.examples["duplicated"] == [f"record #{WRITERS * COUNT} (writer 1 seq 1)"]
    assert not verdict.ok


def test_checker_catches_two_records_of_one_writer_swapped() -> None:
    stream = _stream()
    stream[0], stream[WRITERS] = stream[WRITERS], stream[0]  # writer 0: seq 1 before seq 0
    verdict = _check(stream)
    assert _problems(verdict) == {"out_of_order": 1}
    assert "writer 0 seq 0" in verdict.examples["out_of_order"][0]
    assert not verdict.ok


@pytest.mark.parametrize("offset", [HEADER.size, 20, BINARY.size - 1])
def test_checker_catches_one_flipped_filler_byte(offset: int) -> None:
    stream = _stream()
    damaged = bytearray(stream[10])
    damaged[offset] ^= 0x01
    stream[10] = bytes(damaged)
    verdict = _check(stream)
    assert _problems(verdict) == {"corrupt": 1}
    assert not verdict.ok


def test_checker_catches_a_flipped_character_of_a_log_line() -> None:
    stream = _stream(TEXT)
    damaged = bytearray(stream[5])
    damaged[40] = ord("x")  # not a hex digit: no writer wrote it
    stream[5] = bytes(damaged)
    assert _problems(_check(stream, TEXT)) == {"corrupt": 1}


@pytest.mark.parametrize(
    ("keep", "problems"),
    [
        (BINARY.size - 1, {"corrupt": 1}),
        (HEADER.size, {"corrupt": 1}),
        # Too short to say whose it is: the record it was is missing, too.
        (5, {"corrupt": 1, "lost": 1}),
    ],
)
def test_checker_catches_a_torn_record(keep: int, problems: dict[str, int]) -> None:
    stream = _stream()
    stream[10] = stream[10][:keep]
    verdict = _check(stream)
    assert _problems(verdict) == problems
    assert not verdict.ok


def test_checker_catches_a_record_whose_header_names_another_writer() -> None:
    stream = _stream()
    # Writer 0's seq 5 relabelled as writer 1's seq 5 (whose real record is dropped).
    moved = bytearray(stream[5 * WRITERS])
    HEADER.pack_into(moved, 0, 1, 5)
    stream[5 * WRITERS + 1] = bytes(moved)
    verdict = _check(stream)
    assert _problems(verdict) == {"corrupt": 1}


def test_checker_catches_a_record_of_a_writer_that_never_ran() -> None:
    stranger = BINARY.record(WRITERS, 0)  # intact, but writer 3 is not of this run
    verdict = _check([*_stream(), stranger])
    assert _problems(verdict) == {"foreign": 1}
    assert "no such writer" in verdict.examples["foreign"][0]
    assert not verdict.ok


def test_checker_catches_a_record_past_what_its_writer_appended() -> None:
    extra = BINARY.record(0, COUNT)  # well-formed, but writer 0 appended COUNT records
    verdict = _check([*_stream(), extra])
    assert _problems(verdict) == {"foreign": 1}
    assert verdict.unreported == 0


def test_checker_lets_the_error_of_a_stream_that_breaks_off_propagate() -> None:
    def broken() -> Iterator[bytes]:
        yield from _stream()[:3]
        raise OSError("made up by the test")

    with pytest.raises(OSError, match="made up"):
        check_records(broken(), BINARY, Expected.every(WRITERS, COUNT))


def test_checker_catches_a_duplicated_tiny_record() -> None:
    workload = Workload(mixed=True, large=2000)
    tiny = next(q for q in range(COUNT) if workload.is_tiny(0, q))
    stream = [workload.record(w, q) for q in range(COUNT) for w in range(WRITERS)]
    verdict = check_records(stream, workload, Expected.every(WRITERS, COUNT))
    assert verdict.ok, verdict.summary()
    stream.append(workload.record(0, tiny))
    verdict = check_records(stream, workload, Expected.every(WRITERS, COUNT))
    assert _problems(verdict) == {"duplicated": 1}


# -- partial expectations: killed and interrupted writers ---------------------------------


def _killed() -> Expected:
    # Writer 0 reported everything; writer 1 was killed after reporting 10 (it may
    # have appended more); writer 2 was interrupted in seqs 20..24.
    return Expected(
        {0: COUNT, 1: 10, 2: COUNT},
        unreported={2: [(20, 25)]},
        writers=range(WRITERS).__contains__,
        complete=False,
    )


def test_partial_expectations_allow_unreported_records_present_or_absent() -> None:
    dropped = {(1, 15), (1, 16), (2, 21), (2, 22), *((1, q) for q in range(30, COUNT))}
    stream = [r for r in _stream() if HEADER.unpack_from(r) not in dropped]
    verdict = check_records(stream, BINARY, _killed())
    assert verdict.ok, verdict.summary()
    # Writer 1: seqs 10..29 less 15, 16; writer 2: 20..24 less 21, 22.
    assert verdict.unreported == (20 - 2) + (5 - 2)


def test_partial_expectations_still_catch_a_lost_reported_record() -> None:
    stream = [r for r in _stream() if HEADER.unpack_from(r) != (1, 9)]  # reported
    assert _problems(check_records(stream, BINARY, _killed())) == {"lost": 1}


def test_partial_expectations_still_catch_a_torn_unreported_record() -> None:
    stream = _stream()
    index = stream.index(BINARY.record(1, 12))  # past what writer 1 reported
    stream[index] = stream[index][:-3]
    assert _problems(check_records(stream, BINARY, _killed())) == {"corrupt": 1}


def test_partial_expectations_still_catch_a_duplicated_unreported_record() -> None:
    stream = [*_stream(), BINARY.record(2, 21)]  # interrupted, landed, then again
    verdict = check_records(stream, BINARY, _killed())
    assert _problems(verdict) == {"duplicated": 1}


def test_partial_expectations_still_catch_unreported_records_out_of_order() -> None:
    stream = _stream()
    a, b = stream.index(BINARY.record(1, 12)), stream.index(BINARY.record(1, 13))
    stream[a], stream[b] = stream[b], stream[a]
    assert _problems(check_records(stream, BINARY, _killed())) == {"out_of_order": 1}


# -- real files, through shmflush.read ----------------------------------------------------


def test_check_file_counts_lost_duplicated_reordered_and_corrupt_records(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "check.log"
    workload = Workload(mixed=True, large=4000)
    good = [workload.record(1, seq) for seq in range(6)]
    damaged = bytearray(workload.record(2, 0))
    damaged[-1] ^= 0x01
    assert not any(workload.is_tiny(1, seq) for seq in range(6))
    with shmflush.create(ring_name, path, buffer_size=8192, buffers=4) as ring:
        # writer 1: 0 1 3 2 3 (4 and 5 reported but missing); writer 2: damaged seq 0
        for record in (good[0], good[1], good[3], good[2], good[3], bytes(damaged)):
            ring.append(record)
    verdict = check_file(str(path), workload, Expected({1: 6, 2: 1}))
    assert verdict.records == 6
    assert _problems(verdict) == {"lost": 2, "out_of_order": 1, "duplicated": 1, "corrupt": 1}
    assert not verdict.read_error
    assert not verdict.ok


def test_check_file_excuses_unreported_stretches_and_counts_tiny_records(
    ring_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "check.log"
    workload = Workload(mixed=True, large=8000)
    writer = 3
    tiny = [seq for seq in range(40) if workload.is_tiny(writer, seq)]
    assert len(tiny) == 5
    # Seqs 10..13 were interrupted (never reported): 10 and 11 landed, 12 and 13
    # did not; all the others were reported, but 30..34 are missing, and so are
    # the tiny ones in 20..29.
    missing = {12, 13, *range(30, 35), *(s for s in tiny if 20 <= s < 30)}
    with shmflush.create(ring_name, path, buffer_size=16384, buffers=4) as ring:
        for seq in range(40):
            if seq not in missing:
                ring.append(workload.record(writer, seq))
        ring.append(TINY[:10] + b"X")  # a tiny record with the wrong bytes
    expected = Expected(
        {writer: 40}, unreported={writer: [(10, 14)]}, writers={writer}.__contains__
    )
    verdict = check_file(str(path), workload, expected)
    full_lost = sum(1 for s in range(30, 35) if not workload.is_tiny(writer, s))
    tiny_reported = [s for s in tiny if not 10 <= s < 14]
    tiny_lost = [s for s in tiny_reported if s in missing]
    assert tiny_lost, "the test lost no reported tiny record"
    assert verdict.lost == full_lost + len(tiny_lost)
    assert verdict.lost_by_writer[writer] == [(30, full_lost)]
    assert verdict.unreported == sum(1 for s in (10, 11) if not workload.is_tiny(writer, s))
    assert verdict.tiny == len([s for s in tiny if s not in missing])  # the bad one is corrupt
    assert verdict.tiny_reported == len(tiny_reported)
    assert verdict.corrupt == 1
    assert (verdict.duplicated, verdict.out_of_order, verdict.foreign) == (0, 0, 0)
