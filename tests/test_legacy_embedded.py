"""City Transit, collect, run and the rsync baseline on the embedded cluster, checked byte for byte."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from chiba_admin.cli import main
from chiba_admin.errors import UsageError
from conftest import DEMO

WEIRD_NAMES = ["plain.txt", "with space.txt", "it's \"quoted\"", "$(touch pwned)",
               "new\nline", "-dash", "semi;colon&amp", "ünïcode"]
NODES = [f"ccn0{i}" for i in range(1, 9)]


def make_tree(root: Path, big: int = 0) -> Path:
    """A source tree whose names a careless shell line would break."""
    (root / "sub dir" / "deeper").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(WEIRD_NAMES):
        (root / name).write_bytes(f"{name}\n{i}\n".encode() * (i + 1))
    (root / "sub dir" / "deeper" / "bin.dat").write_bytes(bytes(range(256)) * 40)
    if big:
        (root / "big.bin").write_bytes(os.urandom(big))
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    out = {}
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        for n in dirs:
            out[os.path.join(rel, n)] = None
        for n in files:
            out[os.path.join(rel, n)] = Path(d, n).read_bytes()
    return out


def assert_same_tree(src: Path, dst: Path) -> None:
    """Same names, same bytes (directories included)."""
    assert Path(dst).is_dir(), f"{dst} missing"
    a, b = _tree(Path(src)), _tree(Path(dst))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """A fresh embedded demo cluster made through the CLI; yields (topology, state dir)."""
    from chiba_admin.embedded import bind
    from topology import load_topology

    state = tmp_path / "state"
    assert main(["--cluster", DEMO, "--state", str(state), "cluster", "init"]) == 0
    monkeypatch.setenv("CHIBA_STATE", str(state))
    monkeypatch.setenv("CHIBA_CLUSTER", DEMO)
    return bind(load_topology(DEMO), state), state


def _h(state: Path, host: str, *parts: str) -> Path:
    return state / "hosts" / host / Path(*parts)


# --- City Transit --------------------------------------------------------------------------
def test_transit_default_relative_absolute_dest(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "my data")
    events = []
    res = stage_transit(topo, str(src), NODES, progress=lambda e, **k: events.append((e, k)))
    assert res["ok"] and res["failures"] == {}
    assert res["dest"] == "/scratch/my data" and res["files"] == len(WEIRD_NAMES) + 1
    for n in NODES:
        assert_same_tree(src, _h(state, n, "scratch", "my data"))
        assert res["hosts"][n]["stage"] == "done" and res["hosts"][n]["throughput_bps"] > 0
    assert [k["stage"] for e, k in events if e == "start"] == ["pack", "to_mayors", "unpack",
                                                              "cleanup"]
    assert res["phase_bytes"]["unpack"] == 8 * res["bytes"]
    assert res["phase_bytes"]["to_mayors"] == 2 * res["bytes"]
    assert set(res["phases"]) == {"pack", "to_president", "to_mayors", "unpack", "cleanup"}
    for h in ("pres", "mayor1", "mayor2"):
        assert os.listdir(_h(state, h, "var/spool/chiba")) == []
    assert not list(state.rglob("pwned"))

    res = stage_transit(topo, str(src), ["ccn02", "ccn07"], "jobs/1")
    assert res["ok"] and res["dest"] == "/scratch/jobs/1"
    assert_same_tree(src, _h(state, "ccn07", "scratch", "jobs", "1"))
    assert not _h(state, "ccn01", "scratch", "jobs").exists()
    res = stage_transit(topo, str(src), ["ccn05"], "/tmp/abs")
    assert res["ok"] and res["dest"] == "/tmp/abs"
    assert_same_tree(src, _h(state, "ccn05", "tmp", "abs"))


def test_transit_single_file_renamed(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    f = tmp_path / "in put.bin"
    f.write_bytes(os.urandom(5000))
    res = stage_transit(topo, str(f), ["ccn01", "ccn08"], "inputs/$(x) it's.bin")
    assert res["ok"], res["failures"]
    for n in ("ccn01", "ccn08"):
        assert _h(state, n, "scratch", "inputs", "$(x) it's.bin").read_bytes() == f.read_bytes()
    res = stage_transit(topo, str(f), ["ccn03"])
    assert _h(state, "ccn03", "scratch", "in put.bin").read_bytes() == f.read_bytes()


@pytest.mark.parametrize("src,nodes,msg", [
    ("missing", NODES, "source does not exist"),
    ("ok", ["ccn99"], "unknown host 'ccn99'"),
    ("ok", [], "no nodes selected"),
    ("ok", ["mayor1"], "mayor1 is a mayor"),
])
def test_transit_bad_input_touches_nothing(demo, tmp_path, src, nodes, msg):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    path = make_tree(tmp_path / "ok") if src == "ok" else tmp_path / "missing"
    before = sorted(p for p in state.rglob("*"))
    with pytest.raises(UsageError, match=msg.replace("(", r"\(")):
        stage_transit(topo, str(path), nodes)
    assert sorted(p for p in state.rglob("*")) == before


def test_transit_one_node_cannot_write_others_finish(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "data")
    # ccn06's destination is a file: mkdir -p fails there, as a full or broken disk would
    (_h(state, "ccn06", "scratch", "data")).write_text("in the way")
    res = stage_transit(topo, str(src), NODES)
    assert not res["ok"] and set(res["failures"]) == {"ccn06"}
    assert res["hosts"]["ccn06"]["stage"] == "unpack"
    assert "File exists" in res["hosts"]["ccn06"]["error"] or \
        "Not a directory" in res["hosts"]["ccn06"]["error"]
    for n in NODES:
        if n != "ccn06":
            assert_same_tree(src, _h(state, n, "scratch", "data"))
    assert os.listdir(_h(state, "mayor2", "var/spool/chiba")) == []  # cleaned despite failure


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_transit_no_space_on_one_node(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "data", big=300_000)
    scratch = _h(state, "ccn03", "scratch")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(scratch)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        res = stage_transit(topo, str(src), NODES)
    finally:
        subprocess.run(["umount", str(scratch)], check=True)
    assert set(res["failures"]) == {"ccn03"}
    assert res["hosts"]["ccn03"]["stage"] == "unpack"
    err = res["hosts"]["ccn03"]["error"]
    assert "No space left" in err or "no space left" in err
    assert_same_tree(src, _h(state, "ccn04", "scratch", "data"))


def test_collect_embedded(demo, tmp_path):
    from legacy_transit.transit import collect_transit, stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "res")
    assert stage_transit(topo, str(src), NODES[:3], "out/r")["ok"]
    res = collect_transit(topo, "out/r", NODES[:4], str(tmp_path / "back"))
    assert not res["ok"] and set(res["failures"]) == {"ccn04"}  # it never got the files
    assert "exit 2" in res["failures"]["ccn04"] and "r" in res["failures"]["ccn04"]
    for n in NODES[:3]:
        assert_same_tree(src, tmp_path / "back" / n / "r")
        assert res["hosts"][n]["bytes"] > 0
    assert not (tmp_path / "back" / "ccn04").exists()
    with pytest.raises(UsageError):
        collect_transit(topo, "out/r", ["nope"], str(tmp_path / "x"))


# --- run ------------------------------------------------------------------------------------
def test_run_env_and_gathering(demo, cli):
    topo, state = demo
    r = cli("run", "-w", "@nodes", "-b", "--", "sh", "-c",
            'echo "$CHIBA_ROLE $CHIBA_TOWN"; test -d "$CHIBA_SCRATCH" && test -d "$CHIBA_SPOOL"'
            ' && test -d "$CHIBA_REPO" && echo dirs-ok')
    assert r.code == 0, r.err
    assert "ccn[01-04] (4)\n" in r.out and "node town1\ndirs-ok" in r.out
    assert "ccn[05-08] (4)\n" in r.out and "node town2" in r.out
    r = cli("run", "-w", "mayor2,ccn01", 'echo "$CHIBA_HOST:$CHIBA_ROLE"')
    assert sorted(r.out.splitlines()) == ["ccn01: ccn01:node", "mayor2: mayor2:mayor"]


def test_run_sha256_after_transit_matches(demo, cli, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "s")
    os.remove(src / "new\nline")  # sha256sum escapes such names, which is another test
    assert stage_transit(topo, str(src), NODES, "s")["ok"]
    r = cli("run", "-w", "@nodes", "-b", "--", "sh", "-c",
            'cd "$CHIBA_SCRATCH/s" && sha256sum -- *.txt')
    assert r.code == 0
    assert "ccn[01-08] (8)\n" in r.out and r.out.count("plain.txt") == 1


def test_run_exit_codes_and_timeouts(demo, cli):
    r = cli("run", "-w", "@nodes", 'case $CHIBA_HOST in ccn02) exit 3;; ccn05) exit 7;; esac')
    assert r.code == 7  # pdsh -S: the largest remote exit code
    assert "ccn02: exited with code 3" in r.err and "ccn05: exited with code 7" in r.err
    r = cli("run", "-w", "ccn01", "-u", "0.3", "sleep 5")
    assert r.code == 255 and "ccn01: command timed out after 0.3s" in r.err
    r = cli("run", "-w", "ccn[01-99]", "true")
    assert r.code == 2 and "unknown host" in r.err
    j = cli("--json", "run", "-w", "ccn0[1-2]", "echo hi").json()
    assert j["rc"] == 0 and j["groups"][0]["nodeset"] == "ccn[01-02]"


# --- rsync baseline -------------------------------------------------------------------------
def test_sync_mayors_rsync_embedded(demo, cli, tmp_path):
    topo, state = demo
    src = make_tree(tmp_path / "repo")
    r = cli("sync-mayors", "--method", "rsync", str(src))
    assert r.code == 0, r.err
    assert "mayor1" in r.out and "2/2 targets in sync" in r.out
    for m in ("mayor1", "mayor2"):
        assert_same_tree(src, _h(state, m, "opt/chiba/repo"))
    j = cli("--json", "sync-mayors", "--method", "rsync", str(src)).json()
    assert j["ok"] and all(h["files_transferred"] == 0 for h in j["hosts"].values())
    # a stale file on one mayor: --dry-run leaves it, --delete removes it
    stale = _h(state, "mayor2", "opt/chiba/repo", "stale")
    stale.write_text("old")
    (src / "plain.txt").write_text("changed")
    j = cli("--json", "sync-mayors", "--method", "rsync", "--dry-run", "--delete", str(src)).json()
    assert j["ok"] and stale.exists() and j["hosts"]["mayor1"]["files_transferred"] == 1
    j = cli("--json", "sync-mayors", "--method", "rsync", "--delete", "--checksum", str(src)).json()
    assert j["ok"] and not stale.exists()
    assert_same_tree(src, _h(state, "mayor2", "opt/chiba/repo"))
    j = cli("--json", "sync-mayors", "--method", "rsync", "--targets", "ccn0[1-2]", "--dest", "r", "--exclude",
            "*.txt", str(src)).json()
    assert j["targets"] == ["ccn01", "ccn02"] and j["dest"] == "/opt/chiba/repo/r"
    got = _tree(_h(state, "ccn02", "opt/chiba/repo/r"))
    assert "./plain.txt" not in got and "./-dash" in got


def test_sync_mayors_bad_input_and_failure(demo, cli, tmp_path):
    topo, state = demo
    r = cli("sync-mayors", "--method", "rsync", str(tmp_path / "missing"))
    assert r.code == 2 and "source does not exist" in r.err
    (tmp_path / "empty").mkdir()
    r = cli("sync-mayors", "--method", "rsync", "--delete", str(tmp_path / "empty"))
    assert r.code == 2 and "empty source" in r.err
    r = cli("sync-mayors", "--method", "rsync", "--targets", "mayor9", str(tmp_path))
    assert r.code == 2
    # mayor1's destination is a file: its rsync fails, mayor2's succeeds
    _h(state, "mayor1", "opt/chiba/repo/blocked").write_text("x")
    src = make_tree(tmp_path / "src")
    r = cli("sync-mayors", "--method", "rsync", "--dest", "blocked/sub", str(src))
    assert r.code == 1 and "mayor1" in r.err and "mayor2" not in r.err
    assert_same_tree(src, _h(state, "mayor2", "opt/chiba/repo/blocked/sub"))


def test_stage_and_collect_cli_method_transit(demo, cli, tmp_path):
    """The lead's stage/collect commands drive stage_transit/collect_transit (exit 1 on a host)."""
    topo, state = demo
    src = make_tree(tmp_path / "cli src")
    r = cli("--json", "stage", str(src), "--nodes", "@town2", "--method", "transit")
    assert r.code == 0, r.err
    assert r.json()["method"] == "transit" and r.json()["nodes"] == NODES[4:]
    for n in NODES[4:]:
        assert_same_tree(src, _h(state, n, "scratch", "cli src"))
    _h(state, "ccn02", "scratch", "cli src").write_text("blocks the directory")
    r = cli("stage", str(src), "--nodes", "ccn0[1-2]", "--method", "transit")
    assert r.code == 1 and "ccn02" in r.err and "ccn01" not in r.err
    r = cli("collect", "cli src", "--nodes", "@town2", "--method", "transit", "--dest",
            str(tmp_path / "back"))
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "back" / "ccn07" / "cli src")
    r = cli("stage", str(tmp_path / "nope"), "--nodes", "@nodes", "--method", "transit")
    assert r.code == 2 and "source does not exist" in r.err


def test_transit_home_server_not_president(tmp_path):
    """With a separate home server the tar goes home -> president, and the president's own
    agent pushes it to the mayors (recursive control one level up)."""
    from chiba_admin.embedded import bind, init_cluster
    from legacy_transit.transit import stage_transit
    from topology import loads_topology

    text = Path(DEMO).read_text().replace('kind = "embedded"', 'kind = "embedded"\nhome = "mayor2"')
    topo = bind(loads_topology(text, "home.toml"), tmp_path / "state")
    init_cluster(topo)
    src = make_tree(tmp_path / "d")
    res = stage_transit(topo, str(src), ["ccn01", "ccn08"])
    assert res["ok"], res["failures"]
    assert res["phase_bytes"]["to_president"] == res["bytes"] > 0
    assert res["phase_bytes"]["to_mayors"] == 2 * res["bytes"]
    for n in ("ccn01", "ccn08"):
        assert_same_tree(src, tmp_path / "state" / "hosts" / n / "scratch" / "d")
    for h in ("pres", "mayor1", "mayor2"):
        assert os.listdir(tmp_path / "state" / "hosts" / h / "var/spool/chiba") == []
