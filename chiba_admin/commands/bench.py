"""`chiba-admin bench` and `chiba-admin report`: measure side by side, then compare.

Thin: options become a plan (chiba_admin.bench.suites), records are read, aggregated and
rendered by chiba_admin.bench.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click
from rich.text import Text

from topology import parse_size

from ..cli import pass_ctx
from ..console import get_console, get_err_console, print_json
from ..errors import UsageError

__all__ = ["register", "bench_cmd", "report_cmd"]

_NAMED_OK = {"what", "where", "outdir", "workdir", "node_mbit", "mayor_mbit", "uplink_mbit",
             "dry_run"}


def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise UsageError(f"bad {what} {value!r}", hint="a comma-separated list of numbers >= 1")
    return out


def _sizes(value: str, option: str = "--sizes") -> list[int]:
    try:
        out = [parse_size(v) for v in value.split(",") if v]
    except ValueError as e:
        raise UsageError(f"bad {option}: {e}", hint=f"e.g. {option} 64M,16M") from None
    if not out:
        raise UsageError(f"bad {option}: empty", hint=f"e.g. {option} 64M")
    return out


def _say(run: dict) -> None:
    w = run["workload"]
    alg = f"/{run['algorithm']}" if run.get("algorithm") else ""
    what = {
        "stage": lambda: f"stage {run['data']} {run['size_bytes'] / 1e6:.0f} MB -> "
                         f"{run['nodes']} nodes {run['method']}{alg}",
        "collect": lambda: f"collect {run['data']} {run['size_bytes'] / 1e6:.0f} MB <- "
                           f"{run['nodes']} nodes {run['method']}",
        "sync": lambda: f"sync {run['scenario']} -> {run['targets']} targets {run['method']}",
        "memory": lambda: f"memory {run['size_bytes'] / 1e6:.0f} MB -> {run['nodes']} nodes "
                          f"{run['algorithm']}: peak RSS "
                          f"{(run.get('peak_rss') or 0) / 1e6:.0f} MB",
        "inventory": lambda: f"inventory {run['metric']} = {run['value']:.4g} {run['unit']}",
        "cpu": lambda: (f"cpu {run['op']} {run['tree']} {run['nodes']} nodes {run['method']}"
                        f"{alg}: {run.get('cpu_per_node_s') or 0:.2f} s per node"),
        "run": lambda: f"run {run['command']} on {run['nodes']} nodes {run['method']}",
        "service": lambda: (f"service start on {run['hosts']} hosts"
                            if run["metric"] == "start" else
                            f"service idle CPU of {run['hosts']} hosts: "
                            f"{run.get('value') or 0:.2f}% of one core"),
        "shell": lambda: f"shell {run['case']} on {run['nodes']} nodes {run['method']}",
    }[w]()
    if run.get("launch") == "service" and w != "run":
        what += " (service)"
    elif w == "run" and run.get("launch"):
        what += f" ({run['launch']})"
    state = (f"skipped ({run['skipped']})" if run.get("skipped") else
             "ok" if run["ok"] else "FAILED")
    n = f" #{run['repeat'] + 1}" if "repeat" in run else ""
    busy = f", CPU {run['cpu_busy']:.0%}" if run.get("cpu_busy") is not None else ""
    get_err_console().print(Text.assemble(f"  {what}{n}: {run['seconds']:.2f} s{busy} ",
                                          (state, "red" if state == "FAILED" else "")))


_METHOD_HINT = ("stage: transit, bcast, chain, pdcp, clush, sbcast, sbcast-tree, "
                "chain-service, bcast-service; collect: transit, mpi, mpi-service; "
                "sync: rsync, mpi, mpi-service; run: ssh, mpiexec, service")


def _methods(value: str | None):
    """(stage, collect, sync, run) methods from ``--methods`` (default: every method
    without the service; a ``-service`` name, or ``service`` for run, selects it)."""
    from ..bench import workloads as w

    if not value:
        return w.STAGE_METHODS, w.COLLECT_METHODS, w.SYNC_METHODS, w.RUN_METHODS[:2]
    names = [v for v in value.split(",") if v]
    stage = {(alg or m): (m, alg) for m, alg in w.STAGE_METHODS}
    stage.update({f"{alg}-service": t for t in w.SERVICE_STAGE_METHODS for alg in [t[1]]})
    collect = {m: (m, alg) for m, alg in w.COLLECT_METHODS}
    collect["mpi-service"] = w.SERVICE_COLLECT_METHODS[0]
    sync = w.SYNC_METHODS + w.SERVICE_SYNC_METHODS
    unknown = [n for n in names if n not in stage and n not in collect
               and n not in sync and n not in w.RUN_METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}", hint=_METHOD_HINT)
    return (tuple(stage[n] for n in names if n in stage),
            tuple(collect[n] for n in names if n in collect),
            tuple(n for n in names if n in sync),
            tuple(n for n in names if n in w.RUN_METHODS))


@click.command("bench")
@click.argument("what", metavar="WHAT", type=click.Choice(
    ["stage", "sync", "collect", "run", "memory", "inventory", "cpu", "all", "default",
     "quick", "service", "shell"]))
@click.option("--where", type=click.Choice(["auto", "testbed", "embedded"]), default="auto",
              show_default=True, help="auto: the testbed when root, else the embedded cluster.")
@click.option("--shape", "shapes", default=None, metavar="TxN[,TxN]",
              help="Staging/collect clusters, towns x nodes per town "
                   "(default: 2x4,4x8 on the testbed, 2x4 embedded).")
@click.option("--sizes", default="64M", show_default=True, help="Staging data sizes.")
@click.option("--data", "datas", default="random,tree", show_default=True,
              help="Staging data: random (incompressible) and/or tree (compressible).")
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--methods", default=None, metavar="LIST",
              help="Subset of methods: stage transit,bcast,chain (and the peers pdcp,"
                   "clush,sbcast,sbcast-tree: testbed only); collect transit,mpi; "
                   "sync rsync,mpi; run ssh,mpiexec (default: all of these). Through the "
                   "long-running service: chain-service, bcast-service, mpi-service "
                   "(collect, sync), service (run); the bench starts and stops it.")
@click.option("--targets", "targets", default="4,8", show_default=True,
              help="Sync target counts (mayors first, then nodes).")
@click.option("--repo-files", type=click.IntRange(1), default=3000, show_default=True)
@click.option("--repo-size", default="150M", show_default=True)
@click.option("--memory-size", default="1G", show_default=True,
              help="Payload of the memory case (4 MiB chunks, 4 embedded nodes).")
@click.option("--inventory-files", type=click.IntRange(1), default=100_000,
              show_default=True, help="Files of the inventory case's tree.")
@click.option("--hash-size", default="1G", show_default=True,
              help="File size of the inventory case's hash measurement.")
@click.option("--node-mbit", type=float, default=20.0, show_default=True)
@click.option("--mayor-mbit", type=float, default=200.0, show_default=True)
@click.option("--uplink-mbit", type=click.FloatRange(min=0.1), default=None,
              help="Each mayor's town-side link (default: the node rate, the paper's "
                   "network; the --mayor-mbit value gives the 'fat mayors' shape).")
@click.option("--out", "outdir", default="results", show_default=True, type=click.Path())
@click.option("--workdir", default=None, type=click.Path(),
              help="Where generated data goes (default: a temporary directory).")
@click.option("--dry-run", is_flag=True, help="Print the plan and run nothing.")
@pass_ctx
@click.pass_context
def bench_cmd(cctx, ctx, what, where, shapes, sizes, datas, repeat, methods, targets,
              repo_files, repo_size, memory_size, inventory_files, hash_size, node_mbit,
              mayor_mbit, uplink_mbit, outdir, workdir, dry_run):
    """Run legacy and MPI methods side by side and record every run under results/.

    WHAT is a workload (stage, sync, collect, run, memory, inventory; all = stage and
    sync) or a named suite (default: the README's comparison; quick: one size, 8 nodes,
    fewer repeats; service: issue 19's targets, the long-running MPI service against
    fresh mpiexec and the legacy tools; shell: issue 17's, `chiba-admin shell` against
    separate launches, srun and MPICH's mpiexec). A named suite's plan is fixed: only --where, --out, --workdir, the link
    rates and --dry-run apply.
    """
    from ..bench import sites, suites

    site_kind = sites.resolve_where(where)
    if what in suites.SUITES:
        given = [p.opts[0] for p in cctx.command.params if p.name not in _NAMED_OK
                 and cctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise UsageError(f"{', '.join(given)} does not apply to the named suite {what}",
                             hint="use `bench stage|sync|...` for a plan of your own")
        plan, suite = suites.SUITES[what](site_kind), what
    else:
        data_list = [d for d in datas.split(",") if d]
        bad = set(data_list) - {"random", "tree"}
        if bad or not data_list:
            raise UsageError(f"unknown --data {', '.join(sorted(bad)) or repr(datas)}",
                             hint="random and/or tree")
        stage_m, collect_m, sync_m, run_m = _methods(methods)
        chosen = {"stage": stage_m, "collect": collect_m, "sync": sync_m, "run": run_m}
        if not chosen.get(what, True) or (what == "all" and not (stage_m or sync_m)):
            raise UsageError(f"--methods {methods} names no {what} method",
                             hint=_METHOD_HINT)
        plan = suites.plan_from_options(
            what, shapes=sites.parse_shapes(shapes or ("2x4,4x8" if site_kind == "testbed"
                                                       else "2x4")),
            sizes=_sizes(sizes), datas=data_list, repeat=repeat, stage_methods=stage_m,
            collect_methods=collect_m, sync_methods=sync_m, run_methods=run_m,
            targets=_ints(targets, "--targets"), repo_files=repo_files,
            repo_size=_sizes(repo_size, "--repo-size")[0],
            memory_size=_sizes(memory_size, "--memory-size")[0],
            inventory_files=inventory_files, hash_size=_sizes(hash_size, "--hash-size")[0])
        suite = None
    if dry_run:
        steps = suites.describe_plan(plan, site_kind)
        if ctx.json:
            print_json({"where": site_kind, "suite": suite, "plan": steps})
        else:
            for s in steps:
                head = f"{s.pop('workload')} on {s.pop('site')} {s.pop('shape') or ''}"
                click.echo(f"{head}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
        return 0
    work = Path(tempfile.mkdtemp(prefix="chiba-bench-", dir=workdir))
    con = get_err_console()
    try:
        written = suites.run_plan(
            plan, suite=suite, where=site_kind, workdir=work, outdir=Path(outdir),
            node_mbit=node_mbit, mayor_mbit=mayor_mbit, uplink_mbit=uplink_mbit,
            on_run=None if ctx.quiet else _say,
            on_site=lambda kind, shape: con.print(Text(
                f"{what} on the {kind} cluster, {shape[0]} towns x {shape[1]} nodes"
                if shape else f"{what} on this machine", style="bold")))
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


@click.command("report")
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--plot", "plot_dir", default=None, type=click.Path(),
              help="Write PNG figures of both comparisons into this directory.")
@click.option("--markdown", is_flag=True, help="Print Markdown tables (for sharing).")
@click.option("--predict", is_flag=True,
              help="Add each measured testbed point predicted by SimGrid (rows marked "
                   "predicted; see `chiba-admin predict`).")
@click.option("--shipped", is_flag=True,
              help="Show the records shipped with chiba-admin (docs/results/).")
@pass_ctx
def report_cmd(ctx, files, plot_dir, markdown, shipped, predict):
    """Compare legacy and MPI tools from recorded runs (default: every file in results/,
    or the records shipped in docs/results/ when results/ has none)."""
    from ..bench import aggregate, records, render

    if shipped and files:
        raise UsageError("--shipped and FILES name different records", hint="give one")
    src = records.find_records(list(files), shipped_only=shipped)
    d = aggregate.report_dict(src.records)
    d["note"], d["shipped"] = src.note, src.shipped
    predicted = None
    if predict:
        from ..predict.engine import require_simgrid
        from ..predict.runner import check_records

        from . import predict as pr

        require_simgrid()  # one line and exit 2 when SimGrid is missing
        predicted = check_records(src.records)
        d["predicted"] = predicted
        d["predicted_paper"] = pr.paper_predictions(str(pr.CHIBA))  # Figures 1, 2 at scale
    if plot_dir:
        d["figures"] = render.plot(d, plot_dir)
    if ctx.json:
        print_json(d)
    elif markdown:
        click.echo(render.to_markdown(d))
    else:
        render.render_rich(d, get_console())
        for f in d.get("figures", []):
            get_console().print(f"figure: {f}")
        if predicted is not None:
            from .predict import render_check

            if predicted["rows"]:
                render_check(predicted)
            else:
                get_console().print("predicted: no testbed staging or sync runs to predict")
            from .predict import render_paper

            render_paper(d["predicted_paper"])
    return 0


def register(group: click.Group) -> None:
    group.add_command(bench_cmd)
    group.add_command(report_cmd)
