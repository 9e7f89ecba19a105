"""`stage --dry-run`, both methods, through the real CLI and real mpiexec on the embedded
cluster: it writes nothing anywhere (every host's tree and the home state directory,
spool included, snapshotted with inodes and ctimes around it), it says per node what the
real run would do ("would create", "would replace", or the real run's own refusal and exit
status), and the real run that follows agrees with it.
"""

from __future__ import annotations

import os
import re
import shutil

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
    assert d["bytes"] is None and d["phase_bytes"] == {}, "nothing packed, nothing crossed"
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
            want = {"ccn01": "would create" if not replace else
                    "would replace (an earlier stage's tree)"}
            if replace:  # what --replace would delete, said (City Transit deletes any entry)
                want.update({
                    "ccn02": "would replace (a directory no stage made, which --replace "
                             "deletes)",
                    "ccn03": "would replace (a file no stage made, which --replace deletes)",
                    "ccn04": "would replace (a symbolic link, which --replace deletes, not "
                             "what it points to)"})
            assert {h: a for h, a in actions(d).items() if a} == want
            assert {h: x["stage"] for h, x in d["hosts"].items() if not x["ok"]} == {
                h: "would fail at unpack" for h in refused}  # nothing was unpacked
        else:  # the refused nodes' rows say they were not staged and why
            assert {h: x["stage"] for h, x in d["hosts"].items() if not x["ok"]} == {
                h: "would fail at check" if h in refused else "would stop at check"
                for h in TOWN1}


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


# --- what the real run's prepare step meets: the lock, a dead run's leftovers -------------
BOTH = ["mpi-chain", "transit"]


def _hold(path: str) -> int:
    """An fd holding ``path``'s flock, as a live run of any method holds its lock."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _dry_then_real(setup, method: str, *args: str) -> tuple[dict, dict]:
    """The --json of a dry run (which must write nothing) and of the real run after it,
    both failing (exit 1)."""
    topo, src, roots = setup
    before = snapshot_hosts(roots)
    dry = stage(topo, src, method, *args, "--json", "--dry-run")
    assert_wrote_nothing(before, roots, dry)
    real = stage(topo, src, method, *args, "--json")
    assert dry.code == real.code == 1, (dry, real)
    return dry.json(), real.json()


@pytest.mark.parametrize("method", BOTH)
def test_a_lock_held_by_another_run_fails_the_dry_run_as_the_real_run(setup, method):
    """Another run writing ccn02's destination: the real run fails there (exit 1), and so
    does the dry run, with the same line, found from /proc/locks without taking the lock
    (before: "would create", exit 0)."""
    topo = setup[0]
    lock = host_path(topo, "ccn02", "scratch", ".proj.chiba-lock")
    fd = _hold(lock)
    try:
        d, r = _dry_then_real(setup, method, "--nodes", "ccn[01-02]")
        assert "another chiba-admin run is writing this destination" in d["failures"]["ccn02"]
        assert d["failures"] == r["failures"], "the same lines as the real run"
        assert d["hosts"]["ccn02"]["stage"] == ("would fail at prepare" if method != "transit"
                                                else "would fail at unpack")
    finally:
        os.close(fd)


def _plant(path: str, kind: str) -> None:
    """A lock file another user put in a scratch directory every user can write."""
    if kind == "symlink":
        os.symlink("/etc/passwd", path)
        return
    if kind == "file":
        open(path, "w").close()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    os.chown(path, 65534, 65534, follow_symlinks=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user needs root")
@pytest.mark.parametrize("kind", ["file", "fifo", "symlink", "directory"])
@pytest.mark.parametrize("method", BOTH)
def test_a_planted_lock_file_fails_the_dry_run_as_the_real_run(setup, method, kind):
    """A user plants .j2.chiba-lock in a shared (1777) directory of ccn01's scratch: the
    real run fails on ccn01 with one line naming the lock file (before: City Transit's
    "Traceback" for a directory in its place), and the dry run says the same (before:
    "would create", exit 0). The planted file is left as it was."""
    topo = setup[0]
    shared = host_path(topo, "ccn01", "scratch", "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    _plant(os.path.join(shared, ".j2.chiba-lock"), kind)
    d, r = _dry_then_real(setup, method, "--nodes", "ccn[01-02]", "--dest", "shared/j2")
    why = d["failures"]["ccn01"]
    assert "/scratch/shared/j2: lock file .j2.chiba-lock " in why, why
    assert ("is a symbolic link" if kind == "symlink" else "belongs to uid 65534") in why
    assert "Traceback" not in why and "\n" not in why
    assert d["failures"] == r["failures"], "the same lines as the real run"
    assert os.lstat(os.path.join(shared, ".j2.chiba-lock")).st_uid == \
        (0 if kind == "symlink" else 65534)


DEAD = ".ee.chiba-stage-bbbbbbbbbbbb.old"  # a dead run's moved-aside copy of "ee"


def _dead_copy(topo, node: str) -> str:
    path = host_path(topo, node, "scratch", DEAD)
    os.mkdir(path)
    with open(os.path.join(path, "f"), "w") as f:
        f.write("old\n")
    return path


def test_a_dead_runs_moved_aside_copy_is_forecast_and_the_refusal_says_it_was_put_back(
        setup):
    """A run died between moving /scratch/ee aside and moving its new tree in. The real
    run's prepare puts that copy back first (clean_stale), then refuses it without
    --replace (exit 2); the dry run says so, and with --replace that it would replace it
    (before: "would create" on both nodes, exit 0). The real run's last line says what it
    put back (before: "refused; nothing was touched on any node")."""
    topo, src, roots = setup
    _dead_copy(topo, "ccn01")
    args = ["--nodes", "ccn[01-02]", "--dest", "ee"]
    before = snapshot_hosts(roots)
    rep = stage(topo, src, "mpi-chain", *args, "--replace", "--dry-run", "--json")
    dry = stage(topo, src, "mpi-chain", *args, "--dry-run", "--json")
    text = stage(topo, src, "mpi-chain", *args, "--dry-run")
    assert_wrote_nothing(before, roots, text)
    assert rep.code == 0, rep
    assert actions(rep.json()) == {
        "ccn01": f"would replace (a directory no stage made, which --replace deletes, once "
                 f"put back from {DEAD})", "ccn02": "would create"}
    assert dry.code == text.code == 2, (dry, text)
    d = dry.json()
    assert list(d["failures"]) == ["ccn01"] and d["refused"] is True
    assert DEAD in d["failures"]["ccn01"] and "pass --replace" in d["failures"]["ccn01"]
    assert d["hosts"]["ccn01"]["stage"] == "would fail at prepare"
    assert d["hosts"]["ccn02"]["stage"] == "would stop at prepare"
    assert d["outcome"] == f"ccn01 would put back /scratch/ee from {DEAD}, a copy a dead " \
        "run had moved aside"
    assert "nothing was touched on any node" not in text.err, text
    assert f"would put back /scratch/ee from {DEAD}" in text.err.splitlines()[-1], text
    real = stage(topo, src, "mpi-chain", *args, "--json")
    assert real.code == 2, real
    r = real.json()
    assert list(r["failures"]) == ["ccn01"] and DEAD in r["failures"]["ccn01"]
    assert r["outcome"] == f"ccn01 put back /scratch/ee from {DEAD}, a copy a dead run " \
        "had moved aside"
    with open(host_path(topo, "ccn01", "scratch", "ee/f")) as f:
        assert f.read() == "old\n"  # as the dry run said: put back, then refused
    shutil.rmtree(host_path(topo, "ccn01", "scratch", "ee"))
    _dead_copy(topo, "ccn02")
    text = stage(topo, src, "mpi-chain", *args)
    assert text.code == 2 and "nothing was touched on any node" not in text.err, text
    assert text.err.splitlines()[-1] == (
        f"chiba-admin stage: refused; ccn02 put back /scratch/ee from {DEAD}, a copy a dead "
        "run had moved aside; nothing else was touched on any node"), text


def test_a_live_runs_moved_aside_copy_is_left_alone(setup):
    """A copy moved aside by a run still alive (its flock held) is not put back by the
    real run, and the dry run, reading /proc/locks, says "would create" too."""
    topo, src, roots = setup
    live = _dead_copy(topo, "ccn01")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        args = ["--nodes", "ccn01", "--dest", "ee", "--json"]
        dry = stage(topo, src, "mpi-chain", *args, "--dry-run")
        assert dry.code == 0 and actions(dry.json()) == {"ccn01": "would create"}, dry
        real = stage(topo, src, "mpi-chain", *args)
        assert real.code == 0 and os.path.isdir(live), real
    finally:
        os.close(fd)


@pytest.mark.parametrize("method", BOTH)
def test_missing_parents_and_symlinked_parents_are_named_as_the_host_names_them(setup,
                                                                                method):
    """--dest a/b/c on fresh nodes: the parents would be made, said; a symlink on the way
    is named by its host path (City Transit named the state directory's path)."""
    topo, src, roots = setup
    dry = stage(topo, src, method, "--nodes", "ccn01", "--dest", "a/b/c", "--dry-run")
    assert dry.code == 0, dry
    assert "create (and the missing parent directories, from /scratch/a)" in dry.out
    # what each method counts, named: Transit regular files, MPI's packer every entry
    word = "regular files" if method == "transit" else r"entries \(directories included\)"
    assert re.search(rf"^source: \d+ {word}, ", dry.out, re.M), dry
    os.symlink("/tmp", host_path(topo, "ccn01", "scratch", "jobdir"))
    for extra in (["--dry-run"], []):
        r = stage(topo, src, method, "--nodes", "ccn01", "--dest", "jobdir/x", "--json",
                  *extra)
        why = r.json()["failures"]["ccn01"]
        assert "/scratch/jobdir: is a symbolic link" in why and topo.state_dir not in why, r


# --- the spools the bytes would go through ------------------------------------------------
def test_transit_dry_run_checks_each_mayors_spool(setup):
    """A mayor without its spool directory: the real run fails that town at to_mayors
    (exit 1); the dry run says so for the same nodes (before: every node "would
    create", exit 0)."""
    topo, src, roots = setup
    spool = host_path(topo, "mayor1", "spool")
    os.rename(spool, spool + ".off")
    args = ["--nodes", "@nodes", "--json"]
    dry = stage(topo, src, "transit", *args, "--dry-run")
    real = stage(topo, src, "transit", *args)
    assert dry.code == real.code == 1, (dry, real)
    d, r = dry.json(), real.json()
    assert sorted(d["failures"]) == sorted(r["failures"]) == TOWN1
    for h in TOWN1:
        for why in (d["failures"][h], r["failures"][h]):
            assert why.startswith("to_mayors: mayor mayor1: ") and \
                "spool directory /var/spool/chiba is missing" in why, why
        assert d["hosts"][h]["stage"] == "would fail at to_mayors"
    assert all(d["hosts"][h]["ok"] for h in NODES[4:])


def test_transit_dry_run_checks_the_presidents_spool_when_home_is_elsewhere(tmp_path):
    """Home server mayor2: the real run first copies the tar to the president's spool; with
    that spool missing, every node fails at to_president, in the dry run too (before: the
    dry run only ran `true` there)."""
    from chiba_admin.embedded import bind, init_cluster
    from support.cluster import DEMO
    from topology import load_topology

    with open(DEMO) as f:
        text = f.read().replace('kind = "embedded"', 'kind = "embedded"\nhome = "mayor2"')
    cluster = tmp_path / "home-mayor2.toml"
    cluster.write_text(text)
    topo = bind(load_topology(str(cluster)), tmp_path / "state")
    init_cluster(topo)
    src = make_tree(tmp_path / "proj", big=1000)
    spool = host_path(topo, "pres", "spool")
    os.rename(spool, spool + ".off")
    args = ["--cluster", str(cluster), "stage", str(src), "--method", "transit",
            "--nodes", "ccn[01,05]", "--json"]
    dry = run_cli(topo, *args, "--dry-run")
    real = run_cli(topo, *args)
    assert dry.code == real.code == 1, (dry, real)
    d, r = dry.json(), real.json()
    assert d["plan"]["via"] == "pres"
    for h in ("ccn01", "ccn05"):
        for why in (d["failures"][h], r["failures"][h]):
            assert why.startswith("to_president: ") and \
                "spool directory /var/spool/chiba is missing" in why, why


class _Refusing:
    """A --spool-url server that answers every request with ``code``."""

    def __init__(self, code: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server naming
                self.send_error(code)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("code", [403, 500])
def test_a_spool_server_that_refuses_fails_the_dry_run_as_the_real_run(setup, code):
    """A --spool-url server answering 403 or 500 fails the real run's download on rank 0;
    the dry run fails too, with its line (before: any HTTP answer passed as reachable);
    the other ranks name the spool check (before: "the source check failed")."""
    topo, src, roots = setup
    server = _Refusing(code)
    try:
        args = ["--nodes", "@town2", "--spool-url", server.url, "--json"]
        dry = stage(topo, src, "mpi-chain", *args, "--dry-run")
        real = stage(topo, src, "mpi-chain", *args)
    finally:
        server.close()
    assert dry.code == real.code == 1, (dry, real)
    d, r = dry.json(), real.json()
    assert list(d["failures"]) == list(r["failures"]) == ["ccn05"]
    for why in (d["failures"]["ccn05"], r["failures"]["ccn05"]):
        assert why.startswith(f"spool: {server.url}/") and f"HTTP {code} " in why, why
    assert {h: x["error"] for h, x in d["hosts"].items() if h != "ccn05"} == {
        h: "not started: the spool check failed on ccn05" for h in NODES[5:]}
