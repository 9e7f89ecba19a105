"""What a benchmark runs: stage, collect, sync, run, service, memory (through the CLI on a
site) and inventory (the library, in this process). Each returns run dicts in the record
schema.

MPI rows carry ``launch``: "mpiexec" (a fresh MPI job per command, forced with
``--launch mpiexec``) or "service" (the long-running service, ``--launch service``). A
workload with service methods starts the service once before its rows (a ``service`` run
records the start) and stops it afterwards, also on error.

Methods are interleaved within each repeat, so a noisy moment hits them alike. Every run
carries ``cpu_busy`` (chiba_admin.bench.records) and, on the testbed, the bytes through the
president's and mayors' NICs (``nic``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from . import data
from .records import cpu_meter
from .sites import Site
from ..errors import ChibaError, InvalidRequest

__all__ = ["STAGE_METHODS", "OUR_STAGE_METHODS", "PEER_METHODS", "PEER_SKIP_REASON",
           "COLLECT_METHODS", "SYNC_METHODS", "MEMORY_ALGORITHMS", "SERVICE_STAGE_METHODS",
           "SERVICE_COLLECT_METHODS", "SERVICE_SYNC_METHODS", "RUN_METHODS",
           "INVENTORY_TARGETS", "stage", "collect", "sync", "run", "service", "memory",
           "inventory", "shell", "make_payload", "launch_of", "sync_method"]

OnRun = Callable[[dict], None] | None

OUR_STAGE_METHODS = (("transit", None), ("mpi", "bcast"), ("mpi", "chain"))
# The tools users would pick instead (legacy_transit.peers); testbed only: they need a
# real sshd per host, and sbcast a Slurm (started on first use)
PEER_METHODS = (("pdcp", None), ("clush", None), ("sbcast", None), ("sbcast-tree", None))
STAGE_METHODS = OUR_STAGE_METHODS + PEER_METHODS
PEER_SKIP_REASON = ("pdcp, clush and sbcast run only on the testbed (they need an sshd and "
                    "a slurmd per host)")
COLLECT_METHODS = (("transit", None), ("mpi", None))
SYNC_METHODS = ("rsync", "mpi")
# The same MPI methods through the running service (selected by name, never by default:
# they start a service); a third element is the launch
SERVICE_STAGE_METHODS = (("mpi", "chain", "service"), ("mpi", "bcast", "service"))
SERVICE_COLLECT_METHODS = (("mpi", None, "service"),)
SERVICE_SYNC_METHODS = ("mpi-service",)
# `run` of a trivial command: the ssh fan-out, a fresh mpiexec, the service
RUN_METHODS = ("ssh", "mpiexec", "service")


def launch_of(method) -> str | None:
    """The launch of a stage/collect method tuple or a sync/run method name: "service",
    "mpiexec" (any other MPI method) or None (not MPI)."""
    if isinstance(method, tuple):
        return method[2] if len(method) > 2 else ("mpiexec" if method[0] == "mpi" else None)
    if method in ("mpi-service", "service"):
        return "service"
    return "mpiexec" if method in ("mpi", "mpiexec") else None


def sync_method(name: str) -> str:
    """The sync-mayors ``--method`` of a sync method name ("mpi-service" -> "mpi")."""
    return "mpi" if name == "mpi-service" else name


def _launch_args(launch: str | None) -> list[str]:
    return ["--launch", launch] if launch else []
MEMORY_ALGORITHMS = ("chain", "bcast")


def make_payload(workdir: Path, kind: str, size: int) -> tuple[Path, int]:
    """The staging source ``workdir/stage-KIND-SIZE`` (made once): (path, payload bytes).

    kind: ``random`` (one incompressible file) or ``tree`` (compressible text files).
    """
    src = workdir / f"stage-{kind}-{size}"
    if not src.exists():
        (data.make_random if kind == "random" else data.make_text_tree)(src, size)
    return src, data.tree_bytes(src)


def _measured(site: Site, args: list[str]) -> tuple[dict, dict]:
    """Run one command on the site; (its JSON or {}, the measured part of a run)."""
    with site.measure() as m, cpu_meter() as cpu:
        res, wall, err = site.cli(*args)
    res = res or {}
    return res, {"ok": bool(res.get("ok")), "seconds": wall,
                 "phases": res.get("phases", {}),
                 "failures": res.get("failures") or ({"-": err} if err and not res else {}),
                 **_nic_fields(m), "cpu_busy": cpu.busy}


def _nic_fields(m) -> dict:
    """``nic``: the infrastructure's bytes (None off the testbed); ``nic_bytes``: what each
    host's NICs carried, {host: {ifname: [tx, rx]}}."""
    nic = m.infrastructure
    if nic is None:
        return {"nic": None}
    # collect's bytes arrive at the president: its receive counter too
    nic = {**nic, "president_rx": sum(v.get("rx_bytes", 0) for v in m.delta.values()
                                      if v.get("role") == "president")}
    per = {h: {i: [n["tx_bytes"], n["rx_bytes"]] for i, n in v.get("nics", {}).items()}
           for h, v in m.delta.items()}
    return {"nic": nic, "nic_bytes": per}


def _emit(runs: list[dict], run: dict, on_run: OnRun) -> None:
    runs.append(run)
    if on_run:
        on_run(run)


def _nodes(site: Site, n: int) -> list[str]:
    names = site.node_names()
    if n > len(names):
        raise InvalidRequest(f"{n} nodes asked, the site has {len(names)}")
    return names[:n]


def stage(site: Site, *, methods=STAGE_METHODS, on_run: OnRun = None, **kw) -> list[dict]:
    """`chiba-admin stage` of each (data, size) to the first ``nodes`` nodes, every method
    ``repeat`` times; a fresh destination for every run. Keywords: nodes, sizes (bytes),
    datas (random|tree), repeat, workdir, chunk. A service method starts the service
    first (its start is a ``service`` run) and stops it after."""
    return _serviced(_stage, site, methods, on_run, **kw)


def _stage(site: Site, *, nodes: int, sizes: list[int], datas: list[str], repeat: int,
           workdir: Path, methods, chunk: str | None = None,
           on_run: OnRun = None) -> list[dict]:
    from topology import fold

    runs: list[dict] = []
    names = _nodes(site, nodes)
    for kind in datas:
        for size in sizes:
            src, payload = make_payload(workdir, kind, size)
            dest = f"bench-{kind}"
            for i in range(repeat):
                for m in methods:
                    method, alg, launch = m[0], m[1], launch_of(m)
                    if method in PEER_NAMES:
                        run = _peer_stage(site, method, src, names, dest, i)
                        if run is not None:
                            _emit(runs, {"workload": "stage", "data": kind,
                                         "size_bytes": payload, "nodes": nodes,
                                         "method": method, "algorithm": None, "repeat": i,
                                         **run}, on_run)
                        continue
                    site.wipe(names, "CHIBA_SCRATCH", dest)
                    args = ["stage", str(src), "--nodes", fold(names), "--dest", dest,
                            "--method", method]
                    args += ["--algorithm", alg] if alg else []
                    args += ["--chunk", chunk] if chunk else []
                    res, meas = _measured(site, args + _launch_args(launch))
                    _emit(runs, {"workload": "stage", "data": kind, "size_bytes": payload,
                                 "nodes": nodes, "method": method, "algorithm": alg,
                                 "launch": res.get("launch") or launch, "repeat": i,
                                 **meas, "archive_bytes": res.get("bytes")}, on_run)
            site.wipe(names, "CHIBA_SCRATCH", dest)
    return runs


PEER_NAMES = tuple(m for m, _ in PEER_METHODS)


def portable_argv(argv: list[str]) -> list[str]:
    """``argv`` as a record keeps it: the bench's temporary directory as ``$WORKDIR`` and
    the venv's programs by name, so records shipped in the repository name no path of
    the machine that measured them."""
    bindir = str(Path(sys.executable).parent) + "/"
    tmp = re.escape(tempfile.gettempdir()) + r"/chiba-bench-[^/\s]+"
    return [re.sub(tmp, "$WORKDIR", a.replace(bindir, "")) for a in argv]


def _peer_stage(site: Site, peer: str, src: Path, names: list[str], dest: str,
                repeat: int) -> dict | None:
    """One run of ``peer`` copying ``src``'s contents into ``$CHIBA_SCRATCH/dest`` on
    ``names``, timed on the president as a user waits for it, then checked byte for byte
    on every node (sha256, not timed). Off the testbed, or for a source the peer cannot
    copy, the first repeat is a run with ``skipped`` (the reason) and the others nothing."""
    from legacy_transit import peers

    why = PEER_SKIP_REASON if site.kind != "testbed" else peers.unsupported(peer, src)
    if why:
        return None if repeat else {"ok": False, "skipped": why, "seconds": 0.0,
                                    "failures": {}, "nic": None, "cpu_busy": None}
    from testbed import slurm
    from testbed.configs import Layout
    from topology import fold

    scratch = {site.topo.host(n).paths.scratch for n in names}
    if len(scratch) != 1:
        return None if repeat else {"ok": False, "seconds": 0.0, "failures": {}, "nic": None,
                                    "cpu_busy": None,
                                    "skipped": "the nodes' scratch paths differ; a peer "
                                               "copies to one path"}
    target = f"{scratch.pop().rstrip('/')}/{dest}"
    state = site.testbed_state
    if peer.startswith("sbcast") and not slurm.is_up(state):
        try:
            slurm.up(state)
        except ChibaError as e:  # a failed run of this peer, not the end of the bench
            return {"ok": False, "seconds": 0.0, "failures": {e.where or "-": str(e)},
                    "nic": None, "cpu_busy": None}
    site.wipe(names, "CHIBA_SCRATCH", dest)
    # every peer needs the directory (pdcp and sbcast refuse a missing one); not timed
    out, _, err = site.cli("run", "-w", fold(names), "--", "mkdir", "-p", "--", target)
    if not (out or {}).get("ok"):
        raise ChibaError(f"cannot create {target}: {(out or {}).get('failures') or err}",
                         where=fold(names))
    argv = peers.peer_argv(peer, src, names, target, ssh_config=Layout(state).ssh_config,
                           slurm_conf=slurm.conf_path(state),
                           clush=str(Path(sys.executable).with_name("clush")))
    with site.measure() as m, cpu_meter() as cpu:
        pr = peers.run_peer(argv, wrap=site.wrap)
    failures = {} if pr.ok else {"-": pr.output or f"exit {pr.rc}"}
    failures.update(_verify(site, names, target, peers.digest_tree(src)))
    return {"ok": not failures, "seconds": pr.seconds, "phases": {}, "failures": failures,
            **_nic_fields(m), "cpu_busy": cpu.busy, "argv": portable_argv(argv),
            "verified": len(names) - len([h for h in failures if h != "-"])}


def _verify(site: Site, names: list[str], target: str, expected: dict) -> dict[str, str]:
    """{host: what differs} for every node whose ``target`` is not ``expected``."""
    from legacy_transit import peers
    from topology import fold

    out, _, err = site.cli("run", "-w", fold(names), "--", "sh", "-c",
                           peers.verify_script(target))
    hosts = (out or {}).get("hosts") or {}
    bad = {}
    for n in names:
        h = hosts.get(n)
        if h is None:
            bad[n] = f"not checked: {err or 'no answer'}"
            continue
        problem = peers.compare_digests(expected, peers.parse_sha256sum(h.get("stdout", "")))
        if problem or not h.get("ok"):
            bad[n] = problem or (h.get("error") or h.get("stderr") or "check failed")
    return bad


def collect(site: Site, *, methods=COLLECT_METHODS, on_run: OnRun = None,
            **kw) -> list[dict]:
    """`chiba-admin collect` of a staged payload back from the first ``nodes`` nodes into a
    fresh directory on the president, every method ``repeat`` times. ``size_bytes`` is
    what each node sends; all of it crosses the president's link. Keywords: nodes, sizes,
    datas, repeat, workdir; service methods as in ``stage``."""
    return _serviced(_collect, site, methods, on_run, **kw)


def _collect(site: Site, *, nodes: int, sizes: list[int], datas: list[str], repeat: int,
             workdir: Path, methods, on_run: OnRun = None) -> list[dict]:
    from topology import fold

    runs: list[dict] = []
    names = _nodes(site, nodes)
    for kind, size in ((k, s) for k in datas for s in sizes):
        src, payload = make_payload(workdir, kind, size)
        rel = f"bench-collect-{kind}"
        site.wipe(names, "CHIBA_SCRATCH", rel)
        res, _ = _measured(site, ["stage", str(src), "--nodes", fold(names), "--dest", rel])
        if not res.get("ok"):
            raise ChibaError(f"cannot stage the collect payload: "
                             f"{res.get('failures') or res.get('error')}", where=fold(names))
        for i in range(repeat):
            for meth in methods:
                method, alg, launch = meth[0], meth[1], launch_of(meth)
                back = tempfile.mkdtemp(prefix="collect-", dir=workdir)
                shutil.rmtree(back)  # collect makes it; an existing one could be refused
                res, m = _measured(site, ["collect", rel, "--nodes", fold(names), "--dest",
                                          back, "--method", method] + _launch_args(launch))
                site.remove_local(back)
                _emit(runs, {"workload": "collect", "data": kind, "size_bytes": payload,
                             "nodes": nodes, "method": method, "algorithm": alg,
                             "launch": res.get("launch") or launch, "repeat": i, **m},
                      on_run)
        site.wipe(names, "CHIBA_SCRATCH", rel)
    return runs


def sync(site: Site, *, methods=SYNC_METHODS, on_run: OnRun = None, **kw) -> list[dict]:
    """`chiba-admin sync-mayors` of a generated repository: in full, after a 5% change,
    and unchanged, for each target count (mayors first, then nodes); within each scenario
    and repeat every method in turn, all into the same destination (each leaves it as
    the source: the next method's "changed" sees one new change, its "nochange" none).
    Keywords: target_counts, repeat, workdir, files, size (bytes), target_role,
    full_methods (the methods whose full sync runs, default all: the others start from
    the tree the previous ones left). Service methods as in ``stage``."""
    return _serviced(_sync, site, methods, on_run, **kw)


def _sync(site: Site, *, target_counts: list[int], repeat: int, workdir: Path, files: int,
          size: int, methods, target_role: str = "mayor", full_methods=None,
          on_run: OnRun = None) -> list[dict]:
    from topology import fold

    runs: list[dict] = []
    src = workdir / f"sync-repo-{files}-{size}"
    if not src.exists():
        data.make_repository(src, files=files, size=size)
    pool = [h.name for h in site.topo.hosts(target_role)]
    if target_role == "mayor":
        pool += site.node_names()  # beyond the mayors, nodes serve as targets
    dest, seed = "bench-repo", 1
    full = tuple(methods if full_methods is None else full_methods)
    for n in target_counts:
        if n > len(pool):
            raise InvalidRequest(f"{n} targets asked, the site has {len(pool)} hosts to use")
        targets = pool[:n]
        site.wipe(targets, "CHIBA_REPO", dest)
        for scenario in ("full", "changed", "nochange"):
            for i in range(repeat):
                for method in (m for m in methods if scenario != "full" or m in full):
                    if scenario == "full":
                        site.wipe(targets, "CHIBA_REPO", dest)
                        changed = data.tree_bytes(src)
                    elif scenario == "changed":
                        seed += 1
                        changed = data.mutate_repository(src, 0.05, seed)
                    else:
                        changed = 0
                    launch = launch_of(method)
                    args = ["sync-mayors", str(src), "--targets", fold(targets), "--dest",
                            dest, "--method", sync_method(method), "--delete"]
                    args += ["-f", str(max(1, n))] if method == "rsync" else []
                    res, m = _measured(site, args + _launch_args(launch))
                    _emit(runs, {"workload": "sync", "scenario": scenario, "targets": n,
                                 "files": files, "method": sync_method(method),
                                 "launch": res.get("launch") or launch, "repeat": i,
                                 "changed_bytes": changed, **m}, on_run)
        site.wipe(targets, "CHIBA_REPO", dest)
    return runs


def _serviced(fn, site: Site, methods, on_run: OnRun, **kw) -> list[dict]:
    """``fn(site, methods=..., on_run=..., **kw)`` inside a running service when one of
    ``methods`` is a service method (started before, stopped after, also on error)."""
    runs: list[dict] = []
    need = any(launch_of(m) == "service" for m in methods)
    with service_up(site, need, lambda r: _emit(runs, r, on_run)):
        runs += fn(site, methods=methods, on_run=on_run, **kw)
    return runs


def _service_pool(site: Site) -> list[str]:
    """The service's hosts in the order counts take them: mayors, then nodes."""
    return [h.name for h in site.topo.hosts("mayor")] + site.node_names()


@contextlib.contextmanager
def service_up(site: Site, need: bool = True, on_run: OnRun = None,
               hosts: list[str] | None = None) -> Iterator[dict | None]:
    """`chiba-admin service start` (on ``hosts``, default: the command's own default, every
    host) when ``need``; ``on_run`` gets a ``service``/``start`` run with its time and host
    count; `service stop` on the way out, whatever happened. Yields the start's JSON.
    Raises ChibaError naming the president when the service does not come up."""
    if not need:
        yield None
        return
    from topology import fold

    args = ["service", "start"] + (["--hosts", fold(hosts)] if hosts else [])
    with cpu_meter() as cpu:
        res, wall, err = site.cli(*args)
    res = res or {}
    ok = bool(res.get("hosts"))
    # ``hosts``: besides the president, which the service always has (its coordinator and
    # a worker: ranks = hosts + 2)
    got = [h for h in res.get("hosts") or [] if h != site.topo.president.name]
    run = {"workload": "service", "metric": "start", "hosts": len(got or hosts or []),
           "ranks": len(res["hosts"]) + 1 if ok else None, "pid": res.get("pid"), "ok": ok, "seconds": wall, "start_seconds": res.get("seconds"),
           "failures": {} if ok else {"-": res.get("error") or err}, "nic": None,
           "cpu_busy": cpu.busy}
    if on_run:
        on_run(run)
    try:
        if not ok:
            raise ChibaError(f"the service did not start: {res.get('error') or err}",
                             where="president")
        yield res
    finally:
        out, _, err = site.cli("service", "stop")
        if not (out or {}).get("stopped") and ok:
            raise ChibaError(f"the service did not stop: {(out or {}).get('error') or err}",
                             where="president")


def run(site: Site, *, nodes: int, repeat: int, workdir: Path, methods=RUN_METHODS,
        command: tuple[str, ...] = ("true",), on_run: OnRun = None) -> list[dict]:
    """`chiba-admin run -w NODES -- true` on the first ``nodes`` nodes: the ssh fan-out
    ("ssh"), a fresh mpiexec ("mpiexec", ``--launch mpiexec``) and the service
    ("service"). The ssh rows run before the service starts (while it runs, `run` would
    use it); then the service, its rows, and its stop. ``workdir`` is unused."""
    from topology import fold

    runs: list[dict] = []
    names = fold(_nodes(site, nodes))

    def one(method: str, i: int) -> None:
        launch = launch_of(method)
        res, m = _measured(site, ["run", "-w", names, *_launch_args(launch), "--", *command])
        _emit(runs, {"workload": "run", "nodes": nodes, "command": " ".join(command),
                     "method": "ssh" if method == "ssh" else "mpi",
                     "launch": res.get("launch") or launch, "repeat": i, **m,
                     "ok": m["ok"] and res.get("rc", 1) == 0}, on_run)

    fresh = [m for m in methods if m != "service"]
    for i in range(repeat):
        for method in fresh:
            one(method, i)
    with service_up(site, "service" in methods, lambda r: _emit(runs, r, on_run)):
        for i in range(repeat if "service" in methods else 0):
            one("service", i)
    return runs


def service(site: Site, *, host_counts: list[int], repeat: int, workdir: Path,
            idle_seconds: float = 0, steady: bool = False,
            on_run: OnRun = None) -> list[dict]:
    """The service's own costs: `service start` on the first N of mayors-then-nodes for
    each of ``host_counts`` (plus the president, always in the service: N + 2 ranks),
    ``repeat`` times, each followed by `service stop`; then, when ``idle_seconds``, the
    CPU of an idle service on every host over that many seconds right after its start
    (`service status --sample`; metric ``idle_cpu``, ``value``: percent of one core, all
    ranks together) and, when ``steady``, over the next as many seconds (``idle_cpu_steady``:
    after 30 s without a request ranks test less often, mpitools/service/ranks.py).
    ``workdir`` is unused."""
    runs: list[dict] = []
    pool = _service_pool(site)
    for n in host_counts:
        if n > len(pool):
            raise InvalidRequest(f"{n} service hosts asked, the site has {len(pool)}")

    def keep(i: int):
        return lambda r: _emit(runs, {**r, "repeat": i}, on_run)

    for i in range(repeat):
        for n in host_counts:
            with service_up(site, True, keep(i), pool[:n]):
                pass
    if idle_seconds:
        with service_up(site, True, keep(0)):
            for metric in ("idle_cpu", "idle_cpu_steady")[:1 + bool(steady)]:
                _emit(runs, _idle_sample(site, metric, idle_seconds), on_run)
    return runs


def _idle_sample(site: Site, metric: str, seconds: float) -> dict:
    """One `service status --sample SECONDS` as a ``service`` run of ``metric``."""
    with cpu_meter() as cpu:
        res, wall, err = site.cli("service", "status", "--sample", str(seconds))
    res = res or {}
    pct = res.get("idle_cpu_percent")
    every = res.get("hosts") or []
    return {"workload": "service", "metric": metric,
            "hosts": len([h for h in every if h != site.topo.president.name]),
            "ranks": len(every) + 1 if every else None, "ok": pct is not None,
            "seconds": wall, "value": pct, "unit": "% of one core",
            "sample_seconds": res.get("sample_seconds"),
            "failures": {} if pct is not None else {"-": res.get("error") or err},
            "nic": None, "cpu_busy": cpu.busy}


def memory(site: Site, *, size: int, nodes: int, workdir: Path, chunk: str = "4MiB",
           algorithms=MEMORY_ALGORITHMS, on_run: OnRun = None) -> list[dict]:
    """Every rank's peak RSS staging ``size`` incompressible bytes in ``chunk`` messages:
    memory per rank must not grow with the payload."""
    from topology import fold

    runs: list[dict] = []
    names = _nodes(site, nodes)
    src, payload = make_payload(workdir, "random", size)
    for alg in algorithms:
        site.wipe(names, "CHIBA_SCRATCH", "bench-memory")
        res, m = _measured(site, ["stage", str(src), "--nodes", fold(names), "--dest",
                                  "bench-memory", "--algorithm", alg, "--chunk", chunk])
        hosts = res.get("hosts") or {}
        _emit(runs, {"workload": "memory", "method": "mpi", "algorithm": alg,
                     "size_bytes": payload, "chunk": chunk, "nodes": nodes, **m,
                     "peak_rss": res.get("peak_rss"),
                     "rss_by_host": {h: v.get("maxrss") for h, v in hosts.items()}},
              on_run)
    site.wipe(names, "CHIBA_SCRATCH", "bench-memory")
    return runs


# -- inventory (the library on this machine) ------------------------------------------------
# metric: (comparison, target, smallest tree it is set for); "met" says whether it held.
# The diff and encoding targets are for a tree of 100,000 entries.
INVENTORY_TARGETS = {
    "scan_entries_per_s": (">=", 50_000, 0),
    "hash_blake3_gb_per_s": (">=", 1.0, 0),
    "diff_s": ("<", 1.0, 100_000),
    "encoded_bytes": ("<", 6_000_000, 100_000),
}


def _median_time(fn: Callable[[], object], reps: int) -> tuple[float, object, float | None]:
    """(median seconds, last result, CPU busy share over all repetitions)."""
    times, out = [], None
    with cpu_meter() as cpu:
        for _ in range(reps):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), out, cpu.busy


def _mutated(inv, base):
    """A target that differs like a real one: 10% changed, 1% missing, 1% extra."""
    entries = []
    for i, e in enumerate(base):
        if e.kind == inv.FILE and i % 100 == 7:
            continue
        size = e.size + 1 if e.kind == inv.FILE and i % 10 == 3 else e.size
        entries.append(inv.Entry(e.path, e.kind, size, e.mode, e.mtime_ns, e.target, e.digest))
    files = base.files()
    for e in files[: len(files) // 100]:
        entries.append(inv.Entry(e.path + ".old", inv.FILE, 1, 0o644, e.mtime_ns))
    return inv.Inventory.from_entries(entries, root="target")


def inventory(*, files: int, hash_bytes: int, repeat: int, workdir: Path,
              on_run: OnRun = None) -> list[dict]:
    """Scan, hash, encode, diff and apply of the ``inventory`` package on a generated tree
    of ``files`` small files and a ``hash_bytes`` file, median of ``repeat``; one run per
    metric (``metric``, ``value``, ``unit``, ``target``, ``met``)."""
    import inventory as inv

    runs: list[dict] = []

    def out(metric: str, value: float, unit: str, secs: float, busy, *, n: int | None = files,
            **extra) -> None:
        op, limit, least = INVENTORY_TARGETS.get(metric, (None, None, 0))
        if files < least:
            op = None
        met = None if op is None else (value >= limit if op == ">=" else value < limit)
        _emit(runs, {"workload": "inventory", "metric": metric, "value": value, "unit": unit,
                     "files": n, "target": f"{op} {limit}" if op else None, "met": met,
                     "ok": True, "seconds": secs, "cpu_busy": busy, **extra}, on_run)

    tree = workdir / "inventory-tree"
    data.make_small_files(tree, files)
    inv.scan(tree)  # warm the dentry and inode caches
    secs, scanned, busy = _median_time(lambda: inv.scan(tree), repeat)
    out("scan_entries_per_s", round(len(scanned) / secs), "entries/s", secs, busy)
    secs, hashed, busy = _median_time(lambda: inv.scan(tree, checksum=True), repeat)
    out("scan_checksum_entries_per_s", round(len(hashed) / secs), "entries/s", secs, busy)
    plain = inv.encode_inventory(scanned)
    out("encoded_bytes", len(plain), "bytes", 0.0, None,
        bytes_per_entry=round(len(plain) / len(scanned), 2))
    secs, _, busy = _median_time(lambda: inv.encode_inventory(hashed), repeat)
    out("encode_s", secs, "s", secs, busy)
    full = inv.encode_inventory(hashed)
    secs, _, busy = _median_time(lambda: inv.decode_inventory(full), repeat)
    out("decode_s", secs, "s", secs, busy)
    target = _mutated(inv, scanned)
    secs, plan, busy = _median_time(lambda: inv.make_plan(scanned, target, delete=True),
                                    repeat)
    out("diff_s", secs, "s", secs, busy, plan=plan.summary())
    secs, _, busy = _median_time(lambda: inv.needs(scanned, target), repeat)
    out("needs_s", secs, "s", secs, busy)
    # what mpisync's rank 0 does with 32 targets' need bitmaps: group equal ones
    per = {r: inv.needs_bitmap(scanned, [e.path for e in scanned.files()[r::7]])
           for r in range(32)}
    secs, grouped, busy = _median_time(lambda: inv.group_bitmaps(scanned, per), repeat)
    out("group_bitmaps_32_targets_s", secs, "s", secs, busy, groups=len(grouped))
    dest = workdir / "inventory-dest"
    secs, applied, busy = _median_time(
        lambda: inv.apply_plan(inv.make_plan(scanned, inv.scan(dest, missing_ok=True)), dest,
                               inv.local_fetch(tree)), 1)
    out("apply_files_per_s", round(applied.created / secs), "files/s", secs, busy)
    shutil.rmtree(dest)
    shutil.rmtree(tree)

    big = data.make_random(workdir / "inventory-big", hash_bytes) / "data.bin"
    inv.hash_file(big)  # page cache warm: measure the hash, not the disk
    for algo in inv.ALGOS:
        secs, _, busy = _median_time(lambda: inv.hash_file(big, algo), repeat)
        out(f"hash_{algo}_gb_per_s", round(hash_bytes / secs / 1e9, 3), "GB/s", secs, busy,
            n=None, bytes=hash_bytes)
    secs, _, busy = _median_time(lambda: inv.hash_file(big, "blake3", threads=1), repeat)
    out("hash_blake3_1thread_gb_per_s", round(hash_bytes / secs / 1e9, 3), "GB/s", secs, busy,
        n=None, bytes=hash_bytes)
    shutil.rmtree(big.parent)
    return runs


# `shell`: chiba-admin shell against the launches it replaces (its own module)
from .shellbench import shell  # noqa: E402
