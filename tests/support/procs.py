"""Waiting on processes by event (pidfds), not by sleeping and looking again."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

__all__ = ["still_running", "service_processes"]


def still_running(pids: list[int], cap: float = 20.0) -> list[int]:
    """Which of ``pids`` have not ended within ``cap`` s (pidfds become readable when a
    process ends: events, no polling; all waited on at once, well inside their sleep 60)."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass  # already gone
    try:
        waiting = set(fds)
        end = time.monotonic() + cap
        while waiting and time.monotonic() < end:
            ready, _, _ = select.select(list(waiting), [], [], end - time.monotonic())
            waiting -= set(ready)
        return sorted(fds[fd] for fd in waiting)
    finally:
        for fd in fds:
            os.close(fd)


def service_processes(job_arg: str) -> list[str]:
    """``ps`` lines of live processes (zombies aside) whose command line holds ``job_arg``,
    the job argument of a service's mpiexec and ranks (its state.json's last ``argv``):
    seen from this machine, so in every namespace of the testbed too."""
    # -ww: the whole command line (without it ps may cut it at 80 columns, as under pytest)
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True,
                        text=True, check=True).stdout
    return [ln for ln in ps.splitlines() if job_arg in ln and not ln.split()[1].startswith("Z")]


def default_sigint() -> None:
    """``preexec_fn`` for a child a test sends SIGINT (a terminal's Ctrl-C): a shell that
    starts a job in the background without job control (``cmd &`` in a script, nohup)
    leaves SIGINT ignored, and a Python child keeps it ignored, so the test would hang."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
