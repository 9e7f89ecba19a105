"""Staging on the namespace testbed: real ssh-launched mpiexec from the president, shaped links."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from support.testbed import data_dir, tb_cli
from support.trees import assert_same_tree, make_tree

pytestmark = [pytest.mark.testbed, pytest.mark.mpi]

NODES = [f"ccn0{i}" for i in range(1, 9)]


@pytest.fixture
def clean_scratch(testbed_cluster):
    yield
    for h in NODES:
        d = data_dir(testbed_cluster, h)
        for name in os.listdir(d):
            p = d / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def test_stage_and_collect_over_ssh(testbed_cluster, clean_scratch, tmp_path):
    tb = testbed_cluster
    src = make_tree(tmp_path / "proj", big=2_000_000)
    code, out, err = tb_cli(tb, "stage", src, "--nodes", "@nodes", "--json")
    assert code == 0, err
    j = json.loads(out)
    assert j["ok"] and j["kind"] == "ssh" and j["nodes"] == NODES
    for n in NODES:
        assert_same_tree(src, data_dir(tb, n) / "proj")
        assert j["hosts"][n]["throughput_bps"] > 0
    # and back: every node's copy into DIR/<host>/ on the president
    out_dir = tmp_path / "back"
    code, out, err = tb_cli(tb, "collect", "proj", "--nodes", "@town2", "--dest", str(out_dir),
                          "--json")
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == NODES[4:]
    for n in NODES[4:]:
        assert_same_tree(src, out_dir / n / "proj")


def test_dying_node_aborts_everyone_and_next_run_cleans(testbed_cluster, clean_scratch,
                                                        tmp_path):
    tb = testbed_cluster
    src = make_tree(tmp_path / "proj", big=1_000_000)
    code, out, err = tb_cli(tb, "stage", src, "--nodes", "@nodes", "--chunk", "64KiB", "--json",
                            "--timeout", "120", env={"CHIBA_FAULTS": json.dumps(
                                {"point": "stage.chunk", "rank": 5, "do": "exit", "after": 3})})
    assert code == 1, err
    j = json.loads(out)
    assert list(j["failures"]) == ["ccn06"], j["failures"]
    for n in NODES:
        assert not (data_dir(tb, n) / "proj").exists(), n
    # whatever a killed rank could not remove goes at the next run on that node
    code, out, err = tb_cli(tb, "stage", src, "--nodes", "@nodes", "--json")
    assert code == 0, err
    for n in NODES:
        assert sorted(os.listdir(data_dir(tb, n))) == [".proj.chiba-staged", "proj"], n


def test_full_disk_on_one_node(testbed_cluster, clean_scratch, tmp_path):
    tb = testbed_cluster
    src = make_tree(tmp_path / "proj", big=3_000_000)
    tb.fault("ccn03", "fill-disk")
    try:
        code, out, err = tb_cli(tb, "stage", src, "--nodes", "@nodes", "--json")
    finally:
        tb.heal("ccn03")
    assert code == 1
    j = json.loads(out)
    assert list(j["failures"]) == ["ccn03"], j["failures"]
    for n in NODES:
        assert not (data_dir(tb, n) / "proj").exists(), n
        assert not [x for x in os.listdir(data_dir(tb, n)) if "chiba-stage" in x], n
