"""`sync-mayors --dry-run` (issue 14, sections 1 and 3): it writes nothing anywhere, and it
lists exactly the changes the real run then makes, for both methods.

The itemised list is part of the ``--json`` result: per target, ``hosts[HOST]["changes"]``
is a list of rsync ``--itemize-changes`` lines (``%i %n%L``: ``>f+++++++++ new.txt``,
``*deleting   old.txt``, ``cd+++++++++ dir/``), the same for a dry run and a real run, so
that the two can be compared line by line.

Each case puts an old tree on every target with real ``rsync -a`` (no tool involved), then
snapshots every host's whole tree (inodes and ctimes included) around the dry run; a
second test runs the dry run then the real sync and compares their lists.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from support.cluster import host_path, host_roots, new_cluster, run_cli
from support.compare import diff_snapshots, diff_trees, rsync_copy, snapshot_hosts, tree_fields

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("rsync") is None,
                                 reason="rsync puts the old trees in place; install rsync")]

TARGETS = ["mayor1", "mayor2"]
NEW_DEST = "new/path"
_ITEM = re.compile(r"(\S+)\s+(.*)", re.S)


def _write(root, rel: str, text: str, mtime: int | None = None) -> None:
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)
    if mtime is not None:
        os.utime(p, (mtime, mtime))


def make_source(root) -> str:
    """The president's repository: the state every target should reach."""
    for i, (rel, text) in enumerate([("keep.txt", "unchanged\n"),
                                     ("changed.txt", "new content, longer than before\n"),
                                     ("new.txt", "only in the source\n"),
                                     ("d", "d is a file now; targets have a directory\n"),
                                     ("sub/x.txt", "x\n")]):
        _write(root, rel, text, 1_400_000_000 + i)
    return str(root)


def old_tree(case: str, src: str, root) -> None:
    """What each target holds before the sync, for ``case``.

    Every case also holds a user's file whose name merely contains ``.chiba-tmp-``: not
    the tool's own temporary file, so only ``--delete`` may remove it, and only listed.
    """
    rsync_copy(src, root)
    _write(root, "results.chiba-tmp-2024", "a user's results, not a temporary file\n")
    if case == "delete":
        _write(root, "extra.txt", "only on the target\n")
        _write(root, "sub/extra in sub", "only on the target too\n")
        _write(root, "changed.txt", "old\n")
    elif case == "dir-replaced":
        os.remove(os.path.join(root, "d"))
        _write(root, "d/x", "x\n")
        _write(root, "d/sub/y", "y\n")
    # new-dest: the repository holds an up-to-date tree; the sync goes to NEW_DEST


# case -> (extra arguments, {path: operation} the real run must list among its changes)
CASES = {
    "delete": (["--delete"], {"extra.txt": "delete", "sub/extra in sub": "delete",
                              "results.chiba-tmp-2024": "delete", "changed.txt": "write"}),
    "dir-replaced": (["--delete"], {"d/x": "delete", "d/sub/y": "delete", "d": "write",
                                    "results.chiba-tmp-2024": "delete"}),
    "new-dest": (["--dest", NEW_DEST], {"keep.txt": "write", "changed.txt": "write",
                                        "new.txt": "write", "d": "write",
                                        "sub/x.txt": "write"}),
}
METHODS = ["mpi", "rsync"]


@pytest.fixture
def case_setup(tmp_path):
    """``setup(case) -> (topo, src, args, dests)``: a cluster whose targets hold the old tree."""

    def setup(case: str):
        topo = new_cluster(tmp_path / "state")
        src = make_source(tmp_path / "source")
        args, _ = CASES[case]
        for t in TARGETS:
            old_tree(case, src, host_path(topo, t, "repository"))
        dest = NEW_DEST if case == "new-dest" else None
        dests = {t: host_path(topo, t, "repository", dest) for t in TARGETS}
        return topo, src, args, dests

    return setup


def sync(topo, src: str, method: str, args: list[str], *more: str):
    return run_cli(topo, "--json", "sync-mayors", src, "--method", method, "--targets",
                   ",".join(TARGETS), *args, *more)


def changes(run, host: str) -> list[str] | None:
    """``host``'s itemised change list from a ``--json`` sync result; None if there is none."""
    try:
        h = run.json().get("hosts", {}).get(host, {})
    except ValueError:
        return None
    return h["changes"] if isinstance(h.get("changes"), list) else None


def _keys(run, host: str) -> list[str]:
    try:
        return sorted(run.json().get("hosts", {}).get(host, {}))
    except ValueError:
        return ["(no JSON on stdout)"]


def operations(lines: list[str]) -> dict[str, str]:
    """Itemised lines -> {path: "delete" | "write" | other code}, for the must-list check."""
    ops = {}
    for line in lines:
        m = _ITEM.fullmatch(line)
        if not m:
            continue
        code, name = m.groups()
        if code[1:2] == "L":
            name = name.split(" -> ", 1)[0]
        name = name.rstrip("/")
        ops[name] = ("delete" if code == "*deleting" else
                     "write" if code[:2] in (">f", "<f") else code)
    return ops


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_dry_run_writes_nothing(case_setup, method, case):
    """Every host's whole tree, inodes and ctimes included, is as it was after --dry-run."""
    topo, src, args, dests = case_setup(case)
    roots = {**host_roots(topo), "source": src}
    before = snapshot_hosts(roots)
    r = sync(topo, src, method, args, "--dry-run")
    problems = [] if r.code == 0 else [f"exit status {r.code}, want 0\n{r}"]
    problems += diff_snapshots(before, snapshot_hosts(roots))
    if problems:
        pytest.fail(f"`chiba-admin {' '.join(r.args)}` wrote:\n" + "\n".join(problems[:60]),
                    pytrace=False)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_dry_run_lists_what_the_real_run_does(case_setup, method, case):
    """The dry run's itemised list per target equals the real run's, deletions included."""
    topo, src, args, dests = case_setup(case)
    dry = sync(topo, src, method, args, "--dry-run")
    real = sync(topo, src, method, args, "-i")  # rsync's -i: list what was changed
    problems = [f"{r}" for r in (dry, real) if r.code != 0]
    _, must = CASES[case]
    for t in TARGETS:
        planned, done = changes(dry, t), changes(real, t)
        for run, lst, label in ((dry, planned, "dry run"), (real, done, "real run")):
            if lst is None:
                problems.append(f"{t}: the {label} gives no itemised list "
                                f"(hosts.{t}.changes); its result has {_keys(run, t)}")
        if planned is not None and done is not None and sorted(planned) != sorted(done):
            only_dry = sorted(set(planned) - set(done))
            only_real = sorted(set(done) - set(planned))
            problems.append(f"{t}: the dry run listed {len(planned)} change(s), the real run "
                            f"{len(done)}\n  only in the dry run: {only_dry}\n"
                            f"  only in the real run: {only_real}")
        if done is not None:
            ops = operations(done)
            missing = {p: op for p, op in must.items() if ops.get(p) != op}
            if missing:
                problems.append(f"{t}: the real run's list lacks {missing}; it has {done}")
        diffs = diff_trees(tree_fields(src), tree_fields(dests[t]),
                           fields=("path", "type", "content"))
        problems += [f"{t}: after the real run: {d}" for d in diffs]
    if problems:
        pytest.fail(f"--method {method}, {case}:\n" + "\n".join(problems), pytrace=False)
