"""mpisync through real mpiexec on the embedded cluster: trees, deletes, excludes, failures."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from inventory import scan

pytestmark = pytest.mark.mpi

ODD = ["plain.txt", "with space", "quote'\"s", "$(touch pwned)", "new\nline", "ünï"]


def make_repo(root, nfiles=60, seed=1):
    """A small repository: nested dirs, odd names, a big file, symlinks, modes, mtimes."""
    rnd = random.Random(seed)
    os.makedirs(root)
    for d in ("bin", "lib/python", "share/doc x"):
        os.makedirs(os.path.join(root, d))
    for i in range(nfiles):
        d = rnd.choice(["", "bin", "lib/python", "share/doc x"])
        with open(os.path.join(root, d, f"f{i:03d}"), "wb") as f:
            f.write(rnd.randbytes(rnd.choice([0, 10, 3000, 70000])))
    for name in ODD:
        with open(os.path.join(root, name), "w") as f:
            f.write(name)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(rnd.randbytes(9 << 20 | 123))
    os.chmod(os.path.join(root, "bin", "f000") if os.path.exists(
        os.path.join(root, "bin", "f000")) else os.path.join(root, "plain.txt"), 0o755)
    os.symlink("lib/python", os.path.join(root, "pylink"))
    os.symlink("../../outside", os.path.join(root, "lib", "dangling"))
    os.utime(os.path.join(root, "plain.txt"), ns=(1_000_000_000, 1_000_000_000))
    return root


def same(a, b, excludes=()):
    ia = scan(a, excludes=excludes, checksum=True)
    ib = scan(b, excludes=excludes, checksum=True)
    return ia.same_tree(ib, content=True)


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
    monkeypatch.setenv("CHIBA_TEST_SYNC_DIE", "2:3")  # rank 2 (mayor2) dies after 3 files
    r = cli("--json", "sync-mayors", src, "--timeout", "60")
    assert r.code == 1
    res = r.json()
    assert "mayor2" in res["failures"]
    d2 = repo_of(embedded, "mayor2")
    for p, before in old.items():
        now = open(os.path.join(d2, p), "rb").read()
        assert now in (before, open(os.path.join(src, p), "rb").read()), p  # old or new
    monkeypatch.delenv("CHIBA_TEST_SYNC_DIE")
    r = cli("sync-mayors", src)
    assert r.code == 0, r.err
    assert same(src, d2) and same(src, repo_of(embedded, "mayor1"))


def test_launch_that_never_starts_is_stopped(embedded, tmp_path, monkeypatch):
    """A hung launch (no rank ever reports) ends after start_timeout, with a reason."""
    import time

    from mpitools.launcher import launch

    (tmp_path / "hang_probe.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    t0 = time.time()
    res = launch(embedded, "hang_probe", [], ["ccn01", "ccn02"], start_timeout=3, grace=2)
    assert res.start_timed_out and not res.ok
    assert time.time() - t0 < 30
    assert "did not start in time" in res.describe()
