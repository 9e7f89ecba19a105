"""The launcher's pure half: mpiexec argv and env from a topology; failure parsing; job specs."""

from __future__ import annotations

import os

import pytest

from support.cluster import DEMO, REPO

from mpitools.common.launch import (RANK_HOSTS_ENV, LaunchResult, _blame, _parse_failures,
                               build_command)
from mpitools.common.runtime import encode_job, load_job
from topology import load_topology, loads_topology

_SSH = """
[cluster]
name = "lab"
kind = "ssh"
[links.core]
bandwidth = "200Mbit"
[links.town]
bandwidth = "20Mbit"
[president]
name = "pres"
address = "10.9.0.1"
[mayors.m1]
[mayors.m2]
[towns.t1]
mayor = "m1"
nodes = "n[1-3]"
[towns.t2]
mayor = "m2"
nodes = "n[4-6]"
[mpi]
mpiexec = "/opt/ompi/bin/mpiexec"
python = "/opt/venv/bin/python"
btl_tcp_if_include = "10.9.0.0/16"
prte_if_include = "10.9.0.0/16"
plm_ssh_args = "-F /etc/chiba/ssh_config"
args = "--mca mpi_yield_when_idle 1"
env = { OMP_NUM_THREADS = "1" }
"""


def test_embedded_command_runs_everything_here_oversubscribed():
    topo = load_topology(DEMO)
    plan = build_command(topo, "mpitools.stage.ranks", ["b64:xx"], ["ccn05", "ccn01"],
                         as_root=True)
    a = plan.argv
    assert a[1] == "--allow-run-as-root" and a[a.index("-n") + 1] == "2"
    assert "--oversubscribe" in a and a[a.index("--bind-to") + 1] == "none"
    assert "--host" not in a and "-x" not in a
    assert a[-4:] == [a[-4], "-m", "mpitools.stage.ranks", "b64:xx"]
    assert plan.env[RANK_HOSTS_ENV] == "ccn05,ccn01"
    assert plan.env["PYTHONPATH"].split(":")[0] == str(REPO)
    assert plan.env["OPENBLAS_NUM_THREADS"] == "1"
    # no hardware probing of libfabric/UCX in every local rank's MPI_Init
    assert a[a.index("btl") - 1:a.index("btl") + 2] == ["--mca", "btl", "^ofi,uct"]
    assert "--allow-run-as-root" not in build_command(topo, "m", [], ["ccn01"]).argv
    assert a[a.index("mpi_yield_when_idle") - 1:a.index("mpi_yield_when_idle") + 2] == [
        "--mca", "mpi_yield_when_idle", "1"]


def test_ranks_yield_the_core_in_blocking_calls_unless_the_topology_says_otherwise():
    """Ranks blocked in a collective or MPI_Finalize yield instead of spinning, also where
    Open MPI does not know a host is shared; the topology's own setting is kept, once."""
    plain = _SSH.replace('args = "--mca mpi_yield_when_idle 1"\n', "")
    assert "mpi_yield_when_idle" not in plain
    a = build_command(loads_topology(plain), "m", [], ["n1", "n2"]).argv
    i = a.index("mpi_yield_when_idle")
    assert a[i - 1:i + 2] == ["--mca", "mpi_yield_when_idle", "1"] and i < a.index("-m")
    own = _SSH.replace("mpi_yield_when_idle 1", "mpi_yield_when_idle 0")
    a = build_command(loads_topology(own), "m", [], ["n1", "n2"]).argv
    assert a.count("mpi_yield_when_idle") == 1 and a[a.index("mpi_yield_when_idle") + 1] == "0"
    # the site's setting in [mpi] env is its own too; a parameter merely named alike is not
    env = plain.replace('env = { OMP_NUM_THREADS = "1" }',
                        'env = { OMP_NUM_THREADS = "1", OMPI_MCA_mpi_yield_when_idle = "0" }')
    assert "mpi_yield_when_idle" not in build_command(loads_topology(env), "m", [], ["n1"]).argv
    alike = _SSH.replace("mpi_yield_when_idle 1", "mpi_yield_when_idle_x 1")
    a = build_command(loads_topology(alike), "m", [], ["n1"]).argv
    assert a[a.index("mpi_yield_when_idle") + 1] == "1"


def test_the_forced_setting_is_named_for_the_ranks_and_only_when_forced():
    plain = _SSH.replace('args = "--mca mpi_yield_when_idle 1"\n', "")
    plan = build_command(loads_topology(plain), "m", [], ["n1", "n2"])
    assert plan.env["CHIBA_FORCED_ENV"] == "OMPI_MCA_mpi_yield_when_idle"
    assert plan.argv[plan.argv.index("CHIBA_FORCED_ENV") - 1] == "-x"  # reaches remote ranks
    assert "UCX_MEM_EVENTS" not in plan.env  # an SSH cluster's hosts may use UCX
    # nothing forced: the list is set, empty, so that one from the operator's environment
    # (CHIBA_* reaches the ranks) cannot name what users' commands lose
    site = build_command(loads_topology(_SSH), "m", [], ["n1", "n2"])
    assert site.env["CHIBA_FORCED_ENV"] == ""
    user = build_command(loads_topology(plain), "m", [], ["n1", "n2"], tool=False)
    assert "CHIBA_FORCED_ENV" not in user.env


def test_embedded_ranks_skip_ucx_memory_hooks_unless_the_site_says(embedded):
    """Loading libmpi loads UCX, whose memory hooks cost each rank 20 ms of CPU; the
    embedded cluster never selects UCX, so our ranks turn them off, and say so."""
    plan = build_command(embedded, "m", [], ["ccn01", "ccn02"])
    assert plan.env["UCX_MEM_EVENTS"] == "no"
    assert plan.env["CHIBA_FORCED_ENV"] == "OMPI_MCA_mpi_yield_when_idle,UCX_MEM_EVENTS"
    user = build_command(embedded, "m", [], ["ccn01", "ccn02"], tool=False)
    assert "UCX_MEM_EVENTS" not in user.env and "CHIBA_FORCED_ENV" not in user.env
    site = build_command(embedded, "m", [], ["ccn01"], env={"UCX_MEM_EVENTS": "yes"})
    assert site.env["UCX_MEM_EVENTS"] == "yes"
    assert site.env["CHIBA_FORCED_ENV"] == "OMPI_MCA_mpi_yield_when_idle"


def test_the_operators_own_ucx_setting_stands(embedded, monkeypatch):
    monkeypatch.setenv("UCX_MEM_EVENTS", "yes")
    plan = build_command(embedded, "m", [], ["ccn01"])
    assert "UCX_MEM_EVENTS" not in plan.env  # the operator's, inherited as it is
    assert plan.env["CHIBA_FORCED_ENV"] == "OMPI_MCA_mpi_yield_when_idle"


def test_a_users_command_does_not_inherit_what_was_forced_on_the_ranks(monkeypatch):
    from mpitools.common.runtime import user_environ

    monkeypatch.setenv("CHIBA_FORCED_ENV", "OMPI_MCA_mpi_yield_when_idle,UCX_MEM_EVENTS")
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "1")
    monkeypatch.setenv("UCX_MEM_EVENTS", "no")
    monkeypatch.setenv("OMPI_MCA_btl_tcp_links", "2")  # the site's: kept
    env = user_environ()
    assert "OMPI_MCA_mpi_yield_when_idle" not in env and "CHIBA_FORCED_ENV" not in env
    assert "UCX_MEM_EVENTS" not in env
    assert env["OMPI_MCA_btl_tcp_links"] == "2"
    # a list that names more than the launcher forces takes nothing else away
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/site/lib")
    monkeypatch.setenv("CHIBA_FORCED_ENV", "PATH,LD_LIBRARY_PATH,OMPI_MCA_mpi_yield_when_idle")
    env = user_environ()
    assert env["PATH"] == os.environ["PATH"] and env["LD_LIBRARY_PATH"] == "/opt/site/lib"
    assert "OMPI_MCA_mpi_yield_when_idle" not in env
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "1")
    monkeypatch.delenv("CHIBA_FORCED_ENV")  # the site's own setting ([mpi] args): kept
    assert user_environ()["OMPI_MCA_mpi_yield_when_idle"] == "1"


def test_a_command_run_by_fresh_ranks_sees_no_forced_setting(embedded, cli):
    """Through real mpiexec: the ranks run with OMPI_MCA_mpi_yield_when_idle (Open MPI
    passes --mca on that way) and UCX_MEM_EVENTS=no, the user's command sees neither."""
    r = cli("--json", "run", "--launch", "mpiexec", "-w", "ccn01", "--", "env")
    assert r.code == 0, r.err
    out = r.json()["hosts"]["ccn01"]["stdout"]
    assert "CHIBA_HOST=ccn01" in out  # the command's own environment is there
    assert "OMPI_MCA_mpi_yield_when_idle" not in out and "CHIBA_FORCED_ENV" not in out
    assert "UCX_MEM_EVENTS" not in out


def test_a_users_mpi_program_is_not_made_to_yield():
    """The shell's --mpi=openmpi line runs the user's program: Open MPI's own choice stands
    (only a topology's [mpi] args, the site's, still apply)."""
    from mpitools.shell.openmpi import launcher

    plain = _SSH.replace('args = "--mca mpi_yield_when_idle 1"\n', "")
    assert "mpi_yield_when_idle" not in launcher(loads_topology(plain), ["n1", "n2"], 1)["argv"]
    assert "mpi_yield_when_idle" not in launcher(load_topology(DEMO), ["ccn01"], 1)["argv"]
    site = launcher(loads_topology(_SSH), ["n1", "n2"], 1)["argv"]
    assert site.count("mpi_yield_when_idle") == 1


def test_ssh_command_uses_hosts_in_town_order_and_mpi_table():
    from mpitools.common.launch import rank_hosts

    topo = loads_topology(_SSH)
    ranks = rank_hosts(topo, ["n5", "n1", "n4", "n2"])
    assert ranks == ["n1", "n2", "n4", "n5"]
    plan = build_command(topo, "mpitools.stage.ranks", ["J"], ranks, env={"CHIBA_EXAMPLE": "1"})
    a = plan.argv
    assert a[0] == "/opt/ompi/bin/mpiexec" and "--allow-run-as-root" not in a
    assert a[a.index("--host") + 1] == "n1:1,n2:1,n4:1,n5:1"
    assert a[a.index("--bind-to") + 1] == "none" and "--oversubscribe" not in a
    s = " ".join(a)
    assert "--mca btl tcp,self" in s and "--mca btl_tcp_if_include 10.9.0.0/16" in s
    assert "^ofi" not in s  # real clusters keep their fabric transports
    assert "-x OPENBLAS_NUM_THREADS" in s
    assert "--prtemca prte_if_include 10.9.0.0/16" in s
    assert a[a.index("plm_ssh_args") + 1] == "-F /etc/chiba/ssh_config"
    assert "--mca mpi_yield_when_idle 1" in s and a.count("mpi_yield_when_idle") == 1
    forwarded = {a[i + 1] for i, x in enumerate(a) if x == "-x"}
    assert {"CHIBA_RANK_HOSTS", "PYTHONPATH", "OMP_NUM_THREADS", "CHIBA_EXAMPLE"} <= forwarded
    assert a[-4:] == ["/opt/venv/bin/python", "-m", "mpitools.stage.ranks", "J"]
    assert plan.env["OMP_NUM_THREADS"] == "1"
    assert "mpitools.stage.ranks" in plan.shell()


def test_root_rank_comes_first():
    from mpitools.common.launch import rank_hosts

    topo = loads_topology(_SSH)
    assert rank_hosts(topo, ["n4", "n1"], "pres") == ["pres", "n1", "n4"]


def test_parse_prterun_death_message():
    msg = """--------------------------------------------------------------------------
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-vm-5968@1,2]
   Exit code:    9
--------------------------------------------------------------------------"""
    assert _parse_failures(msg) == {2: "process exited with status 9"}
    r = LaunchResult(["mpiexec"], ("a", "b", "c"), 9, None, stderr=msg,
                     failed_ranks=_parse_failures(msg))
    assert r.failed_hosts() == {"c": "process exited with status 9"}
    assert "c (process exited with status 9)" in r.describe() and not r.ok
    assert _parse_failures("MPI_ABORT was invoked on rank 1 in communicator") == {
        1: "rank aborted the job (see its error above)"}


def test_job_spec_round_trip_survives_any_characters():
    job = {"dests": {"a": "/scratch/we\"ird $(x)\nname"}, "n": 3}
    word = encode_job(job)
    assert word.startswith("b64:") and all(c.isalnum() or c in "-_=:" for c in word)
    assert load_job(word) == job


def test_blame_prefers_the_loss_the_runtime_confirms():
    # rank 5 exited; rank 6 saw it and aborted; the abort killed rank 1 under rank 0's send
    events = [{"event": "peer-lost", "rank": 6, "peer": 5, "why": "PROC_FAILED"},
              {"event": "peer-lost", "rank": 0, "peer": 1, "why": "PROC_FAILED"}]
    parsed = {5: "process exited with status 9", 6: "rank aborted the job (see its error above)"}
    assert list(_blame(events, parsed)) == [5]
    # nothing confirmed by the runtime (a link down): every reported loss stands
    assert sorted(_blame(events, {})) == [1, 5]


# --- the runtime's own diagnosis, from messages captured on this machine (Open MPI 5.0.11) ----
DATA = REPO / "tests" / "data" / "ompi5"


def _captured(name: str) -> str:
    return "\n".join((DATA / f).read_text() for f in sorted(os.listdir(DATA))
                     if f.startswith(name + "."))


def test_kill_9_of_a_rank_names_it_although_the_message_is_wrapped():
    # prterun wraps "... rank 2 with PID n on node vm exited on\nsignal 9 (Killed)."
    from mpitools.common.diagnose import parse_runtime

    text = _captured("kill9_rank2_embedded")
    assert "exited on\nsignal 9" in text
    rep = parse_runtime(text)
    assert rep.ranks == {2: "process killed by signal 9 (Killed)"}
    assert not rep.daemons and not rep.daemon_crash
    r = LaunchResult(["mpiexec"], ("ccn01", "ccn02", "ccn03", "ccn04"), 137, None,
                     stderr=text, failed_ranks=_blame([], dict(rep.ranks)))
    assert r.failed_hosts() == {"ccn03": "process killed by signal 9 (Killed)"}
    assert "ccn03 (process killed by signal 9 (Killed))" in r.describe()
    assert "status 137" not in r.describe()


def test_daemon_crash_names_the_host_and_the_runtimes_reason():
    # prte_if_include matching two NICs of mayor1: its prted segfaulted at start-up; ssh
    # says nothing and prterun prints its help message on stdout
    from mpitools.common.diagnose import parse_runtime
    from mpitools.common.launch import _daemon_failures

    rep = parse_runtime(_captured("badif_mayor1"))
    assert rep.daemons == {"mayor1": "its MPI daemon (prted) failed to report back "
                                     "(exit status 255)"}
    assert rep.daemon_crash and not rep.ranks and not rep.ssh
    assert rep.explanation[0] == "A daemon failed to report back after being spawned."
    hosts = ("pres", "mayor1", "mayor2")
    r = LaunchResult(["mpiexec"], hosts, 255, None, explanation=list(rep.explanation),
                     failed_daemons=_daemon_failures(loads_topology(_SSH), rep, hosts))
    # only mayor1 is blamed, with the runtime's own words (every tool shows this reason)
    assert list(r.failed_hosts()) == ["mayor1"]
    assert r.failed_hosts()["mayor1"].endswith(
        'so it crashed; Open MPI: "A daemon failed to report back after being spawned."')
    d = r.describe()
    assert d.startswith("MPI start-up failed on mayor1: its MPI daemon (prted) failed to "
                        "report back (exit status 255) and ssh reported no error, so it "
                        "crashed")
    assert '"A daemon failed to report back after being spawned."' in d


def test_daemon_behind_a_dead_sshd_gets_sshs_line_and_is_no_crash():
    from mpitools.common.diagnose import parse_runtime
    from mpitools.common.launch import _daemon_failures

    text = _captured("sshd_down_ccn03")
    rep = parse_runtime(text)
    assert rep.daemons and not rep.daemon_crash  # no retry: ssh said why
    topo = loads_topology(_SSH.replace('[towns.t1]', '[hosts.ccn03]\ntown = "t1"\n'
                                       'address = "10.201.1.3"\n[towns.t1]'))
    got = _daemon_failures(topo, rep, ("pres", "ccn03"))
    assert got == {"ccn03": "ssh: connect to host 10.201.1.3 port 22: Connection refused"}


def test_ulfm_abort_by_a_witness_is_not_blamed_on_the_witness_alone():
    from mpitools.common.diagnose import parse_runtime

    rep = parse_runtime(_captured("kill9_rank3_ulfm_testbed"))
    assert rep.ranks == {0: "rank aborted the job (see its error above)"}
    # with the ping program's peer-lost event the killed rank is the one named
    events = [{"event": "peer-lost", "rank": 0, "peer": 3, "why": "MPI_ERR_PROC_FAILED"}]
    assert list(_blame(events, dict(rep.ranks))) == [3]


_FAKE_MPIEXEC = """#!/bin/sh
# a stand-in for mpiexec: attempt 1 prints a captured daemon crash, later ones succeed
n=$(cat "$FAKE_DIR/count" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$FAKE_DIR/count"
if [ "$n" -le "$FAKE_FAILS" ]; then
  cat "$FAKE_DIR/stdout"; echo "[pres:1] plm:ssh: Warning: setpgid failed" >&2; exit 255
fi
echo '@@chiba {"event": "start", "size": 1}'
echo '@@chiba {"event": "result", "ok": true}'
"""


def _fake(tmp_path, monkeypatch, fails: int, stdout_capture: str = "badif_mayor1.stdout"):
    exe = tmp_path / "mpiexec"
    exe.write_text(_FAKE_MPIEXEC)
    exe.chmod(0o755)
    (tmp_path / "stdout").write_text((DATA / stdout_capture).read_text())
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_FAILS", str(fails))
    topo = loads_topology(_SSH.replace('mpiexec = "/opt/ompi/bin/mpiexec"',
                                       f'mpiexec = "{exe}"'))
    return topo


def test_daemon_crash_at_start_up_is_retried_once_and_reported(tmp_path, monkeypatch, capsys):
    from chiba_admin import console
    from mpitools.common.launch import launch

    console.configure()
    res = launch(_fake(tmp_path, monkeypatch, 1), "m", [], ["m1", "m2"])
    assert res.ok and res.retried and "mayor1" in res.retried
    assert (tmp_path / "count").read_text().strip() == "2"
    err = capsys.readouterr().err
    assert "MPI start-up failed on mayor1" in err and "retrying once" in err
    # a second crash is not retried again: it is the result, blaming only mayor1
    (tmp_path / "count").unlink()
    res = launch(_fake(tmp_path, monkeypatch, 5), "m", [], ["m1", "m2"])
    assert not res.ok and (tmp_path / "count").read_text().strip() == "2"
    assert list(res.failed_hosts()) == ["mayor1"] and res.retried
    # the topology restricts interfaces: the reason says where to look
    assert res.failed_hosts()["mayor1"].endswith("`chiba-admin cluster check` lists them)")


def test_no_retry_when_ssh_says_why_and_v_shows_command_and_output(tmp_path, monkeypatch,
                                                                    capsys):
    from chiba_admin import console
    from mpitools.common.launch import launch

    topo = _fake(tmp_path, monkeypatch, 1, "sshd_down_ccn03.stdout")
    text = (tmp_path / "stdout").read_text().replace("Remote host:   ccn03", "Remote host:   n3")
    (tmp_path / "stdout").write_text(text + "ssh: connect to host n3 port 22: Connection "
                                     "refused\n")
    console.configure(verbose=1)
    try:
        res = launch(topo, "mpitools.ping.ranks", ["J"], ["n3"])
    finally:
        console.configure()
    assert not res.ok and not res.retried
    assert (tmp_path / "count").read_text().strip() == "1"
    assert res.failed_hosts() == {"n3": "ssh: connect to host n3 port 22: Connection refused"}
    err = capsys.readouterr().err
    assert "mpiexec command: " in err and "mpitools.ping.ranks J" in err
    assert "A daemon failed to report back" in err and "setpgid" in err


@pytest.mark.mpi
def test_kill_9_of_a_rank_blames_only_its_host_through_real_mpiexec(embedded):
    """The embedded job of the issue: every host was told "mpiexec exited with status 137"."""
    import signal

    from mpitools.common.launch import launch

    def on_event(ev):
        if ev.get("event") == "holding" and ev.get("rank") == 2:
            os.kill(int(ev["pid"]), signal.SIGKILL)

    hold = {"point": "ping.start", "do": "sleep", "seconds": 120, "announce": True}
    res = launch(embedded, "mpitools.ping.ranks", [encode_job({"faults": [hold]})],
                 ["ccn01", "ccn02", "ccn03", "ccn04"], timeout=120, on_event=on_event)
    assert not res.ok and res.returncode == 137
    assert res.failed_hosts() == {"ccn03": "process killed by signal 9 (Killed)"}
    assert res.describe() == "rank(s) died: ccn03 (process killed by signal 9 (Killed))"


_CHATTY_MPIEXEC = """#!/bin/sh
# a stand-in for mpiexec whose ranks never pause: an event every 20 ms for 6 s
echo '@@chiba {"event": "start", "size": 1}'
i=0
while [ $i -lt 300 ]; do echo '@@chiba {"event": "progress", "done": 1}'; sleep 0.02; i=$((i + 1)); done
echo '@@chiba {"event": "result", "ok": true}'
"""


def test_timeout_holds_while_the_ranks_keep_printing(tmp_path):
    """--timeout was checked only when output paused for 0.1 s: a job printing steadily
    ran to its end. Now it is stopped at the deadline."""
    from mpitools.common.launch import launch

    exe = tmp_path / "mpiexec"
    exe.write_text(_CHATTY_MPIEXEC)
    exe.chmod(0o755)
    topo = loads_topology(_SSH.replace('mpiexec = "/opt/ompi/bin/mpiexec"', f'mpiexec = "{exe}"'))
    res = launch(topo, "m", [], ["m1"], timeout=0.5, retry=False)
    assert res.timed_out and res.result is None
