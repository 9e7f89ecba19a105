"""Predictions for a list of (method, size, host count) points, two child processes at a
time (each simulation needs a SimGrid engine of its own), and the ``--check`` table."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from .calibrate import (Point, fit_key, fit_with_load, host_seconds, points_from_records,
                        topology_for)
from .engine import Calibration, run_in_child
from .models import HOST_PHASES, SYNC_METHODS

MPI_METHODS = ("chain", "bcast", "mpisync")

__all__ = ["targets_for", "predict_points", "check_records"]


def targets_for(topo, method: str, n: int) -> list[str]:
    """The hosts a method serves: the first ``n`` nodes (staging), or mayors then nodes
    (synchronisation, as the benchmarks choose targets). InvalidRequest when too few."""
    from ..errors import InvalidRequest

    pool = [h.name for h in topo.nodes]
    if method in SYNC_METHODS:
        pool = [h.name for h in topo.mayors] + pool
    if n > len(pool):
        raise InvalidRequest(f"{n} hosts asked for {method}, the topology has {len(pool)}",
                         where=topo.source, hint="pick --nodes within the cluster's size")
    return pool[:n]


def _workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def predict_points(topo_text: str, topo, jobs: list[dict], calib: Calibration,
                   source: str = "<topology>") -> list[dict]:
    """Run every job ({"method", "n", "bytes", options}); results in job order."""
    def one(job: dict) -> dict:
        hosts = targets_for(topo, job["method"], job["n"])
        full = {**job, "topology": topo_text, "source": source, "hosts": hosts,
                "calibration": calib.to_dict()}
        return run_in_child(full)

    for job in jobs:  # bad input before any simulation starts
        targets_for(topo, job["method"], job["n"])
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        return list(pool.map(one, jobs))


def _job(p: Point) -> dict:
    job = {"method": p.model, "n": p.hosts, "bytes": p.bytes, "files": p.files}
    if p.fanout:
        job["fanout"] = p.fanout
    return job


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def _simulate_points(reps: list[Point], base: Calibration) -> list[dict]:
    from topology.loader import loads_topology

    topos: dict[str, object] = {}
    jobs = []
    for p in reps:
        text = topology_for(p.cluster)
        if text not in topos:
            topos[text] = loads_topology(text, "<testbed>")
        jobs.append((text, p))
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        futs = [pool.submit(predict_points, text, topos[text], [_job(p)], base, "<testbed>")
                for text, p in jobs]
        return [f.result()[0] for f in futs]


def check_records(records: list[dict], calib: Calibration | None = None) -> dict:
    """Every measured testbed point (stage and sync, every modelled method and peer,
    fresh mpiexec or the service) predicted.

    Runs of one configuration are pooled into a point (measured: their median). Each
    point is simulated once; its network time (the phases that are not host costs) plus
    its fit group's host costs (calibrate.fit_host_costs: method, launch and sync
    scenario; ``a + b x hosts + c x hosts x GB`` fitted to the points' residuals) is the
    prediction. Returns rows (predicted, measured median and range, error relative to
    the median, the error with this point left out of the fit, network-bound or not), the
    calibration with the fitted host costs, the fit's description, the runs without a
    model, and the largest error.
    """
    base = calib or Calibration()
    points, skipped = points_from_records(records)
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(p.key, []).append(p)
    reps = []
    for g in groups.values():  # the run of median bytes simulates the point
        reps.append(sorted(g, key=lambda q: q.bytes)[len(g) // 2])
    results = _simulate_points(reps, base)
    nets = [sum(v for k, v in r["phases"].items() if k not in HOST_PHASES) for r in results]
    pts = []
    for p, net in zip(reps, nets):
        med = _median([q.measured for q in groups[p.key]])
        pts.append({"group": fit_key(p.method, p.launch, p.scenario), "source": p.source,
                    "hosts": p.hosts, "bytes": p.bytes, "measured": med,
                    "residual": med - net, "key": p.key})
    fits, load, notes = fit_with_load(pts)
    cal = replace(base, host_fit=fits, source="host costs fitted to measured runs")
    rows = [_row(p, net, fits, load, pts, groups[p.key]) for p, net in zip(reps, nets)]
    for row, p, r in zip(rows, reps, results):  # the president's bytes: a check of the model
        txs = [q.president_tx for q in groups[p.key] if q.president_tx is not None]
        row["president_tx_measured"] = _median(txs) if txs else None
        row["president_tx_predicted"] = r.get("president_tx")
    worst = max((abs(r["error"]) for r in rows if r["error"] is not None), default=None)
    loads = [f"{os.path.basename(k)}: {v:.2f}" for k, v in sorted(load.items())]
    return {"rows": rows, "calibration": cal.to_dict(), "fit": notes, "load": load,
            "fit_load": "load factor per record (its host costs x): " + ", ".join(loads),
            "not_modelled": skipped, "max_abs_error": worst}


def _row(p: Point, net: float, fits: dict, load: dict, pts: list[dict],
         runs: list[Point]) -> dict:
    group = fit_key(p.method, p.launch, p.scenario)
    host = load[p.source] * host_seconds(fits[group], p.hosts, p.bytes)
    pred = net + host
    measured = [q.measured for q in runs]
    med = _median(measured)
    # out of sample: group and record factor fitted without this point (None: nothing
    # left in its group that could predict it)
    rest = [q for q in pts if q["key"] != p.key]
    hosts_left = {q["hosts"] for q in rest if q["group"] == group}
    loo = None
    if med and (p.hosts in hosts_left or len(hosts_left) > 1):
        f2, l2, _ = fit_with_load(rest)
        h2 = l2.get(p.source, 1.0) * host_seconds(f2[group], p.hosts, p.bytes)
        loo = (net + h2 - med) / med
    launch = p.launch or ("mpiexec" if p.method in MPI_METHODS else None)
    return {"workload": p.workload, "method": p.method, "launch": launch, "hosts": p.hosts,
            "bytes": p.bytes, "scenario": p.scenario, "group": group,
            "shape": f"{p.cluster.get('towns')}x{p.cluster.get('nodes_per_town')}",
            "node_bps": p.cluster.get("node_bps"),
            "uplink_bps": p.cluster.get("uplink_bps") or p.cluster.get("mayor_bps"),
            "measured": med, "measured_min": min(measured), "measured_max": max(measured),
            "runs": len(measured), "predicted": pred,
            "network_seconds": net, "host_seconds": host, "load": load[p.source],
            "error": (pred - med) / med if med else None, "loo_error": loo,
            # most of the predicted time on the network (the rest is start-up and
            # per-file work on the testbed's shared cores)
            "network_bound": net >= host,
            "source": os.path.basename(p.source)}
