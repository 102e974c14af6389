"""Process identity on Linux: pid plus start time, so that a recycled pid is not
mistaken for the process that held it before."""

from __future__ import annotations


def start_time(pid: int) -> int:
    """The start time of *pid* in clock ticks since boot (``/proc/PID/stat`` field 22),
    or 0 if no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) is in parentheses and may itself contain spaces
    # or parentheses, so split after the *last* closing parenthesis.
    fields = stat[stat.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); field 22 is therefore fields[19].
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def is_alive(pid: int, started: int) -> bool:
    """True if the process *pid* that started at *started* ticks is still running.

    A zombie counts as dead: it will never touch shared memory again.
    """
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        state, ticks = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return False
    return state not in (b"Z", b"X") and (started in (0, ticks))
