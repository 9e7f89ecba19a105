"""Attacks on the MPI service (mpitools/service/) and on test faults
(mpitools/common/faults.py), as root on the embedded cluster: a service directory that is
not the tool's own (a system directory, a planted symlink, another user's, one whose
parent others may write), a state file whose pid now names another process, requests no
client should be able to send, and CHIBA_FAULTS rules that name files instead of test
fixtures. Each case held a finding; each must keep failing without its fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chiba_admin.errors import InvalidRequest
from mpitools.common import faults
from mpitools.service import driver

REPO = Path(__file__).resolve().parent.parent


def _session_sleeper() -> subprocess.Popen:
    """A process in a session of its own (its pid is its session id, as mpiexec's is)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)


def _end(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


# --- the service directory -------------------------------------------------------------
@pytest.mark.parametrize("given", ["/", "/etc/../etc", "/srv/a/../../etc"])
def test_service_dir_root_or_dotdot_is_refused(embedded, given):
    embedded.mpi["service_dir"] = given
    with pytest.raises(InvalidRequest, match="root directory or has a '..' component"):
        driver.service_dir(embedded)


def test_service_dir_naming_a_shared_directory_is_refused_and_left_as_it_was(
        embedded, cli, tmp_path, monkeypatch):
    """As ``service_dir = "/etc"`` would: root chmod-ed it 0700 and started there."""
    shared = tmp_path / "etc"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    toml = tmp_path / "demo.toml"
    toml.write_text((REPO / "clusters" / "demo.toml").read_text()
                    + f'\n[mpi]\nservice_dir = "{shared}"\n')
    monkeypatch.setenv("CHIBA_CLUSTER", str(toml))
    r = cli("service", "start", "--hosts", "ccn01")
    assert r.code == 2 and "not private (mode 0755" in r.err and r.err.count("\n") == 1
    assert os.stat(shared).st_mode & 0o777 == 0o755
    assert os.listdir(shared) == []


def test_symlink_planted_at_the_service_dir_is_not_followed(embedded, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    planted = tmp_path / "svc"
    planted.symlink_to(victim)
    embedded.mpi["service_dir"] = str(planted)
    with pytest.raises(InvalidRequest, match="symbolic link"):
        driver.start(embedded, ["ccn01"])
    assert os.stat(victim).st_mode & 0o777 == 0o755 and os.listdir(victim) == []


def test_symlink_planted_inside_the_service_dir_is_not_followed(embedded, tmp_path):
    svc = tmp_path / "svc"
    svc.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (svc / "lock").symlink_to(victim)
    embedded.mpi["service_dir"] = str(svc)
    with pytest.raises(InvalidRequest, match="lock"):
        driver.start(embedded, ["ccn01"])
    (svc / "lock").unlink()
    (svc / "log").symlink_to(victim)
    with pytest.raises(InvalidRequest, match="log"):
        driver.start(embedded, ["ccn01"])
    assert victim.read_text() == "precious\n"


def test_service_dir_under_a_parent_others_may_write_is_refused(embedded, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky: anyone may rename the service dir away
    embedded.mpi["service_dir"] = str(shared / "svc")
    with pytest.raises(InvalidRequest, match="parent may be changed by another user"):
        driver.start(embedded, ["ccn01"])
    assert not (shared / "svc").exists()


@pytest.mark.parametrize("how", ["owned by nobody", "mode 0777"])
def test_state_in_another_users_directory_is_not_trusted(embedded, tmp_path, how):
    """Root must not kill the pid a state file names when another user could write it."""
    victim = _session_sleeper()
    try:
        svc = tmp_path / "svc"
        svc.mkdir(mode=0o700)
        (svc / "state.json").write_text(json.dumps({"pid": victim.pid,
                                                    "hosts": ["pres", "ccn01"]}))
        if how == "mode 0777":
            os.chmod(svc, 0o777)
            why = "not private"
        else:
            os.chown(svc, 65534, 65534)
            os.chown(svc / "state.json", 65534, 65534)
            why = "belongs to uid 65534"
        embedded.mpi["service_dir"] = str(svc)
        with pytest.raises(InvalidRequest, match=why):
            driver.stop(embedded)
        with pytest.raises(InvalidRequest, match=why):
            driver.status(embedded)
        assert driver.running(embedded) is None
        assert victim.poll() is None, "root killed a pid another user named"
    finally:
        _end(victim)


# --- a stale state file ----------------------------------------------------------------
def test_stale_state_whose_pid_was_reused_neither_blocks_start_nor_gets_killed(embedded):
    """A service that died left state.json and ready; its pid now names an unrelated
    session leader (another start time). stop must not kill it, start must not refuse."""
    victim = _session_sleeper()
    try:
        d = driver.service_dir(embedded)
        d.mkdir(mode=0o700)
        (d / "state.json").write_text(json.dumps({"pid": victim.pid, "hosts": ["pres", "ccn01"],
                                                  "starttime": 1}))
        (d / "ready").write_text("{}")
        (d / "sock").write_text("")
        assert driver.running(embedded) is None
        assert driver.stop(embedded)["stopped"]
        assert victim.poll() is None, "stop killed the process that reused the pid"
        (d / "state.json").write_text(json.dumps({"pid": victim.pid, "hosts": ["pres", "ccn01"],
                                                  "starttime": 1}))
        res = driver.start(embedded, ["ccn01"])
        try:
            assert res["pid"] != victim.pid and driver.running(embedded) is not None
        finally:
            assert driver.stop(embedded)["stopped"]
        assert victim.poll() is None
    finally:
        _end(victim)


# --- requests on the socket ------------------------------------------------------------
_BAD = [
    b"[" * 200_000,                                            # past the parser's depth
    b"\xff\xfe\n",
    b'{"op": "run"}',
    b'{"op": "run", "module": "os", "job": {}, "hosts": ["ccn01"]}',
    b'{"op": "run", "module": "mpitools.ping.ranks", "job": {}, "hosts": ["ccn01"]}',
    b'{"op": "run", "module": "mpitools.service.runcmd", "job": [], "hosts": ["ccn01"]}',
    b'{"op": "run", "module": "mpitools.service.runcmd", "job": {}, "hosts": 5}',
    b'{"op": "run", "module": "mpitools.service.runcmd", "job": {}, "hosts": ["ccn01"],'
    b' "env": {"A=B": "x"}}',
    b'{"op": "run", "module": "mpitools.service.runcmd", "job": {}, "hosts": ["ccn01"],'
    b' "env": {"A": "x\\u0000y"}}',
    b'{"op": "run", "module": "mpitools.service.runcmd", "job": {}, "hosts": ["ccn01"],'
    b' "env": ["A"]}',
    b'{"op": "run", "module": "mpitools.service.runcmd", "job": {}, "hosts": ["ccn01", "nowhere"]}',
    b'{"op": "add", "host": ["ccn02"]}',
    b'{"op": "add", "host": "ccn02", "info": {"add-host": 1}}',
    b'{"op": "add", "host": "ccn02", "info": {"wdir": "/"}}',
]


def _send(path: str, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(60)
        c.connect(path)
        c.sendall(data + b"\n")
        return json.loads(c.makefile("rb").readline())


def test_malformed_or_hostile_requests_are_refused_and_the_service_lives_on(embedded):
    driver.start(embedded, ["ccn01"])
    try:
        svc = driver.running(embedded)
        for bad in _BAD:
            frame = _send(svc.socket_path, bad)
            assert frame["k"] == "e" and "\n" not in frame["msg"], (bad[:80], frame)
            assert driver.status(embedded)["running"], f"the service died of {bad[:80]!r}"
        assert driver.status(embedded)["served"] == 0
    finally:
        assert driver.stop(embedded)["stopped"]


def test_a_client_that_sends_nothing_holds_up_no_one(embedded):
    """The coordinator read each request line blocking, up to 10 s: one silent client
    (or one half a request) stalled every other client and the running request's events."""
    driver.start(embedded, ["ccn01"])
    try:
        svc = driver.running(embedded)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as half:
            silent.connect(svc.socket_path)
            half.connect(svc.socket_path)
            half.sendall(b'{"op": "sta')
            assert driver.status(embedded)["running"]
            for c in (silent, half):  # answered before either was given up on
                c.setblocking(False)
                with pytest.raises(BlockingIOError):
                    c.recv(100)
            half.setblocking(True)
            half.sendall(b'tus"}\n')
            assert json.loads(half.makefile("rb").readline())["k"] == "status"
    finally:
        assert driver.stop(embedded)["stopped"]


def test_only_the_tools_rank_programs_may_be_named():
    from mpitools.service.ranks import TOOLS, check_request

    for module in ("os", "subprocess", "mpitools.ping.ranks", "mpitools.service.ranks",
                   "mpitools.shell.ranks", "chiba_admin.cli"):
        with pytest.raises(ValueError, match="not a tool of the service"):
            check_request({"op": "run", "module": module, "job": {}, "hosts": ["h"]})
    for module in TOOLS:
        check_request({"op": "run", "module": module, "job": {}, "hosts": ["h"]})


# --- CHIBA_FAULTS ----------------------------------------------------------------------
def _env(rule: dict) -> dict:
    return {"CHIBA_FAULTS": json.dumps(rule)}


def test_fault_barrier_must_name_fifos_not_files(tmp_path):
    victim = tmp_path / "etc"
    victim.mkdir()
    (victim / "ready").write_text("precious\n")
    (victim / "go").write_text("")
    rule = {"point": "stage.locked", "do": "barrier", "dir": str(victim)}
    with pytest.raises(InvalidRequest, match="not a FIFO"):
        faults.from_environ(_env(rule))
    with pytest.raises(InvalidRequest, match="not a FIFO"):  # nothing there to write into
        faults.from_environ(_env({**rule, "dir": str(tmp_path / "none")}))
    # a rank handed such a job (the service's socket takes a job as it comes) writes nothing
    with pytest.raises(OSError, match="not a FIFO"):
        faults.Faults.of({"faults": [rule]}, 0).checkpoint("stage.locked")
    assert (victim / "ready").read_text() == "precious\n"
    os.unlink(victim / "ready")
    os.symlink(tmp_path / "elsewhere", victim / "ready")
    with pytest.raises(OSError):
        faults.Faults.of({"faults": [rule]}, 0).checkpoint("stage.locked")
    assert not (tmp_path / "elsewhere").exists()


def test_fault_barrier_of_real_fifos_is_taken_and_said(tmp_path, capsys):
    os.mkfifo(tmp_path / "ready")
    os.mkfifo(tmp_path / "go")
    rule = {"point": "stage.locked", "do": "barrier", "dir": str(tmp_path)}
    assert faults.from_environ(_env(rule)) == {"faults": [rule]}
    # a CHIBA_FAULTS left in a root shell from testing is seen on the next real run
    assert capsys.readouterr().err == ("chiba-admin: CHIBA_FAULTS is set: 1 test fault(s) "
                                       "injected into this job\n")


def test_fault_replacement_file_must_be_readable_by_anyone_and_no_symlink(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$...\n")
    os.chmod(secret, 0o600)
    rule = {"point": "collect.archive", "rank": 2, "do": "replace", "file": str(secret)}
    if os.geteuid() == 0:
        with pytest.raises(InvalidRequest, match="any user may read"):
            faults.from_environ(_env(rule))
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(InvalidRequest, match="not a symlink"):
        faults.from_environ(_env({**rule, "file": str(link)}))
    with pytest.raises(InvalidRequest):
        faults.from_environ(_env({**rule, "file": "relative.tar"}))
    os.chmod(secret, 0o644)
    assert faults.from_environ(_env(rule)) == {"faults": [rule]}
