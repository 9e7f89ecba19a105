"""The CLI skeleton: topology show/check, nodes, cluster init, errors and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

from support.cluster import REPO

CITY = str(REPO / "clusters" / "chiba-city.toml")


def test_topology_show_city(cli):
    r = cli("--cluster", CITY, "topology", "show")
    assert r.code == 0
    assert "1 president, 8 mayors, 8 towns, 256 nodes" in r.out
    assert "town8: ccn[225-256] (32 nodes)" in r.out
    assert "1 Gbit/s" in r.out and "100 Mbit/s" in r.out
    j = cli("--json", "--cluster", CITY, "topology", "show").json()
    assert (j["towns"], j["nodes"], j["mayors"], j["hosts"]) == (8, 256, 8, 265)
    assert j["towns_detail"][0]["nodes"] == "ccn[001-032]"


def test_nodes_json(cli):
    r = cli("--json", "--cluster", CITY, "nodes", "@town1")
    assert r.code == 0
    names = r.json()
    assert len(names) == 32 and names[0] == "ccn001" and names[-1] == "ccn032"
    assert cli("--cluster", CITY, "nodes", "ccn[001-003],@mayors").out.strip() == \
        "ccn[001-003],mayor[1-8]"
    assert cli("--cluster", CITY, "nodes", "-c", "@nodes").out.strip() == "256"


def test_topology_check(cli, tmp_path):
    r = cli("--cluster", CITY, "topology", "check")
    assert r.code == 0 and "ok: 265 hosts" in r.out


def test_unknown_nodes_exit_2_one_line(cli):
    r = cli("--cluster", CITY, "nodes", "ccn[250-260],foo")
    assert r.code == 2
    assert r.err.count("\n") == 1
    assert "unknown host(s) ccn[257-260],foo" in r.err
    assert "Traceback" not in r.err
    r = cli("--cluster", CITY, "nodes", "@town42")
    assert r.code == 2 and "unknown group(s) @town42" in r.err


def test_bad_topology_file(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nname = "x"\nkind = "embedded"\ncolour = "red"\n')
    r = cli("--cluster", bad, "topology", "check")
    assert r.code == 2
    assert r.err.strip() == (f"chiba-admin: error: {bad}:4: unknown key 'colour' in "
                             "[cluster] (allowed: description, home, kind, name)")
    r = cli("--debug", "--cluster", bad, "topology", "check")
    assert r.code == 2 and "Traceback" in r.err
    r = cli("--cluster", tmp_path / "missing.toml", "topology", "show")
    assert r.code == 2 and "topology file not found" in r.err


def test_cluster_init_and_status(cli, tmp_path):
    state = tmp_path / "st"
    r = cli("--state", state, "cluster", "status")
    assert r.code == 1 and "not initialised" in r.out
    r = cli("--state", state, "cluster", "init")
    assert r.code == 0 and "initialised 11 hosts" in r.out
    for host in ("pres", "mayor1", "ccn08"):
        for sub in ("scratch", "var/spool/chiba", "opt/chiba/repo"):
            assert (state / "hosts" / host / sub).is_dir()
    assert cli("--state", state, "cluster", "status").code == 0


def test_host_environment(embedded):
    env = embedded.host("ccn05").environment()
    assert env["CHIBA_HOST"] == "ccn05" and env["CHIBA_TOWN"] == "town2"
    assert env["CHIBA_ROLE"] == "node"
    assert os.path.isdir(env["CHIBA_SCRATCH"])
    assert env["CHIBA_SCRATCH"].endswith(os.path.join("hosts", "ccn05", "scratch"))


def test_console_script_runs(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "chiba-admin")
    p = subprocess.run([exe, "--cluster", CITY, "nodes", "@town2"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ccn[033-064]"
    p = subprocess.run([exe, "--cluster", CITY, "nodes", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("chiba-admin: error:")
