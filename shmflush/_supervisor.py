"""Layer 4: the flusher process's life — start, readiness, watchdog, restart, stop.

This is the only module that starts ``python -m shmflush flusher``.  It sits
above the protocol (``_ring``) and the flusher (``_flusher``), whose process it
runs, and below the API (``_api``), the cleanup command (``_cleanup``) and the
soak, which call it.  (CPython's ``multiprocessing.resource_tracker`` is the
model: one ``ensure_running`` that asks "is it alive?" and is the only place
that spawns the helper.)

Who starts a flusher:

* the owner's :func:`shmflush.create`, once, on the locked file it opened
  (``--fd``; :meth:`Supervisor.start`);
* any process that finds the flusher dead (the owner's watchdog, a writer
  waiting for space, ``sync()``, the owner's ``close()``), as a restart that
  opens the file named in the ring's header (``--restart``;
  :meth:`Supervisor.restart`), at most one per :data:`RESTART_GRACE_NS` across
  all processes;
* ``python -m shmflush cleanup``, to drain a ring whose owner and flusher are
  both dead (:func:`drain`).

The file's ``flock`` lets only one flusher run; any extra one exits at once.
Every flusher this process starts is waited for (reaped) by this process: by
the handle that started it while it lives, and by :func:`reap` afterwards, so
none is left a zombie or dropped while it runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

from . import _atomic, _proc
from . import _layout as L
from ._errors import RingTimeoutError, ShmflushError
from ._ring import Ring as Core

#: Seconds a new flusher gets to report itself running.
START_TIMEOUT: Final = 30.0
#: A restart stamp younger than this means a restart is under way (in any process).
RESTART_GRACE_NS: Final = 3_000_000_000
#: Seconds a flusher that finished draining gets to exit before it is killed.
EXIT_GRACE: Final = 5.0
#: How often the owner's watchdog looks at the flusher.
WATCH_INTERVAL: Final = 0.25

Process = subprocess.Popen[bytes]

# Flushers this process started whose handle has closed (restarts for rings it
# does not own run on): polled, and so reaped, on every later spawn and by
# reap().  Kept referenced, so no Popen is dropped while its process runs.
_orphans: list[Process] = []


# -- liveness ------------------------------------------------------------------------


def flusher_pid(core: Core) -> int:
    """The pid of ring *core*'s flusher if it is running, else 0.

    The pid comes from the ring's header and counts only with the start time
    stored next to it, so a dead flusher's recycled pid is not taken for it; a
    zombie counts as dead.
    """
    pid = core.header(L.H_FLUSHER_PID)
    return pid if _proc.is_alive(pid, core.header(L.H_FLUSHER_START)) else 0


def flusher_alive(core: Core) -> bool:
    """Is ring *core*'s flusher running (see :func:`flusher_pid`)?"""
    return flusher_pid(core) != 0


# -- spawning ------------------------------------------------------------------------


def _spawn(name: str, fd: int | None, *, faults: bool = True, stderr: int | None = None) -> Process:
    """Start ``python -m shmflush flusher NAME``: on the inherited, locked *fd*, or
    (``None``) as a restart that opens the file named in the ring's header.
    *faults*: pass ``SHMFLUSH_CRASH_AT`` on (see ``_faults``); *stderr*: as for
    :class:`subprocess.Popen`."""
    reap()
    env = dict(os.environ)
    # The flusher imports this very package, even when it is not installed.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if not faults:
        env.pop("SHMFLUSH_CRASH_AT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "shmflush", "flusher", name]
        + (["--restart"] if fd is None else ["--fd", str(fd)]),
        pass_fds=() if fd is None else (fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if stderr is not None else None,
        stderr=stderr,
        env=env,
        # Its own session: a terminal's Ctrl-C or hang-up must not kill the flusher
        # while the owner is still draining through it.
        start_new_session=True,
    )


def reap() -> None:
    """Collect the exit status of every flusher this process started that has
    exited since its handle closed (waitpid(2) with WNOHANG, through Popen)."""
    _orphans[:] = [p for p in _orphans if p.poll() is None]


def _kill(proc: Process) -> None:
    """SIGKILL *proc* (if it still runs) and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def drain(name: str, timeout: float) -> tuple[int, str]:
    """Run a flusher on ring *name*, whose owner and flusher are dead, to its end.

    It sees the owner dead, drains every committed fill to the ring's file and
    unlinks the ring.  Returns its exit status and its standard error.  Fault
    injection is off for it.  Raises :class:`subprocess.TimeoutExpired` (the
    flusher killed and reaped) if it runs longer than *timeout* seconds, and
    :class:`OSError` if it cannot be started.
    """
    proc = _spawn(name, None, faults=False, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException:
        _kill(proc)
        if proc.stderr is not None:
            proc.stderr.close()
        raise
    return proc.returncode, err.decode(errors="replace")


def _file_is_gone(core: Core) -> bool:
    """Does the path in the ring's header name nothing any more (stat(2): ENOENT,
    ENOTDIR)?  Any other error (EACCES) is left for the flusher to report."""
    path = L.read_path(core.view)
    if not path:
        return False
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _break_for_lost_file(core: Core) -> None:
    """The ring's file is gone and no flusher runs: none ever can again (a restart
    opens the file by its path).  Break the ring with that cause, and mark the
    flusher done, so that nobody waits for one (the loss is reported by the
    owner's close()).  The cause goes first: a writer that sees BROKEN reads it
    next.  A ring already broken keeps the cause it was broken for."""
    if not core.status() & L.STATUS_BROKEN:
        core.set_header(L.H_ERROR_KIND, L.ERROR_FILE_DELETED)
        core.set_header(L.H_STALL_ERRNO, 0)
    core.set_status(L.STATUS_BROKEN | L.STATUS_FLUSHER_DONE)


class Supervisor:
    """The flusher processes one ring handle of this process started, and (in
    the owner) the watchdog that restarts the flusher when it dies.

    Holds no reference to the ring's mapping: every method takes the core it
    acts on, so the handle's close can unmap independently.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # The owner's flusher: the first, then each restart this handle made.
        self.flusher: Process | None = None
        # Every flusher this handle started and has not reaped: each is waited
        # for, and the file lock leaves only one of them running.
        self.spawned: list[Process] = []
        self._watchdog: threading.Thread | None = None
        self._stopping = False

    def forked(self) -> None:
        """In a forked child: the parent's processes and watchdog are not ours."""
        self.flusher = None
        self.spawned = []
        self._watchdog = None

    def hook(self, core: Core) -> None:
        """Let the protocol layer restart the flusher (a writer waiting for space
        finds it dead) through this supervisor, until the handle closes."""
        # Weak references: the mapping must not be kept alive by a cycle (core ->
        # callback -> core), or an unreferenced handle would hold its mapping and
        # fd until the cyclic collector runs.
        me = weakref.ref(self)
        ring = weakref.ref(core)

        def restart() -> None:
            supervisor, target = me(), ring()
            if supervisor is not None and target is not None and not target.handle_closed:
                supervisor.restart(target)

        core.restart_flusher = restart

    # -- the owner's first start -----------------------------------------------------

    def start(self, core: Core, fd: int, path: str) -> bool:
        """Start the ring's first flusher on *fd* (open, locked, inherited) and wait
        until it runs.  Returns whether it writes with O_DIRECT.

        Raises :class:`ShmflushError` if it exits or gives up before it runs (with
        its errno, where it stored one) and :class:`RingTimeoutError` if it does
        not come up within :data:`START_TIMEOUT`; the process is then killed and
        reaped.
        """
        proc = _spawn(self.name, fd)
        self.flusher = proc
        self.spawned.append(proc)
        core.set_header(L.H_FLUSHER_PID, proc.pid)
        try:
            return self._wait_ready(core, proc, path)
        except BaseException:
            self.kill()
            raise

    @staticmethod
    def _wait_ready(core: Core, proc: Process, path: str) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while core.header(L.H_DIRECT_IO) == L.DIRECT_UNKNOWN:
            if core.status() & L.STATUS_FLUSHER_DONE or proc.poll() is not None:
                errno = core.header(L.H_ERROR_ERRNO)
                detail = f": [Errno {errno}] {os.strerror(errno)}" if errno else ""
                raise ShmflushError(f"the flusher for {path} failed to start{detail}")
            if time.monotonic() > deadline:
                raise RingTimeoutError(f"the flusher did not start within {START_TIMEOUT} s")
            time.sleep(0.002)
        return core.header(L.H_DIRECT_IO) == L.DIRECT_ON

    # -- restarts, by any process ------------------------------------------------------

    def restart(self, core: Core) -> bool:
        """Start a new flusher on the ring's file (see ``_flusher``'s ``--restart``),
        unless the flusher finished or another restart is under way, and wait
        (at most :data:`START_TIMEOUT`) until one runs.

        Several processes may call this at once: one of them spawns, and the file
        lock would let only one flusher run anyway.  Returns False if no flusher
        can ever run again (it finished, or the file is gone: the ring is then
        broken with that cause), else True.
        """
        if core.status() & L.STATUS_FLUSHER_DONE:
            return False
        # One restart at a time across all processes: whoever moves the restart
        # stamp spawns; the new flusher clears the stamp once it runs.  A stamp
        # older than the grace is a restarter that died first.  (The file lock
        # would stop a second flusher anyway, but not the cost of starting one
        # Python process per waiting writer.)
        now = time.monotonic_ns()
        stamp = core.header(L.H_RESTART_AT)
        if stamp and now - stamp < RESTART_GRACE_NS:
            return True
        swapped, _ = _atomic.compare_exchange(core.base + L.H_RESTART_AT, stamp, now)
        if not swapped:
            return True
        if _file_is_gone(core) and not flusher_alive(core):
            # A restarted flusher opens the file by its path: it would die on
            # ENOENT, and be restarted, every few seconds for ever.
            _break_for_lost_file(core)
            return False
        self.spawned = [p for p in self.spawned if p.poll() is None]
        proc = _spawn(self.name, None)
        self.spawned.append(proc)
        self.flusher = proc  # only the owner watches it
        deadline = time.monotonic() + START_TIMEOUT
        while not flusher_alive(core) and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        return True

    # -- the owner's watchdog ------------------------------------------------------------

    def watch(self, core_of: Callable[[], Core | None]) -> None:
        """Start the owner's watchdog thread: it restarts the flusher whenever it
        dies, until :meth:`stop` (or *core_of*() returns None: the handle closed)."""
        self._stopping = False
        self._watchdog = threading.Thread(
            target=self._watch, args=(core_of,), name=f"shmflush-watch-{self.name}", daemon=True
        )
        self._watchdog.start()

    def _watch(self, core_of: Callable[[], Core | None]) -> None:
        while not self._stopping:
            flusher = self.flusher
            core = core_of()
            if flusher is None or core is None:
                return
            try:
                flusher.wait(WATCH_INTERVAL)  # our own child: reaped as soon as it exits
                continue_waiting = False
            except subprocess.TimeoutExpired:
                continue_waiting = True
            if self._stopping or core.mm is None or core.status() & L.STATUS_FLUSHER_DONE:
                return
            if continue_waiting or flusher_alive(core):
                if not continue_waiting:
                    time.sleep(WATCH_INTERVAL)  # another process's flusher runs the ring
                continue
            gave_up = False
            with contextlib.suppress(Exception):  # a failed spawn is retried next round
                gave_up = not self.restart(core)
            if gave_up:
                return
            time.sleep(0.05)

    def stop_watching(self, *, wait: bool = True) -> None:
        """Stop the watchdog: it restarts nothing from now on.  With *wait*, also
        wait (at most :data:`EXIT_GRACE`) for its thread to end."""
        self._stopping = True
        watchdog = self._watchdog
        if wait and watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(EXIT_GRACE)
            self._watchdog = None

    # -- stopping ------------------------------------------------------------------------

    def stop(self, *, drained: bool) -> None:
        """After the owner's drain: stop the watchdog, then reap every flusher this
        handle started.  One that *drained* gets :data:`EXIT_GRACE` seconds to
        exit before it is killed; after a drain that did not finish (close()'s
        timeout ran out) it is killed at once, so close() returns at its timeout
        and no flusher runs on unsupervised."""
        self.stop_watching()
        for proc in {id(p): p for p in [self.flusher, *self.spawned] if p}.values():
            if drained:
                try:
                    proc.wait(EXIT_GRACE)
                    continue
                except subprocess.TimeoutExpired:
                    pass
            _kill(proc)
        self.flusher = None
        self.spawned = []
        reap()  # and those of this process's closed attached handles

    def kill(self) -> None:
        """Kill and reap every flusher this handle started (a create() that failed)."""
        self.stop_watching()
        for proc in {id(p): p for p in [self.flusher, *self.spawned] if p}.values():
            _kill(proc)
        self.flusher = None
        self.spawned = []

    def release(self) -> None:
        """A handle that does not own the ring closes: flushers it restarted run on
        (they serve every process), reaped later by :func:`reap`."""
        self.stop_watching()
        reap()
        _orphans.extend(p for p in self.spawned if p.poll() is None)
        self.flusher = None
        self.spawned = []
