"""Calibration against measured benchmark records (chiba-bench/2): the per-host launch and
exit costs fitted from them, and ``predict --check``'s predicted-versus-measured table.

A record's ``cluster`` gives the testbed's shape and rates; the topology is regenerated
from them (topology/generate.py, the generator the testbed uses). Records written before
records named the mayors' town-side rate (no ``uplink_bps``) come from the testbed's
"fat mayors" shape: town-side links at the core rate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .engine import Calibration

__all__ = ["Point", "points_from_records", "fit_calibration", "topology_for",
           "FILES_DEFAULT", "MODELLED"]

FILES_DEFAULT = 3000  # the bench suites' repository (300 files at 64 targets)
MODELLED = ("stage", "sync")


@dataclass
class Point:
    """One measured run to predict: method, hosts, bytes, the measured seconds."""

    workload: str
    method: str          # a predict method: chain, bcast, transit, mpisync, rsync
    hosts: int
    bytes: int
    measured: float
    cluster: dict
    files: int = 0
    scenario: str | None = None
    fanout: int | None = None
    launch: float | None = None
    exit: float | None = None
    source: str = ""

    @property
    def key(self) -> tuple:
        return (self.workload, self.method, self.hosts, self.bytes, self.scenario,
                _shape_key(self.cluster))


def _shape_key(c: dict) -> tuple:
    return (c.get("towns"), c.get("nodes_per_town"), c.get("node_bps"), c.get("mayor_bps"),
            c.get("uplink_bps") or c.get("mayor_bps"))


def _method(run: dict) -> str | None:
    if run["workload"] == "stage":
        if run.get("method") == "transit":
            return "transit"
        if run.get("method") == "mpi":
            return run.get("algorithm") or "chain"
    if run["workload"] == "sync":
        return {"mpi": "mpisync", "rsync": "rsync"}.get(run.get("method"))
    return None


def points_from_records(records: list[dict]) -> tuple[list[Point], list[dict]]:
    """(points to predict, runs not modelled) from testbed records; failed runs are left
    out (a failure's time says nothing about the network)."""
    points, skipped = [], []
    for rec in records:
        c = rec.get("cluster") or {}
        if c.get("kind") != "testbed" or not c.get("node_bps"):
            continue
        for run in rec.get("runs", []):
            m = _method(run) if run.get("workload") in MODELLED else None
            if m is None or not run.get("ok"):
                skipped.append({"workload": run.get("workload"), "method": run.get("method"),
                                "why": "failed run" if m else "no model",
                                "source": rec.get("_file", "")})
                continue
            ph = run.get("phases") or {}
            if run["workload"] == "stage":
                p = Point("stage", m, int(run["nodes"]),
                          int(run.get("archive_bytes") or run["size_bytes"]),
                          float(run["seconds"]), c, launch=ph.get("launch"),
                          exit=ph.get("exit"), source=rec.get("_file", ""))
            else:
                n = int(run["targets"])
                p = Point("sync", m, n, int(run.get("changed_bytes") or 0),
                          float(run["seconds"]), _sync_cluster(c, n),
                          files=int(run.get("files") or (300 if n >= 64 else FILES_DEFAULT)),
                          scenario=run.get("scenario"), fanout=max(1, n),
                          launch=ph.get("launch"), exit=ph.get("exit"),
                          source=rec.get("_file", ""))
            points.append(p)
    return points, skipped


def _sync_cluster(c: dict, targets: int) -> dict:
    """The site a sync run was measured on: the bench brings up a shape of its own for
    synchronisation (``sites.sync_shape``: mayors first), at the record's rates."""
    from ..bench.sites import sync_shape

    towns, per = sync_shape(targets)
    if c.get("towns") == towns:
        return c
    return {**c, "towns": towns, "nodes_per_town": per}


def topology_for(cluster: dict) -> str:
    """The TOML of the testbed a record was measured on."""
    from topology.generate import generated_topology_toml

    return generated_topology_toml(int(cluster["towns"]), int(cluster["nodes_per_town"]),
                                   float(cluster["node_bps"]), float(cluster["mayor_bps"]),
                                   name=str(cluster.get("name") or "testbed"),
                                   uplink_bps=float(cluster.get("uplink_bps")
                                                    or cluster["mayor_bps"]))


def _line(xs: list[float], ys: list[float], slope: float) -> tuple[float, float]:
    """Least-squares a + b x; with one distinct x, the default ``slope`` and a fitted a."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return max(0.0, my - slope * mx), slope
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return max(0.0, my - b * mx), max(0.0, b)


def fit_calibration(points: list[Point], base: Calibration | None = None
                    ) -> tuple[Calibration, list[str]]:
    """Launch and exit costs (a + b x ranks) fitted to the measured MPI runs' phases;
    (calibration, lines saying what was fitted from what)."""
    base = base or Calibration()
    notes, cal = [], base
    for phase in ("launch", "exit"):
        pts = [(p.hosts + (1 if p.method == "mpisync" else 0), getattr(p, phase))
               for p in points if getattr(p, phase) is not None]
        if not pts:
            notes.append(f"{phase}: no measured phase; defaults a={getattr(base, phase)[0]:g} s,"
                         f" b={getattr(base, phase)[1]:g} s/rank")
            continue
        a, b = _line([x for x, _ in pts], [y for _, y in pts], getattr(base, phase)[1])
        cal = replace(cal, **{phase: (round(a, 4), round(b, 5))})
        xs = sorted({x for x, _ in pts})
        how = ("least squares" if len(xs) > 1
               else f"one rank count ({xs[0]}): slope kept at the default, intercept fitted")
        notes.append(f"{phase}: a={a:.3f} s + b={b:.4f} s/rank from {len(pts)} MPI runs ({how})")
    cal = replace(cal, source="fitted to records")
    return cal, notes
