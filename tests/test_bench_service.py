"""Bench support for the long-running MPI service (issue 19): the launch of every MPI row,
the service started around its rows and stopped whatever happens, the `run` and `service`
workloads, and their aggregation and rendering beside fresh-launch rows and rsync."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from chiba_admin.bench import aggregate, suites, workloads
from chiba_admin.bench.render import to_markdown
from chiba_admin.errors import ChibaError

CLUSTER = {"kind": "testbed", "node_bps": 20e6, "mayor_bps": 200e6}


def _rec(runs, **top):
    return {"schema": "chiba-bench/2", "suite": "t", "cluster": CLUSTER, "runs": runs,
            "date": top.pop("date", "2026-11-30"), **top}


def _sync(method, scenario, seconds, launch=None, changed=0, targets=64):
    run = {"workload": "sync", "scenario": scenario, "targets": targets, "method": method,
           "ok": True, "seconds": seconds, "changed_bytes": changed, "cpu_busy": 0.5}
    if launch:
        run["launch"] = launch
    return run


def test_old_records_without_launch_read_as_mpiexec_beside_service_rows():
    old = _rec([_sync("rsync", "nochange", 2.0), _sync("mpi", "nochange", 30.0),
                _sync("mpi", "nochange", 34.0)])
    new = _rec([_sync("mpi", "nochange", 1.0, "service"),
                _sync("mpi", "nochange", 0.5, "service")])
    rows = {r["label"]: r for r in aggregate.sync_rows([old, new])}
    assert list(rows) == ["rsync", "mpisync", "mpisync (service)"]
    assert rows["mpisync"]["launch"] == "mpiexec" and rows["rsync"]["launch"] == ""
    assert rows["mpisync"]["median_s"] == 32.0
    svc = rows["mpisync (service)"]
    assert svc["median_s"] == 0.75
    assert svc["speedup_vs_legacy"] == pytest.approx(2.0 / 0.75)
    assert svc["speedup_vs_mpiexec"] == pytest.approx(32.0 / 0.75)
    # only a service row is compared with its fresh launch
    assert rows["mpisync"]["speedup_vs_mpiexec"] is None


def test_full_sync_through_the_service_against_the_bound():
    full = 157_286_400
    runs = [_sync("mpi", "full", s, "service", changed=full, targets=8) for s in (7, 7.5, 8)]
    (row,) = aggregate.sync_rows([_rec(runs)])
    bound = full * 8 / 200e6
    assert row["bound_s"] == pytest.approx(bound)
    assert row["vs_bound"] == pytest.approx(7.5 / bound)


def _stage(seconds, launch=None):
    run = {"workload": "stage", "data": "random", "size_bytes": 64 << 20, "nodes": 8,
           "method": "mpi", "algorithm": "chain", "ok": True, "seconds": seconds,
           "cpu_busy": 0.6, "phases": {"launch": 1.0 if launch != "service" else 0.0}}
    if launch:
        run["launch"] = launch
    return run


def test_stage_service_row_is_whole_command_fraction_of_line_rate():
    rows = aggregate.stage_rows([_rec([_stage(32.0), _stage(30.0, "service")])])
    assert [r["label"] for r in rows] == ["MPI chain", "MPI chain (service)"]
    fresh, svc = rows
    line_s = (64 << 20) * 8 / 20e6
    assert svc["efficiency"] == pytest.approx(line_s / 30.0)
    assert fresh["efficiency"] == pytest.approx(line_s / 32.0)
    assert svc["speedup_vs_mpiexec"] == pytest.approx(32.0 / 30.0)


def _run(method, launch, seconds, nodes=32):
    return {"workload": "run", "nodes": nodes, "command": "true", "method": method,
            "launch": launch, "ok": True, "seconds": seconds, "cpu_busy": 0.3}


def test_run_rows_compare_ssh_mpiexec_and_the_service_against_the_target():
    runs = [_run("ssh", None, 1.0), _run("ssh", None, 1.2), _run("mpi", "mpiexec", 6.0),
            _run("mpi", "service", 0.2), _run("mpi", "service", 0.4),
            _run("mpi", "service", 0.25), _run("mpi", "service", 0.1, nodes=4)]
    rows = aggregate.run_rows([_rec(runs)])
    assert [(r["nodes"], r["label"]) for r in rows] == [
        (4, "service"), (32, "ssh fan-out"), (32, "mpiexec"), (32, "service")]
    small, ssh, fresh, svc = rows
    assert svc["median_s"] == 0.25 and svc["met"] is True and svc["target"] == "< 0.3 s"
    assert fresh["met"] is False and ssh["met"] is False
    assert small["met"] is None  # the target is set for 32 nodes
    assert svc["speedup_vs_legacy"] == pytest.approx(1.1 / 0.25)
    assert svc["speedup_vs_mpiexec"] == pytest.approx(6.0 / 0.25)


def test_service_rows_start_time_per_host_count_and_idle_cpu():
    def start(hosts, s):
        return {"workload": "service", "metric": "start", "hosts": hosts, "ranks": hosts + 2,
                "ok": True, "seconds": s, "cpu_busy": 0.9}

    idle = {"workload": "service", "metric": "idle_cpu", "hosts": 64, "ranks": 66, "ok": True,
            "seconds": 61.0, "value": 1.5, "unit": "% of one core", "sample_seconds": 60.2,
            "cpu_busy": 0.01}
    steady = {**idle, "metric": "idle_cpu_steady", "value": 0.9}
    failed = {**start(8, 99.0), "ok": False}
    rows = aggregate.service_rows([_rec([start(64, 12.0), steady, start(8, 2.0),
                                         start(8, 3.0), failed, idle, start(32, 5.0)])])
    assert [(r["metric"], r["hosts"]) for r in rows] == [
        ("start", 8), ("start", 32), ("start", 64), ("idle_cpu", 64),
        ("idle_cpu_steady", 64)]
    assert rows[-1]["value"] == 0.9
    rows = rows[:-1]
    assert rows[0]["median_s"] == 2.5 and rows[0]["failures"] == 1 and rows[0]["ranks"] == 10
    assert rows[-1]["value"] == 1.5 and rows[-1]["sample_s"] == 60.2
    assert rows[-1]["cpu_bound"] is False and rows[0]["cpu_bound"] is True


def test_report_shows_service_rows_beside_fresh_launch_and_rsync():
    recs = [_rec([_sync("rsync", "nochange", 2.0), _sync("mpi", "nochange", 30.0),
                  _sync("mpi", "nochange", 1.0, "service"), _run("mpi", "service", 0.2),
                  {"workload": "service", "metric": "start", "hosts": 64, "ranks": 66,
                   "ok": True, "seconds": 12.0, "cpu_busy": 0.95}])]
    d = aggregate.report_dict(recs)
    md = to_markdown(d)
    sync_table = md.split("### Synchronisation")[1].split("###")[0]
    lines = [ln for ln in sync_table.splitlines() if ln.startswith("| 64 ")]
    assert [ln.split(" | ")[2] for ln in lines] == ["rsync", "mpisync", "mpisync (service)"]
    assert "x mpiexec" in sync_table and "| 30.00 |" in lines[2]  # 30 s / 1 s
    assert "### Run a trivial command" in md and "| 32 | true | service | 0.200 |" in md
    assert "### The MPI service's own costs" in md and "| start | 64 | 66 | 12.00 |" in md
    assert json.loads(json.dumps(d))["run"][0]["launch"] == "service"


def test_launch_of_method_names():
    assert workloads.launch_of(("mpi", "chain")) == "mpiexec"
    assert workloads.launch_of(("mpi", "chain", "service")) == "service"
    assert workloads.launch_of(("transit", None)) is None
    assert [workloads.launch_of(m) for m in ("rsync", "mpi", "mpi-service")] == [
        None, "mpiexec", "service"]
    assert [workloads.launch_of(m) for m in workloads.RUN_METHODS] == [
        None, "mpiexec", "service"]
    assert workloads.sync_method("mpi-service") == "mpi"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class _FakeSite:
    """A Site's `cli` only: answers service start/stop, records every command."""

    class topo:  # noqa: N801
        class president:  # noqa: N801
            name = "pres"

    def __init__(self, start_ok=True):
        self.calls, self.start_ok = [], start_ok

    def cli(self, *args):
        self.calls.append(args)
        if args[:2] == ("service", "start"):
            out = {"pid": 1, "hosts": ["pres", "m1", "m2"], "seconds": 1.5}
            return (out if self.start_ok else {"ok": False, "error": "no"}), 2.0, ""
        if args[:2] == ("service", "stop"):
            return {"stopped": True}, 0.1, ""
        return {"ok": True}, 0.1, ""


def test_service_is_stopped_after_its_rows_also_on_error():
    site, got = _FakeSite(), []
    with pytest.raises(RuntimeError):
        with workloads.service_up(site, True, got.append, ["m1", "m2"]):
            raise RuntimeError("a row failed")
    assert site.calls == [("service", "start", "--hosts", "m[1-2]"), ("service", "stop")]
    (run,) = got
    assert (run["workload"], run["metric"], run["hosts"], run["ranks"], run["ok"]) == (
        "service", "start", 2, 4, True)
    # a service that did not come up: a failed start run, an error, and a stop anyway
    site, got = _FakeSite(start_ok=False), []
    with pytest.raises(ChibaError, match="did not start"):
        with workloads.service_up(site, True, got.append):
            pass
    assert site.calls[-1] == ("service", "stop") and got[0]["ok"] is False
    # no service method: nothing started
    site = _FakeSite()
    with workloads.service_up(site, False, got.append) as res:
        assert res is None
    assert site.calls == []


def test_service_suite_plan_measures_the_issue_targets():
    plan = suites.describe_plan(suites.SUITES["service"]("testbed"), "testbed")
    by = {}
    for s in plan:
        by.setdefault(s["workload"], []).append(s)
    (st,) = by["stage"]
    assert (st["shape"], st["nodes"], st["sizes"]) == ("2x4", 8, [64 << 20])
    assert st["methods"] == [["mpi", "chain"], ["mpi", "chain", "service"]]
    (run,) = by["run"]
    assert run["nodes"] == 32 and run["methods"] == ["ssh", "mpiexec", "service"]
    (svc,) = by["service"]
    assert svc["host_counts"] == [8, 32, 64] and svc["idle_seconds"] == 60
    assert svc["steady"] is True
    assert [(s["target_counts"], s["methods"], s["full_methods"]) for s in by["sync"]] == [
        ([8], ["rsync", "mpi", "mpi-service"], ["mpi-service"]),
        ([64], ["rsync", "mpi", "mpi-service"], ["mpi-service"])]
    # one testbed of 8 mayors x 7 nodes (64 targets) for all but staging
    assert {s["shape"] for s in plan if s["workload"] != "stage"} == {"8x7"}


def test_bench_methods_select_service_rows(cli):
    r = cli("--json", "bench", "stage", "--where", "embedded", "--methods",
            "chain,chain-service", "--dry-run")
    assert r.code == 0, r.err
    (step,) = json.loads(r.out)["plan"]
    assert step["methods"] == [["mpi", "chain"], ["mpi", "chain", "service"]]
    r = cli("--json", "bench", "run", "--where", "embedded", "--methods",
            "ssh,mpiexec,service", "--shape", "1x2", "--dry-run")
    assert r.code == 0, r.err
    assert json.loads(r.out)["plan"][0]["methods"] == ["ssh", "mpiexec", "service"]
    r = cli("bench", "sync", "--where", "embedded", "--methods", "mpi-servic", "--dry-run")
    assert r.code == 2 and "mpi-servic" in r.err


@pytest.mark.mpi
def test_embedded_bench_runs_service_rows_in_the_same_run(cli, tmp_path):
    """A tiny sync and run through `chiba-admin bench` on the embedded cluster with real
    mpiexec: rsync, fresh and service rows in one record, the service stopped after."""
    out = tmp_path / "results"
    # the service's Unix socket lives under the cluster's state: a short work directory
    work = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    try:
        _bench_and_check(cli, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench_and_check(cli, out: Path, work: Path) -> None:
    common = ["--where", "embedded", "--out", out, "--workdir", work, "--repeat", "1"]
    r = cli("-q", "bench", "sync", "--methods", "rsync,mpi,mpi-service", "--targets", "2",
            "--repo-files", "20", "--repo-size", "300K", *common)
    assert r.code == 0, r.err
    r = cli("-q", "bench", "run", "--methods", "ssh,mpiexec,service", "--shape", "1x2",
            *common)
    assert r.code == 0, r.err
    runs = [x for f in sorted(out.glob("*.json")) for x in json.loads(f.read_text())["runs"]]
    assert all(x["ok"] for x in runs), [x for x in runs if not x["ok"]]
    sync = {(x["scenario"], x["method"], x["launch"]) for x in runs if x["workload"] == "sync"}
    assert sync == {(s, m, launch) for s in ("full", "changed", "nochange")
                    for m, launch in (("rsync", None), ("mpi", "mpiexec"),
                                      ("mpi", "service"))}
    assert {(x["method"], x["launch"]) for x in runs if x["workload"] == "run"} == {
        ("ssh", None), ("mpi", "mpiexec"), ("mpi", "service")}
    starts = [x for x in runs if x["workload"] == "service"]
    assert len(starts) == 2 and all(x["metric"] == "start" and x["hosts"] > 0 for x in starts)
    for x in starts:  # stopped after its rows: the daemon's mpiexec is gone (or a zombie)
        assert not _alive(x["pid"]), x
    rows = aggregate.report_dict(runs and [json.loads(f.read_text())
                                           for f in sorted(out.glob("*.json"))])
    assert {r["label"] for r in rows["sync"]} == {"rsync", "mpisync", "mpisync (service)"}


def test_fresh_clone_report_reads_shipped_subdirectories(tmp_path, monkeypatch, cli):
    """docs/results/service/ holds the service suite's records: the fallback reads them."""
    from chiba_admin.bench import records

    shipped = tmp_path / "shipped"
    (shipped / "service").mkdir(parents=True)
    rec = _rec([_run("mpi", "service", 0.2)], commit="abc1234")
    (shipped / "service" / "service-testbed-1.json").write_text(json.dumps(rec))
    monkeypatch.setattr(records, "SHIPPED_DIR", shipped)
    monkeypatch.chdir(tmp_path)
    r = cli("--json", "report")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["shipped"] is True and [x["label"] for x in d["run"]] == ["service"]
