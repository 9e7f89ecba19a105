"""Comparative reports from recorded benchmark runs: aggregate, then render as rich, markdown or JSON.

Every figure printed is computed from the run records passed in (medians of measured
times and byte counters); nothing is estimated, and a cell without measurements is "-".
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .errors import UsageError

__all__ = ["SCHEMA", "load_records", "aggregate", "stage_rows", "sync_rows", "code_size_rows",
           "to_markdown", "render_rich", "plot", "report_dict"]

SCHEMA = "chiba-bench/1"


def load_records(paths: list[str | Path]) -> list[dict]:
    """Read result files (or every ``*.json`` in given directories); newest last."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError("result file not found", where=str(p),
                             hint="run `chiba-admin bench` first or name files under results/")
    records = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read result file: {e}", where=str(f)) from None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            continue  # other benchmarks' JSON (inventory, ...) share results/
        rec["_file"] = str(f)
        records.append(rec)
    if not records:
        raise UsageError("no benchmark records found", where=", ".join(map(str, paths)),
                         hint="run `chiba-admin bench stage` or `make bench` first")
    return records


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(records: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by what they measured (suite, cluster, scale, workload, method)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        cl = rec["cluster"]
        for run in rec["runs"]:
            if run["workload"] == "stage":
                key = ("stage", cl["kind"], run["nodes"], run["data"], run["size_bytes"],
                       run["method"], run.get("algorithm") or "")
            else:
                key = ("sync", cl["kind"], run["targets"], run["scenario"], run["method"], "")
            groups[key].append({**run, "_cluster": cl})
    return groups


def _label(method: str, algorithm: str) -> str:
    return {"transit": "City Transit", "rsync": "rsync"}.get(
        method, f"MPI {algorithm}" if algorithm else "mpisync" if method == "mpi" else method)


def _workload_rows(records: list[dict], workload: str, legacy: str, fields) -> list[dict]:
    """Rows of one workload: what every comparison shows, then ``fields(key, runs, ok, med)``,
    then the speed-up over the ``legacy`` method measured at the same scale.

    Keys are (workload, cluster kind, *scale, method, algorithm), so ``key[1:-2]`` names
    one comparison and ``key[-2]`` the method.
    """
    rows, base = [], {}
    for key, runs in aggregate(records).items():
        if key[0] != workload:
            continue
        ok = [r for r in runs if r["ok"]]
        med = _median([r["seconds"] for r in ok])
        row = {"runs": len(runs), "failures": len(runs) - len(ok), "median_s": med,
               "president_bytes": _median([(r.get("nic") or {}).get("president_tx")
                                           for r in ok]),
               **fields(key, runs, ok, med)}
        if key[-2] == legacy and med:
            base[key[1:-2]] = med
        rows.append((key[1:-2], row))
    for scale, row in rows:
        b = base.get(scale)
        row["speedup_vs_legacy"] = (b / row["median_s"]) if b and row["median_s"] else None
    return [row for _, row in rows]


def stage_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, nodes, data, size, method): medians and ratios."""
    def fields(key, runs, ok, med):
        _, kind, nodes, data, size, method, alg = key
        node_bps = runs[0]["_cluster"].get("node_bps")
        return {
            "cluster": kind, "nodes": nodes, "data": data, "size_bytes": size,
            "method": method, "algorithm": alg, "label": _label(method, alg),
            "min_s": min((r["seconds"] for r in ok), default=None),
            "max_s": max((r["seconds"] for r in ok), default=None),
            "per_node_mbps": (size * 8 / med / 1e6) if med else None,
            "aggregate_mbps": (size * 8 * nodes / med / 1e6) if med else None,
            "efficiency": (size * 8 / node_bps / med) if med and node_bps else None,
            "mayors_bytes": _median([(r.get("nic") or {}).get("mayors_town_tx") for r in ok]),
            "launch_s": _median([(r.get("phases") or {}).get("launch") for r in ok]),
        }

    rows = _workload_rows(records, "stage", "transit", fields)
    rows.sort(key=lambda r: (r["cluster"], r["nodes"], r["data"], r["size_bytes"],
                             r["method"] != "transit", r["algorithm"]))
    return rows


def sync_rows(records: list[dict]) -> list[dict]:
    """One row per (cluster kind, targets, scenario, method): medians, bound and ratios."""
    def fields(key, runs, ok, med):
        _, kind, targets, scenario, method, _ = key
        pres_bps = runs[0]["_cluster"].get("mayor_bps")
        changed = _median([r.get("changed_bytes") for r in runs])
        bound = (changed * 8 / pres_bps) if changed is not None and pres_bps else None
        # mpisync reports its phases: the transfer alone against the bound shows how much
        # of the gap is moving bytes and how much is starting and ending the job
        xfer = _median([(r.get("phases") or {}).get("transfer") for r in ok])
        return {
            "cluster": kind, "targets": targets, "scenario": scenario, "method": method,
            "label": _label(method, ""), "completed": len(ok) == len(runs),
            "changed_bytes": changed, "bound_s": bound,
            "vs_bound": (med / bound) if med and bound else None,
            "transfer_s": xfer, "transfer_vs_bound": (xfer / bound) if xfer and bound else None,
        }

    rows = _workload_rows(records, "sync", "rsync", fields)
    order = {"full": 0, "changed": 1, "nochange": 2}
    rows.sort(key=lambda r: (r["cluster"], r["targets"], order.get(r["scenario"], 9),
                             r["method"] != "rsync"))
    return rows


def code_size_rows(records: list[dict]) -> list[dict]:
    """Lines of code of each tool's implementation, as recorded with the newest run."""
    for rec in reversed(records):
        sizes = rec.get("env", {}).get("code_lines")
        if sizes:
            return [{"tool": k, "lines": v["lines"], "files": v["files"]}
                    for k, v in sizes.items()]
    return []


def report_dict(records: list[dict]) -> dict:
    kinds = sorted({r["cluster"]["kind"] for r in records})
    return {"clusters": kinds, "files": [r["_file"] for r in records],
            "environment": records[-1].get("env", {}),
            "stage": stage_rows(records), "sync": sync_rows(records),
            "code_size": code_size_rows(records)}


# -- rendering ------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}", dash="-"):
    return dash if x is None else fmt.format(x)


def _mb(x):
    return "-" if x is None else f"{x / 1e6:.1f}"


STAGE_COLS = [("nodes", "nodes", str), ("data", "data", str),
              ("size MB", "size_bytes", _mb), ("method", "label", str),
              ("median s", "median_s", _f), ("per-node Mb/s", "per_node_mbps", _f),
              ("aggregate Mb/s", "aggregate_mbps", lambda x: _f(x, "{:.1f}")),
              ("efficiency", "efficiency", _f), ("x legacy", "speedup_vs_legacy", _f),
              ("launch s", "launch_s", _f),
              ("president MB", "president_bytes", _mb), ("mayors MB", "mayors_bytes", _mb),
              ("runs", "runs", str), ("failed", "failures", str)]
SYNC_COLS = [("targets", "targets", str), ("scenario", "scenario", str),
             ("method", "label", str), ("median s", "median_s", _f),
             ("bound s", "bound_s", _f), ("x bound", "vs_bound", _f),
             ("transfer s", "transfer_s", _f), ("transfer x bound", "transfer_vs_bound", _f),
             ("x rsync", "speedup_vs_legacy", _f), ("president MB", "president_bytes", _mb),
             ("completed", "completed", lambda b: "yes" if b else "NO"),
             ("runs", "runs", str)]

EMBEDDED_BANNER = ("EMBEDDED CLUSTER: hosts are directories on one machine and every link is "
                   "a memory copy. These times say nothing about networks; run `make bench` "
                   "as root for the namespace testbed.")


def _tables(d: dict):
    for kind in d["clusters"]:
        st = [r for r in d["stage"] if r["cluster"] == kind]
        sy = [r for r in d["sync"] if r["cluster"] == kind]
        yield kind, st, sy


def to_markdown(d: dict) -> str:
    out = []
    for kind, st, sy in _tables(d):
        out.append(f"## Results on the {kind} cluster\n")
        if kind == "embedded":
            out.append(f"> **{EMBEDDED_BANNER}**\n")
        for title, rows, cols in (("Staging (Figure 1)", st, STAGE_COLS),
                                  ("Synchronisation (Figure 2)", sy, SYNC_COLS)):
            if not rows:
                continue
            out.append(f"### {title}\n")
            out.append("| " + " | ".join(c[0] for c in cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            for r in rows:
                out.append("| " + " | ".join(fn(r[k]) for _, k, fn in cols) + " |")
            out.append("")
    if d["code_size"]:
        out.append("### Code size\n\n| tool | lines of code | files |\n|---|---|---|")
        out += [f"| {r['tool']} | {r['lines']} | {r['files']} |" for r in d["code_size"]]
        out.append("")
    env = d["environment"]
    if env:
        out.append(f"_Measured {env.get('date', '?')} at commit {env.get('git_commit', '?')}, "
                   f"{env.get('mpi_library', '?')}, {env.get('cpus', '?')} CPUs._\n")
    return "\n".join(out)


def render_rich(d: dict, console) -> None:
    from rich.panel import Panel
    from rich.table import Table

    for kind, st, sy in _tables(d):
        if kind == "embedded":
            console.print(Panel(EMBEDDED_BANNER, style="bold yellow", title="note"),
                          soft_wrap=False)
        for title, rows, cols in (("Staging: City Transit vs MPI (paper Figure 1)", st,
                                   STAGE_COLS),
                                  ("Synchronisation: rsync vs mpisync (paper Figure 2)", sy,
                                   SYNC_COLS)):
            if not rows:
                continue
            t = Table(title=f"{title} — {kind} cluster")
            for name, _k, _fn in cols:
                t.add_column(name, justify="left" if name in ("data", "method", "scenario")
                             else "right")
            for r in rows:
                t.add_row(*[fn(r[k]) for _, k, fn in cols])
            console.print(t)
    if d["code_size"]:
        t = Table(title="Code size of each tool's implementation")
        t.add_column("tool")
        t.add_column("lines of code", justify="right")
        t.add_column("files", justify="right")
        for r in d["code_size"]:
            t.add_row(r["tool"], str(r["lines"]), str(r["files"]))
        console.print(t)
    env = d["environment"]
    if env:
        console.print(f"measured {env.get('date', '?')} at commit {env.get('git_commit', '?')}"
                      f"; {env.get('mpi_library', '?')}; {env.get('cpus', '?')} CPUs; "
                      f"files: {', '.join(d['files'])}", markup=False)


def _bars(ax, rows, xkey, ykey, labels, ylabel, title):
    """Grouped bars: one group per ``xkey`` value, one bar per label (method)."""
    xs = sorted({r[xkey] for r in rows})
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        pts = [(i + (j - (len(labels) - 1) / 2) * width,
                next((r[ykey] for r in rows if r[xkey] == x and r["label"] == label
                      and r[ykey] is not None), None)) for i, x in enumerate(xs)]
        # a case that was not measured gets no bar, never a zero
        pts = [(p, y) for p, y in pts if y is not None]
        if not pts:
            continue
        bars = ax.bar([p for p, _ in pts], [y for _, y in pts], width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return xs


def plot(d: dict, outdir: str | Path) -> list[str]:
    """PNG figures of the two comparisons; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, st, sy in _tables(d):
        note = " (embedded: no network)" if kind == "embedded" else ""
        if st:
            cases = sorted({(r["data"], r["size_bytes"]) for r in st})
            fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.6),
                                     squeeze=False)
            for ax, (data, size) in zip(axes[0], cases):
                rows = [r for r in st if (r["data"], r["size_bytes"]) == (data, size)]
                labels = sorted({r["label"] for r in rows}, key=lambda l: (l != "City Transit", l))
                xs = _bars(ax, rows, "nodes", "aggregate_mbps", labels,
                           "aggregate throughput (Mb/s)",
                           f"staging {size / 1e6:.0f} MB {data}{note}")
                lr = d["environment"].get("cluster", {}).get("node_bps")
                if lr and kind != "embedded":
                    for i, x in enumerate(xs):
                        ax.hlines(x * lr / 1e6, i - 0.45, i + 0.45, colors="black",
                                  linestyles="--", label="line rate" if i == 0 else None)
                ax.set_xlabel("nodes")
                ax.legend(fontsize=8)
            fig.tight_layout()
            f = out / f"staging-{kind}.png"
            fig.savefig(f, dpi=110)
            plt.close(fig)
            written.append(str(f))
        if sy:
            scen = [s for s in ("full", "changed", "nochange") if any(r["scenario"] == s
                                                                       for r in sy)]
            fig, axes = plt.subplots(1, len(scen), figsize=(5.5 * len(scen), 4.4),
                                     squeeze=False)
            for ax, s in zip(axes[0], scen):
                rows = [r for r in sy if r["scenario"] == s]
                labels = sorted({r["label"] for r in rows}, key=lambda l: (l != "rsync", l))
                xs = _bars(ax, rows, "targets", "median_s", labels, "median time (s)",
                           f"sync: {s}{note}")
                if s != "nochange":
                    for i, x in enumerate(xs):
                        b = next((r["bound_s"] for r in rows if r["targets"] == x
                                  and r["bound_s"]), None)
                        if b:
                            ax.hlines(b, i - 0.45, i + 0.45, colors="black", linestyles="--",
                                      label="bound" if i == 0 else None)
                ax.set_xlabel("targets")
                ax.legend(fontsize=8)
            fig.tight_layout()
            f = out / f"sync-{kind}.png"
            fig.savefig(f, dpi=110)
            plt.close(fig)
            written.append(str(f))
    return written
