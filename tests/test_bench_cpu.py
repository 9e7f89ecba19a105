"""The bench's ``cpu`` workload: per-node CPU of staging and collecting a tree, per method,
on a small embedded cluster through the real commands, and its report table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from chiba_admin.bench import aggregate, cpuprofile, suites
from chiba_admin.bench.render import to_markdown
from chiba_admin.bench.sites import embedded_site
from chiba_admin.errors import InvalidRequest


@pytest.fixture
def site(tmp_path):
    s = embedded_site(1, 3, tmp_path)
    yield s
    s.close()


def test_cpu_workload_measures_each_method_per_node_and_reports_it(site, tmp_path):
    seen = []
    runs = cpuprofile.cpu(site, nodes=3, workdir=tmp_path, tree="text", size=2 << 20,
                          files=60, methods=(("transit", None), ("mpi", "chain")),
                          on_run=seen.append)
    assert seen == runs
    assert [(r["op"], r["method"]) for r in runs] == [
        ("stage", "transit"), ("stage", "mpi"), ("collect", "transit"), ("collect", "mpi")]
    hosts = Path(site.topo.state_dir) / "hosts"
    for r in runs:
        assert r["ok"], r.get("failures")
        assert r["files"] == 60 and r["size_bytes"] == 2 << 20
        # as root the hosts live on a tmpfs of the workload's own, gone afterwards
        assert r["disk"] == ("tmpfs" if os.geteuid() == 0 else "dir")
        # every process of the command is counted: 3 nodes cost more than 1
        assert r["cpu_n_s"] > r["cpu_1_s"] > 0
        per = (r["cpu_n_s"] - r["cpu_1_s"]) / 2
        assert r["cpu_per_node_s"] == pytest.approx(per)
        assert r["cpu_per_node_gb_s"] == pytest.approx(per / (r["size_bytes"] / 1e9))
        assert r["cpu_per_kfile_s"] == pytest.approx(per / 0.060)
    assert not os.path.ismount(hosts)
    rec = {"cluster": {"kind": "embedded"}, "runs": runs, "date": "2026-01-01T00:00:00Z"}
    rows = aggregate.report_dict([rec])["cpu"]
    assert [(r["op"], r["label"]) for r in rows] == [
        ("collect", "City Transit"), ("collect", "MPI"), ("stage", "City Transit"),
        ("stage", "MPI chain")]
    by = {(r["op"], r["method"]): r for r in rows}
    for op in ("stage", "collect"):
        t, m = by[(op, "transit")], by[(op, "mpi")]
        assert t["x_transit"] == pytest.approx(1.0)
        assert m["x_transit"] == pytest.approx(m["cpu_per_node_s"] / t["cpu_per_node_s"])
    md = to_markdown(aggregate.report_dict([rec]))
    assert "CPU per node" in md and "x Transit" in md and "MPI chain" in md


def _cpu_run(method, repeat, per, algorithm=None):
    return {"workload": "cpu", "op": "stage", "tree": "stdlib", "nodes": 8, "ok": True,
            "method": method, "algorithm": algorithm, "repeat": repeat,
            "cpu_per_node_s": per, "seconds": 1.0}


def test_x_transit_pairs_runs_of_the_same_record_and_repeat():
    """Two records of different hours: a fast one (Transit 0.5 s, chain 0.7 s: 1.4x) and
    a slow one (Transit 1.0 s, chain 1.3 s: 1.3x). The ratio of the medians over both
    (0.85 / 0.75 = 1.13x) would compare runs of different hours; the paired ratios' median
    is 1.35x. A record whose chain has no Transit run beside it adds no ratio."""
    fast = {"cluster": {"kind": "embedded"}, "commit": "a", "date": "2026-01-01T01:00",
            "runs": [_cpu_run("transit", 0, 0.5), _cpu_run("mpi", 0, 0.7, "chain")]}
    slow = {"cluster": {"kind": "embedded"}, "commit": "a", "date": "2026-01-01T09:00",
            "runs": [_cpu_run("transit", 0, 1.0), _cpu_run("mpi", 0, 1.3, "chain")]}
    lone = {"cluster": {"kind": "embedded"}, "commit": "b", "date": "2026-01-02T09:00",
            "runs": [_cpu_run("mpi", 0, 9.0, "chain")]}
    rows = {r["method"]: r for r in aggregate.report_dict([fast, slow, lone])["cpu"]}
    assert rows["mpi"]["x_transit"] == pytest.approx(1.35)
    assert rows["transit"]["x_transit"] == pytest.approx(1.0)
    # with no pair at all, the ratio of the medians
    rows = {r["method"]: r for r in aggregate.report_dict([
        {**fast, "runs": fast["runs"][:1]}, lone])["cpu"]}
    assert rows["mpi"]["x_transit"] == pytest.approx(9.0 / 0.5)


def test_cpu_workload_refuses_one_node_and_the_testbed(site, tmp_path):
    with pytest.raises(InvalidRequest):
        cpuprofile.cpu(site, nodes=1, workdir=tmp_path, tree="text")
    site.kind = "testbed"
    with pytest.raises(InvalidRequest):
        cpuprofile.cpu(site, nodes=2, workdir=tmp_path, tree="text")


def test_bench_cpu_plan_runs_on_the_embedded_cluster_with_eight_nodes():
    from chiba_admin.bench import workloads as w

    plan = suites.plan_from_options(
        "cpu", shapes=[(2, 4)], sizes=[1], datas=["tree"], repeat=2,
        stage_methods=w.STAGE_METHODS + w.SERVICE_STAGE_METHODS[:1],
        collect_methods=w.COLLECT_METHODS, sync_methods=(), targets=[], repo_files=1,
        repo_size=1, memory_size=1, inventory_files=1, hash_size=1)
    # the peers need the testbed: the cpu workload keeps this project's own methods
    assert suites.describe_plan(plan, "testbed") == [
        {"workload": "cpu", "site": "embedded", "shape": "2x4", "nodes": 8, "repeat": 2,
         "methods": [["transit", None], ["mpi", "bcast"], ["mpi", "chain"],
                     ["mpi", "chain", "service"]],
         "collect_methods": [["transit", None], ["mpi", None]]}]


def test_cpu_through_the_service_counts_its_ranks(site, tmp_path):
    """The service's ranks live on between commands, so this process never reaps them:
    their CPU is what `service status` says they used during the command, added to the
    command's own; its rows are labelled, and the service is stopped afterwards."""
    from mpitools.service import driver

    runs = cpuprofile.cpu(site, nodes=3, workdir=tmp_path, tree="text", size=2 << 20,
                          files=60, methods=(("mpi", "chain", "service"),),
                          collect_methods=(("mpi", None, "service"),))
    assert [(r["op"], r["launch"]) for r in runs] == [("stage", "service"),
                                                       ("collect", "service")]
    for r in runs:
        assert r["ok"], r.get("failures")
        # the ranks' own share is counted (a 2 MiB tree: the CLI's noise hides it in the
        # difference of 3 nodes and 1)
        assert r["ranks_cpu_n_s"] > 0 and r["ranks_cpu_1_s"] > 0
        assert r["cpu_n_s"] > r["ranks_cpu_n_s"] and r["cpu_1_s"] > r["ranks_cpu_1_s"]
        assert r["cpu_per_node_s"] is not None
    assert not driver.status(site.topo)["running"]
    rec = {"cluster": {"kind": "embedded"}, "runs": runs, "date": "2026-01-01T00:00:00Z"}
    labels = [r["label"] for r in aggregate.report_dict([rec])["cpu"]]
    assert labels == ["MPI (service)", "MPI chain (service)"]


def test_stdlib_tree_leaves_site_packages_out(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    (lib / "site-packages" / "x").mkdir(parents=True)
    (lib / "json").mkdir()
    (lib / "json" / "__init__.py").write_text("x = 1\n")
    (lib / "os.py").write_text("")
    monkeypatch.setattr(cpuprofile.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    work = tmp_path / "w"
    work.mkdir()
    tree = cpuprofile.stdlib_tree(work)
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*")) == [
        "json", "json/__init__.py", "os.py"]


def _mounted(path) -> bool:
    return os.path.ismount(path)


def _sources_at(path) -> list[str]:
    """What is mounted on ``path``, bottom first (the sources in /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mine, _, fs = line.partition(" - ")
            if mine.split()[4] == str(path):
                out.append(fs.split()[1])
    return out


@pytest.fixture
def state_under_a_movable_dir(tmp_path, monkeypatch):
    """A state directory under ``tmp_path/work`` (a directory someone could rename), a
    bystander tmpfs at ``tmp_path/victim``, and no cluster to initialise."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    from chiba_admin import embedded

    monkeypatch.setattr(embedded, "init_cluster", lambda topo: None)
    victim = tmp_path / "victim"
    victim.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "chiba-test-victim", str(victim)], check=True)
    state = tmp_path / "work" / "cluster"
    state.mkdir(parents=True)
    yield SimpleNamespace(topo=SimpleNamespace(state_dir=str(state))), state, victim
    for p in (victim, tmp_path / "moved" / "cluster" / "hosts", state / "hosts"):
        while _mounted(p):
            subprocess.run(["umount", "--lazy", str(p)], check=True)


def test_the_hosts_tmpfs_comes_off_by_descriptor_not_by_a_path_someone_moved(
        state_under_a_movable_dir, tmp_path):
    """A directory above the state directory renamed mid-run and the old path pointed at
    another mount: the unmount takes the workload's tmpfs, never the other (`umount
    --lazy PATH` took the other and left the workload's mounted)."""
    site, state, victim = state_under_a_movable_dir
    with cpuprofile._hosts_on_tmpfs(site) as disk:
        assert disk == "tmpfs" and _mounted(state / "hosts")
        (tmp_path / "work").rename(tmp_path / "moved")
        (tmp_path / "work" / "cluster").mkdir(parents=True)
        (tmp_path / "work" / "cluster" / "hosts").symlink_to(victim)
    assert _mounted(victim)
    assert not _mounted(tmp_path / "moved" / "cluster" / "hosts")


def test_the_hosts_tmpfs_is_not_put_through_a_symlink_and_comes_off_after_an_error(
        state_under_a_movable_dir, monkeypatch):
    site, state, victim = state_under_a_movable_dir
    (state / "hosts").symlink_to(victim)  # a planted symlink: no tmpfs over its target
    with cpuprofile._hosts_on_tmpfs(site) as disk:
        assert disk == "dir" and _sources_at(victim) == ["chiba-test-victim"]
    assert _sources_at(victim) == ["chiba-test-victim"]
    (state / "hosts").unlink()
    from chiba_admin import embedded

    def boom(topo):
        assert _mounted(state / "hosts")  # initialised on the tmpfs, then it fails
        raise OSError("disk on fire")
    monkeypatch.setattr(embedded, "init_cluster", boom)
    with pytest.raises(OSError, match="on fire"):
        with cpuprofile._hosts_on_tmpfs(site):
            pass
    assert not _mounted(state / "hosts")
