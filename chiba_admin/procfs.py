"""Linux ``/proc/PID/stat``, read in one place (standard library only, like errors.py)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProcStat", "parse_stat", "proc_stat"]


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the tools use (proc(5) numbers them from 1).

    ``state`` (3) one letter, ``Z`` for a zombie; ``ppid`` (4), ``pgrp`` (5), ``session``
    (6); ``start_ticks`` (22) the start time in clock ticks after boot, which with the PID
    tells a process from a later one that reused its PID.
    """

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int


def parse_stat(text: str) -> ProcStat:
    """The fields of one ``/proc/PID/stat`` line; ValueError when it is not one.

    The command name (2) sits in parentheses and may itself hold spaces and ``)``: the
    fields that follow it start after the *last* ``)``.
    """
    head, sep, tail = text.rpartition(")")
    pid, paren, comm = head.partition(" (")
    fields = tail.split()
    if not sep or not paren or len(fields) < 20:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    return ProcStat(int(pid), comm, fields[0], int(fields[1]), int(fields[2]), int(fields[3]),
                    int(fields[19]))


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat`` of a process, or None when it is gone (or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (OSError, ValueError):
        return None
