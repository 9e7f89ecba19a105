"""Inventory scanning: entry kinds, excludes, links, special files, errors, hashing."""

from __future__ import annotations

import os
import socket
import stat

import pytest

import inventory as inv_mod
from chiba_admin.errors import InvalidRequest, InventoryError
from inventory import (DIR, FILE, LINK, ExcludeMatcher, check_source, decode_inventory,
                       encode_inventory, hash_bytes, hash_file, hash_files, scan)
from inventory.entries import FIFO, SOCK

ODD = ["with space", "it's", 'dq"uote', "new\nline", "$(touch pwned)", "tab\there",
       os.fsdecode(b"latin1-\xe9\xff"), "ünïcødé", "-rf", "back\\slash", "*star?"]


def put(root, rel: str, data: bytes = b"x", mode: int | None = None, mtime_ns: int | None = None):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_scan_records_kinds_sizes_modes_mtimes(tmp_path):
    put(tmp_path, "d/f.txt", b"hello", 0o640, 1_600_000_000_123_456_789)
    os.symlink("d/f.txt", tmp_path / "ln")
    os.mkdir(tmp_path / "empty", 0o750)
    os.chmod(tmp_path / "empty", 0o750)
    inv = scan(tmp_path)
    assert list(inv.entries) == ["d", "d/f.txt", "empty", "ln"]
    f = inv["d/f.txt"]
    assert (f.kind, f.size, f.mode, f.mtime_ns, f.digest) == (FILE, 5, 0o640, 1_600_000_000_123_456_789, None)
    assert inv["empty"].kind == DIR and inv["empty"].mode == 0o750 and inv["empty"].size == 0
    ln = inv["ln"]
    assert ln.kind == LINK and ln.target == "d/f.txt"
    assert inv.counts() == {"files": 1, "dirs": 2, "links": 1, "specials": 0, "errors": 0,
                            "skipped": 0}
    assert inv.root == str(tmp_path) and inv.algo is None


def test_symlinks_are_recorded_not_followed(tmp_path):
    outside = tmp_path / "outside"
    put(outside, "secret", b"s")
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink(outside, tree / "dirlink")
    os.symlink("nowhere", tree / "dangling")
    inv = scan(tree, checksum=True)
    assert set(inv.entries) == {"dirlink", "dangling"}
    assert inv["dirlink"].target == str(outside) and inv["dirlink"].digest is None
    assert inv["dangling"].kind == LINK


def test_odd_names_round_trip_exactly(tmp_path):
    for name in ODD:
        put(tmp_path, name, name.encode("utf-8", "surrogateescape"))
    inv = scan(tmp_path)
    assert sorted(inv.entries) == sorted(ODD)
    for name in ODD:
        assert os.path.exists(os.path.join(tmp_path, inv[name].path))
    assert os.fsencode(os.fsdecode(b"latin1-\xe9\xff")) in os.listdir(os.fsencode(tmp_path))


def test_fifos_and_sockets_are_entries_devices_skipped_owners_kept(tmp_path):
    put(tmp_path, "ok", b"1")
    os.chown(tmp_path / "ok", 1234, 567)
    os.mkfifo(tmp_path / "pipe", 0o640)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sock"))
        os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        inv = scan(tmp_path)
    finally:
        s.close()
    assert {p: e.kind for p, e in inv.entries.items()} == {"ok": FILE, "pipe": FIFO, "sock": SOCK}
    assert inv["pipe"].mode == 0o640
    assert (inv["ok"].uid, inv["ok"].gid) == (1234, 567)
    assert {i.path: i.message for i in inv.skipped} == {"null": "character device skipped"}
    assert not inv.errors
    with pytest.raises(InvalidRequest, match="character device") as ei:
        check_source(inv, delete=False)
    assert ei.value.where == "null"
    back = decode_inventory(encode_inventory(inv))
    assert back.same_tree(inv, owners=True) and back["pipe"].kind == FIFO


def test_excluded_members_mark_their_directory_hidden(tmp_path):
    put(tmp_path, "d/sub/x.o")
    put(tmp_path, "d/y")
    put(tmp_path, "top.o")
    inv = scan(tmp_path, excludes=["*.o"])
    assert sorted(inv.entries) == ["d", "d/sub", "d/y"]
    assert inv.hidden == {"", "d/sub"}


def test_missing_root_raises_and_file_root_raises(tmp_path):
    with pytest.raises(InventoryError, match="does not exist") as ei:
        scan(tmp_path / "nope")
    assert ei.value.where == str(tmp_path / "nope") and ei.value.hint
    put(tmp_path, "file")
    with pytest.raises(InventoryError, match="not a directory"):
        scan(tmp_path / "file")


def test_unreadable_directory_is_a_scan_error_not_an_exception(tmp_path, monkeypatch):
    put(tmp_path, "good/a")
    put(tmp_path, "locked/b")
    real = os.open
    locked = str(tmp_path / "locked")

    def fake_open(path, flags, *args, **kw):
        if os.fsdecode(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real(path, flags, *args, **kw)

    monkeypatch.setattr("inventory.scanner.os.open", fake_open)
    inv = scan(tmp_path)
    assert "good/a" in inv and "locked" in inv and "locked/b" not in inv
    assert [(e.path, e.message) for e in inv.errors] == [("locked", "cannot read directory: Permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 directories")
def test_unreadable_directory_real_permissions(tmp_path):
    put(tmp_path, "locked/b")
    os.chmod(tmp_path / "locked", 0)
    try:
        inv = scan(tmp_path)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert [e.path for e in inv.errors] == ["locked"]


@pytest.mark.parametrize("pattern,path,is_dir,hit", [
    ("*.o", "a.o", False, True),
    ("*.o", "deep/er/a.o", False, True),
    ("*.o", "a.oo", False, False),
    ("*.o", "x.o/inner", False, False),
    ("build/", "build", True, True),
    ("build/", "src/build", True, True),
    ("build/", "build", False, False),
    ("/top", "top", False, True),
    ("/top", "sub/top", False, False),
    ("/top/", "top", True, True),
    ("sub/x", "sub/x", False, True),
    ("sub/x", "a/sub/x", False, True),
    ("sub/x", "asub/x", False, False),
    ("/a/*/c", "a/b/c", False, True),
    ("/a/*/c", "a/b/d/c", False, False),
    ("/a/**/c", "a/b/d/c", False, True),
    ("**/cache", "x/y/cache", True, True),
    ("/logs/***", "logs", True, True),
    ("/logs/***", "logs/1/2.txt", False, True),
    ("?.tmp", "a.tmp", False, True),
    ("?.tmp", "ab.tmp", False, False),
    ("[ab].c", "b.c", False, True),
    ("[!ab].c", "b.c", False, False),
    ("[!ab].c", "z.c", False, True),
    ("with space", "d/with space", False, True),
    ("lit\\*", "lit*", False, True),
    ("lit\\*", "litx", False, False),
    ("lit\\x", "lit\\x", False, True),  # no wildcard: the backslash is a character
    # the measured mismatches with rsync (issue 14)
    ("**/x", "x", False, True),
    ("[[:upper:]]*", "Upper", False, True),
    ("[[:upper:]]*", "upper", False, False),
    ("- x2", "x2", False, True),
    ("-,x2", "-,x2", False, True),
    ("build/***", "build", False, False),
    ("build/***", "build", True, True),
    ("build/***", "a/build/f", False, True),
    ("*", "x", False, True),
    # bytes, not characters; a '/' in a class still counts as a component
    ("caf?", "caf\u00e9", False, False),
    ("caf??", "caf\u00e9", False, True),
    ("*[!/]", "x", False, False),
])
def test_exclude_pattern_semantics(pattern, path, is_dir, hit):
    assert ExcludeMatcher([pattern]).excluded(path, is_dir) is hit


def test_empty_and_degenerate_rules_as_rsync():
    # rsync adds no rule for '', and '/' or '//' match nothing; '- ' alone is its syntax error
    assert not ExcludeMatcher([]) and not ExcludeMatcher([""])
    assert not ExcludeMatcher(["/"]).excluded("x", False)
    assert not ExcludeMatcher(["//"]).excluded("x", True)
    with pytest.raises(InventoryError, match="no pattern"):
        ExcludeMatcher(["- "])
    with pytest.raises(InventoryError, match="too long"):
        ExcludeMatcher(["x" * 4096])


def test_first_matching_rule_decides_and_bang_clears():
    m = ExcludeMatcher(["+ keep.o", "*.o"])
    assert not m.excluded("d/keep.o", False) and m.excluded("d/other.o", False)
    assert ExcludeMatcher(["*.o", "+ keep.o"]).excluded("keep.o", False)
    assert not ExcludeMatcher(["*.o", "!"]).excluded("a.o", False)
    assert ExcludeMatcher(["*.o", "!", "x"]).excluded("x", False)


def test_scan_excludes_prune_directories(tmp_path):
    put(tmp_path, "src/a.c")
    put(tmp_path, "src/a.o")
    put(tmp_path, "build/out.bin")
    put(tmp_path, "src/build")  # a *file* named build is not matched by 'build/'
    put(tmp_path, "top")
    put(tmp_path, "src/top")
    inv = scan(tmp_path, excludes=["*.o", "build/", "/top"])
    assert sorted(inv.entries) == ["src", "src/a.c", "src/build", "src/top"]


def test_chiba_ignore_is_an_ordinary_file(tmp_path):
    # no hidden per-directory rules: the old .chiba-ignore is data like any other file,
    # even one whose '+ ' line used to abort the scan
    (tmp_path / ".chiba-ignore").write_text("*.log\n- /cache/\n+ keep\n")
    put(tmp_path, "a.log")
    put(tmp_path, "cache/x")
    inv = scan(tmp_path)
    assert sorted(inv.entries) == [".chiba-ignore", "a.log", "cache", "cache/x"]
    assert not hasattr(inv_mod, "IGNORE_FILE")


@pytest.mark.parametrize("algo", ["blake3", "xxh3_128"])
def test_checksum_scan_hashes_files(tmp_path, algo):
    put(tmp_path, "a", b"alpha")
    put(tmp_path, "d/b", b"")
    inv = scan(tmp_path, checksum=True, algo=algo)
    assert inv.algo == algo
    assert inv["a"].digest == hash_bytes(b"alpha", algo)
    assert inv["d/b"].digest == hash_bytes(b"", algo)
    assert inv["d"].digest is None


def test_hash_file_streaming_and_mmap_paths_agree(tmp_path):
    data = os.urandom(1 << 20) * 20 + b"tail"  # > mmap threshold
    big = put(tmp_path, "big", data)
    small = put(tmp_path, "small", data[: (3 << 20) + 7])  # several 1 MiB blocks, streamed
    for algo in inv_mod.ALGOS:
        assert hash_file(big, algo) == hash_bytes(data, algo)
        assert hash_file(big, algo, threads=1) == hash_bytes(data, algo)
        assert hash_file(small, algo, block_size=1 << 16) == hash_bytes(data[: (3 << 20) + 7], algo)


def test_hash_file_refuses_symlink_and_hash_files_reports_errors(tmp_path):
    put(tmp_path, "real", b"r")
    os.symlink("real", tmp_path / "link")
    with pytest.raises(OSError):
        hash_file(tmp_path / "link")
    names = [f"f{i}" for i in range(100)]
    for n in names:
        put(tmp_path, n, n.encode())
    res = hash_files(tmp_path, names + ["missing"], threads=4)
    assert res[:100] == [hash_bytes(n.encode()) for n in names]
    assert isinstance(res[100], FileNotFoundError)


def test_unknown_algorithm_rejected(tmp_path):
    with pytest.raises(InventoryError, match="unknown hash"):
        scan(tmp_path, checksum=True, algo="md5")


def test_vanished_file_during_hash_becomes_error(tmp_path, monkeypatch):
    put(tmp_path, "a", b"1")
    put(tmp_path, "b", b"2")
    import inventory.scanner as scan_mod
    real = scan_mod.hash_files

    def racing(root, rels, algo, threads=None):
        os.unlink(os.path.join(root, "b"))
        return real(root, rels, algo, threads=threads)

    monkeypatch.setattr(scan_mod, "hash_files", racing)
    inv = scan(tmp_path, checksum=True)
    assert list(inv.entries) == ["a"] and inv.errors[0].path == "b"


def test_missing_ok_gives_empty_inventory_for_new_targets(tmp_path):
    inv = scan(tmp_path / "not-yet", missing_ok=True, checksum=True)
    assert len(inv) == 0 and inv.algo == "blake3" and not inv.errors
