"""`cluster init` and `cluster check`: scripts under a real sh, the CLI embedded and on testbed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from chiba_admin.hostcheck import (DirPlan, init_script, interface_matches, parse_init,
                                   parse_ip_addr, parse_probe, plan_dirs, probe_script)
from support.cluster import DEMO
from topology import load_topology

EXE = str(Path(sys.executable).with_name("chiba-admin"))
NODES = [f"ccn0{i}" for i in range(1, 9)]
ALL = ["pres", "mayor1", "mayor2", *NODES]

# `ip -o addr` on a testbed mayor: one NIC on the core network, one on its town's
MAYOR_IP_ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 10.201.0.2/24 scope global eth0\\       valid_lft forever preferred_lft forever
3: eth1    inet 10.201.1.254/24 scope global eth1\\       valid_lft forever preferred_lft forever
4: eth2@if9    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever
"""


def _sh(script: str) -> str:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          check=True).stdout


def _plans(tmp_path) -> list[DirPlan]:
    return [DirPlan("h", w, f"/{w}", str(tmp_path / "root" / w), m)
            for w, m in (("scratch", 0o755), ("spool", 0o700), ("repository", 0o755))]


# --- the scripts, run by a real sh --------------------------------------------------------------
def test_init_script_creates_missing_dirs_once_and_leaves_existing_ones_alone(tmp_path):
    dirs = _plans(tmp_path)
    os.makedirs(dirs[0].local, mode=0o750)  # scratch exists with its own mode
    os.chmod(dirs[0].local, 0o750)
    Path(dirs[2].local).parent.mkdir(exist_ok=True)
    Path(dirs[2].local).write_text("not a dir")
    rows = parse_init("h", dirs, _sh(init_script(dirs, dry_run=True)))
    assert [r.state for r in rows] == ["exists", "would-create", "notdir"]
    assert not os.path.exists(dirs[1].local)  # a dry run creates nothing
    rows = parse_init("h", dirs, _sh(init_script(dirs)))
    assert [r.state for r in rows] == ["exists", "created", "notdir"]
    assert stat.S_IMODE(os.stat(dirs[0].local).st_mode) == 0o750  # untouched
    assert stat.S_IMODE(os.stat(dirs[1].local).st_mode) == 0o700
    assert rows[1].detail.startswith("mode 700, owner ") and not rows[2].ok
    rows = parse_init("h", dirs, _sh(init_script(dirs)))
    assert [r.state for r in rows] == ["exists", "exists", "notdir"]  # idempotent


def test_init_script_quotes_paths(tmp_path):
    d = [DirPlan("h", "scratch", "/x", str(tmp_path / "we ird $(touch pwned) 'q'"), 0o755)]
    rows = parse_init("h", d, _sh(init_script(d)))
    assert rows[0].state == "created" and os.path.isdir(d[0].local)
    assert not os.path.exists("pwned") and not (tmp_path / "pwned").exists()


def test_probe_script_reports_missing_writable_and_free_space(tmp_path):
    dirs = _plans(tmp_path)
    os.makedirs(dirs[0].local)
    Path(dirs[1].local).parent.mkdir(exist_ok=True)
    Path(dirs[1].local).write_text("")
    checks = parse_probe("h", dirs, _sh(probe_script(dirs)), min_free=0)
    assert [c.status for c in checks] == ["ok", "fail", "fail"]
    assert checks[0].detail.startswith("/scratch writable, ") and "free" in checks[0].detail
    assert checks[0].data["free_bytes"] > 0
    assert checks[1].detail == "/spool is not a directory"
    assert checks[2].detail == "/repository is missing (run `chiba-admin cluster init`)"
    assert os.listdir(dirs[0].local) == []  # the probe file is gone
    # under the free-space floor: a warning, not a failure
    low = parse_probe("h", dirs[:1], _sh(probe_script(dirs[:1])), min_free=1 << 60)
    assert low[0].status == "warn" and "free (under" in low[0].detail


def test_parse_probe_full_disk_is_one_clear_line():
    d = [DirPlan("ccn03", "scratch", "/scratch", "/scratch", 0o755)]
    out = "scratch\tunwritable\t0\thead: error writing 'standard output': No space left on device\n"
    c = parse_probe("ccn03", d, out, min_free=0)[0]
    assert c.status == "fail"
    assert c.detail == "/scratch is not writable: No space left on device, 0 B free"


def test_interface_settings_are_matched_like_open_mpi():
    addrs = parse_ip_addr(MAYOR_IP_ADDR)
    assert addrs[:3] == [("lo", "127.0.0.1/8"), ("eth0", "10.201.0.2/24"),
                         ("eth1", "10.201.1.254/24")]
    assert interface_matches("10.201.0.0/16", addrs) == ["eth0", "eth1"]
    assert interface_matches("eth0", addrs) == ["eth0"]
    assert interface_matches("10.201.0.0/24,eth1", addrs) == ["eth0", "eth1"]
    assert interface_matches("eth2", addrs) == ["eth2"]  # "eth2@if9" is eth2
    assert interface_matches("192.168.0.0/16", addrs) == []


def test_plan_dirs_follows_the_topology():
    topo = load_topology(DEMO)
    plans = plan_dirs(topo, ["ccn01"])["ccn01"]
    assert [(p.which, p.path, p.mode) for p in plans] == [
        ("scratch", "/scratch", 0o755), ("spool", "/var/spool/chiba", 0o700),
        ("repository", "/opt/chiba/repo", 0o755)]


# --- the CLI on the embedded cluster ------------------------------------------------------------
def test_embedded_init_dry_run_creates_nothing(cli, tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("CHIBA_STATE", str(state))
    r = cli("--cluster", DEMO, "--json", "cluster", "init", "--dry-run")
    assert r.code == 0, r.err
    j = r.json()
    assert j["dry_run"] and len(j["dirs"]) == 33
    assert {d["state"] for d in j["dirs"]} == {"would-create"}
    assert not state.exists()
    r = cli("--cluster", DEMO, "cluster", "init")
    assert r.code == 0 and r.out.startswith("initialised 11 hosts of 'demo'")


@pytest.mark.mpi
def test_embedded_check_passes_then_names_a_missing_directory(cli, embedded):
    r = cli("--json", "cluster", "check", "--hosts", "ccn[01-02],pres")
    assert r.code == 0, r.err
    j = r.json()
    assert j["ok"] and j["mpi"]["ok"] and j["mpi"]["launch_seconds"] > 0
    by = {(c["host"], c["check"]): c for c in j["checks"]}
    assert by[("ccn02", "mpi")]["status"] == "ok" and by[("ccn02", "python")]["ok"]
    assert {c["check"] for c in j["checks"]} == {"ssh", "dirs:scratch", "dirs:spool",
                                                  "dirs:repository", "python", "mpi"}
    shutil.rmtree(embedded.host("ccn02").local_path("/var/spool/chiba"))
    r = cli("cluster", "check", "--hosts", "ccn[01-02]", "--no-mpi")
    assert r.code == 1
    assert r.err.splitlines() == ["chiba-admin cluster check: ccn02: dirs:spool: "
                                  "/var/spool/chiba is missing (run `chiba-admin cluster "
                                  "init`)"]


def test_check_refuses_bad_arguments_before_touching_hosts(cli, embedded):
    r = cli("cluster", "check", "--hosts", "ccn[01-99]")
    assert r.code == 2 and "unknown host(s)" in r.err and r.out == ""
    r = cli("cluster", "check", "--min-free", "lots")
    assert r.code == 2 and r.err.count("\n") == 1 and "--min-free" in r.err


# --- the testbed: real sshd, private disks ------------------------------------------------------
def _cli(tb, *args: str, topology: Path | None = None):
    cp = tb.exec("pres", [EXE, "--cluster", str(topology or tb.topology_file), *args],
                 timeout=300)
    return cp.returncode, cp.stdout, cp.stderr


def _scratch_data(tb, host: str) -> Path:
    return Path(next(src for path, src in tb.plan.host(host).mounts if path == "/scratch"))


def _variant(tb, tmp_path, replace: dict[str, str], extra: str = "") -> Path:
    text = tb.topology_file.read_text()
    for a, b in replace.items():
        assert a in text, a
        text = text.replace(a, b)
    p = tmp_path / "variant.toml"
    p.write_text(text + extra)
    return p


@pytest.mark.testbed
def test_init_over_ssh_creates_every_directory_once(testbed_cluster, tmp_path):
    tb = testbed_cluster
    sub = f"t-init-{secrets.token_hex(3)}"  # inside each host's private scratch
    topo = _variant(tb, tmp_path, {
        'scratch = "/scratch"': f'scratch = "/scratch/{sub}/scratch"',
        'spool = "/var/spool/chiba"': f'spool = "/scratch/{sub}/spool"',
        'repository = "/opt/chiba/repo"': f'repository = "/scratch/{sub}/repo"'})
    try:
        code, out, err = _cli(tb, "--json", "cluster", "init", "--dry-run", topology=topo)
        assert code == 0, err
        j = json.loads(out)
        assert len(j["dirs"]) == 33 and {d["state"] for d in j["dirs"]} == {"would-create"}
        assert not any((_scratch_data(tb, h) / sub).exists() for h in ALL)
        code, out, err = _cli(tb, "cluster", "init", topology=topo)
        assert code == 0, err
        assert "created 33 directories on 11 hosts" in out
        for h in ALL:
            base = _scratch_data(tb, h) / sub
            modes = {d: stat.S_IMODE(os.stat(base / d).st_mode) for d in os.listdir(base)}
            assert modes == {"scratch": 0o755, "spool": 0o700, "repo": 0o755}, h
        code, out, err = _cli(tb, "--json", "cluster", "init", topology=topo)
        assert code == 0 and {d["state"] for d in json.loads(out)["dirs"]} == {"exists"}
    finally:
        for h in ALL:
            shutil.rmtree(_scratch_data(tb, h) / sub, ignore_errors=True)


@pytest.mark.testbed
@pytest.mark.mpi
def test_check_names_a_dead_sshd_a_full_scratch_and_a_pulled_cable(
        testbed_cluster):
    tb = testbed_cluster
    faults = {"ccn02": "kill-sshd", "ccn03": "fill-disk", "ccn05": "link-down"}
    try:
        for host, kind in faults.items():
            tb.fault(host, kind)
        # --timeout bounds each host: the unplugged one costs 2 s, not ssh's default
        code, out, err = _cli(tb, "--json", "cluster", "check", "--timeout", "2")
    finally:
        for host in faults:
            tb.heal(host)
    assert code == 1, err
    j = json.loads(out)
    bad = {(c["host"], c["check"]): c["detail"] for c in j["checks"] if not c["ok"]}
    assert set(bad) == {("ccn02", "ssh"), ("ccn03", "dirs:scratch"), ("ccn05", "ssh")}, bad
    assert bad[("ccn02", "ssh")].startswith("connection refused by 10.")
    assert bad[("ccn05", "ssh")].endswith(":22 timed out after 2s")
    assert bad[("ccn03", "dirs:scratch")].startswith(
        "/scratch is not writable: No space left on device")
    # the MPI job ran over everyone else, ccn03 included (its ranks need no scratch)
    mpi = {c["host"]: c["status"] for c in j["checks"] if c["check"] == "mpi"}
    assert mpi.pop("ccn02") == mpi.pop("ccn05") == "skip" and set(mpi.values()) == {"ok"}, mpi
    assert j["mpi"]["ok"] and not {"ccn02", "ccn05"} & set(j["mpi"]["hosts"])
    lines = [ln for ln in err.splitlines() if ln.startswith("chiba-admin cluster check:")]
    assert len(lines) == 3 and any("ccn02: ssh: connection refused" in ln for ln in lines)


@pytest.mark.testbed
def test_check_names_a_python_without_mpi4py(testbed_cluster, tmp_path):
    tb = testbed_cluster
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    topo = _variant(tb, tmp_path, {"[mpi]\n": f'[mpi]\npython = "{venv}/bin/python"\n'})
    code, out, err = _cli(tb, "cluster", "check", "--hosts", "ccn01", "--no-mpi",
                          topology=topo)
    assert code == 1
    assert err.splitlines()[-1] == (f"chiba-admin cluster check: ccn01: python: "
                                    f"{venv}/bin/python cannot import mpi4py (install it "
                                    "there or set [mpi] python)")


@pytest.mark.testbed
@pytest.mark.mpi
def test_bad_interface_setting_names_the_crashing_daemon_and_is_retried(
        testbed_cluster, tmp_path):
    """prte_if_include matching both NICs of each mayor: prted crashes in most launches."""
    from chiba_admin import console
    from mpitools.common.launch import launch
    from mpitools.common.runtime import encode_job

    tb = testbed_cluster
    bad = _variant(tb, tmp_path, {'prte_if_include = "eth0"':
                                  f'prte_if_include = "{tb.subnet}"'})
    topo = load_topology(bad)
    console.configure(quiet=True)
    seen = []
    with tb.netns("pres"):
        # a crash happened in 10 of 24 launches here: 25 tries without one are ~1e-6
        for _ in range(25):
            res = launch(topo, "mpitools.ping.ranks", [encode_job({})], ["mayor1", "mayor2"],
                         timeout=120)
            seen.append(res)
            if res.retried:
                break
    console.configure()
    retried = [r for r in seen if r.retried]
    assert retried, [r.describe() for r in seen]
    r = retried[0]
    assert r.retried.startswith(("MPI start-up failed on mayor1: ", "MPI start-up failed on "
                                 "mayor2: ")), r.retried
    assert "so it crashed" in r.retried
    assert '"A daemon failed to report back after being spawned."' in r.retried
    assert "cluster check" in r.retried  # the hint says where to look
    if not r.ok:  # crashed twice: only the mayor whose daemon crashed is blamed
        assert set(r.failed_hosts()) <= {"mayor1", "mayor2"} and len(r.failed_hosts()) == 1
    # and cluster check says why before anything is launched
    code, out, err = _cli(tb, "--json", "cluster", "check", "--hosts", "@mayors,ccn01",
                          "--no-mpi", topology=bad)
    warn = {c["host"]: c["detail"] for c in json.loads(out)["checks"]
            if c["check"] == "if:prte_if_include" and c["status"] == "warn"}
    assert set(warn) == {"mayor1", "mayor2"} and "(eth0, eth1)" in warn["mayor1"]


# --- a tool that finds a host directory missing says which and what to do -----------------------
def test_put_into_a_missing_host_directory_names_it_and_cluster_init(embedded, tmp_path):
    from chiba_admin.errors import TransportError
    from legacy_transit.transport import LocalTransport

    h = embedded.host("mayor2")
    shutil.rmtree(h.local_path("/var/spool/chiba"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(TransportError) as e:
        LocalTransport().put(h, str(tmp_path / "f"), "/var/spool/chiba/transit-1.tar")
    assert str(e.value) == (f"mayor2: cannot put {tmp_path}/f to /var/spool/chiba/transit-1.tar"
                            ": spool directory /var/spool/chiba is missing (run `chiba-admin "
                            "cluster init`)")
    # a missing directory below an existing scratch is the caller's business, not init's
    with pytest.raises(TransportError) as e:
        LocalTransport().put(h, str(tmp_path / "f"), "/scratch/nodir/x")
    assert str(e.value).endswith("/scratch/nodir/x: No such file or directory")


@pytest.mark.testbed
def test_sftp_put_into_a_missing_host_directory_names_it(testbed_cluster, tmp_path):
    from chiba_admin.errors import TransportError
    from legacy_transit.transport import SSHTransport

    tb = testbed_cluster
    topo = load_topology(_variant(tb, tmp_path, {
        'spool = "/var/spool/chiba"': f'spool = "/scratch/t-{secrets.token_hex(3)}"'}))
    h = topo.host("ccn04")
    (tmp_path / "f").write_text("x")
    with tb.netns("pres"), SSHTransport() as t, pytest.raises(TransportError) as e:
        t.put(h, str(tmp_path / "f"), h.spool + "/a.tar")
    assert str(e.value).startswith("ccn04: cannot put ")
    assert str(e.value).endswith(f": spool directory {h.spool} is missing (run `chiba-admin "
                                 "cluster init`)")


def test_init_on_an_ssh_cluster_names_hosts_that_refuse(cli, tmp_path):
    """SSH clusters are initialised over SSH now; a host that refuses is a row, exit 1."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    topo = tmp_path / "lab.toml"
    topo.write_text(f"""
[cluster]
name = "lab"
kind = "ssh"
[defaults.ssh]
port = {port}
connect_timeout = 5
[links.core]
bandwidth = "1Gbit"
[links.town]
bandwidth = "100Mbit"
[president]
name = "pres"
address = "127.0.0.1"
[mayors.m1]
address = "127.0.0.1"
[towns.t1]
mayor = "m1"
nodes = "n1"
addresses = "127.0.0.1"
""")
    r = cli("--cluster", topo, "--json", "cluster", "init", "--hosts", "m1,n1")
    assert r.code == 1, r.err
    j = r.json()
    assert [(d["host"], d["which"], d["state"]) for d in j["dirs"]] == [
        (h, w, "unreachable") for h in ("m1", "n1") for w in ("scratch", "spool", "repository")]
    assert j["dirs"][0]["detail"] == f"connection refused by 127.0.0.1:{port}"
    assert r.err.splitlines() == [f"chiba-admin cluster init: {h}: connection refused by "
                                  f"127.0.0.1:{port}" for h in ("m1", "n1")]
