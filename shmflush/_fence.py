"""Layer 0: the asymmetric fence, membarrier(2).

Writers append into a chunk of a fill with plain stores and announce "inside an
append at offset X" with one more plain store, then load the fill's state word
(see _ring).  x86-64 may let that load pass the store (store buffer), so a
flusher that reads the announcement could see a stale one while the writer
still goes on to write.  A full fence in every append would cost a ctypes call;
instead the flusher, which wants to take a chunk back, seals the fill and then
calls ``membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)``: the kernel makes every
running thread of every process that registered for it execute a full memory
barrier before the call returns, and a thread that is not running passed one
when it was switched out.  After that the flusher can trust what it reads
(folly's ``asymmetric_thread_fence_heavy``, userspace RCU's sys_membarrier
flavour).

So the chunk path needs two things from every writer process: registration
(``MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED``, Linux 4.16 and later) and, in
the flusher, the barrier itself.  Where either is refused (an older kernel,
seccomp, ``SHMFLUSH_FENCE=off``) the ring falls back to one fetch-and-add per
record, which needs no fence.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Final

# linux/membarrier.h
CMD_QUERY: Final = 0
CMD_GLOBAL_EXPEDITED: Final = 1 << 1
CMD_REGISTER_GLOBAL_EXPEDITED: Final = 1 << 2

# asm/unistd_64.h; the only architecture _atomic.check_platform accepts.
_SYS_MEMBARRIER: Final = {"x86_64": 324}.get(platform.machine(), -1)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_uint, ctypes.c_int)

# pid -> whether this process is registered (a forked child registers again:
# the registration belongs to the address space, and fork makes a new one).
_registered: dict[int, bool] = {}


def disabled() -> bool:
    """Is the fence switched off by the environment (``SHMFLUSH_FENCE=off``)?"""
    return os.environ.get("SHMFLUSH_FENCE", "").strip().lower() in ("off", "0", "no", "false")


def _membarrier(cmd: int) -> int:
    if _SYS_MEMBARRIER < 0:
        ctypes.set_errno(38)  # ENOSYS
        return -1
    return int(_syscall(_SYS_MEMBARRIER, cmd, 0, 0))


def register() -> bool:
    """Register this process for the flusher's barriers; True if it can take
    part in the chunk path.  Idempotent, cached per process."""
    pid = os.getpid()
    ok = _registered.get(pid)
    if ok is None:
        ok = False
        if not disabled():
            supported = _membarrier(CMD_QUERY)
            ok = (
                supported >= 0
                and supported & CMD_GLOBAL_EXPEDITED != 0
                and _membarrier(CMD_REGISTER_GLOBAL_EXPEDITED) == 0
            )
        _registered.clear()
        _registered[pid] = ok
    return ok


def barrier() -> None:
    """Make every running thread of every registered process execute a full
    memory barrier (about 5 µs).  Raises OSError where the kernel refuses."""
    if _membarrier(CMD_GLOBAL_EXPEDITED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED): {os.strerror(err)}")
