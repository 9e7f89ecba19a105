"""Staging through real mpiexec on the embedded cluster: byte-identical trees, every failure."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading

import pytest

from mpitools.common.spool import SpoolServer
from mpitools.stage.driver import stage_archive
from support.archives import crafted_tar, symlink_chain_tar
from support.trees import (assert_same_tree, make_tree, special_tree, stage_leftovers,
                           tree_signature)

pytestmark = pytest.mark.mpi

NODES = [f"ccn0{i}" for i in range(1, 9)]
# fault injection (mpitools/common/faults.py): rank 0 takes 1 s per chunk
SLOW_RANK0 = json.dumps({"point": "stage.chunk", "rank": 0, "do": "sleep", "seconds": 1.0})
HOST_KEYS = {"ok", "bytes", "seconds", "throughput_bps", "stage", "error"}
TOP_KEYS = {"method", "algorithm", "ok", "source", "dest", "nodes", "bytes", "payload_bytes",
            "files", "seconds", "phases", "phase_bytes", "hosts", "failures"}


def scratch(topo, host: str) -> str:
    h = topo.host(host)
    return h.local_path(h.scratch)


def scratch_listing(topo) -> dict[str, list[str]]:
    return {n: sorted(os.listdir(scratch(topo, n))) for n in NODES}


def rank_processes(topo) -> list[int]:
    """This test's rank programs still alive (none may outlive a command).

    Other people's runs on the same machine are told apart by the job spec, which names
    this test's state directory.
    """
    from mpitools.common.runtime import load_job

    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = open(f"/proc/{d}/cmdline", "rb").read().decode().split("\0")
            except (OSError, UnicodeDecodeError):
                continue
            if not any(a in ("mpitools.stage.ranks", "mpitools.collect.ranks") for a in argv):
                continue
            spec = next((a for a in argv if a.startswith("b64:")), None)
            try:
                job = json.dumps(load_job(spec)) if spec else ""
            except ValueError:
                job = ""
            if topo.state_dir in job:
                out.append(int(d))
    return out


def test_stage_chain_every_node_byte_identical(embedded, cli, tmp_path):
    src = make_tree(tmp_path / "proj")
    stale = os.path.join(scratch(embedded, "ccn02"), ".proj.chiba-stage-0123456789ab")
    os.makedirs(os.path.join(stale, "junk"))
    r = cli("stage", src, "--nodes", "@nodes", "--chunk", "64KiB", "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert TOP_KEYS <= set(j) and j["method"] == "mpi" and j["algorithm"] == "chain"
    assert j["ok"] and j["failures"] == {} and j["dest"] == "/scratch/proj"
    assert j["nodes"] == NODES and set(j["hosts"]) == set(NODES)
    for n in NODES:
        h = j["hosts"][n]
        assert HOST_KEYS <= set(h) and h["ok"] and h["bytes"] == j["bytes"]
        assert h["throughput_bps"] > 0
        assert_same_tree(src, os.path.join(scratch(embedded, n), "proj"))
    assert {"pack", "launch", "check", "prepare", "transfer", "commit", "total"} <= \
        set(j["phases"])
    assert j["payload_bytes"] > 300_000 and j["files"] > 10
    assert 0 < j["peak_rss"] < 200 * 2**20
    assert not os.path.exists(stale), "a dead job's temp dir is removed by the next run"
    assert stage_leftovers(embedded, NODES) == []
    spool = embedded.home_server.local_path(embedded.home_server.spool)
    assert os.listdir(spool) == [], "the spooled archive is used once and removed"


def test_stage_bcast_gzip_replaces_existing_destination_only_with_replace(embedded, cli,
                                                                         tmp_path):
    src = make_tree(tmp_path / "proj", big=50_000)
    town1 = NODES[:4]
    for n in town1:
        old = os.path.join(scratch(embedded, n), "jobs", "run 1")
        os.makedirs(old)
        open(os.path.join(old, "old.txt"), "w").write("old")
    args = ("stage", src, "--nodes", "@town1", "--dest", "/scratch/jobs/run 1",
            "--algorithm", "bcast", "--compress", "gzip")
    # another job's directory, not made by stage: refused on every node, nothing touched
    r = cli(*args)
    assert r.code == 2, r.err
    assert r.err.count("was not created by chiba-admin stage; pass --replace") == 4
    assert "nothing was touched" in r.err
    for n in town1:
        jobs = os.path.join(scratch(embedded, n), "jobs")
        assert os.listdir(jobs) == ["run 1"]
        assert os.listdir(os.path.join(jobs, "run 1")) == ["old.txt"]
    r = cli(*args, "--replace")
    assert r.code == 0, r.err
    assert "4/4 hosts ok" in r.out and "ccn04" in r.out and "bcast" in r.out
    for n in town1:
        dest = os.path.join(scratch(embedded, n), "jobs", "run 1")
        assert_same_tree(src, dest)
        assert sorted(os.listdir(os.path.dirname(dest))) == [".run 1.chiba-staged", "run 1"]
    assert all(os.listdir(scratch(embedded, n)) == [] for n in NODES[4:])
    r = cli(*args)  # staged by us now: replaced without --replace
    assert r.code == 0, r.err


def test_bad_input_is_refused_before_anything_runs(embedded, cli, tmp_path):
    before = scratch_listing(embedded)
    r = cli("stage", str(tmp_path / "missing"), "--nodes", "@nodes")
    assert r.code == 2 and "source does not exist" in r.err
    assert cli("stage", str(tmp_path), "--nodes", "").code == 2
    r = cli("stage", str(tmp_path), "--nodes", "ccn[07-12]")
    assert r.code == 2 and "unknown host" in r.err
    assert cli("stage", str(tmp_path), "--nodes", "@nowhere").code == 2
    r = cli("stage", str(tmp_path), "--nodes", "ccn01", "--chunk", "lots")
    assert r.code == 2 and "--chunk" in r.err
    assert cli("collect", "x", "--nodes", "", "--dest", str(tmp_path)).code == 2
    assert scratch_listing(embedded) == before


@pytest.mark.parametrize("case", ["unreachable", "missing"])
def test_spool_problem_is_reported_before_any_node_is_touched(embedded, cli, tmp_path, case):
    src = make_tree(tmp_path / "proj", big=1000)
    before = scratch_listing(embedded)
    if case == "unreachable":
        r = cli("stage", src, "--nodes", "@nodes", "--spool-url", "http://127.0.0.1:1",
                "--json")
        want = "spool unreachable"
    else:
        (tmp_path / "empty").mkdir()
        with SpoolServer(str(tmp_path / "empty")) as srv:
            r = cli("stage", src, "--nodes", "@nodes", "--json",
                    "--spool-url", srv.url_for("").rstrip("/"))
        want = "HTTP 404"
    assert r.code == 1
    j = r.json()
    assert not j["ok"] and list(j["failures"]) == ["ccn01"]
    assert want in j["failures"]["ccn01"]
    assert scratch_listing(embedded) == before


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "hardlink-out", "device"])
def test_hostile_archive_is_refused_on_every_node(embedded, tmp_path, kind):
    tar = tmp_path / "evil.tar"
    tar.write_bytes(crafted_tar(kind))
    nodes = ["ccn01", "ccn06"]
    r = stage_archive(embedded, str(tar), nodes, "evil", compress="none", chunk=4096).to_dict()
    assert not r["ok"]
    assert set(r["failures"]) == set(nodes)
    assert all("refused" in why for why in r["failures"].values()), r["failures"]
    for n in nodes:
        assert os.listdir(scratch(embedded, n)) == []
    assert not os.path.exists("/etc/chiba-evil")
    assert not os.path.lexists(os.path.join(embedded.state_dir, "hosts", "evil"))


def test_unwritable_destination_on_one_node_refuses_all(embedded, cli, tmp_path):
    src = make_tree(tmp_path / "proj", big=1000)
    open(os.path.join(scratch(embedded, "ccn03"), "out"), "w").close()  # parent is a file
    r = cli("stage", src, "--nodes", "@nodes", "--dest", "out/data", "--json")
    assert r.code == 2
    j = r.json()
    assert list(j["failures"]) == ["ccn03"] and "not a directory" in j["failures"]["ccn03"]
    assert all(not h["ok"] for h in j["hosts"].values())
    listing = scratch_listing(embedded)
    assert listing.pop("ccn03") == ["out"]
    assert all(v == [] for v in listing.values()), listing


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_full_destination_on_one_node_aborts_all(embedded, cli, tmp_path):
    src = make_tree(tmp_path / "proj", big=600_000)
    full = os.path.join(scratch(embedded, "ccn06"), "full")
    os.mkdir(full)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", full], check=True)
    try:
        r = cli("stage", src, "--nodes", "@nodes", "--dest", "full/data", "--json",
                "--chunk", "64KiB")
        assert r.code == 1
        j = r.json()
        assert list(j["failures"]) == ["ccn06"], j["failures"]
        assert "No space left" in j["failures"]["ccn06"]
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", full], check=True)
    listing = scratch_listing(embedded)
    assert listing.pop("ccn06") == ["full"]
    assert all(v == [] for v in listing.values()), listing


def test_node_dying_mid_transfer_is_named_and_nothing_is_left(embedded, cli, tmp_path,
                                                             monkeypatch):
    src = make_tree(tmp_path / "proj", big=2_000_000)
    # rank 3 (ccn04) exits at its 3rd chunk
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps({"point": "stage.chunk", "rank": 3,
                                                   "do": "exit", "after": 2}))
    r = cli("stage", src, "--nodes", "@nodes", "--chunk", "64KiB", "--json",
            "--timeout", "60")
    assert r.code == 1
    j = r.json()
    assert list(j["failures"]) == ["ccn04"], j["failures"]
    assert "status 9" in j["failures"]["ccn04"]
    assert all(v == [] for v in scratch_listing(embedded).values())
    assert rank_processes(embedded) == []


def test_timeout_stops_mpiexec_and_cleans_up(embedded, cli, tmp_path, monkeypatch):
    src = make_tree(tmp_path / "proj", big=1_000_000)
    monkeypatch.setenv("CHIBA_FAULTS", SLOW_RANK0)  # rank 0 takes 1 s per chunk
    r = cli("stage", src, "--nodes", "@town2", "--chunk", "64KiB", "--json",
            "--timeout", "6")
    assert r.code == 1
    j = r.json()
    assert set(j["failures"]) == set(NODES[4:])
    assert all("timed out" in why for why in j["failures"].values())
    assert all(v == [] for v in scratch_listing(embedded).values())
    assert rank_processes(embedded) == []


def test_ctrl_c_ends_mpiexec_and_removes_temp_dirs(embedded, cli, tmp_path, monkeypatch):
    src = make_tree(tmp_path / "proj", big=1_000_000)
    monkeypatch.setenv("CHIBA_FAULTS", SLOW_RANK0)
    # pytest started in the background without job control (`make test &` in a script)
    # inherits SIGINT ignored: give this test a terminal's Ctrl-C
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(6.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        r = cli("stage", src, "--nodes", "@town1", "--chunk", "64KiB")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
    assert r.code == 130 and "interrupted" in r.err
    assert all(v == [] for v in scratch_listing(embedded).values())
    assert rank_processes(embedded) == []


def _results(topo, host: str) -> str:
    d = os.path.join(scratch(topo, host), "results")
    make_tree(d, big=20_000, seed=hash(host) % 1000)
    open(os.path.join(d, "host.txt"), "w").write(host)
    return d


def test_collect_brings_every_node_back(embedded, cli, tmp_path):
    trees = {n: _results(embedded, n) for n in NODES if n != "ccn07"}
    out = tmp_path / "out"
    r = cli("collect", "results", "--nodes", "@nodes", "--dest", str(out), "--json",
            "--chunk", "16KiB")
    assert r.code == 1
    j = r.json()
    assert list(j["failures"]) == ["ccn07"] and "does not exist" in j["failures"]["ccn07"]
    assert sorted(os.listdir(out)) == sorted(trees)
    for n, d in trees.items():
        assert j["hosts"][n]["ok"] and j["hosts"][n]["bytes"] > 0
        assert_same_tree(d, out / n / "results")
    # a second collection replaces each host's copy in place and succeeds
    os.remove(os.path.join(trees["ccn01"], "host.txt"))
    r = cli("collect", "/scratch/results", "--nodes", "@town1", "--dest", str(out))
    assert r.code == 0, r.err
    assert "4/4 hosts ok" in r.out
    assert_same_tree(trees["ccn01"], out / "ccn01" / "results")
    assert sorted(os.listdir(out / "ccn01")) == [".results.chiba-staged", "results"]
    assert rank_processes(embedded) == []


def test_transit_method_is_dispatched(embedded, cli, tmp_path, monkeypatch):
    import legacy_transit.transit as transit
    from chiba_admin.outcome import TransferHost, TransferRun

    seen = {}

    def fake_stage(topo, src, nodes, dest=None, **kw):
        seen["stage"] = (src, nodes, dest)
        return TransferRun(method="transit", algorithm=None, ok=True, source=src,
                           dest="/scratch/x", nodes=nodes, bytes=1, payload_bytes=1, files=1,
                           seconds=0.1, phases={"pack": 0.1}, phase_bytes={},
                           hosts={n: TransferHost(ok=True, bytes=1, seconds=0.1,
                                                  throughput_bps=80, stage="done")
                                  for n in nodes})

    def fake_collect(topo, path, nodes, dest_dir, **kw):
        seen["collect"] = (path, nodes, dest_dir)
        out = fake_stage(topo, path, nodes)
        out.ok, out.failures = False, {"ccn02": "gone"}
        return out

    monkeypatch.setattr(transit, "stage_transit", fake_stage)
    monkeypatch.setattr(transit, "collect_transit", fake_collect)
    r = cli("stage", str(tmp_path), "--nodes", "ccn[01-02]", "--method", "transit",
            "--dest", "x", "--json")
    assert r.code == 0 and r.json()["method"] == "transit"
    assert seen["stage"] == (str(tmp_path), ["ccn01", "ccn02"], "x")
    r = cli("collect", "x", "--nodes", "ccn[01-02]", "--method", "transit",
            "--dest", str(tmp_path / "o"))
    assert r.code == 1 and "ccn02: gone" in r.err
    assert seen["collect"] == ("x", ["ccn01", "ccn02"], str(tmp_path / "o"))


# --- issue 14: safety of stage/collect --method mpi ---------------------------------------

def _host_dir(topo, host: str) -> str:
    """The embedded host's own directory (its scratch's parent: outside every destination)."""
    return os.path.dirname(scratch(topo, host))


def _pwned(topo) -> list[str]:
    """Files named 'pwned' anywhere in the cluster's state (hosts, spool, home)."""
    return [os.path.join(d, "pwned") for d, _, fs in os.walk(topo.state_dir) if "pwned" in fs]


def _publish_crafted(monkeypatch, data: bytes) -> None:
    """Make the CLI's packing step publish ``data`` (with consistent digests) as the archive."""
    import mpitools.stage.driver as staging
    from mpitools.common.archive import PackInfo, block_sums, new_hasher
    from mpitools.common.spool import Published, spool_name

    def publish(src, spool, compress="zstd", **kw):
        name = spool_name(compress)
        path = os.path.join(spool, name)
        with open(path, "wb") as f:
            f.write(data)
        h = new_hasher("blake3")
        h.update(data)
        return Published(path, name, PackInfo(len(data), h.hexdigest(), "blake3", 0, 0,
                                              compress, block_sums(data)))

    monkeypatch.setattr(staging, "publish", publish)


def test_symlink_chain_archive_is_refused_on_every_node(embedded, cli, tmp_path, monkeypatch):
    """CVE-2025-4517: consistent digests, so only the extractor stands in the way."""
    dest = os.path.join(scratch(embedded, "ccn01"), "evil")
    data = symlink_chain_tar(dest, os.path.join(_host_dir(embedded, "ccn01"), "pwned"))
    _publish_crafted(monkeypatch, data)
    (tmp_path / "src").mkdir()
    r = cli("stage", str(tmp_path / "src"), "--nodes", "@nodes", "--dest", "evil",
            "--compress", "none", "--chunk", "16KiB", "--json")
    assert r.code == 1
    j = r.json()
    assert set(j["failures"]) == set(NODES)
    assert all("extract refused" in why for why in j["failures"].values()), j["failures"]
    assert _pwned(embedded) == []
    assert all(v == [] for v in scratch_listing(embedded).values())


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "hardlink-out", "device"])
def test_hostile_archive_is_refused_on_every_node_through_the_cli(embedded, cli, tmp_path,
                                                                 monkeypatch, kind):
    _publish_crafted(monkeypatch, crafted_tar(kind))
    (tmp_path / "src").mkdir()
    r = cli("stage", str(tmp_path / "src"), "--nodes", "ccn[01-02]", "--dest", "evil",
            "--compress", "none", "--algorithm", "bcast")
    assert r.code == 1
    assert "ccn01: extract refused" in r.err and "ccn02: extract refused" in r.err
    assert "nothing was committed on any node" in r.err
    assert all(v == [] for v in scratch_listing(embedded).values())


def test_swapped_spool_file_is_refused_before_anything_is_unpacked(embedded, cli, tmp_path,
                                                                  monkeypatch):
    import mpitools.stage.driver as staging

    real = staging.publish
    evil = symlink_chain_tar(os.path.join(scratch(embedded, "ccn01"), "proj"),
                             os.path.join(_host_dir(embedded, "ccn01"), "pwned"))

    def publish_then_swap(src, spool, compress="zstd", **kw):
        pub = real(src, spool, compress, **kw)
        assert pub.info.bytes > len(evil)
        with open(pub.path, "wb") as f:  # an attacker replaces the spool file, same size
            f.write(evil + bytes(pub.info.bytes - len(evil)))
        return pub

    monkeypatch.setattr(staging, "publish", publish_then_swap)
    src = make_tree(tmp_path / "proj", big=400_000)
    r = cli("stage", src, "--nodes", "@nodes", "--compress", "none", "--json")
    assert r.code == 1
    j = r.json()
    assert list(j["failures"]) == ["ccn01"], j["failures"]
    assert "differs from the packed one" in j["failures"]["ccn01"]
    assert all("not unpacked" in h["error"] for n, h in j["hosts"].items() if n != "ccn01")
    assert _pwned(embedded) == []
    assert all(v == [] for v in scratch_listing(embedded).values())


@pytest.mark.parametrize("dest, why", [
    ("../etc", "'..' component"), ("/", "root directory"), (".", "is the host's scratch"),
    ("/scratch/", "is the host's scratch"), ("/scratch", "is the host's scratch"),
    ("/etc/x", "outside the host's scratch"), ("", "empty --dest")])
def test_dest_outside_a_new_directory_of_scratch_is_refused(embedded, cli, tmp_path, dest,
                                                            why):
    src = make_tree(tmp_path / "proj", big=1000)
    for n in NODES:
        open(os.path.join(scratch(embedded, n), "other-job.txt"), "w").close()
    before = scratch_listing(embedded)
    r = cli("stage", src, "--nodes", "@nodes", "--dest", dest)
    assert r.code == 2 and why in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert scratch_listing(embedded) == before
    assert os.listdir(embedded.home_server.local_path(embedded.home_server.spool)) == []


def test_empty_source_and_device_nodes_are_refused(embedded, cli, tmp_path):
    before = scratch_listing(embedded)
    r = cli("stage", "", "--nodes", "@nodes")
    assert r.code == 2 and "no SRC given" in r.err
    if os.geteuid() == 0:
        src = make_tree(tmp_path / "proj", big=1000)
        os.mknod(os.path.join(src, "sub dir", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        r = cli("stage", src, "--nodes", "@nodes")
        assert r.code == 2 and "device node" in r.err and "sub dir/null" in r.err
        assert len(r.err.strip().splitlines()) == 1
    assert scratch_listing(embedded) == before


def test_planted_symlink_in_scratch_is_not_followed(embedded, cli, tmp_path):
    src = make_tree(tmp_path / "proj", big=1000)
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    os.symlink(str(anywhere), os.path.join(scratch(embedded, "ccn05"), "jobdir"))
    r = cli("stage", src, "--nodes", "@nodes", "--dest", "jobdir/x", "--json")
    assert r.code == 2
    j = r.json()
    assert list(j["failures"]) == ["ccn05"]
    assert "/scratch/jobdir: is a symbolic link (not followed)" in j["failures"]["ccn05"]
    assert os.listdir(anywhere) == []
    listing = scratch_listing(embedded)
    assert listing.pop("ccn05") == ["jobdir"]
    assert all(v == [] for v in listing.values())


def test_second_concurrent_stage_to_the_same_destination_is_refused(embedded, cli, tmp_path,
                                                                    monkeypatch):
    import sys
    from pathlib import Path

    src = make_tree(tmp_path / "proj", big=1000)
    other = make_tree(tmp_path / "other", big=2000, seed=7)
    hold = tmp_path / "hold"
    hold.mkdir()
    os.mkfifo(hold / "ready")
    os.mkfifo(hold / "go")
    exe = str(Path(sys.executable).with_name("chiba-admin"))
    first = subprocess.Popen([exe, "stage", src, "--nodes", "@town1", "--dest", "data"],
                             env={**os.environ, "CHIBA_FAULTS": json.dumps(
                                 {"point": "stage.locked", "rank": 0, "do": "barrier",
                                  "dir": str(hold)})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(hold / "ready") as f:  # the first run holds every node's lock now
            assert f.read() == "ready\n"
        r = cli("stage", other, "--nodes", "@town1", "--dest", "data", "--json")
        with open(hold / "go", "w") as f:
            f.write("go\n")
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert r.code == 1
    j = r.json()
    assert set(j["failures"]) == set(NODES[:4])
    assert all("another chiba-admin run is writing this destination" in why
               for why in j["failures"].values())
    assert first.returncode == 0, err
    for n in NODES[:4]:
        assert_same_tree(src, os.path.join(scratch(embedded, n), "data"))
    assert stage_leftovers(embedded, NODES) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="owners, sockets and setuid need root")
@pytest.mark.parametrize("algorithm", ["chain", "bcast"])
def test_modes_owners_links_and_specials_arrive_as_rsync_keeps_them(embedded, cli, tmp_path,
                                                                   algorithm):
    src = special_tree(tmp_path / "special")
    r = cli("stage", src, "--nodes", "ccn[01-03]", "--dest", "sp", "--algorithm", algorithm,
            "--chunk", "16KiB")
    assert r.code == 0, r.err
    want = tree_signature(src, meta=True)
    for n in ("ccn01", "ccn02", "ccn03"):
        assert tree_signature(os.path.join(scratch(embedded, n), "sp"), meta=True) == want
    # and back from two nodes: the home server's copy is the same tree again
    r = cli("collect", "sp", "--nodes", "ccn[01-02]", "--dest", str(tmp_path / "back"))
    assert r.code == 0, r.err
    for n in ("ccn01", "ccn02"):
        assert tree_signature(tmp_path / "back" / n / "sp", meta=True) == want


def test_collect_path_is_confined_and_home_side_is_not_replaced(embedded, cli, tmp_path):
    out = tmp_path / "out"
    for path, why in (("../../..", "'..' component"), ("", "empty PATH"),
                      ("/", "root directory"), (".", "is the host's scratch")):
        r = cli("collect", path, "--nodes", "@nodes", "--dest", str(out))
        assert r.code == 2 and why in r.err, r.err
        assert not out.exists()
    for n in NODES[:2]:
        _results(embedded, n)
    (tmp_path / "file").write_text("x")
    r = cli("collect", "results", "--nodes", "ccn[01-02]", "--dest", str(tmp_path / "file"))
    assert r.code == 2 and "not a directory" in r.err and len(r.err.splitlines()) == 1
    mine = out / "ccn02" / "results"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("mine")
    r = cli("collect", "results", "--nodes", "ccn[01-02]", "--dest", str(out))
    assert r.code == 2 and "was not created by chiba-admin collect" in r.err
    assert sorted(os.listdir(out)) == ["ccn02"] and os.listdir(mine) == ["keep.txt"]
    r = cli("collect", "results", "--nodes", "ccn[01-02]", "--dest", str(out), "--replace")
    assert r.code == 0, r.err
    assert_same_tree(os.path.join(scratch(embedded, "ccn02"), "results"), mine)
    # a symlink planted on the way on a node is not followed: root reads nothing through it
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "results").mkdir(parents=True)
    (elsewhere / "results" / "secret").write_text("not yours")
    os.symlink(str(elsewhere), os.path.join(scratch(embedded, "ccn03"), "jobdir"))
    # (refused, exit 2, like a device node: tests/test_collect_symlink_root.py)
    r = cli("collect", "jobdir/results", "--nodes", "ccn03", "--dest", str(tmp_path / "o2"),
            "--json")
    assert r.code == 2 and r.json()["refused"]
    assert "/scratch/jobdir: is a symbolic link" in r.json()["failures"]["ccn03"]
    assert not (tmp_path / "o2").exists()


def test_compromised_nodes_archive_is_refused_on_the_home_server(embedded, cli, tmp_path,
                                                                monkeypatch):
    for n in NODES[:3]:
        _results(embedded, n)
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tmp_path / "evil.tar"
    evil.write_bytes(symlink_chain_tar(str(out / "ccn02" / "x"), str(outside / "pwned")))
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps(  # rank 2 is ccn02
        {"point": "collect.archive", "rank": 2, "do": "replace", "file": str(evil)}))
    r = cli("collect", "results", "--nodes", "ccn[01-03]", "--dest", str(out), "--json",
            "--compress", "none")
    assert r.code == 1
    j = r.json()
    assert list(j["failures"]) == ["ccn02"]
    assert "archive refused on the home server" in j["failures"]["ccn02"]
    assert os.listdir(outside) == []
    assert sorted(os.listdir(out)) == ["ccn01", "ccn03"], "no empty per-host dir is left"
    assert rank_processes(embedded) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a device node needs root (CAP_MKNOD)")
@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_collect_device_node_on_any_node_refuses_everything_in_one_line(embedded, cli,
                                                                        tmp_path, method):
    """Issue 14: a device node below one node's PATH, however deep: no node's copy is
    collected, nothing is made on the home server, one stderr line names each such host
    and device, exit 2. A symlink to a device is data (not followed), a missing PATH on
    another node does not hide the refusal."""
    trees = {n: _results(embedded, n) for n in NODES[:3]}  # ccn04 has no results
    private = os.path.join(trees["ccn02"], "private 0700", "deep")
    os.makedirs(private)
    os.chmod(os.path.dirname(private), 0o700)
    os.mknod(os.path.join(private, "null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(os.path.join(trees["ccn03"], "loop"), 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    os.symlink("/dev/null", os.path.join(trees["ccn01"], "tty"))
    out = tmp_path / "out"
    args = ("collect", "results", "--nodes", "ccn[01-04]", "--dest", str(out), "--method",
            method)
    r = cli(*args)
    assert r.code == 2, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("chiba-admin collect: ccn02: /scratch/results/private 0700/"
                               "deep/null: a character device node (device nodes are never "
                               "copied; remove it or exclude it)"), lines[0]
    assert "ccn03: /scratch/results/loop: a block device node" in lines[0]
    assert "ccn01" not in lines[0] and "ccn04" not in lines[0]
    assert not out.exists()
    r = cli(*args, "--json")
    j = r.json()
    assert r.code == 2 and j["refused"] and set(j["failures"]) == {"ccn02", "ccn03"}
    assert not j["hosts"]["ccn01"]["ok"] and j["hosts"]["ccn01"]["stage"] == "check"
    assert not out.exists()
    # without the devices: the symlink to a device comes home as the symlink it is
    os.remove(os.path.join(private, "null"))
    os.remove(os.path.join(trees["ccn03"], "loop"))
    r = cli(*args[:3], "ccn[01-03]", *args[4:])
    assert r.code == 0, r.err
    assert os.readlink(out / "ccn01" / "results" / "tty") == "/dev/null"
    assert rank_processes(embedded) == []


@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_collect_a_path_that_is_a_socket(embedded, cli, tmp_path, method):
    """rsync -a copies a lone socket as a socket; so does collect (GNU tar skips it)."""
    import socket

    sk = socket.socket(socket.AF_UNIX)
    sk.bind(os.path.join(scratch(embedded, "ccn01"), "agent.sock"))
    sk.close()
    r = cli("collect", "agent.sock", "--nodes", "ccn01", "--dest", str(tmp_path / "o"),
            "--method", method)
    assert r.code == 0, r.err
    assert stat.S_ISSOCK(os.lstat(tmp_path / "o" / "ccn01" / "agent.sock").st_mode)


def test_find_device_follows_nothing_and_names_the_path(tmp_path):
    """The node-side check of collect (inventory.source.find_device): a symlink to /dev is
    data; a device is named below the tree as shown; an unreadable path names itself."""
    from inventory.source import find_device, unreadable

    (tmp_path / "t" / "a" / "b").mkdir(parents=True)
    os.symlink("/dev", tmp_path / "t" / "a" / "dev link")
    os.symlink("/dev/null", tmp_path / "null link")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        assert find_device(fd, "t") is None
        assert find_device(fd, "null link") is None  # not even when PATH is the symlink
        assert sorted(os.listdir("/proc/self/fd")) == before  # one fd per level, all closed
        with pytest.raises(OSError) as e:
            find_device(fd, "missing")
        assert unreadable("/scratch/missing", e.value) == \
            "cannot read /scratch/missing: No such file or directory"
        assert unreadable("/scratch/t", OSError(13, "Permission denied", "a/b")) == \
            "cannot read /scratch/t/a/b: Permission denied"
        if os.geteuid() == 0:
            os.mknod(tmp_path / "t" / "a" / "b" / "caf\udce9", 0o600 | stat.S_IFBLK,
                     os.makedev(7, 0))
            dev = find_device(fd, "t")
            assert (dev.rel, dev.kind) == ("a/b/caf\udce9", "block")
            assert dev.line("/scratch/t").startswith(
                "/scratch/t/a/b/caf\\xe9: a block device node (")
    finally:
        os.close(fd)


@pytest.mark.parametrize("algorithm", ["chain", "bcast"])
def test_digest_table_spanning_several_frames_heads_the_stream(embedded, cli, tmp_path,
                                                               algorithm):
    # 9 MB incompressible in 4 KiB frames: the block-digest table (32 bytes per 64 KiB
    # block, 4.4 KB here) takes two frames ahead of the archive's
    src = make_tree(tmp_path / "proj", big=9_000_000)
    r = cli("stage", src, "--nodes", "@nodes", "--chunk", "4KiB", "--compress", "none",
            "--algorithm", algorithm, "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert j["bytes"] > 4096 // 32 * (64 << 10), "the table must need more than one frame"
    for n in NODES:
        assert j["hosts"][n]["bytes"] == j["bytes"]
        assert_same_tree(src, os.path.join(scratch(embedded, n), "proj"))


@pytest.mark.parametrize("algorithm", ["chain", "bcast"])
def test_forged_digest_table_is_refused_by_every_node(embedded, cli, tmp_path, monkeypatch,
                                                      algorithm):
    # rank 0 (ccn01) sends a table that is not the packed one (as a relaying rank that
    # rewrote the table to match data it rewrote would): each node checks the table against
    # the job's hash before it uses a byte of the archive
    forged = tmp_path / "forged.sums"
    forged.write_bytes(os.urandom(4096))
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps(
        {"point": "stage.table", "rank": 0, "do": "replace", "file": str(forged)}))
    src = make_tree(tmp_path / "proj", big=400_000)
    r = cli("stage", src, "--nodes", "@nodes", "--algorithm", algorithm, "--json")
    assert r.code == 1
    j = r.json()
    assert set(j["failures"]) == set(NODES), j["failures"]
    assert all("block digests arrived damaged" in j["hosts"][n]["error"] for n in NODES)
    assert all(j["hosts"][n]["bytes"] == 0 for n in NODES)
    assert all(v == [] for v in scratch_listing(embedded).values())
    assert rank_processes(embedded) == []


# a stage stopped with no result once the commit had begun (tests/test_outcome_schema.py's
# STAGE_MPI_NO_RESULT, plus what the nodes hold)
STAGE_MPI_STOPPED = {"method", "algorithm", "ok", "source", "dest", "nodes", "bytes",
                     "payload_bytes", "files", "seconds", "phases", "phase_bytes", "hosts",
                     "failures", "compress", "chunk", "segment", "kind", "launch", "error",
                     "mpiexec_stderr", "outcome"}


def _hold_at(point: str) -> str:
    # rank 1 (a node) sleeps there until the launcher's --timeout stops the job
    return json.dumps({"point": point, "rank": 1, "do": "sleep", "seconds": 120})


def test_a_job_stopped_after_the_commit_point_keeps_the_new_tree_and_says_so(
        embedded, cli, tmp_path, monkeypatch):
    """Stopped once every node has moved its tree in: every node finishes forward (two-phase
    commit) and keeps the new tree, and the command says so, not "nothing was committed"."""
    old, new = make_tree(tmp_path / "old"), make_tree(tmp_path / "new", big=70_000)
    assert cli("stage", old, "--nodes", "@town1", "--dest", "cp").code == 0
    monkeypatch.setenv("CHIBA_FAULTS", _hold_at("stage.committed"))
    r = cli("stage", new, "--nodes", "@town1", "--dest", "cp", "--replace", "--timeout", "10")
    assert r.code == 1
    assert "nothing was committed" not in r.err
    assert "every node had moved the new tree into place when the job was stopped" in r.err
    for n in NODES[:4]:
        assert_same_tree(new, os.path.join(scratch(embedded, n), "cp"))
    assert stage_leftovers(embedded, NODES) == []
    assert rank_processes(embedded) == []


def test_a_job_stopped_before_the_commit_point_rolls_back_and_says_nodes_may_differ(
        embedded, cli, tmp_path, monkeypatch):
    """Stopped while one node has not moved its tree in: the others roll back to what they
    held, and the command does not claim to know that nothing changed."""
    old, new = make_tree(tmp_path / "old"), make_tree(tmp_path / "new", big=70_000)
    assert cli("stage", old, "--nodes", "@town1", "--dest", "cp").code == 0
    monkeypatch.setenv("CHIBA_FAULTS", _hold_at("stage.commit"))
    r = cli("stage", new, "--nodes", "@town1", "--dest", "cp", "--replace", "--json",
            "--timeout", "10")
    assert r.code == 1
    j = r.json()
    assert j["outcome"].startswith("stopped during the commit: each node holds either")
    assert set(j) == STAGE_MPI_STOPPED
    for n in NODES[:4]:  # every rank got mpiexec's SIGTERM in time: all rolled back
        assert_same_tree(old, os.path.join(scratch(embedded, n), "cp"))
    assert stage_leftovers(embedded, NODES) == []
    assert rank_processes(embedded) == []



def test_a_job_that_overran_its_timeout_while_exiting_says_every_node_committed():
    """The result came (every node committed), then mpiexec outlived --timeout: a failure
    of the time budget, reported as such, never as "nothing was committed"."""
    from chiba_admin.outcome import TransferRun
    from mpitools.common.launch import LaunchResult
    from mpitools.stage.driver import _stage_hosts

    reports = [{"host": h, "ok": True, "bytes": 10, "seconds": 1.0, "stage": "done",
                "error": None, "maxrss": 1} for h in NODES[:2]]
    res = LaunchResult(argv=[], hosts=tuple(NODES[:2]), returncode=-15, timed_out=True,
                       result={"event": "result", "ok": True, "reports": reports,
                               "phases": {}}, started=1.0, seconds=3.0, result_at=2.0)
    out = TransferRun(method="mpi", nodes=list(NODES[:2]), phases={})
    _stage_hosts(out, res, None, {}, 1.5)
    assert not out.ok and out.hosts_ok == 2
    assert out.outcome == ("every node committed the new tree; then the job overran "
                           "--timeout while exiting")
    assert out.error
