"""The benchmark report on small fixture records (tests/fixtures/bench/): schema v1 and v2
read alike, every figure from the runs, CPU busy share shown, shipped records on a fresh
clone, and the named suites' plans."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from chiba_admin.bench import aggregate, records, render, suites

FIX = Path(__file__).parent / "fixtures" / "bench"
M = 1 << 20


@pytest.fixture
def recs():
    return records.load_records([FIX])


def _row(rows, **match):
    (r,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return r


def test_v1_and_v2_records_are_read_and_other_json_skipped(recs):
    names = sorted(Path(r["_file"]).name for r in recs)
    assert names == ["v1-stage-testbed.json", "v2-quick-embedded.json",
                     "v2-quick-local.json", "v2-quick-testbed.json"]
    v1 = next(r for r in recs if r["_file"].endswith("v1-stage-testbed.json"))
    # a v1 record gets the v2 top-level provenance from its env, and cpu_busy None per run
    assert v1["schema"] == records.SCHEMA and v1["upgraded_from"] == records.SCHEMA_V1
    assert (v1["commit"], v1["date"]) == ("74d2a64", "2026-11-25T04:50:00+00:00")
    assert all(run["cpu_busy"] is None for run in v1["runs"])
    assert records.upgrade({"schema": "chiba-bench/9", "runs": []}) is None
    assert records.upgrade({"schema": records.SCHEMA_V1}) is None  # no runs: not a record


def test_stage_rows_from_v1_runs(recs):
    rows = aggregate.stage_rows(recs)
    transit = _row(rows, method="transit")
    chain = _row(rows, algorithm="chain")
    assert transit["median_s"] == statistics.median([36.0, 35.0, 35.5])
    # the failed chain run counts as a failure, not in the median
    assert chain["runs"] == 3 and chain["failures"] == 1
    assert chain["median_s"] == statistics.median([33.0, 32.0])
    assert chain["speedup_vs_legacy"] == pytest.approx(35.5 / 32.5)
    assert chain["efficiency"] == pytest.approx(64 * M * 8 / 20e6 / 32.5)
    assert chain["aggregate_mbps"] == pytest.approx(8 * 64 * M * 8 / 32.5 / 1e6)
    assert chain["president_bytes"] == statistics.median([68e6, 69e6])
    assert chain["launch_s"] == statistics.median([0.9, 1.0])
    # the transfer phase alone against the node link (the failed run is left out)
    assert chain["transfer_s"] == 29.5 and chain["phases_s"]["transfer"] == 29.5
    assert chain["transfer_efficiency"] == pytest.approx((64 * M + 10240) * 8 / 20e6 / 29.5)
    assert transit["transfer_efficiency"] is None  # Transit reports no transfer phase
    assert chain["cpu_busy"] is None and chain["cpu_bound"] is None  # v1: not measured
    assert [r["label"] for r in rows] == ["City Transit", "MPI chain"]


def test_sync_rows_bound_and_transfer(recs):
    rows = aggregate.sync_rows(recs)
    mpi = _row(rows, method="mpi")
    bound = 157_000_000 * 8 / 200e6
    assert mpi["label"] == "mpisync" and mpi["bound_s"] == pytest.approx(bound)
    assert mpi["vs_bound"] == pytest.approx(9.0 / bound)
    assert mpi["transfer_vs_bound"] == pytest.approx(6.75 / bound)
    assert mpi["speedup_vs_legacy"] == pytest.approx(27.0 / 9.0)
    assert _row(rows, method="rsync")["transfer_s"] is None


def test_collect_rows_cpu_busy_and_president_efficiency(recs):
    rows = aggregate.collect_rows(recs)
    mpi = _row(rows, method="mpi")
    assert mpi["median_s"] == 9.0 and mpi["speedup_vs_legacy"] == pytest.approx(13.0 / 9.0)
    # everything crosses the president's link: 8 nodes x 16 MiB at 200 Mb/s
    assert mpi["efficiency"] == pytest.approx(8 * 16 * M * 8 / 200e6 / 9.0)
    assert mpi["cpu_busy"] == pytest.approx(0.95) and mpi["cpu_bound"] is True
    # what arrived at the president (its receive counter), median over the runs
    assert mpi["president_rx_bytes"] == 8 * 16 * M + 500
    transit = _row(rows, method="transit")
    assert transit["cpu_busy"] == pytest.approx(0.45) and transit["cpu_bound"] is False


def test_memory_and_inventory_rows(recs):
    mem = aggregate.memory_rows(recs)
    assert [r["label"] for r in mem] == ["MPI bcast", "MPI chain"]
    chain = _row(mem, algorithm="chain")
    assert chain["peak_rss"] == 50_000_000 and chain["median_host_rss"] == 43_000_000
    inv = {r["metric"]: r for r in aggregate.inventory_rows(recs)}
    assert inv["scan_entries_per_s"]["met"] is True and inv["diff_s"]["met"] is False
    assert inv["decode_s"]["met"] is None and inv["decode_s"]["target"] is None


def test_render_shows_cpu_busy_banner_and_provenance(recs):
    d = aggregate.report_dict(recs)
    assert d["clusters"] == ["embedded", "local", "testbed"]
    md = render.to_markdown(d)
    assert "| CPU busy |" in md and "95%*" in md and "45% |" in md
    assert render.EMBEDDED_BANNER in md and "this machine (no cluster)" in md
    assert "commit 74d2a64, 2026-11-25T04:50:00+00:00" in md
    assert "commit abc1234, 2026-11-30T06:00:00+00:00" in md
    # the stage row of a v1 record: CPU busy not measured, shown as "-"
    stage_line = next(line for line in md.splitlines() if "| 67.1 | MPI chain |" in line)
    assert stage_line.split(" | ")[-3] == "-"


def test_rich_render_names_records(recs):
    from rich.console import Console

    con = Console(record=True, width=250)
    render.render_rich(aggregate.report_dict(recs), con)
    text = con.export_text()
    assert "Collect: City Transit vs MPI" in text and "Peak memory per rank" in text
    assert "CPU busy" in text and "v1-stage-testbed.json" in text


def test_write_record_names_and_provenance(tmp_path):
    env = {"git_commit": "feed123", "date": "2026-11-30T06:00:00+00:00"}
    rec = records.make_record("quick", {"kind": "local"}, [], env)
    assert (rec["schema"], rec["commit"], rec["date"]) == (records.SCHEMA, "feed123",
                                                           env["date"])
    a = records.write_record(rec, tmp_path)
    b = records.write_record(rec, tmp_path)  # the same second: a second file, not over
    assert a != b and a.name.startswith("quick-local-") and json.loads(b.read_text()) == rec


def test_cpu_times_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 1 2 3 4\n")
    assert records.read_cpu_times(str(stat)) == (150, 1000)
    assert records.read_cpu_times(str(tmp_path / "none")) is None
    m = records.CpuMeter(start=(150, 1000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(records, "read_cpu_times", lambda: (450, 1400))
        assert m.stop() == pytest.approx(0.75)


def test_fresh_clone_reads_shipped_records(tmp_path, monkeypatch, cli):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(FIX / "v2-quick-testbed.json", shipped)
    monkeypatch.setattr(records, "SHIPPED_DIR", shipped)
    monkeypatch.chdir(tmp_path)  # no results/ here
    r = cli("report")
    assert r.code == 0, r.err
    assert "No results of your own under results/" in r.out
    assert "commit abc1234, 2026-11-30T06:00:00+00:00" in r.out
    j = cli("--json", "report").json()
    assert j["shipped"] is True and j["sources"][0]["commit"] == "abc1234"
    # results/ with other tools' JSON only still counts as none of the user's own
    (tmp_path / "results").mkdir()
    shutil.copy(FIX / "other-legacy.json", tmp_path / "results")
    assert cli("--json", "report").json()["shipped"] is True
    # own records win; --shipped shows the shipped ones anyway
    shutil.copy(FIX / "v2-quick-local.json", tmp_path / "results")
    j = cli("--json", "report").json()
    assert j["shipped"] is False and j["note"] is None and j["clusters"] == ["local"]
    j = cli("--json", "report", "--shipped").json()
    assert j["shipped"] is True and j["clusters"] == ["testbed"]
    assert "Records shipped with chiba-admin" in j["note"]


def test_no_records_anywhere(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(records, "SHIPPED_DIR", tmp_path / "nothing")
    monkeypatch.chdir(tmp_path)
    r = cli("report")
    assert r.code == 2 and "no benchmark records found" in r.err and "bench quick" in r.err
    r = cli("report", "--shipped", str(FIX))
    assert r.code == 2 and "--shipped" in r.err


@pytest.mark.parametrize("where", ["testbed", "embedded"])
def test_quick_suite_is_one_size_eight_nodes_few_repeats(where):
    plan = suites.SUITES["quick"](where)
    shaped = [s for s in plan if s.workload in ("stage", "collect")]
    assert {s.params["nodes"] for s in shaped} == {8}
    assert {s.params["sizes"][0] for s in shaped} == {shaped[0].params["sizes"][0]}
    assert all(len(s.params["sizes"]) == 1 for s in shaped)
    assert max(s.params.get("repeat", 1) for s in plan if s.workload != "inventory") <= 2
    assert next(s for s in plan if s.workload == "sync").params["target_counts"] == [8]
    # no MPI_Bcast staging on the testbed: minutes a run
    if where == "testbed":
        assert all(("mpi", "bcast") not in s.params.get("methods", ()) for s in plan)
    # cpu (the standard library to 1 and 8 nodes per method: minutes) runs as `bench cpu`
    assert {s.workload for s in plan} == set(records.WORKLOADS) - {"run", "service", "shell",
                                                                    "cpu"}


def test_default_suite_keeps_the_readme_comparison():
    plan = suites.describe_plan(suites.SUITES["default"]("testbed"), "testbed")
    assert {(s["workload"], s["shape"]) for s in plan} >= {
        ("stage", "2x2"), ("stage", "2x4"), ("stage", "4x4"), ("stage", "4x8"),
        ("sync", "8x7"), ("collect", "2x4"), ("memory", "2x2"), ("inventory", None)}
    # issue 18's grid: every peer at every node count, three sizes, 2..64 sync targets
    stage = [s for s in plan if s["workload"] == "stage"]
    for nodes in (4, 8, 16, 32):
        methods = {m[0] for s in stage if s["nodes"] == nodes for m in s["methods"]}
        assert methods >= {"transit", "mpi", "pdcp", "clush", "sbcast", "sbcast-tree"}
    assert {z for s in stage for z in s["sizes"]} == {16 * M, 64 * M, 256 * M}
    assert {s["nodes"] for s in stage if 256 * M in s["sizes"]} == {8, 32}
    sync = next(s for s in plan if s["workload"] == "sync")
    assert sync["target_counts"] == [2, 4, 8, 16, 32, 64]
    assert next(s for s in plan if s["workload"] == "memory")["site"] == "embedded"


def test_bench_cli_plans_and_refusals(cli):
    r = cli("--json", "bench", "quick", "--where", "embedded", "--dry-run")
    assert r.code == 0, r.err
    j = r.json()
    assert j["suite"] == "quick" and j["where"] == "embedded"
    assert [s["workload"] for s in j["plan"]] == ["stage", "collect", "sync", "memory",
                                                 "inventory"]
    r = cli("bench", "quick", "--where", "embedded", "--repeat", "5")
    assert r.code == 2 and "--repeat does not apply to the named suite quick" in r.err
    j = cli("--json", "bench", "collect", "--where", "embedded", "--shape", "1x3",
            "--methods", "transit", "--sizes", "1M", "--dry-run").json()
    assert j["plan"] == [{"workload": "collect", "site": "embedded", "shape": "1x3",
                          "nodes": 3, "sizes": [M], "datas": ["random", "tree"],
                          "repeat": 3, "methods": [["transit", None]]}]
    for bad, msg in ((["--shape", "0x4"], "bad shape"), (["--targets", "x"], "bad --targets"),
                     (["--methods", "scp"], "unknown method"),
                     (["--methods", "rsync"], "names no stage method"),
                     (["--data", "zeros"], "unknown --data")):
        r = cli("bench", "stage", "--where", "embedded", *bad, "--dry-run")
        assert r.code == 2 and msg in r.err, (bad, r.err)


def test_a_failing_suite_keeps_what_it_measured(tmp_path, monkeypatch):
    def inventory(*, workdir, on_run, **params):
        on_run({"workload": "inventory", "metric": "scan_entries_per_s", "value": 1.0,
                "ok": True, "seconds": 0.1, "cpu_busy": 0.5})
        raise KeyboardInterrupt  # Ctrl-C, or a failing host, half-way

    monkeypatch.setattr(suites.workloads, "inventory", inventory)
    monkeypatch.setattr(records, "environment", lambda cluster: {"git_commit": "c0ffee1",
                                                                 "date": "2026-11-30"})
    seen = []
    with pytest.raises(KeyboardInterrupt):
        suites.run_plan([suites.Step("inventory", None, {})], suite="quick",
                        where="embedded", workdir=tmp_path, outdir=tmp_path / "out",
                        on_run=seen.append)
    (f,) = (tmp_path / "out").glob("quick-local-*.json")
    rec = json.loads(f.read_text())
    assert rec["partial"] is True and rec["runs"] == seen and rec["commit"] == "c0ffee1"
    md = render.to_markdown(aggregate.report_dict(records.load_records([f])))
    assert "(stopped half-way: partial)" in md


def test_sync_bound_beyond_the_mayors_is_a_node_link():
    """Targets beyond the mayors are nodes: the bound is their 20 Mb/s link (or their
    town's uplink), not the mayors' 200 Mb/s core link."""
    cl = {"kind": "testbed", "towns": 8, "nodes_per_town": 7, "node_bps": 20e6,
          "mayor_bps": 200e6, "uplink_bps": 20e6}
    runs = [{"workload": "sync", "scenario": "full", "targets": n, "method": "mpi",
             "ok": True, "seconds": 40.0, "changed_bytes": 60 * M} for n in (8, 16)]
    rows = aggregate.sync_rows([{"cluster": cl, "runs": runs}])
    assert _row(rows, targets=8)["bound_s"] == pytest.approx(60 * M * 8 / 200e6)
    assert _row(rows, targets=16)["bound_s"] == pytest.approx(60 * M * 8 / 20e6)


def test_peer_argv_in_records_names_no_path_of_this_machine():
    import sys
    import tempfile
    from pathlib import Path

    from chiba_admin.bench.workloads import portable_argv

    work = f"{tempfile.gettempdir()}/chiba-bench-ab12_x"
    clush = str(Path(sys.executable).with_name("clush"))
    assert portable_argv([clush, "-o", f"-F {work}/testbed-2x2/ssh/ssh_config", "--copy",
                          f"{work}/stage/data.bin", "--dest", "/scratch/b"]) == \
        ["clush", "-o", "-F $WORKDIR/testbed-2x2/ssh/ssh_config", "--copy",
         "$WORKDIR/stage/data.bin", "--dest", "/scratch/b"]
