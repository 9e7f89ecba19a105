"""`chiba-admin sync-mayors`: keep the repository on mayors (or any targets) identical to the president's."""

from __future__ import annotations

import os
from typing import Callable

import click
from rich.table import Table
from rich.text import Text

from topology import expand, format_bytes, parse_size

from ..cli import EXIT_FAILURE, EXIT_OK, pass_ctx
from ..console import get_console, get_err_console, print_json, progress
from ..embedded import require_initialized
from ..errors import InventoryError, UsageError
from ..outcome import ABSENT, SyncRun
from .service import launch_option, note_launch
from ..progress import Progress

__all__ = ["register", "sync_cmd", "METHODS", "render_sync", "exclude_rules"]


def _sync_rsync(topo, src: str, targets: list[str], dest: str | None, opts: dict,
                events: Progress) -> SyncRun:
    from legacy_transit.rsync import sync_rsync

    # rsync reads the --exclude-from files itself: the same rules, parsed by rsync
    return sync_rsync(topo, src, targets, dest, delete=opts["delete"],
                      dry_run=opts["dry_run"], excludes=tuple(opts["excludes"]),
                      exclude_from=tuple(opts["exclude_from"]), checksum=opts["checksum"],
                      fanout=opts["fanout"], timeout=opts["timeout"], itemize=opts["itemize"],
                      progress=events)


def _sync_mpi(topo, src: str, targets: list[str], dest: str | None, opts: dict,
              events: Progress) -> SyncRun:
    from mpitools.sync.driver import sync_mpi

    return sync_mpi(topo, src, targets, dest, delete=opts["delete"], dry_run=opts["dry_run"],
                    excludes=tuple(opts["rules"]), checksum=opts["checksum"],
                    verify=opts["verify"], chunk=opts["chunk"], timeout=opts["timeout"],
                    progress=events, itemize=opts["itemize"])


# method name -> runner(topo, src, targets, dest, opts, events) -> SyncRun; adding a
# method is one entry here plus its name in the --method choices.
METHODS: dict[str, Callable[..., SyncRun]] = {
    "rsync": _sync_rsync,
    "mpi": _sync_mpi,
}
DEFAULT_METHOD = "mpi"


def render_sync(result: SyncRun) -> None:
    """The itemised changes of each target (dry run, --itemize-changes), a table with one
    row per target, then on stderr one line per failure and per path left unlike the
    source ("not in sync"), each naming its host."""
    hosts = result.hosts
    mpi = result.method == "mpi"
    con = get_console()
    for name, h in hosts.items():
        if h.plan is not ABSENT:
            con.print(Text.assemble((name, "bold"), f" {h.get('dest', '')}: "
                                    f"{h.plan_summary['write']} to write, "
                                    f"{h.plan_summary['delete']} to delete"))
            con.print(h.plan or "  (nothing to do)", markup=False)
        elif h.changes is not ABSENT:
            con.print(Text.assemble((name, "bold"), f" {h.get('dest', '')}:"))
            con.print("\n".join(h.changes) or "  (nothing to do)", markup=False)
    t = Table(title=f"sync-mayors --method {result.method}: {result.source} -> "
                    f"{result.dest}" + (" (dry run)" if result.dry_run else ""))
    # one meaning per column whatever the method (README, "What the columns mean")
    cols = [("host", "left"), ("ok", "center"), ("seconds", "right"),
            ("files transferred", "right"), ("created", "right"), ("updated", "right"),
            ("deleted", "right"), ("bytes to target", "right")]
    for col, justify in cols:
        t.add_column(col, justify=justify)
    for name, h in hosts.items():
        # bytes that crossed to the target: mpisync's payload received there, rsync's
        # bytes sent to it (its protocol included)
        to_target = h.bytes_received if mpi else h.bytes_sent
        row = [name, "yes" if h.ok else Text("NO", style="red"), f"{h.seconds:.2f}",
               str(h.files_transferred), str(h.get("created", "")),
               str(h.get("updated", "")), str(h.get("deleted", "")), format_bytes(to_target)]
        t.add_row(*row)
    con.print(t)
    groups = result.get("groups", 0)
    extra = (f"; {format_bytes(result.bytes_sent)} left the president once, in "
             f"{groups} broadcast{'s' if groups != 1 else ''} (one per set of targets "
             "needing the same files)" if mpi and not result.dry_run else "")
    state = "planned (dry run)" if result.dry_run else "in sync"
    con.print(f"{result.hosts_ok}/{len(hosts)} targets {state} in {result.seconds:.2f} s"
              f"{extra}")
    err = get_err_console()
    for name, why in result.failures.items():
        h = hosts.get(name)
        conflicts = (h.get("conflicts") if h is not None else None) or []
        if mpi and conflicts and not h.error:
            for c in conflicts:  # every path this target is left unlike the source
                err.print(f"chiba-admin sync-mayors: {name}: not in sync: {c}", markup=False)
        else:
            err.print(f"chiba-admin sync-mayors: {name}: {why}", markup=False)


@click.command("sync-mayors")
@click.argument("src", type=click.Path())
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULT_METHOD,
              show_default=True, help="How to synchronise.")
@click.option("--dest", default=None, metavar="PATH",
              help="Destination on each target; relative to its repository path "
                   "(default: the repository path itself).")
@click.option("--targets", default="@mayors", show_default=True, metavar="NODESET",
              help="Hosts to synchronise.")
@click.option("--delete", is_flag=True, help="Delete files on targets that SRC lacks.")
@click.option("--dry-run", "dry_run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--exclude", "excludes", multiple=True, metavar="PAT",
              help="rsync's --exclude PAT, by both methods (repeatable; '+ PAT' includes).")
@click.option("--exclude-from", "exclude_from", multiple=True, metavar="FILE",
              help="rsync's --exclude-from FILE: one rule a line, '#'/';' comments; "
                   "read after every --exclude (repeatable).")
@click.option("-f", "fanout", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="How many targets at once.")
@click.option("--checksum", is_flag=True, help="Compare file contents, not size and time.")
@click.option("-i", "--itemize-changes", "itemize", is_flag=True,
              help="List every change made, as --dry-run lists them (rsync's -i).")
@click.option("--verify", is_flag=True,
              help="mpi: every target re-hashes what it received against the source.")
@click.option("--chunk", default="65408", show_default=True, metavar="SIZE",
              help="mpi: bytes per message, at least 8KiB (small files share one); the "
                   "default, 128 bytes under 64 KiB, lets Open MPI send each eagerly.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="S", help="Give up (and stop every process) after S seconds.")
@launch_option
@pass_ctx
def sync_cmd(ctx, src, method, dest, targets, delete, dry_run, excludes, exclude_from, fanout,
             checksum, itemize, verify, chunk, timeout):
    """Make DEST on every target identical to SRC (a directory on this machine)."""
    topo = ctx.topology
    names = expand(topo, targets)
    require_initialized(topo)
    if verify and method != "mpi":
        raise UsageError("--verify is for --method mpi",
                         hint="rsync checks its transfers itself; use --checksum to compare")
    try:
        chunk_bytes = parse_size(chunk)
        if chunk_bytes < 8192:
            raise ValueError("at least 8KiB")
    except ValueError as e:
        raise UsageError(f"bad --chunk: {e}", hint="e.g. --chunk 4MiB") from None
    rules, exclude_from = exclude_rules(excludes, exclude_from)
    opts = {"delete": delete, "dry_run": dry_run, "excludes": excludes,
            "exclude_from": exclude_from, "rules": rules, "fanout": fanout,
            "checksum": checksum, "verify": verify, "chunk": chunk_bytes, "timeout": timeout,
            "itemize": itemize}
    with progress(f"sync-mayors ({method})") as bar:
        result = METHODS[method](topo, src, names, dest, opts, bar)
    note_launch(ctx, result)
    if ctx.json:
        print_json(result.to_dict())
    else:
        render_sync(result)
    return EXIT_OK if result.ok else EXIT_FAILURE


def exclude_rules(excludes: tuple[str, ...], exclude_from: tuple[str, ...]
                  ) -> tuple[list[str], tuple[str, ...]]:
    """(every rule in rsync's order: the --exclude ones, then each file's lines; the files
    as absolute paths). Raises UsageError for an unreadable file or a malformed rule, so
    both methods refuse the same input before anything is sent."""
    from inventory import read_exclude_from
    from inventory.excludes import parse_rules

    try:
        parse_rules(excludes)
    except InventoryError as e:
        raise UsageError(f"bad --exclude: {e.what}", where=e.where, hint=e.hint) from None
    rules, files = list(excludes), []
    for name in exclude_from:
        if name == "-":
            raise UsageError("--exclude-from - (standard input) is not supported",
                             hint="write the rules to a file and give its path")
        path = os.path.abspath(name)
        try:
            lines = read_exclude_from(path)
            parse_rules(lines)
        except InventoryError as e:
            raise UsageError(f"bad --exclude-from: {e.what}",
                             where=f"{path}: {e.where}" if e.where != path else path,
                             hint=e.hint) from None
        rules += lines
        files.append(path)
    return rules, tuple(files)


def register(group: click.Group) -> None:
    group.add_command(sync_cmd)
