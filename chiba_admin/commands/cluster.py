"""`chiba-admin cluster init|check|status`: prepare and check every host of a cluster."""

from __future__ import annotations

import click

from ..cli import pass_ctx
from ..console import get_console, print_json
from ..embedded import init_cluster, is_initialized
from ..errors import UsageError

__all__ = ["register", "cluster_group"]

# state -> (shown as, rich style); the consoles read no markup (chiba_admin/console.py)
_STATUS_STYLE = {"ok": ("ok", ""), "warn": ("WARN", "yellow"), "fail": ("FAIL", "bold red"),
                 "skip": ("skip", "dim")}
_INIT_STYLE = {"exists": ("exists", ""), "created": ("created", "green"),
               "would-create": ("would create", "cyan"), "notdir": ("FAIL", "bold red"),
               "failed": ("FAIL", "bold red"), "unreachable": ("FAIL", "bold red")}


def _styled(styles: dict, state: str):
    """``state`` as the table shows it: a rich Text in its style."""
    from rich.text import Text

    text, style = styles.get(state, (state, ""))
    return Text(text, style=style)


def _hosts(topo, spec: str | None) -> list[str]:
    from topology import expand

    return expand(topo, spec) if spec else [h.name for h in topo.hosts()]


def _min_free(value: str) -> int:
    from topology import parse_size

    try:
        return int(parse_size(value))
    except Exception as e:  # the parser's own one-line reason
        raise UsageError(f"bad --min-free {value!r}: {e}", hint="e.g. 64MiB, 1GiB, 0") from None


_common = [
    click.option("--hosts", "nodeset", metavar="NODESET", default=None,
                 help="Hosts to work on (default: every host of the topology)."),
    click.option("-f", "fanout", type=click.IntRange(1, 1024), default=32, show_default=True,
                 help="How many hosts at once."),
    click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                 show_default=True, help="Seconds each host gets for connecting and for "
                 "each command."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group("cluster")
def cluster_group():
    """Prepare and check the cluster's hosts (any kind: embedded or SSH)."""


@cluster_group.command("init")
@_with_common
@click.option("--dry-run", is_flag=True, help="List what would be created; create nothing.")
@pass_ctx
def init(ctx, nodeset, fanout, timeout, dry_run):
    """Create every host's scratch, spool and repository directories.

    Embedded clusters: directories under the state dir. SSH clusters: over SSH, in
    parallel; existing directories are left as they are (mode and owner untouched),
    missing ones are created with mode 0755 (spool 0700) owned by the SSH user.
    """
    topo = ctx.topology
    hosts = _hosts(topo, nodeset)
    if topo.kind == "embedded" and not dry_run:
        roots = init_cluster(topo)
        if ctx.json:
            print_json({"state_dir": topo.state_dir, "hosts": len(roots)})
        else:
            get_console().print(f"initialised {len(roots)} hosts of {topo.name!r} under "
                                f"{topo.state_dir}")
        return 0
    from legacy_transit.transport import transport_for

    from ..hostcheck import init_hosts

    with transport_for(topo, timeout) as transport:
        rows = init_hosts(topo, hosts, transport, dry_run=dry_run, fanout=fanout,
                          timeout=max(timeout, 30.0))
    ok = all(r.ok for r in rows)
    if ctx.json:
        print_json({"cluster": topo.name, "kind": topo.kind, "dry_run": dry_run, "ok": ok,
                    "hosts": hosts, "dirs": [vars(r) | {"ok": r.ok} for r in rows]})
    else:
        _init_table(topo, rows, dry_run)
    _init_failure_lines(rows)
    return 0 if ok else 1


def _init_failure_lines(rows) -> None:
    """One stderr line per host that could not be reached, per directory that failed."""
    from ..console import get_err_console

    err, said = get_err_console(), set()
    for r in rows:
        if r.ok:
            continue
        key = r.host if r.state == "unreachable" else (r.host, r.which)
        if key in said:
            continue
        said.add(key)
        what = r.detail if r.state == "unreachable" else f"{r.which} {r.path}: {r.detail}"
        err.print(f"chiba-admin cluster init: {r.host}: {what}", markup=False, highlight=False,
                  soft_wrap=True)


def _init_table(topo, rows, dry_run: bool) -> None:
    from rich.table import Table

    from topology import fold

    t = Table(title=f"cluster init{' --dry-run' if dry_run else ''}: {topo.name} ({topo.kind})")
    for col in ("host", "directory", "path", "result", "detail"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r.host, r.which, r.path, _styled(_INIT_STYLE, r.state), r.detail)
    con = get_console()
    con.print(t)
    made = [r for r in rows if r.state in ("created", "would-create")]
    bad = sorted({r.host for r in rows if not r.ok})
    verb = "would create" if dry_run else "created"
    con.print(f"{verb} {len(made)} directories on "
              f"{len({r.host for r in made})} hosts"
              + (f"; failed on {fold(bad)}" if bad else ""))


@cluster_group.command("check")
@_with_common
@click.option("--min-free", default="64MiB", show_default=True, metavar="SIZE",
              help="Warn when a directory has less free space.")
@click.option("--mpi-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="Seconds the MPI test job may take.")
@click.option("--no-mpi", is_flag=True, help="Skip the MPI test job.")
@pass_ctx
def check(ctx, nodeset, fanout, timeout, min_free, mpi_timeout, no_mpi):
    """Check every host: SSH and its host key, directories (writable, free space), the
    ranks' Python and mpi4py, interface settings, then one tiny MPI job over them.

    Prints a table (host, check, ok, detail); exits 1 if anything failed.
    """
    topo = ctx.topology
    hosts = _hosts(topo, nodeset)
    floor = _min_free(min_free)
    from legacy_transit.transport import transport_for

    from ..hostcheck import check_hosts, mpi_check

    with transport_for(topo, timeout) as transport:
        checks = check_hosts(topo, hosts, transport, fanout=fanout, timeout=timeout,
                             min_free=floor)
    summary = None
    if not no_mpi:
        # only hosts that answered and whose Python can run a rank: the others already
        # have their reason, and one of them would only make the job fail for everyone
        bad = {c.host for c in checks if c.check in ("ssh", "python") and not c.ok}
        ready = [h for h in hosts if h not in bad]
        mpi_rows, summary = mpi_check(topo, ready, timeout=mpi_timeout,
                                      start_timeout=min(60.0, mpi_timeout))
        checks += mpi_rows
        checks += [_skipped(h) for h in hosts if h in bad]
    order = {h: i for i, h in enumerate(hosts)}
    checks.sort(key=lambda c: order.get(c.host, len(order)))  # stable: check order kept
    ok = all(c.ok for c in checks)
    if ctx.json:
        print_json({"cluster": topo.name, "kind": topo.kind, "ok": ok, "hosts": hosts,
                    "checks": [c.to_dict() for c in checks], "mpi": summary})
    else:
        _check_table(topo, checks, summary)
    _failure_lines(checks)
    return 0 if ok else 1


def _skipped(host: str):
    from ..hostcheck import Check

    return Check(host, "mpi", "skip", "not in the MPI job: its SSH or Python check failed")


def _grouped(checks) -> list[tuple[list[str], object]]:
    """Checks with equal (check, status, detail) as one row under their hosts (dshbak -c)."""
    from ..hostcheck import CHECK_NAMES

    groups: dict[tuple, tuple[list[str], object]] = {}
    first: dict[str, int] = {}
    for i, c in enumerate(checks):
        first.setdefault(c.host, i)
        groups.setdefault((c.check, c.status, c.detail), ([], c))[0].append(c.host)

    def key(g):
        name = g[1].check.split(":")[0]
        kind = CHECK_NAMES.index(name) if name in CHECK_NAMES else len(CHECK_NAMES)
        return kind, first[g[0][0]]

    return sorted(groups.values(), key=key)


def _check_table(topo, checks, summary) -> None:
    from rich.table import Table

    from topology import fold

    t = Table(title=f"cluster check: {topo.name} ({topo.kind})")
    for col in ("host", "check", "ok", "detail"):
        t.add_column(col, overflow="fold")
    for hosts, c in _grouped(checks):
        t.add_row(fold(hosts), c.check, _styled(_STATUS_STYLE, c.status), c.detail)
    con = get_console()
    con.print(t)
    fails = [c for c in checks if c.status == "fail"]
    warns = [c for c in checks if c.status == "warn"]
    line = f"{len(checks)} checks: {len(fails)} failed, {len(warns)} warnings"
    if summary and summary.get("ok"):
        line += (f"; MPI job over {len(summary['hosts'])} hosts launched in "
                 f"{summary['launch_seconds'] or 0:.2f} s, done in {summary['seconds']:.2f} s")
    con.print(line)


def _failure_lines(checks) -> None:
    """One stderr line per failed check (host, check, reason), with or without --json."""
    from ..console import get_err_console

    err = get_err_console()
    for c in checks:
        if c.status == "fail":
            err.print(f"chiba-admin cluster check: {c.host}: {c.check}: {c.detail}",
                      markup=False, highlight=False, soft_wrap=True)


@cluster_group.command("status")
@pass_ctx
def status(ctx):
    """Say whether the embedded cluster's host directories exist."""
    topo = ctx.topology
    if topo.kind != "embedded":
        msg = "hosts are machines reached over SSH: `chiba-admin cluster check` checks them"
        if ctx.json:
            print_json({"kind": topo.kind, "initialised": None, "note": msg})
        else:
            get_console().print(f"{topo.name} ({topo.kind}): {msg}")
        return 0
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
