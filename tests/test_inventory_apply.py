"""Applying plans to real trees: atomic writes, refusal to follow dest symlinks, safe deletes."""

from __future__ import annotations

import os

import pytest

from chiba_admin.errors import InventoryError
from inventory import (DestTree, apply_plan, decode_inventory, delete_extraneous, encode_inventory,
                       finalize, local_fetch, make_dirs, make_plan, make_symlinks, scan,
                       write_file_atomic)
from inventory.apply import TMP_MARK

T0 = 1_650_000_000_123_456_789
ODD = ["with space", "it's", 'dq"uote', "new\nline", "$(touch pwned)", "`id`", "tab\there",
       os.fsdecode(b"latin1-\xe9\xff"), "ünïcødé", "-rf", "back\\slash", "*", ".hidden"]


def put(root, rel, data=b"x", mode=0o644, mtime=T0):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime))
    return path


def no_temps(root) -> bool:
    for _dir, dirs, files in os.walk(os.fsencode(root)):
        if any(TMP_MARK in n for n in dirs + files):
            return False
    return True


def sync(src, dst, **kw):
    s = scan(src, checksum=True)
    t = scan(dst, checksum=True, missing_ok=True)
    plan = make_plan(s, t, checksum=True, **kw)
    return plan, apply_plan(plan, dst, local_fetch(src))


def test_odd_names_round_trip_through_codec_plan_and_apply(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i, name in enumerate(ODD):
        put(src, f"{name}/{name}", name.encode("utf-8", "surrogateescape") * (i + 1), 0o600 + i)
        os.symlink(name, os.path.join(src, f"{name}/link"))
    put(dst, "stale\nfile")
    s = decode_inventory(encode_inventory(scan(src, checksum=True)))
    t = decode_inventory(encode_inventory(scan(dst, checksum=True)))
    plan = make_plan(s, t, delete=True, checksum=True)
    result = apply_plan(plan, dst, local_fetch(src))
    assert result.created == 3 * len(ODD) and result.deleted == 1
    after = scan(dst, checksum=True)
    assert after.same_tree(scan(src, checksum=True))
    assert sorted(os.listdir(os.fsencode(dst))) == sorted(os.listdir(os.fsencode(src)))
    assert not os.path.exists("pwned") and not (tmp_path / "pwned").exists()


def test_apply_creates_missing_destination_and_preserves_metadata(tmp_path):
    src = tmp_path / "src"
    put(src, "d/exe", b"#!/bin/sh\n", 0o755, T0 + 1)
    put(src, "d/ro", b"ro", 0o444, T0 + 2)
    os.symlink("exe", src / "d" / "ln")
    os.utime(src / "d" / "ln", ns=(T0 + 3, T0 + 3), follow_symlinks=False)
    os.chmod(src / "d", 0o750)
    os.utime(src / "d", ns=(T0 + 4, T0 + 4))
    dst = tmp_path / "new" / "dst"
    sync(src, dst)
    st = os.stat(dst / "d" / "exe")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o755, T0 + 1)
    assert os.lstat(dst / "d" / "ln").st_mtime_ns == T0 + 3
    assert os.readlink(dst / "d" / "ln") == "exe"
    std = os.stat(dst / "d")
    assert (std.st_mode & 0o7777, std.st_mtime_ns) == (0o750, T0 + 4)


def test_overwrite_is_atomic_rename_and_read_only_target_is_replaced(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "f", b"new content", 0o644, T0 + 10)
    put(dst, "f", b"old", 0o444, T0)
    ino = os.stat(dst / "f").st_ino
    fd = os.open(dst / "f", os.O_RDONLY)  # a reader of the old file keeps the old bytes
    try:
        _, r = sync(src, dst)
        assert os.read(fd, 100) == b"old"
    finally:
        os.close(fd)
    assert (dst / "f").read_bytes() == b"new content" and os.stat(dst / "f").st_ino != ino
    assert r.updated == 1 and r.bytes == 11


def test_failed_fetch_leaves_old_file_no_temp_and_no_deletions(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "a", b"A" * 10, mtime=T0 + 1)
    put(src, "b", b"B" * 10, mtime=T0 + 1)
    put(dst, "b", b"old-b")
    put(dst, "extra", b"must survive a failed sync")
    plan = make_plan(scan(src), scan(dst), delete=True)
    real = local_fetch(src)

    def flaky(rel):
        if rel == "b":
            def gen():
                yield b"BBBB"
                raise OSError(5, "Input/output error")
            return gen()
        return real(rel)

    with pytest.raises(InventoryError) as ei:
        apply_plan(plan, dst, flaky)
    assert ei.value.where == os.path.join(dst, "b") and "Input/output error" in str(ei.value)
    assert (dst / "b").read_bytes() == b"old-b"
    assert (dst / "extra").exists()
    assert no_temps(dst)


def test_source_changed_during_transfer_detected(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "f", b"12345")
    plan = make_plan(scan(src), scan(dst, missing_ok=True))
    with pytest.raises(InventoryError, match="source changed"):
        apply_plan(plan, dst, lambda rel: b"1234")
    assert not (dst / "f").exists() and no_temps(dst)


def test_digest_verification(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "f", b"12345")
    plan = make_plan(scan(src, checksum=True), scan(dst, checksum=True, missing_ok=True), checksum=True)
    with pytest.raises(InventoryError, match="digest"):
        apply_plan(plan, dst, lambda rel: b"12346")
    assert no_temps(dst) and not (dst / "f").exists()
    apply_plan(plan, dst, lambda rel: b"12346", verify=False)
    assert (dst / "f").read_bytes() == b"12346"


def test_never_writes_through_a_destination_symlink(tmp_path):
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    put(src, "d/f", b"payload")
    put(src, "d/g", b"payload2")
    outside.mkdir()
    dst.mkdir()
    plan = make_plan(scan(src), scan(dst))
    # Between planning and applying, someone swaps the directory for a link outside.
    os.symlink(outside, dst / "d")
    with pytest.raises(InventoryError, match="symlink") as ei:
        apply_plan(plan, dst, local_fetch(src))
    assert ei.value.where.startswith(str(dst))
    assert os.listdir(outside) == []
    with pytest.raises(InventoryError, match="symlink"):
        write_file_atomic(dst, "d/evil", b"x", 0o644, T0)
    assert os.listdir(outside) == []
    # The directory existed at plan time (no mkdir), and is swapped afterwards.
    os.unlink(dst / "d")
    os.mkdir(dst / "d")
    plan = make_plan(scan(src), scan(dst))
    assert [a.op for a in plan.actions][:1] == ["write"]
    os.rmdir(dst / "d")
    os.symlink(outside, dst / "d")
    with pytest.raises(InventoryError, match="goes through a symlink"):
        apply_plan(plan, dst, local_fetch(src))
    assert os.listdir(outside) == [] and no_temps(outside)


def test_final_component_symlink_is_replaced_not_followed(tmp_path):
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    put(outside, "victim", b"keep me")
    dst.mkdir()
    os.symlink(outside / "victim", dst / "f")
    write_file_atomic(dst, "f", b"new", 0o600, T0)
    assert (outside / "victim").read_bytes() == b"keep me"
    assert not os.path.islink(dst / "f") and (dst / "f").read_bytes() == b"new"


def test_type_changes_applied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "file_to_dir/inner", b"i")
    put(src, "dir_to_file", b"f")
    os.symlink("dir_to_file", src / "file_to_link")
    put(src, "link_to_file", b"l")
    os.mkdir(src / "link_to_dir")
    put(dst, "file_to_dir", b"was a file")
    put(dst, "dir_to_file/deep/x", b"was in a dir")
    put(dst, "file_to_link", b"was a file")
    os.symlink("/nonexistent", dst / "link_to_file")
    os.symlink("/", dst / "link_to_dir")
    plan, _ = sync(src, dst, delete=True)
    assert scan(dst, checksum=True).same_tree(scan(src, checksum=True))
    assert no_temps(dst)


def test_dir_to_file_refused_without_delete(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "x", b"file")
    put(dst, "x/precious", b"keep")
    plan, _ = sync(src, dst)
    assert (dst / "x" / "precious").read_bytes() == b"keep"
    assert plan.conflicts


def test_deleting_dir_with_excluded_content_keeps_it(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "keep", b"k")
    put(dst, "keep", b"k")
    put(dst, "old/a", b"a")
    put(dst, "old/build.o", b"excluded, so not ours to delete")
    s = scan(src, excludes=["*.o"])
    t = scan(dst, excludes=["*.o"])
    plan = make_plan(s, t, delete=True)
    assert [a.path for a in plan.by_op("delete")] == ["old/a"]  # "old" is protected
    r = apply_plan(plan, dst, local_fetch(src))
    assert r.deleted == 1 and not r.conflicts
    assert (dst / "old" / "build.o").exists() and not (dst / "old" / "a").exists()


def test_dir_replaced_by_a_file_keeps_excluded_members_and_reports(tmp_path):
    """rsync keeps x/sub/keep.o, deletes x/a, reports x (exit 23); so does the plan."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "x", b"now a file")
    put(dst, "x/a", b"a")
    put(dst, "x/sub/keep.o", b"excluded: not ours")
    plan = make_plan(scan(src, excludes=["*.o"]), scan(dst, excludes=["*.o"]), delete=True)
    assert [a.path for a in plan.by_op("clear")] == ["x/a"] and plan.conflicts
    assert not plan.writes()  # nothing is sent for it
    apply_plan(plan, dst, local_fetch(src))
    assert (dst / "x" / "sub" / "keep.o").read_bytes() == b"excluded: not ours"
    assert not (dst / "x" / "a").exists()


def test_an_unplanned_member_stops_the_replacement_as_a_conflict(tmp_path):
    """A file appearing in the directory after the scan: rmdir fails, nothing is removed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "x", b"file")
    (dst / "x").mkdir(parents=True)
    plan = make_plan(scan(src), scan(dst), delete=True)
    put(dst, "x/late", b"arrived after the scan")
    r = apply_plan(plan, dst, local_fetch(src))
    assert r.conflicts and r.conflicts[0].startswith("x: could not make way")
    assert (dst / "x" / "late").read_bytes() == b"arrived after the scan"
    assert no_temps(dst)


def test_temp_names_are_exact(tmp_path):
    from inventory.apply import is_tmp_name, new_tmp_tag

    tag = new_tmp_tag()
    assert len(tag) == 32 and is_tmp_name(f".data.chiba-tmp-{tag}")
    for user in ("results.chiba-tmp-2024", ".x.chiba-tmp-abc", f"x.chiba-tmp-{tag}",
                 f".x.chiba-tmp-{tag}.bak", f".x.chiba-tmp-{tag.upper()}"):
        assert not is_tmp_name(user), user


def test_owners_setuid_fifos_and_sockets_as_rsync_a_as_root(tmp_path):
    import socket
    import stat

    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "tool", b"#!", 0o4755)
    os.chown(src / "tool", 1000, 1000)
    os.chmod(src / "tool", 0o4755)  # chown cleared it
    put(src, "d/f", b"f", 0o2640)
    os.chown(src / "d/f", 1001, 50)
    os.chmod(src / "d/f", 0o2640)
    os.chown(src / "d", 1002, 51)
    os.mkfifo(src / "d/pipe", 0o620)
    os.chown(src / "d/pipe", 1003, 52, follow_symlinks=False)
    os.symlink("f", src / "d/ln")
    os.chown(src / "d/ln", 1004, 53, follow_symlinks=False)
    sk = socket.socket(socket.AF_UNIX)
    sk.bind(str(src / "sock"))
    try:
        s = scan(src)
        put(dst, "d/pipe/old", b"a directory in the way")  # a FIFO replaces a directory
        plan = make_plan(s, scan(dst), delete=True, owners=True)
        apply_plan(plan, dst, local_fetch(src))
        got = scan(dst)
        assert got.same_tree(s, content=False, owners=True)
        assert stat.S_ISFIFO(os.lstat(dst / "d/pipe").st_mode)
        assert stat.S_ISSOCK(os.lstat(dst / "sock").st_mode)
        st = os.stat(dst / "tool")
        assert (st.st_uid, st.st_mode & 0o7777) == (1000, 0o4755)  # never root-owned setuid
        assert make_plan(s, got, delete=True, owners=True).is_noop()
    finally:
        sk.close()


def test_dir_mtime_correct_after_deletions_inside(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "d/keep", b"k")
    os.utime(src / "d", ns=(T0, T0))
    put(dst, "d/keep", b"k")
    put(dst, "d/junk", b"j")
    sync(src, dst, delete=True)
    assert os.stat(dst / "d").st_mtime_ns == T0


def test_low_level_pieces_as_mpisync_uses_them(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "a/b/f", b"0123456789" * 1000, 0o640, T0)
    os.symlink("b/f", src / "a" / "l")
    put(dst, "gone", b"g")
    plan = make_plan(scan(src), scan(dst), delete=True)
    with DestTree(dst) as tree:
        make_dirs(tree, plan)
        for a in plan.writes():
            with open(src / a.path, "rb") as fh:  # a file object is a valid chunk source
                assert write_file_atomic(tree, a.path, fh, a.mode, a.mtime_ns, size=a.size) == a.size
        make_symlinks(tree, plan)
        r = delete_extraneous(tree, plan)
        finalize(tree, plan, r)
    assert r.deleted == 1 and r.meta >= 2
    assert scan(dst).same_tree(scan(src), content=False)
    # Chunk iterables and plain bytes work too.
    write_file_atomic(dst, "a/b/g", iter([b"x", bytearray(b"y"), memoryview(b"z")]), 0o600, T0)
    assert (dst / "a" / "b" / "g").read_bytes() == b"xyz"


def test_delete_extraneous_is_noop_when_plan_disallows(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "a")
    put(dst, "extra")
    plan = make_plan(scan(src), scan(dst), delete=False)
    assert delete_extraneous(dst, plan).deleted == 0 and (dst / "extra").exists()


def test_missing_source_file_error_names_path(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "sub/f", b"x")
    plan = make_plan(scan(src), scan(tmp_path / "src"))  # noop, then a real one
    assert plan.is_noop()
    dst.mkdir()
    plan = make_plan(scan(src), scan(dst))
    os.unlink(src / "sub" / "f")
    with pytest.raises(InventoryError) as ei:
        apply_plan(plan, dst, local_fetch(src))
    assert ei.value.where == os.path.join(dst, "sub/f") and ei.value.hint
    assert no_temps(dst)


def test_device_nodes_on_a_target_are_replaced_or_deleted_like_files(tmp_path):
    import stat

    src, dst = tmp_path / "src", tmp_path / "dst"
    put(src, "f", b"file")
    (src / "d").mkdir()
    dst.mkdir()
    for name in ("f", "d", "extra"):
        os.mknod(dst / name, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    plan = make_plan(scan(src), scan(dst), delete=True)
    apply_plan(plan, dst, local_fetch(src))
    assert sorted(os.listdir(dst)) == ["d", "f"] and (dst / "f").read_bytes() == b"file"
    assert (dst / "d").is_dir()
