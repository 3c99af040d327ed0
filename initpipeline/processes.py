"""Which process is which: a process id with its start time names one process, never a
later one that reuses the id (Linux's /proc; elsewhere the id alone)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command's name (which may hold spaces and
    parentheses): state, ppid, ...; None where there is no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None where /proc is not."""
    fields = _stat(pid)
    try:
        # starttime: the 22nd field of the line, the 20th after the name.
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` (started at ``start``, when given) still runs."""
    if pid <= 0:
        return False  # os.kill(0, ...) would reach the whole process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Alive, another user's.
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # Dead, not yet reaped (its parent died first: a killed pool process).
    return start is None or process_start(pid) in (None, start)


def instance(pid: int | None = None) -> str:
    """``<pid>-<start>``: one process, for names of files that must not outlive it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{process_start(pid) or 0}"
