"""`chiba-admin bench stage|sync|all` and `chiba-admin report`: measure side by side, then compare."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from topology import parse_size

from ..cli import pass_ctx
from ..console import get_console, get_err_console, print_json
from ..errors import UsageError

__all__ = ["register", "bench_cmd", "report_cmd"]


def _shapes(value: str) -> list[tuple[int, int]]:
    out = []
    for part in value.split(","):
        try:
            t, n = part.lower().split("x")
            out.append((int(t), int(n)))
        except ValueError:
            raise UsageError(f"bad shape {part!r}", hint="write TOWNSxNODES, e.g. 2x4,4x8")
    return out


def _ints(value: str, what: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise UsageError(f"bad {what} {value!r}", hint="a comma-separated list of numbers")


def _sizes(value: str) -> list[int]:
    try:
        return [parse_size(v) for v in value.split(",") if v]
    except ValueError as e:
        raise UsageError(f"bad --sizes: {e}", hint="e.g. --sizes 64M,16M") from None


def _say(run: dict) -> None:
    con = get_err_console()
    what = (f"stage {run['data']} {run['size_bytes'] / 1e6:.0f} MB -> {run['nodes']} nodes "
            f"{run['method']}{'/' + run['algorithm'] if run.get('algorithm') else ''}"
            if run["workload"] == "stage" else
            f"sync {run['scenario']} -> {run['targets']} targets {run['method']}")
    state = "ok" if run["ok"] else "[red]FAILED[/]"
    con.print(f"  {what} #{run['repeat'] + 1}: {run['seconds']:.2f} s {state}")


@click.command("bench")
@click.argument("suite", type=click.Choice(["stage", "sync", "all"]))
@click.option("--where", type=click.Choice(["auto", "testbed", "embedded"]), default="auto",
              show_default=True, help="auto: the testbed when root, else the embedded cluster.")
@click.option("--shape", "shapes", default=None, metavar="TxN[,TxN]",
              help="Staging clusters, towns x nodes per town "
                   "(default: 2x4,4x8 on the testbed, 2x4 embedded).")
@click.option("--sizes", default="64M", show_default=True, help="Staging data sizes.")
@click.option("--data", "datas", default="random,tree", show_default=True,
              help="Staging data: random (incompressible) and/or tree (compressible).")
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--methods", default=None, metavar="LIST",
              help="Subset of methods: stage transit,bcast,chain; sync rsync,mpi "
                   "(default: all).")
@click.option("--targets", "targets", default="4,8", show_default=True,
              help="Sync target counts (mayors first, then nodes).")
@click.option("--repo-files", type=click.IntRange(1), default=3000, show_default=True)
@click.option("--repo-size", default="150M", show_default=True)
@click.option("--node-mbit", type=float, default=20.0, show_default=True)
@click.option("--mayor-mbit", type=float, default=200.0, show_default=True)
@click.option("--out", "outdir", default="results", show_default=True, type=click.Path())
@click.option("--workdir", default=None, type=click.Path(),
              help="Where generated data goes (default: a temporary directory).")
@pass_ctx
def bench_cmd(ctx, suite, where, shapes, sizes, datas, repeat, methods, targets, repo_files,
              repo_size, node_mbit, mayor_mbit, outdir, workdir):
    """Run legacy and MPI methods side by side and record every run under results/."""
    from ..benchrun import (environment, open_site, stage_suite, sync_suite, workdir_for,
                            write_record)

    size_list = _sizes(sizes)
    data_list = [d for d in datas.split(",") if d]
    bad = set(data_list) - {"random", "tree"}
    if bad:
        raise UsageError(f"unknown --data {', '.join(sorted(bad))}", hint="random and/or tree")
    target_list = _ints(targets, "--targets")
    stage_methods, sync_methods = _methods(methods)
    rsize = _sizes(repo_size)[0]
    work = workdir_for(workdir)
    written = []
    con = get_err_console()
    try:
        if suite in ("stage", "all"):
            default = "2x4" if where == "embedded" else None
            for towns, per in _shapes(shapes or default or _auto_shapes(where)):
                site = open_site(where, towns, per, work, node_mbit=node_mbit,
                                 mayor_mbit=mayor_mbit)
                try:
                    con.print(f"[bold]staging on the {site.kind} cluster, {towns} towns x "
                              f"{per} nodes[/]")
                    runs = stage_suite(site, node_counts=[towns * per], sizes=size_list,
                                       datas=data_list, repeat=repeat, workdir=work,
                                       methods=stage_methods,
                                       on_run=None if ctx.quiet else _say)
                    written.append(write_record(site, "stage", runs, Path(outdir),
                                                environment(site)))
                finally:
                    site.close()
        if suite in ("sync", "all"):
            need = max(target_list)
            towns = min(8, need)
            per = max(1, -(-(need - towns) // towns))
            site = open_site(where, towns, per, work, node_mbit=node_mbit,
                             mayor_mbit=mayor_mbit)
            try:
                con.print(f"[bold]synchronisation on the {site.kind} cluster, targets "
                          f"{target_list}[/]")
                runs = sync_suite(site, target_counts=target_list, repeat=repeat,
                                  workdir=work, files=repo_files, size=rsize,
                                  methods=sync_methods,
                                  on_run=None if ctx.quiet else _say)
                written.append(write_record(site, "sync", runs, Path(outdir),
                                            environment(site)))
            finally:
                site.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if ctx.json:
        print_json({"records": [str(p) for p in written]})
    else:
        for p in written:
            get_console().print(f"recorded {p}")
        get_console().print("see them with: chiba-admin report " +
                            " ".join(str(p) for p in written))
    return 0


def _methods(value: str | None):
    from ..benchrun import STAGE_METHODS, SYNC_METHODS

    if not value:
        return STAGE_METHODS, SYNC_METHODS
    names = [v for v in value.split(",") if v]
    by_name = {(alg or m): (m, alg) for m, alg in STAGE_METHODS}
    unknown = [n for n in names if n not in by_name and n not in SYNC_METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}",
                         hint="stage: transit, bcast, chain; sync: rsync, mpi")
    return (tuple(by_name[n] for n in names if n in by_name),
            tuple(n for n in names if n in SYNC_METHODS))


def _auto_shapes(where: str) -> str:
    import os

    from ..benchrun import _testbed_possible

    if where == "testbed" or (where == "auto" and os.geteuid() == 0 and _testbed_possible()):
        return "2x4,4x8"
    return "2x4"


@click.command("report")
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--plot", "plot_dir", default=None, type=click.Path(),
              help="Write PNG figures of both comparisons into this directory.")
@click.option("--markdown", is_flag=True, help="Print Markdown tables (for sharing).")
@pass_ctx
def report_cmd(ctx, files, plot_dir, markdown):
    """Compare legacy and MPI tools from recorded runs (default: every file in results/)."""
    from ..report import load_records, plot, render_rich, report_dict, to_markdown

    d = report_dict(load_records(list(files) or ["results"]))
    if plot_dir:
        d["figures"] = plot(d, plot_dir)
    if ctx.json:
        print_json(d)
    elif markdown:
        click.echo(to_markdown(d))
    else:
        render_rich(d, get_console())
        for f in d.get("figures", []):
            get_console().print(f"figure: {f}")
    return 0


def register(group: click.Group) -> None:
    group.add_command(bench_cmd)
    group.add_command(report_cmd)
