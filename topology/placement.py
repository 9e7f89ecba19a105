"""Rank placement: which host each MPI rank runs on, ordered so a chain crosses each link once."""

from __future__ import annotations

from dataclasses import dataclass

from chiba_admin.errors import TopologyError

from .model import Topology

__all__ = ["Placement", "place_ranks", "chain_order"]


@dataclass(frozen=True)
class Placement:
    """``hosts[r]`` is the host of rank ``r``; ``root`` the rank holding the source."""

    hosts: tuple[str, ...]
    root: int = 0

    def rank_of(self, host: str) -> int:
        return self.hosts.index(host)

    def by_host(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for r, h in enumerate(self.hosts):
            out.setdefault(h, []).append(r)
        return out


def chain_order(topo: Topology, hosts: list[str]) -> list[str]:
    """Hosts grouped town by town (mayors before their towns' nodes), president first."""
    order = {h.name: i for i, h in enumerate(topo.hosts())}
    unknown = [h for h in hosts if h not in topo]
    if unknown:
        raise TopologyError(f"unknown host(s) {', '.join(unknown)}", where=topo.source)

    def key(name: str):
        h = topo.host(name)
        if h.role == "president":
            return (0, "", 0, order[name])
        town = h.town if h.role == "node" else _town_of_mayor(topo, name)
        return (1, _town_rank(topo, town), 0 if h.role == "mayor" else 1, order[name])

    return sorted(dict.fromkeys(hosts), key=key)


def place_ranks(topo: Topology, hosts: list[str], root: str | None = None) -> Placement:
    """One rank per host, ordered by town; ``root`` (e.g. the president) becomes rank 0."""
    if not hosts and root is None:
        raise TopologyError("no hosts to place ranks on", hint="name at least one node")
    ordered = chain_order(topo, [h for h in hosts if h != root])
    if root is not None:
        topo.host(root)
        ordered = [root] + ordered
    return Placement(tuple(ordered), 0)


def _town_of_mayor(topo: Topology, mayor: str) -> str:
    towns = [t for t, m in topo.towns.items() if m == mayor]
    return min(towns, key=lambda t: _town_rank(topo, t)) if towns else ""


def _town_rank(topo: Topology, town: str) -> int:
    names = topo.town_names()
    return names.index(town) if town in names else len(names)
