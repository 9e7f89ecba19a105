"""The topology model, its TOML loader, nodesets and rank placement."""

from __future__ import annotations

import pytest

from chiba_admin.errors import NodeSetError, TopologyError
from topology import (chain_order, expand, fold, load_topology, loads_topology,
                      parse_bandwidth, parse_latency, parse_size, place_ranks)

from support.cluster import REPO

GOOD = """
[cluster]
name = "t"
kind = "ssh"

[defaults]
scratch = "/scratch"

[defaults.ssh]
user = "admin"
port = 2222

[links.core]
bandwidth = "1Gbit"
latency = "0.1ms"

[links.town]
bandwidth = "100Mbit"

[president]
name = "pres"
address = "10.0.0.1"

[mayors.m1]
address = "10.0.1.1"
[mayors.m2]

[towns.t1]
mayor = "m1"
nodes = "n[01-03]"
addresses = "10.1.0.[1-3]"

[towns.t2]
mayor = "m2"
nodes = "n[04-05]"
bandwidth = "10Mbit"

[hosts.n01]
scratch = "/local/scratch"

[hosts.x9]
town = "t2"
"""


@pytest.fixture
def topo():
    return loads_topology(GOOD, source="good.toml")


def test_model_basics(topo):
    assert topo.summary() == {"name": "t", "kind": "ssh", "president": "pres", "mayors": 2,
                              "towns": 2, "nodes": 6, "hosts": 9}
    assert [h.name for h in topo.mayors] == ["m1", "m2"]
    assert topo.town_nodes("t2") == ["n04", "n05", "x9"]
    assert topo.mayor_of("n02").name == "m1"
    assert topo.mayor_of("x9").name == "m2"
    assert topo.host("n02").address == "10.1.0.2"
    assert topo.host("n04").connect_address == "n04"
    assert topo.host("n01").scratch == "/local/scratch"
    assert topo.host("n02").scratch == "/scratch"
    assert topo.host("n02").ssh.user == "admin" and topo.host("n02").ssh.port == 2222
    assert topo.home_server.name == "pres"


def test_paths_and_bottleneck(topo):
    assert topo.path("n01", "n04") == ["n01", "m1", "pres", "m2", "n04"]
    assert topo.bottleneck("pres", "n01") == 100e6
    assert topo.bottleneck("pres", "n04") == 10e6
    assert topo.bottleneck("pres", "m1") == 1e9
    assert topo.latency("pres", "n01") == pytest.approx(1e-4)
    assert topo.uplink("n04").bandwidth == 10e6


def test_towns_covering_and_placement(topo):
    assert topo.towns_of(["n04", "n02", "n01"]) == {"t1": ["n01", "n02"], "t2": ["n04"]}
    p = place_ranks(topo, ["n04", "n01", "m2", "n02"], root="pres")
    assert p.hosts == ("pres", "n01", "n02", "m2", "n04")
    assert p.rank_of("m2") == 3
    assert chain_order(topo, ["x9", "n01"]) == ["n01", "x9"]


def test_resolve_dest_rule(topo):
    h = topo.host("n02")
    assert h.resolve("scratch") == "/scratch"
    assert h.resolve("scratch", "job1/in") == "/scratch/job1/in"
    assert h.resolve("scratch", "/tmp/x") == "/tmp/x"
    assert h.resolve("repository", "soft") == "/opt/chiba/repo/soft"


def test_nodesets(topo):
    assert expand(topo, "n[01-02],n05") == ["n01", "n02", "n05"]
    assert expand(topo, "@t1") == ["n01", "n02", "n03"]
    assert expand(topo, "@mayors") == ["m1", "m2"]
    assert len(expand(topo, "@all")) == 9
    assert expand(topo, "@nodes")[-1] == "x9"
    assert fold(["n01", "n02", "n03"]) == "n[01-03]"
    with pytest.raises(NodeSetError, match=r"unknown host\(s\) n\[06-08\]"):
        expand(topo, "n[01-08]")
    with pytest.raises(NodeSetError, match="unknown group.*@town9"):
        expand(topo, "@town9")
    with pytest.raises(NodeSetError, match="bad nodeset"):
        expand(topo, "n[01-")
    with pytest.raises(NodeSetError, match="empty"):
        expand(topo, " ")


def test_shipped_files():
    city = load_topology(REPO / "clusters" / "chiba-city.toml")
    assert city.summary()["nodes"] == 256 and len(city.mayors) == 8
    assert len(expand(city, "@town1")) == 32
    assert city.bottleneck("chiba-pres", "ccn200") == 100e6
    demo = load_topology(REPO / "clusters" / "demo.toml")
    assert demo.summary() == {"name": "demo", "kind": "embedded", "president": "pres",
                              "mayors": 2, "towns": 2, "nodes": 8, "hosts": 11}


def test_units():
    assert parse_bandwidth("20Mbit") == 20e6
    assert parse_bandwidth(1e9) == 1e9
    assert parse_latency("50us") == pytest.approx(5e-5)
    assert parse_latency(0) == 0
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("64M") == 64 * 2**20
    for bad in ("-5Mbit", "0", "fast", True):
        with pytest.raises(ValueError):
            parse_bandwidth(bad)


def _bad(text, match):
    with pytest.raises(TopologyError, match=match) as ei:
        loads_topology(text, source="bad.toml")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("bad.toml")
    return msg


def test_bad_syntax():
    msg = _bad("[cluster]\nname = \n", "TOML syntax error")
    assert msg.startswith("bad.toml:2:")


def test_bad_unknown_key():
    msg = _bad(GOOD.replace('latency = "0.1ms"', 'latency = "0.1ms"\nspeed = 3'),
               "unknown key 'speed' in \\[links.core\\]")
    assert msg.startswith("bad.toml:16:")
    assert "allowed: bandwidth, latency" in msg


def test_bad_duplicate_host():
    msg = _bad(GOOD.replace('nodes = "n[04-05]"', 'nodes = "n[03-05]"'),
               "duplicate host 'n03'")
    assert "towns.t2" in GOOD and msg.startswith("bad.toml:")


def test_bad_duplicate_mayor_node():
    _bad(GOOD.replace('nodes = "n[04-05]"', 'nodes = "n[04-05],m1"'), "duplicate host 'm1'")


def test_bad_node_without_town():
    msg = _bad(GOOD.replace('[hosts.x9]\ntown = "t2"', '[hosts.x9]\naddress = "1.2.3.4"'),
               "node x9 has no town")
    assert msg.startswith("bad.toml:41:")


def test_bad_mayor_without_town():
    _bad(GOOD + "\n[mayors.m3]\n", "mayor m3 serves no town")


def test_bad_no_president():
    _bad(GOOD.replace('[president]\nname = "pres"\naddress = "10.0.0.1"\n', ""),
         r"no \[president\] table")


def test_bad_president_without_name():
    _bad(GOOD.replace('name = "pres"\n', ""), "missing 'name' in \\[president\\]")


def test_bad_negative_bandwidth():
    msg = _bad(GOOD.replace('bandwidth = "10Mbit"', 'bandwidth = "-10Mbit"'),
               "bad bandwidth in \\[towns.t2\\].*must be positive")
    assert msg.startswith("bad.toml:36:")


def test_bad_missing_bandwidth():
    _bad(GOOD.replace('[links.town]\nbandwidth = "100Mbit"', '[links.town]\nlatency = 1'),
         "missing bandwidth in \\[links.town\\]")


def test_bad_unknown_mayor_and_town():
    _bad(GOOD.replace('mayor = "m2"', 'mayor = "m7"'), "unknown mayor 'm7'")
    _bad(GOOD.replace('town = "t2"', 'town = "t9"'), "unknown town 't9'")


def test_bad_misc():
    _bad(GOOD.replace('kind = "ssh"', 'kind = "cloud"'), "unknown cluster kind")
    _bad(GOOD.replace('port = 2222', 'port = 99999'), "ssh port")
    _bad(GOOD.replace('scratch = "/local/scratch"', 'scratch = "rel"'), "absolute path")
    _bad(GOOD.replace('addresses = "10.1.0.[1-3]"', 'addresses = "10.1.0.[1-2]"'),
         "2 addresses for 3 nodes")
    _bad(GOOD.replace('nodes = "n[01-03]"', 'nodes = "n[01-"'), "bad nodeset")


def test_missing_file(tmp_path):
    with pytest.raises(TopologyError, match="topology file not found"):
        load_topology(tmp_path / "nope.toml")


def test_town_switch_is_a_shared_link():
    """A mayor's town-side link is its own edge that routes and bottlenecks cross."""
    from topology.model import switch_of

    text = (REPO / "clusters" / "chiba-city.toml").read_text()
    city = loads_topology(text, "chiba-city.toml")
    assert city.town_uplink("town1").bandwidth == 100e6
    assert [lk.kind for lk in city.route("chiba-pres", "ccn001")] == ["core", "uplink", "town"]
    assert city.path("chiba-pres", "ccn001") == ["chiba-pres", "mayor1", "ccn001"]
    assert switch_of("town1") not in city and len(city.hosts()) == 265
    fat = loads_topology(text.replace('uplink = "100Mbit"', 'uplink = "1Gbit"'), "fat.toml")
    assert fat.town_uplink("town1").bandwidth == 1e9
    assert fat.bottleneck("chiba-pres", "ccn001") == 100e6
    # a town whose uplink is slower than its nodes: the uplink is the bottleneck
    slow = loads_topology(text.replace('uplink = "100Mbit"', 'uplink = "10Mbit"'), "s.toml")
    assert slow.bottleneck("chiba-pres", "ccn001") == 10e6
    assert slow.bottleneck("ccn001", "ccn002") == 100e6  # node to node stays in the switch
    assert slow.link("mayor1", "ccn001").bandwidth == 100e6  # the node's own link


def test_uplink_defaults_to_the_town_node_rate(topo):
    for t in topo.town_names():
        assert topo.town_uplink(t).bandwidth == topo.town_link(t).bandwidth
