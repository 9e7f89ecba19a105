"""The ``cpu`` workload: what each node's CPU pays to receive (stage) or send (collect) a
tree, per method, on the embedded cluster (no links: CPU is all there is to measure).

Every host of the embedded cluster is a process of this machine, and each process reaps
its children (CLI -> mpiexec -> ranks; CLI -> Transit agents -> tar), so the CPU a command
cost on every host is ``getrusage(RUSAGE_CHILDREN)`` around it. The same command is run to
1 node and to ``nodes`` nodes; the difference divided by ``nodes - 1`` is what one more
node costs (``cpu_per_node_s``): the home side's share (packing, the launcher, the CLI) is
the same in both and drops out. It is reported per GB of tree and per 1,000 files.

The default tree is this Python's standard library (site-packages left out: about 7,700
files and 250 MB with its ``__pycache__``), the tree issue 18 measured.

As root the hosts' directories are put on a private tmpfs for the workload (``disk``:
"tmpfs" in every run), as on the testbed. On a disk the kernel's cost of creating files
depends on what was deleted just before: on this machine's ext4 (no journal) the inode
allocator skips inodes deleted in the last seconds one buffer lookup at a time
(``recently_deleted`` in ext4's ialloc.c, 46% of all CPU samples under ``perf``), so
each method paid for the tree the bench had wiped before it: the same Transit run cost
1.18 s a node first and 5.85 s after a wipe. Without root the runs say ``disk``: "dir".
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Callable

from . import data
from .records import cpu_meter
from ..errors import ChibaError, InvalidRequest

__all__ = ["CPU_METHODS", "CPU_COLLECT_METHODS", "CPU_OPS", "cpu", "stdlib_tree", "children_cpu", "cpu_rows"]

CPU_METHODS = (("transit", None), ("mpi", "chain"), ("mpi", "bcast"))
CPU_COLLECT_METHODS = (("transit", None), ("mpi", None))
CPU_OPS = ("stage", "collect")


def stdlib_tree(workdir: Path) -> Path:
    """A copy of this Python's standard library without site-packages (made once)."""
    dst = workdir / "cpu-stdlib"
    if not dst.exists():
        src = Path(sysconfig.get_paths()["stdlib"])
        shutil.copytree(src, dst, symlinks=True,
                        ignore=lambda d, names: ["site-packages"] if Path(d) == src else [])
    return dst


def children_cpu() -> float:
    """CPU seconds (user + system) of every reaped descendant of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tree(workdir: Path, tree: str, size: int, files: int) -> Path:
    if tree == "stdlib":
        return stdlib_tree(workdir)
    if tree == "text":
        return data.make_text_tree(workdir / f"cpu-text-{size}-{files}", size, files)
    raise InvalidRequest(f"unknown cpu tree {tree!r}", hint="stdlib or text")


def _count(src: Path) -> int:
    return sum(1 for p in src.rglob("*") if not p.is_dir())


def _one(site, args: list[str]) -> tuple[bool, float, float, float | None, str]:
    """(ok, CPU seconds of everything the command ran, wall s, machine busy share, error)."""
    with cpu_meter() as busy:
        before = children_cpu()
        res, wall, err = site.cli(*args)
        spent = children_cpu() - before
    res = res or {}
    why = "" if res.get("ok") else (err or str(res.get("failures") or "failed"))
    return bool(res.get("ok")), spent, wall, busy.busy, why


def _args(op: str, method: str, alg: str | None, src: Path, names: list[str], dest: str,
          back: Path, launch: str | None = None) -> list[str]:
    from topology import fold

    if op == "stage":
        args = ["stage", str(src), "--nodes", fold(names), "--dest", dest, "--replace"]
    else:
        args = ["collect", dest, "--nodes", fold(names), "--dest", str(back), "--replace"]
    return (args + ["--method", method] + (["--algorithm", alg] if alg else [])
            + (["--launch", launch] if launch else []))


def _service_cpu(site) -> float:
    """CPU seconds the running service's ranks have used so far (all ranks and the
    coordinator, as `service status` reports them: mpitools/service/driver.py)."""
    from mpitools.service import driver

    st = driver.status(site.topo)
    if not st.get("running"):
        raise ChibaError("the service stopped during the cpu workload", where="president")
    return float(st["cpu_seconds"])


def cpu(site, *, nodes: int = 8, repeat: int = 1, workdir: Path, tree: str = "stdlib",
        size: int = 16 << 20, files: int = 400, ops=CPU_OPS, methods=CPU_METHODS,
        collect_methods=CPU_COLLECT_METHODS,
        on_run: Callable[[dict], None] | None = None) -> list[dict]:
    """Per method and op, the command to 1 node and to ``nodes`` nodes; one run each with
    ``cpu_1_s``/``cpu_n_s`` (seconds, every process of the command), ``cpu_per_node_s``,
    ``cpu_per_node_gb_s`` (per 1e9 bytes of tree) and ``cpu_per_kfile_s`` (per 1,000
    files) and ``disk`` ("tmpfs" or "dir", see the module's docstring). ``tree``:
    "stdlib" or "text" (``size`` bytes in ``files`` files). ``methods`` stage and
    ``collect_methods`` collect, as (method, algorithm[, launch]) tuples
    (chiba_admin/bench/workloads.py); a "service" launch runs through the long-running
    service, started for those rows and stopped after them, and its ranks' CPU (which
    this process never reaps) is what `service status` says they used during the
    command. InvalidRequest off the embedded cluster (a testbed host's processes are not
    this process's children) or with fewer than 2 nodes.
    """
    if site.kind != "embedded":
        raise InvalidRequest("the cpu workload runs on the embedded cluster only",
                             hint="bench cpu --where embedded")
    names = site.node_names()
    if not 2 <= nodes <= len(names):
        raise InvalidRequest(f"the cpu workload needs 2 to {len(names)} nodes, not {nodes}")
    src = _tree(workdir, tree, size, files)
    payload, nfiles = data.tree_bytes(src), _count(src)
    with _hosts_on_tmpfs(site) as disk:
        # what collect brings home goes on the same tmpfs: the home creates every file too
        back = Path(site.topo.state_dir) / "hosts" if disk == "tmpfs" else workdir
        chosen = {"stage": methods, "collect": collect_methods}
        runs = _cpu_runs(site, src, names[:nodes], back, repeat,
                         [(op, chosen[op]) for op in ops], on_run,
                         dict(tree=tree, files=nfiles, size_bytes=payload, disk=disk))
    return runs


@contextlib.contextmanager
def _hosts_on_tmpfs(site):
    """Yield "tmpfs" with every host's directory on one new tmpfs (root on Linux only;
    unmounted and its contents gone on the way out, also after an error), else "dir".

    Mounted and unmounted through file descriptors, never by path again: the tmpfs goes on
    the ``hosts`` directory opened (a symlink there is refused) in the state directory as
    it resolved once, and comes off through a descriptor of its own root. Renaming a
    directory above the state directory while the workload runs (a ``--workdir`` in a
    directory another user can write) then neither moves the mount nor turns the unmount
    onto another file system's mount, as ``umount --lazy PATH`` did. Ctrl-C and SIGTERM
    unwind through here (chiba_admin/cli.py); a bench killed outright (SIGKILL, the OOM
    killer) leaves the tmpfs mounted on ``WORKDIR/chiba-bench-*/cluster-*/hosts``, holding
    its files in memory: ``umount -l`` it (``findmnt -t tmpfs -S chiba-bench-cpu`` lists
    them).
    """
    state = getattr(site.topo, "state_dir", None)
    if os.geteuid() != 0 or not state or not sys.platform.startswith("linux"):
        yield "dir"
        return
    from ..embedded import init_cluster

    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    Path(state).mkdir(parents=True, exist_ok=True)
    parent = os.open(state, flags & ~os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir("hosts", 0o755, dir_fd=parent)
        root = _mount_tmpfs(parent, "hosts", flags)
        if root is None:
            yield "dir"
            return
        try:
            init_cluster(site.topo)
            yield "tmpfs"
        finally:
            _libc().umount2(f"/proc/self/fd/{root}".encode(), _MNT_DETACH)
            os.close(root)
    finally:
        os.close(parent)


_MNT_DETACH = 2  # umount2(2)'s lazy unmount (umount --lazy)


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount_tmpfs(parent: int, name: str, flags: int) -> int | None:
    """Mount a tmpfs on directory ``name`` of the directory open as ``parent`` (no symlink
    followed); a descriptor of the new tmpfs's root, or None when the mount failed."""
    try:
        under = os.open(name, flags, dir_fd=parent)
    except OSError:
        return None
    try:
        if _libc().mount(b"chiba-bench-cpu", f"/proc/self/fd/{under}".encode(), b"tmpfs", 0,
                         b"mode=0755"):
            return None
        # the lookup crosses into the mount just made: a mount point cannot be renamed
        return os.open(name, flags, dir_fd=parent)
    finally:
        os.close(under)


def _cpu_runs(site, src: Path, names: list[str], back: Path, repeat: int, plan, on_run,
              extra: dict) -> list[dict]:
    from .workloads import launch_of, service_up

    nodes, payload, nfiles = len(names), extra["size_bytes"], extra["files"]
    runs: list[dict] = []

    def measure(op: str, m: tuple, i: int) -> None:
        run = _measure(site, op, m, src, names, back, i)
        run.update(extra)
        _per_node(run, nodes, payload, nfiles)
        runs.append(run)
        if on_run:
            on_run(run)

    for i in range(repeat):
        for op, methods in plan:
            served = [m for m in methods if launch_of(m) == "service"]
            for m in methods:
                if m not in served:
                    measure(op, m, i)
            # the service only for its rows: an idle service's ranks would share the
            # cores with the other methods' runs
            with service_up(site, bool(served)):
                for m in served:
                    # its ranks import a tool's modules on its first job, once per
                    # service: not part of what each later job costs
                    _measure(site, op, m, src, names, back, i)
                    measure(op, m, i)
    site.wipe(names, "CHIBA_SCRATCH", "bench-cpu")
    return runs


def _measure(site, op: str, m: tuple, src: Path, names: list[str], workdir: Path,
             i: int) -> dict:
    dest = "bench-cpu"
    method, alg = m[0], m[1] if op == "stage" else None
    launch = m[2] if len(m) > 2 else None
    run = {"workload": "cpu", "op": op, "method": method, "algorithm": alg,
           "launch": launch or ("mpiexec" if method == "mpi" else None),
           "nodes": len(names), "repeat": i}
    for tag, hosts in (("1", names[:1]), ("n", names)):
        if op == "stage":
            site.wipe(names, "CHIBA_SCRATCH", dest)
        else:  # collect brings back what a stage put there
            site.cli(*_args("stage", "mpi", "chain", src, names, dest, workdir))
        back = workdir / f"cpu-back-{tag}"
        shutil.rmtree(back, ignore_errors=True)
        served = _service_cpu(site) if launch == "service" else 0.0
        ok, spent, wall, busy, why = _one(site, _args(op, method, alg, src, hosts, dest, back,
                                                        launch))
        if launch == "service":
            run[f"ranks_cpu_{tag}_s"] = _service_cpu(site) - served
            spent += run[f"ranks_cpu_{tag}_s"]
        shutil.rmtree(back, ignore_errors=True)
        run[f"cpu_{tag}_s"] = spent
        if tag == "n":
            run.update(ok=ok, seconds=wall, cpu_busy=busy)
        if not ok:
            run.update(ok=False, failures={"-": why})
            break
    return run


def _per_node(run: dict, nodes: int, payload: int, nfiles: int) -> None:
    per = None
    if run.get("ok") and run.get("cpu_n_s") is not None and run.get("cpu_1_s") is not None:
        per = max(0.0, (run["cpu_n_s"] - run["cpu_1_s"]) / (nodes - 1))
    run["cpu_per_node_s"] = per
    run["cpu_per_node_gb_s"] = per / (payload / 1e9) if per is not None and payload else None
    run["cpu_per_kfile_s"] = per / (nfiles / 1e3) if per is not None and nfiles else None


def cpu_rows(groups: dict[tuple, list[dict]], median) -> list[dict]:
    """One row per (cluster, op, tree, nodes, method, algorithm, launch): median CPU
    seconds per node, per GB and per 1,000 files, and ``x_transit`` (this method's
    per-node CPU over City Transit's in the same case; 1.5 is issue 18's ceiling for
    MPI): the median of the ratios of runs paired by record and repeat (the bench runs
    every method of a repeat within a minute or two), since this machine's speed varies
    by the hour and a ratio of medians over records of different hours would compare
    runs of different hours; the ratio of the medians when no run has a pair."""
    rows, base, pairs = [], {}, {}
    for key, runs in groups.items():
        ok = [r for r in runs if r.get("ok")]
        row = dict(zip(("cluster", "op", "tree", "nodes", "method", "algorithm", "launch"),
                       key))
        row["label"] = {"transit": "City Transit"}.get(row["method"]) or " ".join(
            x for x in ("MPI", row["algorithm"],
                        "(service)" if row.get("launch") == "service" else "") if x)
        row.update(runs=len(runs), failures=len(runs) - len(ok),
                   files=runs[-1].get("files"), size_bytes=runs[-1].get("size_bytes"),
                   median_s=median([r.get("seconds") for r in ok]),
                   cpu_busy=median([r.get("cpu_busy") for r in runs]),
                   **{k: median([r.get(k) for r in ok]) for k in (
                       "cpu_per_node_s", "cpu_per_node_gb_s", "cpu_per_kfile_s")})
        row["_runs"] = ok
        if row["method"] == "transit":
            base[key[:4]] = row["cpu_per_node_s"]
            pairs[key[:4]] = {(r.get("_record"), r.get("repeat")): r.get("cpu_per_node_s")
                              for r in ok}
        rows.append(row)
    for row in rows:
        case = tuple(row[k] for k in ("cluster", "op", "tree", "nodes"))
        b, per, mates = base.get(case), row["cpu_per_node_s"], pairs.get(case, {})
        ratios = [r["cpu_per_node_s"] / t for r in row.pop("_runs")
                  if r.get("cpu_per_node_s") is not None
                  and (t := mates.get((r.get("_record"), r.get("repeat"))))]
        row["x_transit"] = (median(ratios) if ratios
                            else per / b if b and per is not None else None)
    return sorted(rows, key=lambda r: (r["cluster"], r["op"], r["method"] != "transit",
                                       r.get("launch") == "service", r["algorithm"] or ""))
