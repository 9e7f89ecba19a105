"""NIC byte counters of every testbed host, and snapshot differences for benchmarks."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import system
from .configs import Layout
from .state import State, proc_alive

__all__ = ["counters", "Snapshot", "snapshot", "measure", "Measurement", "diff_counters",
           "infrastructure_bytes"]

Counters = dict[str, dict]


def _state_of(state) -> State:
    if isinstance(state, State):
        return state
    if hasattr(state, "state") and not isinstance(state, (str, Path)):
        state = state.state  # a Testbed handle
    return State.load(Layout(Path(state)).state_file)


def _read_sys(holder_pid: int, ifname: str) -> tuple[int, int]:
    # /proc/PID/root resolves in that process's mount namespace, whose /sys was mounted
    # for the host's network namespace: a plain read, no process per host
    base = f"/proc/{holder_pid}/root/sys/class/net/{ifname}/statistics"
    with open(f"{base}/tx_bytes") as t, open(f"{base}/rx_bytes") as r:
        return int(t.read()), int(r.read())


def _read_ip(ns: str) -> dict[str, tuple[int, int]]:
    cp = system.run(["ip", "-n", ns, "-j", "-s", "link", "show"], check=False)
    out = {}
    try:
        for link in json.loads(cp.stdout or "[]"):
            s = link.get("stats64", {})
            out[link["ifname"]] = (s.get("tx", {}).get("bytes", 0),
                                   s.get("rx", {}).get("bytes", 0))
    except (ValueError, KeyError):
        pass
    return out


def counters(state) -> Counters:
    """``{host: {"tx_bytes", "rx_bytes", "nics": {ifname: {"tx_bytes", "rx_bytes"}}}}``.

    ``state`` is a state dir, a State or a Testbed. Host totals sum the host's NICs, so
    a mayor's totals count forwarded bytes once on the way in and once on the way out.
    """
    st = _state_of(state)
    out: Counters = {}
    for h in (st.data.get("plan") or {}).get("hosts", []):
        holder = st.proc("holders", h["name"])
        nics: dict[str, dict] = {}
        fallback = None
        for n in h["nics"]:
            try:
                if not proc_alive(holder):
                    raise OSError("holder gone")
                tx, rx = _read_sys(holder.pid, n["ifname"])
            except OSError:
                if fallback is None:
                    fallback = _read_ip(h["ns"])
                tx, rx = fallback.get(n["ifname"], (0, 0))
            nics[n["ifname"]] = {"tx_bytes": tx, "rx_bytes": rx, "network": n["network"]}
        out[h["name"]] = {"tx_bytes": sum(v["tx_bytes"] for v in nics.values()),
                          "rx_bytes": sum(v["rx_bytes"] for v in nics.values()),
                          "role": h["role"], "nics": nics}
    return out


def diff_counters(after: Counters, before: Counters) -> Counters:
    """Per host and NIC: ``after - before``."""
    out: Counters = {}
    for host, a in after.items():
        b = before.get(host, {"tx_bytes": 0, "rx_bytes": 0, "nics": {}})
        nics = {}
        for ifn, an in a.get("nics", {}).items():
            bn = b.get("nics", {}).get(ifn, {"tx_bytes": 0, "rx_bytes": 0})
            nics[ifn] = {"tx_bytes": an["tx_bytes"] - bn["tx_bytes"],
                         "rx_bytes": an["rx_bytes"] - bn["rx_bytes"],
                         "network": an.get("network")}
        out[host] = {"tx_bytes": a["tx_bytes"] - b["tx_bytes"],
                     "rx_bytes": a["rx_bytes"] - b["rx_bytes"], "role": a.get("role"),
                     "nics": nics}
    return out


def infrastructure_bytes(delta: Counters) -> dict[str, int]:
    """Bytes that crossed the president's and mayors' NICs (the paper's infrastructure load).

    ``president_tx``: bytes the president sent; ``mayors_town_tx``: bytes mayors sent into
    their towns; ``total``: tx+rx over every president and mayor NIC.
    """
    pres_tx = sum(v["tx_bytes"] for v in delta.values() if v.get("role") == "president")
    mayors_town_tx = sum(n["tx_bytes"] for v in delta.values() if v.get("role") == "mayor"
                         for n in v["nics"].values() if n.get("network") != "core")
    total = sum(v["tx_bytes"] + v["rx_bytes"] for v in delta.values()
                if v.get("role") in ("president", "mayor"))
    return {"president_tx": pres_tx, "mayors_town_tx": mayors_town_tx, "total": total}


@dataclass
class Snapshot:
    """Counters at one moment; ``snap2 - snap1`` is the traffic in between."""

    taken: float
    data: Counters

    def __sub__(self, other: "Snapshot") -> Counters:
        return diff_counters(self.data, other.data)


def snapshot(state) -> Snapshot:
    return Snapshot(time.monotonic(), counters(state))


@dataclass
class Measurement:
    """Filled in when a ``measure`` block ends: ``delta`` per host, ``seconds`` elapsed."""

    delta: Counters = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def infrastructure(self) -> dict[str, int]:
        return infrastructure_bytes(self.delta)


@contextmanager
def measure(state) -> Iterator[Measurement]:
    """``with measure(tb) as m: ...`` then ``m.delta[host]["tx_bytes"]``, ``m.seconds``."""
    m = Measurement()
    before = snapshot(state)
    try:
        yield m
    finally:
        after = snapshot(state)
        m.delta = after - before
        m.seconds = after.taken - before.taken
