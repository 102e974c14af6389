"""Layer 3: dead-writer recovery, run by the flusher.

A writer killed between its claim and its commit leaves a fill that can never
complete: its bytes are counted in ``used`` but never committed.  Aeron's answer,
which we follow, is to turn the dead claim into padding after a timeout.  We
never take a range from a live process: a writer that is slow or stopped
(SIGSTOP) keeps its claim for as long as it lives.  A live writer that gave its
slot up (ORPHANED: an exception interrupted it where it could not tell how far
its claim had got) counts as dead.

What recovery works from (see _layout and _ring):

* every lease slot holds its owner's pid and start time, so a dead owner is
  certain, pid reuse included;
* a writer's *intent* (buffer, size) is in its slot from before its
  fetch-and-add until after its commit, and the claim's offset (``at``) from
  the moment the claim is known to have succeeded, before any byte of it is
  written; sealing and rotating writers leave markers too;
* a record's header is written after its payload, and buffers are zeroed before
  reuse.

So a dead claim is either *known* (its offset is in the lease: its finished
records are kept, the rest of the range becomes an ABANDONED record) or
*unknown* (the writer died between its fetch-and-add and storing the offset:
it wrote nothing, and its range, if it got one, is still zero).  Zero words are
padding in the file format, so an unknown claim needs no finding: recovery
commits whatever the fill lacks (``used`` minus the commit counters) in the
flusher's own commit row.  A fill whose closer died before storing its extent
is closed with ``used`` = capacity: everything past the last real claim is zero,
hence padding.  No walk over the fill's records, so recovery costs the same for
the largest buffer as for the smallest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import _layout as L
from ._ring import Ring, holder_alive


@dataclass
class _Leases:
    """One scan of the lease table."""

    live_claims: set[int] = field(default_factory=set)  # buffer indexes
    live_sealing: set[int] = field(default_factory=set)  # buffer indexes
    live_rotating: bool = False
    # buffer index -> [slot]: claims in flight (no chunk installed: wrote nothing)
    dead_claims: dict[int, list[int]] = field(default_factory=dict)
    # buffer index -> [(slot, position, chunk end)], mapping offsets
    dead_chunks: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
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

    def _dead(self, k: int, pid: int) -> bool:
        words = self.ring.words
        at = self.ring.geometry.lease(k)
        if words[(at + L.L_FLAGS) // 8] & L.FLAG_ORPHANED:
            return True
        return not holder_alive(pid, words[(at + L.L_START) // 8])

    def _chunk(self, k: int) -> tuple[int, int, int] | None:
        """Slot *k*'s chunk, if it names the current fill of a busy buffer and
        still holds something (an append in flight, or a tail): (buffer,
        position, end), mapping offsets."""
        ring = self.ring
        words = ring.words
        lease = ring.geometry.lease(k)
        c = words[(lease + L.L_CHUNK) // 8]
        if not c:
            return None
        extent = ring.chunk_extent(c)
        if extent is None or ring.state(extent[0]) & L.IDLE:
            return None
        i, end = extent
        at = words[(lease + L.L_AT) // 8]
        pos = at & ~L.AT_BUSY
        if pos >= end and not at & L.AT_BUSY:
            return None  # used up: nothing in flight, no tail
        return i, pos, end

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
            kind = intent & L.INTENT_KIND_MASK
            buffer = L.intent_buffer(intent)
            chunk = self._chunk(k)
            if not self._dead(k, pid):
                # A live chunk holds its buffer, busy or not: if it is not
                # busy, the flusher takes its tail back (return_chunks).
                if chunk is not None:
                    out.live_claims.add(chunk[0])
                if kind == L.INTENT_ROTATING:
                    out.live_rotating = True
                elif kind == L.INTENT_SEALING:
                    out.live_sealing.add(buffer)
                elif intent:
                    out.live_claims.add(buffer)
                continue
            if chunk is not None:
                out.dead_chunks.setdefault(chunk[0], []).append((k, chunk[1], chunk[2]))
            if kind == L.INTENT_ROTATING:
                out.dead_rotating.append(k)
            elif kind == L.INTENT_SEALING:
                out.dead_sealing.setdefault(buffer, []).append(k)
            elif intent:
                if buffer >= g.buffers:
                    if chunk is None:
                        self._free(k, pid)  # corrupt: never index out of range
                    continue
                if L.intent_fill_tag(intent) != words[ring.fill_w[buffer]] & 0xFFFF:
                    # A claim on an earlier fill (settled long ago, or a stale
                    # lane word): nothing of the current fill.
                    if chunk is None:
                        self._free(k, pid)
                    continue
                out.dead_claims.setdefault(buffer, []).append(k)
            elif chunk is None:
                self._free(k, pid)
        return out

    def sweep(self) -> None:
        """Free the lease slots of dead writers whose intent no longer matters.

        A writer can die with an intent that nothing is stuck on: after its
        commit but before clearing it, after a rejected claim, or while rotating
        before it reserved anything.  Run every quarter of a second
        (acquire_lease waits for it when every slot is taken); the stuck-fill
        path handles the intents that still matter.
        """
        ring = self.ring
        g = ring.geometry
        words = ring.words
        busy: set[int] = set()
        reserved = False
        unclosed: set[int] = set()
        for i in range(g.buffers):
            st = ring.state(i)
            if st & L.RESERVED:
                reserved = True
            if not st & L.IDLE:
                busy.add(i)
            if st & L.SEALED and not st & (L.CLOSED | L.IDLE | L.RESERVED):
                unclosed.add(i)
        for k in range(g.max_writers):
            at = g.lease(k)
            pid = words[(at + L.L_PID) // 8]
            if not pid or not self._dead(k, pid):
                continue
            intent = words[(at + L.L_INTENT) // 8]
            kind = intent & L.INTENT_KIND_MASK
            if kind == L.INTENT_ROTATING:
                matters = reserved
            elif kind == L.INTENT_SEALING:
                matters = L.intent_buffer(intent) in unclosed
            else:
                # A claim matters while its buffer holds the fill it was made on
                # and that fill is not yet taken.
                i = L.intent_buffer(intent)
                matters = (
                    bool(intent)
                    and i in busy
                    and i < g.buffers
                    and L.intent_fill_tag(intent) == words[ring.fill_w[i]] & 0xFFFF
                )
            # So does a chunk with a tail or a record still in it.
            chunk = self._chunk(k)
            if chunk is not None and chunk[0] in busy and chunk[1] < chunk[2]:
                matters = True
            if not matters:
                self._free(k, pid)

    def _free(self, k: int, pid: int) -> None:
        self.ring.free_lease(k, pid)

    def _free_slot(self, k: int) -> None:
        self._free(k, self.ring.words[(self.ring.geometry.lease(k) + L.L_PID) // 8])

    def run(self, now: float) -> None:
        stuck = self.stuck(now)
        if not stuck:
            return
        leases = self.scan_leases()
        ring = self.ring
        for i in stuck:
            st = ring.state(i)
            if st & L.RESERVED:
                self._reservation(i, leases)
                continue
            if i in leases.live_claims or i in leases.live_sealing:
                continue  # a live writer is still at it: never take its range
            dead = leases.dead_claims.get(i, [])
            chunks = leases.dead_chunks.get(i, [])
            sealers = leases.dead_sealing.get(i, [])
            if not st & L.SEALED:
                if dead or chunks:
                    ring.seal(i)  # closes it unless a dead writer had crossed capacity
                continue  # next pass sees it sealed (or closed)
            if self._resolve(i, chunks):
                self.ring.header_add(L.H_RECOVERED, 1)
                self.seen.pop(i, None)
                for k in dead:
                    self._free_slot(k)
                for k, _, _ in chunks:
                    self._free_slot(k)
                for k in sealers:
                    self._free_slot(k)

    def _reservation(self, j: int, leases: _Leases) -> None:
        """Buffer *j* stayed RESERVED: its rotator died between reserving it and
        opening it.  Only act when no live writer is rotating (it might be the
        owner of this reservation)."""
        if leases.live_rotating:
            return
        ring = self.ring
        named = L.lane_word(ring.words[ring.fill_w[j]], j)
        if any(ring.words[w] == named for w in ring.lane_w):
            ring.open_fill(j)  # installed in its lane already: finish the rotation
        else:
            ring.unreserve(j)
        for k in leases.dead_rotating:
            self._free_slot(k)
        self.ring.header_add(L.H_RECOVERED, 1)

    # -- resolving one fill --------------------------------------------------------

    def _resolve(self, i: int, chunks: list[tuple[int, int, int]]) -> bool:
        """Settle the stuck, sealed fill of buffer *i*, whose only unfinished
        claims are dead ones (no live writer has a claim, chunk or seal on *i*);
        *chunks*: the dead writers' chunks in it."""
        ring = self.ring
        words = ring.words
        st = ring.state(i)
        fill = words[ring.fill_w[i]]
        closed = bool(st & L.CLOSED)
        # A closer that died after storing the extent but before CLOSED: its
        # address is taken from next_address already, so keep it (no gap).
        extent_stored = closed or words[ring.extent_of_w[i]] == fill
        used = words[ring.used_w[i]] if extent_stored else ring.capacity
        if used > ring.capacity:
            return False
        start = ring.records_at[i]
        u8 = ring.bytes_view()
        # Dead chunks: keep their finished records, abandon what follows unless
        # it is all zero (padding).  Positions come from shared memory, so
        # check them before writing anything.
        for _, pos, end in chunks:
            if pos % 8 or not start <= pos <= end <= start + used:
                print(
                    f"shmflush: ring {ring.name!r}: buffer {i}: a dead writer's chunk "
                    f"[{pos}, {end}) lies outside the fill; left as it is",
                    file=sys.stderr,
                )
                return False
            first = ring.finished_prefix(pos, end)
            if first < end and u8[first:end].any():
                ring.abandon(first, end - first)
        if not extent_stored:
            ring.close_extent(i, used)
        if not closed:
            ring.mark_closed(i)
        # Whatever the fill lacks is dead writers' (abandoned or still zero):
        # commit it in the flusher's row, which nobody else writes.
        deficit = (used - ring.committed(i)) & L.WORD_MASK
        if deficit > ring.capacity:
            print(
                f"shmflush: ring {ring.name!r}: buffer {i} fill {fill} has more committed "
                f"than used ({used}); left as it is",
                file=sys.stderr,
            )
            return False
        if deficit:
            w = ring.geometry.commit(ring.geometry.recovery_row, i) // 8
            words[w] = (words[w] + deficit) & L.WORD_MASK
        ring.wake_flusher()
        return True
