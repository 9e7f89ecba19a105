"""`chiba-admin cluster init|status`: the embedded cluster's host directories."""

from __future__ import annotations

import click

from ..cli import pass_ctx
from ..console import get_console, print_json
from ..embedded import init_cluster, is_initialized

__all__ = ["register", "cluster_group"]


@click.group("cluster")
def cluster_group():
    """Manage the embedded cluster (hosts as directories on this machine)."""


@cluster_group.command("init")
@pass_ctx
def init(ctx):
    """Create every host's scratch, spool and repository directories."""
    topo = ctx.topology
    roots = init_cluster(topo)
    if ctx.json:
        print_json({"state_dir": topo.state_dir, "hosts": len(roots)})
    else:
        get_console().print(f"initialised {len(roots)} hosts of {topo.name!r} under "
                            f"{topo.state_dir}")
    return 0


@cluster_group.command("status")
@pass_ctx
def status(ctx):
    """Say whether the embedded cluster's host directories exist."""
    topo = ctx.topology
    ok = is_initialized(topo)
    if ctx.json:
        print_json({"state_dir": topo.state_dir, "kind": topo.kind, "initialised": ok})
    else:
        get_console().print(f"{topo.name} ({topo.kind}): "
                            + (f"initialised under {topo.state_dir}" if ok
                               else "not initialised (run `chiba-admin cluster init`)"))
    return 0 if ok else 1


def register(group: click.Group) -> None:
    group.add_command(cluster_group)
