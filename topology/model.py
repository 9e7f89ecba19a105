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
    "ROLES",
    "SSHSettings",
    "HostPaths",
    "Host",
    "Link",
    "Topology",
]

PRESIDENT = "president"
MAYOR = "mayor"
NODE = "node"
ROLES = (PRESIDENT, MAYOR, NODE)


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
        """The variables every command run on this host sees."""
        return {
            "CHIBA_HOST": self.name,
            "CHIBA_ROLE": self.role,
            "CHIBA_TOWN": self.town or "",
            "CHIBA_SCRATCH": self.local_path(self.scratch),
            "CHIBA_SPOOL": self.local_path(self.spool),
            "CHIBA_REPO": self.local_path(self.repository),
        }


@dataclass(frozen=True)
class Link:
    """A network link: bandwidth in bits per second, latency in seconds."""

    bandwidth: float
    latency: float = 0.0
    kind: str = "town"  # "core" (president-mayor) or "town" (mayor-node)


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

    def add_town(self, town: str, mayor: str) -> None:
        self.towns[town] = mayor
        self._town_nodes.setdefault(town, [])

    def connect(self, a: str, b: str, link: Link) -> None:
        self.graph.add_edge(a, b, link=link)

    def with_root(self, root_for: "callable") -> "Topology":
        """A copy whose hosts have ``root`` set by ``root_for(host) -> str``."""
        t = Topology(self.name, self.kind, self.source, self.description, self.mpi)
        for name, data in self.graph.nodes(data=True):
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
        return name in self.graph

    def hosts(self, role: str | None = None) -> list[Host]:
        hs = [d["host"] for _, d in self.graph.nodes(data=True)]
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
        return self.graph.edges[a, b]["link"]

    def path(self, a: str, b: str) -> list[str]:
        """Hosts on the route from ``a`` to ``b``, both included."""
        self.host(a), self.host(b)
        if a == b:
            return [a]
        return nx.shortest_path(self.graph, a, b)

    def bottleneck(self, a: str, b: str) -> float:
        """Smallest bandwidth (bits/s) on the route from ``a`` to ``b``; inf for a == b."""
        p = self.path(a, b)
        if len(p) < 2:
            return float("inf")
        return min(self.link(x, y).bandwidth for x, y in zip(p, p[1:]))

    def latency(self, a: str, b: str) -> float:
        p = self.path(a, b)
        return sum(self.link(x, y).latency for x, y in zip(p, p[1:]))

    def uplink(self, name: str) -> Link:
        """The link that connects a host towards the president (its NIC's speed)."""
        h = self.host(name)
        if h.role == PRESIDENT:
            links = [self.link(name, m.name) for m in self.mayors]
            if not links:
                raise TopologyError("the president has no links")
            return max(links, key=lambda l: l.bandwidth)
        parent = self.president.name if h.role == MAYOR else self.towns[h.town]
        return self.link(name, parent)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "president": self.president.name,
            "mayors": len(self.mayors),
            "towns": len(self.towns),
            "nodes": len(self.nodes),
            "hosts": self.graph.number_of_nodes(),
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
