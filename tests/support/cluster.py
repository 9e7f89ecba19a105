"""A fresh embedded demo cluster per caller and the CLI run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REPO", "DEMO", "CliRun", "new_cluster", "run_cli", "host_roots", "host_path"]

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
