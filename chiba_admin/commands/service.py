"""`chiba-admin service start|status|stop`: the long-running MPI service (issue 19)."""

from __future__ import annotations

import time

import click

from topology import expand

from ..cli import pass_ctx
from ..console import get_console, print_json
from ..errors import UsageError

__all__ = ["register", "service_group"]


@click.group("service")
def service_group():
    """An MPI job started once on the cluster's hosts: stage, collect, sync-mayors and run
    then use its ranks instead of starting mpiexec each time."""


@service_group.command("start")
@click.option("--hosts", "nodeset", default=None, metavar="NODESET",
              help="Hosts of the service, one rank each (default: the president, every "
                   "mayor and every node).")
@pass_ctx
def start_cmd(ctx, nodeset):
    """Start the service as a daemon on the president."""
    from mpitools.service import driver

    topo = ctx.topology
    if topo.kind == "embedded":
        from ..embedded import require_initialized

        require_initialized(topo)
    hosts = expand(topo, nodeset) if nodeset else None
    if nodeset is not None and not hosts:
        raise UsageError(f"--hosts {nodeset!r} selects no host")
    res = driver.start(topo, hosts)
    if ctx.json:
        print_json(res)
    else:
        get_console().print(f"service started on {len(res['hosts'])} hosts in "
                            f"{res['seconds']:.2f} s (mpiexec pid {res['pid']})", markup=False)
    return 0


@service_group.command("status")
@click.option("--sample", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Also measure the ranks' CPU over this many seconds "
                                      "(percent of one core, all ranks together).")
@pass_ctx
def status_cmd(ctx, sample):
    """Hosts, uptime, requests served, dead hosts and CPU of the service."""
    from mpitools.service import driver

    topo = ctx.topology
    st = driver.status(topo)
    if sample and st["running"]:
        t0, cpu0 = time.time(), st["cpu_seconds"]
        time.sleep(sample)
        st = driver.status(topo)
        st["sample_seconds"] = time.time() - t0
        st["idle_cpu_percent"] = 100.0 * (st["cpu_seconds"] - cpu0) / st["sample_seconds"]
    if ctx.json:
        print_json(st)
        return 0 if st["running"] else 1
    con = get_console()
    if not st["running"]:
        if st.get("ended"):
            dead = st.get("dead_hosts") or {}
            con.print("service: not running; it ended"
                      + (": " + "; ".join(f"{h}: {w}" for h, w in dead.items()) if dead else "")
                      + "; restart it with `chiba-admin service start`", markup=False)
        else:
            con.print(f"service: not running for {topo.name}", markup=False)
        return 1
    con.print(f"service: running, mpiexec pid {st['pid']}, {len(st['hosts'])} hosts, up "
              f"{st['uptime']:.0f} s, {st['served']} requests served, no dead host, "
              f"{st['cpu_seconds']:.2f} CPU s in all", markup=False)
    if "idle_cpu_percent" in st:
        con.print(f"idle CPU: {st['idle_cpu_percent']:.2f}% of one core over "
                  f"{st['sample_seconds']:.0f} s (all ranks)", markup=False)
    return 0


@service_group.command("stop")
@pass_ctx
def stop_cmd(ctx):
    """Stop the service: its ranks and mpiexec, on every host."""
    from mpitools.service import driver

    res = driver.stop(ctx.topology)
    if ctx.json:
        print_json(res)
    else:
        get_console().print("service stopped" if res["stopped"] else
                            f"no service runs for {ctx.topology.name}", markup=False)
    return 0


def register(group: click.Group) -> None:
    group.add_command(service_group)
