"""The one benchmark record schema: write, read (v2, and v1 upgraded), environment, CPU share.

A record is one JSON file::

    {"schema": "chiba-bench/2", "suite": "quick", "commit": "d2b5905", "date": "...Z",
     "cluster": {"kind": "testbed"|"embedded"|"local", "towns", "nodes_per_town",
                 "node_bps", "mayor_bps", "hosts", "disk", ...},
     "env": {"date", "git_commit", "mpi_library", "python", "platform", "cpus",
             "cpu_model", "code_lines"},
     "runs": [{"workload": "stage"|"collect"|"sync"|"run"|"service"|"memory"|"inventory"|
                           "shell",
               "ok": bool, "seconds": float, "cpu_busy": float|None, ...}, ...]}

An MPI run of stage, collect, sync or run carries ``launch``: "mpiexec" (a fresh job) or
"service" (the long-running service); a record written before the service has none, and
its MPI runs read as "mpiexec" (chiba_admin.bench.aggregate). Still schema 2: the field
is an addition.

Every run carries ``cpu_busy``: the share (0-1) of all of this machine's CPUs that was busy
during the run, from /proc/stat. Near 1 the run was bound by the machine's cores (every
emulated host shares them), not by the emulated network. Version 1 records (no
``commit``/``date`` at the top, no ``cpu_busy``) are upgraded on reading.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import InvalidRequest

__all__ = ["SCHEMA", "SCHEMA_V1", "WORKLOADS", "CpuMeter", "cpu_meter", "read_cpu_times",
           "environment", "code_lines", "git_commit", "make_record", "write_record",
           "load_records", "upgrade", "provenance", "Sources", "find_records", "SHIPPED_DIR", "OWN_DIR",
           "CODE_GROUPS"]

SCHEMA = "chiba-bench/2"
SCHEMA_V1 = "chiba-bench/1"
WORKLOADS = ("stage", "collect", "sync", "run", "service", "memory", "inventory", "shell",
             "cpu")

_ROOT = Path(__file__).resolve().parent.parent.parent
OWN_DIR = "results"
# Records shipped with the project, read when the user has none of their own.
SHIPPED_DIR = _ROOT / "docs" / "results"

# Which files implement each tool (the paper compared 5,200 lines of Perl with 84 of C).
# Globs over the repository (mpitools/common/ is counted once, with Userstage); a pattern
# that matches nothing counts 0 files.
CODE_GROUPS = {
    "City Transit (legacy)": ["legacy_transit/transit*.py", "legacy_transit/fanout.py",
                              "legacy_transit/transport*.py"],
    "Userstage (MPI)": ["mpitools/stage/*.py", "mpitools/collect/*.py",
                        "mpitools/common/*.py"],
    "rsync baseline (legacy; rsync itself not counted)": ["legacy_transit/rsync.py"],
    "mpisync (MPI; + inventory below)": ["mpitools/sync/*.py"],
    "inventory (scan, diff, plan, apply)": ["inventory/*.py"],
}


# -- CPU busy share -------------------------------------------------------------------------
def read_cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, or None without /proc/stat.

    The first line is ``cpu user nice system idle iowait irq softirq steal guest
    guest_nice``; idle and iowait are not busy, guest time is already inside user.
    """
    try:
        with open(path) as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields)
    return total - idle, total


@dataclass
class CpuMeter:
    """The busy share of all CPUs between ``start`` and ``stop`` (``busy``: 0-1 or None)."""

    start: tuple[int, int] | None = None
    busy: float | None = None

    def stop(self) -> float | None:
        end = read_cpu_times()
        if self.start and end and end[1] > self.start[1]:
            self.busy = round((end[0] - self.start[0]) / (end[1] - self.start[1]), 3)
        return self.busy


@contextlib.contextmanager
def cpu_meter() -> Iterator[CpuMeter]:
    """``with cpu_meter() as c: ...`` then ``c.busy``: the machine's CPU busy share."""
    m = CpuMeter(read_cpu_times())
    try:
        yield m
    finally:
        m.stop()


# -- environment ----------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_commit() -> str:
    """Short commit of the checkout, ``+dirty`` when tracked files differ; "unknown"."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def code_lines() -> dict[str, dict]:
    """Non-blank, non-comment lines per tool (docstrings count: they are code here too)."""
    out = {}
    for tool, patterns in CODE_GROUPS.items():
        files = sorted({p for pat in patterns for p in _ROOT.glob(pat)})
        n = 0
        for f in files:
            for line in f.read_text(errors="replace").splitlines():
                s = line.strip()
                if s and not s.startswith("#"):
                    n += 1
        out[tool] = {"lines": n, "files": len(files)}
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        return None


def _mpi_library() -> str | None:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    try:
        p = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.splitlines()[0].strip() if p.stdout else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(cluster: dict | None = None) -> dict:
    """What a reader needs to trust a number: MPI, machine, commit, date, code size."""
    return {"date": _now(), "git_commit": git_commit(), "mpi_library": _mpi_library(),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "code_lines": code_lines(),
            "cluster": cluster or {}}


# -- writing --------------------------------------------------------------------------------
def make_record(suite: str, cluster: dict, runs: list[dict], env: dict) -> dict:
    """A record dict; ``commit`` and ``date`` at the top say where the numbers come from."""
    return {"schema": SCHEMA, "suite": suite, "commit": env.get("git_commit", "unknown"),
            "date": env.get("date") or _now(), "cluster": cluster, "env": env,
            "runs": runs}


def write_record(record: dict, outdir: str | Path) -> Path:
    """Write ``record`` as ``SUITE-KIND-YYYYmmdd-HHMMSS[-N].json`` in ``outdir``; its path."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{record['suite']}-{record['cluster'].get('kind', 'local')}-{stamp}"
    path, n = out / f"{base}.json", 1
    while path.exists():  # two records in the same second (inventory is quick)
        n += 1
        path = out / f"{base}-{n}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


# -- reading --------------------------------------------------------------------------------
def upgrade(rec: dict) -> dict | None:
    """A v2 record from a v1 or v2 one (None for JSON that is not a benchmark record)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("runs"), list):
        return None
    if rec.get("schema") == SCHEMA:
        return rec
    if rec.get("schema") != SCHEMA_V1:
        return None
    env = rec.get("env") or {}
    runs = [{"cpu_busy": None, **r} for r in rec["runs"]]
    return {**rec, "schema": SCHEMA, "commit": env.get("git_commit", "unknown"),
            "date": env.get("date", "unknown"), "runs": runs, "upgraded_from": SCHEMA_V1}


def load_records(paths: list[str | Path]) -> list[dict]:
    """Read result files (or every ``*.json`` in given directories), oldest name first.

    JSON that is not a benchmark record (another tool's output) is skipped. Raises
    InvalidRequest for a path that does not exist, an unreadable file, or no record at all.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise InvalidRequest("result file not found", where=str(p),
                             hint="run `chiba-admin bench` first or name files under results/")
    records = []
    for f in files:
        try:
            rec = upgrade(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"cannot read result file: {e}", where=str(f)) from None
        if rec is not None:
            rec["_file"] = str(f)
            records.append(rec)
    if not records:
        raise InvalidRequest("no benchmark records found", where=", ".join(map(str, paths)),
                         hint="run `chiba-admin bench stage` or `make bench` first")
    return records


def provenance(records: list[dict]) -> str:
    """"commit C, DATE" (or "commits A, B, DATE .. DATE") of ``records``."""
    commits = sorted({str(r.get("commit", "unknown")) for r in records})
    dates = sorted(str(r.get("date", "unknown")) for r in records)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}"
    return f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}, {span}"


@dataclass
class Sources:
    """Which records a report shows: the user's own, or the ones shipped with the project."""

    records: list[dict]
    shipped: bool
    note: str | None = None


def find_records(paths: list[str | Path], *, own: str | Path = OWN_DIR,
                 shipped: str | Path | None = None, shipped_only: bool = False) -> Sources:
    """The records a report shows: those named by ``paths``; else ``own`` (results/) when
    it holds any; else (or with ``shipped_only``) the ones shipped with the project, with a
    note saying where they come from (the shipped directory and its subdirectories, e.g.
    ``service/``). InvalidRequest when there are none."""
    if paths:
        return Sources(load_records(list(paths)), False)
    shipped = SHIPPED_DIR if shipped is None else shipped
    if not shipped_only:
        try:
            return Sources(load_records([own]), False)
        except InvalidRequest:
            pass
    try:
        recs = (load_records([shipped, *sorted(p for p in Path(shipped).iterdir()
                                               if p.is_dir())])
                if Path(shipped).is_dir() else [])
    except InvalidRequest:
        recs = []
    if not recs:
        raise InvalidRequest("no benchmark records found", where=str(shipped if shipped_only
                                                                 else own),
                         hint="this checkout ships none under docs/results/" if shipped_only
                         else "run `chiba-admin bench quick` or `make bench` first; this "
                              "checkout ships none under docs/results/")
    head = ("Records shipped with chiba-admin" if shipped_only else
            f"No results of your own under {own}/: showing the records shipped with "
            f"chiba-admin")
    note = (f"{head} in docs/results/ ({provenance(recs)}). Run `make bench` or "
            f"`make bench-quick` to measure this machine.")
    return Sources(recs, True, note)
