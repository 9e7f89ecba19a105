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

The methods that need no MPI (transit, rsync, run over the transport) run on every backend
(``test_workload``, ``test_run``). Every MPI method (stage bcast and chain, collect and
sync-mayors mpi, run over MPI ranks) runs twice on the embedded cluster and on the testbed:
with a fresh mpiexec (``--launch mpiexec``) and through the running service (``--launch
service``, one service per module, or one for the testbed test; stopped, and ps must show
nothing of it left). Each run is judged by the contract, and a failure on one host (a file
where a destination should be, a missing source) added; then the two must show the same:
each --json less its timings and ``launch``, each refusal's exit code and line, each
failure's exit code and stderr (``test_both_launches``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

import pytest

from support.backends import on_testbed, serving
from support.compare import (diff_snapshots, diff_trees, rsync_copy, show_path, snapshot_hosts,
                             tree_fields, without_timings)
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


@dataclass
class Trial:
    """What one run of a workload's contract showed: the problems, and what a second way
    of launching must show the same (each --json less its timings and ``launch``, each
    refusal's exit code and stderr)."""

    problems: list[str] = field(default_factory=list)
    seen: list = field(default_factory=list)


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


def _run_and_judge(cluster, t: Trial, args, dests: dict[str, str], expected: dict[str, dict],
                   workload: str, method: str, src: str) -> None:
    """Run ``args``; then exit, ok, keys, every destination's tree, the source untouched,
    nothing left on any host outside the destinations (into ``t``)."""
    roots = cluster.roots()
    before = snapshot_hosts({**roots, "source": src})
    r = cluster.cli("--json", *args)
    after = snapshot_hosts({**roots, "source": src})
    problems = _problems(r, workload, method)
    if "--launch" in args and not problems:
        want = args[args.index("--launch") + 1]
        if r.json().get("launch") != want:
            problems.append(f"launch is {r.json().get('launch')!r}, want {want!r}")
    if not problems:
        problems += _same_trees(cluster, dests, expected)
    problems += [f"the source was changed: {d}" for d in
                 diff_snapshots({"source": before.pop("source")},
                                {"source": after.pop("source")})]
    t.problems += problems + _leftovers(before, after, roots, dests.values())
    t.seen.append(without_timings(r.json()) if r.code == 0 else str(r))


def _refused(cluster, t: Trial, *args, naming: str = "", extra: dict | None = None) -> None:
    """Bad input: exit 2, one line on stderr (naming ``naming``), nothing written on any
    host (nor in ``extra``); into ``t``."""
    roots = {**cluster.roots(), **(extra or {})}
    before = snapshot_hosts(roots)
    r = cluster.cli(*args)
    out = [] if r.code == 2 else [f"exit {r.code}, want 2:\n{r}"]
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    if len(lines) != 1 or naming not in lines[0]:
        out.append(f"want one line on stderr naming {naming!r}, got {len(lines)}: {lines}")
    out += [f"written: {d}" for d in diff_snapshots(before, snapshot_hosts(roots))]
    t.problems += out
    t.seen.append((r.code, r.err))


def _fail(cluster, what, problems) -> None:
    if problems:
        more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{what} on {cluster.backend}:\n" + "\n".join(problems[:40]) + more,
                    pytrace=False)


def _stage(c, method, launch, t: Trial, source, device_tree, tmp_path) -> None:
    """stage to one node per town (every mayor on the way): the tree on each node."""
    src, reference = source
    nodes = ",".join(c.one_node_per_town())
    args = ["stage", src, "--nodes", nodes, *STAGE[method], *launch]
    _run_and_judge(c, t, [*args, "--dest", NAME],
                   {n: c.path(n, "scratch", NAME) for n in c.one_node_per_town()},
                   dict.fromkeys(c.one_node_per_town(), reference), "stage", method, src)
    _refused(c, t, *args, "--dest", "../escape", naming="'..'")
    if device_tree:
        _refused(c, t, "stage", device_tree, "--nodes", nodes, "--dest", "with device",
                 *STAGE[method], *launch, naming=DEVICE_REL)


def _collect(c, method, launch, t: Trial, source, device_tree, tmp_path) -> None:
    """collect from one node per town: each node's tree under DEST/NODE here."""
    src, _ = source
    nodes = c.one_node_per_town(skip=1)
    placed = {}
    for n in nodes:
        placed[n] = c.path(n, "scratch", NAME)
        rsync_copy(src, placed[n])
    expected = {n: tree_fields(p) for n, p in placed.items()}
    out = tmp_path / "collected"
    args = ["--nodes", ",".join(nodes), *COLLECT[method], *launch]
    _run_and_judge(c, t, ["collect", NAME, *args, "--dest", out],
                   {n: str(out / n / NAME) for n in nodes}, expected, "collect", method, src)
    _refused(c, t, "collect", NAME, *args, "--dest", "/", naming="root directory")
    if device_tree:
        # the device on the last node only: the others' trees must not be collected either
        for n in nodes:
            rsync_copy(device_tree, c.path(n, "scratch", "with device"))
            if n != nodes[-1]:
                os.remove(os.path.join(c.path(n, "scratch", "with device"), DEVICE_REL))
        _refused(c, t, "collect", "with device", *args, "--dest", tmp_path / "device",
                 naming=DEVICE_REL, extra={"collect --dest": str(tmp_path / "device")})


def _sync(c, method, launch, t: Trial, source, device_tree, tmp_path) -> None:
    """sync-mayors to every mayor: the tree in each mayor's repository."""
    src, reference = source
    args = ["--targets", ",".join(c.mayors), *SYNC[method], *launch]
    _run_and_judge(c, t, ["sync-mayors", src, *args, "--dest", NAME],
                   {m: c.path(m, "repository", NAME) for m in c.mayors},
                   dict.fromkeys(c.mayors, reference), "sync", method, src)
    _refused(c, t, "sync-mayors", src, *args, "--dest", "../escape", naming="'..'")
    if device_tree:
        _refused(c, t, "sync-mayors", device_tree, *args, "--dest", "with device",
                 naming=DEVICE_REL)


WORKLOADS: dict = {"stage": (STAGE, _stage), "collect": (COLLECT, _collect),
                   "sync": (SYNC, _sync)}


def _contract(c, workload, method, launch, source, device_tree, tmp_path) -> Trial:
    methods, body = WORKLOADS[workload]
    _needs(c, methods[method])
    t = Trial()
    body(c, method, tuple(launch), t, source, device_tree, tmp_path)
    return t


# the methods that need no MPI, per workload: every backend runs them (run's own is its
# transport, test_run); the MPI ones run on the backends that serve, both ways (below)
NO_MPI = [("stage", "transit"), ("collect", "transit"), ("sync", "rsync")]
MPI = [("stage", "bcast"), ("stage", "chain"), ("collect", "mpi"), ("sync", "mpi")]


@pytest.mark.parametrize(("workload", "method"), NO_MPI, ids=["-".join(m) for m in NO_MPI])
def test_workload(cluster, workload, method, source, device_tree, tmp_path):
    """stage, collect and sync-mayors by their transport methods on every backend."""
    t = _contract(cluster, workload, method, (), source, device_tree, tmp_path)
    _fail(cluster, f"{workload} {method}", t.problems)


# run: pdsh's exit codes and clush's gathering, on four nodes of two towns
RUN_HOSTS = "ccn[01-04]"
# ccn01, ccn03: the shell ends at once, two background children keep its stdout open, one of
# them in a session of its own; ccn02, ccn04: the command closes its outputs, runs on.
BACKGROUND = ('case "$CHIBA_HOST" in ccn01|ccn03) echo started; sleep 60 & echo "bg $!"; '
              'setsid sleep 60 & echo "bg $!";; '
              '*) echo started; echo "bg $$"; exec sleep 60 >&- 2>&-;; esac')


def _run_exit_codes(cluster, launch, t: Trial) -> None:
    r = cluster.cli("--json", "run", *launch, "-w", RUN_HOSTS,
                    'echo "$CHIBA_HOST"; case $CHIBA_HOST in ccn02) exit 3;; ccn04) exit 7;; esac')
    t.seen.append((r.code, without_timings(r.json()) if r.code == 7 else r.err))
    if r.code != 7:  # pdsh -S: the largest remote exit code
        t.problems.append(f"exit {r.code}, want 7:\n{r}")
        return
    j = r.json()
    if set(j) != KEYS["run", "run"] | ({"launch"} if launch else set()):
        t.problems.append(f"--json keys {sorted(j)}")
    if j["rc"] != 7 or sorted(j["failures"]) != ["ccn02", "ccn04"]:
        t.problems.append(f"rc {j['rc']}, failures {j['failures']}")


def _run_gathers_bytes_and_stderr(cluster, launch, t: Trial) -> None:
    # -b: caf\xe9 and caf\xe8 are two outputs, though both display as caf\ufffd
    r = cluster.cli("run", *launch, "-b", "-w", RUN_HOSTS,
                    'if [ "$CHIBA_HOST" = ccn01 ]; then printf "caf\\351"; '
                    'else printf "caf\\350"; fi')
    t.seen.append((r.code, _said(r.out), r.err))
    if r.code != 0 or "ccn[02-04] (3)\n" not in r.out or "ccn01 (1)\n" not in r.out \
            or r.out.count("caf\ufffd") != 2:
        t.problems.append(f"bytes not gathered apart:\n{r}")
    # stdout gathered on stdout; stderr on stderr, gathered, labelled
    r = cluster.cli("run", *launch, "-b", "-w", RUN_HOSTS,
                    'echo out; echo warn >&2; [ "$CHIBA_HOST" != ccn01 ] || echo only-here >&2')
    t.seen.append((r.code, _said(r.out), r.err))
    if r.code != 0 or "ccn[01-04] (4)\n" not in r.out or "warn" in r.out \
            or sorted(r.err.splitlines()) != ["ccn01: only-here", "ccn01: warn",
                                               "ccn[02-04]: warn"]:
        t.problems.append(f"stderr not kept apart:\n{r}")


def _run_timeout_bounds_every_child(cluster, launch, t: Trial) -> None:
    """-u bounds the command whatever its children do; each host 255, one stderr line."""
    # 5 s, not less: every host must print "started" first, also on a loaded machine
    r = cluster.cli("run", *launch, "-u", "5", "-w", RUN_HOSTS, BACKGROUND)
    t.seen.append((r.code, sorted(r.err.splitlines())))  # stdout: pids, which differ
    hosts = [f"ccn0{i}" for i in range(1, 5)]
    if r.code != 255 or sorted(r.err.splitlines()) != [
            f"chiba-admin run: {h}: command timed out after 5s" for h in hosts]:
        t.problems.append(f"timeout not reported per host:\n{r}")
        return
    t.problems += [f"{h}: no 'started'" for h in hosts
                   if f"{h}: started" not in r.out.splitlines()]
    if cluster.backend == "testbed":
        return  # the hosts' processes live in PID namespaces of their own
    pids = [int(p) for p in re.findall(r"^ccn0\d: bg (\d+)$", r.out, re.M)]
    if len(pids) != 6:
        t.problems.append(f"want 6 background pids, got {pids}:\n{r}")
        return
    t.problems += [f"still running after the timeout: {p}" for p in still_running(pids)]


def _said(out: str) -> str:
    """Text output less the line saying how the MPI job was launched."""
    return "".join(ln for ln in out.splitlines(True) if ln != "via service\n")


def _run(c, method, launch, t: Trial, source, device_tree, tmp_path) -> None:
    """run: pdsh's exit codes, clush's gathering by bytes, stderr apart, -u bounding every
    child, and an unknown host refused."""
    _run_exit_codes(c, launch, t)
    _run_gathers_bytes_and_stderr(c, launch, t)
    _run_timeout_bounds_every_child(c, launch, t)
    _refused(c, t, "run", *launch, "-w", "ccn[01-99]", "true", naming="unknown host")


WORKLOADS["run"] = ({"mpi": ("--launch",)}, _run)


def test_run(cluster, tmp_path):
    """run over the transport on every backend."""
    t = Trial()
    _run(cluster, "transport", (), t, None, None, tmp_path)
    _fail(cluster, "run", t.problems)


# The launch dimension (issue 19): every MPI method runs with a fresh mpiexec and through
# the running service, each run judged by its workload's contract, and the two must show
# the same: --json less timings and ``launch``, refusals, a host's failure, trees.
LAUNCHES = ("mpiexec", "service")
MPI_ALL = [*MPI, ("run", "mpi")]
HOST_ERROR = "host error"  # a destination that is a file on one host


def _undo(c, before: dict) -> None:
    """Remove every entry made on the hosts since ``before`` (a snapshot of ``c.roots()``):
    the next launch finds what this one found."""
    after = snapshot_hosts(c.roots())
    for label, root in c.roots().items():
        for rel in sorted(set(after[label] or ()) - set(before[label] or ())):
            p = os.path.join(os.fsencode(root), rel)  # sorted: a directory before its entries
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.remove(p)


def _host_error(c, workload, method, launch, t: Trial, source, work) -> None:
    """A failure found only on one host: the destination is a file on the last node
    (stage) or mayor (sync-mayors); the source is missing on the first node (collect; a
    file on the others). Not 0, the same exit code both ways, the host named on stderr."""
    src, _ = source
    if workload == "stage":
        hosts = c.one_node_per_town()
        args = ["stage", src, "--nodes", ",".join(hosts), *STAGE[method], "--dest", HOST_ERROR]
        bad, where, files = hosts[-1], "scratch", hosts[-1:]
    elif workload == "collect":
        hosts = c.one_node_per_town(skip=1)
        args = ["collect", HOST_ERROR, "--nodes", ",".join(hosts), *COLLECT[method],
                "--dest", work / "host error"]
        bad, where, files = hosts[0], "scratch", hosts[1:]
    else:
        hosts = c.mayors
        args = ["sync-mayors", src, "--targets", ",".join(hosts), *SYNC[method],
                "--dest", HOST_ERROR]
        bad, where, files = hosts[-1], "repository", hosts[-1:]
    for h in files:
        with open(c.path(h, where, HOST_ERROR), "w") as f:
            f.write("a file, not a directory\n")
    r = c.cli(*args, *launch)
    t.seen.append((r.code, r.err))
    if r.code == 0 or bad not in r.err:
        t.problems.append(f"{HOST_ERROR!r} in {bad}'s {where}: want a failure naming "
                          f"{bad}:\n{r}")


def _differences(trials: dict[str, Trial]) -> list[str]:
    """Where the service's run showed other than the fresh one: one line per key."""
    fresh, via = trials["mpiexec"].seen, trials["service"].seen
    if len(fresh) != len(via):
        return [f"{len(fresh)} results fresh, {len(via)} via the service"]
    out = []
    for i, (a, b) in enumerate(zip(fresh, via)):
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"result {i}: {k}: fresh {a.get(k)!r}, via service {b.get(k)!r}"
                    for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        else:
            out.append(f"result {i}:\nfresh:       {a!r}\nvia service: {b!r}")
    return out


def _both_ways(c, workload, method, source, device_tree, tmp_path) -> list[str]:
    """The workload's contract with each launch, what it made removed in between; every
    problem of either, and every difference between them."""
    trials = {}
    for launch in LAUNCHES:
        work = tmp_path / "work"
        work.mkdir()
        before = snapshot_hosts(c.roots())
        try:
            flag = ("--launch", launch)
            t = _contract(c, workload, method, flag, source, device_tree, work)
            if workload != "run":
                _host_error(c, workload, method, flag, t, source, work)
        finally:
            _undo(c, before)
            shutil.rmtree(work)
        trials[launch] = t
    return [f"--launch {launch}: {p}" for launch, t in trials.items()
            for p in t.problems] + _differences(trials)


@pytest.mark.parametrize(("workload", "method"), MPI_ALL, ids=["-".join(m) for m in MPI_ALL])
def test_both_launches(served, workload, method, source, device_tree, tmp_path):
    """Every MPI method on the embedded cluster, fresh and through the service (one per
    module): each run's contract, and the same results, refusals and failures."""
    _fail(served, f"{workload} {method}",
          _both_ways(served, workload, method, source, device_tree, tmp_path))


@pytest.mark.testbed
def test_both_launches_on_the_testbed(request, source, device_tree, tmp_path):
    """The same on the testbed, every MPI method under one service start."""
    c = on_testbed(request)
    problems = []
    with serving(c):
        for workload, method in MPI_ALL:
            problems += [f"{workload} {method}: {p}" for p in
                         _both_ways(c, workload, method, source, device_tree, tmp_path)]
    _fail(c, "both launches", problems)


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
