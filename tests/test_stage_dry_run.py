"""`stage --dry-run`, both methods, through the real CLI and real mpiexec on the embedded
cluster: it writes nothing anywhere (every host's tree and the home state directory,
spool included, snapshotted with inodes and ctimes around it), it says per node what the
real run would do ("would create", "would replace", or the real run's own refusal and exit
status), and the real run that follows agrees with it.
"""

from __future__ import annotations

import os

import pytest

from support.cluster import host_path, new_cluster, run_cli
from support.compare import diff_snapshots, snapshot_hosts
from support.trees import make_tree

pytestmark = pytest.mark.mpi

TOWN1 = ["ccn01", "ccn02", "ccn03", "ccn04"]
NODES = TOWN1 + ["ccn05", "ccn06", "ccn07", "ccn08"]
# method -> its stage options
METHODS = {"mpi-chain": ["--method", "mpi", "--algorithm", "chain"],
           "mpi-bcast": ["--method", "mpi", "--algorithm", "bcast"],
           "transit": ["--method", "transit"]}


@pytest.fixture
def setup(tmp_path):
    """(topo, src, roots): a fresh cluster, a source tree with a hard link, and what the
    snapshots cover (the whole state directory: every host, the home spool; the source)."""
    topo = new_cluster(tmp_path / "state")
    src = make_tree(tmp_path / "proj", big=50_000)
    os.link(src / "sub dir" / "text.txt", src / "hard link")
    return topo, str(src), {"state": topo.state_dir, "source": str(src)}


def stage(topo, src: str, method: str, *args: str):
    return run_cli(topo, "stage", src, *METHODS[method], *args)


def assert_wrote_nothing(before: dict, roots: dict, run) -> None:
    changed = diff_snapshots(before, snapshot_hosts(roots))
    assert not changed, f"`chiba-admin {' '.join(run.args)}` wrote:\n" + "\n".join(changed[:40])


def actions(j: dict) -> dict[str, str | None]:
    """host -> what the dry run says it would do ("would create", ...), None if it fails."""
    return {h: (r["stage"] if r["ok"] else None) for h, r in j["hosts"].items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_fresh_nodes_would_be_created_nothing_is_written_and_the_real_run_agrees(setup,
                                                                                method):
    topo, src, roots = setup
    before = snapshot_hosts(roots)
    dry = stage(topo, src, method, "--nodes", "@nodes", "--json", "--dry-run")
    assert dry.code == 0, dry
    assert_wrote_nothing(before, roots, dry)
    d = dry.json()
    assert d["dry_run"] is True and d["ok"] is True and d["failures"] == {}
    assert actions(d) == {n: "would create" for n in NODES}
    assert d["bytes"] == 0 and d["phase_bytes"] == {}, "nothing crossed"
    real = stage(topo, src, method, "--nodes", "@nodes", "--json")
    assert real.code == 0, real
    r = real.json()
    assert "dry_run" not in r and "plan" not in r, "a real run's JSON keeps its shape"
    # the dry run's JSON has the real run's shape, plus dry_run and plan
    assert set(d) == set(r) | {"dry_run", "plan"}
    assert {frozenset(h) for h in d["hosts"].values()} == \
        {frozenset(h) for h in r["hosts"].values()}
    same = ("method", "algorithm", "source", "dest", "dests", "nodes", "payload_bytes",
            "files", "compress", "chunk", "segment", "kind", "refused")
    assert {k: d.get(k) for k in same} == {k: r.get(k) for k in same}
    assert all(h["ok"] for h in r["hosts"].values()) and list(r["hosts"]) == list(d["hosts"])
    plan = d["plan"]
    if method == "transit":
        assert plan == {"from": "pres", "via": None,
                        "towns": {"mayor1": TOWN1, "mayor2": NODES[4:]}}
    else:  # the chain order is the real run's rank order
        assert plan["order"] == r["nodes"] == NODES and plan["download"] == "ccn01"
        assert plan["tree"] == ("chain" if method == "mpi-chain" else "MPI_Bcast")


def _occupy(topo, tmp_path) -> None:
    """Destinations a stage did not make: another job's directory on ccn02, a file on
    ccn03, a symlink (to a directory outside scratch) on ccn04; ccn01 is fresh."""
    os.makedirs(host_path(topo, "ccn02", "scratch", "proj/theirs"))
    with open(host_path(topo, "ccn03", "scratch", "proj"), "w") as f:
        f.write("a file\n")
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", host_path(topo, "ccn04", "scratch", "proj"))


# method -> --replace or not -> (exit status, refused hosts); the real run's rules:
# MPI refuses on every node if one refuses and never replaces a file or a symlink; City
# Transit fails only that node, and replaces any entry with --replace
REFUSALS = {
    "mpi-chain": {False: (2, ["ccn02", "ccn03", "ccn04"]), True: (2, ["ccn03", "ccn04"])},
    "transit": {False: (1, ["ccn02", "ccn03", "ccn04"]), True: (0, [])},
}


@pytest.mark.parametrize("method", list(REFUSALS))
def test_refusals_are_the_real_runs_and_it_agrees(setup, tmp_path, method):
    topo, src, roots = setup
    _occupy(topo, tmp_path)
    for replace in (False, True):
        extra = ["--replace"] if replace else []
        args = ["--nodes", "@town1", *extra]
        before = snapshot_hosts(roots)
        dry = stage(topo, src, method, *args, "--dry-run", "--json")
        text = stage(topo, src, method, *args, "--dry-run")
        assert_wrote_nothing(before, roots, dry)
        code, refused = REFUSALS[method][replace]
        assert dry.code == text.code == code, (dry, text)
        d = dry.json()
        assert d["dry_run"] is True and sorted(d["failures"]) == refused
        if not replace:
            assert "pass --replace" in d["failures"]["ccn02"]
        for host, why in d["failures"].items():  # on stderr as the real run names them
            assert f"chiba-admin stage: {host}: {why}\n" in text.err, text
        assert ("refused; nothing was touched on any node" in text.err) == (code == 2)
        if code == 0:
            assert "replace" in text.out and "nothing was written" in text.out, text
        real = stage(topo, src, method, *args, "--json")
        assert real.code == code, real
        r = real.json()
        assert d["failures"] == r["failures"], "the same lines as the real run"
        assert d.get("refused") == r.get("refused")
        assert {h: x["ok"] for h, x in d["hosts"].items()} == \
            {h: x["ok"] for h, x in r["hosts"].items()}
        if method == "transit":  # the nodes the real run staged: now would be replaced
            want = {"ccn01": "would create" if not replace else "would replace"}
            want.update({h: "would replace" for h in TOWN1[1:] if replace})
            assert {h: a for h, a in actions(d).items() if a} == want


def test_unreachable_spool_fails_as_the_real_run_does(setup):
    """Rank 0 must reach the spool server: a dry run checks it, as the real run's first
    step does (exit 1, rank 0 named), and writes nothing."""
    topo, src, roots = setup
    args = ["--nodes", "@town2", "--spool-url", "http://127.0.0.1:1", "--json"]
    before = snapshot_hosts(roots)
    dry = stage(topo, src, "mpi-chain", *args, "--dry-run")
    assert_wrote_nothing(before, roots, dry)
    real = stage(topo, src, "mpi-chain", *args)
    assert dry.code == real.code == 1, (dry, real)
    d, r = dry.json(), real.json()
    assert list(d["failures"]) == list(r["failures"]) == ["ccn05"]
    assert d["failures"]["ccn05"].startswith("spool unreachable: http://127.0.0.1:1/")
    assert d["refused"] is r["refused"] is False


@pytest.mark.parametrize("method", ["mpi-chain", "transit"])
def test_bad_input_is_one_line_and_exit_2_writing_nothing(setup, tmp_path, method):
    topo, src, roots = setup
    with open(tmp_path / "a file", "w") as f:
        f.write("x\n")
    cases = [([str(tmp_path / "missing"), "--nodes", "@nodes"], "source does not exist"),
             ([src, "--nodes", "ccn[07-12]"], "unknown host"),
             ([src, "--nodes", ""], "node"),
             ([src, "--nodes", "@nodes", "--dest", "../out"], ".."),
             ([str(tmp_path / "a file"), "--nodes", "@nodes"], "not a directory")]
    if method == "transit":  # City Transit stages a single file too
        cases.pop()
    before = snapshot_hosts(roots)
    for args, what in cases:
        r = run_cli(topo, "stage", *args, *METHODS[method], "--dry-run")
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert r.code == 2 and len(lines) == 1 and what in lines[0] and r.out == "", r
    assert_wrote_nothing(before, roots, r)
