"""Benchmark inventory scan, hashing, diff, codec and apply; writes a JSON result file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3  # noqa: E402
import numpy as np  # noqa: E402
import xxhash  # noqa: E402
import zstandard  # noqa: E402

import inventory as inv  # noqa: E402

__all__ = ["main"]

TARGETS = {
    "scan_entries_per_s": (">=", 50_000),
    "hash_blake3_gb_per_s": (">=", 1.0),
    "diff_100k_s": ("<", 1.0),
    "encoded_100k_bytes": ("<", 6_000_000),
}


def _median(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _env(tmp: str) -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    fs = subprocess.run(["df", "-T", tmp], capture_output=True, text=True).stdout.splitlines()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu_model": cpu, "filesystem": fs[-1].split()[1] if len(fs) > 1 else "?",
            "blake3": blake3.__version__, "xxhash": xxhash.VERSION, "zstandard": zstandard.__version__,
            "numpy": np.__version__, "git_commit": commit,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _make_tree(root: Path, nfiles: int, per_dir: int = 500) -> None:
    for i in range(nfiles):
        d = root / f"pkg{i // per_dir:04d}" / f"sub{(i // 50) % 10}"
        if i % 50 == 0:
            d.mkdir(parents=True, exist_ok=True)
        with open(d / f"file_{i:06d}.dat", "wb") as fh:
            # Distinct small contents, so digests do not compress away in the codec numbers.
            fh.write(f"{i}\n".encode() * ((i % 16) + 1))


def _make_big(path: Path, size: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n


def _mutated(base: inv.Inventory) -> inv.Inventory:
    """A target that differs like a real one: 10% changed, 1% missing, 1% extra."""
    entries = []
    for i, e in enumerate(base):
        if e.kind == inv.FILE and i % 100 == 7:
            continue
        size = e.size + 1 if e.kind == inv.FILE and i % 10 == 3 else e.size
        entries.append(inv.Entry(e.path, e.kind, size, e.mode, e.mtime_ns, e.target, e.digest))
    files = base.files()
    for e in files[: len(files) // 100]:
        entries.append(inv.Entry(e.path + ".old", inv.FILE, 1, 0o644, e.mtime_ns))
    return inv.Inventory.from_entries(entries, root="target")


def run(quick: bool, tmpdir: str | None) -> dict:
    nfiles = 20_000 if quick else 100_000
    big = (256 if quick else 1024) << 20
    runs = 3 if quick else 5
    res: dict = {"quick": quick, "nfiles": nfiles, "runs": runs}
    work = Path(tempfile.mkdtemp(prefix="chiba-bench-inv-", dir=tmpdir))
    res["environment"] = _env(str(work))
    try:
        tree = work / "tree"
        t = time.perf_counter()
        _make_tree(tree, nfiles)
        res["generate_tree_s"] = round(time.perf_counter() - t, 2)

        inv.scan(tree)  # warm the dentry and inode caches
        secs, scanned = _median(lambda: inv.scan(tree), runs)
        res["scan_entries"] = len(scanned)
        res["scan_s"] = round(secs, 4)
        res["scan_entries_per_s"] = round(len(scanned) / secs)
        secs, hashed = _median(lambda: inv.scan(tree, checksum=True), max(2, runs - 2))
        res["scan_checksum_s"] = round(secs, 4)
        res["scan_checksum_entries_per_s"] = round(len(hashed) / secs)

        plain = inv.encode_inventory(scanned)
        full = inv.encode_inventory(hashed)
        res["encoded_100k_bytes" if not quick else "encoded_bytes"] = len(plain)
        res["encoded_with_blake3_bytes"] = len(full)
        res["encoded_bytes_per_entry"] = round(len(plain) / len(scanned), 2)
        res["encode_s"] = round(_median(lambda: inv.encode_inventory(hashed), runs)[0], 4)
        res["decode_s"] = round(_median(lambda: inv.decode_inventory(full), runs)[0], 4)

        target = _mutated(scanned)
        secs, plan = _median(lambda: inv.make_plan(scanned, target, delete=True), runs)
        res["diff_100k_s" if not quick else "diff_s"] = round(secs, 4)
        res["diff_plan_summary"] = plan.summary()
        secs, _ = _median(lambda: inv.needs(scanned, target), runs)
        res["needs_s"] = round(secs, 4)
        per = {r: inv.needs_bitmap(scanned, [e.path for e in scanned.files()[r::7]]) for r in range(32)}
        secs, groups = _median(lambda: inv.group_bitmaps(scanned, per), runs)
        res["group_bitmaps_32_targets_s"] = round(secs, 4)
        res["group_count"] = len(groups)
        res["need_bitmap_bytes"] = len(next(iter(per.values())))

        dest = work / "dest"
        t = time.perf_counter()
        applied = inv.apply_plan(inv.make_plan(scanned, inv.scan(dest, missing_ok=True)), dest,
                                 inv.local_fetch(tree))
        secs = time.perf_counter() - t
        res["apply_copy_s"] = round(secs, 3)
        res["apply_files_per_s"] = round(applied.created / secs)
        shutil.rmtree(dest)
        shutil.rmtree(tree)

        bigf = work / "big.bin"
        _make_big(bigf, big)
        inv.hash_file(bigf)  # page cache warm: measure the hash, not the disk
        for algo in inv.ALGOS:
            secs, _ = _median(lambda: inv.hash_file(bigf, algo), runs)
            res[f"hash_{algo}_gb_per_s"] = round(big / secs / 1e9, 3)
        secs, _ = _median(lambda: inv.hash_file(bigf, "blake3", threads=1), max(2, runs - 2))
        res["hash_blake3_1thread_gb_per_s"] = round(big / secs / 1e9, 3)
        res["hash_file_bytes"] = big
    finally:
        shutil.rmtree(work, ignore_errors=True)

    checks = {}
    for key, (op, limit) in TARGETS.items():
        if key in res:
            checks[key] = {"value": res[key], "target": f"{op} {limit}",
                           "ok": res[key] >= limit if op == ">=" else res[key] < limit}
    res["targets"] = checks
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/inventory.json")
    ap.add_argument("--quick", action="store_true", help="20k files and a 256 MiB file, 3 runs")
    ap.add_argument("--tmpdir", default=None, help="where to generate data (deleted afterwards)")
    args = ap.parse_args(argv)
    res = run(args.quick, args.tmpdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "environment"}, indent=2))
    return 0 if all(c["ok"] for c in res["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
