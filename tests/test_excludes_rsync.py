"""--exclude selects what real rsync selects: our scanner against `rsync -a --dry-run`, pattern by pattern.

One fixed tree with awkward names; for every rule list, the set of paths rsync would
transfer (its `%n` log of a dry run into an empty directory) must equal the set our scanner
keeps. The same matcher decides what --delete must leave on a target: that is checked
against the paths rsync's receiver refuses to delete. One rsync per rule list, run a few at
a time: about a second in all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from chiba_admin.errors import InventoryError
from inventory import DIR, ExcludeMatcher, read_exclude_from, scan

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")

LATIN = os.fsdecode(b"\xff\xfelatin")  # a name that is not UTF-8

FILES = [
    "build/out.o", "build/sub/x", "src/build", "src/a.c", "src/a.o", "src/keep.o", "src/Main.O",
    "src/deep/build/y.o", "x", "x2", "d/x", "d/x2", "d/e/x/inner", "-,x2", "+,x2", "- x2",
    "!bang", "#hash", ";semi", "Upper", "lower", "README", "readme.txt", ".hidden",
    ".git/config", ".git/objects/ab/cd", "d/.dot", "with space", "dir with space/file name",
    " leading", "trailing ", "logs/1/2.txt", "logs/keep.log", "d/logs", "cache/c.bin",
    "d/cache", "d/cache.d/z", "a*b", "a\\b", "[brackets]", "b", "café", LATIN,
    "a/b/c/d/e.txt", "foo.bak~", "aa/bb/cc", "foo/bar/foo/bar", "]close", "9lives", "X/Y",
]
LINKS = {"link": "build", "dlink": "d/x", "dangling": "/nowhere/at/all"}
DIRS = ["empty", "d/e/emptier"]

# One rule list per case, as --exclude arguments in order.
SINGLE = [
    # the issue's examples
    "**/x", "[[:upper:]]*", "- x2", "build/***", "*",
    # anchoring, directories only, final component against full path
    "*.o", "*.O", "build/", "build", "/build", "/build/", "/build/***", "x", "/x", "x/",
    "d/x", "/d/x", "d/*/x", "d/**/x", "**/x/", "**x", "*x*", "x*", "d/e/x/***", "**/x/***",
    # POSIX classes, negation, ranges
    "[[:lower:]]*", "[[:digit:]]*", "*[[:digit:]]", "[[:space:]]*", "*[[:space:]]",
    "[[:punct:]]*", "[![:alpha:]]*", "[^a-z]*", "[a-c]*", "[]x]*", "[!.]*", "[z-a]*",
    "[[:foo:]]*", "[", "[[:alpha:]", "*[!/]", "[a-]*", "[[:xdigit:]][[:alnum:]]*",
    # rule prefixes as --exclude takes them, and what it does not take
    "-,x2", "+,x2", "- d/x2", "+ x", "- - x2", "!bang", "#hash", ";semi", "!x",
    # stars
    "**", "***", "*/", "/*/", "/*", "?", "??????", "*~", "foo**", "*/b", "a*",
    # escapes: only with a wildcard
    "a\\*b", "a*b", "a\\b", "a\\\\b*", "\\[brackets\\]", "[brackets]", "x*\\", "\\x",
    # spaces, dots, bytes
    "with space", "* *", "dir with space/", " leading", "trailing ", "café", "caf?", "caf??",
    os.fsdecode(b"\xff*"), ".*", ".git/", "/.git/***", ".hidden",
    # paths with slashes and '**'
    "logs/**", "logs/**/", "/logs/*", "logs/*/", "a/**/e.txt", "a/**e.txt", "/a/*/c",
    "/a/*/c/", "b/c", "c/d/e.txt", "foo/bar", "/foo/bar", "foo/*/foo", "**/foo/bar/**",
    "bb/cc", "/aa/**", "X/", "X/Y",
    # kinds: links, empty dirs
    "cache/", "cache", "cache*", "*.d/", "link", "link/", "dangling", "empty/", "*empt*/",
    # degenerate
    "/", "//", "", "build//",
]
MULTI = [
    ["+ src/keep.o", "*.o"],
    ["*.o", "+ src/keep.o"],
    ["+ keep.o", "- *.o"],
    ["x2", "!"],
    ["x2", "!", "x"],
    ["+ build/", "build"],
    ["+ */", "+ *.c", "*"],
    ["- *.o", "+ build/***", "*"],
    ["+ d/", "+ d/x", "- d/*"],
    ["", "x", ""],
    ["+ [[:upper:]]*", "*"],
    ["+ **/x", "x*"],
]
CASES = [[p] for p in SINGLE] + MULTI


def make_tree(root):
    for rel in FILES:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(rel.encode("utf-8", "surrogateescape"))
    for rel in DIRS:
        os.makedirs(os.path.join(root, rel), exist_ok=True)
    for name, target in LINKS.items():
        os.symlink(target, os.path.join(root, name))
    os.mkfifo(os.path.join(root, "fifo"))


def _names(out: bytes, prefix: bytes = b"") -> set[bytes]:
    """Paths from rsync's log lines (bytes, trailing '/' of a directory removed)."""
    names = set()
    for line in out.split(b"\n"):
        if not line or not line.startswith(prefix):
            continue
        name = re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line[len(prefix):])
        if name != b"./":
            names.add(name[:-1] if name.endswith(b"/") else name)
    return names


def _rsync(*args) -> subprocess.CompletedProcess:
    # pin the locale: rsync's [[:class:]] follow LC_CTYPE, ours are the C/UTF-8 ASCII sets
    return subprocess.run(["rsync", "-a", "-8", "--dry-run", *args], capture_output=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C.UTF-8"})


def rsync_selects(src, rules, exclude_from=None) -> set[bytes]:
    args = [a for r in rules for a in ("--exclude", r)]
    if exclude_from:
        args += ["--exclude-from", str(exclude_from)]
    p = _rsync("--out-format=%n", *args, f"{src}/", f"{src}.nowhere/")
    assert p.returncode == 0, p.stderr
    return _names(p.stdout)


def ours_selects(src, rules) -> set[bytes]:
    inv = scan(src, excludes=rules)
    return {os.fsencode(p) for p in list(inv.entries) + [i.path for i in inv.skipped]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("excl") / "src"
    root.mkdir()
    make_tree(root)
    return root


@pytest.fixture(scope="module")
def rsync_answers(tree):
    """rsync's selection for every case, computed together (a few rsyncs at a time)."""
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(map(repr, CASES), pool.map(lambda c: rsync_selects(tree, c), CASES)))


def test_tree_is_whole(tree, rsync_answers):
    # the baseline: with no rules both see every entry, so a difference below is the rules'
    everything = ours_selects(tree, [])
    assert everything == rsync_selects(tree, [])
    paths = FILES + DIRS + list(LINKS) + ["fifo"]
    assert everything == {os.fsencode(q) for p in paths for q in _self_and_parents(p)}
    assert len(CASES) >= 60


@pytest.mark.parametrize("rules", CASES, ids=[" ".join(map(repr, c)) for c in CASES])
def test_selection_matches_rsync(tree, rsync_answers, rules):
    want = rsync_answers[repr(rules)]
    got = ours_selects(tree, rules)
    assert sorted(got - want) == [] and sorted(want - got) == [], "kept by us only / by rsync only"


def test_issue_examples_select_what_rsync_selects(tree, rsync_answers):
    # the measured mismatches: each now agrees, and each really selects something
    sel = {p: ours_selects(tree, [p]) for p in ("**/x", "[[:upper:]]*", "- x2", "build/***", "*")}
    assert b"x" not in sel["**/x"] and b"d/x" not in sel["**/x"] and b"x2" in sel["**/x"]
    assert b"Upper" not in sel["[[:upper:]]*"] and b"lower" in sel["[[:upper:]]*"]
    assert b"x2" not in sel["- x2"] and b"- x2" in sel["- x2"]
    assert b"src/build" in sel["build/***"] and b"build" not in sel["build/***"]
    assert sel["*"] == set()
    for p, got in sel.items():
        assert got == rsync_answers[repr([p])]


def test_exclude_from_file_matches_rsync(tree, tmp_path):
    rules = tmp_path / "rules"
    rules.write_bytes(b"# comment\r\n; another\n\n*.o\r\n+ keep.o\n- x2\rtrailing \n"
                      b"  spaced.tmp  \n!bang\n/cache/\n+ d/\n+ d/x\n- d/*\n")
    read = read_exclude_from(rules)
    assert read == ["*.o", "+ keep.o", "- x2", "trailing ", "  spaced.tmp  ", "!bang",
                    "/cache/", "+ d/", "+ d/x", "- d/*"]
    assert ours_selects(tree, read) == rsync_selects(tree, [], exclude_from=rules)
    # --exclude rules come first, then the file's, for both
    assert ours_selects(tree, ["+ src/keep.o", *read]) == \
        rsync_selects(tree, ["+ src/keep.o"], exclude_from=rules)


def test_unreadable_exclude_from_is_refused(tmp_path):
    with pytest.raises(InventoryError, match="cannot read exclude file") as ei:
        read_exclude_from(tmp_path / "missing")
    assert ei.value.where.endswith("missing")


@pytest.mark.parametrize("rule", ["- ", "+ "])
def test_rule_without_pattern_is_an_error_for_both(tree, rule):
    assert _rsync("--exclude", rule, f"{tree}/", f"{tree}.nowhere/").returncode == 1
    with pytest.raises(InventoryError, match="no pattern"):
        ExcludeMatcher([rule])


@pytest.mark.parametrize("rules", [["*.o"], ["x", "d/"], ["**/x/***"], ["+ x", "[a-x]*"],
                                   ["*"], ["build/"], ["/d/e/"]],
                         ids=repr)
def test_delete_protects_what_rsync_protects(tree, tmp_path, rules):
    """Target side: a real rsync --delete (its dry run lists directories it then keeps)
    removes exactly the target paths the rules do not protect; a path is protected if
    it or a parent is excluded, and a directory is kept while it holds something."""
    src, dst = tmp_path / "only", tmp_path / "target"
    src.mkdir()
    (src / "zz-source-only").write_bytes(b"s")
    subprocess.run(["cp", "-a", "--", f"{tree}", f"{dst}"], check=True)
    matcher = ExcludeMatcher(rules)
    target = scan(dst)
    kinds = {e.path: e.kind == DIR for e in target.entries.values()}
    kinds.update({i.path: False for i in target.skipped})
    args = [a for r in rules for a in ("--exclude", r)]
    p = subprocess.run(["rsync", "-a", "--delete", *args, f"{src}/", f"{dst}/"],
                       capture_output=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert p.returncode == 0, p.stderr
    left = scan(dst)
    rsync_deletes = {os.fsencode(q) for q in kinds
                     if q not in left.entries and q not in {i.path for i in left.skipped}}
    protected = {path for path in kinds
                 if any(matcher.excluded(anc, kinds[anc]) for anc in _self_and_parents(path))}
    for path in protected.copy():
        protected.update(_parents(path))
    ours = {os.fsencode(q) for q in kinds if q not in protected}
    assert ours == rsync_deletes
    assert ours or rules == ["*"]  # something is really deleted, unless all is protected


def _parents(path):
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _self_and_parents(path):
    return _parents(path) + [path]


# --- through the CLI, both methods, on the embedded cluster ---------------------------------

RULES_ARGS = ["+ src/keep.o", "*.o", "- x2", "build/***", "[#;!]*"]
RULES_FILE = b"# kept out by both methods\n;\n[[:upper:]]*\r\n**/x\n+ d/\n- d/cache*\n"


def _tree_paths(root) -> set[bytes]:
    inv = scan(root)
    return {os.fsencode(p) for p in inv.entries}


def _cli_rules(tmp_path):
    rules_file = tmp_path / "rules"
    rules_file.write_bytes(RULES_FILE)
    args = [a for r in RULES_ARGS for a in ("--exclude", r)] + ["--exclude-from", str(rules_file)]
    return args, rules_file


@pytest.mark.mpi
def test_both_methods_sync_rsyncs_selection(embedded, cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    os.remove(src / "fifo")  # special files are the contract test's; here: names only
    # the old hidden ignore file is data now: synced, and its rules apply nowhere
    (src / ".chiba-ignore").write_bytes(b"+ keep\n*\n")
    args, rules_file = _cli_rules(tmp_path)
    want = rsync_selects(src, RULES_ARGS, exclude_from=rules_file)
    assert b".chiba-ignore" in want and b"src/keep.o" in want and b"src/a.o" not in want
    got = {}
    for method in ("mpi", "rsync"):
        r = cli("sync-mayors", "--method", method, str(src), "--targets", "mayor1",
                "--dest", method, *args)
        assert r.code == 0, (method, r.out, r.err)
        h = embedded.host("mayor1")
        got[method] = _tree_paths(h.local_path(h.resolve("repository", method)))
    assert got["mpi"] == want
    assert got["rsync"] == want


@pytest.mark.mpi
def test_delete_keeps_excluded_target_files_both_methods(embedded, cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.c").write_bytes(b"c")
    args = ["--exclude", "+ keep.o", "--exclude", "*.o", "--exclude", "/cache/"]
    for method in ("mpi", "rsync"):
        h = embedded.host("mayor1")
        dest = h.local_path(h.resolve("repository", method))
        for rel in ("junk.o", "cache/blob", "gone.txt", "sub/keep.o", "sub/cache"):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            with open(os.path.join(dest, rel), "wb") as fh:
                fh.write(b"target only")
        r = cli("sync-mayors", "--method", method, str(src), "--targets", "mayor1",
                "--dest", method, "--delete", *args)
        assert r.code == 0, (method, r.out, r.err)
        # excluded paths stay (junk.o, the top cache/ and its content); an included
        # keep.o, a file named cache and the emptied sub/ go, as with real rsync
        assert _tree_paths(dest) == {b"a.c", b"junk.o", b"cache", b"cache/blob"}, method


@pytest.mark.parametrize("method", ["mpi", "rsync"])
@pytest.mark.parametrize("bad,why", [(["--exclude", "- "], "bad --exclude: exclude rule has no pattern"),
                                     (["--exclude-from", "/nonexistent/rules"], "cannot read exclude file"),
                                     (["--exclude-from", "-"], "standard input")])
def test_bad_rules_refused_before_anything_both_methods(embedded, cli, tmp_path, method, bad, why):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    r = cli("sync-mayors", "--method", method, str(src), "--targets", "mayor1", "--dest", "new",
            *bad)
    assert r.code == 2 and why in r.err, r.err
    h = embedded.host("mayor1")
    assert not os.path.lexists(h.local_path(h.resolve("repository", "new")))


def test_bad_line_in_exclude_from_is_named(tmp_path, monkeypatch):
    from chiba_admin.commands.sync import exclude_rules
    from chiba_admin.errors import InvalidRequest

    (tmp_path / "rules").write_bytes(b"*.o\n+ \n")
    with pytest.raises(InvalidRequest, match="no pattern") as ei:
        exclude_rules((), (str(tmp_path / "rules"),))
    assert ei.value.where.startswith(str(tmp_path / "rules"))
    (tmp_path / "rules").write_bytes(b"*.o\n# c\n+ keep.o\n")
    monkeypatch.chdir(tmp_path)  # a relative file is made absolute for rsync
    assert exclude_rules(("a",), ("rules",)) == (["a", "*.o", "+ keep.o"], (str(tmp_path / "rules"),))
