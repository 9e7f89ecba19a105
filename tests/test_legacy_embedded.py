"""City Transit, collect, run and the rsync baseline on the embedded cluster, checked byte for byte."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from chiba_admin.cli import main
from chiba_admin.errors import InvalidRequest
from chiba_admin.progress import Progress
from support.cluster import DEMO
from support.fakes import node_tar
from support.trees import assert_same_tree, count_files, make_tree, tree_signature

NODES = [f"ccn0{i}" for i in range(1, 9)]


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


class Recorder(Progress):
    """Every progress event, in order: (method name, its arguments)."""

    def __init__(self):
        self.events = []

    def phase(self, *a, **k):
        self.events.append(("phase", a))

    def host_done(self, *a, **k):
        self.events.append(("host_done", a))


class OnPhase(Progress):
    """Calls ``fn(name)`` as each phase starts (in the driver's thread)."""

    def __init__(self, fn):
        self.fn = fn

    def phase(self, name, total_bytes=None, hosts=0):
        self.fn(name)


def _h(state: Path, host: str, *parts: str) -> Path:
    return state / "hosts" / host / Path(*parts)


# --- City Transit --------------------------------------------------------------------------
def test_transit_default_relative_absolute_dest(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "my data")
    seen = Recorder()
    res = stage_transit(topo, str(src), NODES, progress=seen).to_dict()
    assert res["ok"] and res["failures"] == {}
    assert res["dest"] == "/scratch/my data" and res["files"] == count_files(src)
    for n in NODES:
        assert_same_tree(src, _h(state, n, "scratch", "my data"))
        assert res["hosts"][n]["stage"] == "done" and res["hosts"][n]["throughput_bps"] > 0
    assert [a[0] for e, a in seen.events if e == "phase"] == ["pack", "to_mayors", "unpack",
                                                              "cleanup"]
    assert res["phase_bytes"]["unpack"] == 8 * res["bytes"]
    assert res["phase_bytes"]["to_mayors"] == 2 * res["bytes"]
    assert set(res["phases"]) == {"pack", "to_president", "to_mayors", "unpack", "cleanup"}
    for h in ("pres", "mayor1", "mayor2"):
        assert os.listdir(_h(state, h, "var/spool/chiba")) == []
    assert not list(state.rglob("pwned"))

    res = stage_transit(topo, str(src), ["ccn02", "ccn07"], "jobs/1").to_dict()
    assert res["ok"] and res["dest"] == "/scratch/jobs/1"
    assert_same_tree(src, _h(state, "ccn07", "scratch", "jobs", "1"))
    assert not _h(state, "ccn01", "scratch", "jobs").exists()
    res = stage_transit(topo, str(src), ["ccn05"], "/scratch/abs").to_dict()
    assert res["ok"] and res["dest"] == "/scratch/abs"
    assert_same_tree(src, _h(state, "ccn05", "scratch", "abs"))


def test_transit_single_file_renamed(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    f = tmp_path / "in put.bin"
    f.write_bytes(os.urandom(5000))
    res = stage_transit(topo, str(f), ["ccn01", "ccn08"], "inputs/$(x) it's.bin").to_dict()
    assert res["ok"], res["failures"]
    for n in ("ccn01", "ccn08"):
        assert _h(state, n, "scratch", "inputs", "$(x) it's.bin").read_bytes() == f.read_bytes()
    res = stage_transit(topo, str(f), ["ccn03"]).to_dict()
    assert _h(state, "ccn03", "scratch", "in put.bin").read_bytes() == f.read_bytes()
    # staged again: the file is replaced, nothing is left beside it but the marker
    f.write_bytes(b"second")
    assert stage_transit(topo, str(f), ["ccn03"]).to_dict()["ok"]
    assert _h(state, "ccn03", "scratch", "in put.bin").read_bytes() == b"second"
    assert sorted(p.name for p in _h(state, "ccn03", "scratch").iterdir()) == \
        [".in put.bin.chiba-staged", "in put.bin"]


@pytest.mark.parametrize("src,nodes,msg", [
    ("missing", NODES, "source does not exist"),
    ("", NODES, "no SRC given"),
    ("ok", ["ccn99"], "unknown host 'ccn99'"),
    ("ok", [], "no nodes selected"),
    ("ok", ["mayor1"], "mayor1 is a mayor"),
])
def test_transit_bad_input_touches_nothing(demo, tmp_path, src, nodes, msg):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    path = make_tree(tmp_path / "ok") if src == "ok" else tmp_path / src if src else ""
    before = sorted(p for p in state.rglob("*"))
    with pytest.raises(InvalidRequest, match=msg.replace("(", r"\(")):
        stage_transit(topo, str(path), nodes).to_dict()
    assert sorted(p for p in state.rglob("*")) == before


def test_transit_one_node_cannot_write_others_finish(demo, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "data")
    # on ccn06 the destination's parent is a file, as a broken disk layout would be
    (_h(state, "ccn06", "scratch", "jobs")).write_text("in the way")
    res = stage_transit(topo, str(src), NODES, "jobs/data").to_dict()
    assert not res["ok"] and set(res["failures"]) == {"ccn06"}
    assert res["hosts"]["ccn06"]["stage"] == "unpack"
    assert "jobs: is not a directory" in res["hosts"]["ccn06"]["error"]
    assert res["hosts"]["ccn06"]["tree"] == "none"
    for n in NODES:
        if n != "ccn06":
            assert_same_tree(src, _h(state, n, "scratch", "jobs", "data"))
            assert res["hosts"][n]["tree"] == "complete"
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
        res = stage_transit(topo, str(src), NODES).to_dict()
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
    assert stage_transit(topo, str(src), NODES[:3], "out/r").to_dict()["ok"]
    res = collect_transit(topo, "out/r", NODES[:4], str(tmp_path / "back")).to_dict()
    assert not res["ok"] and set(res["failures"]) == {"ccn04"}  # it never got the files
    assert "exit 2" in res["failures"]["ccn04"] and "r" in res["failures"]["ccn04"]
    for n in NODES[:3]:
        assert_same_tree(src, tmp_path / "back" / n / "r")
        assert res["hosts"][n]["bytes"] > 0
    assert not (tmp_path / "back" / "ccn04").exists()
    with pytest.raises(InvalidRequest):
        collect_transit(topo, "out/r", ["nope"], str(tmp_path / "x")).to_dict()


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
    assert stage_transit(topo, str(src), NODES, "s").to_dict()["ok"]
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
    got = tree_signature(_h(state, "ccn02", "opt/chiba/repo/r"))
    assert "plain.txt" not in got and "-dash" in got


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
    assert r.code == 1 and "ccn02: unpack:" in r.err and "ccn01:" not in r.err
    assert "complete tree on ccn01 (1); no tree from this run on ccn02 (1)" in r.err
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
    res = stage_transit(topo, str(src), ["ccn01", "ccn08"]).to_dict()
    assert res["ok"], res["failures"]
    assert res["phase_bytes"]["to_president"] == res["bytes"] > 0
    assert res["phase_bytes"]["to_mayors"] == 2 * res["bytes"]
    for n in ("ccn01", "ccn08"):
        assert_same_tree(src, tmp_path / "state" / "hosts" / n / "scratch" / "d")
    for h in ("pres", "mayor1", "mayor2"):
        assert os.listdir(tmp_path / "state" / "hosts" / h / "var/spool/chiba") == []


# --- safety (issue 14): confinement, descriptors, owners, locks, truthful failures ----------
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="owners, setuid and device nodes need root")


def _snapshot(state: Path) -> dict:
    """Every entry under the cluster's state: type, mode, owner, size, mtime, inode, ctime."""
    out = {}
    for d, dirs, files in os.walk(state):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                                       st.st_ino, st.st_ctime_ns)
    return out


@pytest.mark.parametrize("dest,msg", [
    ("../../etc", "'..' component"),
    ("/", "root directory"),
    (".", "is the host's scratch directory"),
    ("/tmp/abs", "outside the host's scratch"),
    ("", "empty --dest"),
])
def test_transit_dest_confined_exit_2_nothing_touched(demo, cli, tmp_path, dest, msg):
    topo, state = demo
    src = make_tree(tmp_path / "data")
    before = _snapshot(state)
    r = cli("stage", str(src), "--nodes", "@nodes", "--method", "transit", "--dest", dest)
    assert r.code == 2 and msg in r.err and "ccn01" in r.err, r.err
    assert _snapshot(state) == before


@pytest.mark.parametrize("path,msg", [("../../..", "'..' component"), ("/", "root directory"),
                                      (".", "scratch directory")])
def test_collect_transit_path_confined(demo, cli, tmp_path, path, msg):
    topo, state = demo
    before = _snapshot(state)
    r = cli("collect", path, "--nodes", "@nodes", "--method", "transit", "--dest",
            str(tmp_path / "back"))
    assert r.code == 2 and msg in r.err and "PATH" in r.err, r.err
    assert _snapshot(state) == before and not (tmp_path / "back").exists()


def test_transit_planted_symlink_in_scratch_not_followed(demo, cli, tmp_path):
    topo, state = demo
    src = make_tree(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, _h(state, "ccn03", "scratch", "jobdir"))  # a user's plant on ccn03
    r = cli("--json", "stage", str(src), "--nodes", "ccn0[2-3]", "--method", "transit",
            "--dest", "jobdir/x")
    res = r.json()
    assert r.code == 1 and set(res["failures"]) == {"ccn03"}
    assert "jobdir: is a symbolic link (not followed)" in res["failures"]["ccn03"]
    assert res["hosts"]["ccn03"]["tree"] == "none"
    assert os.listdir(victim) == []
    assert_same_tree(src, _h(state, "ccn02", "scratch", "jobdir", "x"))
    # collect does not follow it either (root would read /anywhere and send it home)
    (victim / "x").mkdir()
    (victim / "x" / "secret").write_text("root only")
    # (refused, exit 2, like a device node: tests/test_collect_symlink_root.py)
    r = cli("--json", "collect", "jobdir/x", "--nodes", "ccn03", "--method", "transit",
            "--dest", str(tmp_path / "back"))
    assert r.code == 2 and r.json()["refused"]
    assert "/scratch/jobdir: is a symbolic link" in r.json()["failures"]["ccn03"]
    assert not (tmp_path / "back").exists()


@needs_root
def test_transit_keeps_owners_setuid_fifo_mtimes_as_rsync(demo, cli, tmp_path):
    """As root: a user's setuid file stays the user's (never root's), FIFOs, modes, mtimes,
    absolute symlinks as rsync -a keeps them; then collect brings the same tree home."""
    topo, state = demo
    src = make_tree(tmp_path / "own")
    su = src / "user-suid"
    su.write_bytes(b"#!/bin/sh\n")
    os.chown(su, 4321, 4322)
    os.chmod(su, 0o4755)
    os.mkfifo(src / "fifo")
    (src / os.fsdecode(b"caf\xe9 non-utf8")).write_bytes(b"latin-1 name")
    os.link(src / "plain.txt", src / "sub dir" / "hard link")
    import socket

    sk = socket.socket(socket.AF_UNIX)
    sk.bind(str(src / "sub dir" / "sock"))  # GNU tar skips sockets; rsync -a keeps them
    sk.close()
    os.chown(src / "sub dir" / "sock", 4321, 4322)
    os.utime(src / "sub dir" / "sock", ns=(1, 1_400_000_000_000_000_001), follow_symlinks=False)
    os.symlink("/etc/passwd", src / "abs-link")
    (src / "g").mkdir(mode=0o2775)
    os.chmod(src / "g", 0o2775)
    os.chown(src / "g", 4321, 4322)
    # rsync sets them only when they differ
    for p in ("plain.txt", "fifo", "abs-link", "sub dir/link to text"):
        os.utime(src / p, ns=(1, 1_500_000_000_123_456_789), follow_symlinks=False)
    for i, (d, _, _) in enumerate(sorted(os.walk(src), reverse=True)):  # bottom-up
        # past mtimes: rsync -a leaves a time alone when it is within the current second
        os.utime(d, ns=(1, 1_200_000_000_000_000_000 + i))
    os.chown(src, 4321, 4322)  # the tree's top directory keeps its owner and mode too
    os.chmod(src, 0o2750)
    ref = tmp_path / "rsync-ref"
    subprocess.run(["rsync", "-a", f"{src}/", str(ref)], check=True)
    r = cli("stage", str(src), "--nodes", "ccn0[1,5]", "--method", "transit")
    assert r.code == 0, r.err
    r = cli("collect", "own", "--nodes", "ccn05", "--method", "transit", "--dest",
            str(tmp_path / "back"))
    assert r.code == 0, r.err
    for got in (_h(state, "ccn01", "scratch", "own"), _h(state, "ccn05", "scratch", "own"),
                tmp_path / "back" / "ccn05" / "own"):
        # the socket too, both ways: GNU tar skips it, the agents list and recreate it
        assert _meta(got) == _meta(ref)
        assert os.lstat(got / "plain.txt").st_ino == \
            os.lstat(got / "sub dir" / "hard link").st_ino  # one file, two names
        top, want = os.lstat(got), os.lstat(ref)
        assert (top.st_mode, top.st_uid, top.st_gid) == (want.st_mode, want.st_uid, want.st_gid)
        st = os.lstat(got / "user-suid")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 4322, 0o4755)


def _meta(root: Path) -> dict:
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            link = os.readlink(p) if os.path.islink(p) else None
            mtime = st.st_mtime_ns  # directories too: rsync -a and tar both keep them
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, link, mtime)
    return out


@needs_root
def test_transit_device_node_refused_before_anything_is_sent(demo, cli, tmp_path):
    topo, state = demo
    src = make_tree(tmp_path / "dev")
    os.mknod(src / "sub dir" / "null", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    before = _snapshot(state)
    r = cli("stage", str(src), "--nodes", "@nodes", "--method", "transit")
    assert r.code == 2 and "character device node" in r.err and "sub dir/null" in r.err
    assert _snapshot(state) == before


def test_transit_existing_destination_not_staged_refused_unless_replace(demo, cli, tmp_path):
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "data")
    mine = _h(state, "ccn06", "scratch", "data")
    mine.mkdir()
    (mine / "someone's results").write_text("precious")
    r = cli("--json", "stage", str(src), "--nodes", "ccn0[5-6]", "--method", "transit")
    res = r.json()
    assert r.code == 1 and set(res["failures"]) == {"ccn06"}
    assert "exists and was not made by chiba-admin" in res["failures"]["ccn06"]
    assert "--replace" in res["failures"]["ccn06"]
    assert res["hosts"]["ccn06"]["previous"] == "/scratch/data"
    assert os.listdir(mine) == ["someone's results"]
    assert_same_tree(src, _h(state, "ccn05", "scratch", "data"))
    # a destination an earlier stage made is replaced, not merged: the result is the source
    (src / "plain.txt").unlink()
    assert stage_transit(topo, str(src), ["ccn05"]).to_dict()["ok"]
    assert_same_tree(src, _h(state, "ccn05", "scratch", "data"))
    # --replace: the user says the existing one may go
    res = stage_transit(topo, str(src), ["ccn06"], replace=True).to_dict()
    assert res["ok"], res["failures"]
    assert_same_tree(src, mine)
    assert sorted(p.name for p in mine.parent.iterdir()) == [".data.chiba-staged", "data"]


def test_transit_failed_unpack_reported_truthfully(demo, cli, tmp_path):
    """An archive swapped on mayor2's spool after packing: its nodes refuse it before tar reads
    a byte (per-chunk hashes), keep their earlier tree; the report says who holds what."""
    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "data")
    assert stage_transit(topo, str(src), ["ccn05"]).to_dict()["ok"]  # an earlier, complete tree
    (src / "plain.txt").write_text("version 2")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "plain.txt").write_text("swapped")
    subprocess.run(["tar", "-c", "-f", str(tmp_path / "evil.tar"), "-C", str(evil), "."],
                   check=True)

    def swap(name):  # runs in the driver between to_mayors and unpack
        if name == "unpack":
            for t in _h(state, "mayor2", "var/spool/chiba").glob("transit-*.tar"):
                t.write_bytes((tmp_path / "evil.tar").read_bytes())

    res = stage_transit(topo, str(src), ["ccn01", "ccn05", "ccn06"], progress=OnPhase(swap)).to_dict()
    assert not res["ok"] and set(res["failures"]) == {"ccn05", "ccn06"}
    for n in ("ccn05", "ccn06"):
        assert "differs from what the home server packed" in res["failures"][n]
        assert res["hosts"][n]["tree"] == "none"
        assert not [p for p in _h(state, n, "scratch").iterdir() if "chiba-tmp" in p.name]
    assert "nothing of this run is left on it; /scratch/data is as it was" in \
        res["failures"]["ccn05"]
    assert (_h(state, "ccn05", "scratch", "data", "plain.txt").read_text()
            == "'plain.txt' 0\n")  # the earlier tree, untouched
    assert not _h(state, "ccn06", "scratch", "data").exists()
    assert res["hosts"]["ccn01"]["tree"] == "complete"
    assert res["hosts"]["ccn01"]["tree_path"] == "/scratch/data"
    assert_same_tree(src, _h(state, "ccn01", "scratch", "data"))
    assert res["outcome"] == ("complete tree on ccn01 (1); no tree from this run on "
                              "ccn[05-06] (2)")
    # the CLI prints the same truth (no "nothing was committed on any node")
    _h(state, "ccn02", "scratch", "data").write_text("in the way")
    r = cli("stage", str(src), "--nodes", "ccn0[1-2]", "--method", "transit")
    assert r.code == 1 and "nothing was committed" not in r.err
    assert "complete tree on ccn01 (1); no tree from this run on ccn02 (1)" in r.err


def test_transit_second_run_on_a_locked_destination_refused(demo, cli, tmp_path):
    """A run holding ccn02's destination lock (the one every method takes) refuses ours there."""
    from inventory.beneath import lock_dest, open_root, unlock_dest

    topo, state = demo
    src = make_tree(tmp_path / "data")
    parent = open_root(str(_h(state, "ccn02", "scratch")))
    held = lock_dest(parent, "data")
    try:
        r = cli("--json", "stage", str(src), "--nodes", "ccn0[1-2]", "--method", "transit")
    finally:
        unlock_dest(parent, "data", held)
        os.close(parent)
    res = r.json()
    assert r.code == 1 and set(res["failures"]) == {"ccn02"}
    assert "another chiba-admin run is writing this destination" in res["failures"]["ccn02"]
    assert "/scratch/data" in res["failures"]["ccn02"]
    assert not _h(state, "ccn02", "scratch", "data").exists()
    assert_same_tree(src, _h(state, "ccn01", "scratch", "data"))


def _crafted(path: Path, members: list) -> Path:
    """A tar of (name, kind, extra) members as a compromised node would send."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, extra in members:
            m = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = extra.encode()
                m.size = len(data)
            elif kind == "dir":
                m.type, m.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                m.type, m.linkname = tarfile.SYMTYPE, extra
            elif kind == "hard":
                m.type, m.linkname = tarfile.LNKTYPE, extra
            elif kind == "chr":
                m.type, m.devmajor, m.devminor = tarfile.CHRTYPE, 1, 3
            t.addfile(m, io.BytesIO(data) if data is not None else None)
    return path


def _chain(depth: int = 16) -> list:
    """The CVE-2025-4517 shape: nested symlinked directories, then a file through them."""
    out, d = [], "r"
    out.append(("r", "dir", None))
    for i in range(depth):
        out += [(f"{d}/{'a' * 200}", "dir", None), (f"{d}/l{i}", "sym", "a" * 200)]
        d = f"{d}/l{i}"
    out += [("r/esc", "sym", "/".join(f"l{i}" for i in range(depth)) + "/" + "../" * 40),
            ("r/esc/pwned", "file", "x")]
    return out


HOSTILE = {
    "dotdot": [("r", "dir", None), ("r/../../../../pwned", "file", "x")],
    "absolute": [("r", "dir", None), ("/tmp/pwned", "file", "x")],
    "symlink-then-file": [("r", "dir", None), ("r/l", "sym", "/tmp/victim"),
                          ("r/l/pwned", "file", "x")],
    "device": [("r", "dir", None), ("r/null", "chr", None)],
    "hardlink-out": [("r", "dir", None), ("r/h", "hard", "/etc/passwd")],
    "symlink-chain": _chain(),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_collect_hostile_archive_from_a_node(demo, cli, tmp_path, monkeypatch, kind):
    """ccn02 is compromised: its `tar -c` sends a crafted archive. The home server writes
    nothing outside DIR/ccn02/r, creates no device, and commits nothing of it."""
    topo, state = demo
    assert cli("stage", str(make_tree(tmp_path / "r")), "--nodes", "ccn0[1-2]", "--method",
               "transit").code == 0
    crafted = _crafted(tmp_path / "crafted.tar", HOSTILE[kind])
    monkeypatch.setenv("PATH", node_tar(tmp_path / "bin", "ccn02", f"exec cat {crafted}"))
    victim = tmp_path / "victim"
    victim.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    before = _snapshot(tmp_path / "state")
    r = cli("--json", "collect", "r", "--nodes", "ccn0[1-2]", "--method", "transit", "--dest",
            str(home / "back"))
    res = r.json()
    assert r.code == 1 and set(res["failures"]) == {"ccn02"}, res["failures"]
    assert res["hosts"]["ccn02"]["tree"] == "none"
    assert "home:" in res["failures"]["ccn02"]
    assert sorted(os.listdir(home / "back")) == ["ccn01"]  # nothing of ccn02, not even temp
    assert_same_tree(tmp_path / "r", home / "back" / "ccn01" / "r")
    assert os.listdir(victim) == [] and not Path("/tmp/pwned").exists()
    assert not list(tmp_path.rglob("pwned")) and not list(tmp_path.rglob("null"))
    assert _snapshot(tmp_path / "state") == before


def test_collect_existing_copy_not_collected_refused_unless_replace(demo, cli, tmp_path):
    from legacy_transit.transit import collect_transit

    topo, state = demo
    src = make_tree(tmp_path / "r")
    assert cli("stage", str(src), "--nodes", "ccn0[1-2]", "--method", "transit").code == 0
    mine = tmp_path / "back" / "ccn02" / "r"
    mine.mkdir(parents=True)
    (mine / "notes").write_text("mine")
    r = cli("--json", "collect", "r", "--nodes", "ccn0[1-2]", "--method", "transit", "--dest",
            str(tmp_path / "back"))
    assert r.code == 1 and set(r.json()["failures"]) == {"ccn02"}
    assert "was not made by chiba-admin" in r.json()["failures"]["ccn02"]
    assert os.listdir(mine) == ["notes"]
    # collecting again into what collect made replaces it; --replace replaces the other one
    assert collect_transit(topo, "r", ["ccn01"], str(tmp_path / "back")).to_dict()["ok"]
    assert collect_transit(topo, "r", ["ccn02"], str(tmp_path / "back"), replace=True).to_dict()["ok"]
    for n in ("ccn01", "ccn02"):
        assert_same_tree(src, tmp_path / "back" / n / "r")


def _pids_of(needle: bytes) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_transit_node_killed_mid_unpack_partial_reported_then_swept(demo, tmp_path):
    """ccn01's unpacker dies (SIGKILL) after feeding tar one chunk: the node never reports,
    the driver asks it and says where the partial tree is; the next run removes it."""
    import signal
    import threading

    from legacy_transit.transit import stage_transit

    topo, state = demo
    src = make_tree(tmp_path / "data")
    for i in range(3):
        (src / f"big{i}.bin").write_bytes(os.urandom(700_000))
    node_root = str(_h(state, "ccn01", "scratch")).encode()
    fed = threading.Event()

    def feeder(fifo: Path, data: bytes):
        with open(fifo, "wb") as w:  # blocks until ccn01's unpacker opens it (a barrier)
            # more than one 1 MiB chunk plus a pipe's worth: once this returns, the unpacker
            # has verified chunk 1, handed it to tar and is reading chunk 2
            w.write(data[:(1 << 20) + (1 << 17)])
            for pid in _pids_of(node_root):
                if b"extract" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            fed.set()

    def swap(name):  # mayor1's tar becomes a FIFO that the test feeds
        if name == "unpack":
            tar = next(_h(state, "mayor1", "var/spool/chiba").glob("transit-*.tar"))
            data = tar.read_bytes()
            tar.unlink()
            os.mkfifo(tar)
            threading.Thread(target=feeder, args=(tar, data), daemon=True).start()

    res = stage_transit(topo, str(src), ["ccn01", "ccn05"], progress=OnPhase(swap)).to_dict()
    assert fed.is_set()
    h = res["hosts"]["ccn01"]
    assert not res["ok"] and set(res["failures"]) == {"ccn01"}
    tmp = [p for p in _h(state, "ccn01", "scratch").iterdir() if ".chiba-tmp-" in p.name]
    assert len(tmp) == 1 and h["tree"] == "partial"
    assert h["tree_path"] == f"/scratch/{tmp[0].name}"
    assert f"a partial tree is left at /scratch/{tmp[0].name}" in res["failures"]["ccn01"]
    assert any(p.is_file() for p in tmp[0].rglob("*"))  # tar unpacked what it was given
    assert not _h(state, "ccn01", "scratch", "data").exists()
    assert res["outcome"] == ("complete tree on ccn05 (1); PARTIAL tree on ccn01 (1)")
    # the next run on that destination holds its lock: the dead run's leftovers go
    assert stage_transit(topo, str(src), ["ccn01"]).to_dict()["ok"]
    assert sorted(p.name for p in _h(state, "ccn01", "scratch").iterdir()) == \
        [".data.chiba-staged", "data"]
    assert_same_tree(src, _h(state, "ccn01", "scratch", "data"))


# --- collect: the sockets a node lists in its pack header are untrusted too ------------------
def _pack_stream(header: bytes, members: list, tmp_path: Path, commit: str) -> bytes:
    """What a (compromised) node's pack sends: a header line, a tar, then our commit token."""
    tar = _crafted(tmp_path / "members.tar", members).read_bytes()
    return header + tar + commit.encode()


def _sock(path: str, **kw) -> dict:
    return {"path": path, "mode": 0o640, "uid": os.getuid(), "gid": os.getgid(),
            "mtime_ns": 1_300_000_000_123_456_789, **kw}


def _header(sockets) -> bytes:
    import json

    from legacy_transit.transit_agent import PACK_HEADER

    return PACK_HEADER + json.dumps({"sockets": sockets}).encode() + b"\n"


BASE = [("r", "dir", None), ("r/d", "dir", None), ("r/f", "file", "data"),
        ("r/l", "sym", "VICTIM")]
HOSTILE_HEADERS = {
    "dotdot": _header([_sock("r/../../pwned")]),
    "absolute": _header([_sock("/tmp/pwned-sock")]),
    "another top": _header([_sock("x/pwned")]),
    "below a symlink": _header([_sock("r/l/pwned")]),
    "below a file": _header([_sock("r/f/pwned")]),
    "over a member": _header([_sock("r/f")]),
    "in no directory of the archive": _header([_sock("r/nodir/pwned")]),
    "listed twice": _header([_sock("r/d/pwned"), _sock("r/d/pwned")]),
    "file type bits in the mode": _header([_sock("r/d/pwned", mode=0o140644)]),
    "negative owner": _header([_sock("r/d/pwned", uid=-1)]),
    "mode as text": _header([_sock("r/d/pwned", mode="0644")]),
    "not a list": _header({"path": "r/d/pwned"}),
    "no header": b"",
    "no newline": _header([])[:-1],
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_HEADERS))
def test_collect_hostile_socket_list_refused_on_the_home_server(tmp_path, kind):
    """A compromised node's socket list cannot place a socket outside DIR/<host>/<name>,
    through a symlink, over a member, or with a mode or owner that is not one."""
    import io

    from legacy_transit.transit_agent import extract

    victim = tmp_path / "victim"
    victim.mkdir()
    members = [(n, k, str(victim) if e == "VICTIM" else e) for n, k, e in BASE]
    home = tmp_path / "home"
    home.mkdir()
    commit = "CHIBA-COMMIT-test"
    spec = {"root": str(home), "rel": "ccn02/r", "display": str(home / "ccn02" / "r"),
            "inner": "r", "top": "r", "job": "0123456789ab", "replace": False,
            "timeout": 60, "input": "-", "commit": commit}
    res = extract(spec, io.BytesIO(_pack_stream(HOSTILE_HEADERS[kind], members, tmp_path,
                                                commit)))
    assert not res["ok"] and res["tree"] == "none", res
    assert os.listdir(home / "ccn02") == []  # no tree, no temporary directory
    assert os.listdir(victim) == []
    assert not list(tmp_path.rglob("pwned*")) and not Path("/tmp/pwned-sock").exists()


def _home_spec(tmp_path: Path) -> tuple[Path, dict]:
    """The home server's directory and the agent's extract spec for ccn02's ``r``."""
    home = tmp_path / "home"
    home.mkdir()
    return home, {"root": str(home), "rel": "ccn02/r", "display": "x", "inner": "r",
                  "top": "r", "job": "0123456789ab", "replace": False, "timeout": 120,
                  "input": "-", "commit": "CHIBA-COMMIT-test"}


def test_collect_refused_deep_tree_is_removed_without_recursion(tmp_path):
    """A node sends 1,100 nested directories, then a device node: refused, and the
    temporary tree goes (shutil.rmtree recursed once per level: RecursionError, and the
    tree stayed on the home server)."""
    import io
    import subprocess

    from legacy_transit.transit_agent import extract

    home, spec = _home_spec(tmp_path)
    members = [("r" + "/d" * i, "dir", None) for i in range(1101)]
    members += [("r" + "/d" * 1100 + "/f", "file", "deep"), ("r/null", "chr", None)]
    try:
        res = extract(spec, io.BytesIO(_pack_stream(_header([]), members, tmp_path,
                                                    spec["commit"])))
        assert not res["ok"] and res["tree"] == "none", res
        assert os.listdir(home / "ccn02") == []
    finally:  # never leave pytest's own (recursive) cleanup a tree this deep
        subprocess.run(["rm", "-rf", "--", str(home)], check=True)


def test_collect_refusal_names_a_long_member_in_a_short_line(tmp_path):
    """A node's member with a 5,000-character name, refused: the error line shows the
    name's two ends, not all of it."""
    import io

    from legacy_transit.transit_agent import extract

    home, spec = _home_spec(tmp_path)
    long = "r/x/" + "n" * 5000
    res = extract(spec, io.BytesIO(_pack_stream(_header([]), [("r", "dir", None),
                                                             (long, "file", "x")],
                                                 tmp_path, spec["commit"])))
    assert not res["ok"] and "lies below no directory" in res["error"], res
    assert len(res["error"]) < 400 and "..." in res["error"]


def test_collect_listed_sockets_recreated_by_descriptor(tmp_path):
    """The sockets a node lists are made in the collected tree, with mode and mtime (and
    owner as root), the parent's mtime kept as tar restored it."""
    import io
    import stat

    from legacy_transit.transit_agent import extract

    home, spec = _home_spec(tmp_path)
    commit = spec["commit"]
    header = _header([_sock("r/d/a sock", uid=4321 if os.geteuid() == 0 else os.getuid()),
                      _sock("r/top sock", mode=0o600)])
    members = [("r", "dir", None), ("r/d", "dir", None), ("r/f", "file", "data")]
    res = extract(spec, io.BytesIO(_pack_stream(header, members, tmp_path, commit)))
    assert res["ok"], res
    got = home / "ccn02" / "r"
    for rel, mode in (("d/a sock", 0o640), ("top sock", 0o600)):
        st = os.lstat(got / rel)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        assert st.st_mtime_ns == 1_300_000_000_123_456_789
    if os.geteuid() == 0:
        assert os.lstat(got / "d" / "a sock").st_uid == 4321
    # _crafted's members have mtime 0: tar set it, the recreated sockets did not move it
    assert os.lstat(got / "d").st_mtime_ns == 0 and os.lstat(got).st_mtime_ns == 0


@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_collect_into_the_root_directory_is_refused(cli, embedded, method):
    """`collect --dest /` would make a top-level directory per host: one line, exit 2."""
    r = cli("collect", "x", "--nodes", "ccn01", "--dest", "/", "--method", method)
    assert r.code == 2 and "--dest is the root directory" in r.err
    assert len(r.err.strip().splitlines()) == 1 and not os.path.exists("/ccn01")
