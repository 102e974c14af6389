"""Layer 0: 8-byte atomics on shared memory, through libatomic.

Python has no atomic read-modify-write on memory it shares with other processes,
so we call the compiler runtime's ``__atomic_*_8`` entry points through ``ctypes``.
Each function takes a raw address (an ``int``) inside a mapping that the caller
keeps alive, and a memory order.  We always pass ``SEQ_CST``: on x86-64 every
locked read-modify-write is a full barrier anyway, and the protocol's proofs are
simplest under sequential consistency.

libatomic falls back to a *per-process* lock table when an operation is not
lock-free for the given size and alignment.  Such a lock means nothing to another
process, so a fallback would silently break mutual exclusion across processes.
:func:`check_lock_free` refuses to run on such a machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

from ._errors import ShmflushError

__all__ = [
    "SEQ_CST",
    "check_lock_free",
    "check_platform",
    "compare_exchange",
    "fetch_add",
    "fetch_and",
    "fetch_or",
    "fetch_sub",
    "load",
    "store",
]

# Memory orders as numbered by GCC's __ATOMIC_* macros.
SEQ_CST = 5

_U64 = ctypes.c_uint64
_PTR = ctypes.c_void_p
_INT = ctypes.c_int


def _load_libatomic() -> ctypes.CDLL:
    names = [ctypes.util.find_library("atomic"), "libatomic.so.1", "libatomic.so"]
    for name in names:
        if not name:
            continue
        try:
            # PyDLL: the call keeps the GIL.  Each function is one locked
            # instruction that never blocks, so releasing and retaking the GIL
            # around it would only add cost (about 8 % of a call, measured).
            return ctypes.PyDLL(name)
        except OSError:
            continue
    raise ShmflushError(
        "libatomic was not found; shmflush needs it for atomic operations on shared "
        "memory. Install the package 'libatomic1' (Debian/Ubuntu: apt-get install "
        "libatomic1) or 'libatomic' (Fedora/RHEL: dnf install libatomic)."
    )


_lib = _load_libatomic()


def _bind(symbol: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    try:
        fn = getattr(_lib, symbol)
    except AttributeError:
        raise ShmflushError(
            f"libatomic at {_lib._name!r} lacks {symbol}; install a current libatomic1"
        ) from None
    # argtypes matter for correctness, not just speed: without them ctypes would
    # pass Python ints as 32-bit C ints and truncate addresses and values.
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


# fetch_add(address, value, order) -> previous value, and so on.  These are the raw
# ctypes functions: the hot path calls them directly to avoid a Python frame.
fetch_add = _bind("__atomic_fetch_add_8", _U64, _PTR, _U64, _INT)
fetch_sub = _bind("__atomic_fetch_sub_8", _U64, _PTR, _U64, _INT)
fetch_or = _bind("__atomic_fetch_or_8", _U64, _PTR, _U64, _INT)
fetch_and = _bind("__atomic_fetch_and_8", _U64, _PTR, _U64, _INT)
load = _bind("__atomic_load_8", _U64, _PTR, _INT)
store = _bind("__atomic_store_8", None, _PTR, _U64, _INT)
_compare_exchange = _bind(
    "__atomic_compare_exchange_8", ctypes.c_bool, _PTR, ctypes.POINTER(_U64), _U64, _INT, _INT
)
_is_lock_free = _bind("__atomic_is_lock_free", ctypes.c_bool, ctypes.c_size_t, _PTR)


def compare_exchange(address: int, expected: int, desired: int) -> tuple[bool, int]:
    """Atomically replace the word at *address* with *desired* if it equals *expected*.

    Returns ``(swapped, observed)``; ``observed`` is the value found, which equals
    *expected* exactly when the swap happened.
    """
    cell = _U64(expected)
    swapped = bool(_compare_exchange(address, ctypes.byref(cell), desired, SEQ_CST, SEQ_CST))
    return swapped, cell.value


def check_platform() -> None:
    """Raise unless this is x86-64.

    Writers publish a record by a plain store of their commit counter after the
    record's bytes; the flusher trusts the bytes once it sees the counter.  That is
    sound under x86-64's total store order, where stores become visible in program
    order and loads are not reordered with older loads.  Weaker memory models
    (arm64, POWER) would need fences this design does not issue.
    """
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise ShmflushError(
            f"shmflush needs an x86-64 CPU (total store order); this machine is {machine!r}"
        )


def check_lock_free(address: int) -> None:
    """Raise unless 8-byte atomics at *address* are lock-free (see module docstring)."""
    if address % 8:
        raise ShmflushError(f"atomic word at {address:#x} is not 8-byte aligned")
    if not _is_lock_free(8, address):
        raise ShmflushError(
            f"8-byte atomics are not lock-free on this machine ({sys.platform}); libatomic "
            "would use a per-process lock, which cannot synchronise processes"
        )
