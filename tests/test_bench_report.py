"""A tiny benchmark end to end on the embedded cluster, and a report checked against its records."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from chiba_admin.bench.aggregate import (collect_rows, inventory_rows, memory_rows,
                                         report_dict, stage_rows, sync_rows)
from chiba_admin.bench.records import load_records
from chiba_admin.bench.render import to_markdown

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    from chiba_admin.cli import main

    out = tmp_path_factory.mktemp("results")
    work = tmp_path_factory.mktemp("work")
    common = ["--where", "embedded", "--out", str(out), "--workdir", str(work)]
    assert main(["-q", "bench", "all", "--shape", "1x3",
                 "--sizes", "300K", "--data", "random", "--repeat", "1", "--targets", "2",
                 "--repo-files", "30", "--repo-size", "2M", *common]) == 0
    assert main(["-q", "bench", "collect", "--shape", "1x3", "--sizes", "300K", "--data",
                 "random", "--repeat", "1", *common]) == 0
    assert main(["-q", "bench", "memory", "--memory-size", "1M", *common]) == 0
    assert main(["-q", "bench", "inventory", "--inventory-files", "200", "--hash-size", "1M",
                 "--repeat", "1", *common]) == 0
    return out


def _runs(out: Path, suite: str, kind: str = "embedded") -> tuple[dict, list[dict]]:
    (f,) = out.glob(f"{suite}-{kind}-*.json")
    rec = json.loads(f.read_text())
    return rec, rec["runs"]


def test_records_have_environment_and_every_method(bench_results):
    rec, runs = _runs(bench_results, "stage")
    assert rec["schema"] == "chiba-bench/2" and rec["cluster"]["kind"] == "embedded"
    env = rec["env"]
    assert "Open MPI" in env["mpi_library"] and env["git_commit"] and env["date"]
    assert (rec["commit"], rec["date"]) == (env["git_commit"], env["date"])
    assert env["code_lines"]["mpisync (MPI; + inventory below)"]["lines"] > 50
    # the peers (pdcp, clush, sbcast) need the testbed: skipped here, with the reason
    skipped = {r["method"]: r["skipped"] for r in runs if r.get("skipped")}
    assert set(skipped) == {"pdcp", "clush", "sbcast", "sbcast-tree"}
    assert all("only on the testbed" in why for why in skipped.values())
    runs = [r for r in runs if not r.get("skipped")]
    assert {(r["method"], r["algorithm"]) for r in runs} == {
        ("transit", None), ("mpi", "bcast"), ("mpi", "chain")}
    assert all(r["ok"] and r["nodes"] == 3 and r["nic"] is None for r in runs)
    # every run says how busy this machine's CPUs were meanwhile (/proc/stat)
    assert all(0 < r["cpu_busy"] <= 1 for r in runs)
    rec, runs = _runs(bench_results, "sync")
    assert {(r["method"], r["scenario"]) for r in runs} == {
        (m, s) for m in ("rsync", "mpi") for s in ("full", "changed", "nochange")}
    assert all(r["ok"] for r in runs)
    full = [r for r in runs if r["scenario"] == "full"]
    assert all(r["changed_bytes"] > 1_500_000 for r in full)
    assert all(r["changed_bytes"] == 0 for r in runs if r["scenario"] == "nochange")
    assert all(0 < r["cpu_busy"] <= 1 for r in runs)


def test_collect_memory_inventory_records(bench_results):
    _, runs = _runs(bench_results, "collect")
    assert {r["method"] for r in runs} == {"transit", "mpi"}
    assert all(r["ok"] and r["nodes"] == 3 and r["size_bytes"] == 300 << 10 for r in runs)
    _, runs = _runs(bench_results, "memory")
    assert {r["algorithm"] for r in runs} == {"chain", "bcast"}
    for r in runs:  # every host's peak RSS, and the largest of all ranks above them
        assert r["ok"] and len(r["rss_by_host"]) == 4
        assert r["peak_rss"] >= max(r["rss_by_host"].values()) > 10e6
    rec, runs = _runs(bench_results, "inventory", "local")
    metrics = {r["metric"]: r for r in runs}
    assert metrics["scan_entries_per_s"]["value"] > 0 and "diff_s" in metrics
    # the diff target is set for 100,000 entries: not judged on 200
    assert metrics["diff_s"]["target"] is None and metrics["diff_s"]["met"] is None
    assert metrics["scan_entries_per_s"]["target"] == ">= 50000"
    assert rec["cluster"]["kind"] == "local"
    records = load_records([bench_results])
    assert {r["method"] for r in collect_rows(records)} == {"transit", "mpi"}
    assert len(memory_rows(records)) == 2 and len(inventory_rows(records)) == len(runs)


def test_report_figures_come_from_records(bench_results):
    records = load_records([bench_results])
    _, runs = _runs(bench_results, "stage")
    for row in stage_rows(records):
        mine = [r for r in runs if (r["method"], r["algorithm"] or "") ==
                (row["method"], row["algorithm"])]
        med = statistics.median(r["seconds"] for r in mine)
        assert row["median_s"] == pytest.approx(med)
        assert row["per_node_mbps"] == pytest.approx(row["size_bytes"] * 8 / med / 1e6)
        assert row["aggregate_mbps"] == pytest.approx(3 * row["per_node_mbps"])
        # no links and no counters on the embedded cluster: nothing may be made up
        assert row["efficiency"] is None and row["president_bytes"] is None
    transit = next(r for r in stage_rows(records) if r["method"] == "transit")
    chain = next(r for r in stage_rows(records) if r["algorithm"] == "chain")
    assert chain["speedup_vs_legacy"] == pytest.approx(transit["median_s"] / chain["median_s"])

    _, sruns = _runs(bench_results, "sync")
    for row in sync_rows(records):
        mine = [r for r in sruns if (r["method"], r["scenario"]) ==
                (row["method"], row["scenario"])]
        assert row["median_s"] == pytest.approx(statistics.median(r["seconds"] for r in mine))
        assert row["completed"] and row["bound_s"] is None  # no link rate: no bound
        assert row["transfer_vs_bound"] is None
        if row["method"] == "mpi":  # its transfer phase, from the same runs
            assert row["transfer_s"] == pytest.approx(
                statistics.median(r["phases"]["transfer"] for r in mine))
        else:
            assert row["transfer_s"] is None  # rsync has no phases


def test_report_cli_outputs(bench_results, cli, tmp_path):
    r = cli("report", str(bench_results), "--plot", str(tmp_path / "fig"))
    assert r.code == 0, r.err
    assert "EMBEDDED CLUSTER" in r.out and "City Transit" in r.out and "mpisync" in r.out
    assert "Code size" in r.out and "CPU busy" in r.out and "Collect" in r.out
    figs = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert figs == ["staging-embedded.png", "sync-embedded.png"]
    assert all((tmp_path / "fig" / f).stat().st_size > 10_000 for f in figs)
    j = cli("--json", "report", str(bench_results)).json()
    assert {r["label"] for r in j["stage"]} == {"City Transit", "MPI bcast", "MPI chain"}
    assert j["shipped"] is False and {s["cluster"] for s in j["sources"]} == {"embedded",
                                                                             "local"}
    md = cli("report", "--markdown", str(bench_results)).out
    assert md.startswith("## Results on the embedded cluster")
    assert "| nodes | data |" in md and "| targets | scenario |" in md
    d = report_dict(load_records([bench_results]))
    d.update(note=None, shipped=False)
    assert md == to_markdown(d) + "\n"


def test_report_bad_input(cli, tmp_path):
    r = cli("report", str(tmp_path / "nope.json"))
    assert r.code == 2 and "result file not found" in r.err
    (tmp_path / "other.json").write_text('{"not": "ours"}')
    r = cli("report", str(tmp_path))
    assert r.code == 2 and "no benchmark records found" in r.err
    r = cli("bench", "stage", "--where", "embedded", "--shape", "2by4")
    assert r.code == 2 and "bad shape" in r.err
