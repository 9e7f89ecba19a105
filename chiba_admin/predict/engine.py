"""SimGrid platforms from a Topology, and one driver actor that moves messages.

The platform: a star zone per town (the mayor's town-side link and every node's link are
the zone's star links, so a node-to-node message crosses the sender's link up and the
receiver's down), a star zone for the president (its NIC: the fastest of its core links,
``Topology.uplink``), and a star root whose children are those zones, each town attached
by its mayor's core link. Links are split-duplex (each direction its own capacity) and
routes are hierarchical, so a 10,000-node platform has O(hosts) routes.

SimGrid keeps one engine per process, so every simulation runs in a child process
(``run_in_child``) that reads a JSON job on stdin and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ChibaError, InvalidRequest

__all__ = ["SimgridMissing", "import_simgrid", "simgrid_available", "Calibration", "Sim",
           "run_in_child", "INSTALL_HINT", "require_simgrid"]

INSTALL_HINT = ("install SimGrid's Python bindings: `apt-get install python3-simgrid` "
                "as root (Debian/Ubuntu; `make` does it when run as root)")
# Where Debian installs python3-* packages; the venv does not see it by default.
_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


class SimgridMissing(InvalidRequest):
    """SimGrid's Python module cannot be imported (exit 2, with how to get it)."""


def import_simgrid():
    """The ``simgrid`` module, from the venv or Debian's dist-packages; SimgridMissing."""
    try:
        import simgrid  # noqa: F401
        return simgrid
    except ImportError:
        pass
    if os.path.isdir(_DIST_PACKAGES) and _DIST_PACKAGES not in sys.path:
        sys.path.append(_DIST_PACKAGES)  # appended: the venv's own packages stay first
    try:
        import simgrid
    except ImportError as e:
        raise SimgridMissing(f"SimGrid's Python module is not importable ({e})",
                             hint=INSTALL_HINT) from None
    return simgrid


def require_simgrid() -> None:
    """SimgridMissing unless ``simgrid`` can be found (without importing it here: SimGrid
    prints its configuration on import, and only child processes simulate)."""
    import importlib.util

    if importlib.util.find_spec("simgrid") is None:
        if os.path.isdir(_DIST_PACKAGES) and _DIST_PACKAGES not in sys.path:
            sys.path.append(_DIST_PACKAGES)
        if importlib.util.find_spec("simgrid") is None:
            raise SimgridMissing("SimGrid's Python module is not installed",
                                 hint=INSTALL_HINT)


def simgrid_available() -> str | None:
    """None when SimGrid imports in a child process, else the reason (for skips)."""
    code = ("import sys,os;d='" + _DIST_PACKAGES + "';"
            "os.path.isdir(d) and sys.path.append(d);import simgrid")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode == 0:
        return None
    return f"SimGrid's Python module is not importable; {INSTALL_HINT}"


@dataclass
class Calibration:
    """What turns a topology into predicted seconds.

    ``tcp_efficiency``: the share of one link's rate a long TCP stream gets (SimGrid's
    bandwidth factor, 0.97 by default in its LV08 model). SimGrid also charges each flow's
    ACKs (5% of its rate) to the reverse direction, so a host that sends and receives at
    once (a chain) gets about 0.92 of line rate each way, as measured on the testbed
    (0.94 for a chain of 64 KiB messages, mpitools/stage/driver.py ``SEGMENT``).
    ``latency_factor``: SimGrid's TCP slow-start correction on latency; 1 here because
    every tool streams over connections that stay open (MPI's, ssh's).
    ``disk_bps``: write rate (bits/s) of the president's and mayors' disks for City
    Transit's store-and-forward copies (None: not limiting, as tmpfs on the testbed);
    ``node_disk_bps`` the same for nodes unpacking.
    ``launch``/``exit``/``ssh``: per-host linear costs (a + b x hosts, seconds) for
    mpiexec start-up, mpiexec's exit, and one ssh session (connect + remote start).
    """

    tcp_efficiency: float = 0.97
    latency_factor: float = 1.0
    disk_bps: float | None = None
    node_disk_bps: float | None = None
    launch: tuple[float, float] = (0.6, 0.03)
    exit: tuple[float, float] = (0.2, 0.005)
    ssh: tuple[float, float] = (0.25, 0.0)
    rsync_file_s: float = 0.0005
    scan_file_s: float = 0.00005
    # method -> (a, b): the whole command's host costs (start-up, exit, per-file work)
    # as a + b x hosts, fitted to measured runs; replaces the per-phase defaults above
    host_fit: dict = field(default_factory=dict)
    source: str = "defaults"

    def cost(self, which: str, hosts: int) -> float:
        a, b = getattr(self, which)
        return a + b * hosts

    def to_dict(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        out["host_fit"] = {m: list(ab) for m, ab in self.host_fit.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        kw["host_fit"] = {m: tuple(ab) for m, ab in (d.get("host_fit") or {}).items()}
        return cls(**kw)


LINK_CLASSES = ("core", "uplink", "town")


class Sim:
    """A platform for ``hosts`` of ``topo`` and a driver actor on the president.

    Inside ``run(program)``, ``program(sim)`` starts messages with :meth:`send` (a callback
    when each arrives) and :meth:`loop` processes arrivals until none is in flight;
    :meth:`exchange` sends a set of messages and waits for all (a lock-step phase).
    Byte counts per link class are kept for every message (``bytes_by_class``), and the
    bytes each host sent (``tx_by_host``; the testbed records measure them per NIC).
    """

    def __init__(self, topo, hosts: list[str], calib: Calibration):
        sg = import_simgrid()
        self.sg = sg
        self.topo = topo
        self.calib = calib
        self.president = topo.president.name  # a Topology query sorts every host: once
        self._mayor = dict(topo.towns)
        self.engine = sg.Engine(["predict", "--log=root.thres:critical",
                                 "--log=xbt_cfg.thres:critical",
                                 f"--cfg=network/bandwidth-factor:{calib.tcp_efficiency}",
                                 f"--cfg=network/latency-factor:{calib.latency_factor}"])
        self.hosts: dict[str, object] = {}
        self._zone_of: dict[str, str] = {}
        self._classes: dict[tuple[str, str], tuple[str, ...]] = {}
        self._build(topo, set(hosts))
        self.bytes_by_class = {k: 0.0 for k in LINK_CLASSES}
        self.tx_by_host: dict[str, float] = {}  # bytes each host sent (its NIC's tx)
        self.messages = 0
        self._active: list = []
        self._done: list[Callable | None] = []

    # platform ---------------------------------------------------------------------------
    def _link(self, zone, name: str, link):
        lk = zone.create_split_duplex_link(name, float(link.bandwidth) / 8)  # bytes/s
        lk.set_latency(float(link.latency))
        lk.seal()
        return lk

    def _star(self, zone, host, link_obj):
        sg = self.sg
        up = sg.LinkInRoute(link_obj, sg.LinkInRoute.Direction.UP)
        zone.add_route(host.netpoint, None, None, None, [up], True)

    def _build(self, topo, wanted: set[str]) -> None:
        sg = self.sg
        root = sg.NetZone.create_star_zone("root")
        pres = topo.president
        pz = sg.NetZone.create_star_zone("president")
        pz.set_parent(root)
        ph = pz.create_host(pres.name, 1e9)
        self.hosts[pres.name] = ph
        # the president is its zone's gateway, so its NIC is its zone's link at the root
        # (a gateway's own star link would not be crossed on the way out of its zone)
        pz.seal()
        nic = self._link(root, f"{pres.name}-nic", topo.uplink(pres.name))
        root.add_route(pz.netpoint, None, ph.netpoint, None,
                       [sg.LinkInRoute(nic, sg.LinkInRoute.Direction.UP)], True)
        for town in topo.town_names():
            mayor = topo.towns[town]
            members = [n for n in topo.town_nodes(town) if n in wanted]
            if mayor not in wanted and not members:
                continue
            z = sg.NetZone.create_star_zone(town)
            z.set_parent(root)
            mh = z.create_host(mayor, 1e9)
            self.hosts[mayor] = mh
            self._star(z, mh, self._link(z, f"{town}-uplink", topo.town_uplink(town)))
            for n in members:
                h = z.create_host(n, 1e9)
                self.hosts[n] = h
                self._star(z, h, self._link(z, f"{n}-nic", topo.uplink(n)))
            z.seal()
            core = self._link(root, f"{mayor}-core", topo.link(pres.name, mayor))
            root.add_route(z.netpoint, None, mh.netpoint, None,
                           [sg.LinkInRoute(core, sg.LinkInRoute.Direction.UP)], True)
            for h in [mayor, *members]:
                self._zone_of[h] = town
        root.seal()

    def route_classes(self, a: str, b: str) -> tuple[str, ...]:
        """Link classes a message from ``a`` to ``b`` crosses (president NIC: "core")."""
        key = (a, b)
        got = self._classes.get(key)
        if got is not None:
            return got
        za, zb = self._zone_of.get(a), self._zone_of.get(b)

        def inside(h, z):  # from a host to its zone's mayor, as link classes
            return ["town", "uplink"] if h != self._mayor[z] else []

        if a == b:
            return ()
        if za is not None and za == zb:
            out = ((["town"] if a != self._mayor[za] else ["uplink"])
                   + (["town"] if b != self._mayor[zb] else ["uplink"]))
            self._classes[key] = tuple(out)
            return self._classes[key]
        out = inside(a, za) if za else ["core"]  # the president's NIC
        out += ["core"] if za else []
        out += ["core"] if zb else []
        out += inside(b, zb) if zb else ["core"]
        self._classes[key] = tuple(out)
        return self._classes[key]

    # messages -----------------------------------------------------------------------------
    def _count(self, a: str, b: str, size: float) -> None:
        self.messages += 1
        self.tx_by_host[a] = self.tx_by_host.get(a, 0.0) + size
        for k in self.route_classes(a, b):
            self.bytes_by_class[k] += size

    def send(self, a: str, b: str, size: float, then: Callable | None = None,
             rate: float | None = None) -> None:
        """Start a message of ``size`` bytes from host ``a`` to ``b`` (``rate``: bytes/s
        cap, e.g. the receiver's disk); ``then()`` runs when it has arrived."""
        self._count(a, b, size)
        if rate:
            c = self.sg.Comm.sendto_init(self.hosts[a], self.hosts[b])
            c.set_payload_size(int(max(1, size)))
            c.set_rate(float(rate))
            c.start()
        else:
            c = self.sg.Comm.sendto_async(self.hosts[a], self.hosts[b], int(max(1, size)))
        self._active.append(c)
        self._done.append(then)

    def discount(self, a: str, b: str, size: float) -> None:
        """Take ``size`` bytes from a to b off the counts (a scaled period that counted a
        whole message where the last one is shorter)."""
        self.tx_by_host[a] = self.tx_by_host.get(a, 0.0) - size
        for k in self.route_classes(a, b):
            self.bytes_by_class[k] -= size

    def start(self, a: str, b: str, size: float):
        """Start a message of ``size`` bytes from ``a`` to ``b`` and return its Comm, for
        an actor that waits on its own messages (:meth:`spawn`)."""
        self._count(a, b, size)
        return self.sg.Comm.sendto_async(self.hosts[a], self.hosts[b], int(max(1, size)))

    def spawn(self, name: str, host: str, fn: Callable[[], None]):
        """An actor running ``fn()`` on ``host`` (``join()`` waits for it): a host that
        forwards on its own, so that waiting stays per host (wait_any over every message
        of 10,000 hosts costs the whole list each time)."""
        return self.sg.Actor.create(name, self.hosts[host], fn)

    def loop(self) -> None:
        """Process arrivals (running their callbacks) until nothing is in flight."""
        wait_any = self.sg.Comm.wait_any
        while self._active:
            i = wait_any(self._active)
            self._active.pop(i)
            cb = self._done.pop(i)
            if cb is not None:
                cb()

    def exchange(self, msgs: list[tuple[str, str, float]]) -> None:
        """Send every (a, b, bytes) at once and wait for all of them (a lock-step phase)."""
        comms = []
        for a, b, size in msgs:
            self._count(a, b, size)
            comms.append(self.sg.Comm.sendto_async(self.hosts[a], self.hosts[b],
                                                   int(max(1, size))))
        if comms:
            self.sg.Comm.wait_all(comms)

    def scale_bytes(self, before: tuple[dict, dict], times: float) -> None:
        """Count the bytes sent since ``before`` (a :meth:`byte_marks`) ``times`` over: a
        period simulated once stands for ``times`` alike."""
        for counts, old in zip((self.bytes_by_class, self.tx_by_host), before):
            for k in counts:
                counts[k] = old.get(k, 0.0) + (counts[k] - old.get(k, 0.0)) * times

    def byte_marks(self) -> tuple[dict, dict]:
        """The byte counts now, for :meth:`scale_bytes`."""
        return dict(self.bytes_by_class), dict(self.tx_by_host)

    @property
    def clock(self) -> float:
        return self.sg.Engine.clock

    def run(self, program: Callable[["Sim"], dict]) -> dict:
        """Run ``program(sim)`` in a driver actor on the president; its result dict."""
        out: dict = {}

        def driver():
            out.update(program(self) or {})

        self.sg.Actor.create("driver", self.hosts[self.president], driver)
        self.engine.run()
        return out


# -- child processes ------------------------------------------------------------------------
def run_in_child(job: dict, timeout: float = 600) -> dict:
    """Run one simulation job in a fresh Python process; its result dict.

    ``job``: {"topology": TOML text, "method": name, ...model parameters}. Raises
    SimgridMissing (exit 2) without SimGrid, ChibaError (exit 1) when the child fails.
    """
    p = subprocess.run([sys.executable, "-m", "chiba_admin.predict.engine"],
                       input=json.dumps(job), capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 3:
        raise SimgridMissing("SimGrid's Python module is not importable", hint=INSTALL_HINT)
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise ChibaError(f"simulation of {job.get('method')} failed: {tail}",
                         where=job.get("source"), hint="rerun with --debug; report it")
    return json.loads(lines[-1])


def _child_main() -> int:
    from topology.loader import loads_topology

    from . import models

    job = json.loads(sys.stdin.read())
    try:
        import_simgrid()
    except SimgridMissing:
        return 3
    topo = loads_topology(job["topology"], job.get("source", "<topology>"))
    calib = Calibration.from_dict(job.get("calibration") or {})
    res = models.simulate(topo, job, calib)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)  # SimGrid's teardown of thousands of threads adds nothing


if __name__ == "__main__":
    sys.exit(_child_main())
