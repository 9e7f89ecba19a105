"""Calibration against measured benchmark records (chiba-bench/2): the per-host launch and
exit costs fitted from them, and ``predict --check``'s predicted-versus-measured table.

A record's ``cluster`` gives the testbed's shape and rates; the topology is regenerated
from them (topology/generate.py, the generator the testbed uses). Records written before
records named the mayors' town-side rate (no ``uplink_bps``) come from the testbed's
"fat mayors" shape: town-side links at the core rate.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Point", "points_from_records", "fit_host_costs", "topology_for",
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
    source: str = ""

    @property
    def key(self) -> tuple:
        return (self.workload, self.method, self.hosts, self.bytes, self.scenario,
                _shape_key(self.cluster))


def _shape_key(c: dict) -> tuple:
    return (c.get("towns"), c.get("nodes_per_town"), c.get("node_bps"), c.get("mayor_bps"),
            c.get("uplink_bps") or c.get("mayor_bps"))


def _method(run: dict) -> str | None:
    if run.get("launch") == "service":
        return None  # no mpiexec to start or end: not what the model's host costs are
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
            if run["workload"] == "stage":
                p = Point("stage", m, int(run["nodes"]),
                          int(run.get("archive_bytes") or run["size_bytes"]),
                          float(run["seconds"]), c, source=rec.get("_file", ""))
            else:
                n = int(run["targets"])
                p = Point("sync", m, n, int(run.get("changed_bytes") or 0),
                          float(run["seconds"]), _sync_cluster(c, n),
                          files=int(run.get("files") or (300 if n >= 64 else FILES_DEFAULT)),
                          scenario=run.get("scenario"), fanout=max(1, n),
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


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b x (b >= 0, a >= 0); with one distinct x, b = 0 and a the mean."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx) if sxx else 0.0
    a = my - b * mx
    if a < 0:  # through the origin instead
        a, b = 0.0, max(0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs))
    return a, b


def fit_host_costs(samples: dict[str, list[tuple[int, float]]]
                   ) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Per method, host costs ``a + b x hosts`` (seconds) fitted by least squares to
    (hosts, measured - simulated network seconds) of every measured run: start-up,
    exit, ssh sessions and per-file work, as the testbed's shared cores made them.
    Returns ({method: (a, b)}, one line per method saying what was fitted from what)."""
    fits, notes = {}, []
    for m, pts in sorted(samples.items()):
        a, b = _line([float(h) for h, _ in pts], [r for _, r in pts])
        fits[m] = (round(a, 4), round(b, 5))
        counts = sorted({h for h, _ in pts})
        notes.append(f"{m}: host costs a={a:.3f} s + b={b:.4f} s/host, least squares over "
                     f"{len(pts)} measured run(s) at {', '.join(map(str, counts))} hosts"
                     + (" (one host count: b = 0)" if len(counts) == 1 else ""))
    return fits, notes
