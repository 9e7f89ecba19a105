"""One contract per workload (stage, collect, sync-mayors, run), run by every method on every
backend available (the ``cluster`` fixture of tests/support/backends.py).

The contract is what an operator observes, whatever the method and the cluster: exit 0
and ``ok``; on every target the tree ``rsync -a`` would make of the source (the awkward
tree of tests/support/trees.py, judged field by field by tests/support/compare.py); the
source left as it was; the ``--json`` top-level keys of the method; and bad input (a
refused --dest, an unknown host) exits 2 with one line on stderr and nothing written on
any host. tests/test_contract_tree.py reports the same tree field by field on the
embedded cluster; this file holds each method to it on every backend.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from support.compare import diff_snapshots, diff_trees, rsync_copy, snapshot_hosts, tree_fields
from support.procs import still_running
from support.trees import make_awkward_tree

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("rsync") is None,
                                 reason="rsync is the reference; install rsync")]

NAME = "contract tree"  # a space in the destination's own name too

# the top-level --json keys of a successful run, per (workload, method); pinned here so
# that a backend or a method that drops or adds one fails by name
_STAGE_MPI = {"algorithm", "bytes", "chunk", "compress", "dest", "failures", "files", "hosts",
              "kind", "method", "nodes", "ok", "payload_bytes", "peak_rss", "phase_bytes",
              "phases", "refused", "seconds", "segment", "source"}
_TRANSIT = {"bytes", "dest", "failures", "files", "hosts", "method", "nodes", "ok",
            "outcome", "payload_bytes", "phase_bytes", "phases", "seconds", "source"}
KEYS = {
    ("stage", "transit"): _TRANSIT | {"dests"},
    ("stage", "bcast"): _STAGE_MPI,
    ("stage", "chain"): _STAGE_MPI,
    ("collect", "transit"): _TRANSIT | {"dest_dir"},
    ("collect", "mpi"): {"algorithm", "bytes", "dest", "dest_dir", "failures", "files",
                         "hosts", "kind", "method", "nodes", "ok", "payload_bytes",
                         "peak_rss", "phase_bytes", "phases", "seconds", "source"},
    ("sync", "rsync"): {"bytes_sent", "dest", "dry_run", "failures", "hosts", "method", "ok",
                        "seconds", "source", "targets"},
    ("sync", "mpi"): {"bytes_sent", "dest", "dry_run", "failures", "groups", "hosts",
                      "launch_seconds", "method", "ok", "phases", "seconds", "source",
                      "source_bytes", "source_files", "source_warnings", "sync_seconds",
                      "targets"},
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


def _refused(cluster, *args, extra: dict | None = None) -> list[str]:
    """Bad input: exit 2, one line on stderr, nothing written on any host (nor in ``extra``)."""
    roots = {**cluster.roots(), **(extra or {})}
    before = snapshot_hosts(roots)
    r = cluster.cli(*args)
    out = [] if r.code == 2 else [f"exit {r.code}, want 2:\n{r}"]
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    if len(lines) != 1:
        out.append(f"want one line on stderr, got {len(lines)}: {lines}")
    out += [f"written: {d}" for d in diff_snapshots(before, snapshot_hosts(roots))]
    return out


def _fail(cluster, what, problems) -> None:
    if problems:
        more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{what} on {cluster.backend}:\n" + "\n".join(problems[:40]) + more,
                    pytrace=False)


@pytest.mark.parametrize("method", list(STAGE))
def test_stage(cluster, method, source):
    _needs(cluster, STAGE[method])
    src, reference = source
    nodes = cluster.one_node_per_town()
    before = snapshot_hosts({"source": src})
    r = cluster.cli("--json", "stage", src, "--nodes", ",".join(nodes), "--dest", NAME,
                    *STAGE[method])
    problems = _problems(r, "stage", method)
    if not problems:
        problems += _same_trees(cluster, {n: cluster.path(n, "scratch", NAME) for n in nodes},
                                dict.fromkeys(nodes, reference))
    problems += diff_snapshots(before, snapshot_hosts({"source": src}))
    problems += _refused(cluster, "stage", src, "--nodes", ",".join(nodes), "--dest",
                         "../escape", *STAGE[method])
    _fail(cluster, f"stage {method}", problems)


@pytest.mark.parametrize("method", list(COLLECT))
def test_collect(cluster, method, source, tmp_path):
    _needs(cluster, COLLECT[method])
    src, _ = source
    nodes = cluster.one_node_per_town(skip=1)
    placed = {}
    for n in nodes:
        placed[n] = cluster.path(n, "scratch", NAME)
        rsync_copy(src, placed[n])
    expected = {n: tree_fields(p) for n, p in placed.items()}
    out = tmp_path / "collected"
    r = cluster.cli("--json", "collect", NAME, "--nodes", ",".join(nodes), "--dest", out,
                    *COLLECT[method])
    problems = _problems(r, "collect", method)
    if not problems:
        problems += _same_trees(cluster, {n: str(out / n / NAME) for n in nodes}, expected)
    problems += _refused(cluster, "collect", NAME, "--nodes", ",".join(nodes), "--dest", "/",
                         *COLLECT[method])
    _fail(cluster, f"collect {method}", problems)


@pytest.mark.parametrize("method", list(SYNC))
def test_sync_mayors(cluster, method, source):
    _needs(cluster, SYNC[method])
    src, reference = source
    targets = cluster.mayors
    before = snapshot_hosts({"source": src})
    r = cluster.cli("--json", "sync-mayors", src, "--targets", ",".join(targets), "--dest",
                    NAME, *SYNC[method])
    problems = _problems(r, "sync", method)
    if not problems:
        problems += _same_trees(cluster,
                                {t: cluster.path(t, "repository", NAME) for t in targets},
                                dict.fromkeys(targets, reference))
    problems += diff_snapshots(before, snapshot_hosts({"source": src}))
    problems += _refused(cluster, "sync-mayors", src, "--targets", ",".join(targets), "--dest",
                         "../escape", *SYNC[method])
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
    problems = _run_exit_codes(cluster) + _run_gathers_bytes_and_stderr(cluster)
    problems += _run_timeout_bounds_every_child(cluster)
    problems += _refused(cluster, "run", "-w", "ccn[01-99]", "true")
    _fail(cluster, "run", problems)
