"""The peers (pdcp, clush --copy, sbcast): argv builders, digests, the bench's skip off the
testbed, slurm.conf; on the testbed: `up --slurm`, real copies checked byte for byte, down."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from chiba_admin.errors import InvalidRequest
from legacy_transit import peers

CLI = str(Path(sys.executable).with_name("chiba-admin"))


# -- argv builders (pure) -----------------------------------------------------------------

@pytest.mark.parametrize("nodes,width", [(1, 2), (4, 2), (8, 3), (16, 4), (32, 6),
                                         (64, 8), (256, 8)])
def test_tree_width_is_near_sqrt_within_sbcast_limits(nodes, width):
    assert peers.tree_width(nodes) == width


def test_pdcp_argv_uses_ssh_with_the_testbed_config_and_default_fanout():
    argv = peers.pdcp_argv(["/src/a", "/src/b"], "ccn[01-04]", "/scratch/x", "/st/ssh_config")
    assert argv[:3] == ["env", "PDSH_RCMD_TYPE=ssh", "PDSH_SSH_ARGS_APPEND=-F /st/ssh_config"]
    assert argv[3:] == ["pdcp", "-r", "-w", "ccn[01-04]", "/src/a", "/src/b", "/scratch/x"]
    assert "-f" not in argv  # pdsh's own default fan-out (32)
    assert peers.pdcp_argv(["/a"], "n1", "/d", "c", fanout=4)[7:9] == ["-f", "4"]


def test_clush_argv_copies_with_ssh_options_and_reports_failures():
    argv = peers.clush_argv(["/src/a"], "ccn[01-04]", "/scratch/x", "/st/ssh_config",
                            clush="/venv/bin/clush")
    assert argv == ["/venv/bin/clush", "-S", "-w", "ccn[01-04]", "-o", "-F /st/ssh_config",
                    "--copy", "/src/a", "--dest", "/scratch/x"]


def test_sbcast_argv_allocates_the_nodes_and_copies_each_file():
    one = peers.sbcast_argv(["/src/data.bin"], "ccn[01-08]", 8, "/scratch/x/", "/st/slurm.conf")
    assert one == ["env", "SLURM_CONF=/st/slurm.conf", "salloc", "--quiet", "-N", "8", "-w",
                   "ccn[01-08]", "sbcast", "-f", "/src/data.bin", "/scratch/x/data.bin"]
    tree = peers.sbcast_argv(["/s/a b", "/s/c"], "n[1-2]", 2, "/d", "/c", fanout=3)
    assert tree[-3:-1] == ["sh", "-c"]
    assert tree[-1] == "sbcast -f -F 3 '/s/a b' '/d/a b' && sbcast -f -F 3 /s/c /d/c"
    with pytest.raises(ValueError, match="outside 1..8"):
        peers.sbcast_argv(["/a"], "n1", 1, "/d", "/c", fanout=9)
    with pytest.raises(ValueError, match="no files"):
        peers.sbcast_argv([], "n1", 1, "/d", "/c")


def test_peer_argv_per_peer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(b"x")
    nodes = [f"ccn{i:02d}" for i in range(1, 9)]
    kw = {"ssh_config": "/st/ssh_config", "slurm_conf": "/st/slurm.conf"}
    assert peers.peer_argv("pdcp", src, nodes, "/scratch/d", **kw)[-2:] == [
        str(src / "data.bin"), "/scratch/d"]
    assert "ccn[01-08]" in peers.peer_argv("clush", src, nodes, "/scratch/d", **kw)
    star = peers.peer_argv("sbcast", src, nodes, "/scratch/d", **kw)
    assert "-F" not in star and star[star.index("-N") + 1] == "8"
    tree = peers.peer_argv("sbcast-tree", src, nodes, "/scratch/d", **kw)
    assert tree[tree.index("-F") + 1] == "3"
    with pytest.raises(ValueError, match="Slurm configuration"):
        peers.peer_argv("sbcast", src, nodes, "/d", ssh_config="c")


def test_sbcast_refuses_a_tree_of_files_and_unknown_peers(tmp_path):
    (tmp_path / "sub").mkdir()
    assert "single files" in peers.unsupported("sbcast", tmp_path)
    assert peers.unsupported("pdcp", tmp_path) is None
    assert "unknown peer" in peers.unsupported("scp", tmp_path)
    with pytest.raises(ValueError, match="single files"):
        peers.peer_argv("sbcast-tree", tmp_path, ["n1"], "/d", ssh_config="c",
                        slurm_conf="s")


# -- byte-for-byte check --------------------------------------------------------------------

def test_digests_match_real_sha256sum_and_name_what_differs(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(os.urandom(3 << 20))  # more than one read chunk
    (src / "d" / "b c").write_text("hello\n")
    cp = subprocess.run(["sh", "-c", peers.verify_script(str(src))], capture_output=True,
                        text=True, check=True)
    got = peers.parse_sha256sum(cp.stdout)
    want = peers.digest_tree(src)
    assert set(want) == {"a", "d/b c"}
    assert got == want and peers.compare_digests(want, got) is None
    bad = dict(got, a="0" * 64, extra="1" * 64)
    del bad["d/b c"]
    assert peers.compare_digests(want, bad) == (
        "1 missing (first d/b c); 1 differ (first a); 1 unexpected (first extra)")


def test_run_peer_reports_exit_code_and_output_tail():
    r = peers.run_peer(["sh", "-c", "echo one; echo two >&2; exit 3"])
    assert (r.ok, r.rc) == (False, 3)
    assert "two" in r.output and "one" in r.output
    assert peers.run_peer(["true"], wrap=lambda a: ["env"] + a).ok


# -- slurm.conf (pure) --------------------------------------------------------------------

def _plan(tmp_path, towns=1, per_town=4):
    import testbed
    from testbed.plan import plan_testbed

    topo = testbed.generated_topology(towns, per_town, 20e6, 200e6)
    return plan_testbed(topo, "abcd", 210, tmp_path)


def test_slurm_conf_names_controller_nodes_and_private_paths(tmp_path):
    from testbed import slurm

    plan = _plan(tmp_path)
    slay = slurm.SlurmLayout(tmp_path)
    text = slurm.slurm_conf(plan, slay)
    lines = text.splitlines()
    assert "SlurmctldHost=pres(10.210.0.1)" in lines
    assert [ln for ln in lines if ln.startswith("NodeName=")] == [
        f"NodeName=ccn0{i} NodeAddr=10.210.1.{i} CPUs=1 State=UNKNOWN" for i in range(1, 5)]
    for want in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                 f"SlurmdSpoolDir={tmp_path}/hosts/%n/slurm/spool",
                 f"SlurmdPidFile={tmp_path}/hosts/%n/slurm/slurmd.pid",
                 f"StateSaveLocation={tmp_path}/slurm/ctld",
                 f"MessageTimeout={slurm.MESSAGE_TIMEOUT}"):
        assert want in lines
    assert not any(ln.startswith("TreeWidth") for ln in lines)  # Slurm's default
    assert "TreeWidth=3" in slurm.slurm_conf(plan, slay, tree_width=3).splitlines()
    assert "CgroupPlugin=cgroup/v1" in slurm.CGROUP_CONF.splitlines()
    # every file Slurm writes lives under the state directory
    paths = [ln.split("=", 1)[1] for ln in lines if "=" in ln and "/" in ln.split("=", 1)[1]
             and not ln.startswith(("Proctrack", "TaskPlugin", "Auth", "Cred", "JobAcct",
                                    "Accounting", "JobComp", "Select", "MailProg"))]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    with pytest.raises(InvalidRequest, match="tree width"):
        slurm.slurm_conf(plan, slay, tree_width=0)


def test_up_slurm_without_the_tools_is_refused_before_anything(tmp_path, monkeypatch):
    import testbed
    from testbed import lifecycle, slurm, system

    monkeypatch.setattr(lifecycle, "_require_root", lambda what: None)
    monkeypatch.setattr(slurm, "missing_tools", lambda: ["slurmctld"])
    made = []
    monkeypatch.setattr(system, "ip_batch", lambda *a, **k: made.append(a))
    topo = testbed.generated_topology(1, 2, 20e6, 200e6)
    with pytest.raises(InvalidRequest, match="needs slurmctld"):
        lifecycle.up(topo, tmp_path / "st", slurm=True)
    assert made == [] and not (tmp_path / "st").exists()


# -- the bench off the testbed ----------------------------------------------------------------

def test_peers_are_stage_methods_and_skipped_with_the_reason_off_the_testbed(tmp_path):
    from chiba_admin.bench import aggregate, workloads
    from chiba_admin.commands.bench import _methods

    stage_m, _, _, _ = _methods("chain,pdcp,clush,sbcast,sbcast-tree")
    assert [m for m, _ in stage_m] == ["mpi", *peers.PEERS]
    site = SimpleNamespace(kind="embedded", node_names=lambda: ["n1", "n2"],
                           measure=contextlib.nullcontext,
                           wipe=lambda *a: None,  # the stage's final clean-up
                           cli=lambda *a: pytest.fail("no peer may run"))
    runs = workloads.stage(site, nodes=2, sizes=[1024], datas=["random"], repeat=2,
                           workdir=tmp_path, methods=workloads.PEER_METHODS)
    assert [r["method"] for r in runs] == list(peers.PEERS)  # once, not per repeat
    assert all(r["skipped"] == workloads.PEER_SKIP_REASON and r["repeat"] == 0
               for r in runs)
    # a skipped run is no case of the report (not a failure)
    assert aggregate.groups([{"cluster": {"kind": "embedded"}, "runs": runs}], "stage") == {}


# -- on the testbed -------------------------------------------------------------------------

def _ours(state: Path) -> list[int]:
    """PIDs of processes whose command line names the testbed's state directory."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(state).encode() in cmd:
                out.append(int(d))
    return out


@pytest.fixture(scope="module")
def slurm_testbed(tmp_path_factory):
    """A 1 x 4 testbed brought up with `chiba-admin testbed up --slurm` (the CLI)."""
    from support.testbed import require_testbed

    require_testbed()
    from testbed import slurm

    if slurm.missing_tools():
        pytest.skip(f"needs {', '.join(slurm.missing_tools())} (scripts/install-system-deps.sh)")
    import testbed

    state = tmp_path_factory.mktemp("slurmtb") / "state"
    munge_existed = os.path.exists(slurm.MUNGE_DIR)
    cp = subprocess.run([CLI, "--json", "testbed", "up", "--slurm", "--towns", "1",
                         "--nodes-per-town", "4", "--state", str(state)],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["slurm"] is True
    try:
        yield SimpleNamespace(tb=testbed.Testbed(state), state=state,
                              munge_existed=munge_existed)
    finally:
        if Path(state, "state.json").exists():
            testbed.down(state)


def _payload(tb, tmp_path, size=1 << 20) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(size))
    return src


def _copy_and_verify(tb, peer: str, src: Path, dest: str) -> None:
    nodes = tb.hosts_by_role("node")
    for n in nodes:
        tb.exec(n, ["mkdir", "-p", dest], check=True)
    argv = peers.peer_argv(peer, src, nodes, dest, ssh_config=tb.ssh_config,
                           slurm_conf=tb.slurm_conf,
                           clush=str(Path(sys.executable).with_name("clush")))
    with tb.measure() as m:
        r = peers.run_peer(argv, wrap=lambda a: tb.exec_argv(tb.president, a), timeout=300)
    assert r.ok, r.output
    want = peers.digest_tree(src)
    for n in nodes:
        got = peers.parse_sha256sum(tb.exec(n, ["sh", "-c", peers.verify_script(dest)],
                                            check=True).stdout)
        assert peers.compare_digests(want, got) is None, n
        # the bytes arrived over the node's own NIC, not through a shared filesystem
        assert m.delta[n]["rx_bytes"] >= src.joinpath("data.bin").stat().st_size
        tb.exec(n, ["rm", "-rf", dest], check=True)


@pytest.mark.testbed
def test_slurm_runs_one_daemon_per_host_in_its_namespaces(slurm_testbed):
    from testbed import slurm
    from testbed.state import State

    tb = slurm_testbed.tb
    st = State.load(tb.layout.state_file)
    procs = st.data["slurm"]
    assert set(procs) == {"slurmctld", "munged@pres", *(f"munged@{n}" for n in
                                                        tb.hosts_by_role("node")),
                          *(f"slurmd@{n}" for n in tb.hosts_by_role("node"))}
    for key, rec in procs.items():
        host = key.split("@")[1] if "@" in key else tb.president
        holder = st.proc("holders", host).pid
        for ns in ("net", "mnt", "uts"):
            assert os.readlink(f"/proc/{rec['pid']}/ns/{ns}") == \
                os.readlink(f"/proc/{holder}/ns/{ns}"), (key, ns)
    # each host's munged has its own socket directory; the machine's /run/munge is not it
    assert tb.exec("ccn01", ["ls", slurm.MUNGE_DIR], check=True).stdout.split() == [
        "munge.socket.2", "munge.socket.2.lock"]
    cp = tb.exec(tb.president, ["env", f"SLURM_CONF={tb.slurm_conf}", "sinfo", "-h", "-N",
                                "-o", "%N %T"], check=True)
    assert sorted(cp.stdout.split("\n")[:-1]) == [f"ccn0{i} idle" for i in range(1, 5)]


@pytest.mark.testbed
def test_a_second_slurm_up_is_refused_and_the_first_keeps_running(slurm_testbed):
    from testbed import slurm
    from testbed.state import State, proc_alive

    st = State.load(slurm_testbed.tb.layout.state_file)
    ctld = st.proc("slurm", "slurmctld")
    with pytest.raises(InvalidRequest, match="already up"):
        slurm.up(slurm_testbed.state)
    assert proc_alive(ctld)


@pytest.mark.testbed
@pytest.mark.parametrize("peer", ["sbcast", "sbcast-tree", "pdcp", "clush"])
def test_peer_copies_to_4_nodes_byte_for_byte(slurm_testbed, tmp_path, peer):
    tb = slurm_testbed.tb
    _copy_and_verify(tb, peer, _payload(tb, tmp_path), f"/scratch/peer-{peer}")


@pytest.mark.testbed
def test_down_leaves_nothing(slurm_testbed):
    """Run last in this module: processes, mounts, namespaces and files are gone."""
    from testbed import slurm

    tb, state = slurm_testbed.tb, slurm_testbed.state
    prefix = tb.plan.prefix
    assert _ours(state)  # the daemons name the state dir in their command lines
    cp = subprocess.run([CLI, "testbed", "down", "--state", str(state)], capture_output=True,
                        text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    assert _ours(state) == []
    for comm in ("munged", "slurmctld", "slurmd", "slurmstepd", "slurmscriptd", "sshd"):
        assert not [p for p in _ours(state) if Path(f"/proc/{p}/comm").exists()
                    and Path(f"/proc/{p}/comm").read_text().strip() == comm]
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix)]
    assert str(state) not in Path("/proc/self/mountinfo").read_text()
    # /run/munge goes with the last testbed (others may bind onto it: an rmdir would
    # unmount theirs)
    if not [ns for ns in os.listdir("/run/netns") if ns.startswith("chiba-")]:
        assert os.path.exists(slurm.MUNGE_DIR) == slurm_testbed.munge_existed
    assert not state.exists() or not any(state.iterdir())


def test_a_slurm_that_fails_to_start_is_a_failed_sbcast_run_not_the_end(tmp_path,
                                                                        monkeypatch):
    from chiba_admin.bench import workloads
    from chiba_admin.errors import TestbedError
    from testbed import slurm

    def broken(state):
        raise TestbedError("slurmd did not start", where="ccn02")

    monkeypatch.setattr(slurm, "is_up", lambda state: False)
    monkeypatch.setattr(slurm, "up", broken)
    host = SimpleNamespace(paths=SimpleNamespace(scratch="/scratch"))
    site = SimpleNamespace(kind="testbed", node_names=lambda: ["n1", "n2"],
                           topo=SimpleNamespace(host=lambda n: host), testbed_state=tmp_path,
                           wipe=lambda *a: None,
                           cli=lambda *a: pytest.fail("nothing may run"))
    runs = workloads.stage(site, nodes=2, sizes=[1024], datas=["random"], repeat=1,
                           workdir=tmp_path, methods=(("sbcast", None),))
    assert [(r["method"], r["ok"]) for r in runs] == [("sbcast", False)]
    assert "slurmd did not start" in runs[0]["failures"]["ccn02"]
