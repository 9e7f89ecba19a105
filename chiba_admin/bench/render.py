"""Report output: rich tables, Markdown and PNG figures from ``aggregate.report_dict``.

Nothing here computes a figure; it formats rows. A cell without measurements is "-".
"""

from __future__ import annotations

from pathlib import Path

from .aggregate import CPU_BOUND

__all__ = ["EMBEDDED_BANNER", "CPU_NOTE", "TABLES", "to_markdown", "render_rich", "plot"]


def _f(x, fmt="{:.2f}", dash="-"):
    return dash if x is None else fmt.format(x)


def _s(x):
    return "-" if x is None else str(x)


def _mb(x):
    return "-" if x is None else f"{x / 1e6:.1f}"


def _busy(x):
    return "-" if x is None else f"{x * 100:.0f}%" + ("*" if x >= CPU_BOUND else "")


def _yes(b):
    return "-" if b is None else "yes" if b else "NO"


_CPU = ("CPU busy", "cpu_busy", _busy)
STAGE_COLS = [("nodes", "nodes", _s), ("data", "data", _s),
              ("size MB", "size_bytes", _mb), ("method", "label", _s),
              ("median s", "median_s", _f), ("per-node Mb/s", "per_node_mbps", _f),
              ("aggregate Mb/s", "aggregate_mbps", lambda x: _f(x, "{:.1f}")),
              ("efficiency", "efficiency", _f),
              ("transfer eff", "transfer_efficiency", _f),
              ("x legacy", "speedup_vs_legacy", _f), ("x mpiexec", "speedup_vs_mpiexec", _f),
              ("launch s", "launch_s", _f),
              ("president MB", "president_bytes", _mb), ("mayors MB", "mayors_bytes", _mb),
              _CPU, ("runs", "runs", _s), ("failed", "failures", _s)]
COLLECT_COLS = [("nodes", "nodes", _s), ("data", "data", _s),
                ("MB per node", "size_bytes", _mb), ("method", "label", _s),
                ("median s", "median_s", _f),
                ("aggregate Mb/s", "aggregate_mbps", lambda x: _f(x, "{:.1f}")),
                ("efficiency", "efficiency", _f), ("x legacy", "speedup_vs_legacy", _f),
                ("x mpiexec", "speedup_vs_mpiexec", _f), ("president rx MB", "president_rx_bytes", _mb), _CPU, ("runs", "runs", _s),
                ("failed", "failures", _s)]
SYNC_COLS = [("targets", "targets", _s), ("scenario", "scenario", _s),
             ("method", "label", _s), ("median s", "median_s", _f),
             ("bound s", "bound_s", _f), ("x bound", "vs_bound", _f),
             ("transfer s", "transfer_s", _f), ("transfer x bound", "transfer_vs_bound", _f),
             ("x rsync", "speedup_vs_legacy", _f), ("x mpiexec", "speedup_vs_mpiexec", _f),
             ("president MB", "president_bytes", _mb),
             _CPU, ("completed", "completed", lambda b: "yes" if b else "NO"),
             ("runs", "runs", _s)]
MEMORY_COLS = [("nodes", "nodes", _s), ("size MB", "size_bytes", _mb),
               ("chunk", "chunk", _s), ("method", "label", _s),
               ("peak RSS MB (any rank)", "peak_rss", _mb),
               ("median host RSS MB", "median_host_rss", _mb), ("median s", "median_s", _f),
               _CPU, ("runs", "runs", _s), ("failed", "failures", _s)]
RUN_COLS = [("nodes", "nodes", _s), ("command", "command", _s), ("method", "label", _s),
            ("median s", "median_s", lambda x: _f(x, "{:.3f}")),
            ("min s", "min_s", lambda x: _f(x, "{:.3f}")),
            ("max s", "max_s", lambda x: _f(x, "{:.3f}")),
            ("x ssh", "speedup_vs_legacy", _f), ("x mpiexec", "speedup_vs_mpiexec", _f),
            ("target", "target", lambda x: x or "-"), ("met", "met", _yes), _CPU,
            ("runs", "runs", _s), ("failed", "failures", _s)]
SERVICE_COLS = [("metric", "metric", _s), ("hosts", "hosts", _s),
                ("ranks", "ranks", lambda x: _f(x, "{:.0f}")),
                ("median s", "median_s", _f), ("min s", "min_s", _f), ("max s", "max_s", _f),
                ("value", "value", lambda x: _f(x, "{:.2f}")), ("unit", "unit", _s),
                ("sample s", "sample_s", lambda x: _f(x, "{:.0f}")), _CPU,
                ("runs", "runs", _s), ("failed", "failures", _s)]
SHELL_COLS = [("nodes", "nodes", _s), ("case", "case", _s), ("method", "label", _s),
              ("median s", "median_s", lambda x: _f(x, "{:.3f}")),
              ("min s", "min_s", lambda x: _f(x, "{:.3f}")),
              ("max s", "max_s", lambda x: _f(x, "{:.3f}")),
              ("x shell", "vs_shell", _f), ("saved s", "saved_s", _f),
              ("shell / hydra", "ratio", _f), ("target", "target", lambda x: x or "-"),
              ("met", "met", _yes),
              ("inner launch", "inner_launch",
               lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) if d else "-"),
              _CPU, ("runs", "runs", _s), ("failed", "failures", _s)]
INVENTORY_COLS = [("metric", "metric", _s), ("value", "value", lambda x: _f(x, "{:.4g}")),
                  ("unit", "unit", _s), ("target", "target", lambda x: x or "-"),
                  ("met", "met", _yes), ("files", "files", _s), _CPU, ("runs", "runs", _s)]
CPU_COLS = [("op", "op", _s), ("tree", "tree", _s), ("files", "files", _s),
            ("size MB", "size_bytes", _mb), ("nodes", "nodes", _s), ("method", "label", _s),
            ("CPU s per node", "cpu_per_node_s", _f), ("per GB", "cpu_per_node_gb_s", _f),
            ("per 1,000 files", "cpu_per_kfile_s", lambda x: _f(x, "{:.3f}")),
            ("x Transit", "x_transit", _f), ("median s", "median_s", _f), _CPU,
            ("runs", "runs", _s), ("failed", "failures", _s)]

# (report_dict key, Markdown title, rich title, columns)
TABLES = [
    ("stage", "Staging (Figure 1)", "Staging: City Transit vs MPI (paper Figure 1)",
     STAGE_COLS),
    ("collect", "Collect (stage-out)", "Collect: City Transit vs MPI", COLLECT_COLS),
    ("sync", "Synchronisation (Figure 2)", "Synchronisation: rsync vs mpisync "
     "(paper Figure 2)", SYNC_COLS),
    ("run", "Run a trivial command", "run: ssh fan-out vs fresh mpiexec vs the service",
     RUN_COLS),
    ("service", "The MPI service's own costs", "The long-running MPI service: start time "
     "and idle CPU", SERVICE_COLS),
    ("shell", "The parallel shell (chiba-admin shell)", "chiba-admin shell: one launch "
     "against separate launches, srun and MPICH's mpiexec", SHELL_COLS),
    ("memory", "Memory per rank", "Peak memory per rank while staging", MEMORY_COLS),
    ("inventory", "Inventory (scan, hash, diff, apply)", "Inventory library on this machine",
     INVENTORY_COLS),
    ("cpu", "CPU per node", "CPU each node pays per method (embedded: every process's CPU "
     "to N nodes minus to 1, over N - 1)", CPU_COLS),
]
_LEFT = {"op", "tree", "data", "method", "scenario", "metric", "unit", "target", "chunk",
         "command", "case", "inner_launch"}

EMBEDDED_BANNER = ("EMBEDDED CLUSTER: hosts are directories on one machine and every link is "
                   "a memory copy. These times say nothing about networks; run `make bench` "
                   "as root for the namespace testbed.")
CPU_NOTE = (f"CPU busy: share of this machine's CPUs busy during the run (/proc/stat); "
            f"* marks {CPU_BOUND:.0%} or more, a run bound by the machine's cores rather "
            f"than by the emulated network.")
_WHERE = {"local": "this machine (no cluster)"}


def _tables(d: dict):
    """(cluster kind, [(key, md title, rich title, cols, rows)]) for kinds with rows."""
    for kind in d["clusters"]:
        out = [(key, md, rich, cols, [r for r in d.get(key, []) if r["cluster"] == kind])
               for key, md, rich, cols in TABLES]
        yield kind, [t for t in out if t[-1]]


def _where(kind: str) -> str:
    return _WHERE.get(kind, f"the {kind} cluster")


def _provenance_lines(d: dict) -> list[str]:
    return [f"{s['file']}: {s['suite']} on {_where(s['cluster'])}, commit {s['commit']}, "
            f"{s['date']}" + (" (stopped half-way: partial)" if s.get("partial") else "")
            for s in d.get("sources", [])]


def to_markdown(d: dict) -> str:
    """The report as Markdown (tables per cluster kind, code size, where the numbers come
    from)."""
    out = []
    if d.get("note"):
        out.append(f"> {d['note']}\n")
    for kind, tables in _tables(d):
        out.append(f"## Results on {_where(kind)}\n")
        if kind == "embedded":
            out.append(f"> **{EMBEDDED_BANNER}**\n")
        for _key, title, _rt, cols, rows in tables:
            out.append(f"### {title}\n")
            out.append("| " + " | ".join(c[0] for c in cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            for r in rows:
                out.append("| " + " | ".join(fn(r.get(k)) for _, k, fn in cols) + " |")
            out.append("")
    if d["code_size"]:
        out.append("### Code size\n\n| tool | lines of code | files |\n|---|---|---|")
        out += [f"| {r['tool']} | {r['lines']} | {r['files']} |" for r in d["code_size"]]
        out.append("")
    out.append(f"_{CPU_NOTE}_\n")
    env = d["environment"]
    if env:
        out.append(f"_Measured {env.get('date', '?')} at commit {env.get('git_commit', '?')}, "
                   f"{env.get('mpi_library', '?')}, {env.get('cpus', '?')} CPUs._\n")
    lines = _provenance_lines(d)
    if lines:
        out.append("_Records:_\n")
        out += [f"- {line}" for line in lines]
        out.append("")
    return "\n".join(out)


def render_rich(d: dict, console) -> None:
    """The report as rich tables on ``console``; banners for embedded and shipped records."""
    from rich.panel import Panel
    from rich.table import Table

    if d.get("note"):
        console.print(Panel(d["note"], style="bold cyan", title="shipped records"),
                      soft_wrap=False)
    for kind, tables in _tables(d):
        if kind == "embedded":
            console.print(Panel(EMBEDDED_BANNER, style="bold yellow", title="note"),
                          soft_wrap=False)
        for _key, _mt, title, cols, rows in tables:
            t = Table(title=f"{title} — {_where(kind)}")
            for name, _k, _fn in cols:
                t.add_column(name, justify="left" if _k in _LEFT or name == "method"
                             else "right")
            for r in rows:
                t.add_row(*[fn(r.get(k)) for _, k, fn in cols])
            console.print(t)
    if d["code_size"]:
        t = Table(title="Code size of each tool's implementation")
        t.add_column("tool")
        t.add_column("lines of code", justify="right")
        t.add_column("files", justify="right")
        for r in d["code_size"]:
            t.add_row(r["tool"], str(r["lines"]), str(r["files"]))
        console.print(t)
    console.print(CPU_NOTE, markup=False)
    env = d["environment"]
    if env:
        console.print(f"measured {env.get('date', '?')} at commit {env.get('git_commit', '?')}"
                      f"; {env.get('mpi_library', '?')}; {env.get('cpus', '?')} CPUs",
                      markup=False)
    for line in _provenance_lines(d):
        console.print(f"record {line}", markup=False, soft_wrap=True)


# One colour per method in every panel and figure (matplotlib's default cycle would give
# a method a different colour in each panel that shows fewer methods).
_COLORS = {"City Transit": "C0", "rsync": "C0", "MPI bcast": "C1", "MPI chain": "C2",
           "mpisync": "C2", "clush --copy": "C3", "pdcp": "C4", "sbcast": "C5",
           "sbcast (tree)": "C6"}


def _color(label: str) -> str:
    base = label.removesuffix(" (service)")
    return _COLORS.get(base, "C7" if base == label else "C8")


def _bars(ax, rows, xkey, ykey, labels, ylabel, title):
    """Grouped bars: one group per ``xkey`` value, one bar per label (method)."""
    xs = sorted({r[xkey] for r in rows})
    width = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        pts = [(i + (j - (len(labels) - 1) / 2) * width,
                next((r[ykey] for r in rows if r[xkey] == x and r["label"] == lab
                      and r[ykey] is not None), None)) for i, x in enumerate(xs)]
        # a case that was not measured gets no bar, never a zero
        pts = [(p, y) for p, y in pts if y is not None]
        if not pts:
            continue
        bars = ax.bar([p for p, _ in pts], [y for _, y in pts], width, label=lab,
                      color=_color(lab))
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return xs


def _staging_figure(plt, st, kind, note, node_bps):
    cases = sorted({(r["data"], r["size_bytes"]) for r in st})
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.6), squeeze=False)
    for ax, (data, size) in zip(axes[0], cases):
        rows = [r for r in st if (r["data"], r["size_bytes"]) == (data, size)]
        labels = sorted({r["label"] for r in rows}, key=lambda lab: (lab != "City Transit", lab))
        xs = _bars(ax, rows, "nodes", "aggregate_mbps", labels, "aggregate throughput (Mb/s)",
                   f"staging {size / 1e6:.0f} MB {data}{note}")
        if node_bps and kind != "embedded":
            for i, x in enumerate(xs):
                ax.hlines(x * node_bps / 1e6, i - 0.45, i + 0.45, colors="black",
                          linestyles="--", label="line rate" if i == 0 else None)
        ax.set_xlabel("nodes")
        ax.legend(fontsize=8)
    return fig


def _sync_figure(plt, sy, note):
    scen = [s for s in ("full", "changed", "nochange") if any(r["scenario"] == s for r in sy)]
    fig, axes = plt.subplots(1, len(scen), figsize=(5.5 * len(scen), 4.4), squeeze=False)
    for ax, s in zip(axes[0], scen):
        rows = [r for r in sy if r["scenario"] == s]
        labels = sorted({r["label"] for r in rows}, key=lambda lab: (lab != "rsync", lab))
        xs = _bars(ax, rows, "targets", "median_s", labels, "median time (s)",
                   f"sync: {s}{note}")
        if s != "nochange":
            for i, x in enumerate(xs):
                b = next((r["bound_s"] for r in rows if r["targets"] == x and r["bound_s"]),
                         None)
                if b:
                    ax.hlines(b, i - 0.45, i + 0.45, colors="black", linestyles="--",
                              label="bound" if i == 0 else None)
        ax.set_xlabel("targets")
        ax.legend(fontsize=8)
    return fig


def plot(d: dict, outdir: str | Path) -> list[str]:
    """PNG figures of the two comparisons (``staging-KIND.png``, ``sync-KIND.png``);
    returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, tables in _tables(d):
        note = " (embedded: no network)" if kind == "embedded" else ""
        rows = {key: r for key, _m, _t, _c, r in tables}
        figs = []
        if rows.get("stage"):
            node_bps = rows["stage"][0].get("link_bps")
            figs.append(("staging", _staging_figure(plt, rows["stage"], kind, note, node_bps)))
        if rows.get("sync"):
            figs.append(("sync", _sync_figure(plt, rows["sync"], note)))
        for name, fig in figs:
            fig.tight_layout()
            f = out / f"{name}-{kind}.png"
            fig.savefig(f, dpi=110)
            plt.close(fig)
            written.append(str(f))
    return written
