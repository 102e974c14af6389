"""An explicit-state model of the ring protocol, explored over every interleaving.

What is modelled
----------------
The writers' side of shmflush/_api.py (``Ring.append``'s fast path, ``_claim``,
``_claim_failed``), shmflush/_ring.py (``close_crossing``, ``_close_fill``,
``reject``, ``seal``, ``advance``, ``wait_for_space``, ``rotate`` with its
``INTENT_ROTATING`` marker, ``fill_done``, ``_reserve``, ``_unreserve``,
``_open``), the flusher's side of shmflush/_flusher.py (``seal_due``,
``take_ready``, ``flush_pending``, ``write_fill``'s extent check, ``reset``,
``all_idle``) and the owner's ``close()``.  Every atomic operation and every plain
load or store of a shared word in that code is one transition (but see
"Reductions"), computed with the real constants and helpers of
shmflush/_layout.py (``SEALED`` ... ``RESERVED``, ``OFFSET_SHIFT``,
``claim_delta``, ``lane_word``, ``LANE_INDEX_MASK``, ``LANE_FILL_SHIFT``,
``INTENT_ROTATING``) and ``_format.segment_size``.  The state is a hashable tuple:

* the shared words: per buffer the state word and ``D_FILL``, ``D_USED``,
  ``D_ADDRESS``, ``D_SEQ``, ``D_BASE``; the lane words; ``next_address``,
  ``next_seq``, ``fill_counter``, ``status``; per lease slot the intent and the
  commit counters;
* the bytes, abstractly: per buffer the ranges its claims occupy, as cells
  ``(offset, size, kind, writer, record, fill)`` with kind CLAIMED (zeros),
  PAYLOAD (payload, no header yet), DATA or ABANDONED; the file as a sorted tuple
  of segments ``(address, size, seq, fill, records)``;
* ghosts, which no real code reads: per buffer the extent its current fill was
  closed with, and whether that fill was written;
* each actor's program counter and the locals it still needs (dead locals are
  cleared, so equal situations are one state).

Writer w holds lease slot w and uses lane ``w % lanes``; it appends its records
one after another.  The flusher picks its next operation freely: seal any open
non-empty fill (time-based seal: time is abstracted away), take any ready fill,
flush what it took, check ``all_idle`` once the owner is closing; a superset of
its real pass order.  The owner closes (sets CLOSING) once every writer is done,
or at any moment with ``close_race``.  A run *finishes* when the flusher has
drained and stopped, every writer is done (or stopped) and every store buffer
is empty.

Protocol v3: chunk claims and the fence (``Config.chunk``)
-----------------------------------------------------------
``chunk=None`` is protocol v2 as above: one claim per record, sequentially
consistent.  ``chunk=0`` is v3's fallback (want = need: each chunk is one
record, written under the install's BUSY; no membarrier, so the flusher returns
no chunks); ``chunk=n`` is v3's fence mode with ``want = n`` bytes.  Both follow
notes/chunks.md, which the lead implements in _api.py/_ring.py/_flusher.py:

* more shared words per slot: A_k (``AT``: the writer's offset in the record
  area, ``| BUSY`` inside an append) and C_k (``CHUNKW``:
  ``L.claim_intent(lane_word, end)``, read back with ``L.intent_buffer``,
  ``L.intent_fill_tag`` and ``INTENT_SIZE_MASK``), and a row R of commit
  counters (index ``writers``) for the flusher's returns;
* the writer's Python locals ``(i, pos, end, c)`` (``CHL``); delta is implicit:
  a commit stores the writer's own view of its counter plus the bytes;
* claim: lane word, a plain load of the state word's offset for
  ``w = min(want, capacity - off)`` (or need when that is less than need), the
  fetch-and-add, D_FILL; success installs (A_k = start | BUSY, C_k) and writes
  the first record without the SEALED check; crossing, rejected and stale fill
  as in v2 (the stale claim becomes one ABANDONED record of w bytes);
* put (_ring.Writer.put): A_k = pos | BUSY, load the state word, then load
  the writer's own C_k (``Config.put_check``), payload+header, counter,
  A_k = pos + s; on SEALED or C_k != c: A_k = pos, then the slow path;
* a fresh chunk (``_install``): A_k = start | BUSY, C_k = c, intent = 0; its
  first record is a put() whose seal word is H_ZERO (always zero: no SEALED
  test; its repeated A_k = start | BUSY is not modelled, the same value next
  in the FIFO) but which still loads C_k; later puts test the state word
  (``fresh()``);
* slow path step a (``return_chunk``): when the tail is not empty,
  CAS(C_k: c -> c | CHUNK_RETURNING), and if it won the tail's commit
  (padding, cell kind PAD) and a plain C_k = 0; a plain C_k = 0 when it is
  empty;
* a writer may sync (``Config.syncs`` times) between appends: read the lane
  word, ``seal`` (fetch-or; it closes the fill if it sealed it), then return
  its own chunk (step a);
* a writer may stop for good between appends (``Config.stops``): not BUSY, it
  holds nothing up, so progress is still required;
* the flusher's return_chunks: the candidates (one snapshot: see
  ``Model._candidates``; a word with CHUNK_RETURNING is skipped; liveness is
  not looked at), the fence, then per candidate a re-load of A_k and the CAS
  c -> 0 on C_k with the commit of the tail in row R (one step: only the
  flusher reads row R).

The model's own finding: put()'s step 3 as first written (SEALED only) lets a
writer preempted between appends write into a reopened buffer: the flusher
returned its chunk's tail, the fill was written, the buffer reset and reopened,
and the state word reads unsealed again (``put_check="none"``).  The code's fix
(``put_check="chunk"``, the default) is a second load, of C_k, after the state
word's, each its own step: the flusher's CAS clears C_k before the fill can be
taken, and loads are not reordered, so a state word of the reopened fill
implies C_k != c.  The order matters: loading C_k first (mutant
``recheck-first``) loses a record, even when the writer's A_k = BUSY sits in
its store buffer only, because a fence that ran before that store lets the
flusher's re-load see A_k idle.  ``put_check="fill"`` (D_FILL compared with the
chunk's fill tag, in the state word's load step) is an equivalent witness.

Deaths and recovery in chunk mode (``Config.deaths`` with ``Config.recovery``)
--------------------------------------------------------------------------------
A writer is killed before any of its steps, after any prefix of the plain
stores its program issued since its last load or atomic (``PEND``; an append
whose ``("ret",)`` marker is cut off did not return); its store buffer keeps
draining.  A record's payload and its header are then two stores (PAYLOAD,
then DATA).  With recovery the writer's intents are stored (through the store
buffer): the claim's before its fetch-and-add, cleared after ``_install`` (or
after a stale claim's abandon), ``INTENT_SEALING | i << 32`` around a crossing
writer's close and a sync's seal, rotate's marker; and a close stores
D_EXTENT_OF last.  Recovery (shmflush/_recovery.py ``Recovery.run``) runs in
the flusher at any moment (time is abstracted) on any buffer it could find
stuck, once a writer is dead and its store buffer drained (the recovery
timeout dwarfs a drain): ``scan_leases`` as one snapshot (live chunk, busy or
not, live claim or sealer on the buffer: hands off; a live rotator: no
``_reservation``), then ``_reservation`` (open the dead rotator's buffer if a
lane names it, else unreserve), or ``Ring.seal`` of an open fill holding a dead
claim or chunk, or ``_resolve`` as one more step: keep a dead chunk's
finished records from A_k on, abandon the rest unless it is all zero, close
the fill (at capacity when the extent was not stored), commit the deficit in
row R, free the slots (A_k, intent, C_k = 0).  The ghost then turns the dead
writers' zero cells, and [last claim, used), into padding; a dead writer's
payload without a header that recovery left is an I2 violation.  Not modelled
there: ``sweep`` (it frees slots; the model never reuses one), the filler
segments over an address a closer took and never recorded (the file may then
have a hole: I3 checks only for overlaps with recovery), ORPHANED slots
(settle), the holder word and pid reuse.

Memory model (chunk mode): x86-TSO for the writers
----------------------------------------------------
Every plain store of a writer to a shared word (A_k, C_k, the commit counters,
a record's payload and header, an ABANDONED header, D_FILL in rotate, D_USED /
D_ADDRESS / D_SEQ in close) goes into the writer's FIFO store buffer
(``SBUF``, at most ``Config.sb_depth`` entries: a store into a full buffer first
drains the oldest, a bound of the model); the writer's own loads read its
newest buffered store to the same word first (store forwarding); a transition
``("B", w)`` commits the oldest buffered store to memory; a locked instruction
of the writer (fetch-and-add, CAS, fetch-or) drains its whole buffer first; the
flusher's fence (membarrier) drains every writer's buffer in one transition.
Everyone else's loads read memory.  Loads are not reordered with loads, nor
stores with stores (TSO).  The flusher and the owner are modelled SC: the
flusher's few plain stores (row R, base, reset, its closes) are either its own
words or followed by its atomics before anyone can read them.  Claim intents
are not stored in chunk mode without recovery, and rotate's INTENT_ROTATING
marker is then stored directly, as in v2: nobody reads intents without
recovery, so when they reach memory changes no one's behaviour.  With
recovery they go through the store buffer.  ``sb_depth=0`` makes the
writers SC too.

A writer step ends with at most one load or locked instruction; the plain
stores that come before it in program order are put into the buffer at the
start of that step (``PEND`` holds them meanwhile), never at the end of the
step before: issuing a store is invisible to everyone but the writer, so
issuing it later loses nothing (a drain can follow at once), but issuing it
earlier could let a fence drain a store that the program issues after it.
I7 counts a returned record whose DATA store is still in the buffer or in
``PEND``.

Not modelled: semaphores and sleeps (every wait has a timeout, so a wait is a
retry), ``H_WAITERS``, heartbeats, I/O errors and ``STATUS_BROKEN``, the
flusher's or the owner's death and the flusher restart (``resume``, and the
``D_DURABLE`` word), dead-writer recovery in protocol v2 (``Config.recovery``
needs chunk mode; see above), v2's ``sync()`` (and ``INTENT_SEALING`` outside
recovery; in chunk mode its seal and own return are modelled, not its wait for
durability, and it seals only its lane's fill), the writer's exception
handlers (``settle``, ``_settle_chunk``, ``_orphan``), the writer's release
(a finished writer keeps its chunk; the flusher returns its tail), the
adaptive ``want``, ``claim_large`` (every modelled claim is below
``faa_limit``), batches (``append_many``/``append_array`` claim a larger size and
commit once: the same transitions), ``reserve()``, lease acquisition, fdatasync
(a write is durable at once), the write thread pool (each fill has its own
address, so the order of writes does not matter), payload bytes (a record is
named by (writer, index)) and CRCs.  Fill numbers are bounded
(``Config.max_fills``): a rotation that would take a larger one is cut off and
counted as *pruned*; the progress verdicts treat a pruned state as one that may
finish.

Reductions (``Config.reduce``, on by default)
----------------------------------------------
Steps that commute with every step of every other actor are run together with
the step before them; test_model checks on small configurations that the full
model (one step per access) reaches the same final files and verdicts.

* A fetch-and-add on a *sealed* state word leaves the model's word alone, and a
  sealed word's offset is kept at 0: every reader of a sealed word looks only at
  its flags, and a CAS that fails only because a claim moved the offset retries.
  Not in chunk mode: a claim's width comes from a plain load of the offset,
  which may be a sealed word's that reopens before the claim lands.
* A load followed by a CAS of the same word in a retry loop (``_reserve``,
  ``_unreserve``, ``_open``, ``reset``; seal_due's load before ``seal``'s
  fetch-or) is one step: a failed CAS leads to what a later load would have.
  Under TSO a writer's CAS is merged into the step before it only when its
  store buffer (and PEND) is empty, so that its drain changes nothing.
* Plain stores nobody reads in the modelled runs (intents, without recovery; the
  extent stores before CLOSED; the base), the record's payload and header
  stores (without deaths), reads of ``status`` while nobody can change it (no
  close race), and the fill counter's fetch-and-add (it only renames fills).
  Under TSO: the extent stores still go through the buffer (they are read only
  after CLOSED, whose fetch-or drains them); payload and header are one
  buffered store (adjacent in the FIFO; only the take's check would tell
  PAYLOAD from CLAIMED, and it rejects both); the fill counter's fetch-and-add
  merges only with an empty buffer, as above; ``status`` is not merged when a
  writer may sync or stop (they happen at it).
* take_ready's CAS, the write and the reset's zeroing are one step with the
  reset's CAS, done once the fill is ready: writers cannot tell FLUSHING from
  SEALED|CLOSED, the base and the file are the flusher's alone, and a ready
  fill stays ready (its commit counters cannot pass ``used``).  Its reads of
  ``used``, the counters and the base are one snapshot: the counters only grow
  and never pass ``used``, so a snapshot that says "ready" is right.  Under
  TSO the writers' counters in memory still only grow, and a counter store
  drains after the record's stores before it (FIFO).

Invariants (design notes, section 4), and where they are checked
------------------------------------------------------------------
* I1 at every successful claim: its range lies in [0, capacity) of one buffer and
  overlaps no other live claim there.
* I2 when the flusher takes a fill and when it writes it: SEALED|CLOSED, and the
  claims tile [0, used) with complete (DATA or ABANDONED) records and returned
  tails (PAD).  In chunk mode also: a tail is returned once, only over the
  chunk's unwritten rest (never over a record), no record is written into a
  returned tail; and in every state a closed fill's commit counters never pass
  its ``used`` (take_ready's sum test relies on it).
* I3 at every close and write: one close per fill, a 4 KiB-aligned address that
  was handed out, the flusher writes the extent the closer stored, segments never
  overlap; at the end, the segments tile [0, next_address) (no holes).
* I4 at every reset and reservation: a fill is reset only after it was written
  (or was empty), a reserved or reopened buffer holds nothing, and writers never
  write into a taken, idle or reserved buffer.
* I6 at every claim and record write: a claim whose fill check passes lies in the
  fill its lane word named, and the lane still names it; a stale claim is
  abandoned; a buffer opens only while its lane names its fill.
* I7 in every state: each record whose append returned is exactly once either in
  the file or in a DATA cell of a fill not yet written; no record is anywhere
  twice.  At the end: it is in the file, once.  (I5: the end is the owner's
  close(), which also requires every buffer IDLE.)
* I8 at every write and at the end: one writer's records are in the file in
  append order, by (address, offset).
* Progress, over the whole state graph: the states from which no finished run
  (nor a pruned state) can be reached are *stalled*.  Without deaths there must
  be none.
* The overshoot bound of _ring: an open fill's offset stays at most
  ``capacity + writers * faa_limit``.

``MUTANTS`` lists deliberate defects (``Config.mutant``) that the invariants
must catch; test_model checks that they do.

Writer deaths (SIGKILL, ``Config.deaths``): a writer may stop for good before
any of its steps.  Safety is checked as above; without recovery progress is
only recorded; with recovery (chunk mode) no state may be stalled.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shmflush import _format
from shmflush import _layout as L
from shmflush._ring import MOVED, NO_SPACE, NOT_DONE

SEALED = L.SEALED
FLUSHING = L.FLUSHING
CLOSED = L.CLOSED
IDLE = L.IDLE
RESERVED = L.RESERVED
READY = SEALED | CLOSED  # _flusher._READY
SHIFT = L.OFFSET_SHIFT
MASK64 = L.WORD_MASK
STOPPED = L.STATUS_CLOSING | L.STATUS_FLUSHER_DONE  # what rotate()/check_status() test
#: A_k's "inside an append" bit (protocol v3); the lead adds it as L.AT_BUSY
BUSY = getattr(L, "AT_BUSY", 1)

#: frame[3] of a writer at "status" between two appends (sync and stop happen there)
BETWEEN = 1

# Cell kinds.  PAD: a chunk's tail, returned unwritten (zeros: padding in the file).
CLAIMED, PAYLOAD, DATA, ABANDONED, PAD = range(5)
KIND_NAMES = ("CLAIMED", "PAYLOAD", "DATA", "ABANDONED", "PAD")
#: the record number of a cell that is a chunk's unwritten rest (not a record)
CHUNK_REST = -1

#: writer steps that are locked instructions (fetch-and-add, CAS, fetch-or): under
#: TSO they drain the writer's store buffer first
ATOMIC_W = frozenset(
    {"faa", "cc_seal", "reject", "r_cas", "y_or", "y_cas"}
    | {f"{p}.{q}" for p in ("close", "yclose") for q in ("cf_addr", "cf_seq", "cf_closed")}
    | {f"rot.{q}" for q in ("r_cas", "r_fc", "r_lcas", "u_cas", "o_cas")}
)
#: writer pcs that the chunk writer (Model._cwriter) runs itself
CHUNK_PCS = frozenset(
    {"status", "lane", "c_off", "faa", "fillchk", "p_sealed", "p_chunk", "r_cas", "fin"}
    | {"y_or", "yclose", "y_cas"}
)

# Fields of the state tuple.
(
    ST,  # state word per buffer
    FILLW,  # D_FILL per buffer
    USED,  # D_USED per buffer
    ADDR,  # D_ADDRESS per buffer
    SEQ,  # D_SEQ per buffer
    BASE,  # D_BASE per buffer
    LANES,  # lane words
    NEXT_ADDR,  # H_NEXT_ADDRESS
    NEXT_SEQ,  # H_NEXT_SEQ
    FILL_CTR,  # H_FILL_COUNTER
    STATUS,  # H_STATUS
    INTENT,  # L_INTENT per lease slot
    COMMITS,  # commit counters [slot][buffer]
    CELLS,  # records per buffer (abstract bytes)
    FILE,  # segments written (abstract file)
    GCLOSE,  # ghost: (fill, address, used, seq) of the buffer's closed fill, or None
    GWRITTEN,  # ghost: the buffer's current fill was written
    WRITERS,  # writer frames
    FLUSHER,  # flusher frame
    OWNER,  # owner pc
    DEATHS,  # writers killed so far
    AT,  # L_AT (A_k) per lease slot (chunk mode)
    CHUNKW,  # L_CHUNK (C_k) per lease slot (chunk mode)
    SBUF,  # per writer, its store buffer: ((location, value), ...), oldest first
    PEND,  # per writer, plain stores it issues at the start of its next step
    CHL,  # per writer, its chunk (Python locals): (i, pos, end, c) or None
    SYNCS,  # per writer, the sync-seals it has done
    STOPS,  # writers stopped for good so far
    EXTOF,  # D_EXTENT_OF per buffer (chunk mode with recovery; else 0)
) = range(29)

#: the state field of each store-buffer location kind (besides "K" and "R")
_LOC_FIELD = {
    "A": AT,
    "C": CHUNKW,
    "I": INTENT,
    "FW": FILLW,
    "U": USED,
    "AD": ADDR,
    "SQ": SEQ,
    "EO": EXTOF,
}

FIELD_NAMES = (
    "state",
    "fill",
    "used",
    "address",
    "seq",
    "base",
    "lanes",
    "next_address",
    "next_seq",
    "fill_counter",
    "status",
    "intent",
    "commits",
    "cells",
    "file",
    "gclose",
    "gwritten",
)

FINISHED = frozenset({"done", "raised", "dead", "stopped"})

State = tuple[Any, ...]
Tag = tuple[Any, ...]


class InvariantError(Exception):
    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(f"{invariant}: {message}")
        self.invariant = invariant
        self.message = message
        self.trace: list[str] = []

    def __str__(self) -> str:
        text = f"{self.invariant}: {self.message}"
        if self.trace:
            text += "\ntrace:\n  " + "\n  ".join(self.trace)
        return text


class PrunedError(Exception):
    """A transition beyond the model's bound on fill numbers."""


@dataclass(frozen=True)
class Config:
    name: str
    #: per writer, the sizes of its records in bytes (8 + align8(n): 8, 16, 24, ...)
    records: tuple[tuple[int, ...], ...]
    buffers: int = 2
    lanes: int = 1
    #: bytes of the record area per buffer (``Geometry.capacity``)
    capacity: int = 32
    #: how many writers may be killed (SIGKILL) at any step
    deaths: int = 0
    #: which writers may be killed (default: all)
    mortal: tuple[int, ...] | None = None
    #: the owner may close while writers are still appending
    close_race: bool = False
    #: the flusher's time-based seal (seal_due) may seal any open non-empty fill
    timed_seal: bool = True
    #: fill numbers above this are cut off (the transition is pruned)
    max_fills: int = 8
    #: dead-writer recovery in the flusher (chunk mode only: see "Deaths and recovery")
    recovery: bool = False
    #: model the *proposed* fix of Ring.reject instead of the current code
    reject_fix: bool = True  # the code's reject (compare-and-swap); False: the old fetch_or
    #: partial-order reductions (see the module docstring); False: one step per access
    reduce: bool = True
    #: a deliberate defect, to show that the invariants catch it (see MUTANTS)
    mutant: str = ""
    #: protocol v3 (chunk claims, docs: notes/chunks.md): the adaptive chunk size
    #: ``want`` in bytes; 0: the v3 fallback (want = need, no membarrier, the
    #: flusher returns no chunks); None: protocol v2 (one claim per record, the
    #: old writer; sequentially consistent)
    chunk: int | None = None
    #: store-buffer depth per writer (chunk mode, x86-TSO); a store into a full
    #: buffer first drains the oldest entry (a bound of the model, not of x86)
    sb_depth: int = 2
    #: per writer, how many times it may sync-seal its lane's fill between appends
    #: (Ring.sync: seal, close if it sealed, return its own chunk)
    syncs: int = 0
    #: how many writers may stop for good between appends (chunk mode)
    stops: int = 0
    #: put(), step 3's re-check after the SEALED test: "chunk" (the code,
    #: _ring.Writer.put: a second load, of the writer's own chunk word C_k, after
    #: the state word's); "fill" (an alternative witness: D_FILL, in the state
    #: word's cache line, compared with the chunk's fill tag in the same load
    #: step); "none" (notes/chunks.md as first written: the SEALED test alone,
    #: which misses a returned chunk whose buffer was reset and reopened)
    put_check: str = "chunk"


#: Defects of the seed's Rust crate (design notes, section 3), and others, that
#: Config.mutant injects; the invariant that must catch each.
MUTANTS = {
    "no-fill-check": "I6",  # claims in a recycled buffer are kept, not abandoned
    "take-unclosed": "I2",  # the flusher takes a sealed fill before its closer is done
    "take-uncommitted": "I2",  # the flusher takes a fill with writers still copying
    "unpadded": "I3",  # addresses advance by unpadded sizes
    "drop-crossing": "I7",  # the crossing claim's record is reported, not retried
    "no-zero": "I7",  # a buffer is reused without zeroing: stale records read as live
    "no-recheck": "I5",  # rotate() does not re-check CLOSING after reserving
    # protocol v3 (chunk mode)
    "no-fence": "I2",  # return_chunks without membarrier: a tail returned over a record
    "return-busy": "I2",  # the flusher returns a chunk whose A_k is BUSY
    "no-seal-check": "I2",  # put() does not load the state word after A_k = BUSY
    "double-return": "I2",  # the writer returns its tail without the CAS on C_k: twice
    "recheck-first": "I7",  # put() loads C_k BEFORE the state word (loads in the wrong order)
    # dead-writer recovery (chunk mode, deaths)
    "recover-live-chunk": "I2",  # recovery's scan ignores a live writer's chunk (not BUSY)
}
#: the mutants that need chunk mode
CHUNK_MUTANTS = frozenset(
    {"no-fence", "return-busy", "no-seal-check", "double-return", "recheck-first"}
    | {"recover-live-chunk"}
)
#: the mutants that need recovery (and a death)
RECOVERY_MUTANTS = frozenset({"recover-live-chunk"})


def fmt_word(word: int) -> str:
    flags = [
        n
        for n, b in (("S", SEALED), ("F", FLUSHING), ("C", CLOSED), ("I", IDLE), ("R", RESERVED))
        if word & b
    ]
    return f"{word >> SHIFT}{'|' if flags else ''}{''.join(flags)}"


def fmt_lane(word: int) -> str:
    return f"(fill {word >> L.LANE_FILL_SHIFT}, b{word & L.LANE_INDEX_MASK})"


def _put(t: tuple[Any, ...], i: int, v: Any) -> tuple[Any, ...]:
    return (*t[:i], v, *t[i + 1 :])


def _tiling_error(cells: tuple[Any, ...], used: int) -> str | None:
    """Why *cells* are not complete records tiling [0, used) exactly, or None."""
    pos = 0
    for off, size, kind, w, rec, _fill in cells:
        if off != pos:
            return f"bytes [{pos}, {off}) hold no claim" if off > pos else f"overlap at {off}"
        if kind not in (DATA, ABANDONED, PAD):
            return f"record W{w}#{rec} at offset {off} is {KIND_NAMES[kind]} (not committed)"
        pos += size
    if pos != used:
        return f"claims cover [0, {pos}) but used is {used}"
    return None


class Model:
    def __init__(self, cfg: Config) -> None:
        if not 1 <= cfg.lanes < cfg.buffers:
            raise ValueError("lanes must be between 1 and buffers - 1")
        self.cfg = cfg
        self.nw = len(cfg.records)
        self.nb = cfg.buffers
        self.cap = cfg.capacity
        self.lane_of = tuple(w % cfg.lanes for w in range(self.nw))
        # _ring.Ring.faa_limit with max_writers = number of writers.
        self.faa_limit = min(cfg.capacity, ((1 << 32) - 1 - cfg.capacity) // self.nw)
        for recs in cfg.records:
            for size in recs:
                if size % 8 or not 8 <= size <= min(self.cap, self.faa_limit):
                    raise ValueError(f"record size {size} is not a fetch-and-add claim")
        self.mortal = frozenset(range(self.nw) if cfg.mortal is None else cfg.mortal)
        #: protocol v3; fence mode (chunks, return_chunks, membarrier) when chunk > 0
        self.chunked = cfg.chunk is not None
        self.fence_mode = bool(cfg.chunk)
        #: x86-TSO store buffers for the writers' plain stores (chunk mode only)
        self.tso = self.chunked
        self.row_r = self.nw  # the flusher's row of commit counters
        if cfg.recovery and not self.chunked:
            raise ValueError("dead-writer recovery is modelled in chunk mode only")
        #: chunk mode with recovery: the intents (claim, SEALING, ROTATING) and
        #: D_EXTENT_OF are stored, through the store buffer (recovery reads them)
        self.store_intents = self.chunked and cfg.recovery
        if not self.chunked and (cfg.syncs or cfg.stops or cfg.mutant in CHUNK_MUTANTS):
            raise ValueError("syncs, stops and the chunk mutants need chunk mode")
        if self.chunked and cfg.mutant and cfg.mutant not in CHUNK_MUTANTS:
            raise ValueError(f"mutant {cfg.mutant!r} is a protocol v2 one")
        #: the reduction "a sealed word's offset is dead": not in chunk mode, where
        #: the claim's width comes from a plain load of the offset, which may be
        #: a sealed (or idle, reserved) word's that reopens before the claim lands
        self.dead_sealed_offset = cfg.reduce and not self.chunked
        #: transitions that return a chunk's tail, by who: "writer", "sealer", "flusher"
        self.events: Counter[str] = Counter()
        # Steps that commute with every step of every other actor: executed at once,
        # as part of the step before them (see "Reductions" in the module docstring).
        quiet_w: set[str] = set()
        quiet_f: set[str] = set()
        if cfg.reduce:
            quiet_f |= {"s_or", "close.cf_store", "t_base_store", "w_write", "x_zero", "x_load"}
            quiet_w |= {"rot.o_load", "rot.u_load", "rot.r_cas", "rot.r_fc"}
            if self.nb == 2:
                quiet_w.add("rot.r_lanes")  # two buffers: the candidate order is fixed
            if not cfg.close_race:
                quiet_w |= {"adv_status", "rot.r_status", "rot.r_status2"}
                # chunk mode: sync and stop happen at "status", so it must be a state
                if not (cfg.syncs or cfg.stops):
                    quiet_w.add("status")
            if self.chunked:
                # intents: nobody reads them (no deaths, no recovery); the model
                # stores none in the chunk writer's own steps
                quiet_w |= {"fclear", "rot.r_intent", "rot.r_iclr"}
                quiet_w |= {"close.cf_store", "yclose.cf_store"}
            if not cfg.deaths and not cfg.recovery:
                quiet_w |= {"intent", "fclear", "aiclear", "payload", "header", "iclear"}
                quiet_w |= {"rot.r_intent", "rot.r_iclr"}
                quiet_w.add("close.cf_store")
        self.quiet_w = frozenset(quiet_w)
        self.quiet_f = frozenset(quiet_f)
        # check_state's I7 verdicts, by (file, cells, written, returned counts)
        self._records_ok: set[tuple[Any, ...]] = set()

    # -- states ---------------------------------------------------------------------

    def initial(self) -> State:
        nb, nw = self.nb, self.nw
        zeros = (0,) * nb
        rows = nw + 1 if self.chunked else nw  # + the flusher's row R
        writers = tuple(
            ("status" if recs else "done", 0, 0, BETWEEN if self.chunked else 0, None)
            for recs in self.cfg.records
        )
        return (
            (IDLE | SEALED,) * nb,  # init_header: every buffer IDLE|SEALED
            zeros,
            zeros,
            zeros,
            zeros,
            zeros,
            tuple(L.lane_word(0, k) for k in range(self.cfg.lanes)),
            0,
            0,
            1,  # fill numbers start at 1
            0,
            (0,) * nw,
            (zeros,) * rows,
            ((),) * nb,
            (),
            (None,) * nb,
            (False,) * nb,
            writers,
            ("f_idle", 0, 0, 0, 0, 0, (), None),
            "o_run",
            0,
            (0,) * nw,  # AT
            (0,) * nw,  # CHUNKW
            ((),) * nw,  # SBUF
            ((),) * nw,  # PEND
            (None,) * nw,  # CHL
            (0,) * nw,  # SYNCS
            0,  # STOPS
            zeros,  # EXTOF
        )

    def is_final(self, s: State) -> bool:
        return (
            s[FLUSHER][0] == "f_done"
            and s[OWNER] == "o_wait"
            and all(f[0] in FINISHED for f in s[WRITERS])
            and not any(s[SBUF])
            and not any(s[PEND])
        )

    def returned(self, s: State, w: int) -> int:
        """How many of writer w's appends have returned."""
        return int(s[WRITERS][w][1])

    # -- transitions ----------------------------------------------------------------

    def tags(self, s: State) -> Iterator[Tag]:
        writers = s[WRITERS]
        for w, frame in enumerate(writers):
            if frame[0] not in FINISHED:
                yield ("W", w)
                if frame[0] == "status" and frame[3] == BETWEEN:
                    if s[SYNCS][w] < self.cfg.syncs:
                        yield ("W", w, "sync")
                    if s[STOPS] < self.cfg.stops:
                        yield ("S", w)
            if s[SBUF][w]:
                yield ("B", w)  # the oldest buffered store reaches memory
        if s[DEATHS] < self.cfg.deaths:
            for w, frame in enumerate(writers):
                if frame[0] not in FINISHED and w in self.mortal:
                    # Under TSO the stores the program issues before its next load
                    # or atomic wait in PEND: the kill lands after any prefix of
                    # them (("ret",) marks where an append returned).
                    for n in range(len(s[PEND][w]) + 1):
                        yield ("D", w, n) if n else ("D", w)
        if s[OWNER] == "o_run" and (self.cfg.close_race or all(f[0] in FINISHED for f in writers)):
            yield ("O",)
        fl = s[FLUSHER]
        if fl[0] == "f_idle":
            closing = s[STATUS] & L.STATUS_CLOSING
            states = s[ST]
            for i, st in enumerate(states):
                # seal_due: an open fill, non-empty unless the owner is closing.
                if not st & SEALED and (closing or (st >> SHIFT and self.cfg.timed_seal)):
                    yield ("F", "seal", i)
                # take_ready
                ready = READY if self.cfg.mutant != "take-unclosed" else SEALED
                if st & (ready | FLUSHING | IDLE | RESERVED) == ready:
                    if not self.cfg.reduce:
                        yield ("F", "take", i)
                    elif (
                        self._committed(s, i) == s[USED][i] or self.cfg.mutant == "take-uncommitted"
                    ):
                        yield ("F", "flush", i)  # take, write and reset in one step
            if self.fence_mode and self._candidates(s):
                yield ("F", "ret")  # return_chunks
            if fl[6]:
                yield ("F", "flush")
            elif closing and states[0] & IDLE:
                yield ("F", "all_idle")
            if self.cfg.recovery:
                yield from self._recovery_tags(s)
        elif fl[0] != "f_done":
            yield ("F",)

    def _candidates(self, s: State | list[Any]) -> tuple[tuple[int, int], ...]:
        """return_chunks, step 1: (slot, C_k) of every chunk the flusher may return.

        One snapshot of C_k, the fill's state and number, and A_k.  The loads of
        the real scan are not simultaneous; but a candidate only leads to the fence
        (harmless: it drains, as the drain steps may) and to a re-load of A_k and
        a CAS on C_k, which succeeds only while C_k still holds the value read (a
        chunk word never comes back: its end offset grows within a fill), so a
        snapshot at the re-load's time would have listed it too.
        """
        out = []
        for k in range(self.nw):
            c = s[CHUNKW][k]
            if not c:
                continue
            if c & L.CHUNK_RETURNING:
                continue  # its holder won the tail and is committing it
            i = L.intent_buffer(c)
            st = s[ST][i]
            if st & (SEALED | FLUSHING | IDLE | RESERVED) != SEALED:
                continue
            if s[FILLW][i] & 0xFFFF != L.intent_fill_tag(c):
                continue
            a = s[AT][k]
            if a & BUSY and self.cfg.mutant != "return-busy":
                continue
            if a & ~BUSY >= c & L.INTENT_SIZE_MASK:
                continue
            out.append((k, c))
        return tuple(out)

    def _committed(self, s: State, i: int) -> int:
        """Ring.committed(i)."""
        total = sum(int(c[i]) for c in s[COMMITS])
        return (total - int(s[BASE][i])) & MASK64

    @staticmethod
    def _wpc(frame: tuple[Any, ...]) -> str:
        pc, sub = frame[0], frame[4]
        if pc == "rot":
            return f"rot.{sub[1]}"
        if pc in ("close", "yclose"):
            return f"{pc}.{sub[0]}"
        return str(pc)

    @staticmethod
    def _fpc(frame: tuple[Any, ...]) -> str:
        return f"close.{frame[7][0]}" if frame[0] == "close" else str(frame[0])

    def apply(self, s: State, tag: Tag) -> State:
        m = list(s)
        kind = tag[0]
        if kind == "W":
            w = tag[1]
            if self.tso:
                self._issue(m, w)
            if len(tag) > 2:  # Ring.sync between appends: read the lane word
                rec = m[WRITERS][w][1]
                self._set(m, SYNCS, w, m[SYNCS][w] + 1)
                lw = m[LANES][self.lane_of[w]]
                if self.store_intents:  # the lease says "sealing" around the seal
                    i = lw & L.LANE_INDEX_MASK
                    self._pend(m, w, (("I", w), L.INTENT_SEALING | (i << 32)))
                self._set(m, WRITERS, w, ("y_or", rec, lw, 0, None))
            else:
                self._wstep(m, w)
            while self._quiet_next(m, w):
                self._wstep(m, w)
        elif kind == "B":
            self._drain_one(m, tag[1])
        elif kind == "S":  # stops for good, outside an append (A_k not BUSY)
            w = tag[1]
            self._issue(m, w)
            rec = m[WRITERS][w][1]
            m[WRITERS] = _put(m[WRITERS], w, ("stopped", rec, 0, 0, None))
            m[STOPS] += 1
            self.events["stop"] += 1
        elif kind == "D":
            w = tag[1]
            rec = m[WRITERS][w][1]
            if self.tso:
                cut = tag[2] if len(tag) > 2 else 0
                # an append whose return marker is cut off did not return
                rec -= sum(1 for e in m[PEND][w][cut:] if e[0] == "ret")
                self._set(m, PEND, w, m[PEND][w][:cut])
                self._issue(m, w)  # its store buffer still drains ("B")
                self._set(m, CHL, w, None)  # dead locals
            m[WRITERS] = _put(m[WRITERS], w, ("dead", rec, 0, 0, None))
            m[DEATHS] += 1
        elif kind == "O":
            m[STATUS] |= L.STATUS_CLOSING  # Ring._shutdown: set_status(CLOSING)
            m[OWNER] = "o_wait"
        else:
            self._flusher(m, tag)
            while self._fpc(m[FLUSHER]) in self.quiet_f:
                self._flusher(m, ("F",))
        return tuple(m)

    def _quiet_next(self, m: list[Any], w: int) -> bool:
        pc = self._wpc(m[WRITERS][w])
        if pc not in self.quiet_w:
            return False
        # Under TSO an atomic drains the writer's buffer: merged into the step
        # before it only when there is nothing to drain (then the SC argument holds).
        return not (self.tso and pc in ATOMIC_W and (m[SBUF][w] or m[PEND][w]))

    def _wstep(self, m: list[Any], w: int) -> None:
        """One step of writer w: a locked instruction first drains its store buffer."""
        if self.tso and self._wpc(m[WRITERS][w]) in ATOMIC_W:
            self._drain_all(m, w)
        if self.chunked and m[WRITERS][w][0] in CHUNK_PCS:
            self._cwriter(m, w)
        else:
            self._writer(m, w)

    # -- x86-TSO: the writers' store buffers ------------------------------------------

    def _wstore(self, m: list[Any], w: int | None, loc: tuple[Any, ...], val: Any) -> None:
        """A plain store by writer *w* (None: the flusher, modelled SC)."""
        if w is None or not self.tso or not self.cfg.sb_depth:
            self._mem_write(m, loc, val)
            return
        if len(m[SBUF][w]) >= self.cfg.sb_depth:
            self._drain_one(m, w)  # the model's bound on the buffer
        self._set(m, SBUF, w, (*m[SBUF][w], (loc, val)))

    def _wload(self, m: list[Any], w: int | None, loc: tuple[Any, ...]) -> Any:
        """A plain load by writer *w*: its own newest buffered store to *loc* first."""
        if w is not None and self.tso:
            for bloc, val in reversed(m[SBUF][w]):
                if bloc == loc:
                    return val
        return self._mem_read(m, loc)

    def _issue(self, m: list[Any], w: int) -> None:
        """Put the stores the writer's last step left pending into its buffer."""
        pend = m[PEND][w]
        if not pend:
            return
        self._set(m, PEND, w, ())
        for entry in pend:
            if entry[0] == "ret":
                continue
            if entry[0] == "carve":  # a record's payload and header (one entry)
                _, i, off, size, rec = entry
                self._carve(m, w, i, off, size=size, rec=rec)
                if self.cfg.deaths:  # a kill may fall between payload and header
                    self._wstore(m, w, ("R", i, off, w, rec), PAYLOAD)
                else:
                    self._wstore(m, w, ("R", i, off, w, rec), DATA)
            elif entry[0] == "hdr":  # the header, after the payload (with deaths)
                _, i, off, rec = entry
                self._wstore(m, w, ("R", i, off, w, rec), DATA)
            elif entry[0] == "K+":  # commit: counter(k, i) = pos + s + delta
                _, i, n = entry
                loc = ("K", w, i)
                self._wstore(m, w, loc, self._wload(m, w, loc) + n)
            else:
                self._wstore(m, w, entry[0], entry[1])

    def _pend(self, m: list[Any], w: int, *entries: tuple[Any, ...]) -> None:
        self._set(m, PEND, w, (*m[PEND][w], *entries))

    def _drain_one(self, m: list[Any], w: int) -> None:
        (loc, val), *rest = m[SBUF][w]
        self._set(m, SBUF, w, tuple(rest))
        self._mem_write(m, loc, val)

    def _drain_all(self, m: list[Any], w: int) -> None:
        while m[SBUF][w]:
            self._drain_one(m, w)

    def _mem_read(self, m: list[Any], loc: tuple[Any, ...]) -> Any:
        what = loc[0]
        if what == "K":
            return m[COMMITS][loc[1]][loc[2]]
        return m[_LOC_FIELD[what]][loc[1]]

    def _mem_write(self, m: list[Any], loc: tuple[Any, ...], val: Any) -> None:
        what = loc[0]
        if what == "K":
            self._set(m, COMMITS, loc[1], _put(m[COMMITS][loc[1]], loc[2], val))
        elif what == "R":  # a record's bytes (or an ABANDONED header) reach memory
            _, i, off, w, rec = loc
            st = m[ST][i]
            for cell in m[CELLS][i]:
                if cell[0] == off and cell[3] == w and cell[4] == rec:
                    break
            else:
                raise InvariantError(
                    "I4", f"W{w}'s buffered store of #{rec} at b{i}+{off} lands in a reset buffer"
                )
            if st & (FLUSHING | IDLE | RESERVED):
                raise InvariantError(
                    "I2/I4", f"W{w}'s store of #{rec} lands in b{i} while it is {fmt_word(st)}"
                )
            self._replace_cell(m, i, cell, val)
        else:
            self._set(m, _LOC_FIELD[what], loc[1], val)

    def _carve(self, m: list[Any], w: int, i: int, off: int, *, size: int, rec: int) -> None:
        """Record #rec of W takes [off, off + size) from the front of its chunk's rest."""
        cells = m[CELLS][i]
        for k, cell in enumerate(cells):
            if cell[3] != w or not cell[0] <= off < cell[0] + cell[1]:
                continue
            if cell[2] == PAD:
                raise InvariantError(
                    "I2",
                    f"W{w} writes record #{rec} at b{i}+{off}, into a chunk tail that was "
                    "already returned (committed as padding)",
                )
            if cell[4] != CHUNK_REST or cell[0] != off or cell[1] < size or cell[2] != CLAIMED:
                raise InvariantError(
                    "I1", f"W{w} writes record #{rec} at b{i}+{off} over {self.fmt_cells((cell,))}"
                )
            parts = [(off, size, CLAIMED, w, rec, cell[5])]
            if cell[1] > size:
                parts.append((off + size, cell[1] - size, CLAIMED, w, CHUNK_REST, cell[5]))
            self._set(m, CELLS, i, tuple(sorted((*cells[:k], *parts, *cells[k + 1 :]))))
            return
        raise InvariantError(
            "I4/I6",
            f"W{w} writes record #{rec} at b{i}+{off}, but its chunk is no longer in the "
            f"buffer (state {fmt_word(m[ST][i])}): the buffer was recycled under it",
        )

    def _return_tail(self, m: list[Any], w: int, i: int, span: tuple[int, int], who: str) -> None:
        """Ghost: the tail [pos, end) of W's chunk is returned (it becomes padding)."""
        pos, end = span
        self.events[who] += 1
        cells = m[CELLS][i]
        for k, cell in enumerate(cells):
            if cell[3] != w or cell[0] + cell[1] <= pos or end <= cell[0]:
                continue
            if cell[2] == PAD:
                raise InvariantError(
                    "I2", f"the {who} returns [{pos}, {end}) of W{w}'s chunk in b{i} twice"
                )
            if cell[4] != CHUNK_REST:
                raise InvariantError(
                    "I2",
                    f"the {who} returns [{pos}, {end}) of W{w}'s chunk in b{i}, but record "
                    f"#{cell[4]} is at [{cell[0]}, {cell[0] + cell[1]})",
                )
            if (cell[0], cell[0] + cell[1]) != (pos, end):
                raise InvariantError(
                    "I2", f"the {who} returns [{pos}, {end}) of W{w}'s chunk rest {cell[:2]}"
                )
            self._set(m, CELLS, i, _put(cells, k, (pos, end - pos, PAD, w, CHUNK_REST, cell[5])))
            return
        raise InvariantError("I2", f"the {who} returns [{pos}, {end}) of b{i}: no chunk of W{w}")

    # -- helpers on a mutable state ---------------------------------------------------

    @staticmethod
    def _set(m: list[Any], fld: int, i: int, v: Any) -> None:
        m[fld] = _put(m[fld], i, v)

    def _intent(self, m: list[Any], w: int, v: int) -> None:
        """A plain store of writer w's intent (rotate's marker): buffered under TSO
        when recovery reads intents, else memory at once (nobody reads it)."""
        if self.store_intents:
            self._wstore(m, w, ("I", w), v)
        else:
            self._set(m, INTENT, w, v)

    def _store(self, m: list[Any], i: int, word: int) -> None:
        """Write buffer i's state word.  Reduced: a sealed word's offset is dead (every
        reader of a sealed word looks at its flags only; a CAS that fails because a
        claim moved only the offset just retries), so it is kept at 0."""
        if word & SEALED and self.dead_sealed_offset:
            word &= L.FLAG_MASK
        m[ST] = _put(m[ST], i, word)

    def _find_cell(self, m: list[Any], i: int, off: int, w: int, rec: int) -> tuple[Any, ...]:
        for cell in m[CELLS][i]:
            if cell[0] == off and cell[3] == w and cell[4] == rec:
                return tuple(cell)
        raise InvariantError(
            "I4/I6",
            f"W{w} writes record #{rec} at b{i}+{off}, but its claim is no longer in the "
            f"buffer (state {fmt_word(m[ST][i])}): the buffer was recycled under it",
        )

    def _replace_cell(self, m: list[Any], i: int, cell: tuple[Any, ...], kind: int) -> None:
        st = m[ST][i]
        if st & (FLUSHING | IDLE | RESERVED):
            raise InvariantError(
                "I2/I4", f"W{cell[3]} writes into b{i} while it is {fmt_word(st)} (not its fill)"
            )
        cells = m[CELLS][i]
        k = cells.index(cell)
        self._set(m, CELLS, i, _put(cells, k, (*cell[:2], kind, *cell[3:])))

    def _add_cell(self, m: list[Any], i: int, cell: tuple[Any, ...]) -> None:
        off, size = cell[0], cell[1]
        if off < 0 or off + size > self.cap:
            raise InvariantError("I1", f"claim [{off}, {off + size}) outside b{i}'s record area")
        for other in m[CELLS][i]:
            if off < other[0] + other[1] and other[0] < off + size:
                raise InvariantError(
                    "I1",
                    f"claim [{off}, {off + size}) of W{cell[3]}#{cell[4]} overlaps "
                    f"[{other[0]}, {other[0] + other[1]}) of W{other[3]}#{other[4]} in b{i}",
                )
        self._set(m, CELLS, i, tuple(sorted((*m[CELLS][i], cell))))

    # -- writer -----------------------------------------------------------------------

    def _writer(self, m: list[Any], w: int) -> None:
        pc, rec, lw, old, sub = m[WRITERS][w]
        size = self.cfg.records[w][rec]
        lane = self.lane_of[w]
        i = lw & L.LANE_INDEX_MASK
        fill = lw >> L.LANE_FILL_SHIFT
        frame: tuple[Any, ...]
        # Ring.append's fast path and _claim's loop do the same steps; _claim checks
        # status at the top of each try, the fast path checks `not words[status]`.
        if pc == "status":
            frame = ("raised" if m[STATUS] else "lane", rec, 0, 0, None)
        elif pc == "lane":
            frame = ("intent", rec, m[LANES][lane], 0, None)
        elif pc == "intent":
            self._set(m, INTENT, w, L.claim_intent(lw, size))
            frame = ("faa", rec, lw, 0, None)
        elif pc == "faa":
            old = m[ST][i]
            if not (old & SEALED and self.dead_sealed_offset):
                self._store(m, i, (old + L.claim_delta(size)) & MASK64)
            off = old >> SHIFT
            if not old & SEALED and off + size <= self.cap:
                self._add_cell(m, i, (off, size, CLAIMED, w, rec, m[FILLW][i]))
                if m[FILLW][i] == fill and m[LANES][lane] != lw:
                    raise InvariantError(
                        "I6", f"W{w} claimed in fill {fill}, which its lane no longer names"
                    )
                frame = ("fillchk", rec, lw, old, None)
            else:
                frame = ("fclear", rec, lw, old, None)
        elif pc == "fillchk":
            ok = m[FILLW][i] == fill or self.cfg.mutant == "no-fill-check"
            frame = ("payload" if ok else "abandon", rec, lw, old, None)
        elif pc in ("payload", "header"):
            cell = self._find_cell(m, i, old >> SHIFT, w, rec)
            if cell[5] != fill:
                raise InvariantError(
                    "I6",
                    f"W{w} writes record #{rec} into fill {cell[5]}, but its lane named "
                    f"fill {fill}",
                )
            if pc == "payload":
                self._replace_cell(m, i, cell, PAYLOAD)
                frame = ("header", rec, lw, old, None)
            else:
                self._replace_cell(m, i, cell, DATA)  # header last
                frame = ("commit", rec, lw, old, None)
        elif pc in ("commit", "acommit"):
            self._set(m, COMMITS, w, _put(m[COMMITS][w], i, m[COMMITS][w][i] + size))
            frame = ("iclear" if pc == "commit" else "aiclear", rec, lw, old, None)
        elif pc == "iclear":
            self._set(m, INTENT, w, 0)
            rec += 1  # append() returns
            frame = ("done" if rec == len(self.cfg.records[w]) else "status", rec, 0, 0, None)
        elif pc == "abandon":
            cell = self._find_cell(m, i, old >> SHIFT, w, rec)
            if cell[5] == fill:
                raise InvariantError("I6", f"W{w} abandons a claim in its own lane's fill {fill}")
            self._replace_cell(m, i, cell, ABANDONED)
            frame = ("acommit", rec, lw, old, None)
        elif pc == "aiclear":
            self._set(m, INTENT, w, 0)
            frame = ("rot", rec, lw, 0, self._rotate_start("abandon"))
        elif pc == "fclear":
            off = old >> SHIFT
            if self.store_intents and not old & SEALED and off <= self.cap:
                # _claim_failed: the lease says "sealing" while it closes the fill
                self._pend(m, w, (("I", w), L.INTENT_SEALING | (i << 32)))
            elif self.store_intents:
                self._pend(m, w, (("I", w), 0))
            else:
                self._set(m, INTENT, w, 0)
            if not old & SEALED and off <= self.cap:
                frame = ("cc_seal", rec, lw, old, None)  # close_crossing
            elif not old & SEALED:
                frame = ("reject", rec, lw, 0, None)
            else:
                frame = ("adv_status", rec, lw, 0, None)  # reject() does nothing
        elif pc == "cc_seal":
            self._store(m, i, m[ST][i] | SEALED)
            frame = ("close", rec, lw, 0, self._close_start(old >> SHIFT))
        elif pc == "close":
            sub = self._close_step(m, i, sub, w)
            frame = ("adv_status" if sub is None else "close", rec, lw, 0, sub)
            if sub is None and self.store_intents:
                self._pend(m, w, (("I", w), 0))  # the close is done
            if sub is None and self.cfg.mutant == "drop-crossing":  # "returns"
                rec += 1
                frame = ("done" if rec == len(self.cfg.records[w]) else "status", rec, 0, 0, None)
        elif pc == "reject":
            st = m[ST][i]
            if not self.cfg.reject_fix:
                self._store(m, i, st | SEALED)  # Ring.reject: fetch_or(SEALED)
            elif not st & SEALED and st >> SHIFT > self.cap:
                self._store(m, i, st | SEALED)  # proposed: CAS, only while over-full
            frame = ("adv_status", rec, lw, 0, None)
        elif pc == "adv_status":  # Ring.advance: check_status
            frame = ("raised" if m[STATUS] & STOPPED else "adv_lane", rec, lw, 0, None)
        elif pc == "adv_lane":
            if m[LANES][lane] != lw:
                frame = ("status", rec, 0, 0, None)
            else:
                frame = ("rot", rec, lw, 0, self._rotate_start("advance"))
        elif pc == "adv_nd":
            if not m[ST][i] & SEALED:
                frame = ("status", rec, 0, 0, None)  # "the fill is open again"
            else:
                frame = ("adv_status", rec, lw, 0, None)  # sleep, loop
        elif pc == "rot":
            caller = sub[0]
            result, sub = self._rotate_step(m, w, lane, lw, sub)
            if sub is not None:
                frame = ("rot", rec, lw, 0, sub)
            elif caller == "abandon":
                frame = ("status", rec, 0, 0, None)  # back to _claim's loop
            elif caller == "advance":
                if result == MOVED:
                    frame = ("status", rec, 0, 0, None)
                elif result == NOT_DONE:
                    frame = ("adv_nd", rec, lw, 0, None)
                else:  # NO_SPACE: wait_for_space rotates once more, then waits
                    frame = ("rot", rec, lw, 0, self._rotate_start("wait_for_space"))
            else:  # wait_for_space returns (or times out): advance loops
                frame = ("adv_status", rec, lw, 0, None)
        else:
            raise AssertionError(f"writer pc {pc!r}")
        m[WRITERS] = _put(m[WRITERS], w, frame)

    # -- writer, protocol v3 (chunk claims) -----------------------------------------------
    #
    # Each step ends with at most one load or locked instruction; the plain stores
    # that precede it in program order are put into the store buffer at the start
    # of the step (PEND), not at the end of the step before: a store issued early
    # could be drained by a fence that in the program comes before it.

    def _after_append(self, m: list[Any], w: int, rec: int) -> tuple[Any, ...]:
        if rec == len(self.cfg.records[w]):
            return ("fin", rec, 0, 0, None)
        return ("status", rec, 0, BETWEEN, None)

    def _put_record(self, m: list[Any], w: int, rec: int) -> tuple[Any, ...]:
        """put(), steps 4-6: payload and header, counter, A_k = pos + s."""
        i, pos, end, c = m[CHL][w]
        size = self.cfg.records[w][rec]
        if self.cfg.deaths:  # payload, header: a kill may fall between them
            self._pend(m, w, ("carve", i, pos, size, rec), ("hdr", i, pos, rec))
        else:
            self._pend(m, w, ("carve", i, pos, size, rec))
        self._pend(m, w, ("K+", i, size), (("A", w), pos + size))
        if self.cfg.deaths:
            self._pend(m, w, ("ret",))
        self._set(m, CHL, w, (i, pos + size, end, c))
        return self._after_append(m, w, rec + 1)  # append() returns

    def _return_own(self, m: list[Any], w: int, rec: int, cas: str, then: str) -> tuple[Any, ...]:
        """Slow path, step a: return the current chunk (a CAS when its tail is not empty)."""
        ch = m[CHL][w]
        if ch is None:
            return (then, rec, 0, 0, None)
        if ch[1] < ch[2]:
            return (cas, rec, 0, 0, None)
        self._pend(m, w, (("C", w), 0))  # nothing left: a plain store
        self._set(m, CHL, w, None)
        return (then, rec, 0, 0, None)

    def _cas_own(self, m: list[Any], w: int, who: str) -> None:
        i, pos, end, c = m[CHL][w]
        self._set(m, CHL, w, None)
        if self.cfg.mutant == "double-return":  # plain stores, no CAS
            self._pend(m, w, (("C", w), 0), ("K+", i, end - pos))
            self._return_tail(m, w, i, (pos, end), who)
        elif m[CHUNKW][w] == c:  # CAS(C_k: c -> c | CHUNK_RETURNING)
            self._set(m, CHUNKW, w, c | L.CHUNK_RETURNING)
            # then the tail's commit (padding) and a plain C_k = 0
            self._pend(m, w, ("K+", i, end - pos), (("C", w), 0))
            self._return_tail(m, w, i, (pos, end), who)
        # else the flusher returned it

    def _cwriter(self, m: list[Any], w: int) -> None:
        pc, rec, lw, old, sub = m[WRITERS][w]
        lane = self.lane_of[w]
        i = lw & L.LANE_INDEX_MASK
        fill = lw >> L.LANE_FILL_SHIFT
        frame: tuple[Any, ...]
        if pc == "status":  # the top of append(), and of each retry of the claim
            if m[STATUS]:
                frame = ("raised", rec, 0, 0, None)
            else:
                ch = m[CHL][w]
                size = self.cfg.records[w][rec]
                if ch is not None and ch[1] + size <= ch[2]:  # put(), step 1: it fits
                    self._pend(m, w, (("A", w), ch[1] | BUSY))  # step 2
                    if self.cfg.mutant == "no-seal-check":
                        frame = self._put_record(m, w, rec)
                    elif self.cfg.mutant == "recheck-first":
                        frame = ("p_chunk", rec, 0, 0, None)
                    else:
                        frame = ("p_sealed", rec, 0, 0, None)
                else:
                    frame = self._return_own(m, w, rec, "r_cas", "lane")
        elif pc == "p_sealed":  # put(), step 3: load state_i (put_check "fill": D_FILL too)
            ch = m[CHL][w]
            check = self.cfg.put_check
            moved = check == "fill" and self._wload(
                m, w, ("FW", ch[0])
            ) & 0xFFFF != L.intent_fill_tag(ch[3])
            if m[ST][ch[0]] & SEALED or moved:
                self._pend(m, w, (("A", w), ch[1]))  # not BUSY; return the chunk
                frame = ("r_cas", rec, 0, 0, None)
            elif check == "chunk" and self.cfg.mutant != "recheck-first":
                frame = ("p_chunk", rec, 0, 0, None)
            else:
                frame = self._put_record(m, w, rec)
        elif pc == "p_chunk":  # ... then load C_k: `words[chunk_w] != cword`
            ch = m[CHL][w]
            if self._wload(m, w, ("C", w)) != ch[3]:
                if sub == "first":
                    raise InvariantError("I2", f"W{w}'s fresh chunk was taken before its first put")
                self._pend(m, w, (("A", w), ch[1]))  # put() returns False: claim
                frame = ("r_cas", rec, 0, 0, None)
            elif self.cfg.mutant == "recheck-first" and sub != "first":
                frame = ("p_sealed", rec, 0, 0, None)
            else:
                frame = self._put_record(m, w, rec)
        elif pc == "r_cas":
            self._cas_own(m, w, "writer")
            frame = ("lane", rec, 0, 0, None)
        elif pc == "fin":  # the last append has returned: its stores are issued
            frame = ("done", rec, 0, 0, None)
        elif pc == "lane":  # claim, step b
            frame = ("c_off", rec, m[LANES][lane], 0, None)
        elif pc == "c_off":  # plain load of state_i: w = min(want, capacity - off)
            need = self.cfg.records[w][rec]
            want = self.cfg.chunk or need
            width = min(want, self.cap - (m[ST][i] >> SHIFT))
            width = width if width >= need else need
            if self.store_intents:  # then the intent, before the fetch-and-add
                self._pend(m, w, (("I", w), L.claim_intent(lw, width)))
            frame = ("faa", rec, lw, 0, width)
        elif pc == "faa":  # (the intent store before it: nobody reads it, not modelled)
            width = sub
            old = m[ST][i]
            if not (old & SEALED and self.dead_sealed_offset):
                self._store(m, i, (old + L.claim_delta(width)) & MASK64)
            off = old >> SHIFT
            if not old & SEALED and off + width <= self.cap:
                self._add_cell(m, i, (off, width, CLAIMED, w, CHUNK_REST, m[FILLW][i]))
                if m[FILLW][i] == fill and m[LANES][lane] != lw:
                    raise InvariantError(
                        "I6", f"W{w} claimed in fill {fill}, which its lane no longer names"
                    )
                frame = ("fillchk", rec, lw, old, width)
            else:
                frame = ("fclear", rec, lw, old, width)
        elif pc == "fillchk":
            width = sub
            off = old >> SHIFT
            if self._wload(m, w, ("FW", i)) == fill:
                # success: A_k = start | BUSY, C_k names the chunk, then the first
                # record under that BUSY, without the SEALED check (step c)
                c = L.claim_intent(lw, off + width)
                self._pend(m, w, (("A", w), off | BUSY), (("C", w), c))
                if self.store_intents:
                    self._pend(m, w, (("I", w), 0))
                self._set(m, CHL, w, (i, off, off + width, c))
                # The first put(): seal_w is H_ZERO (always zero: no SEALED test);
                # its A_k = off | BUSY repeats the install's (same value, next in
                # the FIFO: not modelled); then the load of C_k, as in every put.
                # Reduced: that load always reads c (the store is the writer's
                # own; the flusher's CAS needs C_k = c in memory, and then the
                # BUSY before it in the FIFO is there too), so it is skipped.
                if self.cfg.reduce:
                    frame = self._put_record(m, w, rec)
                else:
                    frame = ("p_chunk", rec, 0, 0, "first")
            else:  # stale fill: an ABANDONED record over the whole claim, commit, rotate
                cell = self._find_cell(m, i, off, w, CHUNK_REST)
                if cell[5] == fill:
                    raise InvariantError("I6", f"W{w} abandons a claim in its lane's fill {fill}")
                self._pend(m, w, (("R", i, off, w, CHUNK_REST), ABANDONED), ("K+", i, width))
                if self.store_intents:
                    self._pend(m, w, (("I", w), 0))
                frame = ("rot", rec, lw, 0, self._rotate_start("abandon"))
        elif pc == "y_or":  # Ring.seal (sync): fetch_or(SEALED)
            prev = m[ST][i]
            self._store(m, i, prev | SEALED)
            if not prev & SEALED and prev >> SHIFT <= self.cap:
                frame = ("yclose", rec, lw, 0, self._close_start(prev >> SHIFT))
            else:
                if self.store_intents:
                    self._pend(m, w, (("I", w), 0))
                frame = self._return_own(m, w, rec, "y_cas", "status")
        elif pc == "yclose":
            sub = self._close_step(m, i, sub, w)
            if sub is None:
                if self.store_intents:
                    self._pend(m, w, (("I", w), 0))
                frame = self._return_own(m, w, rec, "y_cas", "status")
            else:
                frame = ("yclose", rec, lw, 0, sub)
        elif pc == "y_cas":  # the sealer returns its own chunk
            self._cas_own(m, w, "sealer")
            frame = ("status", rec, 0, 0, None)
        else:
            raise AssertionError(f"chunk writer pc {pc!r}")
        if frame[0] == "status" and pc in ("y_cas", "yclose", "y_or"):
            frame = ("status", rec, 0, BETWEEN, None)  # sync() returned, between appends
        m[WRITERS] = _put(m[WRITERS], w, frame)

    # -- rotate (Ring.rotate with fill_done, _reserve, _unreserve, _open) -------------------

    @staticmethod
    def _rotate_start(caller: str) -> tuple[Any, ...]:
        # (caller, pc, j, candidates, index, st, fill, result)
        return (caller, "r_status", 0, (), 0, 0, 0, 0)

    def _rotate_step(  # noqa: PLR0911  (one return per way out of the state machine)
        self, m: list[Any], w: int, lane: int, lw: int, sub: tuple[Any, ...]
    ) -> tuple[int, tuple[Any, ...] | None]:
        caller, pc, j, cands, idx, rst, rfill, result = sub
        i = lw & L.LANE_INDEX_MASK
        fill = lw >> L.LANE_FILL_SHIFT
        if pc == "r_status":
            if m[STATUS] & STOPPED:
                return NO_SPACE, None
            return 0, (caller, "r_st", 0, (), 0, 0, 0, 0)
        if pc == "r_st":  # fill_done: state first (only its CLOSED and IDLE bits are used)
            return 0, (caller, "r_fill", 0, (), 0, m[ST][i] & (CLOSED | IDLE), 0, 0)
        if pc == "r_fill":  # ... then the fill number
            if self._wload(m, w, ("FW", i)) == fill and not rst & (CLOSED | IDLE):
                return NOT_DONE, None
            return 0, (caller, "r_intent", 0, (), 0, 0, 0, 0)
        if pc == "r_intent":  # rotate(): the lease says "rotating" around _rotate()
            self._intent(m, w, L.INTENT_ROTATING)
            return 0, (caller, "r_lanes", 0, (), 0, 0, 0, 0)
        if pc == "r_iclr":  # ... and is cleared when _rotate() returns (finally)
            self._intent(m, w, 0)
            return result, None
        if pc == "r_lanes":  # _reserve: candidate order
            pointed = {x & L.LANE_INDEX_MASK for x in m[LANES]}
            rest = [k for k in range(self.nb) if k != i]
            order = (i, *[k for k in rest if k not in pointed], *[k for k in rest if k in pointed])
            return 0, (caller, "r_cand", 0, order, 0, 0, 0, 0)
        if pc == "r_cand":
            if idx >= len(cands):
                return 0, (caller, "r_iclr", 0, (), 0, 0, 0, NO_SPACE)
            j = cands[idx]
            st = m[ST][j]
            if st & IDLE:
                return 0, (caller, "r_cas", j, cands, idx, st, 0, 0)
            return 0, (caller, "r_cand", 0, cands, idx + 1, 0, 0, 0)
        if pc == "r_cas":
            cur = m[ST][j]
            if cur == rst:
                if m[CELLS][j]:
                    raise InvariantError("I4", f"b{j} reserved while it still holds records")
                self._store(m, j, (rst & ~IDLE) | RESERVED)
                return 0, (caller, "r_status2", j, (), 0, 0, 0, 0)
            if cur & IDLE:
                return 0, (caller, "r_cas", j, cands, idx, cur, 0, 0)
            return 0, (caller, "r_cand", 0, cands, idx + 1, 0, 0, 0)
        if pc == "r_status2":  # re-checked after reserving
            if m[STATUS] & STOPPED and self.cfg.mutant != "no-recheck":
                return 0, (caller, "u_load", j, (), 0, 0, 0, NO_SPACE)
            return 0, (caller, "r_fc", j, (), 0, 0, 0, 0)
        if pc == "r_fc":
            rfill = m[FILL_CTR]
            if rfill > self.cfg.max_fills:
                raise PrunedError
            m[FILL_CTR] = rfill + 1
            return 0, (caller, "r_store", j, (), 0, 0, rfill, 0)
        if pc == "r_store":
            self._wstore(m, w, ("FW", j), rfill)
            return 0, (caller, "r_lcas", j, (), 0, 0, rfill, 0)
        if pc == "r_lcas":
            if m[LANES][lane] == lw:
                self._set(m, LANES, lane, L.lane_word(rfill, j))
                return 0, (caller, "o_load", j, (), 0, 0, 0, MOVED)
            return 0, (caller, "u_load", j, (), 0, 0, 0, MOVED)
        if pc in ("u_load", "o_load"):
            nxt = "u_cas" if pc == "u_load" else "o_cas"
            return 0, (caller, nxt, j, (), 0, m[ST][j], 0, result)
        if pc == "u_cas":
            cur = m[ST][j]
            if cur != rst:
                return 0, (caller, "u_cas", j, (), 0, cur, 0, result)
            self._store(m, j, (rst & ~RESERVED) | IDLE)
            return 0, (caller, "r_iclr", 0, (), 0, 0, 0, result)
        if pc == "o_cas":
            cur = m[ST][j]
            if cur != rst:
                return 0, (caller, "o_cas", j, (), 0, cur, 0, result)
            word = L.lane_word(m[FILLW][j], j)
            if m[LANES][lane] != word:
                raise InvariantError(
                    "I6", f"b{j} opens for fill {m[FILLW][j]}, which no lane names"
                )
            if m[GCLOSE][j] is not None or m[CELLS][j]:
                raise InvariantError("I4", f"b{j} opens with leftovers of its previous fill")
            self._store(m, j, 0)
            return 0, (caller, "r_iclr", 0, (), 0, 0, 0, MOVED)
        raise AssertionError(f"rotate pc {pc!r}")

    # -- closing a fill (Ring._close_fill, then the CLOSED fetch-or) ------------------------

    @staticmethod
    def _close_start(used: int) -> tuple[Any, ...]:
        # (pc, used, address, seq)
        return ("cf_addr" if used else "cf_store", used, 0, 0)

    def _close_step(
        self, m: list[Any], i: int, sub: tuple[Any, ...], w: int | None
    ) -> tuple[Any, ...] | None:
        pc, used, address, seq = sub
        if pc == "cf_addr":
            address = m[NEXT_ADDR]
            if self.cfg.mutant == "unpadded":
                m[NEXT_ADDR] = address + _format.SEGMENT_HEADER_SIZE + used
            else:
                m[NEXT_ADDR] = address + _format.segment_size(used)
            return ("cf_seq", used, address, 0)
        if pc == "cf_seq":
            seq = m[NEXT_SEQ]
            m[NEXT_SEQ] = seq + 1
            return ("cf_store", used, address, seq)
        if pc == "cf_store":
            self._wstore(m, w, ("U", i), used)
            self._wstore(m, w, ("AD", i), address)
            self._wstore(m, w, ("SQ", i), seq)
            if self.store_intents:  # D_EXTENT_OF = D_FILL, last (recovery reads it)
                self._wstore(m, w, ("EO", i), self._wload(m, w, ("FW", i)))
            return ("cf_closed", used, address, seq)
        if pc == "cf_closed":
            st = m[ST][i]
            if m[GCLOSE][i] is not None:
                raise InvariantError("I3", f"fill {m[FILLW][i]} of b{i} closed twice")
            if st & CLOSED or not st & SEALED:
                raise InvariantError("I3", f"b{i} closed while {fmt_word(st)}")
            if used and address % L.PAGE:
                raise InvariantError("I3", f"fill {m[FILLW][i]} got unaligned address {address}")
            for cell in m[CELLS][i]:
                if cell[0] + cell[1] > used:
                    raise InvariantError(
                        "I7",
                        f"fill {m[FILLW][i]} of b{i} closed at used={used}, but the claim "
                        f"W{cell[3]}#{cell[4]} at [{cell[0]}, {cell[0] + cell[1]}) is past it",
                    )
            self._store(m, i, st | CLOSED)
            self._set(m, GCLOSE, i, (m[FILLW][i], address, used, seq))
            return None
        raise AssertionError(f"close pc {pc!r}")

    # -- flusher ------------------------------------------------------------------------

    def _flusher(self, m: list[Any], tag: Tag) -> None:
        pc, i, fst, fused, acc, k, pending, sub = m[FLUSHER]
        frame: tuple[Any, ...]
        if pc == "f_idle":
            what = tag[1]
            if what == "seal":
                frame = ("s_or", tag[2], 0, 0, 0, 0, pending, None)
            elif what == "take":
                frame = ("t_used", tag[2], m[ST][tag[2]], 0, 0, 0, pending, None)
            elif what == "flush" and len(tag) == 3:
                self._take_write_reset(m, tag[2])
                return
            elif what == "flush":  # flush_pending: in address order
                order = tuple(sorted(pending, key=lambda b: m[ADDR][b]))
                frame = ("w_write", 0, 0, 0, 0, 0, order, None)
            elif what == "all_idle":
                frame = ("a_chk", 0, 0, 0, 0, 1, pending, None)
            elif what == "ret":  # return_chunks: candidates, then the fence
                cands = self._candidates(m)
                first = "rc_load" if self.cfg.mutant == "no-fence" else "rc_fence"
                frame = (first, 0, 0, 0, 0, 0, pending, cands)
            else:
                self._recovery_step(m, tag)
                return
        elif pc == "s_or":  # Ring.seal
            prev = m[ST][i]
            self._store(m, i, prev | SEALED)
            used = prev >> SHIFT
            if prev & SEALED or used > self.cap:
                frame = ("f_idle", 0, 0, 0, 0, 0, pending, None)
            else:
                frame = ("close", i, 0, 0, 0, 0, pending, self._close_start(used))
        elif pc == "close":
            sub = self._close_step(m, i, sub, None)
            if sub is None:
                frame = ("f_idle", 0, 0, 0, 0, 0, pending, None)
            else:
                frame = ("close", i, 0, 0, 0, 0, pending, sub)
        elif pc == "t_used":
            frame = ("t_sum", i, fst, m[USED][i], 0, 0, pending, None)
        elif pc == "t_sum":  # committed(): one counter per step ...
            acc += m[COMMITS][k][i]
            frame = (
                "t_sum" if k + 1 < len(m[COMMITS]) else "t_base",
                i,
                fst,
                fused,
                acc,
                k + 1,
                pending,
                None,
            )
        elif pc == "t_base":  # ... then the base
            if (acc - m[BASE][i]) & MASK64 != fused:
                frame = ("f_idle", 0, 0, 0, 0, 0, pending, None)
            else:
                frame = ("t_cas", i, fst, fused, acc, 0, pending, None)
        elif pc == "t_cas":
            if m[ST][i] != fst:
                frame = ("f_idle", 0, 0, 0, 0, 0, pending, None)
            else:
                self._check_take(m, i, fused)
                self._store(m, i, fst | FLUSHING)
                frame = ("t_base_store", i, 0, fused, acc, 0, pending, None)
        elif pc == "t_base_store":  # base = the total read (take_ready)
            self._set(m, BASE, i, acc & MASK64)
            frame = ("f_idle", 0, 0, 0, 0, 0, (*pending, i), None)
        elif pc == "w_write":
            self._write_fill(m, pending[k])
            if k + 1 < len(pending):
                frame = ("w_write", 0, 0, 0, 0, k + 1, pending, None)
            else:
                frame = ("x_zero", 0, 0, 0, 0, 0, pending, None)
        elif pc == "x_zero":  # Flusher.reset: zero ...
            i = pending[k]
            g = m[GCLOSE][i]
            if g is None or (m[USED][i] and not m[GWRITTEN][i]):
                raise InvariantError("I4", f"b{i} reset before its fill was written")
            if self.cfg.mutant != "no-zero":
                self._set(m, CELLS, i, ())
            frame = ("x_load", i, 0, 0, 0, k, pending, None)
        elif pc == "x_load":
            frame = ("x_cas", i, m[ST][i], 0, 0, k, pending, None)
        elif pc == "x_cas":  # ... then IDLE|SEALED by a CAS loop
            cur = m[ST][i]
            if cur != fst:
                frame = ("x_cas", i, cur, 0, 0, k, pending, None)
            else:
                self._store(m, i, IDLE | SEALED)
                self._set(m, GCLOSE, i, None)
                self._set(m, GWRITTEN, i, False)
                if k + 1 < len(pending):
                    frame = ("x_zero", 0, 0, 0, 0, k + 1, pending, None)
                else:
                    frame = ("f_idle", 0, 0, 0, 0, 0, (), None)
        elif pc == "rc_fence":  # membarrier: every writer's buffer reaches memory
            for w in range(self.nw):
                self._drain_all(m, w)
            frame = ("rc_load", 0, 0, 0, 0, 0, pending, sub)
        elif pc == "rc_load":  # re-load A_k after the fence
            slot, c = sub[k]
            a = m[AT][slot]
            pos = a & ~BUSY
            if (a & BUSY and self.cfg.mutant != "return-busy") or pos >= c & L.INTENT_SIZE_MASK:
                frame = self._next_candidate(k, pending, sub)
            else:
                frame = ("rc_cas", 0, pos, 0, 0, k, pending, sub)
        elif pc == "rc_cas":  # CAS(C_k, c -> 0); if won: counter(R, i) += end - pos
            slot, c = sub[k]
            if m[CHUNKW][slot] == c:
                self._set(m, CHUNKW, slot, 0)
                i = L.intent_buffer(c)
                end = c & L.INTENT_SIZE_MASK
                self._return_tail(m, slot, i, (fst, end), "flusher")
                if m[WRITERS][slot][0] == "dead":  # liveness is not return_chunks' test
                    self.events["flusher-dead"] += 1
                row = m[COMMITS][self.row_r]
                self._set(m, COMMITS, self.row_r, _put(row, i, row[i] + end - fst))
            frame = self._next_candidate(k, pending, sub)
        elif pc == "rv_res":  # Recovery._resolve
            self._resolve(m, i, *sub)
            frame = ("f_idle", 0, 0, 0, 0, 0, pending, None)
        elif pc == "a_chk":  # all_idle, one state word per step
            if not m[ST][k] & IDLE:
                frame = ("f_idle", 0, 0, 0, 0, 0, pending, None)
            elif k + 1 < self.nb:
                frame = ("a_chk", 0, 0, 0, 0, k + 1, pending, None)
            else:
                frame = ("f_exit", 0, 0, 0, 0, 0, pending, None)
        elif pc == "f_exit":
            m[STATUS] |= L.STATUS_FLUSHER_DONE
            frame = ("f_done", 0, 0, 0, 0, 0, pending, None)
        else:
            raise AssertionError(f"flusher pc {pc!r}")
        m[FLUSHER] = frame

    @staticmethod
    def _next_candidate(k: int, pending: tuple[int, ...], cands: Any) -> tuple[Any, ...]:
        if k + 1 < len(cands):
            return ("rc_load", 0, 0, 0, 0, k + 1, pending, cands)
        return ("f_idle", 0, 0, 0, 0, 0, pending, None)

    def _take_write_reset(self, m: list[Any], i: int) -> None:
        """Reduced: take_ready's CAS and base store, write_fill, and reset, at once.

        Only the reset is visible to writers: none of them tells FLUSHING from
        SEALED|CLOSED, and base and the file are the flusher's alone.  The fill
        stays ready once it is (its counters cannot pass used, and only the
        flusher changes a closed fill's flags), so the take may wait until then.
        """
        used = m[USED][i]
        self._check_take(m, i, used)
        self._store(m, i, m[ST][i] | FLUSHING)
        self._set(m, BASE, i, sum(c[i] for c in m[COMMITS]) & MASK64)
        self._write_fill(m, i)
        if self.cfg.mutant != "no-zero":
            self._set(m, CELLS, i, ())
        self._store(m, i, IDLE | SEALED)
        self._set(m, GCLOSE, i, None)
        self._set(m, GWRITTEN, i, False)

    def _check_take(self, m: list[Any], i: int, used: int) -> None:
        st = m[ST][i]
        g = m[GCLOSE][i]
        if st & (READY | FLUSHING) != READY or g is None:
            raise InvariantError("I2", f"b{i} taken while {fmt_word(st)}")
        if g != (m[FILLW][i], m[ADDR][i], used, m[SEQ][i]):
            raise InvariantError("I3", f"b{i} taken with extent {g}, descriptor says otherwise")
        err = _tiling_error(m[CELLS][i], used)
        if err:
            raise InvariantError("I2", f"fill {m[FILLW][i]} of b{i} taken, but {err}")

    def _write_fill(self, m: list[Any], i: int) -> None:
        used, address, seq, fill = m[USED][i], m[ADDR][i], m[SEQ][i], m[FILLW][i]
        g = m[GCLOSE][i]
        if g != (fill, address, used, seq):
            raise InvariantError("I3", f"b{i} written at {address} but closed as {g}")
        if not used:  # Flusher.write_fill: an empty fill is not written
            self._set(m, GWRITTEN, i, True)
            return
        err = _tiling_error(m[CELLS][i], used)
        if err:
            raise InvariantError("I2", f"fill {fill} of b{i} written, but {err}")
        size = _format.segment_size(used)
        if address % L.PAGE or address + size > m[NEXT_ADDR]:  # write_fill refuses these
            raise InvariantError("I3", f"fill {fill} written at {address}, never handed out")
        for seg in m[FILE]:
            if address < seg[0] + seg[1] and seg[0] < address + size:
                raise InvariantError(
                    "I3", f"fill {fill} at [{address}, {address + size}) overlaps fill {seg[3]}"
                )
        records = tuple((c[2], c[3], c[4]) for c in m[CELLS][i])
        m[FILE] = tuple(sorted((*m[FILE], (address, size, seq, fill, records))))
        self._set(m, GWRITTEN, i, True)
        err = self.order_error(m[FILE])
        if err:
            raise InvariantError("I8", err)

    # -- dead-writer recovery (shmflush/_recovery.py, chunk mode) -----------------------

    def _recovery_tags(self, s: State) -> Iterator[Tag]:
        """Recovery.run for each buffer it may find stuck (time is abstracted: any
        moment).  Only once a writer is dead (without a dead lease it finds nothing
        to do) and its store buffer has drained (the recovery timeout is many
        orders of magnitude longer than a drain)."""
        dead = [w for w, f in enumerate(s[WRITERS]) if f[0] == "dead"]
        if not dead or any(s[SBUF][w] for w in dead):
            return
        for i, st in enumerate(s[ST]):
            # Recovery._signature: not free, not the flusher's, not open and empty
            if st & (IDLE | FLUSHING) or (not st & SEALED and not st >> SHIFT):
                continue
            yield ("F", "recover", i)

    def _chunk_of(self, m: list[Any] | State, k: int) -> tuple[int, int, int] | None:
        """Recovery._chunk: slot k's chunk, if it names the current fill of a busy
        buffer and holds an append in flight or a tail: (buffer, pos, end)."""
        c = m[CHUNKW][k]
        if not c:
            return None
        i = L.intent_buffer(c)
        if i >= self.nb or m[ST][i] & IDLE or L.intent_fill_tag(c) != m[FILLW][i] & 0xFFFF:
            return None
        at = m[AT][k]
        pos, end = at & ~BUSY, c & L.INTENT_SIZE_MASK
        if pos >= end and not at & BUSY:
            return None
        return i, pos, end

    def _recovery_step(self, m: list[Any], tag: Tag) -> None:
        """Recovery.run on buffer tag[2]: scan_leases (one snapshot), then the
        decision; _reservation at once; the seal via Ring.seal (the flusher's
        s_or/close steps); _resolve as the next step (rv_res)."""
        i = tag[2]
        live_claims: set[int] = set()
        live_sealing: set[int] = set()
        live_rotating = False
        dead_claims: list[int] = []
        dead_chunks: list[tuple[int, int, int]] = []
        dead_sealing: list[int] = []
        dead_rotating: list[int] = []
        for k in range(self.nw):
            intent = m[INTENT][k]
            kind = intent & L.INTENT_KIND_MASK
            buf = L.intent_buffer(intent)
            chunk = self._chunk_of(m, k)
            if m[WRITERS][k][0] != "dead":
                if chunk is not None and self.cfg.mutant != "recover-live-chunk":
                    live_claims.add(chunk[0])
                if kind == L.INTENT_ROTATING:
                    live_rotating = True
                elif kind == L.INTENT_SEALING:
                    live_sealing.add(buf)
                elif intent:
                    live_claims.add(buf)
                continue
            if chunk is not None and chunk[0] == i:
                dead_chunks.append((k, chunk[1], chunk[2]))
            if kind == L.INTENT_ROTATING:
                dead_rotating.append(k)
            elif kind == L.INTENT_SEALING:
                if buf == i:
                    dead_sealing.append(k)
            elif intent and buf == i and L.intent_fill_tag(intent) == m[FILLW][i] & 0xFFFF:
                dead_claims.append(k)
        st = m[ST][i]
        pending = m[FLUSHER][6]
        if st & RESERVED:  # Recovery._reservation
            if live_rotating:
                return
            if L.lane_word(m[FILLW][i], i) in m[LANES]:
                if m[GCLOSE][i] is not None or m[CELLS][i]:
                    raise InvariantError("I4", f"recovery opens b{i} with leftovers")
                self._store(m, i, 0)  # open_fill: finish the dead rotator's rotation
            else:
                self._store(m, i, (st & ~RESERVED) | IDLE)  # unreserve
            for k in dead_rotating:
                self._free_slot(m, k)
            self.events["recovered-reservation"] += 1
            return
        if i in live_claims or i in live_sealing:
            return  # a live writer is still at it
        if not st & SEALED:
            if dead_claims or dead_chunks:
                m[FLUSHER] = ("s_or", i, 0, 0, 0, 0, pending, None)  # ring.seal(i)
            return
        slots = tuple(sorted({*dead_claims, *(k for k, _, _ in dead_chunks), *dead_sealing}))
        m[FLUSHER] = ("rv_res", i, 0, 0, 0, 0, pending, (tuple(dead_chunks), slots))

    def _free_slot(self, m: list[Any], k: int) -> None:
        """Ring.free_lease: A_k, the intent, C_k = 0 (the holder word is not modelled)."""
        self._set(m, AT, k, 0)
        self._set(m, INTENT, k, 0)
        self._set(m, CHUNKW, k, 0)

    def _resolve(self, m: list[Any], i: int, chunks: Any, slots: tuple[int, ...]) -> None:
        """Recovery._resolve of buffer i's stuck, sealed fill, in one step: only the
        flusher writes it now (no live claim, chunk or sealer was on it, and it is
        sealed, so no new one can start)."""
        st, fill = m[ST][i], m[FILLW][i]
        closed = bool(st & CLOSED)
        extent_stored = closed or m[EXTOF][i] == fill
        used = m[USED][i] if extent_stored else self.cap
        if used > self.cap:
            return
        for _, pos, end in chunks:
            if pos % 8 or not pos <= end <= used:
                return  # "left as it is"
        for k, pos, end in chunks:
            self._settle_dead_chunk(m, i, k, pos, end)
        if not extent_stored:
            sub: tuple[Any, ...] | None = self._close_start(used)
            while sub is not None:  # close_extent, mark_closed
                sub = self._close_step(m, i, sub, None)
        elif not closed:
            self._close_step(m, i, ("cf_closed", used, m[ADDR][i], m[SEQ][i]), None)
        deficit = (used - self._committed(m, i)) & MASK64
        if deficit > self.cap:
            return
        row = m[COMMITS][self.row_r]
        self._set(m, COMMITS, self.row_r, _put(row, i, row[i] + deficit))
        # The ghost bytes: a dead writer's zero (CLAIMED) cells are padding now;
        # so is the rest of [0, used) past the last claim (the fill was closed at
        # capacity when its closer died before storing the extent).
        cells = []
        pos = 0
        for old in m[CELLS][i]:
            if old[0] > pos:
                cells.append((pos, old[0] - pos, PAD, -1, CHUNK_REST, fill))
            kind = old[2]
            if m[WRITERS][old[3]][0] == "dead" and kind in (CLAIMED, PAYLOAD):
                if kind == PAYLOAD:
                    raise InvariantError(
                        "I2",
                        f"recovery leaves W{old[3]}#{old[4]}'s payload without a header "
                        f"at b{i}+{old[0]} (not abandoned)",
                    )
                kind = PAD
            cells.append((*old[:2], kind, *old[3:]))
            pos = old[0] + old[1]
        if pos < used:
            cells.append((pos, used - pos, PAD, -1, CHUNK_REST, fill))
        self._set(m, CELLS, i, tuple(cells))
        for k in slots:
            self._free_slot(m, k)
        self.events["recovered"] += 1

    def _settle_dead_chunk(self, m: list[Any], i: int, k: int, pos: int, end: int) -> None:
        """Keep the finished records from A_k on (finished_prefix); the rest of the
        chunk becomes one ABANDONED record unless it is all zero."""
        inside = [c for c in m[CELLS][i] if c[3] == k and pos <= c[0] < end]
        first = pos
        for c in inside:
            if c[0] != first or c[4] == CHUNK_REST or c[2] not in (DATA, ABANDONED):
                break
            first += c[1]
        rest = [c for c in inside if c[0] >= first]
        if any(c[2] in (PAYLOAD, DATA) for c in rest):
            keep = tuple(c for c in m[CELLS][i] if c not in rest)
            cell = (first, end - first, ABANDONED, k, CHUNK_REST, m[FILLW][i])
            self._set(m, CELLS, i, tuple(sorted((*keep, cell))))
            self.events["recovery-abandoned"] += 1

    # -- invariants ---------------------------------------------------------------------

    def order_error(self, file: tuple[Any, ...]) -> str | None:
        """I8: each writer's records in the file in append order (by address, offset)."""
        last: dict[int, int] = {}
        for seg in file:
            for kind, w, rec in seg[4]:
                if kind != DATA:
                    continue
                if last.get(w, -1) >= rec:
                    return f"W{w}#{rec} is in the file after W{w}#{last[w]}"
                last[w] = rec
        return None

    def check_state(self, s: State) -> None:
        returned = tuple(f[1] for f in s[WRITERS])
        key = (s[FILE], s[CELLS], s[GWRITTEN], returned, s[SBUF], s[PEND])
        if key not in self._records_ok:
            self._check_records(s)
            self._records_ok.add(key)
        for i, g in enumerate(s[GCLOSE]):
            # take_ready's "the column sums to used" is right only if it never passes it
            if g is not None and self._committed(s, i) > g[2]:
                raise InvariantError(
                    "I2",
                    f"b{i}'s fill {g[0]} has {self._committed(s, i)} bytes committed, "
                    f"more than its used={g[2]}",
                )
        bound = self.cap + self.nw * self.faa_limit
        for i, st in enumerate(s[ST]):
            if not st & SEALED and st >> SHIFT > bound:
                raise InvariantError("overshoot", f"open b{i} at offset {st >> SHIFT} > {bound}")

    def _check_records(self, s: State) -> None:
        # I7: every returned record is in exactly one place, nothing is anywhere twice.
        seen: Counter[tuple[int, int]] = Counter()
        for seg in s[FILE]:
            for kind, w, rec in seg[4]:
                if kind == DATA:
                    seen[(w, rec)] += 1
        written = s[GWRITTEN]
        for i, cells in enumerate(s[CELLS]):
            if not written[i]:
                for cell in cells:
                    if cell[2] == DATA:
                        seen[(cell[3], cell[4])] += 1
        # Under TSO a returned record may still be on its way: its DATA store in
        # the writer's buffer, or still to be issued at its next step (PEND).
        for w in range(self.nw):
            for loc, val in s[SBUF][w]:
                if loc[0] == "R" and val == DATA:
                    _, i, off, _w, rec = loc
                    live = any(c[0] == off and c[3] == w and c[4] == rec for c in s[CELLS][i])
                    if live and not written[i]:
                        seen[(w, rec)] += 1
            for entry in s[PEND][w]:
                if entry[0] == "carve":
                    _, i, off, _size, rec = entry
                    rest = any(  # the chunk's rest, not carved up to off yet
                        c[0] <= off < c[0] + c[1]
                        and c[3] == w
                        and c[4] == CHUNK_REST
                        and c[2] == CLAIMED
                        for c in s[CELLS][i]
                    )
                    if rest and not written[i]:
                        seen[(w, rec)] += 1
                elif entry[0] == "hdr":  # carved, its header still to be stored
                    _, i, off, rec = entry
                    live = any(c[0] == off and c[3] == w and c[4] == rec for c in s[CELLS][i])
                    if live and not written[i]:
                        seen[(w, rec)] += 1
        for key, n in seen.items():
            if n > 1:
                raise InvariantError("I7", f"record W{key[0]}#{key[1]} is present {n} times")
        for w in range(self.nw):
            for rec in range(self.returned(s, w)):
                if not seen[(w, rec)]:
                    raise InvariantError("I7", f"W{w}#{rec} returned, but it is nowhere")

    def check_final(self, s: State) -> None:
        for i, st in enumerate(s[ST]):
            if not st & IDLE:
                raise InvariantError(
                    "I5", f"flusher done but b{i} is {fmt_word(st)}: close() fails"
                )
        pos = 0
        for seg in s[FILE]:
            # With recovery a closer killed between taking its address and storing
            # the extent leaves a hole (docs/crash-safety.md: the flusher fills it
            # with filler segments later; not modelled), so only overlaps count.
            if seg[0] < pos or (seg[0] > pos and not self.cfg.recovery):
                raise InvariantError("I3", f"file hole at [{pos}, {seg[0]})")
            pos += seg[1]
        if pos != s[NEXT_ADDR] and not (self.cfg.recovery and pos < s[NEXT_ADDR]):
            raise InvariantError("I3", f"file ends at {pos}, next_address is {s[NEXT_ADDR]}")
        found: Counter[tuple[int, int]] = Counter()
        for seg in s[FILE]:
            for kind, w, rec in seg[4]:
                if kind == DATA:
                    found[(w, rec)] += 1
        for w in range(self.nw):
            for rec in range(self.returned(s, w)):
                if found[(w, rec)] != 1:
                    raise InvariantError(
                        "I7", f"W{w}#{rec} returned; it is {found[(w, rec)]} times in the file"
                    )
        err = self.order_error(s[FILE])
        if err:
            raise InvariantError("I8", err)

    @staticmethod
    def seq_inverted(s: State) -> bool:
        """docs/format.md: "seq increases in file order".  True if it does not."""
        seqs = [seg[2] for seg in s[FILE]]
        return seqs != sorted(seqs)

    # -- traces -------------------------------------------------------------------------

    def describe(self, before: State, tag: Tag, after: State) -> str:
        if tag[0] == "D":
            return f"W{tag[1]} is killed at {self.pc_name(before, tag[1])}"
        if tag[0] == "S":
            return f"W{tag[1]} stops for good at {self.pc_name(before, tag[1])}"
        if tag[0] == "B":
            loc, val = before[SBUF][tag[1]][0]
            return f"W{tag[1]}'s store {loc} = {val} reaches memory"
        if tag[0] == "O":
            return "owner: close() sets CLOSING"
        if tag[0] == "W":
            w = tag[1]
            who = f"W{w} {self.pc_name(before, w)} -> {self.pc_name(after, w)}"
            frame = before[WRITERS][w]
            if len(tag) > 2:
                who += " (sync)"
            if frame[0] == "faa":
                i = frame[2] & L.LANE_INDEX_MASK
                size = frame[4] if self.chunked else self.cfg.records[w][frame[1]]
                who += f" [fetch_add(b{i}, {size}<<32) returned {fmt_word(before[ST][i])}]"
        else:
            who = f"flusher {self.flusher_pc(before)}"
            if len(tag) > 1:
                who += f" [{' '.join(map(str, tag[1:]))}]"
            who += f" -> {self.flusher_pc(after)}"
        changes = []
        for fld in range(GWRITTEN + 1):
            a, b = before[fld], after[fld]
            if a == b:
                continue
            if fld in (ST, LANES) or (isinstance(a, tuple) and fld != FILE):
                for k, (x, y) in enumerate(zip(a, b, strict=True)):
                    if x == y:
                        continue
                    if fld == ST:
                        changes.append(f"state[b{k}] {fmt_word(x)} -> {fmt_word(y)}")
                    elif fld == LANES:
                        changes.append(f"lane[{k}] {fmt_lane(x)} -> {fmt_lane(y)}")
                    elif fld == CELLS:
                        changes.append(f"b{k} records {self.fmt_cells(y)}")
                    else:
                        changes.append(f"{FIELD_NAMES[fld]}[{k}] {x} -> {y}")
            elif fld == FILE:
                changes.append(f"file {self.fmt_file(b)}")
            else:
                changes.append(f"{FIELD_NAMES[fld]} {a} -> {b}")
        for fld, name in ((AT, "A"), (CHUNKW, "C"), (SBUF, "sb"), (PEND, "pend"), (CHL, "chunk")):
            for k, (x, y) in enumerate(zip(before[fld], after[fld], strict=True)):
                if x != y:
                    changes.append(f"{name}[{k}] {x} -> {y}")
        return who + (": " + "; ".join(changes) if changes else "")

    @staticmethod
    def fmt_cells(cells: tuple[Any, ...]) -> str:
        return (
            "[" + ", ".join(f"{c[0]}+{c[1]} W{c[3]}#{c[4]} {KIND_NAMES[c[2]]}" for c in cells) + "]"
        )

    @staticmethod
    def fmt_file(file: tuple[Any, ...]) -> str:
        return (
            "["
            + ", ".join(
                f"@{seg[0]} fill {seg[3]} seq {seg[2]}: "
                + " ".join(f"W{w}#{r}" if k == DATA else KIND_NAMES[k] for k, w, r in seg[4])
                for seg in file
            )
            + "]"
        )

    @staticmethod
    def pc_name(s: State, w: int) -> str:
        pc, rec, lw, _old, sub = s[WRITERS][w]
        if pc == "rot":
            name = f"rotate({sub[0]}).{sub[1]}"
        elif pc == "close":
            name = f"close_crossing.{sub[0]}"
        elif pc == "yclose":
            name = f"sync.close.{sub[0]}"
        else:
            name = pc
        if pc in FINISHED:
            return f"{name}(returned {rec})"
        return f"{name}(#{rec}{' lane ' + fmt_lane(lw) if lw else ''})"

    @staticmethod
    def flusher_pc(s: State) -> str:
        fl = s[FLUSHER]
        if fl[0] == "close":
            return f"seal.{fl[7][0]}(b{fl[1]})"
        return str(fl[0])

    def summary(self, s: State) -> str:
        parts = [
            "states " + " ".join(f"b{i}={fmt_word(x)}" for i, x in enumerate(s[ST])),
            "fills " + " ".join(f"b{i}={x}" for i, x in enumerate(s[FILLW])),
            "lanes " + " ".join(fmt_lane(x) for x in s[LANES]),
            f"status {s[STATUS]}",
            "records " + " ".join(f"b{i}={self.fmt_cells(c)}" for i, c in enumerate(s[CELLS])),
            "file " + self.fmt_file(s[FILE]),
            "writers " + ", ".join(f"W{w} {self.pc_name(s, w)}" for w in range(self.nw)),
            f"A {s[AT]} C {s[CHUNKW]} chunks {s[CHL]}",
            f"store buffers {s[SBUF]} pending {s[PEND]}",
            f"flusher {self.flusher_pc(s)}, owner {s[OWNER]}",
        ]
        return "\n".join(parts)


# -- exploration -------------------------------------------------------------------------


@dataclass
class Result:
    config: Config
    states: int = 0
    transitions: int = 0
    finals: int = 0
    pruned: int = 0
    seconds: float = 0.0
    #: states from which the run can no longer finish (owner's close never completes)
    stalled: int = 0
    #: the first stalled state found (BFS order): the shortest path into a wedge
    stall_trace: list[str] = field(default_factory=list)
    stall_summary: str = ""
    #: writer deaths: (step it died before, its intent then ("-", "claim",
    #: "rotating"), outcome) -> count.  Outcome "wedges": the run could finish (or
    #: reach the bound) just before the death, and can do neither after it;
    #: "finishes": a finished run is still reachable after it; "bound": only
    #: pruned states are; "doomed": the run was stalled already.
    deaths: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: the distinct files of the final states: (address, seq, records) per segment
    final_files: set[tuple[Any, ...]] = field(default_factory=set)
    #: final states whose file breaks docs/format.md's "seq increases in file order"
    seq_inversions: int = 0
    seq_trace: list[str] = field(default_factory=list)
    #: transitions that returned a chunk's tail, by who returned it: "writer"
    #: (slow-path step a), "sealer" (a writer, after its own sync-seal), "flusher"
    events: Counter[str] = field(default_factory=Counter)


def _trace(
    model: Model, states: list[State], parent: array[int], tags: list[Tag | None], sid: int
) -> list[str]:
    path = []
    while sid > 0:
        path.append(sid)
        sid = parent[sid]
    lines = []
    prev = states[0]
    for n, sid in enumerate(reversed(path), 1):
        tag = tags[sid]
        assert tag is not None
        lines.append(f"{n:3}. {model.describe(prev, tag, states[sid])}")
        prev = states[sid]
    return lines


def _backward(marked: bytearray, src: array[int], dst: array[int]) -> None:
    """Mark every state from which a marked state is reachable (edges src -> dst)."""
    n = len(marked)
    start = array("q", bytes(8 * (n + 1)))  # predecessors of b: preds[start[b]:start[b+1]]
    for b in dst:
        start[b + 1] += 1
    for k in range(n):
        start[k + 1] += start[k]
    fill = array("q", start)
    preds = array("q", bytes(8 * len(src)))
    for a, b in zip(src, dst, strict=True):
        preds[fill[b]] = a
        fill[b] += 1
    todo = deque(k for k in range(n) if marked[k])
    while todo:
        b = todo.popleft()
        for a in preds[start[b] : start[b + 1]]:
            if not marked[a]:
                marked[a] = 1
                todo.append(a)


def explore(cfg: Config, max_states: int | None = None) -> Result:
    """Visit every reachable state of *cfg* (breadth first), checking the invariants.

    Raises InvariantError, with the shortest trace to it, on the first broken invariant.
    """
    model = Model(cfg)
    t0 = time.perf_counter()
    init = model.initial()
    ids: dict[State, int] = {init: 0}
    states: list[State] = [init]
    parent = array("q", [-1])
    tags: list[Tag | None] = [None]
    src = array("q")
    dst = array("q")
    can_finish = bytearray(1)  # seeds of the backward search: finals, pruned frontier
    death_edges: list[tuple[int, int, str, str]] = []
    res = Result(cfg)
    frontier = 0
    while frontier < len(states):
        sid = frontier
        s = states[sid]
        frontier += 1
        if max_states is not None and len(states) > max_states:
            raise RuntimeError(f"{cfg.name}: more than {max_states} states (at depth of {sid})")
        try:
            model.check_state(s)
            if model.is_final(s):
                model.check_final(s)
                res.finals += 1
                res.final_files.add(tuple((seg[0], seg[2], seg[4]) for seg in s[FILE]))
                can_finish[sid] = 1
                if model.seq_inverted(s):
                    res.seq_inversions += 1
                    if not res.seq_trace:
                        res.seq_trace = [
                            *_trace(model, states, parent, tags, sid),
                            "file " + Model.fmt_file(s[FILE]),
                        ]
        except InvariantError as exc:
            exc.trace = [*_trace(model, states, parent, tags, sid), model.summary(s)]
            raise
        for tag in model.tags(s):
            try:
                t = model.apply(s, tag)
            except PrunedError:
                res.pruned += 1
                can_finish[sid] = 1
                continue
            except InvariantError as exc:
                exc.trace = [
                    *_trace(model, states, parent, tags, sid),
                    f"  >> {tag}: violates it",
                    model.summary(s),
                ]
                raise
            if t == s:
                continue
            tid = ids.get(t)
            if tid is None:
                tid = len(states)
                ids[t] = tid
                states.append(t)
                parent.append(sid)
                tags.append(tag)
                can_finish.append(0)
            src.append(sid)
            dst.append(tid)
            if tag[0] == "D":
                w = tag[1]
                intent = s[INTENT][w]
                kind = (
                    "-"
                    if not intent
                    else "rotating"
                    if intent & L.INTENT_KIND_MASK == L.INTENT_ROTATING
                    else "claim"
                )
                death_edges.append((sid, tid, Model._wpc(s[WRITERS][w]), kind))
    res.states = len(states)
    res.transitions = len(src)
    finishes = bytearray(len(states))  # strictly: a final state is reachable
    for k in range(len(states)):
        if can_finish[k] and model.is_final(states[k]):
            finishes[k] = 1
    _backward(finishes, src, dst)
    _backward(can_finish, src, dst)
    stalled = [k for k in range(len(states)) if not can_finish[k]]
    res.stalled = len(stalled)
    if stalled:
        res.stall_trace = _trace(model, states, parent, tags, stalled[0])
        res.stall_summary = model.summary(states[stalled[0]])
    for sid, tid, pc, intent in death_edges:
        if not can_finish[sid]:
            outcome = "doomed"
        elif not can_finish[tid]:
            outcome = "wedges"
        else:
            outcome = "finishes" if finishes[tid] else "bound"
        res.deaths[(pc, intent, outcome)] += 1
    res.events = model.events
    res.seconds = time.perf_counter() - t0
    return res
