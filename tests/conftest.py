"""Fixtures shared by every test.

Each test must leave nothing behind: no shmflush object in ``/dev/shm``, no
child process still running, and no signal left blocked (later children would
inherit the mask).  The autouse fixture below checks all three after every
test, cleans up what it finds (so one leak does not fail every later test), and
fails the test that leaked, naming what it found.

Other test runs, demos and real rings may share this host's ``/dev/shm``, so the
check touches only objects that are provably this run's: those whose name holds
this process's ``ring_name`` marker, and rings whose header names this process or
one of its children as the owner.  A test that makes rings in processes that may
die before the check (crash tests) should name them with ``ring_name``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Iterator
from multiprocessing import forkserver, resource_tracker
from pathlib import Path

import pytest
from bare import Bare, make_bare

from shmflush import _layout

SHM_DIR = "/dev/shm"
# Children get this long to exit on their own before they count as leaked.
CHILD_GRACE_S = 5.0


def _marker() -> str:
    return f"t{os.getpid()}-"


def _shm_entries() -> set[str]:
    # Rings live at /dev/shm/shmflush.<name> and their semaphores at
    # /dev/shm/sem.shmflush.<name>.{flush,space}; the ring_name marker also
    # catches objects under any other prefix.
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return set()
    return {name for name in names if "shmflush" in name or _marker() in name}


def _ring_of(entry: str) -> str | None:
    """The ring name that /dev/shm entry *entry* belongs to, if it is a ring's."""
    if entry.startswith("shmflush."):
        return entry.removeprefix("shmflush.")
    if entry.startswith("sem.shmflush."):
        ring, _, kind = entry.removeprefix("sem.shmflush.").rpartition(".")
        return ring if kind in ("flush", "space") else None
    return None


def _owner_pid(ring: str) -> int | None:
    """The owner pid in ring *ring*'s header, or None if there is no valid header."""
    try:
        with open(os.path.join(SHM_DIR, f"shmflush.{ring}"), "rb") as f:
            header = f.read(_layout.H_OWNER_PID + 8)
    except OSError:
        return None
    if len(header) < _layout.H_OWNER_PID + 8 or not header.startswith(_layout.MAGIC):
        return None
    return int.from_bytes(header[_layout.H_OWNER_PID :], "little")


def _ours(entry: str, owners: set[int]) -> bool:
    if _marker() in entry:
        return True
    ring = _ring_of(entry)
    return ring is not None and _owner_pid(ring) in owners


def _live_children() -> set[int]:
    """Pids of this process's children that are still running (zombies excluded)."""
    me = os.getpid()
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # it exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses,
        # so split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 2 and int(fields[1]) == me and fields[0] != b"Z":
            children.add(int(entry))
    return children


def _helper_processes() -> set[int]:
    # multiprocessing's own long-lived helpers, started on first use and kept
    # for the whole session: they are not leaks of the test that started them.
    helpers = {
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
    }
    return {pid for pid in helpers if isinstance(pid, int)}


def _reap(pids: set[int], deadline: float) -> None:
    # Collect exit statuses of killed children that no Process or Popen object
    # will wait for, so they do not linger as zombies.
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # already reaped by its owner
                break
            if done:
                break
            time.sleep(0.01)


def _leaked_children(before: set[int]) -> list[str]:
    deadline = time.monotonic() + CHILD_GRACE_S
    while True:
        multiprocessing.active_children()  # joins finished Process objects
        leaked = _live_children() - before - _helper_processes()
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not leaked:
        return []
    found = []
    for pid in sorted(leaked):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmdline = "?"
        found.append(f"pid {pid} ({cmdline})")
    # Kill multiprocessing children through their Process objects, so that
    # multiprocessing's bookkeeping sees them exit; waitpid(2) the rest.
    processes = {p.pid: p for p in multiprocessing.active_children()}
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + CHILD_GRACE_S
    for pid in leaked:
        if pid in processes:
            processes[pid].join(max(deadline - time.monotonic(), 0.0))
    _reap(leaked - processes.keys(), deadline)
    return found


def _leaked_shm(before: set[str], owners: set[int]) -> list[str]:
    # Decide for every entry before unlinking any: a semaphore's owner is read
    # from its ring's segment.
    leaked = sorted(name for name in _shm_entries() - before if _ours(name, owners))
    for name in leaked:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    return leaked


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves a shmflush object in /dev/shm or a child running."""
    shm_before = _shm_entries()
    children_before = _live_children()
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    yield
    # A signal mask left blocked would be inherited by every later child process.
    mask_after = signal.pthread_sigmask(signal.SIG_SETMASK, mask_before)
    owners = {os.getpid()} | children_before | _live_children()
    # Children first: a live flusher may still hold (and later unlink) its ring.
    children = _leaked_children(children_before)
    shm = _leaked_shm(shm_before, owners)
    problems = []
    if children:
        problems.append(
            f"child processes still running {CHILD_GRACE_S:.0f} s after the test "
            f"(killed): {', '.join(children)}"
        )
    if shm:
        problems.append(f"left in {SHM_DIR} (removed): {', '.join(shm)}")
    if mask_after != mask_before:
        problems.append(f"signals left blocked (unblocked): {sorted(mask_after - mask_before)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def ring_name() -> str:
    """A ring name no other test (or test run) uses."""
    return f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def bare(ring_name: str, tmp_path: Path) -> Iterator[Bare]:
    """A bare ring (tests/bare.py) on a file in tmp_path, removed afterwards."""
    b = make_bare(ring_name, tmp_path / "p.log")
    try:
        yield b
    finally:
        b.ring.close()
        os.close(b.fd)
        _layout.unlink_segment(ring_name)
