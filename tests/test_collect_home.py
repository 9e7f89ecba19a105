"""collect's home side, as a user or an attacker meets it (both methods, the real CLI).

A ``--dest DIR`` that is a symbolic link is refused before anything is sent (a user's
``/tmp/udir -> /tmp/victim`` must not make root write into the victim), and a ``DIR``
swapped for one after that check is not followed: the home side opens ``DIR`` once
(``O_NOFOLLOW``) and writes below that descriptor. ``DIR`` and ``DIR/<host>`` that collect
makes are ``0700``. A node's huge (sparse) file stops that host before the home file
system's space for users drops below the reserve (``--min-free``): one line naming the
host, the file system and the space left; nothing of it kept; the other hosts collected.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading

import pytest

from support.trees import assert_same_tree, make_tree

pytestmark = pytest.mark.mpi

METHODS = ["mpi", "transit"]


def scratch(topo, host: str) -> str:
    h = topo.host(host)
    return h.local_path(h.scratch)


def _everything(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("method", METHODS)
def test_a_dest_that_is_a_symlink_is_refused_and_nothing_is_written(embedded, cli, tmp_path,
                                                                   method):
    """``ln -s victim udir; collect job --dest udir`` (also ``udir/``): exit 2, one line
    naming DIR, nothing written in the victim (before: its copies went into
    victim/ccn01/job, exit 0)."""
    make_tree(os.path.join(scratch(embedded, "ccn01"), "job"), big=2000)
    victim = tmp_path / "victim"
    victim.mkdir()
    udir = tmp_path / "udir"
    udir.symlink_to(victim)
    for dest in (str(udir), f"{udir}/"):
        r = cli("collect", "job", "--nodes", "ccn01", "--dest", dest, "--method", method)
        assert r.code == 2, r.err
        assert r.err.splitlines() == [
            f"chiba-admin: error: {udir}: --dest is a symbolic link, which collect (writing "
            "as root) never follows (name the directory it points to instead; links among "
            "its parents are followed)"], r.err
        assert r.out == ""
        assert os.listdir(victim) == []


@pytest.mark.parametrize("method", METHODS)
def test_links_among_the_parents_of_dest_are_followed(embedded, cli, tmp_path, method):
    """``/home -> /data/home`` stays usable: only DIR's own last component is refused."""
    tree = make_tree(os.path.join(scratch(embedded, "ccn01"), "job"), big=2000)
    (tmp_path / "data").mkdir()
    (tmp_path / "home").symlink_to(tmp_path / "data")
    r = cli("collect", "job", "--nodes", "ccn01", "--dest", str(tmp_path / "home" / "back"),
            "--method", method)
    assert r.code == 0, r.err
    assert_same_tree(tree, tmp_path / "data" / "back" / "ccn01" / "job")


@pytest.mark.parametrize("method", METHODS)
def test_what_collect_makes_is_root_only_and_an_existing_dir_keeps_its_mode(
        embedded, cli, tmp_path, method):
    """DIR and DIR/<host> made by collect are 0700 (before: 0755, a node's setuid-root
    file in a tree every user can enter); an existing DIR is left as it was."""
    for n in ("ccn01", "ccn02"):
        make_tree(os.path.join(scratch(embedded, n), "job"), big=2000)
    out = tmp_path / "a" / "back"
    r = cli("collect", "job", "--nodes", "ccn01", "--dest", str(out), "--method", method)
    assert r.code == 0, r.err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(out / "ccn01").st_mode) == 0o700
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o751)
    r = cli("collect", "job", "--nodes", "ccn[01-02]", "--dest", str(mine), "--method",
            method)
    assert r.code == 0, r.err
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o751
    assert [stat.S_IMODE(os.stat(mine / n).st_mode) for n in ("ccn01", "ccn02")] == [0o700] * 2


def test_mpi_a_dest_swapped_for_a_link_after_the_check_is_not_followed(embedded, tmp_path):
    """Rank 0 is held (fault ``collect.open``, a FIFO handshake) after the CLI checked DIR;
    DIR is then replaced by a link to the victim. Rank 0 opens DIR with O_NOFOLLOW: the
    collect fails naming DIR, and nothing is written in the victim (before: rank 0's
    open_root followed the link)."""
    from support.cluster import cli_process, end_job, fault_gate, wait_ready

    make_tree(os.path.join(scratch(embedded, "ccn01"), "job"), big=2000)
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "back"
    gate, fault = fault_gate(tmp_path, "collect.open")
    p = cli_process(embedded, "collect", "job", "--nodes", "ccn01", "--dest", str(out),
                    env={"CHIBA_FAULTS": json.dumps(fault)})
    try:
        wait_ready(gate / "ready", p)
        out.symlink_to(victim)  # DIR did not exist at the check: now it is a link
        with open(gate / "go", "w") as f:
            f.write("go\n")
        _, err = p.communicate(timeout=120)
    finally:
        end_job(p, embedded)
    assert p.returncode == 1, err
    assert f"{out}: is a symbolic link (collect never follows one to write)" in err.decode()
    assert os.listdir(victim) == []
    assert out.is_symlink()


def test_transit_unpacker_writes_below_the_descriptor_it_was_given(tmp_path):
    """Transit's CLI opens DIR once and passes the descriptor to each host's unpacker
    (``root_fd``): a DIR swapped for a link meanwhile does not redirect its writes."""
    import io
    import sys
    import tarfile
    import uuid

    from legacy_transit.transit_agent import PACK_HEADER, RESULT_TAG

    real, victim = tmp_path / "real", tmp_path / "victim"
    real.mkdir()
    victim.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        top = tarfile.TarInfo("job")
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        t.addfile(top)
        ti = tarfile.TarInfo("job/f")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    commit = f"CHIBA-COMMIT-{uuid.uuid4().hex}"
    stream = PACK_HEADER + b'{"sockets": []}\n' + buf.getvalue() + commit.encode()
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    moved = tmp_path / "moved"
    os.rename(real, moved)
    (tmp_path / "real").symlink_to(victim)  # the path now leads to the victim
    spec = {"root": str(tmp_path / "real"), "root_fd": fd, "rel": "ccn01/job",
            "display": "shown", "inner": "job", "top": "job", "job": "0" * 12,
            "replace": False, "timeout": 60, "commit": commit, "input": "-"}
    try:  # as the CLI runs it: the descriptor passed down, the stream on stdin
        p = subprocess.run([sys.executable, "-m", "legacy_transit.transit_agent", "extract",
                            json.dumps(spec)], input=stream, capture_output=True,
                           pass_fds=(fd,), timeout=60)
    finally:
        os.close(fd)
    line = [ln for ln in p.stdout.decode().splitlines() if ln.startswith(RESULT_TAG)][0]
    res = json.loads(line[len(RESULT_TAG):])
    assert res["ok"], res
    assert (moved / "ccn01" / "job" / "f").read_bytes() == b"abc"
    assert os.listdir(victim) == []
    assert res["files"] == 1 and res["bytes"] == 3


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs (root only): its free space is known and nobody else writes it."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("method", METHODS)
def test_a_node_file_larger_than_the_space_above_the_reserve_fails_only_its_host(
        embedded, cli, small_fs, method):
    """ccn01 holds a 1 GiB sparse file (a user's truncate), ccn02 a small tree; DIR is on a
    64 MiB file system. ccn01 fails with one line naming the host, the file system and
    the space left; nothing of ccn01 is kept; ccn02 is collected (before: the unpack ran
    into the full file system, root's reserved blocks included, and said "No space left")."""
    big = os.path.join(scratch(embedded, "ccn01"), "job")
    os.makedirs(big)
    with open(os.path.join(big, "huge"), "wb") as f:
        f.truncate(1 << 30)
    tree = make_tree(os.path.join(scratch(embedded, "ccn02"), "job"), big=5000)
    out = small_fs / "back"
    r = cli("collect", "job", "--nodes", "ccn[01-02]", "--dest", str(out), "--method",
            method, "--json")
    assert r.code == 1, r.err
    j = r.json()
    assert sorted(j["failures"]) == ["ccn01"]
    line = j["failures"]["ccn01"]
    assert (f"stopped before the home server's file system {small_fs} (holding {out}) "
            "would have less than 3.2 MiB free: ") in line, line
    assert "MiB left, 1 GiB more to write; nothing of this host was kept (free some space " \
           "there, or set --min-free)" in line, line
    assert sorted(os.listdir(out)) == ["ccn02"]
    assert_same_tree(tree, out / "ccn02" / "job")
    st = os.statvfs(small_fs)
    assert st.f_bfree * st.f_frsize > 60 << 20  # nothing of ccn01's gigabyte stayed
    # the counts are those of what came home: ccn02's tree alone
    alone = cli("collect", "job", "--nodes", "ccn02", "--dest", str(small_fs / "alone"),
                "--method", method, "--json").json()
    assert (j["files"], j["payload_bytes"]) == (alone["files"], alone["payload_bytes"])


@pytest.mark.parametrize("method", METHODS)
def test_min_free_sets_the_reserve(embedded, cli, small_fs, method):
    """A 16 MiB file fits a 64 MiB file system, but not above --min-free 60MiB; with
    --min-free 0 it comes home. A bad value is refused (exit 2)."""
    src = os.path.join(scratch(embedded, "ccn01"), "job")
    os.makedirs(src)
    with open(os.path.join(src, "data"), "wb") as f:
        f.write(os.urandom(16 << 20))
    out = small_fs / "back"
    args = ("collect", "job", "--nodes", "ccn01", "--dest", str(out), "--method", method)
    r = cli(*args, "--min-free", "60MiB")
    assert r.code == 1, r.err
    assert "would have less than 60 MiB free" in r.err and "16 MiB more to write" in r.err
    assert not out.exists()
    r = cli(*args, "--min-free", "0")
    assert r.code == 0, r.err
    assert (out / "ccn01" / "job" / "data").stat().st_size == 16 << 20
    r = cli(*args, "--min-free", "lots")
    assert r.code == 2 and "bad --min-free" in r.err


def test_marked_by_never_hangs_on_a_fifo(tmp_path, monkeypatch):
    """The driver reads a copy's staged mark after a stopped job: a FIFO swapped in for it
    (after was_staged looked) is not opened blocking (before: the CLI hung there)."""
    import inventory.beneath as beneath
    from mpitools.collect import driver

    (tmp_path / "res").mkdir()
    os.mkfifo(tmp_path / ".res.chiba-staged")
    monkeypatch.setattr(beneath, "was_staged", lambda fd, name: True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    got = []
    t = threading.Thread(target=lambda: got.append(driver._marked_by(fd, "res", "ab" * 6)),
                         daemon=True)
    t.start()
    t.join(10)
    hung = t.is_alive()
    if hung:  # release it, so that the test process can end
        os.close(os.open(tmp_path / ".res.chiba-staged", os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
    os.close(fd)
    assert not hung and got == [False]


@pytest.mark.parametrize("method", METHODS)
def test_a_newline_in_path_keeps_the_refusal_on_one_line(embedded, cli, tmp_path, method):
    """A PATH named with a newline, planted as a symlink: the refusal is still one line,
    the name escaped (before: the line was cut in two at the newline)."""
    os.symlink(tmp_path, os.path.join(scratch(embedded, "ccn01"), "a\nb"))
    r = cli("collect", "a\nb", "--nodes", "ccn01", "--dest", str(tmp_path / "back"),
            "--method", method)
    assert r.code == 2, r.err
    assert r.err.splitlines() == [
        "chiba-admin collect: ccn01: '/scratch/a\\nb': is a symbolic link (collect reads "
        "as root on the nodes and never follows one: name the real directory below "
        "scratch, or remove the link)"], r.err


@pytest.mark.parametrize("method", METHODS)
def test_a_last_component_too_long_for_collects_names_is_refused_up_front(
        embedded, cli, tmp_path, method):
    """A 230-byte last component fits a node's file system but not the names collect
    makes beside the copy (``.NAME.chiba-collect-JOBID.old``): exit 2 before anything is
    sent, nothing made (before: "File name too long" on the home server, exit 1)."""
    name = "x" * 230
    make_tree(os.path.join(scratch(embedded, "ccn01"), name), big=1000)
    out = tmp_path / "back"
    r = cli("collect", name, "--nodes", "ccn01", "--dest", str(out), "--method", method)
    assert r.code == 2, r.err
    assert r.err.splitlines() == [
        f"chiba-admin: error: {name}: PATH's last component is 230 bytes long; collect "
        "takes at most 223 (it names its lock, mark and temporary entries after it) "
        "(collect the directory above it, or rename it)"], r.err
    assert not out.exists()


@pytest.mark.parametrize("method", METHODS)
def test_the_counts_are_those_of_the_trees_collected(embedded, cli, tmp_path, method):
    """DIR already holds other files: ``files`` and ``payload_bytes`` count only what this
    run brought home (before, Transit counted the whole of DIR)."""
    tree = make_tree(os.path.join(scratch(embedded, "ccn01"), "job"), big=3000)
    out = tmp_path / "back"
    (out / "other").mkdir(parents=True)
    (out / "other" / "big").write_bytes(os.urandom(1 << 20))
    first = cli("collect", "job", "--nodes", "ccn01", "--dest", str(tmp_path / "alone"),
                "--method", method, "--json").json()
    r = cli("collect", "job", "--nodes", "ccn01", "--dest", str(out), "--method", method,
            "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert (j["files"], j["payload_bytes"]) == (first["files"], first["payload_bytes"])
    assert j["payload_bytes"] == sum(p.stat().st_size for p in tree.rglob("*")
                                     if p.is_file() and not p.is_symlink())
