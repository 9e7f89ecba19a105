"""Topology files for Chiba-City-shaped clusters of any size (pure: returns TOML text)."""

from __future__ import annotations

from chiba_admin.errors import InvalidRequest

__all__ = ["generated_topology_toml"]


def generated_topology_toml(towns: int, nodes_per_town: int, node_bps: float,
                            mayor_bps: float, *, name: str = "testbed",
                            uplink_bps: float | None = None) -> str:
    """A Chiba-City-shaped topology: pres, mayor1..T, town1..T of ccnNN nodes.

    Rates in bits/s: ``node_bps`` each node's link, ``mayor_bps`` the core (president -
    mayors), ``uplink_bps`` each mayor's town-side link (default: ``node_bps``, as on
    Chiba City; pass ``mayor_bps`` for the "fat mayors" shape).
    """
    if towns < 1 or nodes_per_town < 1:
        raise InvalidRequest("--towns and --nodes-per-town must be at least 1")
    total = towns * nodes_per_town
    width = max(2, len(str(total)))
    lines = ["[cluster]", f'name = "{name}"', 'kind = "embedded"',
             f'description = "{name}: {towns} towns of {nodes_per_town} nodes"', "",
             "[defaults]", 'scratch = "/scratch"', 'spool = "/var/spool/chiba"',
             'repository = "/opt/chiba/repo"', "",
             "[links.core]", f"bandwidth = {float(mayor_bps)!r}", "",
             "[links.town]", f"bandwidth = {float(node_bps)!r}",
             f"uplink = {float(uplink_bps or node_bps)!r}", "",
             "[president]", 'name = "pres"', ""]
    for t in range(1, towns + 1):
        lines.append(f"[mayors.mayor{t}]")
    lines.append("")
    for t in range(1, towns + 1):
        lo = (t - 1) * nodes_per_town + 1
        hi = t * nodes_per_town
        lines += [f"[towns.town{t}]", f'mayor = "mayor{t}"',
                  f'nodes = "ccn[{lo:0{width}d}-{hi:0{width}d}]"', ""]
    return "\n".join(lines)
