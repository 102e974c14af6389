"""Layer 1: the shared-memory layout.  Every offset and bit field lives here.

One POSIX shared-memory object per ring, named ``/shmflush.<name>``::

    offset                       size            contents
    0                            4096            header (fields below, u64 each)
      0     magic  b"SHMFLRNG"
      8     layout version
      16    total size of the object          -+
      24    buffer_size                         |  parameters, written once by
      32    buffers                             |  the creator before anybody
      40    lanes                               |  can attach, validated by
      48    max_writers (lease slots)           |  every attach
      56    sync level (0 none, 1 data)         |
      64    flush_interval in ns               -+
      72    owner pid        80  owner start time (clock ticks)   88  ring id (random)
      96    recovery timeout in ns
      104   stream id of the file (16 bytes, from its file header): the
            flusher writes it into every segment header
      120   always zero (see _ring.Writer.seal_w)
      128   next_address  136 next_seq  144 fill_counter    (atomic; own line)
      192   status        200 error errno   208 error buffer   216 waiters
            (error errno and buffer: the write that broke the ring; buffer
            NO_BUFFER when it was the batch's fdatasync or preallocation)
      256   flusher pid   264 flusher start  272 heartbeat (CLOCK_MONOTONIC ns)
      280   direct_io     288 buffers flushed 296 bytes written 304 syncs
      312   recovered (stuck fills recovered)   320 flusher restarts
      328   last flusher restart attempt (CLOCK_MONOTONIC ns)
      336   written below: the file is written up to here without a gap
      344   stall errno: the error the flusher is retrying without breaking the
            ring (ENOSPC, EDQUOT: the disk or quota is full; or an I/O error it
            has not yet given up on); 0 while it writes.  Writers wait for
            space meanwhile, and their timeouts name it.
      352   error kind: what broke the ring (with status BROKEN):
            0 ERROR_IO, an I/O error: its errno at 200, the buffer at 208
              (errno 0 there: the flusher stopped, or the owner died);
            1 ERROR_FILE_DELETED, the file's last link was removed while the
              ring wrote it (fstat st_nlink 0);
            2 ERROR_FILE_TRUNCATED, the file was cut to the size at 360, below
              the bytes at 368 that had been written already.
            Found by the flusher's fstat of the file, 4 times a second.
      376   fence: 1 (FENCE_ON) if writers claim chunks and append into them
            with plain stores (the creator could register for membarrier(2));
            0: one fetch-and-add per record.  Written once, at creation.
      512   file path, UTF-8, NUL-padded (up to 3584 bytes): lets any process
            restart the flusher on the same file
    4096                         64 * lanes      lane table: +0 lane word (below)
    LANES_END                    64 * buffers    buffer descriptors (below)
    DESC_END                     64 * max_writers lease slots (below)
    LEASES_END                   8 * (max_writers + 1) * buffers   commit counters (below)
    DATA (4096-aligned)          buffer_size * buffers   the buffers

Status word (header offset 192), bits set with an atomic OR and never cleared::

    0  CLOSING       the owner is closing: no new fills; drain and stop
    1  BROKEN        the ring takes no more records (an error the flusher cannot
                     get past, with its errno at 200, or OWNER_DEAD)
    2  FLUSHER_DONE  the flusher drained everything and exited
    3  OWNER_DEAD    the owner died without close(); set by the flusher together
                     with CLOSING and BROKEN, so writers can be told why

Every lane and descriptor owns a 64-byte cache line, so writers on different lanes
never contend on one line, and the flusher's scans do not disturb the state words
more than it must.

Buffer descriptor (64 bytes)::

    +0  state     packed state word, see below (atomic)
    +8  used      bytes of records in the closed fill (written by the closer)
    +16 address   file offset of the closed fill (written by the closer)
    +24 seq       seal sequence number of the closed fill
    +32 fill      fill number, unique per opening (written before opening)
    +40 base      sum of the buffer's commit counters when its current fill
                  opened (advanced by ``used`` when the flusher takes a fill)
    +48 extent_of fill number whose used/address/seq are stored (written after
                  them, before CLOSED: lets recovery finish a dead closer's close)
    +56 durable   fill number whose write is durable (set before the buffer is
                  zeroed: a restarted flusher must not rewrite a zeroed buffer)

State word (64 bits)::

    63 .. 32   offset   bytes claimed in the record area (may overshoot, see _ring)
    31 ..  5   unused (zero)
     4         RESERVED  picked by a rotator, not yet open
     3         IDLE      flushed and zeroed; free for the next fill
     2         CLOSED    used/address/seq are stored: the fill's extent is final
     1         FLUSHING  the flusher has taken the fill
     0         SEALED    no claim may succeed

Lane word (64 bits)::

    63 .. 16   fill number of the fill installed in the lane
    15 ..  0   buffer index

Packing both in one word lets a writer learn, with one load, *which fill* it means
to claim in; after its claim it compares that with the descriptor's fill number to
detect a stale read (see _ring).

Lease slot (64 bytes)::

    +0  holder: pid (bits 31..0) and thread id (bits 63..32) of the thread that
        holds the slot; 0 = free.  Taken with a compare-and-swap of the whole
        word, so that a thread interrupted around that compare-and-swap can
        tell whether it took the slot.          +8  process start time
    +16 thread ident   +24 lane
    +32 intent: what the holder is in the middle of; 0 = nothing.  Low half bits
        31..30 say what: 00 a claim (low bits = claim size, stored before the
        fetch-and-add, zeroed once the claim is settled: installed as the
        holder's chunk, abandoned, or rejected); 10 sealing a fill; 11 rotating
        a lane.  The high half is the low 32 bits of the lane word the claim was
        made from: bits 63..48 the fill number mod 2**16, bits 47..32 the buffer
        index (a seal's marker: the buffer index only).  A writer whose lane
        word was stale still names the buffer it really claims in, so recovery
        never takes a live writer's buffer.
    +40 at: the holder's position in its chunk, a mapping offset: where its
        next record goes.  Bit 0 (AT_BUSY) is set while the holder is inside
        an append at that offset (from before it checks the fill is unsealed
        until after its commit), and from the chunk's claim until its first
        record is committed.  Meaningful only while +56 names a chunk.
    +48 flags: ORPHANED (bit 0): the holder is alive but has given this slot
        up with a claim it could not settle (an exception inside append);
        recovery treats it as a dead writer's slot
    +56 chunk: the range the holder claimed and appends into, 0 = none:
        ``claim_intent(lane word, end)``, the chunk's buffer and fill as in
        the intent, and in bits 29..0 the offset in the record area where the
        chunk ends.  Stored by the holder after +40 (so a chunk is never seen
        with a stale position).  Its unused tail is returned by the holder or
        by the flusher, whichever wins a compare-and-swap: the flusher's
        clears the word; the holder's sets bit 31 (CHUNK_RETURNING), so that an
        interrupted holder can tell it won, and clears the word once the tail
        is committed (see _ring).

Commit counters (u64, lease-major: counter (k, i) at LEASES_END + 8 * (k * buffers + i))::

    bytes that lease slot k has committed into buffer i, over all its fills.  Only
    the slot's holder writes it, with a plain store after the record's bytes, so
    on x86-64 (total store order) a counter never runs ahead of the bytes it
    covers.  Row ``max_writers`` belongs to the flusher: it commits there the
    chunk tails it returns and what dead or orphaned writers left uncommitted.  A fill is
    complete when the column of buffer i sums to ``base + used``.  Lease-major
    order keeps each writer's counters on its own cache lines.

Inside a buffer, the first 64 bytes are the segment header of the file format
(``_format``); records start after it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from typing import Final

import posix_ipc

from . import _format
from ._errors import CorruptRingError, RingExistsError, RingNotFoundError

PAGE: Final = 4096
LINE: Final = 64

MAGIC: Final = b"SHMFLRNG"
LAYOUT_VERSION: Final = 4

# Header fields: byte offsets of u64 words.
H_MAGIC: Final = 0
H_VERSION: Final = 8
H_TOTAL_SIZE: Final = 16
H_BUFFER_SIZE: Final = 24
H_BUFFERS: Final = 32
H_LANES: Final = 40
H_MAX_WRITERS: Final = 48
H_SYNC: Final = 56
H_FLUSH_INTERVAL_NS: Final = 64
H_OWNER_PID: Final = 72
H_OWNER_START: Final = 80
H_RING_ID: Final = 88  # random per creation: tells a ring from a later one of the same name
H_RECOVERY_NS: Final = 96  # how long a stuck fill waits before dead-writer recovery
H_STREAM_ID: Final = 104  # 16 bytes: the file's stream id (see _format), up to H_ZERO
H_ZERO: Final = 120  # always zero: the word a fresh chunk's first put() checks (see _ring)
H_NEXT_ADDRESS: Final = 128
H_NEXT_SEQ: Final = 136
H_FILL_COUNTER: Final = 144
H_STATUS: Final = 192
H_ERROR_ERRNO: Final = 200
H_ERROR_BUFFER: Final = 208
H_WAITERS: Final = 216
H_FLUSHER_PID: Final = 256
H_FLUSHER_START: Final = 264
H_HEARTBEAT_NS: Final = 272
H_DIRECT_IO: Final = 280
H_BUFFERS_FLUSHED: Final = 288
H_BYTES_WRITTEN: Final = 296
H_SYNCS: Final = 304
H_RECOVERED: Final = 312
H_RESTARTS: Final = 320
H_RESTART_AT: Final = 328  # CLOCK_MONOTONIC ns of the last restart attempt
H_WRITTEN_BELOW: Final = 336  # every file byte below this was written (see _flusher)
H_STALL_ERRNO: Final = 344  # the error the flusher retries without breaking the ring
H_ERROR_KIND: Final = 352  # what broke the ring: ERROR_* below
H_ERROR_SIZE: Final = 360  # ERROR_FILE_TRUNCATED: the size the file was cut to
H_ERROR_WRITTEN: Final = 368  # ERROR_FILE_TRUNCATED: the bytes written before that
H_FENCE: Final = 376  # FENCE_ON: writers append into chunks (see _ring, _fence)
H_PATH: Final = 512
HEADER_SIZE: Final = 4096
MAX_PATH_BYTES: Final = HEADER_SIZE - H_PATH

# Status bits (H_STATUS).
STATUS_CLOSING: Final = 1 << 0  # the owner is closing: no new fills, drain and stop
STATUS_BROKEN: Final = 1 << 1  # the flusher hit an error it cannot get past
STATUS_FLUSHER_DONE: Final = 1 << 2  # the flusher drained everything and exited
STATUS_OWNER_DEAD: Final = 1 << 3  # the owner died without close() (with CLOSING|BROKEN)

# H_ERROR_KIND values.
ERROR_IO: Final = 0
ERROR_FILE_DELETED: Final = 1
ERROR_FILE_TRUNCATED: Final = 2
# H_ERROR_BUFFER when the failure was not one buffer's write.
NO_BUFFER: Final = (1 << 64) - 1

# H_FENCE values.
FENCE_OFF: Final = 0  # one fetch-and-add per record (membarrier unavailable or off)
FENCE_ON: Final = 1  # chunk claims; the flusher returns idle chunks after membarrier(2)

# H_DIRECT_IO values.
DIRECT_UNKNOWN: Final = 0
DIRECT_ON: Final = 1
DIRECT_OFF: Final = 2

SYNC_LEVELS: Final = {"none": 0, "data": 1}

# Descriptor fields.
D_STATE: Final = 0
D_USED: Final = 8
D_ADDRESS: Final = 16
D_SEQ: Final = 24
D_FILL: Final = 32
D_BASE: Final = 40
D_EXTENT_OF: Final = 48
D_DURABLE: Final = 56

# Lane word.
LANE_INDEX_MASK: Final = 0xFFFF
LANE_FILL_SHIFT: Final = 16


def lane_word(fill: int, index: int) -> int:
    return (fill << LANE_FILL_SHIFT) | index


# Lease fields.
L_PID: Final = 0


def holder_word(pid: int, tid: int) -> int:
    """The L_PID word of a slot held by thread *tid* of process *pid*."""
    return ((tid & 0xFFFFFFFF) << 32) | pid


def holder_pid(word: int) -> int:
    """The pid in an L_PID word."""
    return word & 0xFFFFFFFF


L_START: Final = 8
L_TID: Final = 16
L_LANE: Final = 24
L_INTENT: Final = 32
L_AT: Final = 40
L_FLAGS: Final = 48
L_CHUNK: Final = 56
FLAG_ORPHANED: Final = 1 << 0
AT_BUSY: Final = 1  # L_AT bit 0: the holder is inside an append at that offset
CHUNK_RETURNING: Final = 1 << 31  # L_CHUNK: the holder won its tail, is committing it
INTENT_KIND_MASK: Final = 3 << 30
INTENT_SIZE_MASK: Final = (1 << 30) - 1


def claim_intent(lane_word: int, size: int) -> int:
    """The intent of a claim of *size* bytes made from *lane_word*."""
    return ((lane_word & 0xFFFFFFFF) << 32) | size


def intent_buffer(intent: int) -> int:
    return (intent >> 32) & LANE_INDEX_MASK


def intent_fill_tag(intent: int) -> int:
    """The claim's fill number mod 2**16 (compare with ``fill & 0xFFFF``)."""
    return intent >> 48


INTENT_SEALING: Final = 2 << 30
INTENT_ROTATING: Final = 3 << 30

# State word.
SEALED: Final = 1 << 0
FLUSHING: Final = 1 << 1
CLOSED: Final = 1 << 2
IDLE: Final = 1 << 3
RESERVED: Final = 1 << 4
FLAG_MASK: Final = 0xFF
OFFSET_SHIFT: Final = 32
OFFSET_MASK: Final = 0xFFFFFFFF << OFFSET_SHIFT
WORD_MASK: Final = (1 << 64) - 1

# Parameter limits.
MIN_BUFFER_SIZE: Final = PAGE
MAX_BUFFER_SIZE: Final = 1 << 30  # the offset field is 32 bits; see _ring's overshoot bound
MAX_BUFFERS: Final = 1 << 16
MAX_WRITERS: Final = 1 << 16
MAX_COMMIT_COUNTERS: Final = 1 << 22  # 32 MiB of counters


def offset(state: int) -> int:
    return state >> OFFSET_SHIFT


def claim_delta(size: int) -> int:
    """What a claim of *size* bytes adds to a state word."""
    return size << OFFSET_SHIFT


def pack_state(off: int, flags: int) -> int:
    return (off << OFFSET_SHIFT) | flags


@dataclass(frozen=True, slots=True)
class Geometry:
    """The ring's parameters and every offset derived from them."""

    buffer_size: int
    buffers: int
    lanes: int
    max_writers: int

    def __post_init__(self) -> None:
        check_geometry(self.buffer_size, self.buffers, self.lanes, self.max_writers)

    @property
    def lanes_offset(self) -> int:
        return HEADER_SIZE

    @property
    def descriptors_offset(self) -> int:
        return HEADER_SIZE + LINE * self.lanes

    @property
    def leases_offset(self) -> int:
        return self.descriptors_offset + LINE * self.buffers

    @property
    def commits_offset(self) -> int:
        return self.leases_offset + LINE * self.max_writers

    @property
    def recovery_row(self) -> int:
        """The commit-counter row of the flusher (dead-writer recovery)."""
        return self.max_writers

    @property
    def data_offset(self) -> int:
        end = self.commits_offset + 8 * (self.max_writers + 1) * self.buffers
        return (end + PAGE - 1) // PAGE * PAGE

    @property
    def total_size(self) -> int:
        return self.data_offset + self.buffer_size * self.buffers

    @property
    def capacity(self) -> int:
        """Bytes of the record area in one buffer (after the segment header)."""
        return self.buffer_size - _format.SEGMENT_HEADER_SIZE

    @property
    def max_record(self) -> int:
        """The largest payload one record may carry."""
        return self.capacity - _format.RECORD_HEADER_SIZE

    def lane(self, i: int) -> int:
        return self.lanes_offset + LINE * i

    def descriptor(self, i: int) -> int:
        return self.descriptors_offset + LINE * i

    def lease(self, i: int) -> int:
        return self.leases_offset + LINE * i

    def commit(self, k: int, i: int) -> int:
        return self.commits_offset + 8 * (k * self.buffers + i)

    def buffer(self, i: int) -> int:
        return self.data_offset + self.buffer_size * i


def check_geometry(buffer_size: int, buffers: int, lanes: int, max_writers: int) -> None:
    """Raise ValueError/TypeError naming the parameter that is out of range."""
    for pname, value in (
        ("buffer_size", buffer_size),
        ("buffers", buffers),
        ("lanes", lanes),
        ("max_writers", max_writers),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{pname} must be an int, not {type(value).__name__}")
    if not (MIN_BUFFER_SIZE <= buffer_size <= MAX_BUFFER_SIZE) or buffer_size % PAGE:
        raise ValueError(
            f"buffer_size must be a multiple of {PAGE} between {MIN_BUFFER_SIZE} and "
            f"{MAX_BUFFER_SIZE}, got {buffer_size}"
        )
    if not 2 <= buffers <= MAX_BUFFERS:
        raise ValueError(f"buffers must be between 2 and {MAX_BUFFERS}, got {buffers}")
    if not 1 <= lanes < buffers:
        raise ValueError(
            f"lanes must be between 1 and buffers - 1 = {buffers - 1} (each lane holds one "
            f"open buffer and the flusher needs one more), got {lanes}"
        )
    if not 1 <= max_writers <= MAX_WRITERS:
        raise ValueError(f"max_writers must be between 1 and {MAX_WRITERS}, got {max_writers}")
    if (max_writers + 1) * buffers > MAX_COMMIT_COUNTERS:
        raise ValueError(
            f"(max_writers + 1) * buffers must be at most {MAX_COMMIT_COUNTERS} (one commit "
            f"counter each), got ({max_writers} + 1) * {buffers}"
        )


def read_geometry(view: memoryview, actual_size: int, name: str) -> Geometry:
    """Validate a mapped header and return its geometry.

    Shared memory is untrusted input: any process with access could have scribbled
    on it.  Everything later code indexes with is checked here, so a corrupted
    segment yields CorruptRingError rather than an out-of-bounds access.
    """
    if actual_size < HEADER_SIZE:
        raise CorruptRingError(f"ring {name!r}: segment of {actual_size} bytes is too small")
    if bytes(view[H_MAGIC : H_MAGIC + 8]) != MAGIC:
        raise CorruptRingError(f"ring {name!r}: bad magic; not a shmflush ring")
    words = view[:HEADER_SIZE].cast("Q")
    try:
        version = words[H_VERSION // 8]
        if version != LAYOUT_VERSION:
            raise CorruptRingError(
                f"ring {name!r}: layout version {version}, this shmflush understands "
                f"{LAYOUT_VERSION}"
            )
        geometry = Geometry(
            buffer_size=words[H_BUFFER_SIZE // 8],
            buffers=words[H_BUFFERS // 8],
            lanes=words[H_LANES // 8],
            max_writers=words[H_MAX_WRITERS // 8],
        )
    except ValueError as exc:
        raise CorruptRingError(f"ring {name!r}: corrupt header: {exc}") from None
    finally:
        words.release()
    recorded = int.from_bytes(view[H_TOTAL_SIZE : H_TOTAL_SIZE + 8], "little")
    if recorded != geometry.total_size or actual_size < geometry.total_size:
        raise CorruptRingError(
            f"ring {name!r}: header says {recorded} bytes, geometry needs "
            f"{geometry.total_size}, segment has {actual_size}"
        )
    sync = int.from_bytes(view[H_SYNC : H_SYNC + 8], "little")
    if sync not in SYNC_LEVELS.values():
        raise CorruptRingError(f"ring {name!r}: unknown sync level {sync}")
    return geometry


def init_header(
    view: memoryview,
    geometry: Geometry,
    *,
    sync: int,
    flush_interval_ns: int,
    owner: int,
    owner_start: int,
    next_address: int,
    next_seq: int,
    recovery_ns: int = 500_000_000,
    path: bytes = b"",
    fence: int = FENCE_OFF,
    stream_id: bytes = bytes(_format.STREAM_ID_SIZE),
) -> None:
    """Fill a fresh, zeroed segment.  Runs before any other process can see it.

    Every buffer starts IDLE and SEALED (invariant I6: a buffer that is not
    somebody's open fill rejects every claim), and lane i points at buffer i,
    which is IDLE, so the first writer of a lane rotates it onto a fresh fill.
    """
    words = view.cast("Q")
    try:
        words[H_RECOVERY_NS // 8] = recovery_ns
        words[H_FENCE // 8] = fence
        words[H_VERSION // 8] = LAYOUT_VERSION
        words[H_TOTAL_SIZE // 8] = geometry.total_size
        words[H_BUFFER_SIZE // 8] = geometry.buffer_size
        words[H_BUFFERS // 8] = geometry.buffers
        words[H_LANES // 8] = geometry.lanes
        words[H_MAX_WRITERS // 8] = geometry.max_writers
        words[H_SYNC // 8] = sync
        words[H_FLUSH_INTERVAL_NS // 8] = flush_interval_ns
        words[H_OWNER_PID // 8] = owner
        words[H_OWNER_START // 8] = owner_start
        words[H_RING_ID // 8] = int.from_bytes(os.urandom(8), "little")
        words[H_NEXT_ADDRESS // 8] = next_address
        words[H_NEXT_SEQ // 8] = next_seq
        words[H_WRITTEN_BELOW // 8] = next_address
        # Fill numbers start at 1, so fill 0 (the lanes' initial value) is never open.
        words[H_FILL_COUNTER // 8] = 1
        for i in range(geometry.buffers):
            words[(geometry.descriptor(i) + D_STATE) // 8] = IDLE | SEALED
        for i in range(geometry.lanes):
            words[geometry.lane(i) // 8] = lane_word(0, i)
    finally:
        words.release()
    if len(path) > MAX_PATH_BYTES or b"\0" in path:
        raise ValueError(f"path must be at most {MAX_PATH_BYTES} bytes without NUL")
    view[H_PATH : H_PATH + len(path)] = path
    if len(stream_id) != _format.STREAM_ID_SIZE:
        raise ValueError(f"stream_id must be {_format.STREAM_ID_SIZE} bytes")
    view[H_STREAM_ID : H_STREAM_ID + _format.STREAM_ID_SIZE] = stream_id
    # The magic goes last: a process that attaches early sees no magic and fails
    # cleanly instead of reading half-written parameters.
    view[H_MAGIC : H_MAGIC + 8] = MAGIC


def read_stream_id(view: memoryview) -> bytes:
    """The stream id of the ring's file, as stored in the header."""
    return bytes(view[H_STREAM_ID : H_STREAM_ID + _format.STREAM_ID_SIZE])


def read_path(view: memoryview) -> bytes:
    """The ring's file path as stored in the header (empty if none)."""
    raw = bytes(view[H_PATH:HEADER_SIZE])
    return raw.split(b"\0", 1)[0]


def shm_name(name: str) -> str:
    return f"/shmflush.{name}"


def semaphore_names(name: str) -> tuple[str, str]:
    """(flusher wake-up, space available) semaphores of ring *name*."""
    return f"/shmflush.{name}.flush", f"/shmflush.{name}.space"


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if not name or len(name) > 200:
        raise ValueError(f"name must be 1 to 200 characters, got {len(name)}")
    bad = set(name) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
    if bad or name.startswith("."):
        raise ValueError(
            f"name may hold only letters, digits, '_', '-' and '.' (not first), got {name!r}"
        )
    return name


def map_fd(fd: int, size: int) -> mmap.mmap:
    """Map *size* bytes of the shared-memory object *fd* read-write and shared."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def create_segment(name: str, size: int, mode: int, exist_ok: bool) -> mmap.mmap:
    """Create ``/shmflush.<name>`` of *size* zeroed bytes and map it.

    With *exist_ok* an existing object of that name is unlinked first (processes
    still attached to it keep their mapping; they no longer share it with us).
    """
    path = shm_name(name)
    try:
        shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, mode=mode, size=size)
    except posix_ipc.ExistentialError:
        if not exist_ok:
            raise RingExistsError(name) from None
        unlink_segment(name)
        shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, mode=mode, size=size)
    try:
        # posix_ipc applies the umask to mode; shared memory is created 0o600 by
        # default precisely so that the umask cannot widen it, and an explicit
        # mode is honoured exactly.
        os.fchmod(shm.fd, mode)
        return map_fd(shm.fd, size)
    except BaseException:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(path)
        raise
    finally:
        if shm.fd >= 0:
            shm.close_fd()


def open_segment(name: str) -> tuple[mmap.mmap, Geometry]:
    """Map an existing ring and validate its header."""
    try:
        shm = posix_ipc.SharedMemory(shm_name(name))
    except posix_ipc.ExistentialError:
        raise RingNotFoundError(name) from None
    except posix_ipc.PermissionsError as exc:
        raise PermissionError(
            f"no permission to attach to ring {name!r} (shared memory is created with "
            f"mode 0o600 by default: only its owner's user may attach): {exc}"
        ) from None
    try:
        size = os.fstat(shm.fd).st_size
        if size < HEADER_SIZE:
            raise CorruptRingError(f"ring {name!r}: segment of {size} bytes is too small")
        mm = map_fd(shm.fd, size)
    finally:
        shm.close_fd()
    view = memoryview(mm)
    try:
        geometry = read_geometry(view, size, name)
    except BaseException:
        view.release()
        mm.close()
        raise
    view.release()
    return mm, geometry


def unlink_segment_if_same(name: str, ring_id: int) -> bool:
    """Unlink ring *name*, as :func:`unlink_segment`, only while that name still
    refers to the ring whose ``H_RING_ID`` is *ring_id*; True if it did.

    Whoever removes a ring late (its owner's close, a flusher after its owner
    died) must not remove a newer ring of the same name: the old one may have
    been unlinked behind its back (``python -m shmflush cleanup``, by hand, or
    ``create(exist_ok=True)``) and the name created again.  The caller passes the
    id it reads from its own mapping, so a ring whose header was scribbled on
    still matches itself.  If the name holds no segment, nothing is unlinked:
    semaphores left under it may already belong to a ring being created.  The
    check and the unlink are two steps; a ring created by somebody else between
    them is not protected, which needs a removal and a creation in that window.
    """
    try:
        shm = posix_ipc.SharedMemory(shm_name(name))
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return False
    try:
        current = os.pread(shm.fd, 8, H_RING_ID)
    finally:
        shm.close_fd()
    if len(current) != 8 or int.from_bytes(current, "little") != ring_id:
        return False
    return unlink_segment(name)


def unlink_segment(name: str) -> bool:
    """Remove the shared-memory object and semaphores of ring *name*; True if the
    object existed."""
    found = True
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
    except posix_ipc.ExistentialError:
        found = False
    for sem in semaphore_names(name):
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(sem)
    return found
