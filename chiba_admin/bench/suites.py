"""Named sets of benchmark runs (``default``, ``quick``) and the runner that executes a plan:
one site per shape, brought up once, one record per site.

A plan is a list of ``Step``; ``SUITES[name](where)`` gives a named suite's plan for the
testbed or the embedded cluster. ``bench stage|sync|...`` builds its plan from its options
(``plan_from_options``), so named and ad-hoc runs go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import cpuprofile, records, workloads
from .sites import NODE_MBIT, MAYOR_MBIT, open_site, sync_shape

__all__ = ["Step", "SUITES", "plan_from_options", "run_plan",
           "describe_plan"]

M = 1 << 20
G = 1 << 30


@dataclass
class Step:
    """One workload on one site shape with the workload function's keyword arguments.

    ``shape`` is (towns, nodes per town), None for ``inventory`` (no cluster);
    ``where`` forces a site kind (the memory case runs on the embedded cluster: it measures
    processes, and the testbed's hosts are the same processes).
    """

    workload: str
    shape: tuple[int, int] | None
    params: dict = field(default_factory=dict)
    where: str | None = None

    def site_key(self, where: str) -> tuple[str, tuple[int, int] | None]:
        return ("local" if self.shape is None else self.where or where), self.shape


def _stage(shape, **kw) -> Step:
    return Step("stage", shape, {"nodes": shape[0] * shape[1], **kw})


def _collect(shape, **kw) -> Step:
    return Step("collect", shape, {"nodes": shape[0] * shape[1], **kw})


def _sync(targets: list[int], shape=None, **kw) -> Step:
    return Step("sync", shape or sync_shape(max(targets)), {"target_counts": targets, **kw})


def _run(shape, nodes: int, repeat: int, methods=workloads.RUN_METHODS) -> Step:
    return Step("run", shape, {"nodes": nodes, "repeat": repeat, "methods": methods})


def _service(shape, host_counts: list[int], repeat: int, idle_seconds: float) -> Step:
    return Step("service", shape, {"host_counts": host_counts, "repeat": repeat,
                                   "idle_seconds": idle_seconds, "steady": True})


def _memory(size: int) -> Step:
    return Step("memory", (2, 2), {"size": size, "nodes": 4, "chunk": "4MiB"},
                where="embedded")


def _ours(methods) -> tuple:
    """The stage methods of this project among ``methods`` (in their order): not the
    peers, which need the testbed."""
    return tuple(m for m in methods if m[0] in ("transit", "mpi"))


def _cpu(**kw) -> Step:
    return Step("cpu", (2, 4), {"nodes": 8, **kw}, where="embedded")


def _inventory(files: int, hash_bytes: int, repeat: int) -> Step:
    return Step("inventory", None, {"files": files, "hash_bytes": hash_bytes,
                                    "repeat": repeat})


_TRANSIT_CHAIN = (("transit", None), ("mpi", "chain"))
_BCAST = (("mpi", "bcast"),)
_PEERS = workloads.PEER_METHODS


def default_suite(where: str) -> list[Step]:
    """The README's comparison, issue 18's grid (testbed, as root, on the paper's network:
    nodes and each mayor's town link at the node rate). Staging at 4, 8, 16 and 32 nodes:
    16 MiB with every method and peer, 64 MiB with City Transit and the chain, 256 MiB with
    the chain at 8 and 32 nodes (the line-rate target); synchronisation at 2, 4, 8, 16, 32
    and 64 targets. About 50 minutes on 2 cores: a star method (Transit, pdcp, clush,
    sbcast) pushes a town's copies through one 20 Mb/s town link, so 64 MiB to a town of 8
    takes 215 s and 256 MiB 860 s; those cases are left to ``chiba-admin predict``."""
    if where == "testbed":
        steps: list[Step] = []
        for shape in ((2, 2), (2, 4), (4, 4), (4, 8)):
            eight = shape == (2, 4)
            steps += [
                _stage(shape, sizes=[16 * M], datas=["random"], repeat=1,
                       methods=workloads.OUR_STAGE_METHODS + _PEERS),
                # 8 nodes: median of 2 for the README's headline case
                _stage(shape, sizes=[64 * M], datas=["random"], repeat=2 if eight else 1,
                       methods=_TRANSIT_CHAIN),
            ]
            if shape in ((2, 4), (4, 8)):
                steps.append(_stage(shape, sizes=[256 * M], datas=["random"], repeat=1,
                                    methods=(("mpi", "chain"),)))
            if eight:
                steps.append(_collect(shape, sizes=[16 * M], datas=["random"], repeat=1))
        # 2,000 files / 60 MiB to 2..64 targets (8 mayors, then nodes: 65 ranks at 64)
        steps += [_sync([2, 4, 8, 16, 32, 64], repeat=1, files=2000, size=60 * M),
                  _memory(256 * M),
                  _inventory(20_000, 256 * M, 3)]
        return steps
    return [
        _stage((2, 4), sizes=[16 * M], datas=["random", "tree"], repeat=3),
        _collect((2, 4), sizes=[16 * M], datas=["random"], repeat=3),
        _sync([2], repeat=3, files=1000, size=30 * M),
        _memory(1 * G),
        _inventory(100_000, 1 * G, 5),
    ]


def quick_suite(where: str) -> list[Step]:
    """One size, 8 nodes, fewer repeats. Testbed: about 7 minutes on 2 cores (staging
    2 x 2 x ~35 s, collect 2 x ~30 s, sync 8 mayors ~75 s, two bring-ups, the rest)."""
    if where == "testbed":
        return [
            _stage((2, 4), sizes=[64 * M], datas=["random"], repeat=2,
                   methods=_TRANSIT_CHAIN),
            _collect((2, 4), sizes=[64 * M], datas=["random"], repeat=1),
            _sync([8], repeat=1, files=3000, size=150 * M),
            _memory(256 * M),
            _inventory(20_000, 256 * M, 3),
        ]
    return [
        _stage((2, 4), sizes=[16 * M], datas=["random"], repeat=2),
        _collect((2, 4), sizes=[16 * M], datas=["random"], repeat=1),
        _sync([8], repeat=1, files=1000, size=30 * M),
        _memory(256 * M),
        _inventory(20_000, 256 * M, 3),
    ]


_CHAIN_BOTH = (("mpi", "chain"), ("mpi", "chain", "service"))
_SYNC_ALL = ("rsync", "mpi", "mpi-service")
_SVC_FULL = ("mpi-service",)


def service_suite(where: str) -> list[Step]:
    """Issue 19's targets: the service against fresh mpiexec and the legacy tools, in one
    run. Testbed (as root; 8 x 7 = 64 targets: 8 mayors + 56 nodes, 65 ranks): 64 MiB to
    8 nodes (2 x 4), chain fresh and through the service, 2 runs each; `run true` on 32
    nodes (ssh, mpiexec, service), 5 runs; the service's start at 8, 32 and 64 hosts
    (3 runs) and its idle CPU over the first 60 s and the next 60 s; sync-mayors (rsync, mpi fresh, mpi service) at 8
    mayors (3,000 files / 150 MB, 3 runs) and 64 targets (300 files / 15 MB, 1 run: a
    fresh MPI job of 65 ranks takes ~40 s); the full sync runs through the service only
    (it fills the targets for the others). About 20 minutes on 2 cores."""
    if where == "testbed":
        big = (8, 7)
        return [
            _stage((2, 4), sizes=[64 * M], datas=["random"], repeat=2, methods=_CHAIN_BOTH),
            _run(big, 32, 5),
            _service(big, [8, 32, 64], 3, 60),
            _sync([8], shape=big, repeat=3, files=3000, size=150 * M, methods=_SYNC_ALL,
                  full_methods=_SVC_FULL),
            _sync([64], shape=big, repeat=1, files=300, size=15 * M, methods=_SYNC_ALL,
                  full_methods=_SVC_FULL),
        ]
    return [
        _stage((2, 2), sizes=[1 * M], datas=["random"], repeat=1, methods=_CHAIN_BOTH),
        _run((2, 2), 4, 1),
        _service((2, 2), [2, 6], 1, 2),
        _sync([2, 6], shape=(2, 2), repeat=1, files=50, size=1 * M, methods=_SYNC_ALL,
              full_methods=_SVC_FULL),
    ]


def _shell(shape, nodes: int, repeat: int, **kw) -> Step:
    return Step("shell", shape, {"nodes": nodes, "repeat": repeat, **kw})


def shell_suite(where: str) -> list[Step]:
    """Issue 17's benchmarks (chiba_admin/bench/shellbench.py): 20 `hostname` commands in
    one shell job against 20 `run`, 20 mpiexec and (testbed) 20 srun; MPICH's MPI_Init
    under the shell's PMI against hydra; stage-in, program, stage-out in one job against
    three commands. Testbed: 8 nodes (2 x 4) and 32 (4 x 8), 3 repeats (its duration on
    2 cores is not measured yet: 20 fresh mpiexec over ssh to 32 nodes dominate it)."""
    if where == "testbed":
        return [_shell((2, 4), 8, 3), _shell((4, 8), 32, 3)]
    return [_shell((1, 2), 2, 1, commands=5, init_runs=1)]


SUITES: dict[str, Callable[[str], list[Step]]] = {"default": default_suite,
                                                  "quick": quick_suite,
                                                  "service": service_suite,
                                                  "shell": shell_suite}


def plan_from_options(what: str, *, shapes: list[tuple[int, int]], sizes: list[int],
                      datas: list[str], repeat: int, stage_methods, collect_methods,
                      sync_methods, run_methods=workloads.RUN_METHODS[:2], targets: list[int], repo_files: int, repo_size: int,
                      memory_size: int, inventory_files: int, hash_size: int) -> list[Step]:
    """The plan of ``bench WHAT`` (``all``: stage then sync, as it always was)."""
    plan: list[Step] = []
    if what in ("stage", "all"):
        plan += [_stage(s, sizes=sizes, datas=datas, repeat=repeat, methods=stage_methods)
                 for s in shapes]
    if what == "collect":
        plan += [_collect(s, sizes=sizes, datas=datas, repeat=repeat,
                          methods=collect_methods) for s in shapes]
    if what in ("sync", "all"):
        plan.append(_sync(targets, repeat=repeat, files=repo_files, size=repo_size,
                          methods=sync_methods))
    if what == "run":
        plan += [_run(s, s[0] * s[1], repeat, run_methods) for s in shapes]
    if what == "memory":
        plan.append(_memory(memory_size))
    if what == "inventory":
        plan.append(_inventory(inventory_files, hash_size, repeat))
    if what == "cpu":
        # the cpu workload runs our own methods on the embedded cluster (no peers there)
        plan.append(_cpu(repeat=repeat, methods=_ours(stage_methods),
                         collect_methods=tuple(collect_methods)))
    return plan


def describe_plan(plan: list[Step], where: str) -> list[dict]:
    """The plan as data (``--dry-run``, tests): site, shape, workload, parameters."""
    out = []
    for s in plan:
        kind, shape = s.site_key(where)
        params = {k: ([list(m) if isinstance(m, tuple) else m for m in v]
                      if isinstance(v, (list, tuple)) else v) for k, v in s.params.items()}
        out.append({"workload": s.workload, "site": kind,
                    "shape": f"{shape[0]}x{shape[1]}" if shape else None, **params})
    return out


def _groups(plan: list[Step], where: str) -> list[tuple[tuple, list[Step]]]:
    """Steps grouped by site (kind, shape) in order of first appearance: one bring-up each."""
    groups: dict[tuple, list[Step]] = {}
    for s in plan:
        groups.setdefault(s.site_key(where), []).append(s)
    return list(groups.items())


def _run_step(step: Step, site, workdir: Path, on_run) -> list[dict]:
    fn = cpuprofile.cpu if step.workload == "cpu" else getattr(workloads, step.workload)
    if site is None:
        return fn(workdir=workdir, on_run=on_run, **step.params)
    return fn(site, workdir=workdir, on_run=on_run, **step.params)


def run_plan(plan: list[Step], *, suite: str | None, where: str, workdir: Path, outdir: Path,
             node_mbit: float = NODE_MBIT, mayor_mbit: float = MAYOR_MBIT,
             uplink_mbit: float | None = None, on_run: Callable[[dict], None] | None = None,
             on_site: Callable[[str, tuple | None], None] | None = None) -> list[Path]:
    """Run ``plan`` with ``where`` resolved (testbed|embedded); one record per site, written
    as soon as that site's steps are done (or fail: what was measured is kept, marked
    ``"partial": true``). Records are named after ``suite``, or (None) after the workloads
    they hold ("stage", "sync", ...). Returns the record files."""
    written = []
    for (kind, shape), steps in _groups(plan, where):
        if on_site:
            on_site(kind, shape)
        runs: list[dict] = []

        def keep(run: dict) -> None:
            runs.append(run)
            if on_run:
                on_run(run)

        cluster = {"kind": "local", "name": "this machine"}
        name = suite or "+".join(dict.fromkeys(s.workload for s in steps))
        done = False
        try:
            if shape is None:
                for s in steps:
                    _run_step(s, None, workdir, keep)
            else:
                site = open_site(kind, *shape, workdir, node_mbit=node_mbit,
                                 mayor_mbit=mayor_mbit, uplink_mbit=uplink_mbit)
                try:
                    cluster = site.describe()
                    for s in steps:
                        _run_step(s, site, workdir, keep)
                finally:
                    site.close()
            done = True
        finally:
            if runs:
                rec = records.make_record(name, cluster, runs, records.environment(cluster))
                if not done:
                    rec["partial"] = True
                written.append(records.write_record(rec, outdir))
    return written
