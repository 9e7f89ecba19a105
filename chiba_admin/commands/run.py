"""`chiba-admin run -w NODESET [-f N] [-b] -- CMD...`: pdsh-style parallel commands over the Transport."""

from __future__ import annotations

import sys
import threading

import click

from topology import expand, fold

from ..cli import pass_ctx
from ..console import get_console, print_json
from ..embedded import require_initialized
from .service import launch_option, print_lines, run_over_mpi, say_via

__all__ = ["register", "run_cmd", "render_groups", "render_error_groups", "render_failures"]


def render_groups(groups, out=None) -> None:
    """dshbak -c / clush -b: one block per distinct stdout, headed by its folded nodeset."""
    out = out or sys.stdout
    for g in groups:
        head = f"{g.nodeset} ({len(g.hosts)})"
        if g.rc:
            head += f" exit {g.rc}"
        bar = "-" * max(15, len(head))
        out.write(f"{bar}\n{head}\n{bar}\n")
        text = g.output
        out.write(text if text.endswith("\n") or not text else text + "\n")
    out.flush()


def render_error_groups(groups, err=None) -> None:
    """Gathered stderr: each line labelled with the folded nodeset of the hosts that wrote
    exactly that stderr (clush labels stderr lines ``node: line``)."""
    err = err or sys.stderr
    for g in groups:
        for line in g.output.splitlines():
            err.write(f"{g.nodeset}: {line}\n")
    err.flush()


def render_failures(group, err=None) -> None:
    """One stderr line per failed host, naming it and the reason (like pdsh's own lines)."""
    err = err or sys.stderr
    for host, r in group.failed.items():
        err.write(f"chiba-admin run: {host}: {r.error if r.error else f'exited with code {r.rc}'}\n")
    err.flush()


@click.command("run", context_settings={"ignore_unknown_options": True,
                                        "allow_interspersed_args": False})
@click.option("-w", "nodeset", required=True, metavar="NODESET",
              help="Hosts to run on, e.g. 'ccn[01-04]', @town1, @nodes, @all.")
@click.option("-f", "fanout", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="How many hosts at once (sliding window, as pdsh -f).")
@click.option("-b", "gather", is_flag=True,
              help="Gather identical stdout under one nodeset header (clush -b); stderr "
              "stays on stderr, gathered, each line labelled with its nodeset.")
@click.option("-t", "connect_timeout", type=click.FloatRange(min=0, min_open=True),
              default=None, help="Connect timeout in seconds (default: the topology's).")
@click.option("-u", "command_timeout", type=click.FloatRange(min=0, min_open=True),
              default=None, help="Command timeout in seconds, for the command and every "
              "process it started (default: none); a host over it counts 255.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@launch_option
@pass_ctx
def run_cmd(ctx, nodeset, fanout, gather, connect_timeout, command_timeout, command):
    """Run COMMAND on every host of NODESET in parallel and show its output.

    One argument is a shell command line (`run -w @nodes 'ls | wc -l'`); several are an argv,
    quoted for the remote shell (`run -w @nodes -- sh -c 'cd "$CHIBA_SCRATCH" && ls'`).
    Each command sees CHIBA_HOST, CHIBA_ROLE, CHIBA_TOWN, CHIBA_SCRATCH, CHIBA_SPOOL and
    CHIBA_REPO. The exit status is the largest remote one (pdsh -S); 255 for an unreachable
    or timed-out host.
    """
    from legacy_transit.fanout import group_outputs, run_on
    from legacy_transit.transport import transport_for

    topo = ctx.topology
    names = expand(topo, nodeset)
    require_initialized(topo)
    cmd = command[0] if len(command) == 1 else list(command)
    lock = threading.Lock()

    def live(host: str, stream: str, line: str) -> None:
        f = sys.stdout if stream == "stdout" else sys.stderr
        with lock:
            f.write(f"{host}: {line}\n")
            f.flush()

    quiet_live = gather or ctx.json
    via = None
    if run_over_mpi(topo, names):  # --launch, or a running service covering the hosts
        from mpitools.common.launch import last_launch
        from mpitools.service.driver import run_mpi

        res = run_mpi(topo, names, cmd, timeout=command_timeout)
        via = last_launch()
        if not quiet_live:
            print_lines(res)
    else:
        with transport_for(topo, connect_timeout) as transport:
            res = run_on(transport, [topo.host(n) for n in names], cmd, fanout=fanout,
                         timeout=command_timeout, on_line=None if quiet_live else live)
    groups = group_outputs(res, fold=fold)
    err_groups = group_outputs(res, stream="stderr", fold=fold)
    if ctx.json:
        d = res.to_dict()
        d["groups"] = [{"nodeset": g.nodeset, "hosts": g.hosts, "rc": g.rc, "output": g.output}
                       for g in groups]
        d["stderr_groups"] = [{"nodeset": g.nodeset, "hosts": g.hosts, "output": g.output}
                              for g in err_groups]
        if via:
            d["launch"] = via
        print_json(d)
        return res.rc
    say_via(ctx, via)
    if gather:
        render_groups(groups)
        render_error_groups(err_groups)
    elif res.failed and ctx.verbose:
        get_console().print(f"{fold(res.failed)}: failed")
    render_failures(res)
    return res.rc


def register(group: click.Group) -> None:
    group.add_command(run_cmd)
