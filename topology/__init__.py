"""The cluster topology: hosts, roles, towns, links, nodesets and rank placement (pure)."""

from .loader import load_topology, loads_topology
from .model import MAYOR, NODE, PRESIDENT, Host, HostPaths, Link, SSHSettings, Topology
from .nodesets import expand, fold, groups
from .placement import Placement, chain_order, place_ranks
from .units import format_bandwidth, format_bytes, parse_bandwidth, parse_latency, parse_size

__all__ = [
    "MAYOR", "NODE", "PRESIDENT", "Host", "HostPaths", "Link", "SSHSettings", "Topology",
    "load_topology", "loads_topology", "expand", "fold", "groups", "Placement",
    "chain_order", "place_ranks", "format_bandwidth", "format_bytes", "parse_bandwidth",
    "parse_latency", "parse_size",
]
