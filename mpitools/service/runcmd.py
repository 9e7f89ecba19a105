"""``run`` as an MPI rank program: every rank runs the command on its host, rank 0
gathers each host's exit status and output and emits them as the result.

Rank-side module: standard library and mpi4py only. Runs under the service
(mpitools/service/ranks.py) or a fresh mpiexec; processes are managed by
:class:`mpitools.shell.tasks.LocalTasks` (own session, leftovers ended with the command).
"""

from __future__ import annotations

import base64
import signal
import time

from mpitools.common.runtime import emit, rank_hosts, rank_main, user_environ
from mpitools.common.unixsock import Pause
from mpitools.shell.tasks import LocalTasks

__all__ = ["main", "run_here"]

_TAG = 31
_KILL_GRACE = 2.0


def run_here(cmd, env: dict[str, str], cwd: str | None, timeout: float | None) -> dict:
    """Run ``cmd`` (a shell line or an argv) here; ``{"rc", "stdout", "stderr" (base64),
    "error", "seconds"}``. Over ``timeout`` seconds its processes are ended, rc 255."""
    # /bin/sh as the fan-out's local transport runs a command line (same messages)
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
    t0 = time.monotonic()
    tasks = LocalTasks()
    tasks.start(0, argv, {**user_environ(), **env}, cwd)
    out = {1: bytearray(), 2: bytearray()}
    pause, error = Pause(), None
    while not (_outputs_closed(tasks) and tasks.finished()):
        got = tasks.pieces(1 << 20)
        for _, stream, data in got:
            if data is not None:
                out[stream] += data
        if timeout is not None and time.monotonic() - t0 > timeout and error is None:
            error = f"command timed out after {timeout:g}s"
            tasks.signal_all(signal.SIGTERM)
            end = time.monotonic() + _KILL_GRACE
            while tasks.running() and time.monotonic() < end:
                time.sleep(0.01)
            tasks.kill_all()
        pause.after(bool(got), True)
    for _, stream, data in tasks.pieces(1 << 30):
        if data is not None:
            out[stream] += data
    rc = 255 if error else tasks.statuses().get(0, 255)
    error = error or tasks.errors().get(0)
    return {"rc": rc, "error": error, "seconds": time.monotonic() - t0,
            "stdout": base64.b64encode(bytes(out[1])).decode(),
            "stderr": base64.b64encode(bytes(out[2])).decode()}


def _outputs_closed(tasks: LocalTasks) -> bool:
    """The command exited and both its outputs reached end of file. Over the transport a
    command runs until then (ssh waits for its channel: legacy_transit/transport.py), so
    a background child holding stdout open keeps it running, within -u; LocalTasks alone
    would end such a child when the shell exits (tests/test_contract.py, run's -u)."""
    t = tasks.tasks[0]
    return (t.proc is None or t.proc.poll() is not None) and t.open_streams == 0


def main(comm, job: dict) -> int:
    """Job: ``{"cmd", "env": {host: {...}}, "cwd": {host: dir or None}, "timeout"}``."""
    from mpi4py import MPI

    hosts = rank_hosts(job)
    host = hosts[comm.rank]
    if comm.rank == 0:
        emit("start", time=time.time(), ranks=comm.size)
    mine = run_here(job["cmd"], job["env"].get(host, {}), job["cwd"].get(host),
                    job.get("timeout"))
    if comm.rank != 0:
        req = comm.isend(mine, 0, _TAG)
        pause = Pause()
        while not req.Test():
            pause.after(False, True)
        return 0
    got = {host: mine}
    pause = Pause()
    while len(got) < comm.size:
        st = MPI.Status()
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=st):
            got[hosts[st.Get_source()]] = comm.recv(source=st.Get_source(), tag=_TAG)
            continue
        pause.after(False, True)
    emit("result", hosts={h: got[h] for h in hosts})
    return 0


if __name__ == "__main__":
    rank_main(main)
