"""The ``cluster`` fixture: one interface over the embedded cluster, SSH on loopback and the
namespace testbed (pytest plugin, registered in tests/conftest.py).

A contract test asks for ``cluster`` and runs on every backend available here:
``embedded`` always, ``ssh`` when a loopback sshd starts (else skipped with the reason),
``testbed`` only when root and the test is selected with the ``testbed`` marker (the
session testbed of ``support.testbed``, started once and always taken down). Every
backend runs the real ``chiba-admin`` in a new process, as an operator would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import pytest

from support.cluster import CliRun, new_cluster, run_cli
from support.procs import service_processes

__all__ = ["Cluster", "BACKENDS", "cluster", "served", "serving", "on_testbed"]

# MPI over SSH needs a host name per daemon: on loopback every "host" is this machine,
# mpiexec cannot resolve ccn01, and with an ssh config mapping the names to 127.0.0.1 the
# runtime's daemons never wire up (they all report one host name), so the launch hangs.
MPI_ON_LOOPBACK = ("MPI methods need one machine per host name; on SSH loopback every host "
                   "is this machine (they run on the embedded cluster and the testbed)")

BACKENDS = ["embedded", "ssh", pytest.param("testbed", marks=pytest.mark.testbed)]


@dataclass
class Cluster:
    """A cluster a test can drive through the CLI and inspect from this machine.

    ``cli(*args, timeout=s)`` runs ``chiba-admin ARGS`` against it (on the testbed: on the
    president, in its namespaces) and returns a ``CliRun``; ``path(host, which, rel)`` is
    where ``host``'s ``which`` directory (scratch, spool, repository), or ``rel`` under
    it, lies on this machine's disk; ``roots()`` maps a label to every directory a run
    may write into (for snapshots: "nothing written anywhere"). ``no_mpi`` is why MPI
    methods cannot run on this backend, or None.
    """

    backend: str
    topo: object
    cli: Callable[..., CliRun]
    path: Callable[..., str]
    roots: Callable[[], dict[str, str]]
    no_mpi: str | None = None
    read: Callable[[str], str] = lambda p: open(p).read()  # a president's file, as text

    def one_node_per_town(self, skip: int = 0) -> list[str]:
        """The ``skip``-th node of each town: data crosses every mayor."""
        return [self.topo.town_nodes(t)[skip] for t in sorted(self.topo.towns)]

    @property
    def mayors(self) -> list[str]:
        return sorted(self.topo.towns.values())


def _subprocess_cli(argv0: list[str], env: dict | None):
    def cli(*args, timeout: float = 180) -> CliRun:
        argv = [os.fsdecode(a) for a in args]
        p = subprocess.run([*argv0, *argv], env=env, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return CliRun(argv, p.returncode, p.stdout.decode(errors="replace"),
                      p.stderr.decode(errors="replace"))
    return cli


def _embedded(tmp_path) -> Cluster:
    topo = new_cluster(tmp_path / "state")

    def path(host, which, rel=None):
        h = topo.host(host)
        return h.local_path(h.resolve(which, rel))

    return Cluster("embedded", topo, lambda *a, timeout=180: run_cli(topo, *a, timeout=timeout),
                   path, lambda: {h.name: h.root for h in topo.hosts()})


def _ssh(tmp_path, request) -> Cluster:
    from support.ssh import HOSTS, write_topology
    from topology import load_topology

    sshd = request.getfixturevalue("sshd")
    base = tmp_path / "hosts"
    file = write_topology(base, sshd)
    topo = load_topology(file)
    cli = _subprocess_cli([sys.executable, "-c", "from chiba_admin.cli import run; run()",
                           "--cluster", file], None)
    # every host is this machine: a host's path is the path here
    return Cluster("ssh", topo, cli, lambda h, w, rel=None: topo.host(h).resolve(w, rel),
                   lambda: {h: str(base / h) for h in HOSTS}, no_mpi=MPI_ON_LOOPBACK)


def on_testbed(request) -> Cluster:
    """The session testbed as a ``Cluster`` (skips when no testbed can run here)."""
    return _testbed(request)


def _testbed(request) -> Cluster:
    from support.testbed import CHIBA, data_dir, require_testbed
    from topology import load_topology

    require_testbed()
    tb = request.getfixturevalue("testbed_cluster")
    topo = load_topology(str(tb.topology_file))
    cli = _subprocess_cli(tb.exec_argv(tb.president, [CHIBA, "--cluster", str(tb.topology_file)]),
                          {**os.environ})

    def path(host, which, rel=None):
        d = data_dir(tb, host, which)
        return str(d / rel) if rel else str(d)

    def roots():
        return {f"{h}:{w}": path(h, w) for h in tb.hosts
                for w in ("scratch", "repository") if _has(tb, h, w)}

    def read(p):
        return tb.exec(tb.president, ["cat", p]).stdout

    return Cluster("testbed", topo, cli, path, roots, read=read)


def _has(tb, host, which) -> bool:
    from support.testbed import data_dir

    try:
        data_dir(tb, host, which)
        return True
    except KeyError:
        return False


@pytest.fixture(params=BACKENDS)
def cluster(request, tmp_path):
    """A ``Cluster`` per backend (see the module's docstring); on the shared testbed,
    whatever the test made in the hosts' directories is removed afterwards."""
    if request.param == "embedded":
        yield _embedded(tmp_path)
        return
    if request.param == "ssh":
        yield _ssh(tmp_path, request)
        return
    c = _testbed(request)
    before = {label: set(os.listdir(d)) for label, d in c.roots().items()}
    try:
        yield c
    finally:
        for label, d in c.roots().items():
            for name in set(os.listdir(d)) - before.get(label, set()):
                p = os.path.join(d, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.remove(p)


@contextmanager
def serving(c: Cluster):
    """The MPI service (``chiba-admin service start``) running on ``c`` for the block;
    always stopped afterwards, and then no process of it may be left (``ps``)."""
    r = c.cli("--json", "service", "start", timeout=300)
    if r.code != 0:
        pytest.fail(f"the service did not start on {c.backend}:\n{r}", pytrace=False)
    state = json.loads(c.read(os.path.join(r.json()["dir"], "state.json")))
    seen = service_processes(state["argv"][-1])
    try:
        # the check after stop means something only if ps sees the service while it runs
        assert len(seen) > len(state["hosts"]), f"ps sees of the service only: {seen}"
        yield c
    finally:
        stop = c.cli("service", "stop")
        left = service_processes(state["argv"][-1])
        assert stop.code == 0 and not left, f"{stop}\nleft running:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A fresh embedded cluster with the MPI service running, shared by a module (its
    start costs about a second); stopped at the module's end, nothing of it left."""
    with serving(_embedded(tmp_path_factory.mktemp("served"))) as c:
        yield c
