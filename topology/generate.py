"""Topology files for Chiba-City-shaped clusters of any size (pure: returns TOML text)."""

from __future__ import annotations

import tomli_w

from chiba_admin.errors import InvalidRequest

__all__ = ["generated_topology_toml"]


def generated_topology_toml(towns: int, nodes_per_town: int, node_bps: float,
                            mayor_bps: float, *, name: str = "testbed",
                            uplink_bps: float | None = None) -> str:
    """A Chiba-City-shaped topology file (TOML text): pres, mayor1..T, town1..T of ccnNN
    nodes.

    Rates in bits/s: ``node_bps`` each node's link, ``mayor_bps`` the core (president -
    mayors), ``uplink_bps`` each mayor's town-side link (default: ``node_bps``, as on
    Chiba City; pass ``mayor_bps`` for the "fat mayors" shape). InvalidRequest when
    ``towns`` or ``nodes_per_town`` is below 1.
    """
    if towns < 1 or nodes_per_town < 1:
        raise InvalidRequest("--towns and --nodes-per-town must be at least 1")
    width = max(2, len(str(towns * nodes_per_town)))

    def nodes(t: int) -> str:
        lo, hi = (t - 1) * nodes_per_town + 1, t * nodes_per_town
        return f"ccn[{lo:0{width}d}-{hi:0{width}d}]"

    return tomli_w.dumps({
        "cluster": {"name": name, "kind": "embedded",
                    "description": f"{name}: {towns} towns of {nodes_per_town} nodes"},
        "defaults": {"scratch": "/scratch", "spool": "/var/spool/chiba",
                     "repository": "/opt/chiba/repo"},
        "links": {"core": {"bandwidth": float(mayor_bps)},
                  "town": {"bandwidth": float(node_bps),
                           "uplink": float(uplink_bps or node_bps)}},
        "president": {"name": "pres"},
        "mayors": {f"mayor{t}": {} for t in range(1, towns + 1)},
        "towns": {f"town{t}": {"mayor": f"mayor{t}", "nodes": nodes(t)}
                  for t in range(1, towns + 1)},
    })
