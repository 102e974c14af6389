"""Every interleaving of the protocol model (tests/protocol_model.py), checked.

Each configuration is explored breadth first, all of it, with the invariants
I1-I8 checked in every state and transition (see protocol_model's docstring for
what is checked where), and progress checked over the whole state graph: without
writer deaths, the owner's close() must stay able to drain everything from every
reachable state.

Findings pinned here (details in the test docstrings):

* ``Ring.reject`` used to seal whatever fill its buffer held *now* (fetch_or); a
  writer preempted between its fetch-and-add and that fetch_or could seal the
  buffer's next fill, which nobody then closed.  Fixed: reject seals by
  compare-and-swap, only while the fill is still over-full.  The old behaviour
  stays as one model configuration (expected to stall), and
  test_real_reject_does_not_seal_the_next_fill replays the model's trace on the
  real code.
* protocol v3 (notes/chunks.md), put()'s step 3 tests only SEALED: a writer
  preempted between appends with a chunk whose tail the flusher returned
  writes its next record into the buffer's next fill once the buffer is reset
  and reopened (the state word reads unsealed again).  Found by the model and,
  independently, by tests/test_interrupts.py; the code's fix reloads the
  writer's own chunk word after the state word (_ring.Writer.put), and so does
  the model (Config.put_check="chunk", two loads in that order; loading C_k
  first is the mutant recheck-first, which loses a record);
  test_put_without_the_fill_check_writes_into_a_reopened_buffer pins the spec
  as written.
* deaths in chunk mode with dead-writer recovery (Config.recovery): safety
  holds, and without further deaths the owner's close() drains from every
  state (test_chunk_deaths_with_recovery_drain).
* seq is not monotonic in file order: close_extent takes the address and the seq
  with two fetch-and-adds, so two closers can interleave them (docs/format.md
  says so).

The number of states of each configuration is recorded as a test property
(``--junitxml``) and printed at the end of the module (``pytest -s``).  Set
SHMFLUSH_MODEL_DEEP=1 for larger bounds (minutes).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bare import make_bare
from protocol_model import (
    CHUNK_MUTANTS,
    MUTANTS,
    RECOVERY_MUTANTS,
    Config,
    InvariantError,
    Result,
    explore,
)

import shmflush
from shmflush import _atomic, _proc
from shmflush import _layout as L
from shmflush._ring import Writer

REJECT_WEDGE = (
    "the old Ring.reject (fetch_or) sealed the buffer's current fill, which may be a later "
    "fill than the one the rejected claim saw; nobody closes it.  Kept as a model-only "
    "configuration to show the model finds it; the code now uses compare-and-swap"
)
DEEP = bool(os.environ.get("SHMFLUSH_MODEL_DEEP"))

RecordProperty = Callable[[str, object], None]


class StalledError(AssertionError):
    """From some reachable state the run can no longer finish."""


# -- configurations ----------------------------------------------------------------------
#
# Record sizes are 8 + align8(payload) bytes; capacity 32 is four 8-byte units, so
# a 24 and a 16 do not fit together and the second crosses capacity.  max_fills
# bounds how many fills may be opened (failed rotations use up numbers too); a
# rotation beyond it is pruned, and counted.

CHUNK = 16  # bytes: chunk mode's ``want``

WEDGE = pytest.mark.xfail(raises=StalledError, strict=True, reason=REJECT_WEDGE)

LIVE: list[tuple[Config, bool]] = [  # (configuration, reaches the reject wedge)
    (
        Config(
            "1lane-cross-oldreject",
            ((24, 16), (16,)),
            timed_seal=False,
            max_fills=3,
            reject_fix=False,
        ),
        True,
    ),
    (Config("1lane-cross", ((24, 16), (16,)), timed_seal=False, max_fills=3), False),
    (
        Config(
            "1lane-cross+fix", ((24, 16), (16,)), timed_seal=False, max_fills=3, reject_fix=True
        ),
        False,
    ),
    (Config("1lane-timed", ((16, 16), (8,)), max_fills=3), False),
    (
        Config(
            "2lanes-cross", ((24, 16), (16, 24)), lanes=2, buffers=3, timed_seal=False, max_fills=4
        ),
        False,
    ),
    (Config("2lanes-timed", ((16, 16), (16,)), lanes=2, buffers=3, max_fills=4), False),
    (Config("3writers", ((16,), (16,), (8,)), buffers=3, timed_seal=False, max_fills=2), False),
    (Config("close-race", ((16,), (16,)), close_race=True, max_fills=2), False),
    # protocol v3 (notes/chunks.md), writers under x86-TSO: 16-byte chunks of
    # 8-byte records, so a chunk holds two records and a tail is often left over.
    (Config("v3-fallback", ((16, 16), (8,)), chunk=0, max_fills=2), False),
    # one fill number only: the timed seal and the flusher's returns (the larger
    # bound, which reopens a buffer, is deep-chunk-1lane and chunk-sync-stop)
    (Config("chunk-1lane", ((8, 8), (8,)), chunk=CHUNK, max_fills=1), False),
    (Config("chunk-cross", ((16, 16), (16,)), chunk=24, timed_seal=False, max_fills=2), False),
    (
        Config(
            "chunk-sync-stop",
            ((8, 8), (8,)),
            chunk=CHUNK,
            syncs=1,
            stops=1,
            timed_seal=False,
            max_fills=2,
        ),
        False,
    ),
    (
        Config("chunk-stop", ((8, 8), (8,)), chunk=CHUNK, stops=1, timed_seal=False, max_fills=2),
        False,
    ),
]
DEATHS: list[tuple[Config, bool]] = [  # (configuration, check where deaths wedge)
    (Config("deaths-timed", ((16,), (16,)), max_fills=2, deaths=1), True),
    (Config("deaths-cross", ((24, 16), (16,)), timed_seal=False, max_fills=2, deaths=1), False),
    (
        Config(
            "deaths-cross+fix",
            ((24, 16), (16,)),
            timed_seal=False,
            max_fills=2,
            deaths=1,
            reject_fix=True,
        ),
        True,
    ),
]
#: chunk mode, a writer killed at any step, dead-writer recovery in the flusher
RECOVERY: list[Config] = [
    Config(
        "chunk-deaths",
        ((8, 8), (8,)),
        chunk=CHUNK,
        deaths=1,
        recovery=True,
        timed_seal=False,
        max_fills=2,
    ),
]
if DEEP:
    RECOVERY += [
        Config(
            "deep-chunk-deaths-timed",
            ((8, 8), (8,)),
            chunk=CHUNK,
            deaths=1,
            recovery=True,
            max_fills=2,
        ),
        Config(
            "deep-chunk-deaths-cross",
            ((16, 16), (16,)),
            chunk=24,
            deaths=1,
            recovery=True,
            timed_seal=False,
            max_fills=2,
        ),
    ]
    LIVE += [
        (Config("deep-chunk-1lane", ((8, 8), (8,)), chunk=CHUNK, max_fills=2), False),
        (
            Config(
                "deep-chunk-sync-dfill",
                ((8, 8), (8,)),
                chunk=CHUNK,
                syncs=1,
                timed_seal=False,
                max_fills=2,
                put_check="fill",
            ),
            False,
        ),
        (Config("deep-1lane-3writers", ((16,), (16,), (8,)), timed_seal=False, max_fills=2), False),
        (
            Config(
                "deep-1lane-cross+fix",
                ((24, 16), (16,)),
                timed_seal=False,
                max_fills=5,
                reject_fix=True,
            ),
            False,
        ),
        (Config("deep-1lane-timed+fix", ((16, 16), (8,)), max_fills=4, reject_fix=True), False),
        (Config("deep-2lanes-timed", ((16, 16), (16, 8)), lanes=2, buffers=3, max_fills=4), False),
        (Config("deep-close-race", ((16,), (16,)), close_race=True, max_fills=3), False),
        (
            Config(
                "deep-chunk-close-race", ((8, 8), (8,)), chunk=CHUNK, close_race=True, max_fills=2
            ),
            False,
        ),
        (
            Config(
                "deep-chunk-2lanes", ((8, 8), (8, 8)), chunk=CHUNK, lanes=2, buffers=3, max_fills=3
            ),
            False,
        ),
        (Config("deep-chunk-sync", ((8, 8), (8,)), chunk=CHUNK, syncs=1, max_fills=2), False),
        (Config("deep-chunk-stop", ((8, 8), (8,)), chunk=CHUNK, stops=1, max_fills=2), False),
        (
            Config("deep-chunk-cross", ((16, 8), (16,)), chunk=24, timed_seal=False, max_fills=3),
            False,
        ),
        (
            Config(
                "deep-chunk-sync-stop", ((8, 8), (8,)), chunk=CHUNK, syncs=1, stops=1, max_fills=2
            ),
            False,
        ),
        (
            Config(
                "deep-chunk-sb3",
                ((8, 8), (8,)),
                chunk=CHUNK,
                syncs=1,
                timed_seal=False,
                sb_depth=3,
                max_fills=2,
            ),
            False,
        ),
    ]
    DEATHS += [(Config("deep-deaths-timed", ((16,), (16,)), max_fills=3, deaths=1), True)]

# Where a writer may die (before that step) and wedge the run without recovery:
# holding a claim it has not committed, closing a fill (its intent is already
# cleared there: _claim_failed clears it before close_crossing), or rotating.
WEDGING_STEPS = frozenset(
    {"fillchk", "payload", "header", "commit", "abandon", "acommit", "fclear", "cc_seal"}
)


def _may_wedge(step: str) -> bool:
    return step in WEDGING_STEPS or step.startswith(("close.", "rot."))


@functools.cache
def explored(cfg: Config) -> Result:
    return explore(cfg)


RESULTS: dict[str, Result] = {}


@pytest.fixture(scope="module", autouse=True)
def _state_counts() -> Iterator[None]:
    yield
    if not RESULTS:
        return
    print("\nprotocol model: states explored")
    for name, r in RESULTS.items():
        print(
            f"  {name:22} {r.states:8} states {r.transitions:8} transitions "
            f"{r.finals:5} final {r.pruned:6} pruned {r.stalled:6} stalled {r.seconds:6.1f} s"
        )


def _record(r: Result, record_property: RecordProperty) -> None:
    RESULTS[r.config.name] = r
    for key in ("states", "transitions", "finals", "pruned", "stalled", "seq_inversions"):
        record_property(key, getattr(r, key))
    record_property("seconds", round(r.seconds, 2))


def _reject_signature(r: Result) -> bool:
    """The way into the wedge ends with a writer's Ring.reject fetch-or, or the
    first stalled state has a writer about to do it."""
    writers = r.stall_summary.split("writers ", 1)[1].split("\n", 1)[0]
    return " reject(" in r.stall_trace[-1] or "reject(" in writers


# -- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [pytest.param(c, id=c.name, marks=[WEDGE] if wedge else []) for c, wedge in LIVE],
)
def test_every_interleaving(cfg: Config, record_property: RecordProperty) -> None:
    """I1-I8 in every reachable state; and from every one the owner's close() can
    still drain every returned record into the file (I5, I7)."""
    r = explored(cfg)  # raises InvariantError, with its shortest trace, on I1-I8
    _record(r, record_property)
    assert r.finals, "no run finished: the bound (max_fills) is too tight"
    if r.stalled:
        trace = "\n".join([*r.stall_trace, r.stall_summary])
        if not _reject_signature(r):
            raise AssertionError(f"{r.stalled} stalled states, a new wedge:\n{trace}")
        raise StalledError(f"{r.stalled} stalled states; the shortest way in:\n{trace}")


@pytest.mark.parametrize(("cfg", "attribute"), [pytest.param(c, a, id=c.name) for c, a in DEATHS])
def test_writer_deaths(cfg: Config, attribute: bool, record_property: RecordProperty) -> None:
    """A writer may be killed before any step.  Safety (I1-I4, I6, I7 for every
    returned record, I8) holds in every state regardless; progress does not: the
    model has no dead-writer recovery (Config.recovery), so a death that leaves a
    claim uncommitted, a fill half closed or a buffer reserved wedges the run.
    The deaths that do are counted, by step and by what the dead lease's intent
    says then (recovery's evidence)."""
    r = explored(cfg)
    _record(r, record_property)
    wedging = {(step, intent) for step, intent, outcome in r.deaths if outcome == "wedges"}
    record_property("wedging_deaths", sorted(wedging))
    assert r.deaths
    assert wedging, "without recovery, some death must wedge the run"
    if attribute:
        harmless = sorted(step for step, _ in wedging if not _may_wedge(step))
        assert not harmless, f"deaths that should be harmless wedge the run: {harmless}"


@pytest.mark.parametrize(
    "cfg",
    [
        Config("xcheck-cross", ((16,), (8,)), capacity=16, timed_seal=False, max_fills=2),
        Config("xcheck-timed", ((8,), (8,)), capacity=16, max_fills=1),
        Config(
            "xcheck-chunk-sync",
            ((8,), (8,)),
            capacity=16,
            chunk=16,
            syncs=1,
            timed_seal=False,
            max_fills=1,
        ),
    ],
    ids=lambda c: c.name,
)
def test_reductions_keep_behaviour(cfg: Config, record_property: RecordProperty) -> None:
    """The merged steps (protocol_model: "Reductions") lose nothing: one step per
    shared-memory access gives the same final files and the same verdicts."""
    reduced = explored(cfg)
    full = explored(Config(**{**vars(cfg), "name": cfg.name + "-full", "reduce": False}))
    _record(reduced, record_property)
    RESULTS[full.config.name] = full
    record_property("states_unreduced", full.states)
    assert reduced.final_files == full.final_files
    assert bool(reduced.stalled) == bool(full.stalled)
    assert full.states > reduced.states


def test_seq_is_not_promised_in_file_order() -> None:
    """docs/format.md promises seq only as informative: two closers (two lanes)
    can interleave close_extent's fetch-and-adds on next_address and next_seq, so
    the fill with the lower address can get the higher seq.  The model finds it."""
    r = explored(next(c for c, _ in LIVE if c.name == "2lanes-cross"))
    assert r.seq_inversions


def test_recovery_is_modelled_in_chunk_mode_only() -> None:
    # protocol v2's writer stores no A_k/C_k: recovery's chunk half has nothing to read
    with pytest.raises(ValueError, match="chunk mode only"):
        explore(Config("recovery", ((8,),), recovery=True))


@pytest.mark.parametrize("cfg", RECOVERY, ids=lambda c: c.name)
def test_chunk_deaths_with_recovery_drain(cfg: Config, record_property: RecordProperty) -> None:
    """A writer killed at any step in chunk mode (with any prefix of the stores
    its program issued, and its store buffer still draining): I1-I8 hold, and
    from every reachable state the run can still finish (no further deaths):
    recovery keeps a dead chunk's finished records from A_k on, abandons the rest
    unless it is all zero, closes the fill (at capacity when the closer died
    before storing the extent), commits the deficit in row R and frees the slot;
    it finishes a dead rotator's reservation; return_chunks takes a dead writer's
    idle tail as anyone's.  Each of these happens in the run."""
    r = explored(cfg)
    _record(r, record_property)
    assert r.finals
    assert r.deaths
    if r.stalled:
        trace = "\n".join([*r.stall_trace, r.stall_summary])
        raise AssertionError(f"{r.stalled} stalled states after a death:\n{trace}")
    assert not [key for key in r.deaths if key[2] == "wedges"]
    for event in ("recovered", "recovery-abandoned", "recovered-reservation", "flusher-dead"):
        assert r.events[event] > 0, (event, r.events)


# -- protocol v3: chunks and the fence ---------------------------------------------------


def test_chunk_tails_are_returned_by_writer_sealer_and_flusher() -> None:
    """The chunk configurations reach every way a tail is returned: by its writer
    (slow path, step a), by a writer right after its own sync-seal, and by the
    flusher's return_chunks (candidates, fence, re-load, CAS); and a writer stops
    for good.  Counted over the transitions explored."""
    totals: Counter[str] = Counter()
    for cfg, _ in LIVE:
        if cfg.chunk:
            totals += explored(cfg).events
    assert totals["writer"] > 0, totals
    assert totals["sealer"] > 0, totals
    assert totals["flusher"] > 0, totals
    assert totals["stop"] > 0, totals
    sync = explored(next(c for c, _ in LIVE if c.name == "chunk-sync-stop"))
    assert sync.events["sealer"] > 0, sync.events
    stop = explored(next(c for c, _ in LIVE if c.name == "chunk-stop"))
    assert stop.events["flusher"] > 0, stop.events
    assert stop.stalled == 0  # a stopped writer holds nothing up


def test_put_without_the_fill_check_writes_into_a_reopened_buffer() -> None:
    """notes/chunks.md's put(), step 3, tests only SEALED.  Writer A is preempted
    between two appends (before its next put stores A_k = BUSY), holding a chunk
    with a tail.  Writer B's sync seals and closes the fill; the flusher returns
    A's tail (A_k is not BUSY), writes the fill and resets the buffer; B's
    rotation reopens it for the next fill.  A resumes: BUSY, the state word reads
    unsealed, and A writes its record into its old chunk's range, now part of the
    next fill, which nobody claimed there: the returned record is lost (I7).  The
    model's default (put_check="chunk", the code) then loads the writer's own
    chunk word C_k, which the flusher's CAS cleared before the fill could be
    taken, and passes (chunk-sync-stop above)."""
    cfg = Config(
        "chunk-sync-spec",
        ((8, 8), (8,)),
        chunk=CHUNK,
        syncs=1,
        timed_seal=False,
        max_fills=2,
        put_check="none",
    )
    with pytest.raises(InvariantError) as info:
        explore(cfg)
    assert info.value.invariant == "I7", str(info.value)
    trace = "\n".join(info.value.trace)
    assert "rc_cas -> f_idle" in trace  # the flusher returned the tail
    assert "[flush 0]" in trace  # ... and the fill was written and its buffer reset


def test_the_fence_is_needed_only_because_of_store_buffers() -> None:
    """With no store buffers (sb_depth=0: sequential consistency) the flusher may
    return chunks without the fence: nothing breaks.  With them (TSO) the same
    mutant loses a record (test_invariants_catch_defects[no-fence]): the store
    A_k = BUSY waits in the buffer while the writer's SEALED load goes ahead."""
    sc = Config(
        "no-fence-sc",
        ((8, 8), (8,)),
        chunk=CHUNK,
        syncs=1,
        timed_seal=False,
        max_fills=2,
        mutant="no-fence",
        sb_depth=0,
    )
    r = explore(sc)
    assert r.finals
    assert r.events["flusher"] > 0
    assert not r.stalled


# -- the reject wedge on the real code ---------------------------------------------------


def test_real_reject_does_not_seal_the_next_fill(ring_name: str, tmp_path: Path) -> None:
    """The model's shortest trace into the wedge (1lane-cross), on the real code.

    Writer C's record crosses capacity; writer A's fetch-and-add lands after C's,
    on the still unsealed fill, so A will call reject(i, old).  A is preempted
    there.  C closes fill 1, the flusher writes and resets the buffer, C's
    advance() rotates the lane onto the same buffer (fill 2) and C's retried
    append returns.  Then A's reject fetch-ors SEALED into fill 2: sealed with
    offset <= capacity, so no crossing writer will close it, and seal_due()
    skips sealed fills.  Fill 2, holding C's returned record, is never closed:
    the lane's writers wait for it, and the owner's close() gives up after 30 s.
    (Dead-writer recovery, after its timeout, takes it for a dead closer's fill
    and closes it; this test drives the protocol without it.)
    """
    path = tmp_path / "wedge.log"
    bare = make_bare(ring_name, path, buffer_size=4096, buffers=2, lanes=1, max_writers=4)
    core, ring, flusher, fd = bare.core, bare.ring, bare.flusher, bare.fd
    core.set_header(L.H_FLUSHER_START, _proc.start_time(os.getpid()))
    a: Writer | None = None
    try:
        cap = core.capacity
        ring.append(b"a" * (cap - 24))  # fill 1: [0, cap - 16)
        c = ring._slot()  # the crossing writer: this thread
        a = Writer(core, core.acquire_lease())  # writer A, same lane
        lane_word = core.words[core.lane_w[0]]
        i = lane_word & L.LANE_INDEX_MASK
        fill = lane_word >> L.LANE_FILL_SHIFT
        # Writer.claim's first steps, for C then A: intent, fetch-and-add.
        core.words[c.intent_w] = (fill << 32) | 24
        old_c = _atomic.fetch_add(core.state_addr[i], 24 << 32, _atomic.SEQ_CST)
        core.words[a.intent_w] = (fill << 32) | 16
        old_a = _atomic.fetch_add(core.state_addr[i], 16 << 32, _atomic.SEQ_CST)
        assert old_c >> 32 <= cap < (old_c >> 32) + 24  # C crossed capacity
        assert not old_a & L.SEALED  # A: reject() ahead
        assert old_a >> 32 > cap
        # C: Writer._claim_failed = clear intent, close_crossing, advance; the flusher
        # runs between C's close and C's rotation.
        core.words[c.intent_w] = 0
        core.close_crossing(i, old_c >> 32)
        flusher.take_ready()
        flusher.flush_pending(0.0)
        core.advance(c.lane, lane_word, None, c.intent_w)
        assert core.words[core.lane_w[0]] == L.lane_word(fill + 1, i)  # same buffer
        ring.append(b"c" * 16)  # C's record, retried in fill 2: returns
        # A resumes: Writer._claim_failed -> reject(i, old_a) -> advance.
        a._claim_failed(core, i, old_a, 16, lane_word, None)
        # The owner's close(): the flusher seals everything and drains.
        for _ in range(3):
            flusher.seal_due(0.0, closing=True)
            flusher.take_ready()
            flusher.flush_pending(0.0)
        assert flusher.all_idle(), f"b{i} stays {core.state(i):#x}: sealed, never closed"
        assert list(shmflush.read(path)) == [b"a" * (cap - 24), b"c" * 16]
    finally:
        if a is not None:
            a.release()
        ring.close()
        os.close(fd)
        L.unlink_segment(ring_name)


# -- the checks themselves ---------------------------------------------------------------


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_invariants_catch_defects(mutant: str) -> None:
    """Each defect of MUTANTS (the Rust crate's, among others) breaks its invariant
    within a few dozen steps; so the checks above are not vacuous."""
    if mutant in RECOVERY_MUTANTS:
        cfg = Config(
            mutant,
            ((8, 8), (8,)),
            chunk=CHUNK,
            deaths=1,
            recovery=True,
            timed_seal=False,
            max_fills=2,
            mutant=mutant,
        )
    elif mutant in CHUNK_MUTANTS:
        # a sync-seal between appends: the writer rests outside an append with a
        # chunk whose tail the flusher may return
        cfg = Config(
            mutant,
            ((8, 8), (8,)),
            chunk=CHUNK,
            syncs=1,
            timed_seal=False,
            max_fills=2,
            mutant=mutant,
        )
    elif mutant == "no-recheck":
        cfg = Config(mutant, ((16,), (16,)), close_race=True, max_fills=2, mutant=mutant)
    elif mutant == "no-fill-check":
        cfg = Config(mutant, ((16, 16), (8,)), max_fills=3, mutant=mutant)
    else:
        cfg = Config(mutant, ((24, 16), (16,)), timed_seal=False, max_fills=3, mutant=mutant)
    with pytest.raises(InvariantError) as info:
        explore(cfg)
    assert info.value.invariant == MUTANTS[mutant], str(info.value)
    assert info.value.trace
