"""Destination confinement (topology.confine) and walking below a root (inventory.beneath)."""

from __future__ import annotations

import errno
import os

import pytest

from chiba_admin.errors import TopologyError, InvalidRequest
from inventory.beneath import (BeneathError, lock_dest, mark_staged, open_dir_beneath, open_root,
                               unlock_dest, unmark_staged, was_staged)
from topology.confine import confine_dest, host_path_ok
from topology.loader import loads_topology
from topology.model import Host, HostPaths

NODE = Host("ccn01", "node", "town1",
            paths=HostPaths("/scratch", "/var/spool/chiba", "/opt/chiba/repo", ("/data",)))


@pytest.mark.parametrize("value,expect", [
    (None, ("/scratch", "input")),
    ("job/in", ("/scratch", "job/in")),
    ("/scratch/job", ("/scratch", "job")),
    ("/scratch//job/./x", ("/scratch", "job/x")),
    ("/data/run1", ("/data", "run1")),
])
def test_confine_accepts(value, expect):
    d = confine_dest(NODE, "scratch", value, default_name="input")
    assert (d.root, d.rel) == expect


@pytest.mark.parametrize("value,words", [
    ("", "empty --dest"),
    ("../etc", "'..'"),
    ("a/../../etc", "'..'"),
    ("/", "root directory"),
    ("//", "root directory"),
    ("/etc", "outside"),
    ("/scratchy/x", "outside"),
    (".", "is the host's scratch"),
    ("/scratch", "is the host's scratch"),
    ("/data", "destination root"),
    ("/var/spool", "outside"),
])
def test_confine_refuses(value, words):
    with pytest.raises(InvalidRequest) as e:
        confine_dest(NODE, "scratch", value, default_name="input")
    assert words in str(e.value) and "ccn01" in str(e.value)


def test_confine_refuses_ancestor_of_host_dirs():
    h = Host("m", "mayor", paths=HostPaths("/scratch", "/scratch/spool", "/srv/repo"))
    with pytest.raises(InvalidRequest, match="is the host's spool"):
        confine_dest(h, "scratch", "/scratch/spool", default_name="x")
    # sync-mayors owns the repository itself, but never a parent of it
    assert confine_dest(h, "repository", None, allow_root=True).path == "/srv/repo"
    r = Host("m", "mayor", paths=HostPaths("/scratch", "/var/spool", "/srv/repo",
                                           ("/srv",)))
    with pytest.raises(InvalidRequest, match="contains the host's repository"):
        confine_dest(r, "repository", "/srv", allow_root=True)


@pytest.mark.parametrize("p,ok", [("/scratch", True), ("/", False), ("scratch", False),
                                  ("/a/../b", False), ("/a/", False), ("//a", False),
                                  ("/a//b", False)])
def test_host_path_ok(p, ok):
    assert host_path_ok(p) is ok


TOPO = """
[cluster]
kind = "embedded"
[defaults]
scratch = {scratch}
[links.core]
bandwidth = "1Gbit"
[links.town]
bandwidth = "100Mbit"
[president]
name = "pres"
[mayors.m1]
[towns.t1]
mayor = "m1"
nodes = "n[1-2]"
"""


@pytest.mark.parametrize("bad", ['"/"', '"/scratch/../etc"', '"rel"', '"/a/"'])
def test_topology_refuses_bad_host_paths(bad):
    with pytest.raises(TopologyError, match="scratch in \\[defaults\\] must be an absolute path"):
        loads_topology(TOPO.format(scratch=bad), "t.toml")


def test_topology_dest_roots():
    t = loads_topology(TOPO.format(scratch='"/scratch"\ndest_roots = ["/data"]'), "t.toml")
    assert t.host("n1").paths.dest_roots == ("/data",)
    with pytest.raises(TopologyError, match="dest_roots"):
        loads_topology(TOPO.format(scratch='"/scratch"\ndest_roots = "/data"'), "t.toml")


def test_open_beneath_refuses_planted_symlink(tmp_path):
    root, outside = tmp_path / "scratch", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "jobdir").symlink_to(outside)
    rfd = open_root(str(root))
    try:
        with pytest.raises(BeneathError) as e:
            open_dir_beneath(rfd, "jobdir/x", create=True)
        assert e.value.errno == errno.ELOOP and "symbolic link" in str(e.value)
        assert list(outside.iterdir()) == []
        fd = open_dir_beneath(rfd, "a/b/c", create=True)
        os.close(fd)
        assert (root / "a/b/c").is_dir()
        with pytest.raises(ValueError):
            open_dir_beneath(rfd, "a/../../x")
    finally:
        os.close(rfd)


def test_lock_dest_is_exclusive_and_removed(tmp_path):
    rfd = open_root(str(tmp_path))
    try:
        fd = lock_dest(rfd, "job")
        with pytest.raises(BeneathError) as e:
            lock_dest(rfd, "job")
        assert e.value.errno == errno.EBUSY and "another chiba-admin run" in str(e.value)
        unlock_dest(rfd, "job", fd)
        assert not (tmp_path / ".job.chiba-lock").exists()
        os.close(lock_dest(rfd, "job"))  # free again
        (tmp_path / ".other.chiba-lock").symlink_to("/etc/passwd")
        with pytest.raises(BeneathError, match="symbolic link"):
            lock_dest(rfd, "other")
    finally:
        os.close(rfd)


def test_staged_marker(tmp_path):
    rfd = open_root(str(tmp_path))
    try:
        assert not was_staged(rfd, "job")
        mark_staged(rfd, "job", "j1")
        assert was_staged(rfd, "job") and (tmp_path / ".job.chiba-staged").read_text() == "j1\n"
        unmark_staged(rfd, "job")
        assert not was_staged(rfd, "job")
        if os.geteuid() == 0:  # a marker another user planted beside a directory is not ours
            (tmp_path / ".theirs.chiba-staged").write_text("forged\n")
            os.chown(tmp_path / ".theirs.chiba-staged", 1234, 1234)
            assert not was_staged(rfd, "theirs")
    finally:
        os.close(rfd)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_staged_marker_forged_by_another_user_is_not_trusted(tmp_path):
    """In a sticky, world-writable scratch a user can create .B.chiba-staged beside B."""
    (tmp_path / "B").mkdir()
    forged = tmp_path / ".B.chiba-staged"
    forged.write_text("forged\n")
    os.chown(forged, 4321, 4321)
    rfd = open_root(str(tmp_path))
    try:
        assert not was_staged(rfd, "B")
    finally:
        os.close(rfd)


def test_check_source(tmp_path):
    from inventory.source import check_source

    with pytest.raises(InvalidRequest, match="no SRC given"):
        check_source("")
    with pytest.raises(InvalidRequest, match="does not exist"):
        check_source(str(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a").write_bytes(b"xyz")
    os.mkfifo(tmp_path / "d/fifo")
    (tmp_path / "d/l").symlink_to("/dev/null")  # a symlink to a device is data, not a device
    info = check_source(str(tmp_path / "d"))
    assert (info.is_dir, info.files, info.bytes) == (True, 3, 3)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")
def test_check_source_refuses_devices(tmp_path):
    import stat as st

    from inventory.source import check_source

    (tmp_path / "d/sub").mkdir(parents=True)
    os.mknod(tmp_path / "d/sub/null", st.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(InvalidRequest) as e:
        check_source(str(tmp_path / "d"))
    assert "character device" in str(e.value) and "d/sub/null" in str(e.value)


@pytest.mark.parametrize("name", ["a;b", "a b", "a/b", "-x", "a,b", "@x", "a[1]"])
def test_topology_refuses_bad_host_names(name):
    text = TOPO.format(scratch='"/scratch"').replace('name = "pres"', f'name = {name!r}'
                                                      .replace("'", '"'))
    with pytest.raises(TopologyError, match="bad host name"):
        loads_topology(text, "t.toml")


def test_topology_refuses_bad_town_name():
    text = TOPO.format(scratch='"/scratch"').replace("[towns.t1]", '[towns."t 1"]')
    with pytest.raises(TopologyError, match="bad town name"):
        loads_topology(text, "t.toml")


@pytest.mark.parametrize("planted", ["fifo", "symlink", "foreign"])
def test_staged_marker_replaces_what_another_user_planted(tmp_path, planted):
    """A FIFO (which would hang an open), a symlink (written through) or a file someone
    else owns in the marker's place is replaced by the tool's own file."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    m = tmp_path / ".job.chiba-staged"
    if planted == "fifo":
        os.mkfifo(m)
    elif planted == "symlink":
        m.symlink_to(victim)
    else:
        m.write_text("forged\n")
        if os.geteuid() == 0:
            os.chown(m, 65534, 65534)
    rfd = open_root(str(tmp_path))
    try:
        mark_staged(rfd, "job", "j2")
        assert m.is_file() and not m.is_symlink() and m.read_text() == "j2\n"
        assert m.stat().st_uid == os.geteuid() and was_staged(rfd, "job")
        assert victim.read_text() == "keep"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".job.chiba-staged", "victim"]
    finally:
        os.close(rfd)


def test_staged_marker_refuses_a_directory_in_its_place(tmp_path):
    (tmp_path / ".job.chiba-staged").mkdir()
    rfd = open_root(str(tmp_path))
    try:
        with pytest.raises(BeneathError, match="cannot write the staged marker"):
            mark_staged(rfd, "job", "j3")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".job.chiba-staged"]
    finally:
        os.close(rfd)


def test_confine_refuses_a_dest_inside_another_host_directory():
    """A dest_roots entry above the spool must not let a stage write into the spool."""
    h = Host("n", "node", paths=HostPaths("/scratch", "/var/spool/chiba", "/opt/chiba/repo",
                                          ("/var/spool", "/opt")))
    with pytest.raises(InvalidRequest, match="inside the host's spool directory"):
        confine_dest(h, "scratch", "/var/spool/chiba/y", default_name="x")
    with pytest.raises(InvalidRequest, match="inside the host's repository directory"):
        confine_dest(h, "scratch", "/opt/chiba/repo/y", default_name="x")
    assert confine_dest(h, "scratch", "/var/spool/other", default_name="x").rel == "other"
    # sync-mayors' own root may hold the others' parents, not the other way round
    assert confine_dest(h, "repository", "sub", allow_root=True).path == "/opt/chiba/repo/sub"


def test_topology_refuses_one_directory_for_two_purposes():
    with pytest.raises(TopologyError, match="scratch and spool .* are the same directory"):
        loads_topology(TOPO.format(scratch='"/scratch"\nspool = "/scratch"'), "t.toml")


@pytest.mark.parametrize("value,words", [
    ("a" * 300, "over 255 bytes"),
    ("job/" + "b" * 256, "over 255 bytes"),
    (".job.chiba-lock", "chiba-admin's own files"),
    (".job.chiba-staged", "chiba-admin's own files"),
    (f".job.chiba-tmp-{'0' * 32}", "chiba-admin's own files"),
])
def test_confine_refuses_long_and_reserved_names(value, words):
    with pytest.raises(InvalidRequest, match=words):
        confine_dest(NODE, "scratch", value, default_name="input")


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another uid needs root")
def test_lock_planted_by_another_user_is_refused_truthfully(tmp_path):
    lock = tmp_path / ".job.chiba-lock"
    lock.write_text("")
    os.chown(lock, 65534, 65534)
    rfd = open_root(str(tmp_path))
    try:
        with pytest.raises(BeneathError, match="belongs to uid 65534"):
            lock_dest(rfd, "job")
        assert lock.exists()  # not ours to remove
    finally:
        os.close(rfd)
