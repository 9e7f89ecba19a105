"""Nodesets (``ccn[001-032,040]``, ``@town1``) resolved against a topology with ClusterShell."""

from __future__ import annotations

import re

from ClusterShell.NodeSet import NodeSet, NodeSetException
from ClusterShell.NodeUtils import GroupResolver, GroupSource

from chiba_admin.errors import NodeSetError

from .model import MAYOR, NODE, Topology

__all__ = ["groups", "resolver", "expand", "fold"]

_GROUP = re.compile(r"@(?:[\w.-]+:)?([\w.-]+)")


def groups(topo: Topology) -> dict[str, list[str]]:
    """Group name -> member hosts: all, nodes, mayors, president and every town."""
    g = {
        "all": [h.name for h in topo.hosts()],
        "nodes": [h.name for h in topo.hosts(NODE)],
        "mayors": [h.name for h in topo.hosts(MAYOR)],
        "president": [topo.president.name],
    }
    for t in topo.town_names():
        g[t] = topo.town_nodes(t)
    return g


def resolver(topo: Topology) -> GroupResolver:
    src = GroupSource("chiba", {k: ",".join(v) for k, v in groups(topo).items()})
    return GroupResolver(src)


def expand(topo: Topology, spec: str) -> list[str]:
    """Host names of ``spec`` in topology order; unknown hosts or groups are an error."""
    if not spec or not spec.strip():
        raise NodeSetError("empty nodeset", hint="name hosts like ccn[001-004] or @nodes")
    known = groups(topo)
    bad_groups = sorted({m.group(1) for m in _GROUP.finditer(spec)} - set(known))
    if bad_groups:
        raise NodeSetError(f"unknown group(s) {', '.join('@' + b for b in bad_groups)}",
                           where=topo.source,
                           hint="groups: " + ", ".join("@" + k for k in known))
    try:
        ns = NodeSet(spec, resolver=resolver(topo))
    except NodeSetException as e:
        raise NodeSetError(f"bad nodeset {spec!r}: {e}",
                           hint="write ranges like ccn[001-032,040]") from None
    unknown = [n for n in ns if n not in topo]
    if unknown:
        raise NodeSetError(f"unknown host(s) {NodeSet.fromlist(unknown)}",
                           where=topo.source, hint="see `chiba-admin topology show`")
    order = {h.name: i for i, h in enumerate(topo.hosts())}
    return sorted(ns, key=order.__getitem__)


def fold(names) -> str:
    """The compact nodeset string for host names (``ccn[001-004]``)."""
    return str(NodeSet.fromlist(list(names)))
