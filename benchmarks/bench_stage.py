"""Benchmark staging: MPI chain vs MPI bcast (vs City Transit), embedded and on the testbed.

    python benchmarks/bench_stage.py --out results/stage.json [--nodes 8] [--size 64M]
                                     [--repeat 3] [--where embedded,testbed] [--memory 1G]

Each case is run ``--repeat`` times in the same invocation and the median is reported:
wall time of the whole command (pack, launch, download, transfer, unpack, verify, commit),
each phase, per-node throughput and efficiency = (payload / node link rate) / time. The
embedded cluster has no links (all "links" are memory copies), so there only raw times
are reported. The memory case stages ``--memory`` bytes with 4 MiB chunks on the embedded
cluster and reports every rank's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from topology import parse_size  # noqa: E402

__all__ = ["main"]

NODE_BPS, MAYOR_BPS = 20e6, 200e6


def _make_data(work: Path, size: int) -> dict[str, str]:
    """An incompressible single file and a compressible tree of text, both ``size`` bytes."""
    from chiba_admin.benchdata import make_random, make_text_tree

    inc = make_random(work / "incompressible", size, seed=7)
    tree = make_text_tree(work / "compressible", size, files=64, seed=7)
    return {"incompressible": str(inc), "compressible": str(tree)}


def _embedded_toml(nodes: int) -> str:
    """An embedded Chiba City with at least ``nodes`` nodes in 2 or 4 towns (use the first)."""
    from topology.generate import generated_topology_toml

    towns = 2 if nodes <= 8 else 4
    return generated_topology_toml(towns, -(-nodes // towns), NODE_BPS, MAYOR_BPS, name="bench")


def _summary(runs: list[dict], payload: int, link_bps: float | None) -> dict:
    """Median of the runs' wall time and phases, with throughput and efficiency."""
    secs = statistics.median(r["seconds"] for r in runs)
    phases: dict[str, float] = {}
    for k in runs[0].get("phases", {}):
        vals = [r["phases"][k] for r in runs if k in r.get("phases", {})]
        phases[k] = statistics.median(vals)
    per_node = statistics.median(
        statistics.median(h["throughput_bps"] for h in r["hosts"].values()) for r in runs)
    out = {"runs": len(runs), "ok": all(r["ok"] for r in runs), "seconds": secs,
           "seconds_all": [r["seconds"] for r in runs], "phases": phases,
           "archive_bytes": runs[0]["bytes"], "payload_bytes": payload,
           "node_throughput_bps": per_node,
           "peak_rss": max((r.get("peak_rss") or 0) for r in runs) or None}
    if link_bps:
        line = payload * 8 / link_bps
        out["line_rate_seconds"] = line
        out["efficiency"] = line / secs
        if "transfer" in phases:
            out["transfer_efficiency"] = runs[0]["bytes"] * 8 / link_bps / phases["transfer"]
    if runs[0].get("infrastructure_bytes"):
        out["infrastructure_bytes"] = runs[len(runs) // 2]["infrastructure_bytes"]
    return out


def _run_embedded(args, data: dict[str, str], work: Path) -> dict:
    from chiba_admin.embedded import bind, init_cluster
    from mpitools.staging import stage_mpi
    from topology import loads_topology

    topo = bind(loads_topology(_embedded_toml(args.nodes), "bench.toml"), work / "state")
    init_cluster(topo)
    nodes = [h.name for h in topo.nodes][:args.nodes]
    res: dict = {"note": "embedded cluster: no links, every rank on this machine; raw "
                         "times only, no efficiency", "nodes": len(nodes), "cases": {}}
    for name, src in data.items():
        payload = _tree_bytes(src)
        for algo in args.algorithms:
            runs = []
            for _ in range(args.repeat):
                if algo == "transit":
                    from legacy_transit.transit import stage_transit

                    r = stage_transit(topo, src, nodes, "bench")
                else:
                    r = stage_mpi(topo, src, nodes, "bench", algorithm=algo, chunk=args.chunk)
                runs.append(r)
                _clean_scratch(topo, nodes)
            res["cases"][f"{name}/{algo}"] = _summary(runs, payload, None)
            _log(f"embedded {name}/{algo}", res["cases"][f"{name}/{algo}"])
    return res


def _run_memory(args, work: Path) -> dict:
    """Peak RSS of every rank staging ``--memory`` bytes with 4 MiB chunks (embedded)."""
    from chiba_admin.embedded import bind, init_cluster
    from mpitools.staging import stage_mpi
    from topology import loads_topology

    src = work / "memory"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        for _ in range(args.memory // (8 << 20)):
            f.write(os.urandom(8 << 20))
    topo = bind(loads_topology(_embedded_toml(4), "mem.toml"), work / "memstate")
    init_cluster(topo)
    nodes = [h.name for h in topo.nodes][:4]
    out = {"bytes": args.memory, "chunk": 4 << 20, "nodes": len(nodes), "cases": {}}
    for algo in ("chain", "bcast"):
        r = stage_mpi(topo, str(src), nodes, "mem", algorithm=algo, chunk=4 << 20)
        out["cases"][algo] = {"ok": r["ok"], "seconds": r["seconds"],
                              "peak_rss": r.get("peak_rss"),
                              "rss_by_host": {h: v.get("maxrss") for h, v in r["hosts"].items()}}
        _clean_scratch(topo, nodes)
        _log(f"memory {algo}", out["cases"][algo])
    shutil.rmtree(src)
    return out


def _run_testbed(args, data: dict[str, str], work: Path, nodes: int) -> dict:
    import testbed

    towns, per = (2, nodes // 2) if nodes <= 8 else (4, nodes // 4)
    state = work / f"testbed{nodes}"
    topo = testbed.generated_topology(towns, per, NODE_BPS, MAYOR_BPS)
    testbed.up(topo, state, node_bps=NODE_BPS, mayor_bps=MAYOR_BPS)
    try:
        tb = testbed.Testbed(state)
        exe = str(Path(sys.executable).with_name("chiba-admin"))
        res: dict = {"nodes": nodes, "towns": towns, "node_bps": NODE_BPS,
                     "mayor_bps": MAYOR_BPS, "cases": {}}
        for name, src in data.items():
            payload = _tree_bytes(src)
            for algo in args.algorithms:
                runs = []
                for _ in range(args.repeat):
                    argv = [exe, "--cluster", str(tb.topology_file), "stage", src,
                            "--nodes", "@nodes", "--dest", "bench", "--json"]
                    argv += (["--method", "transit"] if algo == "transit"
                             else ["--algorithm", algo, "--chunk", str(args.chunk)])
                    with tb.measure() as m:
                        cp = tb.exec("pres", argv, timeout=3600)
                    try:
                        r = json.loads(cp.stdout)
                    except ValueError:
                        raise SystemExit(f"testbed run failed: {cp.stderr[-2000:]}")
                    r["infrastructure_bytes"] = _infra(m)
                    runs.append(r)
                    # each host's /scratch is a bind mount of its data dir under the state
                    for d in state.glob("hosts/*/data/scratch/bench"):
                        shutil.rmtree(d)
                key = f"{name}/{algo}"
                res["cases"][key] = _summary(runs, payload, NODE_BPS)
                _log(f"testbed{nodes} {key}", res["cases"][key])
        return res
    finally:
        testbed.down(state)


def _infra(m) -> dict | None:
    try:
        return dict(m.infrastructure)
    except Exception:  # noqa: BLE001 - counters are a bonus
        return None


def _tree_bytes(src: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)


def _clean_scratch(topo, nodes) -> None:
    for n in nodes:
        h = topo.host(n)
        for name in os.listdir(h.local_path(h.scratch)):
            shutil.rmtree(os.path.join(h.local_path(h.scratch), name))


def _log(what: str, s: dict) -> None:
    eff = f" eff {s['efficiency']:.2f}" if "efficiency" in s else ""
    sys.stderr.write(f"{what}: {s.get('seconds', 0):.2f} s{eff} "
                     f"ok={s.get('ok')} rss={s.get('peak_rss')}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/stage.json")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--testbed-nodes", default=None,
                   help="comma list of testbed sizes (default: --nodes and 32)")
    p.add_argument("--size", default="64M")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk", default="4M")
    p.add_argument("--algorithms", default=None, help="comma list: chain,bcast,transit")
    p.add_argument("--where", default=None, help="embedded,testbed (default: what runs here)")
    p.add_argument("--memory", default="1G", help="size for the peak-memory case (0: skip)")
    a = p.parse_args(argv)
    a.size, a.chunk = parse_size(a.size), parse_size(a.chunk)
    a.memory = 0 if a.memory in ("0", "") else parse_size(a.memory)
    if a.algorithms is None:
        algos = ["chain", "bcast"]
        try:
            from legacy_transit.transit import stage_transit  # noqa: F401

            algos.append("transit")
        except ImportError:
            pass
        a.algorithms = algos
    else:
        a.algorithms = a.algorithms.split(",")
    where = a.where.split(",") if a.where else ["embedded"] + (
        ["testbed"] if os.geteuid() == 0 and _has_testbed() else [])
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    out: dict = {"size": a.size, "repeat": a.repeat, "chunk": a.chunk,
                 "algorithms": a.algorithms, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        work = Path(tmp)
        data = _make_data(work, a.size)
        if "embedded" in where:
            out["embedded"] = _run_embedded(a, data, work)
            if a.memory:
                out["memory"] = _run_memory(a, work)
        if "testbed" in where:
            sizes = ([int(x) for x in a.testbed_nodes.split(",")] if a.testbed_nodes
                     else sorted({a.nodes, 32}))
            out["testbed"] = {str(n): _run_testbed(a, data, work, n) for n in sizes}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


def _has_testbed() -> bool:
    try:
        import testbed  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
