"""Real SSH on loopback: a private sshd, paramiko transport, run/transit/collect/rsync over it, faults."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from chiba_admin.errors import TransportError
from legacy_transit.transport import SSHTransport, UNREACHABLE
from support.ssh import NODES, free_port, sshd_unavailable, write_topology
from support.trees import NASTY_NAMES, assert_same_tree, count_files, make_tree

pytestmark = pytest.mark.skipif(sshd_unavailable() is not None,
                                reason=sshd_unavailable() or "")


@pytest.fixture
def loop(tmp_path, sshd):
    """(topology file, base dir) of a healthy loopback cluster."""
    base = tmp_path / "hosts"
    return write_topology(base, sshd), base


def _topo(path):
    from topology import load_topology

    return load_topology(path)


@pytest.fixture
def silent_port():
    """A port that accepts TCP but never sends an SSH banner (a hung host)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


# --- transport ---------------------------------------------------------------------------
def test_ssh_run_quoting_env_and_reuse(loop):
    path, base = loop
    topo = _topo(path)
    h = topo.host("ccn02")
    with SSHTransport() as t:
        for name in NASTY_NAMES:
            r = t.run(h, ["printf", "%s", name], timeout=10)
            assert r.ok and r.stdout.decode() == name, (name, r)
        r = t.run(h, 'echo "$CHIBA_HOST $CHIBA_ROLE $CHIBA_TOWN $CHIBA_SCRATCH"; exit 3')
        assert r.rc == 3 and r.out.strip() == f"ccn02 node town1 {base}/ccn02/scratch"
        r = t.run(h, ["cat"], stdin=b"x" * 300000)
        assert r.ok and len(r.stdout) == 300000
        client = t.client(h)
        assert t.client(h) is client  # one reused connection per host
        r = t.run(h, ["sleep", "5"], timeout=0.5)
        assert r.rc == UNREACHABLE and "timed out after 0.5s" in r.error


@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_a_cancelled_run_ends_its_command_at_once(loop, tmp_path, kind):
    """``cancel`` set from another thread ends the command (and what it started) within
    moments, as a timeout does, and says it was stopped: collect --method transit ends a
    node's pack so on a stop (before, only a timeout could)."""
    import threading
    import time

    from legacy_transit.transport import STOPPED, LocalTransport

    path, _ = loop
    h = _topo(path).host("ccn02")
    mark = tmp_path / "mark"
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with (SSHTransport() if kind == "ssh" else LocalTransport()) as t:
        t0 = time.monotonic()
        r = t.run(h, f"sleep 30; touch {mark}", cancel=cancel)
        took = time.monotonic() - t0
    assert r.rc == UNREACHABLE and r.error == STOPPED, r
    assert took < 10, took
    time.sleep(0.5)
    assert not mark.exists()


def test_ssh_put_get(loop, tmp_path):
    path, base = loop
    h = _topo(path).host("mayor1")
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(200000))
    with SSHTransport() as t:
        assert t.put(h, str(src), f"{base}/mayor1/spool/b 'x'") == 200000
        assert t.get(h, f"{base}/mayor1/spool/b 'x'", str(tmp_path / "back")) == 200000
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    with SSHTransport() as t:
        with pytest.raises(TransportError, match=r"cannot get /nonexistent/f: .*") as e:
            t.get(h, "/nonexistent/f", str(tmp_path / "nope"))
        assert e.value.where == "mayor1"
        with pytest.raises(TransportError, match=r"cannot put .*blob to /nonexistent/f: "):
            t.put(h, str(src), "/nonexistent/f")


def test_ssh_faults_named(tmp_path, sshd, silent_port):
    bad_kh = tmp_path / "bad_known_hosts"
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(tmp_path / "other")], check=True)
    assert other.returncode == 0
    pub = (tmp_path / "other.pub").read_text().split()
    bad_kh.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    refused = free_port()
    path = write_topology(tmp_path / "h", sshd, {
        "ccn01": {"port": refused},
        "ccn02": {"port": silent_port, "connect_timeout": 1.0},
        "ccn03": {"known_hosts": str(bad_kh)},
    })
    topo = _topo(path)
    with SSHTransport() as t:
        r1 = t.run(topo.host("ccn01"), "true")
        r2 = t.run(topo.host("ccn02"), "true")
        r3 = t.run(topo.host("ccn03"), "true")
        r4 = t.run(topo.host("ccn04"), "true")
    assert r1.rc == UNREACHABLE and f"connection refused by 127.0.0.1:{refused}" in r1.error
    assert r2.rc == UNREACHABLE and f"no SSH banner from 127.0.0.1:{silent_port} within 1s" \
        in r2.error
    assert r3.rc == UNREACHABLE and "does not match known_hosts" in r3.error
    assert str(bad_kh) in r3.error
    assert r4.ok


def test_accept_new_learns_then_strict_refuses_unknown(tmp_path, sshd):
    kh = tmp_path / "learned"
    path = write_topology(tmp_path / "h", sshd, {
        "ccn01": {"known_hosts": str(kh), "host_key_policy": "accept-new"},
        "ccn02": {"known_hosts": str(tmp_path / "empty")},
    })
    topo = _topo(path)
    with SSHTransport() as t:
        assert t.run(topo.host("ccn01"), "true").ok
        r = t.run(topo.host("ccn02"), "true")
    assert sshd.host_pub.split()[1] in kh.read_text()
    assert r.rc == UNREACHABLE and "not in known_hosts" in r.error


# --- commands over SSH ---------------------------------------------------------------------
def test_run_cli_over_ssh_gathered(cli, loop):
    path, base = loop
    r = cli("--cluster", path, "run", "-w", "@nodes", "-b", "--", "sh", "-c",
            'cd "$CHIBA_SCRATCH" && pwd | sed "s,.*/\\(ccn..\\)/scratch,\\1," && echo same')
    assert r.code == 0, r.err
    assert "ccn01 (1)" in r.out and "same" in r.out
    r = cli("--cluster", path, "run", "-w", "@nodes", "-b", "echo same")
    assert r.code == 0 and "ccn[01-04] (4)\n" in r.out and r.out.count("same") == 1


def test_run_cli_failures_over_ssh(cli, tmp_path, sshd):
    path = write_topology(tmp_path / "h", sshd, {"ccn04": {"port": free_port()}})
    r = cli("--cluster", path, "run", "-w", "@nodes", 'test "$CHIBA_HOST" != ccn02')
    assert r.code == 255  # pdsh -S: the largest code; unreachable is 255
    assert "ccn02: exited with code 1" in r.err
    assert "ccn04: connection refused" in r.err
    r = cli("--cluster", path, "run", "-w", "ccn[01-03]", 'test "$CHIBA_HOST" != ccn02')
    assert r.code == 1


def test_transit_over_ssh_byte_for_byte(cli, loop, tmp_path):
    path, base = loop
    src = make_tree(tmp_path / "payload")
    r = cli("--cluster", path, "--json", "run", "-w", "pres", "true")
    assert r.code == 0
    from legacy_transit.transit import collect_transit, stage_transit

    topo = _topo(path)
    res = stage_transit(topo, str(src), NODES, "in/data", fanout=2).to_dict()
    assert res["ok"], res["failures"]
    for n in NODES:
        assert_same_tree(src, base / n / "scratch" / "in" / "data")
        assert res["hosts"][n]["stage"] == "done" and res["hosts"][n]["bytes"] == res["bytes"]
    assert res["phase_bytes"]["to_mayors"] == 2 * res["bytes"]
    assert res["phase_bytes"]["to_president"] == 0  # the home server is the president
    for h in ("pres", "mayor1", "mayor2"):
        assert os.listdir(base / h / "spool") == []  # tars cleaned up
    assert not list(base.rglob("pwned"))
    out = collect_transit(topo, "in/data", NODES, str(tmp_path / "back")).to_dict()
    assert out["ok"], out["failures"]
    for n in NODES:
        assert_same_tree(src, tmp_path / "back" / n / "data")


def test_transit_over_ssh_partial_failure(tmp_path, sshd):
    from legacy_transit.transit import stage_transit

    path = write_topology(tmp_path / "h", sshd, {"ccn03": {"port": free_port()}})
    src = make_tree(tmp_path / "payload")
    res = stage_transit(_topo(path), str(src), NODES).to_dict()
    assert not res["ok"]
    assert set(res["failures"]) == {"ccn03"}
    h = res["hosts"]["ccn03"]
    assert h["stage"] == "unpack" and "connection refused" in h["error"]
    for n in ("ccn01", "ccn02", "ccn04"):
        assert_same_tree(src, tmp_path / "h" / n / "scratch" / "payload")


def test_transit_over_ssh_home_not_president(tmp_path, sshd):
    from legacy_transit.transit import stage_transit

    path = write_topology(tmp_path / "h", sshd, home="mayor2")
    src = make_tree(tmp_path / "payload")
    res = stage_transit(_topo(path), str(src), ["ccn01", "ccn04"]).to_dict()
    assert res["ok"], res["failures"]
    assert res["phase_bytes"]["to_president"] == res["bytes"]
    for n in ("ccn01", "ccn04"):
        assert_same_tree(src, tmp_path / "h" / n / "scratch" / "payload")
    for h in ("pres", "mayor1", "mayor2"):
        assert os.listdir(tmp_path / "h" / h / "spool") == []


def test_transit_mayor_unreachable(tmp_path, sshd):
    from legacy_transit.transit import stage_transit

    path = write_topology(tmp_path / "h", sshd, {"mayor2": {"port": free_port()}})
    src = make_tree(tmp_path / "payload")
    res = stage_transit(_topo(path), str(src), NODES).to_dict()
    assert set(res["failures"]) == {"ccn03", "ccn04"}
    assert res["hosts"]["ccn03"]["stage"] == "to_mayors"
    assert "mayor mayor2" in res["hosts"]["ccn03"]["error"]
    assert res["hosts"]["ccn01"]["ok"] and res["hosts"]["ccn02"]["ok"]


def test_rsync_over_ssh(cli, loop, tmp_path):
    path, base = loop
    src = make_tree(tmp_path / "repo")
    r = cli("--cluster", path, "--json", "sync-mayors", "--method", "rsync", str(src), "--dest", "sub dir")
    assert r.code == 0, r.out + r.err
    j = r.json()
    assert j["ok"] and j["targets"] == ["mayor1", "mayor2"]
    assert j["hosts"]["mayor1"]["files_transferred"] == count_files(src, links=False)
    for m in ("mayor1", "mayor2"):
        assert_same_tree(src, base / m / "repo" / "sub dir")
    r = cli("--cluster", path, "--json", "sync-mayors", "--method", "rsync", str(src), "--dest", "sub dir")
    assert r.json()["hosts"]["mayor2"]["files_transferred"] == 0  # already in sync


def test_rsync_over_ssh_refused_and_bad_key(cli, tmp_path, sshd):
    bad = tmp_path / "bad_kh"
    pub = sshd.host_pub.split()
    bad.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
                   "AAAAC3NzaC1lZDI1NTE5AAAAIHBhZ2VzaG91bGRub3RtYXRjaGFueXJlYWxrZXk=\n")
    assert pub[0] == "ssh-ed25519"
    path = write_topology(tmp_path / "h", sshd, {"mayor1": {"port": free_port()},
                                                 "mayor2": {"known_hosts": str(bad)}})
    src = make_tree(tmp_path / "repo")
    r = cli("--cluster", path, "sync-mayors", "--method", "rsync", str(src))
    assert r.code == 1
    assert "mayor1: rsync exit" in r.err and "Connection refused" in r.err
    # rsync's exit status here is racy: its _exit_cleanup() reaps the failed ssh with
    # waitpid(WNOHANG) and takes ssh's 255 only when ssh has already exited; otherwise it
    # keeps its own 12 (protocol stream error). The product reports whichever rsync said.
    assert re.search(r"mayor2: rsync exit (12|255): Host key verification failed", r.err), \
        r.err
    assert str(bad) in r.err
