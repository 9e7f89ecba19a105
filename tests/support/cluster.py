"""A fresh embedded demo cluster per caller and the CLI run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REPO", "DEMO", "CliRun", "new_cluster", "run_cli", "host_roots", "host_path",
           "cli_process", "fault_gate", "wait_ready", "job_processes", "end_job"]

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "clusters" / "demo.toml")


@dataclass
class CliRun:
    """Exit status and both streams of one ``chiba-admin`` command."""

    args: list[str]
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)

    def __str__(self) -> str:
        return (f"chiba-admin {' '.join(self.args)}\nexit {self.code}\n"
                f"--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}")


def new_cluster(state):
    """Initialise the demo topology's embedded hosts under ``state``; returns the Topology."""
    from chiba_admin.embedded import bind, init_cluster
    from topology import load_topology

    topo = bind(load_topology(DEMO), Path(state))
    init_cluster(topo)
    return topo


def run_cli(topo, *args, timeout: float = 120) -> CliRun:
    """Run ``chiba-admin ARGS`` in a new process against ``topo``'s state directory.

    A subprocess, so that tests can share one cluster across a module and a rank or a
    crash cannot take pytest with it. Raises ``subprocess.TimeoutExpired`` after
    ``timeout`` seconds.
    """
    argv = [os.fsdecode(a) for a in args]
    env = {**os.environ, "CHIBA_STATE": topo.state_dir, "CHIBA_CLUSTER": DEMO}
    p = subprocess.run([sys.executable, "-c", "from chiba_admin.cli import run; run()", *argv],
                       env=env, capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return CliRun(argv, p.returncode, p.stdout.decode(errors="replace"),
                  p.stderr.decode(errors="replace"))


def host_roots(topo) -> dict[str, str]:
    """Host name -> its root directory on this machine (embedded cluster)."""
    return {h.name: h.root for h in topo.hosts()}


def host_path(topo, host: str, which: str, rel: str | None = None) -> str:
    """``host``'s ``which`` directory (scratch, spool, repository), or ``rel`` under it, here."""
    h = topo.host(host)
    return h.local_path(h.resolve(which, rel))


def cli_process(topo, *args, env: dict[str, str]) -> subprocess.Popen:
    """``chiba-admin ARGS`` started against ``topo``'s state directory, with ``env`` added;
    stdout and stderr piped. End it with :func:`end_job`."""
    return subprocess.Popen(
        [sys.executable, "-c", "from chiba_admin.cli import run; run()", *args],
        env={**os.environ, "CHIBA_STATE": topo.state_dir, "CHIBA_CLUSTER": DEMO, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def fault_gate(tmp_path, point: str) -> tuple[Path, dict]:
    """A ``barrier`` fault for rank 0 at ``point`` (mpitools/common/faults.py): the
    directory of its two FIFOs, and the rule (for CHIBA_FAULTS)."""
    gate = Path(tmp_path) / "gate"
    gate.mkdir()
    for f in ("ready", "go"):
        os.mkfifo(gate / f)
    return gate, {"point": point, "rank": 0, "do": "barrier", "dir": str(gate)}


def wait_ready(fifo, p: subprocess.Popen, seconds: float = 60) -> None:
    """Read a fault barrier's "ready" (mpitools/common/faults.py) without hanging if the
    command ends or never gets there."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        end = time.time() + seconds
        while True:
            assert p.poll() is None, p.communicate()
            assert time.time() < end, "the rank never reached the fault point"
            if select.select([fd], [], [], 0.2)[0] and os.read(fd, 64) == b"ready\n":
                return
            time.sleep(0.05)  # no writer yet: the FIFO reads as at its end
    finally:
        os.close(fd)


def job_processes(topo) -> list[int]:
    """Live processes (this one aside) whose command line holds ``topo``'s state
    directory: a command's mpiexec (prterun) and ranks, which carry the job's paths."""
    mark, out = topo.state_dir.encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read()
            except OSError:
                continue
            if mark in argv:
                out.append(int(d))
    return out


def end_job(p: subprocess.Popen, topo) -> None:
    """A test's cleanup after :func:`cli_process`, however the test ended: SIGKILL the
    command if it still runs, then whatever of its job is left (mpiexec runs in a session
    of its own and outlives a killed command; a rank held at a fault point would hold the
    whole job, and its shared memory, for good)."""
    from support.procs import still_running

    if p.poll() is None:
        p.kill()
        p.communicate()
    left = job_processes(topo)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert still_running(left, cap=20) == []
