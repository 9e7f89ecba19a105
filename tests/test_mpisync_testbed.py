"""mpisync on the namespace testbed: real mpiexec over SSH, one read at the president, faults."""

from __future__ import annotations

import json
import os
import sys

import pytest

from support.testbed import data_dir
from support.trees import make_repo
from support.trees import same_inventory as same

pytestmark = pytest.mark.testbed
CHIBA = os.path.join(os.path.dirname(sys.executable), "chiba-admin")


def _sync(tb, *args: str, env: dict[str, str] | None = None):
    pre = ["env", *[f"{k}={v}" for k, v in (env or {}).items()]] if env else []
    cp = tb.exec(tb.president, [*pre, CHIBA, "--json", "--cluster", str(tb.topology_file),
                                "sync-mayors", *args], timeout=240)
    try:
        res = json.loads(cp.stdout)
    except ValueError:
        res = None
    return cp.returncode, res, cp.stderr


def test_sync_mayors_and_a_node_on_testbed(tb, tmp_path):
    src = make_repo(str(tmp_path / "src"), nfiles=80)
    targets = ["mayor1", "mayor2", "ccn03"]
    try:
        with tb.measure() as m:
            code, res, err = _sync(tb, src, "--targets", "@mayors,ccn03", "--dest", "t1",
                                   "--delete")
        assert code == 0 and res["ok"], err
        for h in targets:
            assert same(src, data_dir(tb, h, "repository") / "t1"), h
        # one read, one send: the president's NIC carried the payload about once
        pres_tx = m.delta["pres"]["tx_bytes"]
        assert res["source_bytes"] <= pres_tx < 1.5 * res["source_bytes"]
        print(f"\ntestbed mpisync of {res['source_bytes'] / 1e6:.1f} MB to 3 targets: "
              f"{res['seconds']:.2f} s, president sent {pres_tx / 1e6:.1f} MB, "
              f"phases {res['phases']}")

        # nothing changed: nothing sent
        code, res, err = _sync(tb, src, "--targets", "@mayors,ccn03", "--dest", "t1")
        assert code == 0 and res["groups"] == 0 and res["bytes_sent"] == 0, err
    finally:
        for h in targets:
            tb.exec(h, ["rm", "-rf", "--", "/opt/chiba/repo/t1"])


def test_full_disk_on_one_target_others_complete(tb, tmp_path):
    src = make_repo(str(tmp_path / "src"), nfiles=20)  # ~10 MB: more than a 1 MiB disk
    # --dest stays inside the repository (confined); ccn02's is a full 1 MiB disk there
    full = "/opt/chiba/repo/t2"
    tb.exec("ccn02", ["sh", "-c", f"mkdir -p {full} && mount -t tmpfs -o size=1m "
                                  f"chiba-test-full {full}"], check=True)
    try:
        code, res, err = _sync(tb, src, "--targets", "ccn0[1-3]", "--dest", "t2")
        assert code == 1, err
        assert set(res["failures"]) == {"ccn02"}
        assert "No space left" in res["failures"]["ccn02"] or "space" in \
            res["failures"]["ccn02"].lower()
        for h in ("ccn01", "ccn03"):
            assert same(src, data_dir(tb, h, "repository") / "t2"), h
    finally:
        tb.exec("ccn02", ["umount", "-l", full])
        for h in ("ccn01", "ccn02", "ccn03"):
            tb.exec(h, ["rm", "-rf", "--", full])


def test_dead_target_on_testbed_is_named_and_rerun_converges(tb, tmp_path):
    src = make_repo(str(tmp_path / "src"), nfiles=40)
    try:
        code, res, err = _sync(tb, src, "--targets", "@mayors", "--dest", "t3",
                               "--timeout", "120", env={"CHIBA_FAULTS": json.dumps(
                                   {"point": "sync.file", "rank": 2, "do": "exit", "after": 5})})
        assert code == 1, err
        assert "mayor2" in res["failures"], res["failures"]
        code, res, err = _sync(tb, src, "--targets", "@mayors", "--dest", "t3")
        assert code == 0 and res["ok"], err
        for h in ("mayor1", "mayor2"):
            assert same(src, data_dir(tb, h, "repository") / "t3"), h
    finally:
        for h in ("mayor1", "mayor2"):
            tb.exec(h, ["rm", "-rf", "--", "/opt/chiba/repo/t3"])
