"""The node side of a stage's destination checks: City Transit's agent refuses a spec that
names no entry below the host's own root (check-dest and extract alike, defence in depth
behind the CLI's confinement), and the dry run's reads of the run lock and of a dead
run's leftovers take no lock and make no file (inventory.beneath.lock_forecast,
mpitools.stage.dryrun.stale_copy), so a dry run beside a real run cannot make it fail.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys

import pytest

from support.cluster import REPO, host_path, run_cli
from support.trees import make_tree


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A host's scratch, named as the agent's environment names it (CHIBA_SCRATCH)."""
    s = tmp_path / "host" / "scratch"
    os.makedirs(s / "job")
    monkeypatch.setenv("CHIBA_SCRATCH", str(s))
    monkeypatch.setenv("CHIBA_DEST_ROOTS", "")
    return s


# (root: "S" for the host's scratch, rel, replace) -> what the reviewer saw before
BAD_SPECS = {
    "root /": ("/", "etc/shadow", False),  # said "exists"
    "root outside scratch": ("S/..", "scratch/job", False),
    "..": ("S", "..", False),  # reported on the parent
    "job/..": ("S", "job/..", False),
    ". with replace": ("S", ".", True),  # said "replace"
    "climbing": ("S", "x/../../hosts", False),  # a traceback
    "absolute rel": ("S", "/etc/passwd", False),  # a traceback
    "empty": ("S", "", False),
}


def _spec(scratch, root: str, rel: str, replace: bool) -> dict:
    root = str(scratch) + root[1:] if root.startswith("S") else root
    return {"root": root, "rel": rel, "display": f"/scratch/{rel}", "host_root": "/scratch",
            "replace": replace}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_check_dest_refuses_a_spec_outside_the_hosts_own_roots(scratch, case):
    """One result line, exit 0, no traceback: the spec is refused, naming why."""
    spec = _spec(scratch, *BAD_SPECS[case])
    p = subprocess.run([sys.executable, "-m", "legacy_transit.transit_agent", "check-dest",
                        json.dumps(spec)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and p.stderr == "", p
    res = json.loads(p.stdout.removeprefix("CHIBA-TRANSIT-RESULT "))
    assert res["ok"] is False and res["action"] is None, res
    assert "refused" in res["error"] and "\n" not in res["error"], res


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_extract_refuses_the_same_specs_touching_nothing(scratch, case):
    from legacy_transit.transit_agent import extract

    spec = {**_spec(scratch, *BAD_SPECS[case]), "inner": ".", "job": "0123456789ab",
            "hashes": [], "chunk": 1 << 20, "size": 0}
    before = sorted(os.walk(scratch.parent))
    res = extract(spec, io.BytesIO(b""))
    assert res["ok"] is False and "refused" in res["error"] and res["tree"] == "none", res
    assert sorted(os.walk(scratch.parent)) == before


def test_check_dest_reads_a_trailing_slash_as_the_entry_itself(scratch):
    """"job/" names job, which exists (it said "create")."""
    from legacy_transit.transit_agent import check_dest

    res = check_dest(_spec(scratch, "S", "job/", False))
    assert res["ok"] is False and "exists and was not made by chiba-admin" in res["error"]
    res = check_dest(_spec(scratch, "S", "job/", True))
    assert res["ok"] and res["action"] == "replace", res


def test_a_dest_roots_entry_is_the_hosts_own_root_too(tmp_path):
    """Through the CLI: a topology's dest_roots entry reaches the node agent (in
    CHIBA_DEST_ROOTS), so staging there is not refused by the root check."""
    from chiba_admin.embedded import bind, init_cluster
    from support.cluster import DEMO
    from topology import load_topology

    with open(DEMO) as f:
        text = f.read().replace('scratch = "/scratch"', 'scratch = "/scratch"\n'
                                'dest_roots = ["/data"]')
    cluster = tmp_path / "data.toml"
    cluster.write_text(text)
    topo = bind(load_topology(str(cluster)), tmp_path / "state")
    init_cluster(topo)
    os.makedirs(topo.host("ccn01").local_path("/data"), exist_ok=True)
    src = make_tree(tmp_path / "proj", big=1000)
    args = ["--cluster", str(cluster), "stage", str(src), "--method", "transit",
            "--nodes", "ccn01", "--dest", "/data/x", "--json"]
    dry = run_cli(topo, *args, "--dry-run")
    assert dry.code == 0 and dry.json()["hosts"]["ccn01"]["stage"] == "would create", dry
    real = run_cli(topo, *args)
    assert real.code == 0, real
    assert os.path.isdir(host_path(topo, "ccn01", "scratch", "/data/x/sub dir"))


# --- the lock and the leftovers, read without taking a lock -------------------------------
# a dry run may take no flock, not even a shared one: held, it would make a real run's
# LOCK_EX | LOCK_NB fail; the tests below make any flock fail them
def _held(path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_lock_forecast_takes_no_lock_and_makes_no_file(tmp_path, monkeypatch):
    from inventory.beneath import flock_held, lock_forecast, open_root

    held = _held(tmp_path / ".busy.chiba-lock")
    (tmp_path / ".free.chiba-lock").write_text("")  # a killed run's: lock_dest takes it
    monkeypatch.setattr(fcntl, "flock", lambda *a: pytest.fail("a dry run took a flock"))
    rfd = open_root(str(tmp_path))
    try:
        assert lock_forecast(rfd, "new", display="/scratch") is None
        assert not (tmp_path / ".new.chiba-lock").exists()
        assert lock_forecast(rfd, "free", display="/scratch") is None
        busy = lock_forecast(rfd, "busy", display="/scratch")
        assert str(busy) == ("/scratch/busy: another chiba-admin run is writing this "
                             "destination (wait for it, or pick another --dest)")
        assert flock_held(os.stat(tmp_path / ".busy.chiba-lock")) is True
        assert flock_held(os.stat(tmp_path / ".free.chiba-lock")) is False
    finally:
        os.close(rfd)
        os.close(held)


def test_stale_copy_tells_a_dead_runs_copy_from_a_live_ones(tmp_path, monkeypatch):
    from inventory.beneath import open_root
    from mpitools.stage.dryrun import stale_copy

    live = tmp_path / ".ee.chiba-stage-aaaaaaaaaaaa.old"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (tmp_path / ".ee.chiba-stage-cccccccccccc").mkdir()  # not moved aside: removed, not put back
    (tmp_path / ".ff.chiba-stage-bbbbbbbbbbbb.old").write_text("a user's file, not ours")
    monkeypatch.setattr(fcntl, "flock", lambda *a: pytest.fail("a dry run took a flock"))
    rfd = open_root(str(tmp_path))
    try:
        assert stale_copy(rfd, "ee") is None  # its run is alive
        assert stale_copy(rfd, "ff") is None
        (tmp_path / ".ee.chiba-stage-dddddddddddd.old").mkdir()
        assert stale_copy(rfd, "ee") == ".ee.chiba-stage-dddddddddddd.old"
    finally:
        os.close(rfd)
        os.close(fd)


def test_a_service_without_a_rank_says_so_in_one_plain_line():
    """"the the MPI service has no rank on ccn05" (a doubled article)."""
    from chiba_admin.errors import InvalidRequest
    from mpitools.service.driver import submit

    class Svc:
        kind = "service"

        def covers(self, ranks):
            return False

        def missing(self, ranks):
            return ["ccn05"]

    with pytest.raises(InvalidRequest) as e:
        submit(Svc(), "mpitools.stage.ranks", ["{}"], ["ccn05"])
    assert str(e.value).startswith("the MPI service has no rank on ccn05"), str(e.value)
