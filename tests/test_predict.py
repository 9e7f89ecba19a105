"""chiba-admin predict: Open MPI's decision rule, the trees, records to points, the fitted
costs (pure), and SimGrid simulations on small topologies checked against what the
network allows (skipped, with the reason, when SimGrid's Python module is missing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from chiba_admin.bench.records import load_records
from chiba_admin.predict import calibrate, engine
from chiba_admin.predict.bcast import decide, tree_children
from topology.generate import generated_topology_toml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "bench"
SHIPPED = REPO / "docs" / "results"
MiB = 1 << 20

_why = engine.simgrid_available()
needs_simgrid = pytest.mark.skipif(_why is not None, reason=_why or "")


# -- pure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, nbytes, alg", [
    (3, 4 * MiB, 5),      # < 4 ranks, >= 1 MiB: binary tree
    (4, 4 * MiB, 2),      # 4-7 ranks: chain
    (8, 4 * MiB, 1),      # 8-15 ranks, >= 32 KiB: basic linear (the testbed's 8 nodes)
    (16, 4 * MiB, 8),     # 16-31 ranks, >= 1 MiB: scatter + allgather
    (16, 64 * 1024, 6),   # 16-31 ranks, < 1 MiB: binomial
    (32, 4 * MiB, 7),     # knomial
    (128, 4 * MiB, 7),
    (256, 4 * MiB, 7),
    (2048, 4 * MiB, 8),
    (10016, 4 * MiB, 8),
    (10016, 12000, 5),
])
def test_open_mpi_bcast_rule(ranks, nbytes, alg):
    assert decide(ranks, nbytes) == alg


def test_trees_reach_every_rank_once():
    for alg in (1, 2, 5, 6, 7):
        for size in (1, 2, 7, 8, 33, 100):
            kids = tree_children(alg, size)
            got = sorted(c for cs in kids for c in cs)
            assert got == list(range(1, size)), (alg, size)
    assert tree_children(6, 8)[0] == [1, 2, 4]
    assert tree_children(7, 16)[0] == [1, 2, 3, 4, 8, 12]


def test_points_from_fixture_records():
    pts, skipped = calibrate.points_from_records(load_records([FIXTURES]))
    kinds = sorted({(p.workload, p.method) for p in pts})
    assert kinds == [("stage", "chain"), ("stage", "transit"), ("sync", "mpisync"),
                     ("sync", "rsync")]
    assert all(p.measured < 99 for p in pts)  # the failed chain run (99 s) is left out
    assert any(s["why"] == "failed run" for s in skipped)
    assert any(s["workload"] == "collect" and s["why"] == "no model" for s in skipped)
    stage = next(p for p in pts if p.method == "chain")
    assert stage.bytes == 67119104  # the archive's bytes, not the payload's
    sync = next(p for p in pts if p.method == "rsync")
    assert (sync.cluster["towns"], sync.cluster["nodes_per_town"]) == (4, 1)


def test_old_records_are_the_fat_mayor_testbed():
    c = {"towns": 2, "nodes_per_town": 4, "node_bps": 20e6, "mayor_bps": 200e6}
    from topology.loader import loads_topology

    topo = loads_topology(calibrate.topology_for(c))
    assert topo.town_uplink("town1").bandwidth == 200e6
    topo = loads_topology(calibrate.topology_for({**c, "uplink_bps": 20e6}))
    assert topo.town_uplink("town1").bandwidth == 20e6


def test_host_cost_fit():
    fits, notes = calibrate.fit_host_costs({"chain": [(8, 1.0), (16, 1.4), (32, 2.2)]})
    assert fits["chain"] == pytest.approx((0.6, 0.05))
    assert "3 measured run(s) at 8, 16, 32 hosts" in notes[0]
    fits, notes = calibrate.fit_host_costs({"rsync": [(8, 1.0), (8, 1.2)]})
    assert fits["rsync"] == pytest.approx((1.1, 0.0)) and "b = 0" in notes[0]
    # a negative intercept is not a cost: the line goes through the origin instead
    fits, _ = calibrate.fit_host_costs({"mpisync": [(4, 0.5), (8, 1.0), (64, 35.0)]})
    assert fits["mpisync"][0] == 0.0 and fits["mpisync"][1] > 0.5


def test_missing_simgrid_exits_2_with_how_to_get_it(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "_DIST_PACKAGES", str(tmp_path / "none"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "dist-packages" not in p])
    monkeypatch.delitem(sys.modules, "simgrid", raising=False)
    r = cli("predict", "--cluster", REPO / "clusters" / "chiba-city.toml", "stage",
            "--nodes", "8")
    assert r.code == 2
    assert "python3-simgrid" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, what", [
    (["stage", "--methods", "chain,ftp"], "--methods"),
    (["stage", "--nodes", "300"], "300 hosts"),
    (["stage", "--sizes", "lots"], "--sizes"),
    (["stage", "--generate", "8by32"], "--generate"),
])
def test_bad_input_is_one_line_exit_2(cli, args, what):
    r = cli("predict", "--cluster", REPO / "clusters" / "chiba-city.toml", *args)
    assert r.code == 2, r.err
    assert what in r.err and len(r.err.strip().splitlines()) == 1


# -- simulated ----------------------------------------------------------------------------
def _small(tmp_path, towns=2, per=4, node=20e6, core=200e6, uplink=None) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(generated_topology_toml(towns, per, node, core, uplink_bps=uplink))
    return p


def _predict(cli, path, *args) -> list[dict]:
    r = cli("--json", "predict", "--cluster", path, *args)
    assert r.code == 0, r.err
    return r.json()["predictions"]


@needs_simgrid
def test_chain_runs_at_line_rate_and_counts_link_bytes(cli, tmp_path):
    path = _small(tmp_path)
    (r,) = _predict(cli, path, "stage", "--methods", "chain", "--nodes", "8",
                    "--sizes", "16MiB")
    line = 16 * MiB * 8 / (20e6 * engine.Calibration().tcp_efficiency)
    # above line rate by the ACKs each node's reverse direction carries (5%, SimGrid's
    # cross-traffic) and the pipeline's fill (8 hops of one 64 KiB segment)
    fill = 8 * 64 * 1024 * 8 / 20e6
    assert line < r["phases"]["transfer"] < (line / 0.95 + fill) * 1.03
    b = r["bytes_by_class"]
    # every node's link carries the stream in once (and out once, but the last's); the
    # HTTP download crosses the president's NIC, mayor1's core link and town1's uplink,
    # the town1-to-town2 hop both mayors' core links and both uplinks
    assert b["town"] == pytest.approx(16 * MiB * (8 + 7))
    assert b["core"] == pytest.approx(16 * MiB * 4)
    assert b["uplink"] == pytest.approx(16 * MiB * 3)


@needs_simgrid
def test_transit_is_bound_by_the_mayors_town_link(cli, tmp_path):
    """The paper's network: a town's copies all cross its mayor's Fast Ethernet link."""
    path = _small(tmp_path)
    (paper,) = _predict(cli, path, "stage", "--methods", "transit", "--nodes", "8",
                        "--sizes", "8MiB")
    bound = 4 * 8 * MiB * 8 / 20e6
    assert paper["phases"]["unpack"] > bound
    fat = _small(tmp_path, uplink=200e6)
    (f,) = _predict(cli, fat, "stage", "--methods", "transit", "--nodes", "8",
                    "--sizes", "8MiB")
    assert f["seconds"] < paper["seconds"] / 2


@needs_simgrid
def test_long_streams_are_extrapolated_close_to_full_simulation(tmp_path, monkeypatch):
    from topology.loader import loads_topology

    from chiba_admin.predict import pipeline

    text = generated_topology_toml(2, 4, 20e6, 200e6)
    topo = loads_topology(text)
    hosts = [h.name for h in topo.nodes]
    job = {"topology": text, "method": "chain", "hosts": hosts, "bytes": 32 * MiB}
    full = engine.run_in_child(job)
    assert not full["extrapolated"]
    monkeypatch.setenv("CHIBA_PREDICT_BUDGET", "900")
    cut = engine.run_in_child(job)
    assert cut["extrapolated"] and cut["simulated_segments"] < full["segments"]
    assert cut["seconds"] == pytest.approx(full["seconds"], rel=0.01)
    assert pipeline.EVENT_BUDGET > 900


@needs_simgrid
def test_a_long_chain_extrapolates_from_a_dozen_segments(monkeypatch):
    """200 hops, 1,024 segments: the full simulation (33 s, not run here) gives 8.069 s;
    12 simulated segments give within 4% of 120, 24 within 2% (the head of a short stream
    spreads out over a long chain; the period is taken from its tail)."""
    text = generated_topology_toml(8, 25, 100e6, 1e9)
    from topology.loader import loads_topology

    hosts = [h.name for h in loads_topology(text).nodes]
    job = {"topology": text, "method": "chain", "hosts": hosts, "bytes": 64 * MiB}
    got = {}
    for budget in (200 * 12, 200 * 24, 200 * 120):
        monkeypatch.setenv("CHIBA_PREDICT_BUDGET", str(budget))
        r = engine.run_in_child(job)
        got[r["simulated_segments"]] = r["phases"]["transfer"]
    assert sorted(got) == [12, 24, 120]
    assert got[12] == pytest.approx(got[120], rel=0.04)
    assert got[24] == pytest.approx(got[120], rel=0.02)
    assert got[120] == pytest.approx(8.069, rel=0.01)


@needs_simgrid
def test_a_failed_simulation_is_a_one_line_error():
    from chiba_admin.errors import ChibaError

    text = generated_topology_toml(1, 2, 20e6, 200e6)
    with pytest.raises(ChibaError, match="simulation of nope failed"):
        engine.run_in_child({"topology": text, "method": "nope", "hosts": ["ccn01"],
                             "bytes": 1})


@needs_simgrid
def test_check_fixture_records_within_15_percent(cli):
    r = cli("--json", "predict", "--check", FIXTURES)
    assert r.code == 0, r.err
    out = r.json()
    assert len(out["rows"]) == 4
    for row in out["rows"]:
        # the simulated network time is most of the measured time, never more (one point
        # per method here, so the fitted host costs close the rest exactly)
        assert 0.7 <= row["network_seconds"] / row["measured"] <= 1.0, row
        assert row["network_bound"] and abs(row["error"]) <= 0.15, row
    assert out["max_abs_error"] <= 0.15
    assert any(line.startswith("chain: host costs") for line in out["fit"])


@needs_simgrid
def test_check_readme_measurements(cli):
    """The README's measured tables (tests/fixtures/predict): staging and full
    synchronisation are network-bound and predicted within 15%, except mpisync at 8
    targets (host costs fitted mostly to 64-rank runs; see the README)."""
    r = cli("--json", "predict", "--check", REPO / "tests" / "fixtures" / "predict")
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert len(rows) == 23
    net = [row for row in rows if row["network_bound"]]
    assert {(x["workload"], x["method"]) for x in net} >= {
        ("stage", "chain"), ("stage", "transit"), ("stage", "bcast"), ("sync", "rsync")}
    bad = [(x["method"], x["hosts"], x["scenario"]) for x in net if abs(x["error"]) > 0.15]
    assert bad == [("mpisync", 8, "full")]
    bcast = next(x for x in rows if x["method"] == "bcast")
    assert abs(bcast["network_seconds"] / bcast["measured"] - 1) < 0.05  # basic_linear


def _shipped_testbed_records() -> list[Path]:
    out = []
    for f in sorted(SHIPPED.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            continue
        if (rec.get("cluster") or {}).get("kind") == "testbed":
            out.append(f)
    return out


@needs_simgrid
def test_check_shipped_testbed_records_within_15_percent(cli):
    """The acceptance check: every network-bound measured testbed point of the records
    shipped under docs/results/ predicted within 15% (the quick suite's staging and full
    synchronisation; points made of start-up and per-file work on the testbed's two
    shared cores are reported by --check, not held to it)."""
    files = _shipped_testbed_records()
    if not files:
        pytest.skip("no testbed records under docs/results/ yet: run `make bench-quick` "
                    "as root on the testbed and copy results/*.json there")
    r = cli("--json", "predict", *[a for f in files for a in ("--check", f)])
    assert r.code == 0, r.err
    # staging and full synchronisation, as the docstring says; a 5%-changed sync moves a
    # few MiB and is mostly start-up (its error is reported by --check, and in the README)
    rows = [row for row in r.json()["rows"] if row["network_bound"]
            and row.get("scenario") in (None, "", "full")]
    assert rows
    bad = [row for row in rows if abs(row["error"]) > 0.15]
    assert not bad, bad


@needs_simgrid
def test_report_shows_predicted_rows_beside_the_measured(cli):
    """`report --predict`: the measured tables, then each measured point predicted."""
    files = _shipped_testbed_records()
    if not files:
        pytest.skip("no testbed records under docs/results/ yet")
    r = cli("--json", "report", "--predict", *files)
    assert r.code == 0, r.err
    d = r.json()
    assert d["stage"] and d["predicted"]["rows"]
    measured = {(row["workload"], row["method"]) for row in d["predicted"]["rows"]}
    assert ("stage", "chain") in measured and ("stage", "transit") in measured
    r = cli("report", "--predict", *files)
    assert r.code == 0 and "Predicted vs measured" in r.out
