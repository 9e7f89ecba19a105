"""mpisync through real mpiexec on the embedded cluster: trees, deletes, excludes, failures."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from inventory import scan
from support.ssh import write_topology
from support.trees import make_repo
from support.trees import same_inventory as same

pytestmark = pytest.mark.mpi


def repo_of(topo, host, dest=None):
    h = topo.host(host)
    return h.local_path(h.resolve("repository", dest))


def test_full_then_incremental_then_noop(embedded, cli, tmp_path):
    src = make_repo(str(tmp_path / "src"))
    r = cli("--json", "sync-mayors", src, "--targets", "@mayors,ccn01")
    assert r.code == 0, r.err
    res = r.json()
    assert res["ok"] and res["method"] == "mpi" and res["groups"] == 1
    for h in ("mayor1", "mayor2", "ccn01"):
        assert same(src, repo_of(embedded, h)), h
        assert res["hosts"][h]["files_transferred"] == res["source_files"]
    # one read at the source: the president sent the payload once, not once per target
    assert res["bytes_sent"] < 1.01 * res["source_bytes"] + 65536

    # change 5% of the files on the source, and one target's copy differently
    files = sorted(p for p in os.listdir(src) if p.startswith("f"))
    for p in files[: max(1, len(files) // 20)]:
        with open(os.path.join(src, p), "ab") as f:
            f.write(b"more")
    with open(os.path.join(repo_of(embedded, "mayor2"), "lib", "python", "extra"), "w") as f:
        f.write("extraneous")
    os.remove(os.path.join(repo_of(embedded, "ccn01"), "with space"))
    r = cli("--json", "sync-mayors", src, "--targets", "@mayors,ccn01", "--delete")
    assert r.code == 0, r.err
    res = r.json()
    assert res["groups"] == 2  # the changed files go to all; "with space" only to ccn01
    assert res["hosts"]["mayor2"]["deleted"] == 1
    assert res["hosts"]["ccn01"]["files_transferred"] == res["hosts"]["mayor1"][
        "files_transferred"] + 1
    for h in ("mayor1", "mayor2", "ccn01"):
        assert same(src, repo_of(embedded, h)), h

    r = cli("--json", "sync-mayors", src, "--targets", "@mayors,ccn01", "--delete")
    res = r.json()
    assert r.code == 0 and res["groups"] == 0 and res["bytes_sent"] == 0
    assert all(h["files_transferred"] == 0 for h in res["hosts"].values())


def test_dest_excludes_dry_run_checksum_verify(embedded, cli, tmp_path):
    src = make_repo(str(tmp_path / "src"), nfiles=20)
    os.makedirs(os.path.join(src, "build"))
    open(os.path.join(src, "build", "x.o"), "w").close()
    open(os.path.join(src, "main.o"), "w").close()

    r = cli("sync-mayors", src, "--dest", "soft", "--dry-run", "--exclude", "*.o",
            "--exclude", "build/")
    assert r.code == 0, r.err
    assert ">f+++++++++ big.bin" in r.out and "main.o" not in r.out
    assert "planned (dry run)" in r.out
    assert not os.path.exists(repo_of(embedded, "mayor1", "soft"))

    r = cli("--json", "sync-mayors", src, "--dest", "soft", "--exclude", "*.o",
            "--exclude", "build/", "--verify")
    assert r.code == 0, r.err
    dest = repo_of(embedded, "mayor1", "soft")
    assert same(src, dest, excludes=("*.o", "build/"))
    assert not os.path.exists(os.path.join(dest, "main.o"))
    assert not os.path.exists(os.path.join(dest, "build"))

    # same size and mtime but other content: only --checksum notices
    p = os.path.join(dest, "plain.txt")
    st = os.stat(p)
    with open(p, "r+") as f:
        f.write("X")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = cli("--json", "sync-mayors", src, "--dest", "soft", "--exclude", "*.o",
            "--exclude", "build/")
    assert r.json()["hosts"]["mayor1"]["files_transferred"] == 0
    r = cli("--json", "sync-mayors", src, "--dest", "soft", "--exclude", "*.o",
            "--exclude", "build/", "--checksum")
    assert r.json()["hosts"]["mayor1"]["files_transferred"] == 1
    assert r.json()["hosts"]["mayor2"]["files_transferred"] == 0
    assert same(src, dest, excludes=("*.o", "build/"))


def test_bad_input_changes_nothing(embedded, cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("sync-mayors", str(empty), "--delete")
    assert r.code == 2 and "source directory is empty" in r.err
    r = cli("sync-mayors", str(tmp_path / "missing"))
    assert r.code == 2 and "source does not exist" in r.err
    src = make_repo(str(tmp_path / "src"), nfiles=3)
    r = cli("sync-mayors", src, "--targets", "mayor[1-3]")
    assert r.code == 2 and "unknown host(s) mayor3" in r.err
    r = cli("sync-mayors", src, "--targets", "pres")
    assert r.code == 2 and "it holds the source" in r.err
    for h in ("mayor1", "mayor2"):
        assert os.listdir(repo_of(embedded, h)) == []


def test_failing_target_reported_others_complete(embedded, cli, tmp_path):
    src = make_repo(str(tmp_path / "src"), nfiles=10)
    bad = repo_of(embedded, "mayor1")
    shutil.rmtree(bad)
    with open(bad, "w") as f:  # the repository path is a file: that target cannot write
        f.write("in the way")
    r = cli("--json", "sync-mayors", src, "--targets", "@mayors,ccn05")
    assert r.code == 1
    res = r.json()
    assert not res["ok"] and set(res["failures"]) == {"mayor1"}
    assert bad in res["failures"]["mayor1"]
    assert same(src, repo_of(embedded, "mayor2"))
    assert same(src, repo_of(embedded, "ccn05"))
    r = cli("sync-mayors", src, "--targets", "@mayors")
    assert r.code == 1 and "chiba-admin sync-mayors: mayor1:" in r.err


def test_dead_target_aborts_named_and_rerun_converges(embedded, cli, tmp_path, monkeypatch):
    src = make_repo(str(tmp_path / "src"), nfiles=40)
    r = cli("sync-mayors", src)
    assert r.code == 0
    for p in sorted(os.listdir(src)):
        full = os.path.join(src, p)
        if os.path.isfile(full) and not os.path.islink(full):
            with open(full, "ab") as f:
                f.write(b"v2")
    old = {p: open(os.path.join(repo_of(embedded, "mayor2"), p), "rb").read()
           for p in os.listdir(src) if os.path.isfile(os.path.join(src, p))}
    # rank 2 (mayor2) dies after 3 files
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps({"point": "sync.file", "rank": 2,
                                                   "do": "exit", "after": 3}))
    r = cli("--json", "sync-mayors", src, "--timeout", "60")
    assert r.code == 1
    res = r.json()
    assert "mayor2" in res["failures"]
    d2 = repo_of(embedded, "mayor2")
    for p, before in old.items():
        now = open(os.path.join(d2, p), "rb").read()
        assert now in (before, open(os.path.join(src, p), "rb").read()), p  # old or new
    monkeypatch.delenv("CHIBA_FAULTS")
    r = cli("sync-mayors", src)
    assert r.code == 0, r.err
    assert same(src, d2) and same(src, repo_of(embedded, "mayor1"))


def test_launch_that_never_starts_is_stopped(embedded, tmp_path, monkeypatch):
    """A hung launch (no rank ever reports) ends after start_timeout, with a reason."""
    from mpitools.common.launch import launch

    (tmp_path / "hang_probe.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    res = launch(embedded, "hang_probe", [], ["ccn01", "ccn02"], start_timeout=3, grace=2)
    assert res.start_timed_out and not res.ok
    assert "did not start in time" in res.describe()


# --- issue 14: safety and truth, by both methods, through real mpiexec and real rsync ----------
METHODS = ["mpi", "rsync"]


def snapshot(root):
    """Every path under ``root`` with its inode, type, mode, size, mtime and ctime."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in [d] + [os.path.join(d, x) for x in dirs + files]:
            st = os.lstat(n)
            out[n] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def put(root, rel, data=b"x"):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    return p


@pytest.mark.parametrize("method", METHODS)
def test_dest_outside_the_repository_is_refused_before_anything_is_sent(embedded, cli, tmp_path,
                                                                          method):
    src = str(tmp_path / "src")
    put(src, "a")
    state = snapshot(embedded.host("mayor1").local_path("/"))
    for bad in ("/", "../x", "/etc", "a/../../b"):
        r = cli("sync-mayors", src, "--method", method, "--dest", bad, "--delete")
        assert r.code == 2 and "--dest" in r.err, (bad, r.err)
        assert len(r.err.strip().splitlines()) == 1
    assert snapshot(embedded.host("mayor1").local_path("/")) == state


@pytest.mark.parametrize("method", METHODS)
def test_a_symlink_planted_below_the_repository_is_not_followed(embedded, cli, tmp_path, method):
    src = str(tmp_path / "src")
    put(src, "payload")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, os.path.join(repo_of(embedded, "mayor1"), "jobdir"))
    r = cli("sync-mayors", src, "--method", method, "--dest", "jobdir/x")
    assert r.code == 1 and "mayor1" in r.err and "symbolic link" in r.err
    assert os.listdir(elsewhere) == []
    assert same(src, repo_of(embedded, "mayor2", "jobdir/x"))


@pytest.mark.parametrize("method", METHODS)
def test_a_second_run_on_the_same_destination_is_refused(embedded, cli, tmp_path, method):
    """A live run holds the one lock of the destination; another run, any method, is refused."""
    from inventory.beneath import lock_dest, open_root, unlock_dest

    src = str(tmp_path / "src")
    put(src, "a")
    parent = open_root(repo_of(embedded, "mayor1"))
    held = lock_dest(parent, "shared")  # as a run of the other method would hold it
    try:
        r = cli("sync-mayors", src, "--method", method, "--dest", "shared")
        assert r.code == 1 and "another chiba-admin run" in r.err and "mayor1" in r.err
        assert not os.path.exists(os.path.join(repo_of(embedded, "mayor1"), "shared", "a"))
        assert same(src, repo_of(embedded, "mayor2", "shared"))
    finally:
        unlock_dest(parent, "shared", held)
        os.close(parent)
    r = cli("sync-mayors", src, "--method", method, "--dest", "shared")
    assert r.code == 0, r.err
    assert not os.path.exists(os.path.join(repo_of(embedded, "mayor1"), ".shared.chiba-lock"))


def test_only_exact_temp_names_of_dead_runs_are_removed(embedded, cli, tmp_path):
    src = str(tmp_path / "src")
    put(src, "results.chiba-tmp-2024", b"user data")
    put(src, "f", b"f")
    dest = repo_of(embedded, "mayor1")
    mine = put(dest, "notes.chiba-tmp-x", b"the user's")
    hidden = put(dest, f"build/.o.chiba-tmp-{'a' * 32}", b"inside an excluded dir")
    stale = put(dest, f".f.chiba-tmp-{'0123456789abcdef' * 2}", b"a killed run's temp")
    for args in (["--dry-run"], [], []):
        r = cli("--json", "sync-mayors", src, "--exclude", "build/", *args)
        assert r.code == 0, r.err
        assert os.path.exists(mine) and os.path.exists(hidden)
        assert os.path.exists(stale) == (args == ["--dry-run"])  # a dry run removes nothing
    # the user's file named like a temp was sent once, and not again
    assert r.json()["hosts"]["mayor1"]["files_transferred"] == 0
    assert open(os.path.join(dest, "results.chiba-tmp-2024"), "rb").read() == b"user data"


def test_a_temp_shaped_file_beside_nothing_of_the_source_is_kept(embedded, cli, tmp_path):
    """Temp-shaped names are data the tool itself may have synced: without --delete, a
    `.x.chiba-tmp-<hex>` beside no source file `x` is a user's file, not a dead run's."""
    src = str(tmp_path / "src")
    put(src, "s/a", b"a")
    dest = repo_of(embedded, "mayor1")
    name = f".x.chiba-tmp-{'0123456789abcdef' * 2}"
    users = [put(dest, name, b"user"), put(dest, f"s/{name}", b"user"),
             put(dest, f"other/{name}", b"user")]
    r = cli("--json", "sync-mayors", src, "-i")
    assert r.code == 0, r.err
    assert all(os.path.exists(p) for p in users)
    assert r.json()["hosts"]["mayor1"]["temps_removed"] == 0


@pytest.mark.parametrize("method", METHODS)
def test_a_replaced_directory_keeps_excluded_files_and_is_reported(embedded, cli, tmp_path,
                                                                     method):
    src = str(tmp_path / "src")
    put(src, "x", b"now a file")
    for h in ("mayor1", "mayor2"):
        put(repo_of(embedded, h), "x/a", b"a")
        put(repo_of(embedded, h), "x/sub/keep.o", b"excluded")
    os.remove(os.path.join(repo_of(embedded, "mayor2"), "x", "sub", "keep.o"))
    before = snapshot(repo_of(embedded, "mayor1"))
    r = cli("sync-mayors", src, "--method", method, "--delete", "--exclude", "*.o", "--dry-run")
    assert r.code == 1 and "mayor1" in r.err  # the dry run foresees it, as rsync's (exit 23)
    assert "*deleting   x/a" in r.out and snapshot(repo_of(embedded, "mayor1")) == before
    r = cli("sync-mayors", src, "--method", method, "--delete", "--exclude", "*.o")
    assert r.code == 1
    assert "mayor1" in r.err and "mayor2" not in r.err and "not in sync" in r.err
    kept = os.path.join(repo_of(embedded, "mayor1"), "x", "sub", "keep.o")
    assert open(kept, "rb").read() == b"excluded"
    assert same(src, repo_of(embedded, "mayor2"))


@pytest.mark.parametrize("method", METHODS)
def test_without_delete_a_file_in_place_of_a_directory_is_not_in_sync(embedded, cli, tmp_path,
                                                                        method):
    src = str(tmp_path / "src")
    put(src, "x", b"file")
    os.symlink("x", os.path.join(src, "ln"))
    put(repo_of(embedded, "mayor1"), "x/old", b"old")
    os.makedirs(os.path.join(repo_of(embedded, "mayor1"), "ln", "d"))
    r = cli("sync-mayors", src, "--method", method)
    assert r.code == 1
    lines = [ln for ln in r.err.splitlines() if "mayor1" in ln]
    assert lines and all("not in sync" in ln for ln in lines) and "mayor2" not in r.err
    assert "1/2 targets in sync" in r.out


@pytest.mark.parametrize("method", METHODS)
def test_dry_run_writes_nothing_anywhere(embedded, cli, tmp_path, method):
    src = make_repo(str(tmp_path / "src"), nfiles=5)
    put(repo_of(embedded, "mayor1"), "old/dir/f", b"old")
    hosts_dir = embedded.host("mayor1").local_path("/")
    before = {h: snapshot(embedded.host(h).local_path("/")) for h in ("mayor1", "mayor2")}
    for dest in ("new/path", "old", None):
        args = ["--dest", dest] if dest else []
        r = cli("sync-mayors", src, "--method", method, "--dry-run", "--delete", *args)
        assert r.code == 0, r.err
    assert {h: snapshot(embedded.host(h).local_path("/")) for h in ("mayor1", "mayor2")} == before
    assert not os.path.exists(os.path.join(hosts_dir, "new"))


def test_dry_run_lists_exactly_what_the_real_run_does(embedded, cli, tmp_path):
    src = str(tmp_path / "src")
    put(src, "x", b"file now")
    put(src, "keep", b"k")
    dest = repo_of(embedded, "mayor1")
    put(dest, "x/a", b"a")
    put(dest, "x/sub/b", b"b")
    dry = cli("--json", "sync-mayors", src, "--targets", "mayor1", "--delete", "--dry-run").json()
    plan = dry["hosts"]["mayor1"]["plan"]
    assert "3 deletion(s)" in plan and "*deleting   x/sub/b" in plan
    real = cli("--json", "sync-mayors", src, "--targets", "mayor1", "--delete", "-i").json()
    assert real["ok"] and real["hosts"]["mayor1"]["plan"] == plan
    assert real["hosts"]["mayor1"]["deleted"] == 3
    assert same(src, dest)


@pytest.mark.parametrize("method", METHODS)
def test_empty_source_refused_only_with_delete(embedded, cli, tmp_path, method):
    empty = tmp_path / "empty"
    empty.mkdir()
    put(repo_of(embedded, "mayor1"), "kept", b"k")
    r = cli("sync-mayors", str(empty), "--method", method, "--delete")
    assert r.code == 2 and "empty" in r.err
    r = cli("sync-mayors", str(empty), "--method", method)
    assert r.code == 0, r.err
    assert os.path.exists(os.path.join(repo_of(embedded, "mayor1"), "kept"))


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are kept only as root")
def test_owners_setuid_fifos_sockets_as_rsync_a(embedded, cli, tmp_path):
    """mpisync makes the tree `rsync -a` makes as root: owners, setuid, FIFOs, sockets."""
    import socket
    import stat
    import subprocess

    src = str(tmp_path / "src")
    tool = put(src, "bin/tool", b"#!/bin/sh\n")
    os.chown(tool, 1000, 1000)
    os.chmod(tool, 0o4755)
    os.chown(os.path.join(src, "bin"), 1001, 1002)
    os.mkfifo(os.path.join(src, "pipe"), 0o640)
    os.chown(os.path.join(src, "pipe"), 1003, 1004)
    sk = socket.socket(socket.AF_UNIX)
    sk.bind(os.path.join(src, "sock"))
    # rsync leaves a directory's time alone when it matches the source's to the second:
    # give the source old times, so that rsync (the oracle) sets every one of them
    for top, _dirs, files in os.walk(src, topdown=False):
        for name in files + [""]:
            os.utime(os.path.join(top, name), ns=(1_600_000_000 * 10**9,) * 2,
                     follow_symlinks=False)
    try:
        put(repo_of(embedded, "mayor1"), "pipe", b"a file where the source has a FIFO")
        r = cli("--json", "sync-mayors", src, "--delete")
        assert r.code == 0, r.err
        oracle = str(tmp_path / "oracle")
        subprocess.run(["rsync", "-a", src + "/", oracle + "/"], check=True)
        for h in ("mayor1", "mayor2"):
            got = scan(repo_of(embedded, h))
            assert got.same_tree(scan(oracle), content=False, owners=True), h
            assert stat.S_ISFIFO(os.lstat(os.path.join(repo_of(embedded, h), "pipe")).st_mode)
            st = os.stat(os.path.join(repo_of(embedded, h), "bin", "tool"))
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o4755)
        # the FIFO is now part of the tree: a rerun changes nothing, --delete keeps it
        r = cli("--json", "sync-mayors", src, "--delete")
        assert r.json()["bytes_sent"] == 0 and r.json()["ok"]
    finally:
        sk.close()


@pytest.mark.parametrize("method", METHODS)
def test_device_node_refused_before_anything_is_sent(embedded, cli, tmp_path, method):
    import stat

    src = str(tmp_path / "src")
    put(src, "a")
    dev = os.path.join(src, "sub", "null")
    os.makedirs(os.path.dirname(dev))
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    r = cli("sync-mayors", src, "--method", method)
    assert r.code == 2 and dev in r.err and "device" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert os.listdir(repo_of(embedded, "mayor1")) == []


def test_rsync_over_ssh_walks_beneath_locks_and_dry_runs_nothing(cli, tmp_path, sshd):
    """The rsync guard runs on the target through a real sshd, as --rsync-path."""
    base = tmp_path / "hosts"
    path = write_topology(base, sshd)
    src = str(tmp_path / "src")
    put(src, "a", b"a")
    # a dry run to a new path creates nothing on any target
    r = cli("--cluster", path, "sync-mayors", "--method", "rsync", src, "--dest", "n/p",
            "--dry-run")
    assert r.code == 0, r.err
    assert not (base / "mayor1" / "repo" / "n").exists()
    # a planted symlink is refused on that target; a held lock refuses the other
    os.symlink(tmp_path, base / "mayor1" / "repo" / "j")
    from inventory.beneath import lock_dest, open_root, unlock_dest

    os.makedirs(base / "mayor2" / "repo" / "j")
    parent = open_root(str(base / "mayor2" / "repo" / "j"))
    held = lock_dest(parent, "x")
    try:
        r = cli("--cluster", path, "sync-mayors", "--method", "rsync", src, "--dest", "j/x")
    finally:
        unlock_dest(parent, "x", held)
        os.close(parent)
    assert r.code == 1
    assert "mayor1" in r.err and "symbolic link" in r.err
    assert "mayor2" in r.err and "another chiba-admin run" in r.err
    assert not (tmp_path / "x").exists() and not (base / "mayor2" / "repo" / "j" / "x").exists()
    r = cli("--cluster", path, "sync-mayors", "--method", "rsync", src, "--dest", "j/x",
            "--targets", "mayor2")
    assert r.code == 0, r.err
    assert same(src, str(base / "mayor2" / "repo" / "j" / "x"))


@pytest.mark.parametrize("method", METHODS)
def test_the_destination_root_gets_the_source_roots_mode_and_mtime(embedded, cli, tmp_path,
                                                                     method):
    src = str(tmp_path / "src")
    put(src, "a")
    os.chmod(src, 0o2750)
    os.utime(src, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    r = cli("sync-mayors", src, "--method", method, "--dest", "new/r")
    assert r.code == 0, r.err
    st = os.stat(repo_of(embedded, "mayor1", "new/r"))
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o2750, 1_500_000_000_000_000_000)


def test_a_source_the_president_cannot_scan_is_a_failure_there(embedded, cli, tmp_path,
                                                                  monkeypatch):
    """The president's own scan has the last word: a source that passed the CLI's check
    but cannot be walked when the president scans it (here it lies below a file, as after
    a rename between the two) is a failure on the president (exit 1, naming it), not bad
    input. Only the CLI's pre-check is bypassed; the ranks run under real mpiexec."""
    from mpitools.sync import driver

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = str(blocker / "src")
    monkeypatch.setattr(driver, "check_source_dir", lambda src, delete=False: bad)
    r = cli("sync-mayors", str(tmp_path), "--targets", "mayor1")
    assert r.code == 1, r.err
    assert "error: pres: " in r.err and bad in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert os.listdir(repo_of(embedded, "mayor1")) == []


def test_an_empty_source_with_delete_is_refused_by_the_president_too(embedded, cli, tmp_path,
                                                                      monkeypatch):
    """The rank-0 verdict for bad input: a source emptied after the CLI's check, with
    --delete, is refused as bad input (exit 2) and nothing is deleted anywhere."""
    from mpitools.sync import driver

    check = driver.check_source_dir
    monkeypatch.setattr(driver, "check_source_dir", lambda src, delete=False: check(src))
    empty = tmp_path / "empty"
    empty.mkdir()
    kept = put(repo_of(embedded, "mayor1"), "kept", b"k")
    r = cli("sync-mayors", str(empty), "--delete")
    assert r.code == 2, r.err
    assert "source tree is empty" in r.err  # the president's words, not the CLI's
    assert os.path.exists(kept)
