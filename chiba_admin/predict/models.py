"""Each method as it is implemented, as messages of the real sizes on a SimGrid platform.

``simulate(topo, job, calib)`` runs one (method, size, hosts) point and returns the
predicted whole-command time with its phases, throughput and bytes per link class. The
method modules: ``chain`` and ``bcast`` (mpitools/stage/ranks.py), ``transit``
(legacy_transit/transit.py), ``rsync`` (legacy_transit/rsync.py), ``mpisync``
(mpitools/sync/ranks.py + mpitools/common/chain.py), ``pdcp`` (pdsh's pdcp / clush --copy: a star
from the president with a fan-out window) and ``sbcast`` (Slurm's tree of slurmds).
"""

from __future__ import annotations

import math
import time

from .engine import Calibration, Sim

__all__ = ["STAGE_METHODS", "SYNC_METHODS", "METHODS", "HOST_PHASES", "simulate"]

# Phases that are costs on hosts (start-up, exit, ssh sessions, per-file work), not
# network time: added to the simulated time, and what a fit to measured runs replaces.
HOST_PHASES = frozenset({"launch", "exit", "ssh", "per_target", "scan", "cleanup"})

STAGE_METHODS = ("chain", "bcast", "transit", "pdcp", "sbcast")
SYNC_METHODS = ("mpisync", "rsync")
METHODS = STAGE_METHODS + SYNC_METHODS

# pdsh/pdcp and clush: a window of 32 (``-f``); City Transit and rsync use the same
# (legacy_transit/fanout.py DEFAULT_FANOUT).
FANOUT = 32
# sbcast: its message fan-out -F, 8 by default and at most (sbcast(1): "Maximum value is
# currently eight"; legacy_transit/peers.py); it moves the file in blocks, one block at a
# time down the tree (8 MiB: Slurm 22.05's default --size). Below the heads sbcast sends
# to, slurmds forward at slurm.conf's TreeWidth (50 by default; testbed/slurm.py keeps it).
SBCAST_WIDTH = 8
SBCAST_BLOCK = 8 << 20
SLURM_TREE_WIDTH = 50
TOP_SENDERS = 8  # hosts listed in a result's "top_senders"


def _result(job, topo, sim: Sim, seconds: float, phases: dict, receivers: int,
            nbytes: int, **extra) -> dict:
    per = nbytes * 8 / seconds if seconds > 0 else 0.0
    return {"method": job["method"], "hosts": receivers, "bytes": nbytes,
            "seconds": seconds, "phases": phases, "per_node_bps": per,
            "aggregate_bps": per * receivers,
            "bytes_by_class": {k: round(v) for k, v in sim.bytes_by_class.items()},
            "president_tx": round(sim.tx_by_host.get(topo.president.name, 0.0)),
            # the hosts that sent most (bytes): a tree's heads, a chain's every hop
            "top_senders": {h: round(b) for h, b in sorted(
                sim.tx_by_host.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_SENDERS]},
            "messages": sim.messages, **extra}


def simulate(topo, job: dict, calib: Calibration) -> dict:
    """One prediction. ``job``: method, hosts (targets), bytes, and per-method options
    (chunk, segment, fanout, files). Returns the result dict (see module doc)."""
    from . import transfer

    t0 = time.monotonic()
    fn = getattr(transfer, job["method"])
    hosts = list(job["hosts"])
    sim = Sim(topo, hosts + [topo.president.name], calib)
    res = sim.run(lambda s: fn(s, topo, job, calib))
    phases = res.pop("phases")
    res.pop("seconds")
    fit = _fitted(calib, job)
    if fit is not None:  # measured host costs replace the default per-phase ones
        from .calibrate import host_seconds

        phases = {k: v for k, v in phases.items() if k not in HOST_PHASES}
        phases["host"] = host_seconds(fit, len(hosts), int(job["bytes"]))
    out = _result(job, topo, sim, sum(phases.values()), phases, len(hosts),
                  int(job["bytes"]), **res)
    out["wall_seconds"] = round(time.monotonic() - t0, 3)
    return out


def _fitted(calib: Calibration, job: dict):
    """The fitted host costs for a job: its own group ("fit_group"), else the method's
    (a sync without a scenario: "full" when bytes change, else "nochange")."""
    fits, m = calib.host_fit, job["method"]
    for key in (job.get("fit_group"), m,
                f"{m}/{'full' if job.get('bytes') else 'nochange'}" if m in SYNC_METHODS
                else None):
        if key and key in fits:
            return fits[key]
    return None


def windows(n: int, fanout: int) -> int:
    """Rounds of a sliding window of ``fanout`` over ``n`` hosts (at least one)."""
    return max(1, math.ceil(n / max(1, fanout)))
