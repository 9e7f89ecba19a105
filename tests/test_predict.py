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
from chiba_admin.predict.transfer import slurm_span, slurm_split
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
    fits, notes = calibrate.fit_host_costs({"rsync": [(8, 1.0), (16, 1.4), (32, 2.2)]})
    assert fits["rsync"] == pytest.approx((0.6, 0.05, 0.0, 0.0))
    assert "3 point(s) at 8, 16, 32 hosts" in notes[0]
    # one host count: a constant, the best one in relative terms (between the two)
    fits, notes = calibrate.fit_host_costs({"rsync": [(8, 1.0), (8, 1.2)]})
    assert 1.0 < fits["rsync"][0] < 1.2 and fits["rsync"][1:] == (0, 0, 0)
    assert "a constant" in notes[0]
    # a negative intercept is not a cost: the intercept is left out instead
    fits, _ = calibrate.fit_host_costs({"rsync": [(4, 0.5), (8, 1.0), (64, 35.0)]})
    assert fits["rsync"][0] == 0.0 and fits["rsync"][1] > 0.5
    # fresh mpiexec groups may grow with hosts^2 (ranks starting on shared cores)
    fits, _ = calibrate.fit_host_costs({"mpisync/nochange": [(8, 2.0, 2.0), (64, 30.0, 30.0)]})
    assert calibrate.host_seconds(fits["mpisync/nochange"], 64, 0) == pytest.approx(30.0, rel=1e-3)
    assert calibrate.host_seconds(fits["mpisync/nochange"], 8, 0) == pytest.approx(2.0, rel=1e-3)
    fits, _ = calibrate.fit_host_costs({"mpisync@service/nochange": [(8, 2.0), (64, 30.0)]})
    assert fits["mpisync@service/nochange"][3] == 0.0


def test_load_factor_per_record():
    """Two records of the same points, one with every host cost 1.5x the other's: one
    factor per record explains both, and the groups' costs are their geometric mean."""
    pts = []
    for src, f in (("quiet", 1.0), ("busy", 1.5)):
        for g, h, cost in (("rsync/nochange", 8, 2.0), ("rsync/nochange", 64, 8.0),
                           ("chain", 8, 5.0)):
            pts.append({"group": g, "source": src, "hosts": h, "bytes": 0,
                        "measured": 30.0 + cost * f, "residual": cost * f, "key": (src, g, h)})
    fits, load, _ = calibrate.fit_with_load(pts)
    assert load["busy"] / load["quiet"] == pytest.approx(1.5, rel=1e-3)
    for p in pts:
        got = load[p["source"]] * calibrate.host_seconds(fits[p["group"]], p["hosts"], 0)
        assert got == pytest.approx(p["residual"], rel=1e-3)


def test_sync_points_pool_a_changed_scenario_and_infer_files():
    recs = [{"cluster": {"kind": "testbed", "towns": 8, "nodes_per_town": 7,
                         "node_bps": 20e6, "mayor_bps": 200e6, "uplink_bps": 20e6},
             "_file": "r.json",
             "runs": [{"workload": "sync", "scenario": s, "targets": 8, "method": m,
                       "changed_bytes": b, "ok": True, "seconds": 3.0, "launch": launch}
                      for s, b in (("full", 157286397), ("changed", 4853029),
                                   ("changed", 4876238))
                      for m, launch in (("mpi", "service"), ("rsync", None))]}]
    pts, _ = calibrate.points_from_records(recs)
    assert {p.files for p in pts} == {3000}
    changed = [p for p in pts if p.scenario == "changed" and p.method == "rsync"]
    assert len({p.key for p in changed}) == 1  # one configuration, two runs
    assert {p.launch for p in pts if p.method == "mpisync"} == {"service"}
    assert all(p.cluster["nodes_per_town"] == 7 for p in pts)  # the record's own site


def test_peers_map_to_their_models():
    c = {"kind": "testbed", "towns": 2, "nodes_per_town": 4, "node_bps": 20e6,
         "mayor_bps": 200e6, "uplink_bps": 20e6}
    runs = [{"workload": "stage", "nodes": 8, "method": m, "size_bytes": 1 << 20, "ok": True,
             "seconds": 1.0} for m in ("pdcp", "clush", "sbcast", "sbcast-tree")]
    pts, _ = calibrate.points_from_records([{"cluster": c, "runs": runs}])
    got = {p.method: (p.model, p.fanout) for p in pts}
    assert got == {"pdcp": ("pdcp", 32), "clush": ("pdcp", 64), "sbcast": ("sbcast", 8),
                   "sbcast-tree": ("sbcast", 3)}


def test_mpich2_broadcast_is_what_the_paper_says():
    assert decide(4, 4 * MiB, "mpich2") == 6
    assert decide(5, 4 * MiB, "mpich2") == 9
    assert decide(128, 4 * MiB, "mpich2") == 9


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


# Slurm 22.05's sbcast on the paper-shaped testbed (towns of 4 or 8 nodes, 20 Mb/s node
# and town links), 16 MiB: which nodes sent copies of the file, from each run's per-NIC
# byte counters (tx bytes / the 16.8 MB archive, rounded; the president sent the rest).
# -F (legacy_transit/peers.py tree_width), nodes -> (president's copies, {node: copies}).
SBCAST_MEASURED = {
    (8, 4): (4, {}),                                     # a star
    (8, 8): (8, {}),
    (8, 16): (8, {"ccn01": 8}),                          # one head of 8, 7 direct
    (8, 32): (8, {"ccn01": 8, "ccn10": 8, "ccn19": 8}),  # three heads, 5 direct
    (2, 4): (2, {"ccn01": 2}),
    (3, 8): (2, {"ccn01": 3, "ccn05": 3}),
    (4, 16): (4, {"ccn01": 4, "ccn06": 4, "ccn11": 4}),
    (6, 32): (5, {"ccn01": 6, "ccn08": 6, "ccn15": 6, "ccn22": 6, "ccn29": 3}),
}


@pytest.mark.parametrize("fanout, nodes", sorted(SBCAST_MEASURED))
def test_sbcast_tree_is_slurms_as_measured(fanout, nodes):
    """slurm_split (Slurm's set_span + route split) gives the president's copies and the
    heads' forwards that the testbed's NIC counters measured."""
    hosts = [f"ccn{i:02d}" for i in range(1, nodes + 1)]
    groups = slurm_split(hosts, fanout)
    pres, heads = SBCAST_MEASURED[(fanout, nodes)]
    assert len(groups) == pres
    assert {h: len(rest) for h, rest in groups if rest} == heads
    assert sorted(h for g in groups for h in [g[0], *g[1]]) == hosts  # each node once


def test_slurm_span_beyond_a_two_level_tree():
    # 256 nodes at width 8: 8 heads of about 32 (each forwards as a star, TreeWidth 50)
    assert slurm_span(256, 8) == [32, 32, 32, 32, 32, 32, 32, 24]
    assert slurm_span(8, 8) == [0] * 8  # up to the width: every node a branch of its own
    assert sum(1 + k for k in slurm_span(10_000, 8)) == 10_000


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
    """The README's earlier measured tables (tests/fixtures/predict: staging at 8 and 32
    nodes, sync at 4, 8 and 64 targets, one run each): every point within 15%, and the
    groups measured at three target counts predict a left-out point in between."""
    r = cli("--json", "predict", "--check", REPO / "tests" / "fixtures" / "predict")
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert len(rows) == 23
    bad = [(x["method"], x["hosts"], x["scenario"]) for x in rows if abs(x["error"]) > 0.15]
    assert not bad
    bcast = next(x for x in rows if x["method"] == "bcast")
    assert abs(bcast["network_seconds"] / bcast["measured"] - 1) < 0.05  # basic_linear
    # 8 targets left out, fitted from 4 and 64: within 15% for every sync group but
    # rsync without changes (a second, 1.0 s measured)
    mid = [x for x in rows if x["workload"] == "sync" and x["hosts"] == 8]
    assert all(x["loo_error"] is not None for x in mid)
    assert [x["method"] for x in mid if abs(x["loo_error"]) > 0.15] == ["rsync"]


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
    """The acceptance check on a subset that runs in well under a minute: the quick
    suite's records and the quiet service run (docs/results/service/*-0946*, *-0954*:
    the machine to itself), every point predicted within 15% of its median."""
    files = _shipped_testbed_records() + sorted((SHIPPED / "service").glob("*-094624.json")) \
        + sorted((SHIPPED / "service").glob("*-095442.json"))
    if not files:
        pytest.skip("no testbed records under docs/results/ yet: run `make bench-quick` "
                    "as root on the testbed and copy results/*.json there")
    r = cli("--json", "predict", *[a for f in files for a in ("--check", f)])
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert {(x["workload"], x["method"]) for x in rows} >= {
        ("stage", "chain"), ("stage", "transit"), ("sync", "rsync"), ("sync", "mpisync")}
    bad = [(x["method"], x["launch"], x["hosts"], x["scenario"], round(x["error"], 3))
           for x in rows if abs(x["error"]) > 0.15]
    assert not bad, bad


@needs_simgrid
def test_report_shows_predicted_rows_beside_the_measured(cli, tmp_path, monkeypatch):
    """`report --predict`: the measured tables, each measured point predicted, and the
    paper's figures predicted (here on a small cluster instead of Chiba City's)."""
    from chiba_admin.commands import predict as pr

    files = _shipped_testbed_records()
    if not files:
        pytest.skip("no testbed records under docs/results/ yet")
    monkeypatch.setattr(pr, "CHIBA", _small(tmp_path))
    r = cli("--json", "report", "--predict", *files)
    assert r.code == 0, r.err
    d = r.json()
    assert d["stage"] and d["predicted"]["rows"]
    measured = {(row["workload"], row["method"]) for row in d["predicted"]["rows"]}
    assert ("stage", "chain") in measured and ("stage", "transit") in measured
    paper = d["predicted_paper"]["rows"]
    assert {(x["figure"], x["method"]) for x in paper} >= {
        (1, "chain"), (1, "bcast (MPICH2)"), (1, "transit"), (2, "mpisync"), (2, "rsync")}
    assert all(x["predicted"] for x in paper)
    r = cli("report", "--predict", *files)
    assert r.code == 0 and "Predicted vs measured" in r.out and "Figure 1" in r.out


@needs_simgrid
def test_paper_figures_on_chiba_city_explain_the_paper(cli, tmp_path, monkeypatch):
    """`predict paper` on Chiba City's shape (8 towns, Fast Ethernet town links, GigE
    core), cut to 1 town x 32 + 3 more towns so it runs in seconds: at 128 nodes the
    rows carry the paper's 216 and 57 Mb/s and each difference is explained."""
    monkeypatch.setenv("CHIBA_PREDICT_BUDGET", "3000")  # long streams extrapolated sooner
    path = _small(tmp_path, towns=4, per=32, node=100e6, core=1e9, uplink=100e6)
    r = cli("--json", "predict", "paper", "--cluster", path)
    assert r.code == 0, r.err
    d = r.json()
    at128 = {x["method"]: x for x in d["rows"] if x["figure"] == 1 and x["hosts"] == 128}
    assert at128["bcast (MPICH2)"]["paper_mbps"] == 216
    assert at128["transit"]["paper_mbps"] == 57
    # Transit is bound by the mayors' Fast Ethernet town links: 4 of them
    assert at128["transit"]["aggregate_mbps"] < 4 * 100
    assert at128["chain"]["aggregate_mbps"] > 10 * at128["transit"]["aggregate_mbps"]
    assert any("57" in line for line in d["explained"])
    assert any("216" in line for line in d["explained"])


@needs_simgrid
def test_peers_are_bound_by_the_mayors_town_links(cli, tmp_path):
    """pdcp/clush and sbcast (fan-out 8: a star at 8 nodes) send every copy from the
    president: a town's 4 copies share its mayor's 20 Mb/s town-side link."""
    path = _small(tmp_path)
    rows = _predict(cli, path, "stage", "--methods", "pdcp,sbcast", "--nodes", "8",
                    "--sizes", "4MiB")
    bound = 4 * 4 * MiB * 8 / 20e6
    for r in rows:
        net = sum(v for k, v in r["phases"].items() if k not in ("ssh", "launch"))
        assert bound < net < bound * 1.3, r
        assert r["bytes_by_class"]["town"] == 8 * 4 * MiB


@needs_simgrid
@pytest.mark.parametrize("method, nodes, heads", [
    ("sbcast", 32, ["ccn01", "ccn10", "ccn19"]),  # -F 8
    ("sbcast-tree", 32, ["ccn01", "ccn08", "ccn15", "ccn22"]),  # -F 6; ccn29 forwards 3
])
def test_sbcast_bytes_per_nic_match_the_testbed(tmp_path, method, nodes, heads):
    """sbcast at 32 nodes on the paper-shaped testbed (4 towns of 8): the simulated bytes
    each NIC sent are the measured ones (SBCAST_MEASURED), and so is the time: the
    records measured 66.9 s (sbcast) and 57.7 s (sbcast -F 6) with ~3 s of start-up;
    a store-and-forward of both 8 MiB blocks down a level-by-level tree took 220 s."""
    from chiba_admin.predict.runner import predict_points
    from topology.loader import loads_topology

    text = generated_topology_toml(4, 8, 20e6, 200e6, uplink_bps=20e6)
    fan = 8 if method == "sbcast" else 6
    job = {"method": "sbcast", "n": nodes, "bytes": 16 * MiB, "fanout": fan}
    (r,) = predict_points(text, loads_topology(text, "<t>"), [job], engine.Calibration(),
                          "<t>")
    pres, measured = SBCAST_MEASURED[(fan, nodes)]
    assert r["president_tx"] == pres * 16 * MiB
    senders = {h: b // (16 * MiB) for h, b in r["top_senders"].items() if h.startswith("ccn")}
    assert senders == measured and sorted(senders)[:len(heads)] == heads
    measured_s = {"sbcast": 66.9, "sbcast-tree": 57.7}[method]
    assert 0.85 * (measured_s - 3) < r["phases"]["transfer"] < 1.1 * measured_s


@needs_simgrid
def test_bcast_chunks_stream_down_the_tree(tmp_path):
    """MPI_Bcast per 4 MiB chunk does not synchronise: at 4 nodes (Open MPI's chain,
    rank 0 -> 1 -> 2 -> 3) rank 0 sends chunk k + 1 once rank 1 has sent chunk k on and
    entered the next MPI_Bcast (rendezvous: two hop times a chunk), so the read, 4 chunks
    and the tail take about 11 hop times, where chunk after chunk (read, then 3 hops each)
    took 13; the testbed measured 16.8 s (9.7 hop times) for the transfer. Rank 0 reads
    each chunk once; ranks 0-2 each send the file once."""
    from chiba_admin.predict.runner import predict_points
    from topology.loader import loads_topology

    text = generated_topology_toml(2, 2, 20e6, 200e6, uplink_bps=20e6)
    job = {"method": "bcast", "n": 4, "bytes": 16 * MiB}
    (r,) = predict_points(text, loads_topology(text, "<t>"), [job], engine.Calibration(),
                          "<t>")
    hop = 4 * MiB * 8 / 20e6 / engine.Calibration().tcp_efficiency
    assert r["algorithm"] == "2 chain"
    assert 9 * hop < r["phases"]["transfer"] < 11 * hop
    assert r["president_tx"] == 16 * MiB
    assert set(r["top_senders"]) >= {"ccn01", "ccn02", "ccn03"}
    assert all(r["top_senders"][h] == 16 * MiB for h in ("ccn01", "ccn02", "ccn03"))
    # 16 ranks: scatter + allgather, chunk after chunk; still one read of each byte, and
    # every rank sends about 15/16 of the file in the allgather (rank 0 as much again in
    # the scatter), as the records' NIC counters show (ccn01 1.9 copies, the others ~1)
    text = generated_topology_toml(4, 4, 20e6, 200e6, uplink_bps=20e6)
    for nbytes in (16 * MiB, 16 * MiB + 992, 4 * MiB):
        (r,) = predict_points(text, loads_topology(text, "<t>"),
                              [{"method": "bcast", "n": 16, "bytes": nbytes}],
                              engine.Calibration(), "<t>")
        assert r["algorithm"] == "8 scatter_allgather"
        assert r["president_tx"] == nbytes
        top = r["top_senders"]
        assert max(top, key=top.get) == "ccn01"
        assert 1.8 < top["ccn01"] / nbytes < 1.95


@needs_simgrid
def test_check_the_shipped_grid(cli):
    """Issue 18's grid (docs/results/grid: staging at 4-32 nodes with every method and
    peer, sync at 2-64 targets): every point within 15% but one, MPI_Bcast at 16 nodes
    (Open MPI's scatter + recursive-doubling allgather; README, "Measured vs predicted"),
    which stays within 20%. A model change that loses any other point fails here."""
    grid = SHIPPED / "grid"
    if not any(grid.glob("*.json")):
        pytest.skip("no grid records under docs/results/grid/")
    r = cli("--json", "predict", "--check", str(grid))
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert len(rows) >= 74
    assert {x["method"] for x in rows} >= {"chain", "bcast", "transit", "pdcp", "clush",
                                           "sbcast", "sbcast-tree", "rsync", "mpisync"}
    misses = [(x["workload"], x["method"], x["hosts"]) for x in rows if abs(x["error"]) > 0.15]
    assert misses in ([], [("stage", "bcast", 16)]), misses
    assert max(abs(x["error"]) for x in rows) < 0.20


@needs_simgrid
def test_check_the_shipped_grid_with_its_idle_repeats(cli):
    """The grid with its idle re-measures (docs/results/grid-idle: the two 256 MiB chain
    cases with the paced download, MPI_Bcast and the chain at 16 nodes, the grid's one
    miss, measured under load, and every method and peer at 64 MiB at 8 and 32 nodes):
    every point within 15%."""
    grid, idle = SHIPPED / "grid", SHIPPED / "grid-idle"
    if not any(grid.glob("*.json")) or not any(idle.glob("*.json")):
        pytest.skip("no grid records under docs/results/grid*/")
    r = cli("--json", "predict", "--check", str(grid), "--check", str(idle))
    assert r.code == 0, r.err
    rows = r.json()["rows"]
    assert len(rows) >= 90
    assert {(x["method"], x["hosts"]) for x in rows if x["bytes"] == 64 << 20} >= {
        (m, n) for m in ("pdcp", "clush", "sbcast", "sbcast-tree") for n in (8, 32)}
    assert [(x["method"], x["hosts"]) for x in rows if abs(x["error"]) > 0.15] == []
