"""The long-running MPI service (issue 19) on the embedded cluster, with the real mpiexec:
start/status/stop, the tools through it giving what a fresh launch gives, a request from
another uid refused, a rank killed while idle and one mid-request, and nothing left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpitools.common.unixsock import Pause
from mpitools.service import driver
from support.compare import without_timings as _strip

REPO = Path(__file__).resolve().parent.parent
NODES = [f"ccn0{i}" for i in range(1, 9)]
def _service_procs(state: dict) -> list[str]:
    """``ps`` lines of the service still running (its mpiexec's session, or its ranks'
    command line); an exited rank not yet reaped by its new parent runs nothing."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True,
                        text=True, check=True).stdout
    job_arg = state["argv"][-1]
    return [ln for ln in ps.splitlines() if not ln.split()[2].startswith("Z")
            and (ln.split()[1] == str(state["pid"]) or job_arg in ln)]


def _rank_pid(state: dict, host: str) -> int:
    """The pid of the worker rank of ``host`` (world rank from Open MPI's environment)."""
    want = state["hosts"].index(host, 1)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if (b"mpitools.service.ranks" in cmd and state["argv"][-1].encode() in cmd
                and f"OMPI_COMM_WORLD_RANK={want}".encode() in env):
            return int(d)
    raise AssertionError(f"no rank of {host}")


@pytest.fixture
def service(embedded):
    """A started service; stopped afterwards, and nothing of it may be left running."""
    res = driver.start(embedded)
    state = json.loads((driver.service_dir(embedded) / "state.json").read_text())
    yield res, state
    driver.stop(embedded)
    assert _service_procs(state) == []


def _wait_ended(state: dict) -> None:
    """Block until mpiexec (our child: this process started it) has exited."""
    try:
        os.waitpid(state["pid"], 0)
    except ChildProcessError:
        pass


def test_pause_backs_off_to_the_deep_cap_only_after_long_idle(monkeypatch):
    now = [0.0]
    slept = []
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    p = Pause(cap=0.05, linger=0.5, deep=(30.0, 0.25), wait=slept.append)
    for t in (0.1, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0):
        now[0] = t
        p.after(False, False)
    assert slept[0] == 0.001 and max(slept) == 0.05
    for t in (31.0, 32.0, 33.0, 34.0):
        now[0] = t
        p.after(False, False)
    assert slept[-1] == 0.25
    now[0] = 35.0
    p.after(True, False)   # a request: back to 1 ms between tests
    now[0] = 35.1
    p.after(False, False)
    assert slept[-1] == 0.001


def test_service_rank_imports_lean():
    heavy = ("rich", "click", "networkx", "topology", "numpy", "ClusterShell")
    code = ("import sys, mpitools.service.ranks, mpitools.service.runcmd; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), check=True).stdout.strip()
    assert out == "[]"


def test_start_status_stop_and_tools_as_a_fresh_launch_gives(embedded, cli, service,
                                                             tmp_path):
    res, state = service
    assert sorted(res["hosts"]) == sorted(h.name for h in embedded.hosts())
    st = cli("--json", "service", "status").json()
    assert st["running"] and st["served"] == 0 and st["dead_hosts"] == {}
    assert set(st["cpu"]) == set(res["hosts"]) and st["cpu_seconds"] > 0
    again = cli("service", "start")
    assert again.code == 1 and again.err.count("\n") == 1
    assert "already runs" in again.err
    assert oct(os.stat(driver.service_dir(embedded)).st_mode & 0o777) == "0o700"

    # sync-mayors: the same result through the service as from a fresh mpiexec
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("hello\n")
    (src / "g").write_bytes(os.urandom(200_000))
    via = cli("--json", "sync-mayors", str(src), "--launch", "service")
    assert via.code == 0, via.err
    for m in ("mayor1", "mayor2"):
        repo = embedded.host(m)
        shutil.rmtree(repo.local_path(repo.repository))
        os.makedirs(repo.local_path(repo.repository))
    fresh = cli("--json", "sync-mayors", str(src), "--launch", "mpiexec")
    assert fresh.code == 0, fresh.err
    assert via.json()["launch"] == "service" and fresh.json()["launch"] == "mpiexec"
    a, b = _strip(via.json()), _strip(fresh.json())
    assert a == b
    # without --launch a running service that covers the hosts is used; the text says so
    same = cli("sync-mayors", str(src))
    assert same.code == 0 and "via service" in same.out

    # stage: the same result both ways (the second replaces what the first staged)
    via = cli("stage", str(src), "--nodes", "@town1", "--chunk", "64KiB", "--json")
    fresh = cli("stage", str(src), "--nodes", "@town1", "--chunk", "64KiB", "--json",
                "--launch", "mpiexec")
    assert via.code == 0 and fresh.code == 0, (via.err, fresh.err)
    assert via.json()["launch"] == "service"
    assert _strip(via.json()) == _strip(fresh.json())

    # collect: what each node has comes back into DEST/<host>/
    for n in ("ccn01", "ccn02", "ccn03", "ccn04"):
        out = os.path.join(embedded.host(n).local_path(embedded.host(n).scratch), "out")
        os.makedirs(out)
        Path(out, "host.txt").write_text(n)
    back = cli("collect", "out", "--nodes", "@town1", "--dest", str(tmp_path / "back"),
               "--json")
    assert back.code == 0 and back.json()["launch"] == "service", back.err
    assert {n: (tmp_path / "back" / n / "out" / "host.txt").read_text()
            for n in ("ccn01", "ccn02", "ccn03", "ccn04")} == \
        {n: n for n in ("ccn01", "ccn02", "ccn03", "ccn04")}

    # run: through the service as through the transport's fan-out
    cmd = ["sh", "-c", 'echo "$CHIBA_HOST $CHIBA_ROLE"; echo warn >&2; '
                       '[ "$CHIBA_HOST" = ccn03 ] && exit 3; exit 0']
    via = cli("--json", "run", "--launch", "service", "-w", "@nodes", "--", *cmd)
    plain = cli("--json", "run", "--launch", "mpiexec", "-w", "@nodes", "--", *cmd)
    assert via.code == plain.code == 3
    assert via.json()["launch"] == "service" and plain.json()["launch"] == "mpiexec"
    assert _strip(via.json()) == _strip(plain.json())
    assert via.json()["hosts"]["ccn05"]["stdout"] == "ccn05 node\n"
    assert via.json()["hosts"]["ccn03"]["rc"] == 3
    line = 'echo "$CHIBA_HOST"; nosuchcmd'  # one argument: a command line for the shell
    via_line = cli("--json", "run", "-w", "ccn[01-02]", "--", line)
    assert via_line.code == 127 and via_line.json()["launch"] == "service"

    st = cli("--json", "service", "status").json()
    assert st["served"] == 6  # sync twice, stage, collect, run twice
    assert cli("service", "stop").code == 0
    assert _service_procs(state) == []
    assert not cli("--json", "service", "status").json()["running"]
    gone = cli("sync-mayors", str(src), "--launch", "service")
    assert gone.code == 1 and "no MPI service runs" in gone.err
    # and what the transport's fan-out (run without the service) gives
    transport = cli("--json", "run", "-w", "@nodes", "--", *cmd)
    assert "launch" not in transport.json()
    assert _strip(transport.json()) == _strip(via.json())
    transport = cli("--json", "run", "-w", "ccn[01-02]", "--", line)
    assert _strip(transport.json()) == _strip(via_line.json())


_INTRUDER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("sock")
s.sendall(b'{"op": "status"}\\n')
sys.stdout.write(s.makefile().readline())
"""


def test_request_from_another_uid_is_refused(embedded, service):
    d = driver.service_dir(embedded)
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
              "/usr/bin/python3", "-c", _INTRUDER]
    r = subprocess.run(nobody, cwd=d, capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr  # 0700 directory
    # even with the directory and the socket opened to everyone, the peer's uid is checked
    os.chmod(d, 0o711)
    os.chmod(d / "sock", 0o777)
    r = subprocess.run(nobody, cwd=d, capture_output=True, text=True)
    assert json.loads(r.stdout) == {"k": "e",
                                    "msg": "refused: uid 65534 is not the service's owner"}


def test_rank_killed_while_idle_is_named(embedded, cli, service, tmp_path):
    _, state = service
    os.kill(_rank_pid(state, "ccn05"), signal.SIGKILL)
    _wait_ended(state)
    st = cli("--json", "service", "status")
    assert st.code == 1
    j = st.json()
    assert not j["running"] and j["restart_needed"] and list(j["dead_hosts"]) == ["ccn05"]
    assert "signal 9" in j["dead_hosts"]["ccn05"]
    # the next request names it too, and nothing is touched
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    r = cli("stage", str(src), "--nodes", "@nodes", "--launch", "service")
    assert r.code == 1 and "ccn05" in r.err and r.err.count("\n") == 1
    assert cli("service", "stop").code == 0
    assert _service_procs(state) == []


def test_rank_killed_mid_request_fails_the_request_and_is_named(embedded, cli, service,
                                                                 tmp_path, monkeypatch):
    _, state = service
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(1 << 20))
    # stage rank 2 dies at its third chunk
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps({"point": "stage.chunk", "rank": 2,
                                                   "do": "exit", "after": 2}))
    r = cli("stage", str(src), "--nodes", "@town1", "--chunk", "64KiB", "--compress",
            "none", "--json")
    assert r.code == 1
    j = r.json()
    assert j["launch"] == "service" and not j["ok"]
    dead = driver.status(embedded)["dead_hosts"]
    assert len(dead) == 1 and "exited" in next(iter(dead.values()))
    host = next(iter(dead))
    assert host in j["failures"]
    for n in ("ccn01", "ccn02", "ccn03", "ccn04"):  # all or nothing: no node has it
        h = embedded.host(n)
        assert not os.path.exists(os.path.join(h.local_path(h.scratch), "src"))


def test_add_a_host_by_spawn_and_merge(embedded, cli):
    assert cli("service", "start", "--hosts", "ccn[01-02]").code == 0
    state = json.loads((driver.service_dir(embedded) / "state.json").read_text())
    try:
        # ccn03 has no rank yet: without --launch the fan-out runs there, with it, refused
        r = cli("run", "--launch", "service", "-w", "ccn[01-03]", "--", "true")
        assert r.code == 2 and "no rank on ccn03" in r.err  # refused before anything ran
        add = cli("--json", "service", "add", "ccn03")
        assert add.code == 0, add.err
        assert add.json()["hosts"] == ["pres", "ccn01", "ccn02", "ccn03"]
        assert cli("service", "add", "ccn03").code == 2
        r = cli("--json", "run", "-w", "ccn[01-03]", "--", "sh", "-c", 'echo "$CHIBA_HOST"')
        assert r.code == 0 and r.json()["launch"] == "service"
        assert {h: v["stdout"] for h, v in r.json()["hosts"].items()} == \
            {h: h + "\n" for h in ("ccn01", "ccn02", "ccn03")}
    finally:
        assert cli("service", "stop").code == 0
    assert _service_procs(state) == []


def test_service_dir_from_the_topology(embedded, cli, tmp_path, monkeypatch):
    toml = tmp_path / "demo.toml"
    base = (REPO / "clusters" / "demo.toml").read_text()
    svc = tmp_path / "svc"
    toml.write_text(base + f'\n[mpi]\nservice_dir = "{svc}"\n')
    monkeypatch.setenv("CHIBA_CLUSTER", str(toml))
    r = cli("--json", "service", "start", "--hosts", "ccn01")
    assert r.code == 0, r.err
    assert r.json()["dir"] == str(svc) and (svc / "sock").exists()
    state = json.loads((svc / "state.json").read_text())
    assert cli("service", "stop").code == 0 and _service_procs(state) == []
    # a directory whose socket path does not fit in sockaddr_un: one line, nothing started
    toml.write_text(base + f'\n[mpi]\nservice_dir = "{tmp_path / ("d" * 100)}"\n')
    r = cli("service", "start")
    assert r.code == 2 and "too long for a Unix socket" in r.err and r.err.count("\n") == 1
    assert not (tmp_path / ("d" * 100)).exists()


def test_a_stage_stopped_waiting_for_the_service_says_the_job_goes_on(embedded, cli, service,
                                                                      tmp_path, monkeypatch):
    """--timeout ends the command's wait, not a job on the service's ranks: the command
    said "mpiexec and its ranks were stopped" and "nothing was committed on any node",
    and then the job committed. Now it says the job goes on, and it does."""
    from support.trees import assert_same_tree, make_tree

    new = make_tree(tmp_path / "new")
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps({"point": "stage.locked", "rank": 1,
                                                   "do": "sleep", "seconds": 6}))
    r = cli("stage", new, "--nodes", "@town1", "--dest", "late", "--launch", "service",
            "--timeout", "2")
    assert r.code == 1
    assert "nothing was committed" not in r.err and "were stopped" not in r.err
    assert "the job goes on in the ranks of the service" in r.err
    dests = [os.path.join(embedded.host(n).local_path(embedded.host(n).scratch), "late")
             for n in NODES[:4]]
    deadline = time.time() + 60
    while not all(os.path.isdir(d) for d in dests) and time.time() < deadline:
        time.sleep(0.2)
    for d in dests:
        assert_same_tree(new, d)
