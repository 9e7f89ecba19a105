"""Pure planning of a namespace testbed: names, addresses, wiring, routes and tc commands."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chiba_admin.errors import InvalidRequest, TestbedError
from topology import MAYOR, NODE, PRESIDENT, Topology
from topology.generate import generated_topology_toml  # noqa: F401 (re-exported)

__all__ = [
    "NicPlan", "HostPlan", "TestbedPlan", "plan_testbed", "choose_octet", "new_testbed_id",
    "switch_batch", "host_batch", "tc_batch", "switch_tc_batch", "host_sysctls",
    "tbf_args", "generated_topology_toml", "plan_from_dict", "MOUNT_KINDS", "TBF_MIN_BURST",
]

# Which topology paths each host gets privately (bind-mounted from its data dir).
MOUNT_KINDS = ("scratch", "spool", "repository")
# A tbf bucket under 64 KiB starves veth links that carry 64 KiB GSO super-packets.
TBF_MIN_BURST = 64 * 1024
# Queue depth of each shaped NIC, as time at line rate; long enough for TCP to fill the pipe.
_TBF_LATENCY_MS = 50
_OCTETS = range(200, 251)
_SWITCH = "switch"
# Paths a testbed must never bind over, even inside its own mount namespace.
_FORBIDDEN_MOUNTS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run",
                     "/sbin", "/sys", "/usr", "/var", "/tmp", "/root", "/home", "/opt"}


@dataclass(frozen=True)
class NicPlan:
    """One NIC of a host: its name inside the host, its switch port and its shaping."""

    ifname: str          # inside the host's namespace (eth0, eth1)
    port: str            # the veth peer inside the switch namespace
    bridge: str          # the switch-namespace bridge the port joins
    address: str         # e.g. 10.211.1.3
    prefixlen: int
    rate_bps: float      # shaped in both directions (host egress and port egress)
    network: str         # "core" or the town's name


@dataclass(frozen=True)
class HostPlan:
    """One emulated host: its namespace, NICs, routes, private mounts and data dir."""

    name: str
    role: str
    town: str | None
    ns: str
    nics: tuple[NicPlan, ...]
    routes: tuple[tuple[str, str], ...]   # (destination CIDR, gateway)
    forward: bool
    mounts: tuple[tuple[str, str], ...]   # (host path, data dir on the real root fs)

    @property
    def address(self) -> str:
        """The host's primary address: its core NIC for president/mayors, else its town NIC."""
        return self.nics[0].address


@dataclass(frozen=True)
class TestbedPlan:
    """Everything `up` will create, as data; `down` needs only the saved state."""

    __test__ = False  # not a pytest test class

    id: str
    prefix: str             # namespace name prefix, "chiba-<id>-"
    subnet: str             # e.g. 10.211.0.0/16, the only addresses the testbed uses
    switch_ns: str
    bridges: tuple[str, ...]
    hosts: tuple[HostPlan, ...]
    state: str
    core_bps: float
    town_bps: dict[str, float] = field(default_factory=dict)
    uplink_bps: dict[str, float] = field(default_factory=dict)  # mayor's town-side NIC

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InvalidRequest(f"unknown testbed host {name!r}",
                         hint="see `chiba-admin testbed status` for the host names")

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns] + [h.ns for h in self.hosts]

    def to_dict(self) -> dict:
        return asdict(self)


def new_testbed_id(taken: set[str], rng: random.Random | None = None) -> str:
    """A 4-hex-digit id whose namespace prefix is not in use (``taken`` holds ids)."""
    rng = rng or random.Random()
    for _ in range(1000):
        tid = f"{rng.randrange(16**4):04x}"
        if tid not in taken:
            return tid
    raise InvalidRequest("no free testbed id", hint="remove old chiba-* namespaces")


def choose_octet(used: list[str], rng: random.Random | None = None) -> int:
    """Second octet X in 200-250 such that 10.X.0.0/16 overlaps none of ``used`` (CIDRs)."""
    rng = rng or random.Random()
    nets = []
    for u in used:
        try:
            nets.append(ipaddress.ip_network(u, strict=False))
        except ValueError:
            continue
    free = [x for x in _OCTETS
            if not any(n.version == 4 and n.prefixlen > 0
                       and n.overlaps(ipaddress.ip_network(f"10.{x}.0.0/16")) for n in nets)]
    if not free:
        raise TestbedError("no free 10.X.0.0/16 range (X in 200-250) for the testbed",
                           hint="the host routes cover them all; free one and retry")
    return rng.choice(free)


def plan_testbed(topo: Topology, tid: str, octet: int, state: str | Path, *,
                 node_bps: float | None = None, mayor_bps: float | None = None,
                 uplink_bps: float | None = None) -> TestbedPlan:
    """Plan namespaces, NICs, addresses and routes for ``topo``.

    Core network 10.X.0.0/24 (president .1, mayor k .(1+k)); town k gets 10.X.k.0/24 with
    nodes at .1.. and its mayor at .254. Every node NIC runs at its town's bandwidth; each
    mayor's town-side NIC at the town's uplink rate (the topology's, by default the node
    rate as on Chiba City: docs/design.md, "The network"). ``node_bps``, ``mayor_bps`` (the
    core) and ``uplink_bps`` override the topology's rates (bits/s); an ``uplink_bps``
    equal to ``mayor_bps`` is the "fat mayors" shape.
    """
    prefix = f"chiba-{tid}-"
    state = str(state)
    towns = topo.town_names()
    if len(towns) > 250:
        raise InvalidRequest(f"{len(towns)} towns; the testbed supports at most 250")
    for t in towns:
        if len(topo.town_nodes(t)) > 253:
            raise InvalidRequest(f"town {t} has {len(topo.town_nodes(t))} nodes; at most 253")
    if _SWITCH in topo:
        raise InvalidRequest(f"a host is named {_SWITCH!r}, which the testbed's switch uses",
                         where=topo.source, hint="rename that host")
    pres = topo.president
    core_bps = mayor_bps or topo.link(pres.name, topo.mayors[0].name).bandwidth
    base = f"10.{octet}"
    mayor_core: dict[str, str] = {}
    town_of_mayor: dict[str, int] = {}
    town_bps: dict[str, float] = {}
    up_bps: dict[str, float] = {}
    for k, t in enumerate(towns, start=1):
        m = topo.towns[t]
        town_of_mayor.setdefault(m, k)
        town_bps[t] = node_bps or topo.town_link(t).bandwidth
        up_bps[t] = uplink_bps or (node_bps if node_bps else topo.town_uplink(t).bandwidth)
    for i, m in enumerate(topo.mayors, start=1):
        mayor_core[m.name] = f"{base}.0.{i + 1}"
    town_nets = {t: f"{base}.{k}.0/24" for k, t in enumerate(towns, start=1)}
    town_gw = {t: f"{base}.{k}.254" for k, t in enumerate(towns, start=1)}

    hosts: list[HostPlan] = []
    for idx, h in enumerate(topo.hosts()):
        mounts = _mounts(h, state)
        ns = prefix + h.name
        if h.role == PRESIDENT:
            nics = (NicPlan("eth0", f"c{idx}", "br0", f"{base}.0.1", 24, core_bps, "core"),)
            routes = tuple((town_nets[t], mayor_core[topo.towns[t]]) for t in towns)
            hosts.append(HostPlan(h.name, h.role, None, ns, nics, routes, False, mounts))
        elif h.role == MAYOR:
            served = [t for t in towns if topo.towns[t] == h.name]
            nics = [NicPlan("eth0", f"c{idx}", "br0", mayor_core[h.name], 24, core_bps,
                            "core")]
            for j, t in enumerate(served):
                k = towns.index(t) + 1
                nics.append(NicPlan(f"eth{j + 1}", f"t{idx}x{j}", f"br{k}", town_gw[t], 24,
                                    up_bps[t], t))
            routes = tuple((town_nets[t], mayor_core[topo.towns[t]]) for t in towns
                           if topo.towns[t] != h.name)
            hosts.append(HostPlan(h.name, h.role, None, ns, tuple(nics), routes, True,
                                  mounts))
        elif h.role == NODE:
            k = towns.index(h.town) + 1
            j = topo.town_nodes(h.town).index(h.name) + 1
            nics = (NicPlan("eth0", f"n{idx}", f"br{k}", f"{base}.{k}.{j}", 24,
                            town_bps[h.town], h.town),)
            routes = ((f"{base}.0.0/16", town_gw[h.town]),)
            hosts.append(HostPlan(h.name, h.role, h.town, ns, nics, routes, False, mounts))
    bridges = ("br0",) + tuple(f"br{k}" for k in range(1, len(towns) + 1))
    return TestbedPlan(tid, prefix, f"{base}.0.0/16", prefix + _SWITCH, bridges,
                       tuple(hosts), state, core_bps, town_bps, up_bps)


def _mounts(h, state: str) -> tuple[tuple[str, str], ...]:
    out = []
    for kind in MOUNT_KINDS:
        p = h.paths.get(kind)
        if p.rstrip("/") in _FORBIDDEN_MOUNTS or p.rstrip("/") == "":
            raise InvalidRequest(f"{kind} path {p!r} of {h.name} would hide a system directory",
                             hint="use a dedicated path such as /scratch")
        out.append((p, f"{state}/hosts/{h.name}/data/{kind}"))
    return tuple(out)


def switch_batch(plan: TestbedPlan) -> list[str]:
    """`ip -batch` lines run in the switch namespace: bridges, veth pairs, ports."""
    lines = []
    for br in plan.bridges:
        lines.append(f"link add {br} type bridge stp_state 0 forward_delay 0")
        lines.append(f"link set {br} up")
    for h in plan.hosts:
        for nic in h.nics:
            # creating the pair here and sending the peer straight into the host's
            # namespace means no interface ever appears in the machine's own namespace
            lines.append(f"link add {nic.port} type veth peer name {nic.ifname} "
                         f"netns {h.ns}")
            lines.append(f"link set {nic.port} master {nic.bridge} up")
    return lines


def host_batch(h: HostPlan) -> list[str]:
    """`ip -batch` lines run in a host's namespace: addresses, links up, routes."""
    lines = ["link set lo up"]
    for nic in h.nics:
        lines.append(f"addr add {nic.address}/{nic.prefixlen} dev {nic.ifname}")
        lines.append(f"link set {nic.ifname} up")
    for dst, gw in h.routes:
        lines.append(f"route add {dst} via {gw}")
    return lines


def tbf_args(rate_bps: float) -> str:
    """tbf parameters for ``rate_bps``: a burst of at least 64 KiB (or 10 ms at rate)."""
    burst = max(TBF_MIN_BURST, int(rate_bps / 8 / 100))
    return f"tbf rate {int(rate_bps)}bit burst {burst} latency {_TBF_LATENCY_MS}ms"


def tc_batch(h: HostPlan) -> list[str]:
    """`tc -batch` lines shaping the host side (host -> network) of each NIC."""
    return [f"qdisc replace dev {n.ifname} root {tbf_args(n.rate_bps)}" for n in h.nics]


def switch_tc_batch(plan: TestbedPlan) -> list[str]:
    """`tc -batch` lines shaping the switch side (network -> host) of every NIC."""
    return [f"qdisc replace dev {n.port} root {tbf_args(n.rate_bps)}"
            for h in plan.hosts for n in h.nics]


def host_sysctls(h: HostPlan | None) -> list[str]:
    """sysctl assignments for a host (None: the switch); IPv6 off keeps counters clean."""
    out = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    if h is not None:
        out.append(f"net.ipv4.ip_forward={1 if h.forward else 0}")
    return out


def plan_from_dict(d: dict) -> TestbedPlan:
    """The TestbedPlan saved in a state file (inverse of ``TestbedPlan.to_dict``)."""
    hosts = tuple(
        HostPlan(h["name"], h["role"], h["town"], h["ns"],
                 tuple(NicPlan(**n) for n in h["nics"]),
                 tuple(tuple(r) for r in h["routes"]), h["forward"],
                 tuple(tuple(m) for m in h["mounts"]))
        for h in d["hosts"])
    return TestbedPlan(d["id"], d["prefix"], d["subnet"], d["switch_ns"], tuple(d["bridges"]),
                       hosts, d["state"], d["core_bps"], dict(d.get("town_bps", {})),
                       dict(d.get("uplink_bps", {})))
