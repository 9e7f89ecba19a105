"""Diffs and plans: action order, type changes, delete safety, checksum vs quick, itemize, JSON."""

from __future__ import annotations

import json

import pytest

from chiba_admin.errors import InvalidRequest, InventoryError
from inventory import (DELETE, DIR, FILE, LINK, META, MKDIR, SYMLINK, WRITE, Entry, Inventory,
                       Issue, Plan, check_source, format_plan, make_plan, needs)
from inventory.entries import FIFO, SOCK
from inventory.plan import CLEAR, MKNOD

T0 = 1_700_000_000_000_000_000


def F(path, size=1, mode=0o644, mtime=T0, digest=None):
    return Entry(path, FILE, size, mode, mtime, None, digest)


def D(path, mode=0o755, mtime=T0):
    return Entry(path, DIR, 0, mode, mtime)


def L(path, target, mtime=T0):
    return Entry(path, LINK, len(target), 0o777, mtime, target)


def inv(*entries, errors=(), algo=None):
    return Inventory.from_entries(entries, errors=list(errors), algo=algo)


def ops(plan):
    return [(a.op, a.path) for a in plan.actions]


def test_identical_trees_give_empty_plan():
    a = inv(D("d"), F("d/f"), L("l", "d/f"))
    p = make_plan(a, a, delete=True)
    assert p.is_noop() and p.delete
    assert p.summary()["bytes"] == 0


def test_full_order_of_a_sync():
    src = inv(D("a"), D("a/b"), F("a/b/new", 10), F("a/changed", 5), F("a/same", mode=0o600),
              L("a/ln", "b/new"), D("z", mode=0o700))
    dst = inv(D("a"), F("a/changed", 4), F("a/same", mode=0o644), D("gone"), D("gone/deep"),
              F("gone/deep/x"), F("extra"), D("z"))
    p = make_plan(src, dst, delete=True)
    assert ops(p) == [
        (MKDIR, "a/b"),
        (WRITE, "a/b/new"), (WRITE, "a/changed"),
        (SYMLINK, "a/ln"),
        (META, "a/same"),
        (DELETE, "gone/deep/x"), (DELETE, "gone/deep"), (DELETE, "extra"), (DELETE, "gone"),
        (META, "a/b"), (META, "a"), (META, "z"),
    ]
    s = p.summary()
    assert (s[WRITE], s[MKDIR], s[SYMLINK], s[DELETE], s["bytes"]) == (2, 1, 1, 4, 15)
    changed = p.actions[2]
    assert changed.changes == "s" and p.actions[4].changes == "p"


def test_deletes_are_deepest_first_and_parents_follow_children():
    dst = inv(D("a"), D("a/b"), D("a/b/c"), F("a/b/c/f"), F("a/g"), F("keep"))
    p = make_plan(inv(F("keep")), dst, delete=True)
    dels = [a.path for a in p.by_op(DELETE)]
    assert dels == ["a/b/c/f", "a/b/c", "a/b", "a/g", "a"]
    seen = set()
    for path in dels:
        assert not any(s.startswith(path + "/") for s in set(a.path for a in p.by_op(DELETE)) - seen)
        seen.add(path)


def test_no_deletes_unless_asked():
    p = make_plan(inv(F("a")), inv(F("a"), F("b")))
    assert p.is_noop() and not p.delete
    assert "[deletions off]" in format_plan(p)


def test_type_changes():
    src = inv(D("was_file"), F("was_file/in"), F("was_dir"), L("was_file2", "x"), F("was_link"))
    dst = inv(F("was_file"), D("was_dir"), F("was_dir/child"), F("was_file2"), L("was_link", "t"))
    p = make_plan(src, dst, delete=True)
    by = {(a.op, a.path): a for a in p.actions}
    assert by[(MKDIR, "was_file")].replace and by[(MKDIR, "was_file")].changes == "T"
    assert by[(WRITE, "was_dir")].replace
    assert by[(SYMLINK, "was_file2")].replace
    assert by[(WRITE, "was_link")].replace
    # The replaced directory's members go with it: no separate deletes for them.
    assert (DELETE, "was_dir/child") not in by


def test_replacing_a_directory_needs_delete():
    src = inv(F("x"), F("y"))
    dst = inv(D("x"), F("x/precious"))
    p = make_plan(src, dst)
    assert ops(p) == [(WRITE, "y")]
    assert p.conflicts == ["x: could not make way for new regular file (it is not empty;"
                           " needs --delete)"]
    assert "not in sync: x: could not make way" in format_plan(p)


def test_an_empty_directory_is_replaced_without_delete_as_rsync_does():
    p = make_plan(inv(L("x", "t")), inv(D("x")))
    assert [(a.op, a.path, a.replace) for a in p.actions] == [(SYMLINK, "x", True)]
    assert not p.conflicts


def test_replacing_a_directory_clears_its_members_first_and_the_dry_run_lists_them():
    src = inv(D("a"), F("x", 5), F("a/new"))
    dst = inv(D("a"), D("x"), D("x/sub"), F("x/sub/f"), F("x/g"))
    p = make_plan(src, dst, delete=True)
    assert ops(p)[:3] == [(CLEAR, "x/sub/f"), (CLEAR, "x/g"), (CLEAR, "x/sub")]
    assert (WRITE, "x") in ops(p) and p.by_op(WRITE)[-1].replace
    assert not p.conflicts and p.summary()[DELETE] == 3
    text = format_plan(p)
    assert "*deleting   x/sub/f" in text and "3 deletion(s)" in text


def test_excluded_members_keep_a_replaced_directory_and_make_a_conflict():
    src = inv(F("x"), F("y"))
    dst = Inventory.from_entries([D("x"), D("x/sub"), F("x/sub/a"), F("x/b")])
    dst.hidden = {"x/sub"}  # x/sub holds an excluded file rsync protects
    p = make_plan(src, dst, delete=True)
    assert ops(p) == [(CLEAR, "x/sub/a"), (CLEAR, "x/b"), (WRITE, "y")]
    assert p.conflicts and p.conflicts[0].startswith("x: could not make way")
    assert "excluded" in p.conflicts[0]
    # a plain deletion keeps such a directory silently, as rsync does (exit 0)
    dst2 = Inventory.from_entries([D("y"), F("y/z")])
    dst2.hidden = {"y"}
    p2 = make_plan(inv(F("s")), dst2, delete=True)
    assert ops(p2) == [(WRITE, "s"), (DELETE, "y/z")] and not p2.conflicts


def test_fifos_sockets_and_owners():
    fifo = Entry("p", FIFO, 0, 0o640, T0, None, None, 1000, 1000)
    sock = Entry("s", SOCK, 0, 0o755, T0)
    own = Entry("f", FILE, 1, 0o4755, T0, None, None, 1000, 100)
    src = inv(fifo, sock, own)
    dst = inv(Entry("f", FILE, 1, 0o4755, T0, None, None, 0, 0), F("p"))
    p = make_plan(src, dst, owners=True)
    assert [(a.op, a.path, a.changes) for a in p.actions] == [
        (MKNOD, "p", "T"), (MKNOD, "s", "+"), (META, "f", "og")]
    assert (p.actions[2].uid, p.actions[2].gid) == (1000, 100)
    assert ".f....og... f" in format_plan(p)
    assert make_plan(src, dst).by_op(META) == []  # owners are compared only when kept


def test_empty_source_refused():
    with pytest.raises(InvalidRequest, match="empty") as ei:  # bad input: exit 2
        make_plan(inv(), inv(F("a")), delete=True)
    assert "delete everything" in ei.value.hint
    with pytest.raises(InvalidRequest):
        check_source(Inventory(root="/srv/repo"))
    # without --delete an empty source is accepted, as rsync accepts it
    assert make_plan(inv(), inv(F("a"))).is_noop()
    check_source(Inventory(root="/srv/repo"), delete=False)
    p = make_plan(inv(), inv(F("a")), delete=True, allow_empty=True)
    assert ops(p) == [(DELETE, "a")]


def test_unreadable_source_refused_with_reason():
    bad = Inventory(errors=[Issue("", "cannot read directory: Permission denied")], root="/srv")
    with pytest.raises(InventoryError, match="could not be read"):
        check_source(bad)


def test_source_scan_errors_disable_deletes():
    src = inv(F("a"), D("locked"), errors=[Issue("locked", "cannot read directory: Permission denied")])
    dst = inv(F("a"), D("locked"), F("locked/data"), F("b"))
    p = make_plan(src, dst, delete=True)
    assert not p.delete and not p.by_op(DELETE)
    assert p.warnings and "deletions disabled" in p.warnings[0] and "locked" in p.warnings[0]
    # Also a dir -> file replacement is a deletion, so it is off too.
    src2 = inv(F("x"), errors=[Issue("q", "cannot read directory: x")])
    assert make_plan(src2, inv(D("x"), F("x/y")), delete=True).is_noop()


def test_quick_vs_checksum_mode():
    h1, h2 = b"1" * 32, b"2" * 32
    src = inv(F("same_meta_diff_content", 3, digest=h1), F("touched", 3, mtime=T0 + 5, digest=h1),
              algo="blake3")
    dst = inv(F("same_meta_diff_content", 3, digest=h2), F("touched", 3, digest=h1), algo="blake3")
    quick = make_plan(src, dst)
    assert ops(quick) == [(WRITE, "touched")]
    assert quick.actions[0].changes == "t"
    summed = make_plan(src, dst, checksum=True)
    assert ops(summed) == [(WRITE, "same_meta_diff_content"), (META, "touched")]
    assert summed.actions[0].changes == "c" and summed.algo == "blake3"
    assert needs(src, dst) == ["touched"]
    assert needs(src, dst, checksum=True) == ["same_meta_diff_content"]


def test_checksum_mode_requires_digests():
    with pytest.raises(InventoryError, match="checksum"):
        make_plan(inv(F("a")), inv(F("a")), checksum=True)
    with pytest.raises(InventoryError, match="same algorithm"):
        make_plan(inv(F("a"), algo="blake3"), inv(F("a"), algo="xxh3_128"), checksum=True)


def test_modify_window():
    src, dst = inv(F("a", mtime=T0 + 999)), inv(F("a", mtime=T0))
    assert ops(make_plan(src, dst)) == [(WRITE, "a")]
    assert make_plan(src, dst, modify_window_ns=1000).is_noop()


def test_symlink_changes_and_link_mtime_only():
    src = inv(L("a", "new"), L("b", "same", mtime=T0 + 1))
    dst = inv(L("a", "old"), L("b", "same"))
    p = make_plan(src, dst)
    assert ops(p) == [(SYMLINK, "a"), (META, "b")]


def test_directory_mtimes_refreshed_where_contents_change():
    src = inv(D("d"), D("d/e"), F("d/e/f", 2), D("quiet"), F("quiet/q"))
    dst = inv(D("d"), D("d/e"), F("d/e/f", 1), D("quiet"), F("quiet/q"), F("quiet/extra"))
    p = make_plan(src, dst, delete=True)
    assert ops(p) == [(WRITE, "d/e/f"), (DELETE, "quiet/extra"), (META, "d/e"), (META, "quiet")]


def test_needs_lists_files_only_in_source_order():
    src = inv(D("d"), F("d/a"), F("d/b", 2), L("l", "d/a"), F("z"))
    dst = inv(D("d"), F("d/a"), D("z"))
    assert needs(src, dst) == ["d/b", "z"]


def test_format_plan_itemizes_and_escapes():
    src = inv(D("d"), F("d/new\nline", 3), F("chg", 2), L("ln", "t\tab"), F("perm", mode=0o600),
              F("x"))
    dst = inv(F("chg", 1), F("perm"), F("old"), D("x"))
    text = format_plan(make_plan(src, dst, delete=True))
    lines = text.splitlines()
    assert "cd+++++++++ d/" in lines
    assert ">f+++++++++ d/new\\#012line" in lines
    assert ">f.s........ chg" not in lines and ">f.s....... chg" in lines
    assert "cL+++++++++ ln -> t\\#011ab" in lines
    assert ".f...p..... perm" in lines
    assert "*deleting   old" in lines
    assert ">f+++++++++ x" in lines  # as rsync lists it, after the deletions
    assert lines[-1].startswith("3 file(s) to write (6 bytes)")
    assert all("\n" not in line for line in lines)


def test_plan_json_round_trip_with_odd_names():
    odd = "bad-\udcff-byte $(x) \"q\" 'q'\n"
    src = inv(D(odd), F(odd + "/f", digest=b"\x01" * 32), L("l", odd), algo="blake3")
    p = make_plan(src, inv(), checksum=False)
    text = p.to_json()
    text.encode("ascii")  # transportable anywhere
    back = Plan.from_json(text)
    assert back == p and back.actions[1].path == odd + "/f"
    assert back.actions[1].digest == b"\x01" * 32 and back.algo == "blake3"
    assert json.loads(text)["summary"]["write"] == 1


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(version=99), "unsupported plan"),
    (lambda d: d["actions"][0].update(path="/etc/passwd"), "absolute"),
    (lambda d: d["actions"][0].update(path="a/../../x"), "'..'"),
    (lambda d: d["actions"][0].update(path="a//b"), "empty path component"),
    (lambda d: d["actions"][0].update(op="chown"), "malformed"),
    (lambda d: d["actions"][0].pop("path"), "malformed"),
    (lambda d: d.update(algo="md5"), "unknown hash"),
])
def test_plan_from_dict_rejects_hostile(mutate, msg):
    d = make_plan(inv(F("a")), inv()).to_dict()
    mutate(d)
    with pytest.raises(InventoryError, match=msg):
        Plan.from_dict(d)
    with pytest.raises(InventoryError, match="not valid JSON"):
        Plan.from_json("{nope")


def _large_pair():
    src = inv(*(F(f"d{i // 1000}/f{i}", i) for i in range(50_000)),
              *(D(f"d{j}") for j in range(50)))
    dst = inv(*(F(f"d{i // 1000}/f{i}", i + (i % 10 == 0)) for i in range(50_000)),
              *(D(f"d{j}") for j in range(50)))
    return src, dst


def test_diff_of_large_inventories():
    p = make_plan(*_large_pair(), delete=True)
    assert len(p.writes()) == 5000


@pytest.mark.perf
def test_diff_of_large_inventories_is_fast():
    """50 000 entries planned in under 2 s (a wall-clock bound: perf, not `make test`)."""
    import time

    src, dst = _large_pair()
    t = time.perf_counter()
    make_plan(src, dst, delete=True)
    assert time.perf_counter() - t < 2.0
