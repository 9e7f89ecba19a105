"""Benchmark the legacy tools on the embedded cluster: City Transit staging, collect, rsync; writes JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chiba_admin.embedded import bind, init_cluster  # noqa: E402
from legacy_transit.rsync import sync_rsync  # noqa: E402
from legacy_transit.transit import collect_transit, stage_transit  # noqa: E402
from topology import expand, load_topology  # noqa: E402

__all__ = ["main", "make_payload"]

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def make_payload(root: Path, total: int, files: int) -> Path:
    """``files`` files of random bytes summing to ``total`` bytes, in 16 directories."""
    root.mkdir(parents=True, exist_ok=True)
    per = max(1, total // files)
    for i in range(files):
        d = root / f"d{i % 16:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(os.urandom(per))
    return root


def _median_runs(fn, runs: int) -> tuple[float, dict]:
    """Median wall time of ``fn`` (which returns a result dict) and the median run's result."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        r = fn()
        out.append((time.perf_counter() - t, r))
    out.sort(key=lambda x: x[0])
    return out[len(out) // 2]


def _env() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    rsync = subprocess.run(["rsync", "--version"], capture_output=True,
                           text=True).stdout.split("\n")[0]
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "rsync": rsync, "git_commit": commit,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _clear(topo, nodes, rel: str) -> None:
    for n in nodes:
        shutil.rmtree(topo.host(n).local_path(topo.host(n).resolve("scratch", rel)),
                      ignore_errors=True)


def bench_transit(topo, src: Path, nodes: list[str], runs: int, fanout: int) -> dict:
    """Staging to every node (fresh destination each run), then collecting back."""
    def once():
        _clear(topo, nodes, "bench")
        r = stage_transit(topo, str(src), nodes, "bench", fanout=fanout)
        if not r["ok"]:
            raise SystemExit(f"transit failed: {r['failures']}")
        return r

    secs, r = _median_runs(once, runs)
    rate = r["payload_bytes"] * 8 / secs
    out = {"seconds": round(secs, 4), "archive_bytes": r["bytes"],
           "payload_bytes": r["payload_bytes"], "files": r["files"], "phases": r["phases"],
           "phase_bytes": r["phase_bytes"],
           "infrastructure_bytes": r["phase_bytes"]["to_president"]
           + r["phase_bytes"]["to_mayors"] + r["phase_bytes"]["unpack"],
           "per_node_payload_bps": round(rate, 1)}
    back = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    try:
        def collect():
            shutil.rmtree(back, ignore_errors=True)
            return collect_transit(topo, "bench", nodes, str(back), fanout=fanout)

        csecs, c = _median_runs(collect, runs)
        out["collect"] = {"seconds": round(csecs, 4), "bytes": c["bytes"], "ok": c["ok"]}
    finally:
        shutil.rmtree(back, ignore_errors=True)
        _clear(topo, nodes, "bench")
    return out


def bench_rsync(topo, src: Path, targets: list[str], runs: int, fanout: int) -> dict:
    """Full sync into empty targets, a no-change resync, and a resync after touching 1%."""
    def repo(h):
        return topo.host(h).local_path(topo.host(h).resolve("repository", "bench"))

    def full():
        for t in targets:
            shutil.rmtree(repo(t), ignore_errors=True)
        return sync_rsync(topo, str(src), targets, "bench", fanout=fanout)

    out = {}
    secs, r = _median_runs(full, runs)
    out["full"] = {"seconds": round(secs, 4), "bytes_sent": r["bytes_sent"],
                   "files_per_target": r["hosts"][targets[0]]["files_transferred"]}
    secs, r = _median_runs(lambda: sync_rsync(topo, str(src), targets, "bench",
                                              fanout=fanout), runs)
    out["unchanged"] = {"seconds": round(secs, 4), "bytes_sent": r["bytes_sent"]}
    files = sorted(p for p in src.rglob("*.bin"))
    changed = files[:max(1, len(files) // 100)]

    def one_percent():
        for p in changed:
            with open(p, "r+b") as f:
                f.write(os.urandom(64))
        return sync_rsync(topo, str(src), targets, "bench", fanout=fanout)

    secs, r = _median_runs(one_percent, runs)
    out["one_percent_changed"] = {"seconds": round(secs, 4), "bytes_sent": r["bytes_sent"],
                                  "files_per_target": r["hosts"][targets[0]]["files_transferred"]}
    for t in targets:
        shutil.rmtree(repo(t), ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/legacy.json")
    ap.add_argument("--cluster", default=str(REPO / "clusters" / "demo.toml"))
    ap.add_argument("--sizes", default="1,16,64", help="payload sizes in MiB")
    ap.add_argument("--files", type=int, default=64, help="files per payload")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-f", "--fanout", type=int, default=32)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-legacy-"))
    try:
        topo = bind(load_topology(a.cluster), work / "state")
        init_cluster(topo)
        nodes, mayors = expand(topo, "@nodes"), expand(topo, "@mayors")
        records = []
        for mib in [int(s) for s in a.sizes.split(",")]:
            src = make_payload(work / f"src{mib}", mib * MiB, a.files)
            rec = {"size_mib": mib, "files": a.files, "nodes": len(nodes),
                   "mayors": len(mayors),
                   "transit": bench_transit(topo, src, nodes, a.runs, a.fanout),
                   "rsync": bench_rsync(topo, src, mayors, a.runs, a.fanout)}
            records.append(rec)
            t, r = rec["transit"], rec["rsync"]
            print(f"{mib:4d} MiB x {len(nodes)} nodes: transit {t['seconds']:.3f} s "
                  f"(pack {t['phases']['pack']:.3f}, to_mayors {t['phases']['to_mayors']:.3f}, "
                  f"unpack {t['phases']['unpack']:.3f}, cleanup {t['phases']['cleanup']:.3f}); "
                  f"collect {t['collect']['seconds']:.3f} s; rsync to {len(mayors)} mayors "
                  f"full {r['full']['seconds']:.3f} s, unchanged {r['unchanged']['seconds']:.3f} s, "
                  f"1% {r['one_percent_changed']['seconds']:.3f} s")
        doc = {"benchmark": "legacy", "site": "embedded", "cluster": topo.name,
               "runs": a.runs, "fanout": a.fanout, "environment": _env(), "records": records,
               "note": "embedded cluster: every link is a local copy, so these times show "
                       "the tools' overheads (processes, tar, disk writes), not a network"}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {a.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
