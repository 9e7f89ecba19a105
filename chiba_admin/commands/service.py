"""`chiba-admin service start|status|stop`: the long-running MPI service (issue 19)."""

from __future__ import annotations

import time

import click

from topology import expand

from ..cli import pass_ctx
from ..console import get_console, get_err_console, print_json
from ..errors import UsageError

__all__ = ["register", "service_group", "launch_option", "note_launch", "run_over_mpi",
           "say_via"]


def _set_mode(ctx, _param, value):
    from mpitools.common.launch import set_launch_mode

    set_launch_mode(value)
    # for this command only: tests run many commands in one process
    ctx.call_on_close(lambda: set_launch_mode(None))
    return value


def launch_option(f):
    """``--launch mpiexec|service|shell`` for an MPI command (sets mpitools.common.launch's
    mode)."""
    return click.option("--launch", type=click.Choice(("mpiexec", "service", "shell")),
                        default=None, expose_value=False, callback=_set_mode,
                        help="mpi: a fresh mpiexec, the running service, or the ranks of "
                             "the `chiba-admin shell` job this runs in (default: the shell "
                             "job's, then the service's, when they cover the hosts).")(f)


def say_via(ctx, via: str | None) -> None:
    """Text output names a launch without mpiexec: ``via service`` or ``via shell``."""
    if not ctx.json and via in ("service", "shell"):
        get_console().print(f"via {via}", markup=False)


def note_launch(ctx, result) -> None:
    """An MPI method's outcome gets ``launch = "service"|"shell"|"mpiexec"`` (the ``launch``
    key of --json); text output says ``via service`` or ``via shell``."""
    from mpitools.common.launch import last_launch

    if result.method != "mpi":
        return
    result.launch = last_launch()
    say_via(ctx, result.launch)


def run_over_mpi(topo, names: list[str]) -> bool:
    """Whether `run` goes over MPI ranks: --launch given, the `chiba-admin shell` job this
    runs in has a rank on each of ``names``, or a service covering them runs (otherwise the
    transport's fan-out, as before the service existed). Inside a shell job that does not
    cover them, one line on stderr says why."""
    from mpitools.common.launch import launch_mode
    from mpitools.service.driver import running, shell_job

    if launch_mode() is not None:
        return True
    job, why = shell_job()
    if job is not None and job.covers(names):
        return True
    if job is not None:
        why = f"the shell job has no rank on {', '.join(job.missing(names))}"
    svc = running(topo)
    if svc is not None and svc.covers(names):
        return True
    if why:
        get_err_console().print(f"not over the shell job's ranks: {why}; using the "
                                "transport", markup=False, highlight=False)
    return False


def print_lines(res, err=None) -> None:
    """Each host's output as ``host: line`` (stdout, then stderr), hosts in order."""
    import sys

    for host, r in res.results.items():
        for stream, text in ((sys.stdout, r.out), (err or sys.stderr, r.err)):
            for line in text.splitlines():
                stream.write(f"{host}: {line}\n")
    sys.stdout.flush()


def _show(ctx, res: dict, line: str) -> int:
    if ctx.json:
        print_json(res)
    else:
        get_console().print(line, markup=False)
    return 0


@click.group("service")
def service_group():
    """An MPI job started once on the cluster's hosts: stage, collect, sync-mayors and run
    then use its ranks instead of starting mpiexec each time."""


@service_group.command("start")
@click.option("--hosts", "nodeset", default=None, metavar="NODESET",
              help="Hosts of the service, one rank each (default: the president, every "
                   "mayor and every node).")
@click.option("--idle-cap", type=click.FloatRange(0.001, 5.0), default=None, metavar="S",
              help="Seconds between an idle rank's tests (default 0.05).")
@click.option("--deep-cap", type=click.FloatRange(0.001, 5.0), default=None, metavar="S",
              help="The same after 30 s without a request (default 0.5): less CPU, a "
                   "slower first request.")
@pass_ctx
def start_cmd(ctx, nodeset, idle_cap, deep_cap):
    """Start the service as a daemon on the president."""
    from mpitools.service import driver

    from ..embedded import require_initialized

    topo = ctx.topology
    require_initialized(topo)
    hosts = expand(topo, nodeset) if nodeset else None
    if nodeset is not None and not hosts:
        raise UsageError(f"--hosts {nodeset!r} selects no host")
    res = driver.start(topo, hosts, idle_cap=idle_cap, deep_cap=deep_cap)
    return _show(ctx, res, f"service started on {len(res['hosts'])} hosts in "
                           f"{res['seconds']:.2f} s (mpiexec pid {res['pid']})")


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
                      + (": " + "; ".join(f"{h}: {w}" for h, w in dead.items()) if dead else
                         f" (mpiexec's output: {st['dir']}/log)")
                      + "; restart it with `chiba-admin service start`", markup=False)
        else:
            con.print(f"service: not running for {topo.name}", markup=False)
        return 1
    con.print(f"service: running, mpiexec pid {st['pid']}, {len(st['hosts'])} hosts, up "
              f"{st['uptime']:.0f} s, {st['served']} requests served, no dead host, "
              f"{st['cpu_seconds']:.2f} CPU s in all", markup=False)
    if "idle_cpu_percent" in st:
        con.print(f"idle CPU: {st['idle_cpu_percent']:.2f}% of one core over "
                  f"{st['sample_seconds']:.1f} s (all ranks)", markup=False)
    return 0


@service_group.command("add")
@click.argument("host")
@pass_ctx
def add_cmd(ctx, host):
    """Add a rank on HOST to the running service (MPI_Comm_spawn, then a merge)."""
    from mpitools.service import driver

    res = driver.add(ctx.topology, host)
    return _show(ctx, res, f"{host} added in {res['seconds']:.2f} s; the service has "
                           f"{len(res['hosts'])} hosts")


@service_group.command("stop")
@pass_ctx
def stop_cmd(ctx):
    """Stop the service: its ranks and mpiexec, on every host."""
    from mpitools.service import driver

    res = driver.stop(ctx.topology)
    return _show(ctx, res, "service stopped" if res["stopped"] else
                 f"no service runs for {ctx.topology.name}")


def _service_driver():
    from mpitools.service import driver

    return driver


def register(group: click.Group) -> None:
    """Add ``service`` to the CLI, and let every MPI launch of this process use a running
    service (mpitools/common/launch.py imports no tool folder: it is told here)."""
    from mpitools.common.launch import register_service

    register_service(_service_driver)
    group.add_command(service_group)
