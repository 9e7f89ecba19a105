"""The --json schema of stage, collect, sync-mayors and run, pinned for every method.

Each case runs the real CLI (a subprocess) on one embedded cluster and checks the exact
set of top-level keys and of per-host keys, on success and on failure (a host failing, a
request refused on the hosts, a job stopped before any rank reported). The sets are
literals: a change to the outcome model (chiba_admin/outcome.py) that adds, drops or
renames a key fails here.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from support.cluster import host_path, new_cluster, run_cli

pytestmark = pytest.mark.mpi

# --- the key sets, as the commands printed them before the outcome model -------------------
# (plus ``launch``, "mpiexec", "service" or "shell", on every MPI result since the service)
STAGE_MPI = {"method", "algorithm", "ok", "source", "dest", "nodes", "bytes", "payload_bytes",
             "files", "seconds", "phases", "phase_bytes", "hosts", "failures", "compress",
             "chunk", "segment", "kind", "refused", "peak_rss", "launch"}
# the job gave no result (stopped before any rank reported)
STAGE_MPI_NO_RESULT = STAGE_MPI - {"refused", "peak_rss"} | {"error", "mpiexec_stderr"}
MPI_HOST = {"ok", "bytes", "seconds", "throughput_bps", "stage", "error", "maxrss"}
MPI_HOST_ABORTED = MPI_HOST - {"maxrss"}

TRANSIT_STAGE = {"method", "ok", "source", "dest", "dests", "nodes", "bytes", "payload_bytes",
                 "files", "seconds", "phases", "phase_bytes", "hosts", "failures", "outcome"}
TRANSIT_HOST = {"ok", "bytes", "seconds", "throughput_bps", "stage", "error", "tree",
                "tree_path", "previous"}

COLLECT_MPI = {"method", "algorithm", "ok", "source", "dest", "dest_dir", "nodes", "bytes",
               "payload_bytes", "files", "seconds", "phases", "phase_bytes", "hosts",
               "failures", "kind", "peak_rss", "launch"}
COLLECT_MPI_REFUSED = COLLECT_MPI | {"refused", "refusal"}
COLLECT_MPI_NO_RESULT = COLLECT_MPI - {"peak_rss"} | {"error", "mpiexec_stderr"}
TRANSIT_COLLECT = {"method", "ok", "source", "dest", "dest_dir", "nodes", "bytes",
                   "payload_bytes", "files", "seconds", "phases", "phase_bytes", "hosts",
                   "failures", "outcome"}
TRANSIT_COLLECT_REFUSED = TRANSIT_COLLECT - {"outcome"} | {"refused", "refusal"}

SYNC_MPI = {"method", "source", "dest", "targets", "dry_run", "launch_seconds", "ok",
            "seconds", "sync_seconds", "bytes_sent", "source_files", "source_bytes", "groups",
            "phases", "source_warnings", "hosts", "failures", "launch"}
SYNC_MPI_NO_RESULT = {"method", "source", "dest", "targets", "dry_run", "launch_seconds",
                      "ok", "seconds", "bytes_sent", "hosts", "failures", "launch"}
SYNC_MPI_HOST = {"ok", "rc", "seconds", "files_transferred", "bytes_sent", "bytes_received",
                 "created", "updated", "deleted", "meta", "dest", "warnings", "error",
                 "in_sync", "conflicts", "temps_removed"}
SYNC_MPI_HOST_PLAN = SYNC_MPI_HOST | {"plan", "plan_summary", "changes"}
SYNC_MPI_HOST_NO_RESULT = {"ok", "rc", "seconds", "files_transferred", "bytes_sent",
                           "bytes_received", "error"}
SYNC_RSYNC = {"method", "ok", "source", "dest", "targets", "dry_run", "seconds", "bytes_sent",
              "hosts", "failures"}
RSYNC_HOST = {"ok", "rc", "seconds", "in_sync", "conflicts", "created", "updated", "deleted",
              "dest", "files_transferred", "files_total", "total_size", "bytes_sent",
              "bytes_received", "error"}
RSYNC_HOST_CHANGES = RSYNC_HOST | {"changes"}

RUN = {"ok", "rc", "hosts", "failures", "groups", "stderr_groups"}
RUN_HOST = {"rc", "ok", "error", "seconds", "stdout", "stderr"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One embedded cluster for the module, with a small source tree beside it."""
    base = tmp_path_factory.mktemp("schema")
    topo = new_cluster(base / "state")
    src = base / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
    return topo, str(src), base


def check(r, code: int, top: set[str], hosts: set[frozenset] | None) -> dict:
    """Exit status ``code``, exactly the ``top`` keys, and exactly ``hosts`` as the set of
    per-host key sets (None: no host entries at all)."""
    assert r.code == code, str(r)
    j = r.json()
    assert set(j) == top, (sorted(set(j) - top), sorted(top - set(j)))
    got = {frozenset(h) for h in j["hosts"].values()}
    assert got == (hosts or set()), [sorted(k) for k in got]
    assert j["ok"] is (code == 0)
    return j


def one(keys: set[str]) -> set[frozenset]:
    return {frozenset(keys)}


@pytest.mark.parametrize("algorithm", ["chain", "bcast"])
def test_stage_mpi(cluster, algorithm):
    topo, src, _ = cluster
    r = run_cli(topo, "stage", src, "--nodes", "@nodes", "--algorithm", algorithm, "--json",
                "--dest", f"ok-{algorithm}")
    check(r, 0, STAGE_MPI, one(MPI_HOST))
    # the destination's parent is a file on one node: refused there, nothing touched
    blocker = host_path(topo, "ccn03", "scratch", f"blk-{algorithm}")
    open(blocker, "w").close()
    r = run_cli(topo, "stage", src, "--nodes", "@nodes", "--algorithm", algorithm, "--json",
                "--dest", f"blk-{algorithm}/x")
    j = check(r, 2, STAGE_MPI, one(MPI_HOST))
    assert j["refused"] is True and list(j["failures"]) == ["ccn03"]
    # the first node cannot download the archive: a failure, not a refusal
    r = run_cli(topo, "stage", src, "--nodes", "@nodes", "--algorithm", algorithm, "--json",
                "--spool-url", "http://127.0.0.1:1")
    j = check(r, 1, STAGE_MPI, one(MPI_HOST))
    assert j["refused"] is False


def test_stage_mpi_stopped_before_any_report(cluster):
    topo, src, _ = cluster
    r = run_cli(topo, "stage", src, "--nodes", "@town2", "--json", "--timeout", "0.01")
    j = check(r, 1, STAGE_MPI_NO_RESULT, one(MPI_HOST_ABORTED))
    assert {h["stage"] for h in j["hosts"].values()} == {"aborted"}


def test_stage_transit(cluster):
    topo, src, _ = cluster
    r = run_cli(topo, "stage", src, "--nodes", "@nodes", "--method", "transit", "--json",
                "--dest", "ok-transit")
    check(r, 0, TRANSIT_STAGE, one(TRANSIT_HOST))
    open(host_path(topo, "ccn03", "scratch", "blk-transit"), "w").close()
    r = run_cli(topo, "stage", src, "--nodes", "@nodes", "--method", "transit", "--json",
                "--dest", "blk-transit/x")
    j = check(r, 1, TRANSIT_STAGE, one(TRANSIT_HOST))
    assert list(j["failures"]) == ["ccn03"]


def _results(topo, host: str, name: str) -> None:
    d = host_path(topo, host, "scratch", name)
    os.makedirs(d)
    for i in range(2):
        with open(os.path.join(d, f"r{i}"), "wb") as f:
            f.write(os.urandom(500 * (i + 1)))


@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_collect(cluster, method):
    topo, _, base = cluster
    top, host = ((COLLECT_MPI, MPI_HOST) if method == "mpi"
                 else (TRANSIT_COLLECT, TRANSIT_HOST))
    name = f"res-{method}"
    for n in ("ccn01", "ccn02", "ccn05"):
        _results(topo, n, name)
    r = run_cli(topo, "collect", name, "--nodes", "ccn01,ccn02", "--method", method, "--json",
                "--dest", str(base / f"back-{method}"))
    check(r, 0, top, one(host))
    # ccn03 has no such path
    r = run_cli(topo, "collect", name, "--nodes", "ccn01,ccn03", "--method", method, "--json",
                "--dest", str(base / f"fail-{method}"))
    j = check(r, 1, top, one(host))
    assert "ccn03" in j["failures"]
    # a device node below PATH on ccn05 refuses the whole collect (exit 2)
    os.mknod(host_path(topo, "ccn05", "scratch", f"{name}/null"), stat.S_IFCHR | 0o600,
             os.makedev(1, 3))
    refused = COLLECT_MPI_REFUSED if method == "mpi" else TRANSIT_COLLECT_REFUSED
    r = run_cli(topo, "collect", name, "--nodes", "ccn01,ccn05", "--method", method, "--json",
                "--dest", str(base / f"dev-{method}"))
    j = check(r, 2, refused, one(host))
    assert j["refused"] is True and "ccn05" in j["refusal"]


def test_collect_mpi_stopped_before_any_report(cluster):
    topo, _, base = cluster
    _results(topo, "ccn06", "res-stopped")
    r = run_cli(topo, "collect", "res-stopped", "--nodes", "ccn06", "--json", "--timeout",
                "0.01", "--dest", str(base / "back-stopped"))
    j = check(r, 1, COLLECT_MPI_NO_RESULT, None)
    assert list(j["failures"]) == ["ccn06"]


@pytest.mark.parametrize("method", ["mpi", "rsync"])
def test_sync(cluster, method):
    topo, src, _ = cluster
    top, host, planned = ((SYNC_MPI, SYNC_MPI_HOST, SYNC_MPI_HOST_PLAN) if method == "mpi"
                          else (SYNC_RSYNC, RSYNC_HOST, RSYNC_HOST_CHANGES))
    args = ("--json", "sync-mayors", src, "--method", method, "--targets")
    check(run_cli(topo, *args, "@mayors"), 0, top, one(host))
    check(run_cli(topo, *args, "@mayors", "--dry-run"), 0, top, one(planned))
    check(run_cli(topo, *args, "@mayors", "-i"), 0, top, one(planned))
    # ccn0X's repository path is a file: that target cannot be written
    target = "ccn01" if method == "mpi" else "ccn02"
    bad = host_path(topo, target, "repository")
    shutil.rmtree(bad)
    with open(bad, "w") as f:
        f.write("in the way")
    j = check(run_cli(topo, *args, f"mayor1,{target}"), 1, top, one(host))
    assert set(j["failures"]) == {target}


def test_sync_mpi_stopped_before_any_report(cluster):
    topo, src, _ = cluster
    r = run_cli(topo, "--json", "sync-mayors", src, "--targets", "mayor2", "--timeout", "0.01")
    check(r, 1, SYNC_MPI_NO_RESULT, one(SYNC_MPI_HOST_NO_RESULT))


def test_run(cluster):
    topo, _, _ = cluster
    check(run_cli(topo, "--json", "run", "-w", "ccn[01-02]", "--", "echo", "hi"), 0, RUN,
          one(RUN_HOST))
    r = run_cli(topo, "--json", "run", "-w", "ccn[01-02]", "--", "sh", "-c",
                "echo e >&2; exit 3")
    j = check(r, 3, RUN, one(RUN_HOST))
    assert set(j["failures"]) == {"ccn01", "ccn02"}


# --- the model itself (no cluster) -----------------------------------------------------------
def test_a_failed_host_has_one_constructor_and_absent_fields_stay_out():
    from chiba_admin.outcome import ABSENT, SyncHost, TransferHost, TransferRun

    h = TransferHost.failed("gone", stage="aborted")
    assert h.to_dict() == {"ok": False, "bytes": 0, "seconds": 0.0, "throughput_bps": 0.0,
                           "stage": "aborted", "error": "gone"}
    s = SyncHost.failed("no result", seconds=2.5)
    assert s.to_dict() == {"ok": False, "rc": 1, "seconds": 2.5, "files_transferred": 0,
                           "bytes_sent": 0, "bytes_received": 0, "error": "no result"}
    # ok=True among the fields cannot make a failed host ok
    assert not TransferHost.failed("x", ok=True).ok
    run = TransferRun(method="mpi", hosts={"a": h}, failures={"a": "gone"}, refused=ABSENT)
    d = run.to_dict()
    assert "refused" not in d and "outcome" not in d and d["ok"] is False
    assert d["hosts"] == {"a": h.to_dict()} and run.hosts_ok == 0


def test_window_gives_every_host_an_outcome_in_order():
    from types import SimpleNamespace

    from legacy_transit.fanout import window

    hosts = [SimpleNamespace(name=n) for n in ("b", "a", "c")]
    seen = []

    def fn(h):
        if h.name == "a":
            raise OSError("no route")
        return h.name.upper()

    got = window(hosts, fn, 2, on_done=seen.append)
    assert list(got) == ["b", "a", "c"]
    assert got["b"].ok and got["b"].value == "B"
    assert not got["a"].ok and got["a"].error == "OSError: no route"
    assert sorted(o.host for o in seen) == ["a", "b", "c"]


def test_the_model_and_progress_modules_import_nothing_of_the_project():
    import subprocess
    import sys

    code = ("import sys, chiba_admin.outcome, chiba_admin.progress; print(sorted(m for m in "
            "sys.modules if m.split('.')[0] in ('chiba_admin', 'topology', 'inventory', "
            "'legacy_transit', 'mpitools', 'testbed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['chiba_admin', 'chiba_admin.outcome', 'chiba_admin.progress']"


def test_the_cli_draws_every_event_on_one_bar():
    from io import StringIO

    from rich.console import Console
    from rich.progress import Progress as RichProgress

    from chiba_admin.console import BarProgress

    bar = RichProgress(console=Console(file=StringIO()), auto_refresh=False)
    p = BarProgress(bar, "sync-mayors (rsync)")
    p.phase("rsync", hosts=2)  # no byte total: the bar counts hosts
    p.host_done("mayor1", True)
    task = bar.tasks[0]
    assert task.description == "sync-mayors (rsync): rsync (1/2 hosts)"
    assert (task.completed, task.total, task.fields["hosts"]) == (1, 2, True)
    p.phase("pack", total_bytes=1000)
    p.advance(400)
    p.note("almost")
    assert (task.completed, task.total, task.fields["hosts"]) == (400, 1000, False)
    assert task.description == "sync-mayors (rsync): pack almost"
