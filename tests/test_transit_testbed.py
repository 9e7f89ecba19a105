"""City Transit, run, collect and rsync on the namespace testbed: real sshd per host, shaped links."""

from __future__ import annotations

import json
import os

import pytest

from support.testbed import data_dir, tb_cli
from support.trees import assert_same_tree, make_tree

pytestmark = pytest.mark.testbed
NODES = [f"ccn0{i}" for i in range(1, 9)]


def _cleanup(tb, hosts, *paths):
    for h in hosts:
        tb.exec(h, ["rm", "-rf", "--", *paths])


def test_transit_stage_collect_run_on_testbed(tb, tmp_path):
    src = make_tree(tmp_path / "payload", big=256 * 1024)
    try:
        code, out, err = tb_cli(tb, "--json", "stage", str(src), "--nodes", "@nodes",
                              "--method", "transit", "--dest", "lt/in")
        res = json.loads(out)
        assert code == 0 and res["ok"], err + json.dumps(res.get("failures"))
        print(f"\ntestbed transit to 8 nodes: {res['seconds']:.2f} s, phases {res['phases']}")
        for n in NODES:
            assert_same_tree(src, data_dir(tb, n, "scratch") / "lt" / "in")
        for h in ("pres", "mayor1", "mayor2"):
            assert list(data_dir(tb, h, "spool").glob("transit-*")) == []
        # every node's checksums agree: one gathered block
        code, out, err = tb_cli(tb, "run", "-w", "@nodes", "-b", "--", "sh", "-c",
                              'cd "$CHIBA_SCRATCH/lt/in" && sha256sum -- *.txt')
        assert code == 0 and "ccn[01-08] (8)" in out, err
        code, out, err = tb_cli(tb, "--json", "collect", "lt/in", "--nodes", "ccn0[1-3]",
                              "--method", "transit", "--dest", str(tmp_path / "back"))
        assert code == 0, err
        for n in ("ccn01", "ccn02", "ccn03"):
            assert_same_tree(src, tmp_path / "back" / n / "in")
    finally:
        _cleanup(tb, NODES, "/scratch/lt")


def test_transit_fault_on_testbed_names_host_and_stage(tb, tmp_path):
    src = make_tree(tmp_path / "payload", big=200 * 1024)
    tb.fault("ccn06", "fill-disk")
    try:
        tb.fault("ccn02", "kill-sshd")
        try:
            code, out, err = tb_cli(tb, "--json", "stage", str(src), "--nodes", "@nodes",
                                  "--method", "transit", "--dest", "lt/f")
        finally:
            tb.heal("ccn02")
    finally:
        tb.heal("ccn06")
    try:
        res = json.loads(out)
        assert code == 1 and set(res["failures"]) == {"ccn02", "ccn06"}, res["failures"]
        assert res["hosts"]["ccn02"]["stage"] == "unpack"
        assert "refused" in res["hosts"]["ccn02"]["error"]
        assert "space" in res["hosts"]["ccn06"]["error"]
        for n in ("ccn01", "ccn03", "ccn05", "ccn08"):
            assert_same_tree(src, data_dir(tb, n, "scratch") / "lt" / "f")
    finally:
        _cleanup(tb, NODES, "/scratch/lt")


def test_rsync_on_testbed(tb, tmp_path):
    src = make_tree(tmp_path / "repo")
    try:
        code, out, err = tb_cli(tb, "--json", "sync-mayors", "--method", "rsync", str(src), "--dest", "lt-repo")
        res = json.loads(out)
        assert code == 0 and res["ok"], res["failures"]
        for m in ("mayor1", "mayor2"):
            assert_same_tree(src, data_dir(tb, m, "repository") / "lt-repo")
        code, out, err = tb_cli(tb, "--json", "sync-mayors", "--method", "rsync", str(src), "--dest", "lt-repo")
        assert all(h["files_transferred"] == 0 for h in json.loads(out)["hosts"].values())
    finally:
        _cleanup(tb, ["mayor1", "mayor2"], "/opt/chiba/repo/lt-repo")


def test_transit_safety_over_ssh(tb, tmp_path):
    """Over real SSH (the mayors stream the tar into each node's unpacker): --dest confined,
    a planted symlink and a held lock refuse only their node, a re-stage replaces."""
    from inventory.beneath import lock_dest, open_root, unlock_dest

    src = make_tree(tmp_path / "payload")
    scratch = {n: data_dir(tb, n, "scratch") for n in ("ccn01", "ccn02", "ccn03")}
    victim = tmp_path / "victim"
    victim.mkdir()
    try:
        code, out, err = tb_cli(tb, "stage", str(src), "--nodes", "@nodes", "--method",
                              "transit", "--dest", "../etc")
        assert code == 2 and "'..' component" in err
        (scratch["ccn01"] / "lt").mkdir()
        os.symlink(victim, scratch["ccn01"] / "lt" / "s")  # a user's plant on ccn01
        (scratch["ccn02"] / "lt" / "s").mkdir(parents=True)
        parent = open_root(str(scratch["ccn02"] / "lt" / "s"))
        held = lock_dest(parent, "x")  # another run is writing ccn02's lt/s/x
        try:
            code, out, err = tb_cli(tb, "--json", "stage", str(src), "--nodes", "ccn0[1-3]",
                                  "--method", "transit", "--dest", "lt/s/x")
        finally:
            unlock_dest(parent, "x", held)
            os.close(parent)
        res = json.loads(out)
        assert code == 1 and set(res["failures"]) == {"ccn01", "ccn02"}, res["failures"]
        assert "symbolic link (not followed)" in res["failures"]["ccn01"]
        assert "another chiba-admin run" in res["failures"]["ccn02"]
        assert os.listdir(victim) == []
        assert res["hosts"]["ccn03"]["tree"] == "complete"
        assert_same_tree(src, scratch["ccn03"] / "lt" / "s" / "x")
        (src / "plain.txt").unlink()
        code, out, err = tb_cli(tb, "stage", str(src), "--nodes", "ccn03", "--method",
                              "transit", "--dest", "lt/s/x")
        assert code == 0, err
        assert_same_tree(src, scratch["ccn03"] / "lt" / "s" / "x")
    finally:
        _cleanup(tb, NODES[:3], "/scratch/lt")
