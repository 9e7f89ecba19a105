"""The temporary file a killed ``mark_staged`` leaves (``.NAME.chiba-staged.PID-8HEX``:
SIGKILL or a crash between its create and its rename) is removed by the next run on the
same destination, under that destination's lock, and only when it is certainly the tool's
own and dead: that NAME's exact pattern, a regular file (never followed), one link, owned
by this process's user, a few dozen bytes, a minute old. Everything else that looks like
one (another NAME's, another user's, a symlink, a FIFO, a directory, a name that almost
matches) is left, and a dry run removes nothing.
"""

from __future__ import annotations

import os
import time

import pytest

from support.compare import diff_snapshots, snapshot_hosts
from support.trees import make_tree

OLD = time.time() - 3600  # an hour ago: a leftover of a run killed long since
# a killed mark_staged's temporary file of /scratch/proj, as the process with PID 4242 made it
LEFTOVER = ".proj.chiba-staged.4242-0123abcd"
# names that are not the pattern of NAME "proj" (some would be, unescaped or unanchored)
ALMOST = [".proj.chiba-staged.4242-0123ABCD",     # upper-case hex
          ".proj.chiba-staged.4242-0123abc",      # 7 hex digits
          ".proj.chiba-staged.4242-0123abcde",    # 9
          ".proj.chiba-staged.-0123abcd",         # no PID
          ".proj.chiba-staged.4242_0123abcd",
          ".proj.chiba-staged.4242-0123abcd.x",
          ".proj.chiba-staged.4242-0123abcd\n",
          ".proj.chiba-staged.\u0664\u0662-0123abcd",  # Arabic-Indic digits
          "proj.chiba-staged.4242-0123abcd",      # no leading dot
          "x.proj.chiba-staged.4242-0123abcd",
          ".proj.chiba-staged",                   # the marker itself
          ".proj.chiba-lock.4242-0123abcd",
          ".prox.chiba-staged.4242-0123abcd"]


def _file(path, data: bytes = b"0123456789ab\n", mtime: float = OLD) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))
    return str(path)


def _aged(path) -> None:
    os.utime(path, (OLD, OLD), follow_symlinks=False)


def scratch(topo, host: str) -> str:
    h = topo.host(host)
    return h.local_path(h.scratch)


# --- the helper itself -----------------------------------------------------------------------
@pytest.fixture
def locked(tmp_path):
    """(dir, its fd, lock fd of NAME "proj"): the caller's side of clean_staged_leftovers."""
    from inventory.beneath import lock_dest, open_root, unlock_dest

    d = tmp_path / "scratch"
    d.mkdir()
    fd = open_root(str(d))
    lock = lock_dest(fd, "proj")
    yield d, fd, lock
    unlock_dest(fd, "proj", lock)
    os.close(fd)


def test_the_helper_removes_only_dead_leftovers_of_its_name(locked, tmp_path):
    from inventory.beneath import clean_staged_leftovers

    d, fd, lock = locked
    _file(d / LEFTOVER)
    _file(d / ".proj.chiba-staged.1-ffffffff", b"")  # killed before it wrote
    kept = {n: _file(d / n) for n in ALMOST + [".other.chiba-staged.4242-0123abcd"]}
    kept["young"] = _file(d / ".proj.chiba-staged.4242-00000001", mtime=time.time())
    kept["big"] = _file(d / ".proj.chiba-staged.4242-00000002", b"x" * 65)
    kept["linked"] = _file(d / ".proj.chiba-staged.4242-00000003")
    os.link(kept["linked"], tmp_path / "second link")
    assert clean_staged_leftovers(fd, "proj", lock) == [".proj.chiba-staged.1-ffffffff",
                                                         LEFTOVER]
    assert sorted(os.listdir(d)) == sorted([".proj.chiba-lock"] + [
        os.path.basename(p) for p in kept.values()])
    assert clean_staged_leftovers(fd, "proj", lock) == []


def test_the_helper_escapes_the_name(tmp_path):
    """A NAME with regex metacharacters matches only itself: ``run.1+`` does not take
    ``.runX11.chiba-staged...``."""
    from inventory.beneath import clean_staged_leftovers, lock_dest, unlock_dest

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        other = _file(tmp_path / ".runX11.chiba-staged.7-0123abcd")
        mine = _file(tmp_path / ".run.1+.chiba-staged.7-0123abcd")
        lock = lock_dest(fd, "run.1+")
        try:
            assert clean_staged_leftovers(fd, "run.1+", lock) == [os.path.basename(mine)]
        finally:
            unlock_dest(fd, "run.1+", lock)
        assert os.path.exists(other) and not os.path.exists(mine)
    finally:
        os.close(fd)


def test_the_helper_removes_nothing_without_that_names_lock(locked):
    """Another NAME's lock, or a file that is not the lock, is not NAME's lock: a live
    writer of NAME might be between its create and its rename."""
    from inventory.beneath import clean_staged_leftovers, lock_dest, unlock_dest

    d, fd, _ = locked
    _file(d / LEFTOVER)
    other = lock_dest(fd, "other")
    try:
        assert clean_staged_leftovers(fd, "proj", other) == []
    finally:
        unlock_dest(fd, "other", other)
    stray = os.open(_file(d / "stray"), os.O_RDONLY)
    try:
        assert clean_staged_leftovers(fd, "proj", stray) == []
    finally:
        os.close(stray)
    assert os.path.exists(d / LEFTOVER)


def test_the_helper_follows_no_symlink_and_opens_no_fifo(locked, tmp_path):
    from inventory.beneath import clean_staged_leftovers

    d, fd, lock = locked
    victim = _file(tmp_path / "victim")
    os.symlink(victim, d / ".proj.chiba-staged.1-0123abcd")
    _aged(d / ".proj.chiba-staged.1-0123abcd")
    os.mkfifo(d / ".proj.chiba-staged.2-0123abcd")
    _aged(d / ".proj.chiba-staged.2-0123abcd")
    os.mkdir(d / ".proj.chiba-staged.3-0123abcd")
    _aged(d / ".proj.chiba-staged.3-0123abcd")
    assert clean_staged_leftovers(fd, "proj", lock) == []
    assert os.path.islink(d / ".proj.chiba-staged.1-0123abcd")
    assert open(victim, "rb").read() == b"0123456789ab\n"
    assert os.path.exists(d / ".proj.chiba-staged.2-0123abcd")
    assert os.path.isdir(d / ".proj.chiba-staged.3-0123abcd")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to uid 65534 needs root")
def test_the_helper_leaves_another_users_file(locked):
    from inventory.beneath import clean_staged_leftovers

    d, fd, lock = locked
    planted = _file(d / LEFTOVER)
    os.chown(planted, 65534, 65534)
    _aged(planted)
    assert clean_staged_leftovers(fd, "proj", lock) == []
    assert os.path.exists(planted)


def _mark_stopped(directory, monkeypatch, rename) -> None:
    """mark_staged of "proj" in ``directory`` with ``os.rename`` replaced by ``rename``,
    which raises KeyboardInterrupt (a stop), raised again by mark_staged."""
    from inventory.beneath import mark_staged

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    monkeypatch.setattr(os, "rename", rename)
    try:
        with pytest.raises(KeyboardInterrupt):
            mark_staged(fd, "proj", "0123456789ab")
    finally:
        os.close(fd)


def test_mark_staged_leaves_no_temporary_file_when_interrupted(tmp_path, monkeypatch):
    """A stop raised as an exception (SIGTERM's handler, Ctrl-C) between the create and
    the rename removes the temporary file too (it stayed: only OSError removed it)."""
    def stopped(*a, **k):
        raise KeyboardInterrupt

    _mark_stopped(tmp_path, monkeypatch, stopped)
    assert os.listdir(tmp_path) == []


def test_a_stop_just_after_the_rename_removes_nothing_it_did_not_make(tmp_path, monkeypatch):
    """A SIGTERM handler's exception is raised when the rename returns: the temporary name
    is free by then, and what holds it now (another user's file, planted in a sticky
    scratch the moment the name was freed) is not the tool's and stays (it was removed)."""
    rename = os.rename
    planted = []

    def renamed_then_stopped(src, dst, **kw):
        rename(src, dst, **kw)
        planted.append(_file(tmp_path / src, b"another user's\n"))
        raise KeyboardInterrupt

    _mark_stopped(tmp_path, monkeypatch, renamed_then_stopped)
    assert sorted(os.listdir(tmp_path)) == [".proj.chiba-staged",
                                            os.path.basename(planted[0])]
    assert open(planted[0], "rb").read() == b"another user's\n"
    assert (tmp_path / ".proj.chiba-staged").read_bytes() == b"0123456789ab\n"


def test_what_a_killed_mark_staged_leaves_is_what_the_helper_removes(locked, monkeypatch):
    """The names mark_staged makes and the pattern the helper removes stay in step: a
    rename that never happens (the process killed before it) leaves a file the next run
    under the lock removes."""
    from inventory.beneath import clean_staged_leftovers, mark_staged

    d, fd, lock = locked
    with monkeypatch.context() as m:
        m.setattr(os, "rename", lambda *a, **k: None)  # killed just before the rename
        mark_staged(fd, "proj", "0123456789ab")
    left = [n for n in os.listdir(d) if n.startswith(".proj.chiba-staged.")]
    assert len(left) == 1 and left[0].startswith(f".proj.chiba-staged.{os.getpid()}-")
    assert clean_staged_leftovers(fd, "proj", lock) == [], "too young yet"
    _aged(d / left[0])
    assert clean_staged_leftovers(fd, "proj", lock) == left
    assert sorted(os.listdir(d)) == [".proj.chiba-lock"]


# --- through the real command on the embedded cluster ----------------------------------------
def _plant(d: str, victim: str) -> dict[str, str]:
    """Beside /scratch/proj on a host: a dead leftover of NAME, and what must stay."""
    _file(os.path.join(d, LEFTOVER))
    keep = {"other name": ".other.chiba-staged.4242-0123abcd",
            "symlink": ".proj.chiba-staged.1-0123abcd",
            "fifo": ".proj.chiba-staged.2-0123abcd",
            "directory": ".proj.chiba-staged.3-0123abcd"}
    _file(os.path.join(d, keep["other name"]))
    os.symlink(victim, os.path.join(d, keep["symlink"]))
    os.mkfifo(os.path.join(d, keep["fifo"]))
    os.mkdir(os.path.join(d, keep["directory"]))
    for i, n in enumerate(ALMOST):
        if n != ".proj.chiba-staged":  # a marker would make proj "staged": not the test
            keep[f"almost {i}"] = n
            _file(os.path.join(d, n))
    if os.geteuid() == 0:
        keep["another uid"] = ".proj.chiba-staged.5-0123abcd"
        _file(os.path.join(d, keep["another uid"]))
        os.chown(os.path.join(d, keep["another uid"]), 65534, 65534)
    for n in keep.values():
        _aged(os.path.join(d, n))
    return keep


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_the_next_stage_of_name_removes_its_dead_leftover_and_nothing_else(embedded, cli,
                                                                          tmp_path, method):
    """Before: the leftover stayed for ever. Another NAME's, another user's (as root), a
    symlink (its target untouched), a FIFO, a directory and near names stay."""
    src = make_tree(tmp_path / "proj", big=1000)
    d = scratch(embedded, "ccn01")
    victim = _file(tmp_path / "victim")
    keep = _plant(d, victim)
    r = cli("stage", src, "--nodes", "ccn01", "--method", method)
    assert r.code == 0, r.err
    assert not os.path.lexists(os.path.join(d, LEFTOVER))
    left = {k: n for k, n in keep.items() if not os.path.lexists(os.path.join(d, n))}
    assert left == {}, f"removed: {left}"
    assert sorted(os.listdir(d)) == sorted(["proj", ".proj.chiba-staged", *keep.values()])
    assert open(victim, "rb").read() == b"0123456789ab\n"


@pytest.mark.mpi
def test_the_next_collect_of_name_removes_its_dead_leftover(embedded, cli, tmp_path):
    make_tree(os.path.join(scratch(embedded, "ccn01"), "job"), big=1000)
    home = tmp_path / "home"
    (home / "ccn01").mkdir(parents=True, mode=0o700)
    leftover = _file(home / "ccn01" / ".job.chiba-staged.4242-0123abcd")
    other = _file(home / "ccn01" / ".jobs.chiba-staged.4242-0123abcd")
    r = cli("collect", "job", "--nodes", "ccn01", "--dest", str(home))
    assert r.code == 0, r.err
    assert not os.path.exists(leftover) and os.path.exists(other)
    assert sorted(os.listdir(home / "ccn01")) == sorted(
        [".job.chiba-staged", ".jobs.chiba-staged.4242-0123abcd", "job"])


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_a_dry_run_removes_nothing(embedded, cli, tmp_path, method):
    src = make_tree(tmp_path / "proj", big=1000)
    d = scratch(embedded, "ccn01")
    _plant(d, _file(tmp_path / "victim"))
    before = snapshot_hosts({"state": embedded.state_dir})
    r = cli("stage", src, "--nodes", "ccn01", "--method", method, "--dry-run")
    assert r.code == 0, r.err
    assert diff_snapshots(before, snapshot_hosts({"state": embedded.state_dir})) == []
    assert os.path.exists(os.path.join(d, LEFTOVER))


@pytest.mark.mpi
def test_the_next_sync_of_name_removes_its_dead_leftover(embedded, cli, tmp_path):
    """mpisync takes the same lock beside the repository it writes: a stage's or collect's
    leftover of that NAME goes, another NAME's stays."""
    from support.trees import make_repo

    src = make_repo(str(tmp_path / "src"))
    h = embedded.host("ccn01")
    repo = h.local_path(h.resolve("repository", None))
    parent, name = os.path.split(repo.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    leftover = _file(os.path.join(parent, f".{name}.chiba-staged.4242-0123abcd"))
    other = _file(os.path.join(parent, f".{name}x.chiba-staged.4242-0123abcd"))
    r = cli("--json", "sync-mayors", src, "--targets", "ccn01")
    assert r.code == 0, r.err
    assert not os.path.exists(leftover) and os.path.exists(other)
