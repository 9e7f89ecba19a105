"""`chiba-admin topology show|check` and `chiba-admin nodes NODESET`."""

from __future__ import annotations

import click
from rich.text import Text
from rich.tree import Tree

from topology import expand, fold, format_bandwidth

from ..cli import pass_ctx
from ..console import get_console, print_json

__all__ = ["register", "topology_group", "nodes_cmd", "topology_dict"]


def topology_dict(topo) -> dict:
    """The topology as plain data (what `topology show --json` prints)."""
    pres = topo.president
    towns = []
    for t in topo.town_names():
        nodes = topo.town_nodes(t)
        link, up = topo.town_link(t), topo.town_uplink(t)
        towns.append({"name": t, "mayor": topo.towns[t], "nodes": fold(nodes),
                      "count": len(nodes), "bandwidth": link.bandwidth,
                      "latency": link.latency, "uplink_bandwidth": up.bandwidth})
    core = topo.link(pres.name, topo.mayors[0].name)
    return {**topo.summary(), "source": topo.source, "home": topo.home_server.name,
            "core_bandwidth": core.bandwidth, "core_latency": core.latency,
            "state_dir": topo.state_dir, "towns_detail": towns}


@click.group("topology")
def topology_group():
    """Show or check the cluster topology."""


@topology_group.command("show")
@pass_ctx
def show(ctx):
    """Print the president, mayors and towns as a tree with link speeds."""
    topo = ctx.topology
    d = topology_dict(topo)
    if ctx.json:
        print_json(d)
        return 0
    pres = topo.president
    tree = Tree(Text.assemble((topo.name, "bold"), f" ({topo.kind}): 1 president, "
                              f"{d['mayors']} mayors, {d['towns']} towns, {d['nodes']} nodes"))
    p = tree.add(Text.assemble("president ", (pres.name, "bold"),
                               f" {pres.address}" if pres.address else ""))
    for t in d["towns_detail"]:
        m = p.add(Text.assemble("mayor ", (t["mayor"], "bold"),
                                f" ─ {format_bandwidth(d['core_bandwidth'])}"))
        m.add(f"{t['name']}: {t['nodes']} ({t['count']} nodes) ─ "
              f"{format_bandwidth(t['bandwidth'])} each, "
              f"{format_bandwidth(t['uplink_bandwidth'])} shared to the mayor")
    get_console().print(tree)
    return 0


@topology_group.command("check")
@pass_ctx
def check(ctx):
    """Validate the topology file; exit 0 when it is sound."""
    topo = ctx.topology
    s = topo.summary()
    if ctx.json:
        print_json({"ok": True, **s, "source": topo.source})
    else:
        get_console().print(f"{topo.source}: ok: {s['hosts']} hosts (1 president, "
                            f"{s['mayors']} mayors, {s['towns']} towns, {s['nodes']} nodes)")
    return 0


@click.command("nodes")
@click.argument("nodeset")
@click.option("-c", "--count", is_flag=True, help="Print only how many hosts.")
@click.option("-e", "--expand", "expanded", is_flag=True, help="One name per line.")
@pass_ctx
def nodes_cmd(ctx, nodeset, count, expanded):
    """Expand NODESET (e.g. 'ccn[001-032,040]', '@town1', '@mayors') against the topology."""
    names = expand(ctx.topology, nodeset)
    if ctx.json:
        print_json(len(names) if count else names)
    elif count:
        get_console().print(len(names))
    elif expanded:
        get_console().print("\n".join(names))
    else:
        get_console().print(fold(names))
    return 0


def register(group: click.Group) -> None:
    group.add_command(topology_group)
    group.add_command(nodes_cmd)
