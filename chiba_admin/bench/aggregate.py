"""Records -> rows: medians, throughputs, bounds and ratios, one row per measured case (pure).

Every figure is computed from the runs passed in (medians of measured times, byte counters
and CPU shares); nothing is estimated, and a value without measurements is None.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from .cpuprofile import cpu_rows

__all__ = ["KEYS", "CPU_BOUND", "RUN_TARGET_S", "groups", "stage_rows", "collect_rows",
           "sync_rows", "run_rows", "service_rows", "shell_rows", "memory_rows", "inventory_rows",
           "code_size_rows", "sources", "report_dict", "label", "launch"]

# What identifies a case of each workload (besides the cluster kind)
KEYS = {
    "stage": ("nodes", "data", "size_bytes", "method", "algorithm", "launch"),
    "collect": ("nodes", "data", "size_bytes", "method", "algorithm", "launch"),
    "sync": ("targets", "scenario", "method", "launch"),
    "run": ("nodes", "method", "launch"),
    "service": ("metric", "hosts"),
    "memory": ("nodes", "size_bytes", "chunk", "algorithm"),
    "inventory": ("metric",),
    "shell": ("case", "nodes", "method"),
    "cpu": ("op", "tree", "nodes", "method", "algorithm", "launch"),
}
# A run whose median CPU busy share reaches this was bound by the machine's cores (every
# emulated host and rank shares them), not by the emulated links.
CPU_BOUND = 0.9
# Issue 19: `run` of a trivial command on 32 nodes through the service, under 0.3 s
RUN_TARGET_S = 0.3
# What a case is compared with besides the legacy method: the same method's fresh launch
_KIND_KEYS = ("method", "algorithm", "launch")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def launch(run: dict) -> str:
    """A run's launch: its ``launch``, else "mpiexec" for an MPI method (records from
    before the service), else "" (not MPI)."""
    return run.get("launch") or ("mpiexec" if run.get("method") == "mpi" else "")


def groups(records: list[dict], workload: str) -> dict[tuple, list[dict]]:
    """Runs of ``workload`` grouped by (cluster kind, *KEYS[workload]); each run gets
    ``_cluster`` (its record's cluster) and ``_record`` (its record's commit and date:
    which runs were measured in the same hour). A missing algorithm groups as "", a
    missing launch as ``launch(run)``."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        cl = rec.get("cluster") or {}
        for run in rec["runs"]:
            # a skipped run (a peer off the testbed) says why in the record; no case
            if run.get("workload") != workload or run.get("skipped"):
                continue
            key = (cl.get("kind", "?"),) + tuple(
                (run.get(f) or "") if f == "algorithm" else launch(run) if f == "launch"
                else run.get(f) for f in KEYS[workload])
            out[key].append({**run, "_cluster": cl,
                             "_record": (rec.get("commit"), rec.get("date"))})
    return out


def label(method: str, algorithm: str, workload: str = "stage", launch: str = "") -> str:
    """The name a table shows: "City Transit", "MPI chain", "mpisync", "rsync", ...;
    through the service "MPI chain (service)", "mpisync (service)"; for `run`
    "ssh fan-out", "mpiexec", "service"."""
    if workload == "run":
        return {"ssh": "ssh fan-out"}.get(method) or launch or "mpiexec"
    if launch == "service":
        return f"{label(method, algorithm, workload)} (service)"
    if method == "transit":
        return "City Transit"
    if method == "rsync":
        return "rsync"
    if method == "mpi":
        if workload == "sync":
            return "mpisync"
        return f"MPI {algorithm}" if algorithm else "MPI"
    return {"clush": "clush --copy", "sbcast-tree": "sbcast (tree)"}.get(method, method)


def _common(runs: list[dict]) -> tuple[list[dict], dict]:
    ok = [r for r in runs if r.get("ok")]
    med = _median([r.get("seconds") for r in ok])
    busy = _median([r.get("cpu_busy") for r in runs])
    names = dict.fromkeys(k for r in ok for k, v in (r.get("phases") or {}).items()
                          if isinstance(v, (int, float)))
    return ok, {"phases_s": {k: _median([(r.get("phases") or {}).get(k) for r in ok])
                             for k in names},
                "runs": len(runs), "failures": len(runs) - len(ok), "median_s": med,
                "min_s": min((r["seconds"] for r in ok), default=None),
                "max_s": max((r["seconds"] for r in ok), default=None),
                "cpu_busy": busy, "cpu_bound": None if busy is None else busy >= CPU_BOUND,
                "president_bytes": _median([(r.get("nic") or {}).get("president_tx")
                                            for r in ok])}


def _rows(records, workload: str, legacy: str | None, fields) -> list[dict]:
    """One row per case: the common columns, ``fields(case, runs, ok, median)``, the
    speed-up over the ``legacy`` method measured in the same case, and (a service row)
    over the same method's fresh launch (``speedup_vs_mpiexec``, None otherwise)."""
    rows, base, fresh = [], {}, {}
    for key, runs in groups(records, workload).items():
        case = dict(zip(("cluster",) + KEYS[workload], key))
        ok, row = _common(runs)
        row = {**case, **row, **fields(case, runs, ok, row["median_s"])}
        scale = tuple(v for k, v in case.items() if k not in _KIND_KEYS)
        if legacy and case.get("method") == legacy and row["median_s"]:
            base[scale] = row["median_s"]
        if case.get("launch") == "mpiexec" and row["median_s"]:
            fresh[scale + (case.get("method"), case.get("algorithm"))] = row["median_s"]
        rows.append((scale, row))
    for scale, row in rows:
        b = base.get(scale)
        row["speedup_vs_legacy"] = (b / row["median_s"]) if b and row["median_s"] else None
        f = (fresh.get(scale + (row.get("method"), row.get("algorithm")))
             if row.get("launch") == "service" else None)
        row["speedup_vs_mpiexec"] = (f / row["median_s"]) if f and row["median_s"] else None
    return [row for _, row in rows]


def _transfer_fields(link: str):
    """Throughput columns of stage and collect; efficiency against the cluster's ``link``
    rate (node_bps: a node's link for staging; mayor_bps: the president's, for collect)."""
    def fields(case, runs, ok, med):
        size, nodes = case["size_bytes"], case["nodes"]
        bps = runs[0]["_cluster"].get(link)
        line = size * 8 * (nodes if link == "mayor_bps" else 1)
        # the transfer phase alone against the link: what the chain's pipeline achieves
        # without start-up and exit (archive bytes, as they cross each link)
        xfer = _median([(r.get("phases") or {}).get("transfer") for r in ok])
        arch = _median([r.get("archive_bytes") for r in ok])
        return {"label": label(case["method"], case["algorithm"], launch=case["launch"]),
                "link_bps": bps,
                "transfer_s": xfer,
                "transfer_efficiency": (arch * 8 / bps / xfer)
                if xfer and arch and bps and link == "node_bps" else None,
                "per_node_mbps": (size * 8 / med / 1e6) if med else None,
                "aggregate_mbps": (size * 8 * nodes / med / 1e6) if med else None,
                "efficiency": (line / bps / med) if med and bps else None,
                "mayors_bytes": _median([(r.get("nic") or {}).get("mayors_town_tx")
                                         for r in ok]),
                "president_rx_bytes": _median([(r.get("nic") or {}).get("president_rx")
                                               for r in ok]),
                "launch_s": _median([(r.get("phases") or {}).get("launch") for r in ok])}
    return fields


def _sorted(rows: list[dict], keys: tuple, legacy: str) -> list[dict]:
    return sorted(rows, key=lambda r: tuple((r[k] is None, r[k]) if k != "method"
                                            else (r[k] != legacy, r[k]) for k in keys))


def stage_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, nodes, data, size, method): medians and ratios.
    Efficiency = (size / node link rate) / median time."""
    rows = _rows(records, "stage", "transit", _transfer_fields("node_bps"))
    return _sorted(rows, ("cluster", "nodes", "data", "size_bytes", "method", "algorithm",
                          "launch"), "transit")


def collect_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, nodes, data, size, method). Everything crosses the
    president's link, so efficiency = (nodes x size / president link rate) / median time."""
    rows = _rows(records, "collect", "transit", _transfer_fields("mayor_bps"))
    return _sorted(rows, ("cluster", "nodes", "data", "size_bytes", "method", "algorithm",
                          "launch"), "transit")


def sync_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, targets, scenario, method): medians, bound and ratios.
    The bound is changed bytes / the slowest link a target sits behind: the mayors' core
    link while the targets are mayors only, else a node's link or its town's uplink
    (the bench takes the mayors first, then nodes)."""
    def fields(case, runs, ok, med):
        cl = runs[0]["_cluster"]
        rate = cl.get("mayor_bps")
        # records before the paper-shaped testbed (no uplink_bps) held one cluster for
        # every site, so their sync targets cannot be told apart: the core link, as then
        if rate and cl.get("uplink_bps") and cl.get("towns") and \
                (case.get("targets") or 0) > cl["towns"]:
            rate = min(x for x in (cl.get("node_bps"), cl.get("uplink_bps") or rate, rate) if x)
        changed = _median([r.get("changed_bytes") for r in runs])
        bound = (changed * 8 / rate) if changed is not None and rate else None
        # mpisync reports its phases: the transfer alone against the bound shows how much
        # of the gap is moving bytes and how much is starting and ending the job
        xfer = _median([(r.get("phases") or {}).get("transfer") for r in ok])
        return {"label": label(case["method"], "", "sync", case["launch"]),
                "completed": len(ok) == len(runs),
                "changed_bytes": changed, "bound_s": bound,
                "vs_bound": (med / bound) if med and bound else None,
                "transfer_s": xfer,
                "transfer_vs_bound": (xfer / bound) if xfer and bound else None}

    order = {"full": 0, "changed": 1, "nochange": 2}
    rows = _rows(records, "sync", "rsync", fields)
    return sorted(rows, key=lambda r: (r["cluster"], r["targets"],
                                       order.get(r["scenario"], 9), r["method"] != "rsync",
                                       r["launch"]))


def run_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, nodes, method, launch) of `run` of a trivial command:
    the median, x ssh (the fan-out's median / this one), and for 32 nodes or more whether
    it is under RUN_TARGET_S (``met``)."""
    def fields(case, runs, ok, med):
        big = case["nodes"] >= 32
        return {"label": label(case["method"], "", "run", case["launch"]),
                "command": runs[-1].get("command"),
                "target": f"< {RUN_TARGET_S} s" if big else None,
                "met": (med < RUN_TARGET_S) if big and med is not None else None}

    order = {"": 0, "mpiexec": 1, "service": 2}
    return sorted(_rows(records, "run", "ssh", fields),
                  key=lambda r: (r["cluster"], r["nodes"], order.get(r["launch"], 9)))


def service_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, metric, hosts) of the service's own costs: ``start``
    (median seconds of `service start` until its socket answers, as the command is
    waited for), ``idle_cpu`` and ``idle_cpu_steady`` (``value``: percent of one core,
    all ranks, over ``sample_s`` right after the start, and over the next as many). ``hosts`` excludes the president, always in the service."""
    def fields(case, runs, ok, med):
        return {"ranks": _median([r.get("ranks") for r in ok]),
                "value": _median([r.get("value") for r in ok]),
                "unit": runs[-1].get("unit") or "s",
                "sample_s": _median([r.get("sample_seconds") for r in ok])}

    return sorted(_rows(records, "service", None, fields),
                  key=lambda r: (r["cluster"], r["metric"] != "start", r["metric"],
                                 r["hosts"] or 0))


_SHELL_LABELS = {
    ("command", "shell"): "srun in one shell job", ("command", "run"): "chiba-admin run",
    ("command", "mpiexec"): "mpiexec (Open MPI)", ("command", "srun"): "srun (Slurm)",
    ("mpi_init", "shell"): "shell's PMI", ("mpi_init", "hydra"): "MPICH mpiexec (hydra)",
    ("pipeline", "shell"): "one shell job", ("pipeline", "separate"): "three commands"}


def shell_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, case, nodes, method) of the ``shell`` workload
    (chiba_admin/bench/shellbench.py): the median (per command, to MPI_Init, or the whole
    pipeline), ``vs_shell`` (this median / the shell's in the same case), ``saved_s`` (a
    pipeline's separate commands minus the shell job), ``ratio`` (the shell's MPI_Init
    time / hydra's) and the issue's target with ``met``; ``inner_launch``: how the inner
    stage and collect launched."""
    from .shellbench import COMMAND_TARGET_S, INIT_TARGET_RATIO

    def fields(case, runs, ok, med):
        inner = {k: v for r in ok for k, v in (r.get("inner_launch") or {}).items()}
        return {"label": _SHELL_LABELS.get((case["case"], case["method"]), case["method"]),
                "inner_launch": inner or None}

    rows = _rows(records, "shell", None, fields)
    shell = {(r["cluster"], r["case"], r["nodes"]): r["median_s"] for r in rows
             if r["method"] == "shell"}
    for r in rows:
        s, med, mine = shell.get((r["cluster"], r["case"], r["nodes"])), r["median_s"], \
            r["method"] == "shell"
        r["vs_shell"] = med / s if s and med is not None and not mine else None
        r["saved_s"] = (med - s if r["case"] == "pipeline" and not mine and s
                        and med is not None else None)
        r["ratio"], r["target"], r["met"] = None, None, None
        if mine and r["case"] == "command" and r["nodes"] in COMMAND_TARGET_S:
            r["target"] = f"< {COMMAND_TARGET_S[r['nodes']]} s"
            r["met"] = None if med is None else med < COMMAND_TARGET_S[r["nodes"]]
        hydra = next((x["median_s"] for x in rows if x["method"] == "hydra" and
                      (x["cluster"], x["nodes"]) == (r["cluster"], r["nodes"])), None)
        if mine and r["case"] == "mpi_init" and hydra and med is not None:
            r["ratio"] = med / hydra
            r["target"] = f"<= {INIT_TARGET_RATIO} x hydra"
            r["met"] = r["ratio"] <= INIT_TARGET_RATIO
    order = {"command": 0, "mpi_init": 1, "pipeline": 2}
    methods = list(dict.fromkeys(m for _, m in _SHELL_LABELS))
    return sorted(rows, key=lambda r: (r["cluster"], r["nodes"], order.get(r["case"], 9),
                                       methods.index(r["method"]) if r["method"] in methods
                                       else 99, r["method"]))


def memory_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, nodes, size, chunk, algorithm): the largest peak RSS of
    any rank (bytes) and the median over hosts of each host's peak."""
    def fields(case, runs, ok, med):
        per_host = [v for r in ok for v in (r.get("rss_by_host") or {}).values()]
        return {"label": label("mpi", case["algorithm"]),
                "peak_rss": max((r.get("peak_rss") or 0 for r in ok), default=0) or None,
                "median_host_rss": _median(per_host)}

    rows = _rows(records, "memory", None, fields)
    return sorted(rows, key=lambda r: (r["cluster"], r["size_bytes"], r["algorithm"]))


def inventory_rows(records: list[dict]) -> list[dict]:
    """One row per metric: the median value, its unit and target, and whether it was met."""
    def fields(case, runs, ok, med):
        met = [r["met"] for r in ok if r.get("met") is not None]
        return {"value": _median([r.get("value") for r in ok]), "unit": runs[-1].get("unit"),
                "target": runs[-1].get("target"), "met": all(met) if met else None,
                "files": runs[-1].get("files")}

    return sorted(_rows(records, "inventory", None, fields), key=lambda r: r["metric"])


def code_size_rows(records: list[dict]) -> list[dict]:
    """Lines of code of each tool's implementation, as recorded with the newest record."""
    for rec in sorted(records, key=lambda r: str(r.get("date")), reverse=True):
        sizes = (rec.get("env") or {}).get("code_lines")
        if sizes:
            return [{"tool": k, "lines": v["lines"], "files": v["files"]}
                    for k, v in sizes.items()]
    return []


def sources(records: list[dict]) -> list[dict]:
    """Where each record comes from: file, suite, cluster kind, commit, date, and whether
    its suite stopped half-way (``partial``)."""
    return [{"file": r.get("_file"), "suite": r.get("suite"),
             "cluster": (r.get("cluster") or {}).get("kind"), "commit": r.get("commit"),
             "date": r.get("date"), "partial": bool(r.get("partial"))} for r in records]


def report_dict(records: list[dict]) -> dict:
    """Everything ``report`` shows, as data (``--json`` prints it as is)."""
    newest = max(records, key=lambda r: str(r.get("date")))
    return {"clusters": sorted({(r.get("cluster") or {}).get("kind", "?") for r in records}),
            "files": [r.get("_file") for r in records], "sources": sources(records),
            "environment": newest.get("env", {}),
            "stage": stage_rows(records), "collect": collect_rows(records),
            "sync": sync_rows(records), "run": run_rows(records),
            "service": service_rows(records), "shell": shell_rows(records),
            "memory": memory_rows(records),
            "inventory": inventory_rows(records), "code_size": code_size_rows(records),
            "cpu": cpu_rows(groups(records, "cpu"), _median)}
