"""Layer 3: dead-writer recovery, run by the flusher.

A writer killed between its claim and its commit leaves a fill that can never
complete: its bytes are counted in ``used`` but never committed.  Aeron's answer,
which we follow, is to turn the dead claim into padding after a timeout.  We
never take a range from a live process: a writer that is slow or stopped
(SIGSTOP) keeps its claim for as long as it lives.

What recovery works from (see _layout and _ring):

* every lease slot holds its owner's pid and start time, so a dead owner is
  certain, pid reuse included;
* a writer's *intent* (fill, size) is in its slot from before its fetch-and-add
  until after its commit; sealing and rotating writers leave markers too;
* a record's header is written after its payload, and buffers are zeroed before
  reuse, so a claim whose writer died before finishing has a zero header where
  a record should start.

A stuck fill is resolved by walking its records from offset 0.  A valid header
is a finished record.  A zero header is the start of a dead writer's claim, whose
size one of the dead intents names; so may be a valid header, since a batch claim
(append_many, append_array) holds several records and its writer may have died
after finishing some of them.  The walk is a depth-first search over these
choices, preferring records, and over the dead claims' sizes.  The unfinished
part of each dead claim becomes an ABANDONED record, and the whole claim is
committed on the dead slot's behalf.  A finished record whose writer died
before committing is committed likewise.  If the fill was never closed (the dead
writer was its closer), its used length is the furthest point the walk can reach
such that everything after it is still zero: valid claims tile the record area
from 0, and claims past ``used`` never write.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import _format, _proc
from . import _layout as L
from ._atomic import SEQ_CST, compare_exchange, fetch_or
from ._ring import Ring

_HEADER = _format.RECORD_HEADER
_VALID_KINDS = (_format.KIND_DATA, _format.KIND_ABANDONED)
_TAG_MASK = 0xFFFFFFFF


@dataclass
class _Leases:
    """One scan of the lease table."""

    live_claims: set[int] = field(default_factory=set)  # fill tags
    live_sealing: set[int] = field(default_factory=set)  # buffer indexes
    live_rotating: bool = False
    # fill tag -> [(slot, claim size)]
    dead_claims: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    dead_sealing: dict[int, list[int]] = field(default_factory=dict)  # buffer -> slots
    dead_rotating: list[int] = field(default_factory=list)  # slots


class Recovery:
    """Finds fills that stopped making progress and recovers dead writers' claims."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.timeout = max(ring.header(L.H_RECOVERY_NS) / 1e9, 0.01)
        # buffer -> (signature, first time seen with it)
        self.seen: dict[int, tuple[tuple[int, int, int], float]] = {}

    def _signature(self, i: int) -> tuple[int, int, int] | None:
        ring = self.ring
        st = ring.state(i)
        if st & (L.IDLE | L.FLUSHING):
            return None  # nothing to recover: free, or the flusher's own
        if not st & L.SEALED and not st >> L.OFFSET_SHIFT:
            return None  # open and empty
        return st & L.FLAG_MASK, ring.words[ring.fill_w[i]], ring.committed(i)

    def stuck(self, now: float) -> list[int]:
        """Buffers whose state, fill and commits have not moved for half the
        recovery timeout."""
        out = []
        for i in range(self.ring.geometry.buffers):
            sig = self._signature(i)
            if sig is None:
                self.seen.pop(i, None)
                continue
            prev = self.seen.get(i)
            if prev is None or prev[0] != sig:
                self.seen[i] = (sig, now)
            elif now - prev[1] >= self.timeout / 2:
                out.append(i)
        return out

    def scan_leases(self) -> _Leases:
        ring = self.ring
        g = ring.geometry
        words = ring.words
        out = _Leases()
        for k in range(g.max_writers):
            at = g.lease(k)
            pid = words[(at + L.L_PID) // 8]
            if not pid:
                continue
            intent = words[(at + L.L_INTENT) // 8]
            alive = _proc.is_alive(pid, words[(at + L.L_START) // 8])
            kind = intent & L.INTENT_KIND_MASK
            if alive:
                if kind == L.INTENT_ROTATING:
                    out.live_rotating = True
                elif kind == L.INTENT_SEALING:
                    out.live_sealing.add(intent >> 32)
                elif intent:
                    out.live_claims.add(intent >> 32)
                continue
            if kind == L.INTENT_ROTATING:
                out.dead_rotating.append(k)
            elif kind == L.INTENT_SEALING:
                out.dead_sealing.setdefault(intent >> 32, []).append(k)
            elif intent:
                size = intent & _TAG_MASK & ~L.INTENT_KIND_MASK
                out.dead_claims.setdefault(intent >> 32, []).append((k, size))
            else:
                self._free(k, pid)
        return out

    def sweep(self) -> None:
        """Free the lease slots of dead writers whose intent no longer matters.

        A writer can die with an intent that nothing is stuck on: after its
        commit but before clearing it, after a rejected claim, or while rotating
        before it reserved anything.  Run every second or so; the stuck-fill path
        handles the intents that still matter.
        """
        ring = self.ring
        g = ring.geometry
        words = ring.words
        pending: set[int] = set()
        reserved = False
        unclosed: set[int] = set()
        for i in range(g.buffers):
            st = ring.state(i)
            if st & L.RESERVED:
                reserved = True
            if not st & L.IDLE:
                pending.add(words[ring.fill_w[i]] & _TAG_MASK)
            if st & L.SEALED and not st & (L.CLOSED | L.IDLE | L.RESERVED):
                unclosed.add(i)
        for k in range(g.max_writers):
            at = g.lease(k)
            pid = words[(at + L.L_PID) // 8]
            if not pid or _proc.is_alive(pid, words[(at + L.L_START) // 8]):
                continue
            intent = words[(at + L.L_INTENT) // 8]
            kind = intent & L.INTENT_KIND_MASK
            if kind == L.INTENT_ROTATING:
                matters = reserved
            elif kind == L.INTENT_SEALING:
                matters = (intent >> 32) in unclosed
            else:
                matters = bool(intent) and (intent >> 32) in pending
            if not matters:
                self._free(k, pid)

    def _free(self, k: int, pid: int) -> None:
        ring = self.ring
        at = ring.geometry.lease(k)
        ring.words[(at + L.L_INTENT) // 8] = 0
        compare_exchange(ring.base + at + L.L_PID, pid, 0)

    def run(self, now: float) -> None:
        stuck = self.stuck(now)
        if not stuck:
            return
        leases = self.scan_leases()
        ring = self.ring
        for i in stuck:
            st = ring.state(i)
            fill = ring.words[ring.fill_w[i]]
            tag = fill & _TAG_MASK
            if st & L.RESERVED:
                self._reservation(i, leases)
                continue
            if tag in leases.live_claims or i in leases.live_sealing:
                continue  # a live writer is still at it: never take its range
            dead = leases.dead_claims.get(tag, [])
            if not st & L.SEALED:
                if dead:
                    ring.seal(i)  # closes it unless a dead writer had crossed capacity
                continue  # next pass sees it sealed (or closed)
            if self._resolve(i, fill, dead):
                self.ring.header_add(L.H_RECOVERED, 1)
                self.seen.pop(i, None)
                for k, _ in dead:
                    self._free(k, ring.words[(ring.geometry.lease(k) + L.L_PID) // 8])
                for k in leases.dead_sealing.get(i, []):
                    self._free(k, ring.words[(ring.geometry.lease(k) + L.L_PID) // 8])

    def _reservation(self, j: int, leases: _Leases) -> None:
        """Buffer *j* stayed RESERVED: its rotator died between reserving it and
        opening it.  Only act when no live writer is rotating (it might be the
        owner of this reservation)."""
        if leases.live_rotating:
            return
        ring = self.ring
        named = L.lane_word(ring.words[ring.fill_w[j]], j)
        if any(ring.words[w] == named for w in ring.lane_w):
            ring._open(j)  # installed in its lane already: finish the rotation
        else:
            ring._unreserve(j)
        for k in leases.dead_rotating:
            self._free(k, ring.words[(ring.geometry.lease(k) + L.L_PID) // 8])
        self.ring.header_add(L.H_RECOVERED, 1)

    # -- resolving one fill --------------------------------------------------------

    def _resolve(self, i: int, fill: int, dead: list[tuple[int, int]]) -> bool:
        ring = self.ring
        words = ring.words
        st = ring.state(i)
        closed = bool(st & L.CLOSED)
        # A closer that died after storing the extent but before CLOSED: its
        # address is taken from next_address already, so keep it (no gap).
        extent_stored = closed or words[ring.extent_of_w[i]] == fill
        used = words[ring.used_w[i]] if extent_stored else None
        if used is not None and used > ring.capacity:
            return False
        sizes = [size for _, size in dead]
        plan = self._walk(i, sizes, used)
        if plan is None:
            print(
                f"shmflush: ring {ring.name!r}: buffer {i} fill {fill} is stuck and its "
                "records do not match the dead writers' claims; left as it is",
                file=sys.stderr,
            )
            return False
        end, holes = plan
        start = ring.records_at[i]
        owners = list(dead)
        for at, size in holes:
            slot = next(k for k, s in owners if s == size)
            owners.remove((slot, size))
            # Keep the claim's finished records (the head of a batch); abandon
            # the rest of the claim from the first unfinished one.
            first_unfinished = self._finished_prefix(start + at, start + at + size)
            if first_unfinished < start + at + size:
                ring.abandon(first_unfinished, start + at + size - first_unfinished)
            self._commit(slot, i, size)
        if not extent_stored:
            ring._close_fill(i, end)
            used = end
        if not closed:
            fetch_or(ring.state_addr[i], L.CLOSED, SEQ_CST)
        assert used is not None
        deficit = (used - ring.committed(i)) & L.WORD_MASK
        if deficit and deficit <= ring.capacity and dead:
            # Finished records of writers that died before committing them.
            self._commit(dead[0][0], i, deficit)
        ring.wake_flusher()
        return True

    def _plausible_claim(self, at: int, end: int) -> bool:
        """Could [at, end) be one dead writer's claim?

        Its finished records form a prefix (records are finished in order); after
        the first unfinished one there is no valid record header.  A stretch that
        has one is covering somebody else's finished record, which recovery must
        never abandon: with several dead claims in one fill, a wrong choice of
        size could otherwise swallow a live writer's record that lies between
        them (found by the 10-minute soak).
        """
        view = self.ring.view
        q = self._finished_prefix(at, end) + _format.RECORD_ALIGN
        while q + _format.RECORD_HEADER_SIZE <= end:
            length, kind, mark = _HEADER.unpack_from(view, q)
            if (
                mark == _format.RECORD_MARK
                and kind in _VALID_KINDS
                and q + _format.record_size(length) <= end
            ):
                return False
            q += _format.RECORD_ALIGN
        return True

    def _finished_prefix(self, at: int, end: int) -> int:
        """The offset of the first unfinished record in the claim [at, end)."""
        view = self.ring.view
        while at + _format.RECORD_HEADER_SIZE <= end:
            length, kind, mark = _HEADER.unpack_from(view, at)
            size = _format.record_size(length)
            if mark != _format.RECORD_MARK or kind not in _VALID_KINDS or at + size > end:
                break
            at += size
        return at

    def _commit(self, slot: int, i: int, size: int) -> None:
        ring = self.ring
        w = ring.geometry.commit(slot, i) // 8
        ring.words[w] = (ring.words[w] + size) & L.WORD_MASK

    def _walk(
        self, i: int, sizes: list[int], used: int | None
    ) -> tuple[int, list[tuple[int, int]]] | None:
        """Find how the record area of buffer *i* splits into finished records and
        dead claims of the given *sizes*.

        With *used* known, the walk must end exactly there.  Otherwise the end is
        the furthest point after which the buffer is all zeros.  Returns (end,
        holes as (offset, size)), or None if no split fits.
        """
        ring = self.ring
        view = ring.view
        start = ring.records_at[i]
        limit = ring.capacity if used is None else used
        best: tuple[int, list[tuple[int, int]]] | None = None

        def rest_is_zero(p: int) -> bool:
            return not any(view[start + p : start + ring.capacity])

        def visit(p: int, left: list[int], holes: list[tuple[int, int]]) -> bool:
            nonlocal best
            if used is not None and p == used:
                best = (p, list(holes))
                return True
            if used is None and (best is None or p > best[0]) and rest_is_zero(p):
                best = (p, list(holes))
            if p + _format.RECORD_HEADER_SIZE <= limit:
                length, kind, mark = _HEADER.unpack_from(view, start + p)
                if mark == _format.RECORD_MARK and kind in _VALID_KINDS:
                    # A finished record; try it as one first, so that finished
                    # records stay records whenever the rest still fits.
                    end = p + _format.record_size(length)
                    if end <= limit and visit(end, left, holes):
                        return True
            # A dead claim starting here.  It may begin with finished records:
            # one claim of append_many or append_array holds a whole batch, and
            # its writer may have died after writing only part of it.
            for size in sorted(set(left), reverse=True):
                if p + size <= limit and self._plausible_claim(start + p, start + p + size):
                    rest = list(left)
                    rest.remove(size)
                    holes.append((p, size))
                    if visit(p + size, rest, holes):
                        return True
                    holes.pop()
            return False

        visit(0, sizes, [])
        return best
