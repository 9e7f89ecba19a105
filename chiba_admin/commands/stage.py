"""`chiba-admin stage` and `chiba-admin collect`: stage-in and stage-out, the MPI or the Transit way."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from topology import expand, fold, format_bandwidth, format_bytes, parse_size

from ..cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, pass_ctx
from .service import launch_option, note_launch
from ..console import get_console, get_err_console, print_json, progress
from ..embedded import require_initialized
from ..errors import UsageError
from ..outcome import TransferRun

__all__ = ["register", "stage_cmd", "collect_cmd", "render_result", "render_dry_run"]

_METHODS = ("mpi", "transit")


def _chunk(value: str) -> int:
    try:
        n = parse_size(value)
    except ValueError as e:
        raise UsageError(f"bad --chunk: {e}", hint="e.g. 4MiB, 1M, 65536") from None
    if n < 4096:
        raise UsageError(f"--chunk {value} is too small", hint="use at least 4KiB")
    return n


def _min_free(value: str | None) -> int | None:
    """collect's ``--min-free``: bytes (``0`` keeps no reserve), None for the default."""
    import re

    if value is None:
        return None
    if re.fullmatch(r"\s*0+\s*[a-zA-Z]*\s*", value):
        return 0
    try:
        return parse_size(value)
    except ValueError as e:
        raise UsageError(f"bad --min-free: {e}", hint="e.g. 2GiB, 500M, 0") from None


def _no() -> Text:
    return Text("NO", style="red")


def render_result(result: TransferRun, verb: str) -> None:
    """A table with one row per host, a summary line, then each failure on stderr.

    A result with ``refusal`` (bad input the hosts found before anything was sent, e.g. a
    device node below collect's PATH) prints that one line on stderr and nothing else.
    Paths, host names and error lines print as they are (the consoles read no markup).
    """
    hosts = result.hosts
    # stage's --algorithm is the user's choice; collect's window is an internal detail
    algo = f"/{result.algorithm}" if result.algorithm and verb == "stage" else ""
    t = Table(title=f"{verb} --method {result.method}{algo}: {result.source} -> "
                    f"{result.dest}")
    for col, justify in (("host", "left"), ("ok", "center"), ("stage", "left"),
                         ("bytes", "right"), ("seconds", "right"),
                         ("throughput", "right"), ("error", "left")):
        t.add_column(col, justify=justify)
    for name, h in hosts.items():
        t.add_row(name, "yes" if h.ok else _no(), str(h.stage or ""),
                  format_bytes(h.bytes or 0), f"{h.seconds or 0:.2f}",
                  format_bandwidth(h.throughput_bps) if h.throughput_bps else "-",
                  str(h.error or ""))
    con = get_console()
    con.print(t)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in (result.phases or {}).items()
                       if k != "total" and isinstance(v, (int, float)))
    con.print(f"{result.hosts_ok}/{len(result.nodes)} hosts ok; "
              f"{result.files} files, {format_bytes(result.payload_bytes)}"
              f" (archive {format_bytes(result.bytes)}) in "
              f"{result.seconds:.2f} s" + (f" [{phases}]" if phases else ""))
    if not result.ok:
        _render_failure(result, verb)


def render_dry_run(result: TransferRun) -> None:
    """A stage --dry-run: a table of what would happen on each host, the plan (route,
    source, compression), a summary line; on stderr each failure as the real run names it
    (a refusal, exit 2, with the real run's last line too, and what it would tidy first:
    ``outcome``)."""
    algo = f"/{result.algorithm}" if result.algorithm else ""
    t = Table(title=f"stage --dry-run --method {result.method}{algo}: {result.source} -> "
                    f"{result.dest}")
    for col in ("host", "ok", "would", "error"):
        t.add_column(col, justify="center" if col == "ok" else "left")
    for name, h in result.hosts.items():
        t.add_row(name, "yes" if h.ok else _no(), str(h.stage or "").removeprefix("would "),
                  str(h.error or ""))
    con = get_console()
    con.print(t)
    for line in _plan_lines(result):
        con.print(line, markup=False, highlight=False)
    con.print(f"dry run: {result.hosts_ok}/{len(result.nodes)} hosts would be staged; "
              "nothing was written", markup=False, highlight=False)
    if result.ok:
        return
    err = get_err_console()
    if result.error:
        err.print(f"chiba-admin stage: {result.error}", markup=False)
    for name, why in result.failures.items():
        err.print(f"chiba-admin stage: {name}: {why}", markup=False)
    if result.refused and result.outcome:  # a dead run's leftover put back first
        last = f"refused; before refusing, {result.outcome}; nothing was written"
    elif result.refused:  # the real run's own last line
        last = "refused; nothing was touched on any node"
    elif result.error:  # the dry run's own job failed (a host unreachable, --timeout)
        last = "dry run failed; nothing was written"
    else:
        last = "dry run: the real run would fail on the hosts above; nothing was written"
    err.print(f"chiba-admin stage: {last}", markup=False)


def _plan_lines(result: TransferRun) -> list[str]:
    """The route and the source of a dry run's plan, one line each."""
    plan = result.plan or {}
    # each method counts as its real run does: MPI's packer every entry, Transit regular
    # files only (so the same tree reads 3 and 2): say which
    n = result.files
    what = (f"regular file{'s' * (n != 1)}" if result.method == "transit" else
            f"entr{'ies' if n != 1 else 'y'} (directories included)")
    source = f"source: {n} {what}, {format_bytes(result.payload_bytes)}; "
    if result.method == "transit":
        via = f" -> {plan['via']}" if plan.get("via") else ""
        towns = "; ".join(f"{m} -> {fold(ns)}" for m, ns in plan.get("towns", {}).items())
        return [f"route: {plan.get('from')}{via} -> mayors: {towns}",
                source + "packed as an uncompressed tar when the real run starts"]
    order = plan.get("order") or result.nodes
    paced = f", paced at {format_bytes(plan['pacing'])}/s" if plan.get("pacing") else ""
    if plan.get("tree") == "chain":
        then = (f"then a pipelined chain {' -> '.join(order)} in "
                f"{format_bytes(result.segment)} segments")
    else:
        then = (f"then MPI_Bcast from {order[0]} to {fold(order[1:]) or 'no other node'} "
                f"in {format_bytes(result.chunk)} chunks (the MPI library picks the tree)")
    return [f"route: {plan.get('from')} -> {order[0]} over HTTP{paced}, {then}",
            source + f"packed with {result.compress} when the real run starts"]


def _render_failure(result: TransferRun, verb: str) -> None:
    """On stderr: the refusal alone, or the run's error, each failure, and what is left."""
    err = get_err_console()
    if result.refusal:  # bad input found on the hosts, nothing sent: one line
        err.print(f"chiba-admin {verb}: {result.refusal}", markup=False)
        return
    if result.error:
        err.print(f"chiba-admin {verb}: {result.error}", markup=False)
    for name, why in result.failures.items():
        err.print(f"chiba-admin {verb}: {name}: {why}", markup=False)
    if result.refused:  # outcome: a dead run's leftover the nodes put back first
        err.print(f"chiba-admin {verb}: refused; " + (
            f"{result.outcome}; nothing else was touched on any node" if result.outcome
            else "nothing was touched on any node"), markup=False)
        return
    if result.outcome:  # what each host holds now, as the method reports it
        err.print(f"chiba-admin {verb}: failed; {result.outcome}", markup=False)
    else:
        err.print(f"chiba-admin {verb}: failed; nothing was committed on any node"
                  if verb == "stage" else f"chiba-admin {verb}: failed for "
                  f"{fold(result.failures) or 'some hosts'}", markup=False)


def _finish(ctx, result: TransferRun, verb: str) -> int:
    """Print the outcome; exit 0 ok, 2 when a destination was refused (nothing touched),
    1 for any other failure."""
    note_launch(ctx, result)
    if ctx.json:
        print_json(result.to_dict())
    elif result.dry_run:
        render_dry_run(result)
    else:
        render_result(result, verb)
    if result.ok:
        return EXIT_OK
    return EXIT_USAGE if result.refused else EXIT_FAILURE


def _common(f):
    for opt in reversed([
        click.option("--nodes", "nodeset", required=True, metavar="NODESET",
                     help="Destination nodes, e.g. 'ccn[01-04]' or @town1."),
        click.option("--method", type=click.Choice(_METHODS), default="mpi",
                     show_default=True, help="MPI program, or the legacy City Transit."),
        click.option("--chunk", default="4MiB", show_default=True, metavar="SIZE",
                     help="Bytes per MPI message (bounds each rank's memory)."),
        click.option("--compress", type=click.Choice(("zstd", "gzip", "none")),
                     default="zstd", show_default=True, help="Archive compression (mpi)."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="S", help="Stop everything after S seconds."),
        click.option("--json", "json_output", is_flag=True, help="Print the result as JSON."),
        click.option("--replace", is_flag=True,
                     help="Replace an existing destination that an earlier stage/collect "
                          "did not create (refused otherwise)."),
    ]):
        f = opt(f)
    return f


@click.command("stage")
@click.argument("src", type=click.Path())
@_common
@click.option("--dest", default=None, metavar="PATH",
              help="Where on each node: a new directory below its scratch (relative paths "
                   "are under scratch) or a dest_roots entry; no '..', not scratch itself "
                   "(default: SRC's name under scratch).")
@click.option("--algorithm", type=click.Choice(("chain", "bcast")), default="chain",
              show_default=True, help="chain: pipelined point-to-point in town order; "
                                      "bcast: MPI_Bcast per chunk.")
@click.option("--spool-url", default=None, metavar="URL",
              help="Base URL of a running spool server (default: serve one for this run).")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="Check everything and say what would happen on each node (would create, "
                   "would replace, refused); write nothing anywhere.")
@launch_option
@pass_ctx
def stage_cmd(ctx, src, nodeset, method, chunk, compress, timeout, json_output, replace, dest,
              algorithm, spool_url, dry_run):
    """Copy directory SRC onto every node: all nodes get it, or none does."""
    ctx.json = ctx.json or json_output
    topo = ctx.topology
    nodes = expand(topo, nodeset)
    require_initialized(topo)
    size = _chunk(chunk)
    with progress(f"stage ({method})") as bar:
        if method == "transit":
            from legacy_transit.transit import stage_transit, stage_transit_dry_run

            run = stage_transit_dry_run if dry_run else stage_transit
            result = run(topo, src, nodes, dest, timeout=timeout, progress=bar,
                         replace=replace)
        else:
            from mpitools.stage.driver import stage_mpi, stage_mpi_dry_run

            run = stage_mpi_dry_run if dry_run else stage_mpi
            result = run(topo, src, nodes, dest, algorithm=algorithm, chunk=size,
                         compress=compress, timeout=timeout, progress=bar,
                         spool_url=spool_url, replace=replace)
    return _finish(ctx, result, "stage")


@click.command("collect")
@click.argument("path")
@_common
@click.option("--dest", "dest_dir", required=True, metavar="DIR",
              help="Directory on this (home) machine, not a symlink; each host's copy goes "
                   "to DIR/<host>/ (DIR and DIR/<host> are made 0700).")
@click.option("--min-free", default=None, metavar="SIZE",
              help="Stop a host's copy before the space left for users on DIR's file "
                   "system would drop below SIZE [default: 1GiB, or 5% of a file system "
                   "under 20GiB; 0: none].")
@launch_option
@pass_ctx
def collect_cmd(ctx, path, nodeset, method, chunk, compress, timeout, json_output, replace,
                dest_dir, min_free):
    """Bring PATH (relative to scratch, or absolute) back from every node into DIR/<host>/."""
    ctx.json = ctx.json or json_output
    topo = ctx.topology
    nodes = expand(topo, nodeset)
    require_initialized(topo)
    size = _chunk(chunk)
    reserve = _min_free(min_free)
    with progress(f"collect ({method})") as bar:
        if method == "transit":
            from legacy_transit.transit import collect_transit

            result = collect_transit(topo, path, nodes, dest_dir, timeout=timeout,
                                     progress=bar, replace=replace, min_free=reserve)
        else:
            from mpitools.collect.driver import collect_mpi

            result = collect_mpi(topo, path, nodes, dest_dir, chunk=size, compress=compress,
                                 timeout=timeout, progress=bar, replace=replace,
                                 min_free=reserve)
    return _finish(ctx, result, "collect")


def register(group: click.Group) -> None:
    group.add_command(stage_cmd)
    group.add_command(collect_cmd)
