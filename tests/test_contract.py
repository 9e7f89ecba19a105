"""One contract per workload (stage, collect, sync-mayors, run), run by every method on every
backend available (the ``cluster`` fixture of tests/support/backends.py).

The contract is what an operator observes, whatever the method and the cluster: exit 0
and ``ok``; on every target the tree ``rsync -a`` would make of the source (the awkward
tree of tests/support/trees.py, judged field by field by tests/support/compare.py); the
source left as it was; the ``--json`` top-level keys of the method; and bad input (a
refused --dest, an unknown host) exits 2 with one line on stderr and nothing written on
any host; a device node in the tree is such bad input for every method. Each failure
lists every difference, one line per entry and field ("PATH: mode: expected 4755, got
0755"); ``test_the_judge_sees_each_field`` shows that the judge itself sees each fault.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from support.compare import (diff_snapshots, diff_trees, rsync_copy, show_path, snapshot_hosts,
                             tree_fields)
from support.procs import still_running
from support.trees import DEVICE_REL, make_awkward_tree, make_device_tree

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("rsync") is None,
                                 reason="rsync is the reference; install rsync")]

NAME = "contract tree"  # a space in the destination's own name too
ROOT = os.geteuid() == 0  # a device node needs root to create (CAP_MKNOD)

# the top-level --json keys of a successful run, per (workload, method); pinned here so
# that a backend or a method that drops or adds one fails by name
_STAGE_MPI = {"algorithm", "bytes", "chunk", "compress", "dest", "failures", "files", "hosts",
              "kind", "method", "nodes", "ok", "payload_bytes", "peak_rss", "phase_bytes",
              "phases", "refused", "seconds", "segment", "source", "launch"}
_TRANSIT = {"bytes", "dest", "failures", "files", "hosts", "method", "nodes", "ok",
            "outcome", "payload_bytes", "phase_bytes", "phases", "seconds", "source"}
KEYS = {
    ("stage", "transit"): _TRANSIT | {"dests"},
    ("stage", "bcast"): _STAGE_MPI,
    ("stage", "chain"): _STAGE_MPI,
    ("collect", "transit"): _TRANSIT | {"dest_dir"},
    ("collect", "mpi"): {"algorithm", "bytes", "dest", "dest_dir", "failures", "files",
                         "hosts", "kind", "method", "nodes", "ok", "payload_bytes",
                         "peak_rss", "phase_bytes", "phases", "seconds", "source", "launch"},
    ("sync", "rsync"): {"bytes_sent", "dest", "dry_run", "failures", "hosts", "method", "ok",
                        "seconds", "source", "targets"},
    ("sync", "mpi"): {"bytes_sent", "dest", "dry_run", "failures", "groups", "hosts",
                      "launch_seconds", "method", "ok", "phases", "seconds", "source",
                      "source_bytes", "source_files", "source_warnings", "sync_seconds",
                      "targets", "launch"},
    ("run", "run"): {"failures", "groups", "hosts", "ok", "rc", "stderr_groups"},
}
STAGE = {"transit": ("--method", "transit"),
         "bcast": ("--method", "mpi", "--algorithm", "bcast"),
         "chain": ("--method", "mpi", "--algorithm", "chain")}
COLLECT = {"transit": ("--method", "transit"), "mpi": ("--method", "mpi")}
SYNC = {"rsync": ("--method", "rsync"), "mpi": ("--method", "mpi")}


def _needs(cluster, args) -> None:
    if "mpi" in args and cluster.no_mpi:
        pytest.skip(cluster.no_mpi)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(the awkward source tree, its rsync -a reference's fields), made once per module."""
    base = tmp_path_factory.mktemp("contract")
    src = make_awkward_tree(base / "source")
    rsync_copy(src, base / "reference")
    return src, tree_fields(base / "reference")


@pytest.fixture(scope="module")
def device_tree(tmp_path_factory):
    """A tree holding a character device (DEVICE_REL), which every method refuses; None
    when not root."""
    return make_device_tree(tmp_path_factory.mktemp("device") / "with device") if ROOT else None


def _problems(r, workload, method) -> list[str]:
    """What is wrong with a run that should have succeeded: exit, ok, the --json keys."""
    if r.code != 0:
        return [str(r)]
    j = r.json()
    out = [] if j.get("ok") is True else [f"ok is {j.get('ok')!r}: {j.get('failures')}"]
    want = KEYS[workload, method]
    if set(j) != want:
        out.append(f"--json keys: missing {sorted(want - set(j))}, "
                   f"unexpected {sorted(set(j) - want)}")
    return out


def _same_trees(cluster, dests: dict[str, str], expected: dict[str, dict]) -> list[str]:
    out = []
    for host, d in dests.items():
        if not os.path.lexists(d):
            out.append(f"{host}: no tree at {d}")
            continue
        out += [f"{host}: {line}" for line in diff_trees(expected[host], tree_fields(d))]
    return out


def _leftovers(before: dict, after: dict, roots: dict[str, str], dests) -> list[str]:
    """Entries on any host, outside the destinations, that the run created and left.

    The one file a stage or collect leaves beside its destination on purpose is its
    staged marker, ``.NAME.chiba-staged`` (docs/design.md, "Safety"): it is how the next
    run tells a destination it made from one it must not replace without ``--replace``.
    """
    inside = [os.fsencode(d) for d in dests]
    markers = [os.path.join(os.path.dirname(d), b"." + os.path.basename(d) + b".chiba-staged")
               for d in inside]
    found = []
    for label, root in roots.items():
        for rel in sorted(set(after[label] or ()) - set(before[label] or ())):
            path = os.path.join(os.fsencode(root), rel)
            if path in markers:
                continue
            if not any(path == d or path.startswith(d + b"/") for d in inside):
                found.append(f"{label}: left behind: {show_path(rel)} "
                             f"({after[label][rel][0]})")
    return found


def _run_and_judge(cluster, args, dests: dict[str, str], expected: dict[str, dict],
                   workload: str, method: str, src: str) -> list[str]:
    """Run ``args``; then exit, ok, keys, every destination's tree, the source untouched,
    nothing left on any host outside the destinations."""
    roots = cluster.roots()
    before = snapshot_hosts({**roots, "source": src})
    r = cluster.cli("--json", *args)
    after = snapshot_hosts({**roots, "source": src})
    problems = _problems(r, workload, method)
    if not problems:
        problems += _same_trees(cluster, dests, expected)
    problems += [f"the source was changed: {d}" for d in
                 diff_snapshots({"source": before.pop("source")},
                                {"source": after.pop("source")})]
    return problems + _leftovers(before, after, roots, dests.values())


def _refused(cluster, *args, naming: str = "", extra: dict | None = None) -> list[str]:
    """Bad input: exit 2, one line on stderr (naming ``naming``), nothing written on any
    host (nor in ``extra``)."""
    roots = {**cluster.roots(), **(extra or {})}
    before = snapshot_hosts(roots)
    r = cluster.cli(*args)
    out = [] if r.code == 2 else [f"exit {r.code}, want 2:\n{r}"]
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    if len(lines) != 1 or naming not in lines[0]:
        out.append(f"want one line on stderr naming {naming!r}, got {len(lines)}: {lines}")
    out += [f"written: {d}" for d in diff_snapshots(before, snapshot_hosts(roots))]
    return out


def _fail(cluster, what, problems) -> None:
    if problems:
        more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{what} on {cluster.backend}:\n" + "\n".join(problems[:40]) + more,
                    pytrace=False)


@pytest.mark.parametrize("method", list(STAGE))
def test_stage(cluster, method, source, device_tree):
    """stage to one node per town (every mayor on the way): the tree on each node."""
    _needs(cluster, STAGE[method])
    src, reference = source
    nodes = cluster.one_node_per_town()
    problems = _run_and_judge(
        cluster, ["stage", src, "--nodes", ",".join(nodes), "--dest", NAME, *STAGE[method]],
        {n: cluster.path(n, "scratch", NAME) for n in nodes}, dict.fromkeys(nodes, reference),
        "stage", method, src)
    problems += _refused(cluster, "stage", src, "--nodes", ",".join(nodes), "--dest",
                         "../escape", *STAGE[method], naming="'..'")
    if device_tree:
        problems += _refused(cluster, "stage", device_tree, "--nodes", ",".join(nodes),
                             "--dest", "with device", *STAGE[method], naming=DEVICE_REL)
    _fail(cluster, f"stage {method}", problems)


@pytest.mark.parametrize("method", list(COLLECT))
def test_collect(cluster, method, source, device_tree, tmp_path):
    """collect from one node per town: each node's tree under DEST/NODE here."""
    _needs(cluster, COLLECT[method])
    src, _ = source
    nodes = cluster.one_node_per_town(skip=1)
    placed = {}
    for n in nodes:
        placed[n] = cluster.path(n, "scratch", NAME)
        rsync_copy(src, placed[n])
    expected = {n: tree_fields(p) for n, p in placed.items()}
    out = tmp_path / "collected"
    problems = _run_and_judge(
        cluster, ["collect", NAME, "--nodes", ",".join(nodes), "--dest", out, *COLLECT[method]],
        {n: str(out / n / NAME) for n in nodes}, expected, "collect", method, src)
    problems += _refused(cluster, "collect", NAME, "--nodes", ",".join(nodes), "--dest", "/",
                         *COLLECT[method], naming="root directory")
    if device_tree:
        # the device on the last node only: the others' trees must not be collected either
        for n in nodes:
            rsync_copy(device_tree, cluster.path(n, "scratch", "with device"))
            if n != nodes[-1]:
                os.remove(os.path.join(cluster.path(n, "scratch", "with device"), DEVICE_REL))
        problems += _refused(cluster, "collect", "with device", "--nodes", ",".join(nodes),
                             "--dest", tmp_path / "device", *COLLECT[method], naming=DEVICE_REL,
                             extra={"collect --dest": str(tmp_path / "device")})
    _fail(cluster, f"collect {method}", problems)


@pytest.mark.parametrize("method", list(SYNC))
def test_sync_mayors(cluster, method, source, device_tree):
    """sync-mayors to every mayor: the tree in each mayor's repository."""
    _needs(cluster, SYNC[method])
    src, reference = source
    targets = cluster.mayors
    problems = _run_and_judge(
        cluster, ["sync-mayors", src, "--targets", ",".join(targets), "--dest", NAME,
                  *SYNC[method]],
        {t: cluster.path(t, "repository", NAME) for t in targets},
        dict.fromkeys(targets, reference), "sync", method, src)
    problems += _refused(cluster, "sync-mayors", src, "--targets", ",".join(targets), "--dest",
                         "../escape", *SYNC[method], naming="'..'")
    if device_tree:
        problems += _refused(cluster, "sync-mayors", device_tree, "--targets",
                             ",".join(targets), "--dest", "with device", *SYNC[method],
                             naming=DEVICE_REL)
    _fail(cluster, f"sync-mayors {method}", problems)


# run: pdsh's exit codes and clush's gathering, on four nodes of two towns
RUN_HOSTS = "ccn[01-04]"
# ccn01, ccn03: the shell ends at once, two background children keep its stdout open, one of
# them in a session of its own; ccn02, ccn04: the command closes its outputs, runs on.
BACKGROUND = ('case "$CHIBA_HOST" in ccn01|ccn03) echo started; sleep 60 & echo "bg $!"; '
              'setsid sleep 60 & echo "bg $!";; '
              '*) echo started; echo "bg $$"; exec sleep 60 >&- 2>&-;; esac')


def _run_exit_codes(cluster) -> list[str]:
    r = cluster.cli("--json", "run", "-w", RUN_HOSTS,
                    'echo "$CHIBA_HOST"; case $CHIBA_HOST in ccn02) exit 3;; ccn04) exit 7;; esac')
    if r.code != 7:  # pdsh -S: the largest remote exit code
        return [f"exit {r.code}, want 7:\n{r}"]
    j = r.json()
    out = [] if set(j) == KEYS["run", "run"] else [f"--json keys {sorted(j)}"]
    if j["rc"] != 7 or sorted(j["failures"]) != ["ccn02", "ccn04"]:
        out.append(f"rc {j['rc']}, failures {j['failures']}")
    return out


def _run_gathers_bytes_and_stderr(cluster) -> list[str]:
    out = []
    # -b: caf\xe9 and caf\xe8 are two outputs, though both display as caf\ufffd
    r = cluster.cli("run", "-b", "-w", RUN_HOSTS,
                    'if [ "$CHIBA_HOST" = ccn01 ]; then printf "caf\\351"; '
                    'else printf "caf\\350"; fi')
    if r.code != 0 or "ccn[02-04] (3)\n" not in r.out or "ccn01 (1)\n" not in r.out \
            or r.out.count("caf\ufffd") != 2:
        out.append(f"bytes not gathered apart:\n{r}")
    # stdout gathered on stdout; stderr on stderr, gathered, labelled
    r = cluster.cli("run", "-b", "-w", RUN_HOSTS,
                    'echo out; echo warn >&2; [ "$CHIBA_HOST" != ccn01 ] || echo only-here >&2')
    if r.code != 0 or "ccn[01-04] (4)\n" not in r.out or "warn" in r.out \
            or sorted(r.err.splitlines()) != ["ccn01: only-here", "ccn01: warn",
                                               "ccn[02-04]: warn"]:
        out.append(f"stderr not kept apart:\n{r}")
    return out


def _run_timeout_bounds_every_child(cluster) -> list[str]:
    """-u bounds the command whatever its children do; each host 255, one stderr line."""
    # 5 s, not less: every host must print "started" first, also on a loaded machine
    r = cluster.cli("run", "-u", "5", "-w", RUN_HOSTS, BACKGROUND)
    hosts = [f"ccn0{i}" for i in range(1, 5)]
    if r.code != 255 or sorted(r.err.splitlines()) != [
            f"chiba-admin run: {h}: command timed out after 5s" for h in hosts]:
        return [f"timeout not reported per host:\n{r}"]
    out = [f"{h}: no 'started'" for h in hosts if f"{h}: started" not in r.out.splitlines()]
    if cluster.backend == "testbed":
        return out  # the hosts' processes live in PID namespaces of their own
    pids = [int(p) for p in re.findall(r"^ccn0\d: bg (\d+)$", r.out, re.M)]
    if len(pids) != 6:
        return out + [f"want 6 background pids, got {pids}:\n{r}"]
    return out + [f"still running after the timeout: {p}" for p in still_running(pids)]


def test_run(cluster):
    """run: pdsh's exit codes, clush's gathering by bytes, stderr apart, -u bounding every
    child, and an unknown host refused."""
    problems = _run_exit_codes(cluster) + _run_gathers_bytes_and_stderr(cluster)
    problems += _run_timeout_bounds_every_child(cluster)
    problems += _refused(cluster, "run", "-w", "ccn[01-99]", "true", naming="unknown host")
    _fail(cluster, "run", problems)


def test_the_judge_sees_each_field(tmp_path):
    """The oracle itself: an rsync -a copy shows no difference, and each fault shows in its
    own field only (so that a passing contract test means something)."""
    src = make_awkward_tree(tmp_path / "src")
    copy = tmp_path / "copy"
    rsync_copy(src, copy)
    reference = tree_fields(src)
    assert diff_trees(reference, tree_fields(copy)) == []
    c = os.fsencode(copy)

    def at(rel: bytes) -> bytes:
        return os.path.join(c, rel)

    os.chmod(at(b"setuid 4755"), 0o755)
    os.utime(at(b"caf\xe9.txt"), ns=(0, 1_300_000_000 * 10**9))
    with open(at(b"new\nline"), "ab") as f:
        f.write(b"more")
    os.remove(at(b"links/abs"))
    os.symlink(b"/etc/group", at(b"links/abs"))
    os.remove(at(b"specials/socket"))
    os.mkfifo(at(b"specials/socket"))
    os.rmdir(at(b"empty dir"))
    open(at(b"stray"), "w").close()
    if ROOT:
        os.chown(at(b"owned/user file"), 0, 0)
    # put back the times the edits above moved, so that each edit shows in one field
    for rel in (b"new\nline", b"links/abs", b"specials/socket", b"specials", b"links", b"."):
        os.utime(at(rel), ns=(0, reference[rel]["mtime"]), follow_symlinks=False)
    got = diff_trees(reference, tree_fields(copy))
    want = [
        "'empty dir': missing (dir)",
        "'links/abs': target: expected '/etc/passwd', got '/etc/group'",
        "'new\\nline': content: expected 22 bytes sha256:578d23c0e0ad229a, "
        "got 26 bytes sha256:581ec7f05e4808cd",
        *(["'owned/user file': owner: expected 1234:5678, got 0:0"] if ROOT else []),
        "'setuid 4755': mode: expected 4755, got 0755",
        "'specials/socket': type: expected socket, got fifo",
        "'stray': unexpected (file)",
        "b'caf\\xe9.txt': mtime: expected 1300029000.250000000, got 1300000000.000000000",
    ]
    assert sorted(got) == sorted(want)
    assert diff_trees(reference, tree_fields(copy), fields=("mode",)) == [
        "'setuid 4755': mode: expected 4755, got 0755"]
