"""The cluster model: hosts with roles and paths, links with bandwidth, as a networkx graph."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

import networkx as nx

from chiba_admin.errors import TopologyError

__all__ = [
    "PRESIDENT",
    "MAYOR",
    "NODE",
    "SSHSettings",
    "HostPaths",
    "Host",
    "Link",
    "Topology",
    "switch_of",
]

PRESIDENT = "president"
MAYOR = "mayor"
NODE = "node"


@dataclass(frozen=True)
class SSHSettings:
    """How to reach a host over SSH; ``host_key_policy`` is ``strict`` or ``accept-new``."""

    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    known_hosts: str | None = None
    host_key_policy: str = "strict"
    connect_timeout: float = 10.0
    config_file: str | None = None


@dataclass(frozen=True)
class HostPaths:
    """Host-side directories, as absolute paths seen on the host itself."""

    scratch: str = "/scratch"
    spool: str = "/var/spool/chiba"
    repository: str = "/opt/chiba/repo"
    # Extra roots under which ``--dest`` may point (besides scratch or the repository);
    # the topology file must list them explicitly (``dest_roots = ["/data"]``).
    dest_roots: tuple[str, ...] = ()

    def get(self, which: str) -> str:
        if which not in ("scratch", "spool", "repository"):
            raise KeyError(which)
        return getattr(self, which)


@dataclass(frozen=True)
class Host:
    """One machine of the cluster.

    ``root`` is empty for a real (or testbed) host; for the embedded cluster it is the
    local directory that stands for the host's ``/``, so ``local_path`` maps host paths.
    """

    name: str
    role: str
    town: str | None = None
    address: str | None = None
    ssh: SSHSettings = field(default_factory=SSHSettings)
    paths: HostPaths = field(default_factory=HostPaths)
    root: str = ""

    @property
    def scratch(self) -> str:
        return self.paths.scratch

    @property
    def spool(self) -> str:
        return self.paths.spool

    @property
    def repository(self) -> str:
        return self.paths.repository

    @property
    def connect_address(self) -> str:
        return self.address or self.name

    def local_path(self, host_path: str | os.PathLike) -> str:
        """Where a host path lives from this machine (identity unless embedded)."""
        p = str(host_path)
        if not self.root:
            return p
        rel = PurePosixPath(p)
        if rel.is_absolute():
            rel = rel.relative_to("/")
        return os.path.join(self.root, str(rel))

    def resolve(self, which: str, dest: str | None = None) -> str:
        """Host path for ``dest`` relative to the host's ``which`` directory.

        An absolute ``dest`` is taken as is; a relative one is joined to the
        scratch/spool/repository path, the rule every tool follows for ``--dest``.
        """
        base = self.paths.get(which)
        if dest is None or dest == "":
            return base
        if PurePosixPath(dest).is_absolute():
            return str(PurePosixPath(dest))
        return str(PurePosixPath(base) / dest)

    def environment(self) -> dict[str, str]:
        """The variables every command run on this host sees. ``CHIBA_DEST_ROOTS`` (its
        dest_roots, ``os.pathsep``-separated, maybe empty) and ``CHIBA_SCRATCH`` let the
        City Transit node agent refuse a destination root that is not the host's own."""
        return {
            "CHIBA_HOST": self.name,
            "CHIBA_ROLE": self.role,
            "CHIBA_TOWN": self.town or "",
            "CHIBA_SCRATCH": self.local_path(self.scratch),
            "CHIBA_SPOOL": self.local_path(self.spool),
            "CHIBA_REPO": self.local_path(self.repository),
            "CHIBA_DEST_ROOTS": os.pathsep.join(self.local_path(r)
                                                for r in self.paths.dest_roots),
        }


@dataclass(frozen=True)
class Link:
    """A network link: bandwidth in bits per second, latency in seconds.

    ``kind`` is ``"core"`` (president-mayor), ``"uplink"`` (a mayor's town-side NIC to its
    town's switch, shared by every copy the mayor sends into the town) or ``"town"`` (a
    node's NIC to its town's switch).
    """

    bandwidth: float
    latency: float = 0.0
    kind: str = "town"


def switch_of(town: str) -> str:
    """The graph vertex of ``town``'s switch (``"town1/switch"``; no host name has a ``/``).

    The paper's network: "the mayors ... are connected to them by Fast Ethernet": a town's
    nodes share their mayor's town-side link, so it is an edge of its own (mayor - switch)
    that routes and bottlenecks cross, distinct from each node's link (switch - node).
    """
    return f"{town}/switch"


class Topology:
    """A president, its mayors and their towns of nodes, with the links between them.

    The graph's vertices are host names with a ``host`` attribute; its edges carry a
    ``link`` attribute. Every query is pure.
    """

    def __init__(
        self,
        name: str,
        kind: str = "embedded",
        source: str | None = None,
        description: str = "",
        mpi: dict | None = None,
    ):
        self.name = name
        self.kind = kind
        self.source = source
        self.description = description
        self.mpi = dict(mpi or {})
        self.home: str | None = None  # the home file server; the president unless set
        self.state_dir: str | None = None  # embedded clusters: where host directories live
        self.graph: nx.Graph = nx.Graph()
        self.towns: dict[str, str] = {}  # town -> mayor
        self._town_nodes: dict[str, list[str]] = {}

    # construction -------------------------------------------------------------
    def add_host(self, host: Host) -> None:
        if host.name in self.graph:
            raise TopologyError(f"duplicate host {host.name!r}", where=self.source,
                                hint="each host name may appear once")
        self.graph.add_node(host.name, host=host)
        if host.role == NODE and host.town:
            self._town_nodes.setdefault(host.town, []).append(host.name)

    def add_town(self, town: str, mayor: str, uplink: Link | None = None) -> None:
        """Add ``town`` served by ``mayor``: its switch, linked to the mayor by ``uplink``.

        Without ``uplink`` the switch is linked when the first node is attached, at that
        node's rate (Chiba City: Fast Ethernet on both sides of the town switch).
        """
        self.towns[town] = mayor
        self._town_nodes.setdefault(town, [])
        self.graph.add_node(switch_of(town), switch=town)
        if uplink is not None:
            self.graph.add_edge(mayor, switch_of(town), link=uplink)

    def connect(self, a: str, b: str, link: Link) -> None:
        """Link two vertices; a mayor-to-node link goes through the node's town switch."""
        ha, hb = self.graph.nodes.get(a, {}).get("host"), self.graph.nodes.get(b, {}).get("host")
        if ha is not None and hb is not None and {ha.role, hb.role} == {MAYOR, NODE}:
            node = ha if ha.role == NODE else hb
            sw = switch_of(node.town)
            mayor = self.towns[node.town]
            if not self.graph.has_edge(mayor, sw):
                self.graph.add_edge(mayor, sw, link=Link(link.bandwidth, link.latency,
                                                         "uplink"))
            a, b = sw, node.name
        self.graph.add_edge(a, b, link=link)

    def with_root(self, root_for: "callable") -> "Topology":
        """A copy whose hosts have ``root`` set by ``root_for(host) -> str``."""
        t = Topology(self.name, self.kind, self.source, self.description, self.mpi)
        for name, data in self.graph.nodes(data=True):
            if "host" not in data:  # a town switch
                t.graph.add_node(name, **data)
                continue
            h = data["host"]
            t.graph.add_node(name, host=replace(h, root=root_for(h)))
        for a, b, data in self.graph.edges(data=True):
            t.graph.add_edge(a, b, **data)
        t.home = self.home
        t.state_dir = self.state_dir
        t.towns = dict(self.towns)
        t._town_nodes = {k: list(v) for k, v in self._town_nodes.items()}
        return t

    # queries ------------------------------------------------------------------
    def host(self, name: str) -> Host:
        try:
            return self.graph.nodes[name]["host"]
        except KeyError:
            raise TopologyError(f"unknown host {name!r}", where=self.source,
                                hint="see `chiba-admin topology show`") from None

    def __contains__(self, name: str) -> bool:
        return "host" in self.graph.nodes.get(name, {})

    def hosts(self, role: str | None = None) -> list[Host]:
        hs = [d["host"] for _, d in self.graph.nodes(data=True) if "host" in d]
        if role is not None:
            hs = [h for h in hs if h.role == role]
        return sorted(hs, key=_host_order(self))

    @property
    def president(self) -> Host:
        ps = self.hosts(PRESIDENT)
        if len(ps) != 1:
            raise TopologyError("a topology needs exactly one president", where=self.source)
        return ps[0]

    @property
    def home_server(self) -> Host:
        return self.host(self.home) if self.home else self.president

    @property
    def mayors(self) -> list[Host]:
        return self.hosts(MAYOR)

    @property
    def nodes(self) -> list[Host]:
        return self.hosts(NODE)

    def town_names(self) -> list[str]:
        return sorted(self.towns, key=_natural_key)

    def town_nodes(self, town: str) -> list[str]:
        if town not in self.towns:
            raise TopologyError(f"unknown town {town!r}", where=self.source)
        return sorted(self._town_nodes.get(town, []), key=_natural_key)

    def mayor_of(self, node: str) -> Host:
        h = self.host(node)
        if h.role == MAYOR:
            return h
        if h.role != NODE or h.town is None:
            raise TopologyError(f"{node} is the {h.role} and has no mayor")
        return self.host(self.towns[h.town])

    def towns_of(self, nodes: list[str]) -> dict[str, list[str]]:
        """Towns covering ``nodes``: town -> its nodes among them, in town order."""
        out: dict[str, list[str]] = {}
        for n in nodes:
            h = self.host(n)
            if h.role != NODE:
                continue
            out.setdefault(h.town, []).append(n)
        return {t: sorted(out[t], key=_natural_key) for t in sorted(out, key=_natural_key)}

    def link(self, a: str, b: str) -> Link:
        """The link between adjacent vertices; for a mayor and one of its nodes, the node's.

        (A mayor and its node are two hops apart, through the town switch; the node's own
        link is what callers asking for "the mayor-node link" have always meant. The
        mayor's town-side link is :meth:`town_uplink`.)
        """
        if not self.graph.has_edge(a, b):
            for x, y in ((a, b), (b, a)):
                h = self.graph.nodes.get(y, {}).get("host")
                if h is not None and h.role == NODE and self.towns.get(h.town) == x:
                    return self.graph.edges[switch_of(h.town), y]["link"]
        return self.graph.edges[a, b]["link"]

    def town_link(self, town: str) -> Link:
        """The link of ``town``'s first node (the town's node rate)."""
        return self.graph.edges[switch_of(town), self.town_nodes(town)[0]]["link"]

    def town_uplink(self, town: str) -> Link:
        """The mayor's town-side link to ``town``'s switch, shared by all the town's nodes."""
        return self.graph.edges[self.towns[town], switch_of(town)]["link"]

    def _vertex_path(self, a: str, b: str) -> list[str]:
        self.host(a), self.host(b)
        if a == b:
            return [a]
        return nx.shortest_path(self.graph, a, b)

    def path(self, a: str, b: str) -> list[str]:
        """Hosts on the route from ``a`` to ``b``, both included (switches left out)."""
        return [v for v in self._vertex_path(a, b) if v in self]

    def route(self, a: str, b: str) -> list[Link]:
        """The links a message from ``a`` to ``b`` crosses, in order (switch hops included)."""
        p = self._vertex_path(a, b)
        return [self.graph.edges[x, y]["link"] for x, y in zip(p, p[1:])]

    def bottleneck(self, a: str, b: str) -> float:
        """Smallest bandwidth (bits/s) on the route from ``a`` to ``b``; inf for a == b."""
        links = self.route(a, b)
        return min((lk.bandwidth for lk in links), default=float("inf"))

    def latency(self, a: str, b: str) -> float:
        """Sum of the latencies (seconds) on the route from ``a`` to ``b``."""
        return sum(lk.latency for lk in self.route(a, b))

    def uplink(self, name: str) -> Link:
        """The link that connects a host towards the president (its NIC's speed)."""
        h = self.host(name)
        if h.role == PRESIDENT:
            links = [self.link(name, m.name) for m in self.mayors]
            if not links:
                raise TopologyError("the president has no links")
            return max(links, key=lambda link: link.bandwidth)
        if h.role == MAYOR:
            return self.link(name, self.president.name)
        return self.graph.edges[switch_of(h.town), name]["link"]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "president": self.president.name,
            "mayors": len(self.mayors),
            "towns": len(self.towns),
            "nodes": len(self.nodes),
            "hosts": sum(1 for _, d in self.graph.nodes(data=True) if "host" in d),
        }


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _host_order(topo: Topology):
    rank = {PRESIDENT: 0, MAYOR: 1, NODE: 2}
    towns = {t: i for i, t in enumerate(sorted(topo.towns, key=_natural_key))}

    def key(h: Host):
        return (rank.get(h.role, 3), towns.get(h.town, -1) if h.role == NODE else 0,
                _natural_key(h.name))

    return key
