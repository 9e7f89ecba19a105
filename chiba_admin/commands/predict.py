"""`chiba-admin predict`: each method simulated (SimGrid) on a topology, and `--check`
against measured benchmark records."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import EXIT_OK, pass_ctx
from ..console import get_console, print_json
from ..errors import UsageError

__all__ = ["register", "predict_cmd", "render_check", "paper_predictions", "render_paper",
           "CHIBA"]

DEFAULT_NODES = "8,32,128,256"
CHIBA = Path(__file__).resolve().parent.parent.parent / "clusters" / "chiba-city.toml"


def _list(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in out if v not in allowed]
    if not out or bad:
        raise UsageError(f"bad {option} {value!r}", hint=f"choose from {', '.join(allowed)}")
    return out


def _rate(value: float | None) -> float | None:
    return value * 1e6 if value else None


def _topology(ctx, cluster: str | None, generate: str | None):
    """(TOML text, Topology, source): the --cluster file, or one generated like it."""
    from topology.loader import loads_topology

    path = cluster or ctx.cluster_file
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read the topology: {e.strerror or e}", where=path,
                         hint="give a topology TOML file with --cluster") from None
    topo = loads_topology(text, path)
    if generate:
        from topology.generate import generated_topology_toml

        try:
            towns, per = (int(x) for x in generate.lower().split("x"))
        except ValueError:
            raise UsageError(f"bad --generate {generate!r}",
                             hint="TOWNSxNODES, e.g. 313x32 for 10,016 nodes") from None
        town = topo.town_names()[0]
        text = generated_topology_toml(
            towns, per, topo.town_link(town).bandwidth,
            topo.link(topo.president.name, topo.towns[town]).bandwidth,
            name=f"{topo.name}-{towns}x{per}", uplink_bps=topo.town_uplink(town).bandwidth)
        path = f"{path} shape, {towns}x{per}"
        topo = loads_topology(text, path)
    return text, topo, path


@click.command("predict")
@click.argument("what", type=click.Choice(["stage", "sync", "all", "paper"]),
                required=False, default="all")
@click.option("--methods", default=None, metavar="LIST",
              help="Methods, comma-separated (stage: chain,bcast,transit,pdcp,sbcast; "
                   "sync: mpisync,rsync; default: all of WHAT's).")
@click.option("--sizes", default="1GiB", show_default=True, metavar="LIST",
              help="Bytes per node (stage) or changed bytes (sync), comma-separated.")
@click.option("--nodes", "nodes", default=None, metavar="LIST",
              help=f"Host counts (default {DEFAULT_NODES}, those the cluster has).")
@click.option("--cluster", "cluster", default=None, metavar="FILE",
              help="Topology file (default: the global --cluster).")
@click.option("--generate", default=None, metavar="TxN",
              help="Predict on a generated cluster of T towns of N nodes with the "
                   "topology's link rates (e.g. 313x32: 10,016 nodes).")
@click.option("--disk-mbit", type=click.FloatRange(min=0.001), default=None,
              help="Write rate of the president's and mayors' disks (City Transit's "
                   "store-and-forward copies; default: not limiting).")
@click.option("--files", type=click.IntRange(min=0), default=3000, show_default=True,
              help="Files in the synchronised repository.")
@click.option("--check", "check", multiple=True, metavar="RESULTS",
              help="Predict every measured testbed point of these records and print "
                   "predicted vs measured (repeatable; a directory reads its *.json).")
@click.option("--calibrate", "calibrate", multiple=True, metavar="RESULTS",
              help="Fit each method's host costs (start-up, exit, per-file work) to "
                   "these measured records first (repeatable).")
@click.option("--json", "json_output", is_flag=True, help="Print results as JSON.")
@click.option("--plot", "plot_dir", default=None, type=click.Path(), metavar="DIR",
              help="Write a PNG of time and aggregate throughput per method into DIR.")
@pass_ctx
def predict_cmd(ctx, what, methods, sizes, nodes, cluster, generate, disk_mbit, files,
                check, calibrate, json_output, plot_dir):
    """Predict each method's whole-command time, throughput and bytes per link class.

    ``paper``: the paper's Figures 1 and 2 on the topology (default here: Chiba City's,
    clusters/chiba-city.toml) beside the figures the paper reports."""
    from topology.units import parse_size

    from ..predict.engine import Calibration, require_simgrid
    from ..predict.models import STAGE_METHODS, SYNC_METHODS
    from ..predict.runner import check_records, predict_points

    as_json = json_output or ctx.json
    if check:
        from ..bench.records import load_records

        records = load_records(list(check))
        require_simgrid()
        out = check_records(records, Calibration(disk_bps=_rate(disk_mbit)))
        if not out["rows"]:
            raise UsageError("no testbed staging or sync runs in these records",
                             where=", ".join(check),
                             hint="run `make bench-quick` as root on the testbed first")
        print_json(out) if as_json else render_check(out)
        return EXIT_OK
    if what == "paper":
        require_simgrid()
        out = paper_predictions(cluster or str(CHIBA), Calibration(disk_bps=_rate(disk_mbit)))
        print_json(out) if as_json else render_paper(out)
        return EXIT_OK
    allowed = {"stage": STAGE_METHODS, "sync": SYNC_METHODS,
               "all": STAGE_METHODS + SYNC_METHODS}[what]
    chosen = _list(methods, allowed, "--methods") if methods else list(allowed)
    try:
        size_list = [parse_size(s) for s in sizes.split(",") if s]
    except ValueError as e:
        raise UsageError(f"bad --sizes: {e}", hint="e.g. --sizes 1GiB,64MiB") from None
    if not size_list:
        raise UsageError("bad --sizes: empty", hint="e.g. --sizes 1GiB")
    text, topo, source = _topology(ctx, cluster, generate)
    if nodes:
        try:
            counts = [int(v) for v in nodes.split(",") if v]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            raise UsageError(f"bad --nodes {nodes!r}", hint="e.g. --nodes 8,32,128")
    else:
        have = len(topo.nodes)
        counts = [n for n in map(int, DEFAULT_NODES.split(",")) if n <= have] or [have]
    require_simgrid()
    jobs = [{"method": m, "n": n, "bytes": s, "files": files}
            for m in chosen for s in size_list for n in counts]
    calib = Calibration(disk_bps=_rate(disk_mbit))
    if calibrate:
        from ..bench.records import load_records

        fitted = check_records(load_records(list(calibrate)), calib)
        if not fitted["rows"]:
            raise UsageError("no testbed staging or sync runs to calibrate with",
                             where=", ".join(calibrate))
        calib = Calibration.from_dict(fitted["calibration"])
    results = predict_points(text, topo, jobs, calib, source)
    out = {"topology": source, "nodes_total": len(topo.nodes), "calibration": calib.to_dict(),
           "predictions": results}
    if plot_dir:
        out["figures"] = _plot(results, plot_dir, topo.name)
    print_json(out) if as_json else _render(out)
    return EXIT_OK


def _mb(bps: float) -> str:
    return f"{bps / 1e6:,.1f}"


def _render(out: dict) -> None:
    from rich.table import Table
    from topology.units import format_bytes

    t = Table(title=f"Predicted on {out['topology']} (SimGrid; {out['calibration']['source']})")
    for col in ("method", "hosts", "bytes", "seconds", "per node Mb/s", "aggregate Mb/s",
                "core GB", "uplink GB", "town GB", "note", "wall s"):
        t.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in out["predictions"]:
        b = r["bytes_by_class"]
        note = r.get("algorithm") or ("extrapolated" if r.get("extrapolated") else "")
        t.add_row(r["method"], str(r["hosts"]), format_bytes(r["bytes"]), f"{r['seconds']:,.1f}",
                  _mb(r["per_node_bps"]), _mb(r["aggregate_bps"]),
                  *(f"{b[k] / 1e9:,.2f}" for k in ("core", "uplink", "town")), note,
                  f"{r['wall_seconds']:.1f}")
    get_console().print(t)


def render_check(out: dict) -> None:
    """The predicted-vs-measured table of ``check_records`` (also `report --predict`)."""
    from rich.table import Table
    from topology.units import format_bytes

    con = get_console()
    t = Table(title="Predicted vs measured (testbed records; predicted: SimGrid + fitted "
                    "host costs)")
    for col in ("workload", "method", "launch", "hosts", "bytes", "scenario", "shape",
                "record", "runs", "measured s", "network s", "predicted s", "error",
                "left out", "pres. sent MB"):
        t.add_column(col, justify="left" if col in ("workload", "method", "launch",
                                                    "scenario", "shape",
                                                    "record") else "right")
    for r in out["rows"]:
        err = f"{r['error'] * 100:+.1f}%" if r["error"] is not None else "-"
        loo = f"{r['loo_error'] * 100:+.1f}%" if r["loo_error"] is not None else "-"
        runs = (f"{r['runs']} ({r['measured_min']:.1f}-{r['measured_max']:.1f})"
                if r["runs"] > 1 else "1")
        t.add_row(r["workload"], r["method"], r.get("launch") or "", str(r["hosts"]),
                  format_bytes(r["bytes"]), r["scenario"] or "", r["shape"],
                  _record_tag(r["source"]), runs, f"{r['measured']:.1f}",
                  f"{r['network_seconds']:.1f}", f"{r['predicted']:.1f}", err, loo,
                  _tx_pair(r))
    con.print(t)
    if out["max_abs_error"] is not None:
        within = sum(1 for r in out["rows"] if abs(r["error"]) <= 0.15)
        con.print(f"{within} of {len(out['rows'])} points within 15%; largest error "
                  f"{out['max_abs_error']:.1%}")
    con.print("measured s: median of the runs; network s: simulated (SimGrid); predicted "
              "adds the host costs (start-up, exit, per-file work) of the point's method, "
              "launch and scenario, times its record's load factor, fitted to all points "
              "(error) or to all but this one (left out; - when nothing else predicts it); "
              "pres. sent MB: the bytes the president's NIC sent, measured / simulated "
              "(measured counts TCP, ssh and Slurm framing: a few % more)")
    for line in out["fit"] + [out.get("fit_load") or ""]:
        if line:
            con.print(f"fit: {line}")
    if out["not_modelled"]:
        n = len(out["not_modelled"])
        con.print(f"not predicted: {n} run(s) (collect, run, service start and other "
                  "workloads have no model; failed runs are left out)")


def _tx_pair(r: dict) -> str:
    got, sim = r.get("president_tx_measured"), r.get("president_tx_predicted")
    if got is None or sim is None:
        return "-"
    return f"{got / 1e6:.0f} / {sim / 1e6:.0f}"


def paper_predictions(path: str, calib=None) -> dict:
    """Figures 1 and 2 of the paper predicted on the topology at ``path`` (predict/paper.py),
    with the paper's reported numbers and why they differ."""
    from topology.loader import loads_topology

    from ..predict.engine import Calibration
    from ..predict.paper import paper_jobs, paper_rows, explain
    from ..predict.runner import predict_points

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read the topology: {e.strerror or e}", where=path) from None
    topo = loads_topology(text, path)
    jobs = paper_jobs(topo)
    calib = calib or Calibration()
    results = predict_points(text, topo, jobs, calib, path)
    rows = paper_rows(jobs, results)
    return {"topology": path, "rows": rows, "explained": explain(rows),
            "calibration": calib.to_dict()}


def render_paper(out: dict) -> None:
    """The Figure 1 and 2 tables of ``paper_predictions`` (rows marked predicted)."""
    from rich.table import Table

    con = get_console()
    for fig, title in ((1, "Figure 1: staging 1 GiB, aggregate Mb/s"),
                       (2, "Figure 2: full sync of 150 MiB / 3,000 files")):
        t = Table(title=f"{title} on {Path(out['topology']).name} (predicted, SimGrid)")
        for col in ("", "method", "hosts", "seconds", "aggregate Mb/s", "per node Mb/s",
                    "paper Mb/s", "note"):
            t.add_column(col, justify="left" if col in ("", "method", "note") else "right")
        for r in (r for r in out["rows"] if r["figure"] == fig):
            t.add_row("predicted", r["method"], str(r["hosts"]), f"{r['seconds']:,.1f}",
                      f"{r['aggregate_mbps']:,.1f}", f"{r['per_node_mbps']:,.2f}",
                      f"{r['paper_mbps']:.0f} (paper)" if r["paper_mbps"] else "",
                      r["note"] or (r["algorithm"] or ""))
        con.print(t)
    for line in out["explained"]:
        con.print(f"- {line}")


def _record_tag(source: str) -> str:
    """A record's file name without its suite's date prefix noise: "service 0933"."""
    stem = source.removesuffix(".json")
    parts = stem.split("-")
    return f"{parts[0]} {parts[-1][:4]}" if len(parts) > 2 else stem


def _plot(results: list[dict], outdir: str, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(outdir).mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in results))
    for m in methods:
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["hosts"])
        xs = [r["hosts"] for r in rs]
        a1.plot(xs, [r["seconds"] for r in rs], marker="o", label=m)
        a2.plot(xs, [r["aggregate_bps"] / 1e6 for r in rs], marker="o", label=m)
    a1.set(xlabel="hosts", ylabel="predicted seconds", xscale="log", yscale="log")
    a2.set(xlabel="hosts", ylabel="aggregate Mb/s", xscale="log", yscale="log")
    a1.legend()
    fig.suptitle(f"chiba-admin predict: {name} (SimGrid)")
    path = Path(outdir) / f"predict-{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [str(path)]


def register(group: click.Group) -> None:
    group.add_command(predict_cmd)
