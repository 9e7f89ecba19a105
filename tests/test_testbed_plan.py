"""Unit tests of the testbed's pure planning and config text (no root needed)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chiba_admin.errors import InvalidRequest, TestbedError
from testbed import configs
from testbed.configs import Layout
from testbed.faults import fault_commands
from testbed.lifecycle import generated_topology
from testbed.plan import (TBF_MIN_BURST, choose_octet, host_batch, plan_from_dict,
                          plan_testbed, switch_batch, switch_tc_batch, tbf_args, tc_batch)
from topology import load_topology, loads_topology

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def plan(tmp_path):
    topo = generated_topology(2, 4, 20e6, 200e6)
    return topo, plan_testbed(topo, "beef", 222, tmp_path / "st")


def test_addresses_and_wiring(plan):
    topo, p = plan
    assert p.subnet == "10.222.0.0/16" and p.switch_ns == "chiba-beef-switch"
    assert [h.name for h in p.hosts][:3] == ["pres", "mayor1", "mayor2"]
    assert all(h.ns == f"chiba-beef-{h.name}" for h in p.hosts)
    assert p.host("pres").address == "10.222.0.1"
    m1 = p.host("mayor1")
    assert [n.address for n in m1.nics] == ["10.222.0.2", "10.222.1.254"]
    assert m1.forward and len(m1.nics) == 2
    assert p.host("ccn05").address == "10.222.2.1"
    assert p.host("ccn05").routes == (("10.222.0.0/16", "10.222.2.254"),)
    assert p.host("pres").routes == (("10.222.1.0/24", "10.222.0.2"),
                                     ("10.222.2.0/24", "10.222.0.3"))
    # mayors route the other towns straight to the other mayor, not via the president
    assert m1.routes == (("10.222.2.0/24", "10.222.0.3"),)
    # node links at the town rate, president and mayor NICs (both sides) at the core rate
    assert p.host("ccn01").nics[0].rate_bps == 20e6
    # the paper's network: the mayor's core NIC at the core rate, its town-side NIC at the
    # town's rate (shared by the town's nodes), not at the core rate
    assert [(n.ifname, n.rate_bps) for n in m1.nics] == [("eth0", 200e6), ("eth1", 20e6)]
    ports = [n.port for h in p.hosts for n in h.nics]
    assert len(set(ports)) == len(ports) and max(map(len, ports)) <= 15


def test_batches(plan):
    _, p = plan
    sw = switch_batch(p)
    assert "link add br0 type bridge stp_state 0 forward_delay 0" in sw
    assert any("peer name eth1 netns chiba-beef-mayor1" in ln for ln in sw)
    hb = host_batch(p.host("ccn01"))
    assert hb[0] == "link set lo up" and "route add 10.222.0.0/16 via 10.222.1.254" in hb
    assert tc_batch(p.host("mayor1"))[1].startswith("qdisc replace dev eth1 root tbf rate 20000000bit")
    assert len(switch_tc_batch(p)) == 1 + 2 * 2 + 8


def test_tbf_burst_never_below_64k():
    for rate in (1e6, 20e6, 200e6, 1e9, 10e9):
        burst = int(tbf_args(rate).split("burst ")[1].split()[0])
        assert burst >= TBF_MIN_BURST


def test_choose_octet_avoids_used_ranges():
    rng = random.Random(1)
    used = [f"10.{x}.0.0/16" for x in range(200, 250)]
    assert choose_octet(used, rng) == 250
    assert choose_octet(["192.0.2.0/24", "0.0.0.0/0"], rng) in range(200, 251)
    with pytest.raises(TestbedError):
        choose_octet(["10.0.0.0/8"], rng)


def test_testbed_toml_loads_as_ssh_cluster(plan, tmp_path):
    topo, p = plan
    lay = Layout(tmp_path / "st")
    text = configs.testbed_toml(p, topo, lay)
    t = loads_topology(text, "testbed.toml")
    assert t.kind == "ssh" and len(t.nodes) == 8
    assert t.host("ccn06").address == "10.222.2.2"
    assert t.host("mayor2").address == "10.222.0.3"
    assert t.host("ccn01").ssh.config_file == str(lay.ssh_config)
    assert t.host("ccn01").ssh.identity_file == str(lay.identity)
    assert t.mpi["btl_tcp_if_include"] == "10.222.0.0/16"
    assert t.mpi["prte_if_include"] == "eth0"
    assert t.mpi["plm_ssh_args"] == f"-F {lay.ssh_config}"
    assert t.link("mayor1", "ccn01").bandwidth == 20e6
    assert t.link("pres", "mayor1").bandwidth == 200e6


def test_testbed_from_cluster_file_keeps_its_rates(tmp_path):
    topo = load_topology(REPO / "clusters" / "demo.toml")
    p = plan_testbed(topo, "0001", 201, tmp_path)
    assert p.core_bps == 1e9 and p.host("ccn01").nics[0].rate_bps == 100e6
    p2 = plan_testbed(topo, "0001", 201, tmp_path, node_bps=5e6, mayor_bps=50e6)
    assert p2.host("ccn08").nics[0].rate_bps == 5e6 and p2.core_bps == 50e6


def test_ssh_and_sshd_configs(plan, tmp_path):
    _, p = plan
    lay = Layout(tmp_path / "st")
    sc = configs.ssh_config(p, lay)
    assert "Host ccn03\n    HostName 10.222.1.3" in sc
    assert "StrictHostKeyChecking yes" in sc and "User root" in sc
    assert "KexAlgorithms curve25519-sha256" in sc
    d = configs.sshd_config(p.host("ccn03"), lay)
    for opt in ("UsePAM no", "UseDNS no", "StrictModes no", "MaxStartups 1000",
                "MaxSessions 100", "PermitRootLogin prohibit-password",
                "Subsystem sftp internal-sftp", "AcceptEnv CHIBA_*",
                "PermitUserEnvironment no", "ListenAddress 10.222.1.3"):
        assert opt in d
    hosts = configs.etc_hosts(p)
    assert "10.222.0.1\tpres" in hosts and "10.222.2.4\tccn08" in hosts
    script = configs.holder_script(p.host("ccn03"), lay)
    assert "hostname ccn03" in script and "/scratch" in script and "/etc/hosts" in script
    rc = configs.login_bashrc()
    if rc is not None:
        assert f"mount --bind {lay.bashrc} {rc}" in script


def test_plan_roundtrip_and_faults(plan):
    _, p = plan
    assert plan_from_dict(p.to_dict()) == p
    down = fault_commands(p, p.host("mayor1"), "link-down")
    assert down == [["ip", "-n", "chiba-beef-switch", "link", "set", "c1", "down"],
                    ["ip", "-n", "chiba-beef-switch", "link", "set", "t1x0", "down"]]
    assert fault_commands(p, p.host("ccn01"), "fill-disk", down=False) == [
        ["umount", "-l", "/scratch"]]


def test_refuses_bad_shapes(tmp_path):
    with pytest.raises(InvalidRequest):
        generated_topology(0, 4, 1e6, 1e7)
    topo = generated_topology(1, 2, 1e6, 1e7)
    bad = topo.with_root(lambda h: "")
    from dataclasses import replace

    from topology import HostPaths
    h = bad.host("ccn01")
    bad.graph.nodes["ccn01"]["host"] = replace(h, paths=HostPaths(scratch="/etc"))
    with pytest.raises(InvalidRequest, match="system directory"):
        plan_testbed(bad, "0002", 202, tmp_path)


def test_up_without_root_is_one_line_exit_2(cli, monkeypatch, tmp_path):
    import testbed.lifecycle as lc

    monkeypatch.setattr(lc.os, "geteuid", lambda: 1000)
    r = cli("testbed", "up", "--state", str(tmp_path / "s"))
    assert r.code == 2
    assert "needs root" in r.err and len(r.err.strip().splitlines()) == 1


def test_fat_mayors_shape_is_still_available(tmp_path):
    """--uplink-mbit = --mayor-mbit: the shape that hid City Transit's bottleneck."""
    fat = generated_topology(2, 4, 20e6, 200e6, uplink_bps=200e6)
    p = plan_testbed(fat, "0002", 202, tmp_path)
    assert [n.rate_bps for n in p.host("mayor2").nics] == [200e6, 200e6]
    p2 = plan_testbed(generated_topology(2, 4, 20e6, 200e6), "0003", 203, tmp_path,
                      uplink_bps=200e6)
    assert p2.host("mayor1").nics[1].rate_bps == 200e6 and p2.uplink_bps["town1"] == 200e6
    lay = Layout(tmp_path / "st")
    t = loads_topology(configs.testbed_toml(p, fat, lay), "testbed.toml")
    assert t.town_uplink("town1").bandwidth == 200e6 and t.town_link("town1").bandwidth == 20e6
