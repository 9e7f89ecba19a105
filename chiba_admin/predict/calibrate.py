"""Calibration against measured benchmark records (chiba-bench/2): the per-host costs
fitted from them, and ``predict --check``'s predicted-versus-measured table.

A record's ``cluster`` gives the testbed's shape and rates; the topology is regenerated
from them (topology/generate.py, the generator the testbed uses). Records written before
records named the mayors' town-side rate (no ``uplink_bps``) come from the testbed's
"fat mayors" shape: town-side links at the core rate.

What is fitted (``fit_host_costs``): the network time of every point is simulated; what
the simulation leaves of the measured time (start-up and exit of mpiexec or of ssh
sessions, per-file work, the CPU that the testbed's emulated hosts share on its cores) is
``a + b x hosts + c x hosts x GB`` seconds, one line per *fit group* (the measured
method, its launch, and for synchronisation the scenario: full, changed, nochange),
fitted by non-negative least squares of the relative error over the group's points (each
point: the median of its repeated runs). A column enters the fit only when the group's
points vary in it and there are more points than columns, so a group measured at one host
count and size is a constant (said so in the fit's note).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = ["Point", "points_from_records", "fit_host_costs", "topology_for",
           "files_for", "fit_key", "host_seconds", "fit_with_load", "FILES_PER_BYTE", "MODELLED"]

# The bench suites' repositories hold 3,000 files in 150 MiB (300 in 15 MiB at 64
# targets: chiba_admin/bench/suites.py); a sync run records its bytes, not its files
FILES_PER_BYTE = 3000 / (150 << 20)
MODELLED = ("stage", "sync")
_MPI_FRESH = ("chain", "bcast", "mpisync")
# measured stage method -> (model in transfer.py, fan-out or tree width of the tool's
# defaults: pdcp -f 32, clush -f 64, sbcast -F 8; sbcast-tree: legacy_transit/peers.py)
_PEERS = {"pdcp": ("pdcp", 32), "clush": ("pdcp", 64), "sbcast": ("sbcast", 8),
          "sbcast-tree": ("sbcast", None)}


@dataclass
class Point:
    """One measured run to predict: method, hosts, bytes, the measured seconds.

    ``method`` is the measured method's name (chain, bcast, transit, pdcp, clush, sbcast,
    sbcast-tree, mpisync, rsync), ``model`` the transfer.py program that simulates it,
    ``launch`` "service" for runs through the long-running MPI service (else None)."""

    workload: str
    method: str
    hosts: int
    bytes: int
    measured: float
    cluster: dict
    files: int = 0
    scenario: str | None = None
    fanout: int | None = None
    source: str = ""
    launch: str | None = None
    model: str = ""
    president_tx: int | None = None  # bytes the president's NIC sent (the record's "nic")

    def __post_init__(self):
        self.model = self.model or self.method

    @property
    def key(self) -> tuple:
        """The repeated runs of one configuration in one record: bytes to two significant
        figures (archives differ by a few bytes from run to run), and for a sync to no
        more targets than towns (all mayors) the shape's nodes do not matter. Records
        stay apart, so that a point left out of the fit leaves the other records' runs
        of its configuration to predict it."""
        shape = _shape_key(self.cluster)
        if self.workload == "sync" and self.hosts <= (self.cluster.get("towns") or 0):
            shape = shape[:1] + (None,) + shape[2:]
        # a "changed" sync is one configuration (5% of the files changed) whose bytes are
        # the random mutation's outcome: its runs pool whatever they changed
        nbytes = None if self.scenario == "changed" else _round2(self.bytes)
        return (self.workload, self.method, self.launch, self.hosts, nbytes, self.files,
                self.scenario, shape, self.source)


def fit_key(method: str, launch: str | None, scenario: str | None) -> str:
    """The host-cost group: "chain", "chain@service", "mpisync/full", ..."""
    return method + (f"@{launch}" if launch else "") + (f"/{scenario}" if scenario else "")


def _round2(x: int) -> int:
    if x <= 0:
        return 0
    e = 10 ** max(0, int(math.log10(x)) - 1)
    return int(round(x / e) * e)


def _shape_key(c: dict) -> tuple:
    return (c.get("towns"), c.get("nodes_per_town"), c.get("node_bps"), c.get("mayor_bps"),
            c.get("uplink_bps") or c.get("mayor_bps"))


def _stage_method(run: dict) -> tuple[str, str, int | None] | None:
    """(measured name, model, fan-out) of a stage run; None without a model."""
    m = run.get("method")
    if m == "transit":
        return "transit", "transit", None
    if m == "mpi":
        alg = run.get("algorithm") or "chain"
        return alg, alg, None
    if m in _PEERS:
        model, fan = _PEERS[m]
        if fan is None:
            from legacy_transit.peers import tree_width

            fan = tree_width(int(run["nodes"]))
        return m, model, fan
    return None


def files_for(run: dict, full_bytes: dict[int, int]) -> int:
    """Files of a sync run's repository: recorded, or from the repository's bytes (its
    full run at the same target count, else this run's) at the suites' 3,000 per 150 MiB."""
    if run.get("files"):
        return int(run["files"])
    n = int(run["targets"])
    size = full_bytes.get(n) or int(run.get("changed_bytes") or 0)
    return max(1, round(size * FILES_PER_BYTE)) if size else 3000


def points_from_records(records: list[dict]) -> tuple[list[Point], list[dict]]:
    """(points to predict, runs not modelled) from testbed records; failed and skipped
    runs are left out (a failure's time says nothing about the network)."""
    points, skipped = [], []
    for rec in records:
        c = rec.get("cluster") or {}
        if c.get("kind") != "testbed" or not c.get("node_bps"):
            continue
        # older records held every workload of a run under the staging site's cluster;
        # their syncs ran on a site of their own (bench.sites.sync_shape)
        mixed = any(r.get("workload") in ("stage", "collect") for r in rec.get("runs", []))
        full = {int(r["targets"]): int(r.get("changed_bytes") or 0)
                for r in rec.get("runs", [])
                if r.get("workload") == "sync" and r.get("scenario") == "full"}
        for run in rec.get("runs", []):
            p = (_point(run, c, rec.get("_file", ""), full, mixed) if run.get("ok")
                 else None)
            if p is None:
                skipped.append({"workload": run.get("workload"), "method": run.get("method"),
                                "why": "no model" if run.get("ok") else "failed run",
                                "source": rec.get("_file", "")})
                continue
            points.append(p)
    return points, skipped


def _point(run: dict, c: dict, source: str, full: dict[int, int],
           mixed: bool) -> Point | None:
    launch = "service" if run.get("launch") == "service" else None
    if run.get("workload") == "stage":
        got = _stage_method(run)
        if got is None:
            return None
        name, model, fan = got
        return Point("stage", name, int(run["nodes"]),
                     int(run.get("archive_bytes") or run["size_bytes"]),
                     float(run["seconds"]), c, source=source, launch=launch, model=model,
                     fanout=fan, president_tx=_president_tx(run))
    if run.get("workload") == "sync":
        m = {"mpi": "mpisync", "rsync": "rsync"}.get(run.get("method"))
        if m is None:
            return None
        n = int(run["targets"])
        return Point("sync", m, n, int(run.get("changed_bytes") or 0),
                     float(run["seconds"]), _sync_cluster(c, n, mixed),
                     files=files_for(run, full),
                     scenario=run.get("scenario"), fanout=max(1, n), source=source,
                     launch=launch, president_tx=_president_tx(run))
    return None


def _president_tx(run: dict) -> int | None:
    """Bytes the president sent during the run (bench's per-NIC counters), or None."""
    got = (run.get("nic") or {}).get("president_tx")
    return int(got) if got is not None else None


def _sync_cluster(c: dict, targets: int, mixed: bool) -> dict:
    """The site a sync run was measured on: its record's (one record per site), or in an
    older record that also holds staging runs the shape the bench brought up for
    synchronisation (``sites.sync_shape``: mayors first)."""
    from ..bench.sites import sync_shape

    towns = c.get("towns") or 0
    if not mixed and towns * (1 + (c.get("nodes_per_town") or 0)) >= targets:
        return c
    towns, per = sync_shape(targets)
    return {**c, "towns": towns, "nodes_per_town": per}


def topology_for(cluster: dict) -> str:
    """The TOML of the testbed a record was measured on."""
    from topology.generate import generated_topology_toml

    return generated_topology_toml(int(cluster["towns"]), int(cluster["nodes_per_town"]),
                                   float(cluster["node_bps"]), float(cluster["mayor_bps"]),
                                   name=str(cluster.get("name") or "testbed"),
                                   uplink_bps=float(cluster.get("uplink_bps")
                                                    or cluster["mayor_bps"]))


def _features(hosts: float, gb: float) -> list[float]:
    return [1.0, hosts, hosts * gb, hosts * hosts]


def host_seconds(coef, hosts: int, nbytes: int) -> float:
    """``a + b x hosts + c x hosts x GB + d x hosts^2`` seconds (coef: 2 to 4 numbers)."""
    c = list(coef) + [0.0] * (4 - len(coef))
    return sum(x * y for x, y in zip(c, _features(hosts, nbytes / 1e9)))


def _nnls(rows: list[list[float]], ys: list[float], cols: list[int],
          most: int) -> list[float]:
    """Least squares of rows . x = ys with x >= 0 over the columns ``cols`` (every subset
    of at most ``most`` of them tried: a handful of columns), the others 0."""
    import numpy as np

    best, best_x = None, [0.0] * 4
    for k in range(1, min(most, len(cols)) + 1):
        for sub in itertools.combinations(cols, k):
            a = np.array([[r[j] for j in sub] for r in rows])
            x, *_ = np.linalg.lstsq(a, np.array(ys), rcond=None)
            if (x < -1e-12).any():
                continue
            res = float(((a @ x - np.array(ys)) ** 2).sum())
            if best is None or res < best * (1 - 1e-9) - 1e-15:  # fewer columns on ties
                best, best_x = res, [0.0] * 4
                for j, v in zip(sub, x):
                    best_x[j] = max(0.0, float(v))
    return best_x


def fit_host_costs(samples: dict[str, list[tuple]]
                   ) -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """Per fit group, host costs ``a + b x hosts + c x hosts x GB + d x hosts^2`` (seconds,
    all >= 0; ``d`` only for fresh-mpiexec groups, see below).

    ``samples``: {group: [(hosts, residual seconds[, measured seconds[, bytes]]), ...]},
    residual = measured - simulated network time. Least squares of the residual relative
    to the measured time (so a 3 s point counts as much as a 50 s one), non-negative, with
    no more columns than the group has distinct host counts (one host count: a constant).
    The hosts column enters when the hosts vary; the GB column when the bytes vary too and
    there are more than three points; hosts^2 in groups of MPI methods started by a fresh
    mpiexec (no "@" in the group name), whose ranks start on the testbed's two shared
    cores while the ones already up poll for their first message. Returns ({group:
    (a, b, c, d)}, a note per group)."""
    fits, notes = {}, []
    for m, pts in sorted(samples.items()):
        full = [(float(p[0]), float(p[1]), float(p[2]) if len(p) > 2 else 1.0,
                 float(p[3]) if len(p) > 3 else 0.0) for p in pts]
        hosts = {h for h, *_ in full}
        sizes = {b for *_, b in full}
        cols = [0]
        if len(hosts) > 1:
            cols.append(1)
            if len(sizes) > 1 and len(full) > 3:
                cols.append(2)
            if "@" not in m and m.split("/")[0] in _MPI_FRESH:
                cols.append(3)
        rows = [[x / (meas or 1.0) for x in _features(h, b / 1e9)] for h, _, meas, b in full]
        ys = [r / (meas or 1.0) for _, r, meas, _ in full]
        coef = _nnls(rows, ys, cols, len(hosts))
        fits[m] = tuple(round(v, 6) for v in coef)
        a, b, c, d = coef
        counts = ", ".join(str(int(h)) for h in sorted(hosts))
        terms = [f"{a:.3f} s"] + [t for v, t in ((b, f"{b:.4f} s/host"),
                                                  (c, f"{c:.3f} s/(host GB)"),
                                                  (d, f"{d:.5f} s/host^2")) if v]
        notes.append(f"{m}: host costs {' + '.join(terms)}, least squares over "
                     f"{len(full)} point(s) at {counts} hosts"
                     + (" (one host count: a constant)" if len(hosts) == 1 else ""))
    return fits, notes


def fit_with_load(points: list[dict], rounds: int = 6
                  ) -> tuple[dict[str, tuple[float, ...]], dict[str, float], list[str]]:
    """Host costs per fit group and a load factor per record, fitted together.

    ``points``: [{"group", "source", "hosts", "bytes", "measured", "residual"}] (residual
    = measured - simulated network seconds). On the testbed every emulated host shares
    the machine's two cores, so a record taken while other work saturated them has all
    its host costs larger by about one factor (the README's quiet and saturated service
    runs: 30-45% apart on the same points): predicted host seconds = the record's factor
    x its group's ``a + b x hosts + ...`` (``fit_host_costs``). Alternating least
    squares of the relative error: the groups fitted to residuals divided by their
    record's factor, then each record's factor to its points given the groups' costs,
    normalised to a geometric mean of 1.
    (A factor per runnable process count, 1 + load / max(processes, cores), was tried
    and fitted worse: rsync's 64 sessions are not all runnable at once.)
    Returns (fits, {source: factor}, notes)."""
    load = {p["source"]: 1.0 for p in points}
    fits: dict = {}
    notes: list[str] = []
    for _ in range(rounds):
        samples: dict[str, list[tuple]] = {}
        for p in points:
            f = load[p["source"]]
            samples.setdefault(p["group"], []).append(
                (p["hosts"], p["residual"] / f, p["measured"] / f, p["bytes"]))
        fits, notes = fit_host_costs(samples)
        for src in load:  # least squares of the relative error: residual = factor x g
            num = den = 0.0
            for p in points:
                if p["source"] == src:
                    x = host_seconds(fits[p["group"]], p["hosts"], p["bytes"]) / p["measured"]
                    num += x * p["residual"] / p["measured"]
                    den += x * x
            if den:
                load[src] = max(0.2, min(5.0, num / den))
        g = math.exp(sum(math.log(v) for v in load.values()) / len(load))
        load = {k: v / g for k, v in load.items()}
    return fits, load, notes
