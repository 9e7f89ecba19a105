"""Integration tests of the namespace testbed: SSH, private disks, shaped links, faults, MPI, down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from chiba_admin.errors import InvalidRequest
from support.procs import still_running
from support.testbed import require_testbed

pytestmark = pytest.mark.testbed

PY = sys.executable
NODE_BPS = 20e6

# A receiver that prints "listening", then "<bytes> <seconds>" measured from its first byte.
_RECEIVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    t0 = t0 or time.monotonic()
    n += len(b)
print(n, time.monotonic() - t0, flush=True)
"""
_SENDER = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b"x" * 65536; end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(buf)
c.close()
"""


def _transfer(tb, src: str, dst: str, seconds: float = 2.5, port: int = 5001):
    """Send for ``seconds`` from src to dst; returns (bytes, receive seconds)."""
    rx = tb.popen(dst, [PY, "-c", _RECEIVER, tb.address(dst), str(port)],
                  stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "listening"
        tb.exec(src, [PY, "-c", _SENDER, tb.address(dst), str(port), str(seconds)],
                check=True, timeout=30)
        out, _ = rx.communicate(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    n, secs = out.split()
    return int(n), float(secs)


def _can_connect(tb, src: str, dst: str, timeout: float = 2.0) -> bool:
    with tb.netns(src):
        try:
            socket.create_connection((tb.address(dst), 22), timeout=timeout).close()
            return True
        except OSError:
            return False


def test_paramiko_to_every_host_sees_own_hostname_and_scratch(testbed_cluster):
    import paramiko

    tb = testbed_cluster
    for h in tb.hosts:
        tb.exec(h, f"echo {h} > /scratch/.whoami", check=True)
    assert not os.path.exists("/scratch/.whoami")  # the machine's own /scratch is untouched
    try:
        with tb.netns(tb.president):
            for h in tb.hosts:
                c = paramiko.SSHClient()
                c.load_host_keys(str(tb.known_hosts))
                c.set_missing_host_key_policy(paramiko.RejectPolicy())
                c.connect(tb.address(h), username="root", key_filename=str(tb.identity_file),
                          look_for_keys=False, allow_agent=False, timeout=10)
                try:
                    _, out, _ = c.exec_command("hostname; cat /scratch/.whoami; "
                                               "ls -d /var/spool/chiba /opt/chiba/repo")
                    lines = out.read().decode().split()
                finally:
                    c.close()
                assert lines[:2] == [h, h], h
    finally:
        for h in tb.hosts:
            tb.exec(h, "rm -f /scratch/.whoami")


def test_each_host_has_its_own_disk(testbed_cluster):
    tb = testbed_cluster
    st = tb.status()
    assert st["disk"] == "tmpfs"
    for h in ("ccn01", "ccn02"):
        out = tb.exec(h, "findmnt -rn -o SOURCE,FSTYPE -T /scratch", check=True).stdout.split()
        assert out == [f"chiba-{tb.id}-{h}[/scratch]", "tmpfs"], out
    try:
        tb.exec("ccn01", "head -c 1048576 /dev/zero > /scratch/.mine", check=True)
        assert tb.exec("ccn02", "test -e /scratch/.mine").returncode != 0
        used = tb.exec("ccn01", "df --output=used -k /scratch | tail -1", check=True)
        assert int(used.stdout) >= 1024
    finally:
        tb.exec("ccn01", "rm -f /scratch/.mine")


def test_openssh_by_name_from_president(testbed_cluster):
    tb = testbed_cluster
    cp = tb.exec(tb.president, tb.ssh_argv("ccn07", "hostname; getent hosts ccn02"),
                 check=True)
    name, addr, other = cp.stdout.split()[:3]
    assert name == "ccn07" and addr == tb.address("ccn02") and other == "ccn02"


def test_ssh_sessions_start_like_a_plain_node(testbed_cluster):
    # a session's bash reads the host's own ~/.bashrc (the testbed's), not this machine's
    from testbed import configs

    tb = testbed_cluster
    rc = configs.login_bashrc()
    if rc is None:
        pytest.skip("this user has no ~/.bashrc to stand in for")
    cp = tb.exec(tb.president, tb.ssh_argv("ccn02", f"cat {rc}"), check=True)
    assert cp.stdout == configs.BASHRC
    with open(rc) as f:  # and the machine's own file is untouched
        assert f.read() != configs.BASHRC


@pytest.mark.perf
def test_node_link_rate_within_15_percent(testbed_cluster):
    """The shaped node link delivers its rate (a measured rate: perf, not `make test`)."""
    n, secs = _transfer(testbed_cluster, "ccn01", "ccn02")
    rate = n * 8 / secs
    print(f"\nccn01 -> ccn02: {rate / 1e6:.2f} Mbit/s of {NODE_BPS / 1e6:g}")
    assert abs(rate - NODE_BPS) / NODE_BPS < 0.15, f"{rate / 1e6:.1f} Mbit/s"


def test_cross_town_transfer_counted_on_mayors(testbed_cluster):
    tb = testbed_cluster
    with tb.measure() as m:
        n, secs = _transfer(tb, "ccn03", "ccn06", seconds=1.5, port=5002)
    print(f"\nccn03 -> ccn06 (cross-town): {n * 8 / secs / 1e6:.2f} Mbit/s")
    assert n * 8 / secs > 0.85 * NODE_BPS
    d = m.delta
    # the data went ccn03 -> mayor1 -> mayor2 -> ccn06, not through the president
    assert d["ccn06"]["rx_bytes"] >= n
    assert d["mayor1"]["nics"]["eth0"]["tx_bytes"] >= n
    assert d["mayor2"]["nics"]["eth1"]["tx_bytes"] >= n
    assert d["pres"]["rx_bytes"] < n / 100
    assert m.infrastructure["mayors_town_tx"] >= n


def test_up_twice_refused(testbed_cluster, cli):
    import testbed

    with pytest.raises(InvalidRequest, match="already up"):
        testbed.up(testbed.generated_topology(1, 1, 1e6, 1e7), testbed_cluster.state)
    r = cli("testbed", "up", "--state", str(testbed_cluster.state))
    assert r.code == 2 and "already up" in r.err and len(r.err.strip().splitlines()) == 1


def test_status_counters_and_exec_cli(testbed_cluster, cli):
    tb = testbed_cluster
    r = cli("--json", "testbed", "status", "--state", str(tb.state))
    assert r.code == 0 and r.json()["healthy"] and len(r.json()["hosts"]) == 11
    r = cli("--json", "testbed", "counters", "--state", str(tb.state))
    assert r.code == 0 and set(r.json()) == set(tb.hosts)
    assert r.json()["mayor1"]["nics"]["eth1"]["network"] == "town1"
    exe = os.path.join(os.path.dirname(PY), "chiba-admin")
    cp = subprocess.run([exe, "testbed", "exec", "--state", str(tb.state), "mayor2", "--",
                         "sh", "-c", "hostname; exit 3"], capture_output=True, text=True)
    assert cp.stdout.strip() == "mayor2" and cp.returncode == 3
    assert tb.exec("mayor2", ["hostname"]).stdout.strip() == "mayor2"


def test_fault_link_down_and_heal(testbed_cluster):
    tb = testbed_cluster
    assert _can_connect(tb, "pres", "ccn04")
    try:
        tb.fault("ccn04", "link-down")
        assert not _can_connect(tb, "pres", "ccn04", timeout=1.5)
        assert "link-down" in next(h for h in tb.status()["hosts"]
                                   if h["host"] == "ccn04")["faults"]
    finally:
        tb.heal("ccn04")
    assert _can_connect(tb, "pres", "ccn04")


def test_fault_kill_sshd_and_heal(testbed_cluster):
    tb = testbed_cluster
    try:
        tb.fault("ccn03", "kill-sshd")
        assert not _can_connect(tb, "pres", "ccn03")
        assert tb.exec("pres", tb.ssh_argv("ccn03", "true")).returncode != 0
        assert not tb.status()["healthy"]
    finally:
        tb.heal("ccn03")
    assert tb.exec("pres", tb.ssh_argv("ccn03", "hostname"), check=True).stdout.strip() == "ccn03"
    assert tb.status()["healthy"]


def test_fault_fill_disk_and_heal(testbed_cluster):
    tb = testbed_cluster
    tb.exec("ccn02", "echo keep > /scratch/.keep", check=True)
    write = "dd if=/dev/zero of=/scratch/.big bs=64k count=32 2>&1; rc=$?; rm -f /scratch/.big; exit $rc"
    try:
        tb.fault("ccn02", "fill-disk")
        cp = tb.exec("pres", tb.ssh_argv("ccn02", write))
        assert cp.returncode != 0 and "No space left" in cp.stdout
    finally:
        tb.heal("ccn02")
    try:
        assert tb.exec("ccn02", write).returncode == 0
        assert tb.exec("ccn02", "cat /scratch/.keep").stdout.strip() == "keep"
    finally:
        tb.exec("ccn02", "rm -f /scratch/.keep")


@pytest.mark.mpi
def test_mpiexec_across_testbed_hosts(testbed_cluster):
    tb = testbed_cluster
    prog = ("from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
            "s = c.allreduce(c.rank); print(c.rank, socket.gethostname(), s, flush=True)")
    # a mayor (two NICs) among the hosts: the case that needs prte_if_include=eth0
    argv = tb.mpiexec_argv(["ccn01", "ccn05", "mayor1"], [PY, "-c", prog])
    for _ in range(3):
        cp = tb.exec(tb.president, argv, timeout=120)
        lines = sorted(ln for ln in cp.stdout.splitlines() if ln[:1].isdigit())
        assert cp.returncode == 0, cp.stderr[-2000:]
        assert lines == ["0 ccn01 3", "1 ccn05 3", "2 mayor1 3"]


def _links() -> set[str]:
    out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _leftovers(prefix: str, state: str, pids: list[int], links: set[str]) -> list[str]:
    from testbed import system

    out = [f"netns {ns}" for ns in system.netns_list() if ns.startswith(prefix)]
    with open("/proc/mounts") as f:
        out += [f"mount {ln.split()[1]}" for ln in f if state in ln or prefix in ln]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(f"process {pid}")
        except OSError:
            pass
    out += [f"link {name}" for name in sorted(_links() - links)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("towns,per_town", [(1, 2), (4, 8)])
def test_up_down_leaves_nothing(tmp_path, towns, per_town, cli):
    require_testbed()
    import testbed
    from testbed import system
    from testbed.state import State

    state = tmp_path / "tb"
    links = _links()
    testbed.up(testbed.generated_topology(towns, per_town, 20e6, 200e6), state)
    st = State.load(state / "state.json")
    prefix, hosts = st.data["prefix"], len(st.data["plan"]["hosts"])
    pids = [d["pid"] for k in ("holders", "sshd") for d in st.data[k].values()]
    inodes = {system.netns_inode(ns) for ns in st.data["namespaces"]}
    assert hosts == 1 + towns + towns * per_town
    tb = testbed.Testbed(state)
    last = tb.hosts[-1]
    # a stray process started over ssh must not survive `down` either
    tb.exec(tb.president, tb.ssh_argv(last, "setsid sleep 1000 </dev/null >/dev/null 2>&1 &"),
            check=True)
    r = cli("testbed", "down", "--state", str(state))
    assert r.code == 0, r.err
    # killed processes end a moment later: wait for their ends (pidfds), not a while
    assert still_running(pids, cap=10) == []
    # a namespace's veth links go when the kernel's cleanup of the namespace runs, after
    # `ip netns delete` returned; no event says so, so this one waits by looking again
    deadline = time.monotonic() + 5
    while _leftovers(prefix, str(state), pids, links) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(prefix, str(state), pids, links) == []
    assert system.processes_in(inodes) == []
    assert not state.exists()


@pytest.mark.slow
@pytest.mark.perf
def test_up_down_is_quick(tmp_path):
    """The smallest testbed comes up and goes down in under a minute (wall clock: perf)."""
    require_testbed()
    import testbed

    state = tmp_path / "tb"
    t0 = time.monotonic()
    try:
        testbed.up(testbed.generated_topology(1, 2, 20e6, 200e6), state)
        up_s = time.monotonic() - t0
    finally:
        testbed.down(state)
    assert time.monotonic() - t0 < 60, f"up took {up_s:.1f} s"


def test_bad_disk_size_refused_before_anything_exists(tmp_path, cli):
    require_testbed()
    state = tmp_path / "bad"
    r = cli("testbed", "up", "--towns", "1", "--nodes-per-town", "1", "--disk-size", "lots",
            "--state", str(state))
    assert r.code == 2 and "bad disk size 'lots'" in r.err
    assert not state.exists()


def test_down_keep_data_copies_files_off_the_tmpfs(tmp_path, cli):
    require_testbed()
    import testbed

    state = tmp_path / "keep"
    testbed.up(testbed.generated_topology(1, 1, 20e6, 200e6), state)
    tb = testbed.Testbed(state)
    tb.exec("ccn01", "echo kept > /scratch/note && ln -s note /scratch/link", check=True)
    r = cli("--json", "testbed", "down", "--keep-data", "--state", str(state))
    assert r.code == 0, r.err
    data = state / "hosts" / "ccn01" / "data" / "scratch"
    with open("/proc/mounts") as f:
        assert not [ln for ln in f if str(state) in ln]
    assert (data / "note").read_text() == "kept\n"
    assert os.readlink(data / "link") == "note"


def test_down_after_half_finished_up(tmp_path, monkeypatch):
    require_testbed()
    import testbed
    import testbed.lifecycle as lc
    from chiba_admin.errors import TestbedError
    from testbed import system

    def broken(*a, **kw):
        raise TestbedError("simulated crash while starting sshd")

    monkeypatch.setattr(lc, "start_sshd", broken)
    state = tmp_path / "half"
    with pytest.raises(TestbedError, match="simulated"):
        testbed.up(testbed.generated_topology(1, 2, 20e6, 200e6), state, rollback=False)
    prefix = testbed.status(state)["hosts"] and f"chiba-{testbed.status(state)['id']}-"
    assert any(ns.startswith(prefix) for ns in system.netns_list())
    with open("/proc/mounts") as f:
        assert [ln for ln in f if str(state) in ln]  # the hosts' disks were mounted
    testbed.down(state)
    assert not any(ns.startswith(prefix) for ns in system.netns_list())
    with open("/proc/mounts") as f:
        assert not [ln for ln in f if str(state) in ln]
    assert not state.exists()
