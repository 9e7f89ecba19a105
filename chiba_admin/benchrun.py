"""The benchmark runner: legacy and MPI methods on one topology in one run, recorded as JSON.

A *site* is where the runs happen: the namespace testbed (root) with shaped links and NIC
counters, or the embedded cluster (directories, no network). Every run is recorded as it
was measured; the report (chiba_admin.report) only aggregates these records.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import benchdata
from .errors import UsageError
from .report import SCHEMA

__all__ = ["Site", "embedded_site", "testbed_site", "open_site", "environment",
           "code_lines", "stage_suite", "sync_suite", "write_record", "CODE_GROUPS"]

_ROOT = Path(__file__).resolve().parent.parent

# Which files implement each tool (the paper compared 5,200 lines of Perl with 84 of C).
CODE_GROUPS = {
    "City Transit (legacy)": ["legacy_transit/transit.py", "legacy_transit/transit_agent.py",
                              "legacy_transit/fanout.py", "legacy_transit/transport.py"],
    "Userstage (MPI)": ["mpitools/stage.py", "mpitools/staging.py", "mpitools/archive.py",
                        "mpitools/spool.py", "mpitools/launcher.py", "mpitools/rankio.py"],
    "rsync baseline (legacy; rsync itself not counted)": ["legacy_transit/rsync.py"],
    "mpisync (MPI; + inventory below)": ["mpitools/sync.py", "mpitools/syncing.py",
                                         "mpitools/syncrank.py", "mpitools/framechain.py"],
    "inventory (scan, diff, plan, apply)": ["inventory/*.py"],
}


def code_lines() -> dict[str, dict]:
    """Non-blank, non-comment lines per tool (docstrings count: they are code here too)."""
    out = {}
    for tool, patterns in CODE_GROUPS.items():
        files = sorted({p for pat in patterns for p in _ROOT.glob(pat)})
        n = 0
        for f in files:
            for line in f.read_text(errors="replace").splitlines():
                s = line.strip()
                if s and not s.startswith("#"):
                    n += 1
        out[tool] = {"lines": n, "files": len(files)}
    return out


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def environment(site: "Site") -> dict:
    """What a reader needs to trust a number: MPI, machine, commit, date, links, hosts."""
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpi = None
    try:
        p = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True,
                           timeout=30)
        mpi = p.stdout.splitlines()[0].strip() if p.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": (_git("rev-parse", "--short", "HEAD") or "unknown")
        + ("+dirty" if dirty else ""),
        "mpi_library": mpi, "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "code_lines": code_lines(),
        "cluster": site.describe(),
    }


@dataclass
class Site:
    """A cluster to benchmark on: how to run chiba-admin there, its link rates and counters.

    Every run is the real command an operator types, run where the operator would run it
    (on the testbed: inside the president's namespaces), timed as a user waits for it.
    """

    kind: str
    topo: object
    cluster_args: list[str]
    node_bps: float | None
    mayor_bps: float | None
    measure: Callable[[], contextlib.AbstractContextManager]
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv
    close: Callable[[], None] = lambda: None
    towns: int = 0
    nodes_per_town: int = 0
    disk: str | None = None   # where hosts keep their data (testbed: tmpfs or dir)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.topo.name, "towns": self.towns,
                "nodes_per_town": self.nodes_per_town, "node_bps": self.node_bps,
                "mayor_bps": self.mayor_bps, "hosts": self.topo.summary()["hosts"],
                "disk": self.disk}

    def cli(self, *args: str, timeout: float = 1800) -> tuple[dict | None, float, str]:
        """Run ``chiba-admin --json ARGS`` on the site; (parsed JSON or None, wall s, stderr)."""
        exe = str(Path(sys.executable).with_name("chiba-admin"))
        argv = self.wrap([exe, "--json", *self.cluster_args, *args])
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        try:
            out = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            out = None
        return out, wall, p.stderr.strip()

    def wipe(self, hosts: list[str], var: str, rel: str) -> None:
        """Remove ``$var/rel`` (var: CHIBA_SCRATCH or CHIBA_REPO) on ``hosts`` with `run`,
        so the same line serves directories, the testbed and real hosts."""
        from topology import fold

        script = f'rm -rf -- "${var}"/{shlex.quote(rel)}'
        out, _, err = self.cli("run", "-w", fold(hosts), "--", "sh", "-c", script)
        if out is None and err:
            raise UsageError(f"cannot clean ${var}/{rel} on {fold(hosts)}: {err}")


class _NoCounters:
    infrastructure = None


@contextlib.contextmanager
def _no_measure() -> Iterator[_NoCounters]:
    yield _NoCounters()


def embedded_site(towns: int, per_town: int, workdir: Path) -> Site:
    """An embedded cluster of ``towns`` x ``per_town`` nodes in ``workdir`` (no links)."""
    from topology import loads_topology
    from topology.generate import generated_topology_toml

    from .embedded import bind, init_cluster

    text = generated_topology_toml(towns, per_town, 100e6, 1e9, name="bench-embedded")
    tfile = workdir / f"embedded-{towns}x{per_town}.toml"
    tfile.write_text(text)
    state = workdir / f"cluster-{towns}x{per_town}"
    topo = bind(loads_topology(text, source=str(tfile)), state)
    init_cluster(topo)
    return Site("embedded", topo, ["--cluster", str(tfile), "--state", str(state)], None,
                None, _no_measure, towns=towns, nodes_per_town=per_town,
                close=lambda: shutil.rmtree(state, ignore_errors=True))


def testbed_site(towns: int, per_town: int, workdir: Path, node_mbit: float,
                 mayor_mbit: float) -> Site:
    """A namespace testbed brought up for the benchmark and taken down by ``close``."""
    import testbed
    from topology import load_topology

    state = workdir / f"testbed-{towns}x{per_town}"
    topo0 = testbed.generated_topology(towns, per_town, node_mbit * 1e6, mayor_mbit * 1e6)
    testbed.up(topo0, state, node_bps=node_mbit * 1e6, mayor_bps=mayor_mbit * 1e6)
    try:
        tb = testbed.Testbed(state)
        topo = load_topology(tb.topology_file)
        pres = tb.president
    except BaseException:
        testbed.down(state)
        raise
    return Site("testbed", topo, ["--cluster", str(tb.topology_file)], node_mbit * 1e6,
                mayor_mbit * 1e6, lambda: testbed.measure(state),
                wrap=lambda argv: tb.exec_argv(pres, argv),
                close=lambda: testbed.down(state), towns=towns, nodes_per_town=per_town,
                disk=testbed.status(state).get("disk"))


def open_site(where: str, towns: int, per_town: int, workdir: Path, *,
              node_mbit: float = 20, mayor_mbit: float = 200) -> Site:
    if where == "auto":
        where = "testbed" if os.geteuid() == 0 and _testbed_possible() else "embedded"
    if where == "testbed":
        if os.geteuid() != 0:
            raise UsageError("the testbed needs root", hint="run as root or use --where embedded")
        return testbed_site(towns, per_town, workdir, node_mbit, mayor_mbit)
    return embedded_site(towns, per_town, workdir)


def _testbed_possible() -> bool:
    return all(shutil.which(t) for t in ("ip", "tc")) and os.path.exists("/usr/sbin/sshd")


# -- staging --------------------------------------------------------------------------------
STAGE_METHODS = (("transit", None), ("mpi", "bcast"), ("mpi", "chain"))


def _stage_once(site: Site, method: str, alg: str | None, src: Path, nodes: list[str],
                dest: str) -> dict:
    from topology import fold

    args = ["stage", str(src), "--nodes", fold(nodes), "--dest", dest, "--method", method]
    if alg:
        args += ["--algorithm", alg]
    with site.measure() as m:
        res, wall, err = site.cli(*args)
    res = res or {}
    return {"ok": bool(res.get("ok")), "seconds": wall, "phases": res.get("phases", {}),
            "failures": res.get("failures") or ({"-": err} if err and not res else {}),
            "archive_bytes": res.get("bytes"), "nic": m.infrastructure}


def stage_suite(site: Site, *, node_counts: list[int], sizes: list[int], datas: list[str],
                repeat: int, workdir: Path, methods=STAGE_METHODS,
                on_run: Callable[[dict], None] | None = None) -> list[dict]:
    """Every (nodes, data, size, method) ``repeat`` times, methods interleaved per repeat so
    a noisy moment hits all of them alike."""
    runs = []
    all_nodes = [h.name for h in site.topo.nodes]
    for data in datas:
        for size in sizes:
            src = workdir / f"stage-{data}-{size}"
            if not src.exists():
                (benchdata.make_random if data == "random" else benchdata.make_text_tree)(
                    src, size)
            payload = benchdata.tree_bytes(src)
            for n in node_counts:
                if n > len(all_nodes):
                    raise UsageError(f"{n} nodes asked, the site has {len(all_nodes)}")
                nodes = all_nodes[:n]
                dest = f"bench-{data}"
                for i in range(repeat):
                    for method, alg in methods:
                        site.wipe(nodes, "CHIBA_SCRATCH", dest)
                        r = _stage_once(site, method, alg, src, nodes, dest)
                        run = {"workload": "stage", "data": data, "size_bytes": payload,
                               "nodes": n, "method": method, "algorithm": alg,
                               "repeat": i, **r}
                        runs.append(run)
                        if on_run:
                            on_run(run)
                site.wipe(nodes, "CHIBA_SCRATCH", dest)
    return runs


# -- synchronisation ------------------------------------------------------------------------
SYNC_METHODS = ("rsync", "mpi")


def _sync_once(site: Site, method: str, src: Path, targets: list[str], dest: str) -> dict:
    from topology import fold

    args = ["sync-mayors", str(src), "--targets", fold(targets), "--dest", dest,
            "--method", method, "--delete"]
    if method == "rsync":
        args += ["-f", str(max(1, len(targets)))]
    with site.measure() as m:
        res, wall, err = site.cli(*args)
    res = res or {}
    return {"ok": bool(res.get("ok")), "seconds": wall, "phases": res.get("phases", {}),
            "failures": res.get("failures") or ({"-": err} if err and not res else {}),
            "nic": m.infrastructure}


def sync_suite(site: Site, *, target_counts: list[int], repeat: int, workdir: Path,
               files: int, size: int, target_role: str = "mayor",
               methods=SYNC_METHODS, on_run: Callable[[dict], None] | None = None) -> list[dict]:
    """Full sync, a 5% change, then no change, for each target count and method."""
    runs = []
    src = workdir / "sync-repo"
    if not src.exists():
        benchdata.make_repository(src, files=files, size=size)
    pool = [h.name for h in site.topo.hosts(target_role)]
    if target_role == "mayor":
        pool += [h.name for h in site.topo.nodes]  # beyond the mayors, nodes serve as targets
    dest = "bench-repo"
    seed = 1
    for n in target_counts:
        if n > len(pool):
            raise UsageError(f"{n} targets asked, the site has {len(pool)} hosts to use")
        targets = pool[:n]
        for method in methods:
            for scenario in ("full", "changed", "nochange"):
                for i in range(repeat):
                    if scenario == "full":
                        site.wipe(targets, "CHIBA_REPO", dest)
                        changed = benchdata.tree_bytes(src)
                    elif scenario == "changed":
                        seed += 1
                        changed = benchdata.mutate_repository(src, 0.05, seed)
                    else:
                        changed = 0
                    r = _sync_once(site, method, src, targets, dest)
                    run = {"workload": "sync", "scenario": scenario, "targets": n,
                           "method": method, "repeat": i, "changed_bytes": changed, **r}
                    runs.append(run)
                    if on_run:
                        on_run(run)
        site.wipe(targets, "CHIBA_REPO", dest)
    return runs


def write_record(site: Site, suite: str, runs: list[dict], outdir: Path,
                 env: dict | None = None) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = outdir / f"{suite}-{site.kind}-{stamp}.json"
    rec = {"schema": SCHEMA, "suite": suite, "cluster": site.describe(),
           "env": env or environment(site), "runs": runs}
    path.write_text(json.dumps(rec, indent=1, default=str))
    return path


def workdir_for(base: str | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="chiba-bench-", dir=base))
