"""collect refuses a PATH that is, or lies below, a symbolic link on a node (both methods).

A user can plant ``$SCRATCH/job -> /etc`` (or a link to another user's directory) on a
node, where collect reads as root. Such a PATH refuses the whole collect (exit 2), as a
device node does: one line naming each host and path and what to do, nothing created on
the home server, no byte of what the link points to sent anywhere. Symlinks inside the
collected tree still come home verbatim, as links. A node that sends its PATH as a link
anyway (swapped in after its check, or a compromised node) is refused on the home server.
Everything goes through the real CLI: real mpiexec, the real City Transit agents.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile

import pytest

from support.fakes import node_tar
from support.trees import assert_same_tree, make_tree

pytestmark = pytest.mark.mpi

HINT = ("collect reads as root on the nodes and never follows one: name the real directory "
        "below scratch, or remove the link")


def scratch(topo, host: str) -> str:
    h = topo.host(host)
    return h.local_path(h.scratch)


@pytest.fixture
def victim(tmp_path):
    """A directory outside every node's scratch (another user's, or /etc) holding a secret
    that must never reach the home server: returns (directory, the secret's bytes)."""
    token = f"SECRET-{secrets.token_hex(16)}".encode()
    d = tmp_path / "victim"
    (d / "results").mkdir(parents=True)
    (d / "secret.txt").write_bytes(token)
    (d / "results" / "secret.txt").write_bytes(token)
    return d, token


def _holding(root, token: bytes) -> list[str]:
    """Files (not followed through symlinks) under ``root`` whose bytes hold ``token``."""
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and token in open(p, "rb").read():
                found.append(p)
    return found


def _plant(topo, victim_dir, case: str) -> str:
    """Plant ccn01's link for ``case``; returns the PATH to collect and the path as the
    node names it in the refusal."""
    sc = scratch(topo, "ccn01")
    if case == "dir-outside-scratch":
        os.symlink(victim_dir, os.path.join(sc, "job"))
        return "job", "/scratch/job"
    if case == "file":
        os.symlink(victim_dir / "secret.txt", os.path.join(sc, "job"))
        return "job", "/scratch/job"
    os.symlink(victim_dir, os.path.join(sc, "jobdir"))  # an intermediate component
    return "jobdir/results", "/scratch/jobdir"


@pytest.mark.parametrize("method", ["mpi", "transit"])
@pytest.mark.parametrize("case", ["dir-outside-scratch", "file", "intermediate"])
def test_a_symlinked_path_on_a_node_refuses_the_collect(embedded, cli, tmp_path, victim,
                                                        method, case):
    """ccn01's PATH is a planted link (to a directory outside scratch, to a file) or lies
    below one; ccn02 holds a real tree under the same PATH. Exit 2, one stderr line naming
    ccn01, the path and what to do; nothing of either host is collected (the refusal is
    all or nothing, as for a device node); not one byte of the target reaches home."""
    vdir, token = victim
    path, shown = _plant(embedded, vdir, case)
    make_tree(os.path.join(scratch(embedded, "ccn02"), path), big=5000)
    home = tmp_path / "home"
    home.mkdir()
    out = home / "back"
    args = ("collect", path, "--nodes", "ccn[01-02]", "--dest", str(out), "--method", method)
    r = cli(*args)
    assert r.code == 2, r.err
    assert r.err.splitlines() == [
        f"chiba-admin collect: ccn01: {shown}: is a symbolic link ({HINT})"], r.err
    assert not out.exists() and os.listdir(home) == []
    r = cli(*args, "--json")
    j = r.json()
    assert r.code == 2 and j["refused"] and list(j["failures"]) == ["ccn01"]
    assert j["hosts"]["ccn02"]["error"] == "not collected: PATH was refused on ccn01"
    assert j["bytes"] == 0 and not out.exists()
    # the secret is where it was and nowhere else: not in DIR, a spool, a temp dir
    assert sorted(_holding(tmp_path, token)) == [str(vdir / "results" / "secret.txt"),
                                                 str(vdir / "secret.txt")]


@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_symlinks_inside_the_tree_come_home_verbatim(embedded, cli, tmp_path, victim,
                                                     method):
    """Below PATH a symlink is data: it comes home as the same link, never followed."""
    vdir, token = victim
    tree = make_tree(os.path.join(scratch(embedded, "ccn03"), "job"), big=5000)
    os.symlink(vdir, tree / "to victim")
    os.symlink(vdir / "secret.txt", tree / "sub dir" / "to secret")
    out = tmp_path / "home" / "back"
    r = cli("collect", "job", "--nodes", "ccn03", "--dest", str(out), "--method", method)
    assert r.code == 0, r.err
    got = out / "ccn03" / "job"
    assert_same_tree(tree, got)
    assert os.readlink(got / "to victim") == str(vdir)
    assert os.readlink(got / "sub dir" / "to secret") == str(vdir / "secret.txt")
    assert _holding(tmp_path / "home", token) == []


def _link_archive(name: str, target: str) -> bytes:
    """An uncompressed tar whose only member is PATH itself, a symlink to ``target``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = tarfile.SYMTYPE, target
        tar.addfile(ti)
    return buf.getvalue()


def test_mpi_home_server_refuses_an_archive_whose_path_is_a_link(embedded, cli, tmp_path,
                                                                 victim, monkeypatch):
    """ccn01 passed its check, then sends PATH as a link (swapped in after the check, or a
    compromised node: fault collect.archive): refused on the home server, ccn01 fails
    (exit 1), nothing of it is left there; ccn02 is collected."""
    vdir, _ = victim
    for n in ("ccn01", "ccn02"):
        make_tree(os.path.join(scratch(embedded, n), "job"), big=5000)
    evil = tmp_path / "evil.tar"
    evil.write_bytes(_link_archive("job", str(vdir)))
    evil.chmod(0o644)
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps(  # rank 1 is ccn01
        {"point": "collect.archive", "rank": 1, "do": "replace", "file": str(evil)}))
    out = tmp_path / "home" / "back"
    r = cli("collect", "job", "--nodes", "ccn[01-02]", "--dest", str(out), "--json",
            "--compress", "none")
    assert r.code == 1, r.err
    j = r.json()
    assert list(j["failures"]) == ["ccn01"]
    assert j["failures"]["ccn01"] == ("archive refused on the home server: it holds 'job' "
                                      "as a symbolic link, which collect never brings home "
                                      "in place of PATH")
    assert os.listdir(out) == ["ccn02"]  # no per-host directory, temp dir or lock of ccn01
    assert sorted(os.listdir(out / "ccn02")) == [".job.chiba-staged", "job"]


def test_transit_home_server_refuses_a_stream_whose_path_is_a_link(embedded, cli, tmp_path,
                                                                   victim, monkeypatch):
    """The same for City Transit: ccn01's `tar -c` sends PATH as a link; the home side's
    sanitizer refuses it, nothing of ccn01 is left; ccn02 is collected."""
    vdir, _ = victim
    for n in ("ccn01", "ccn02"):
        make_tree(os.path.join(scratch(embedded, n), "job"), big=5000)
    crafted = tmp_path / "crafted.tar"
    crafted.write_bytes(_link_archive("job", str(vdir)))
    monkeypatch.setenv("PATH", node_tar(tmp_path / "bin", "ccn01", f"exec cat {crafted}"))
    out = tmp_path / "home" / "back"
    r = cli("--json", "collect", "job", "--nodes", "ccn0[1-2]", "--method", "transit",
            "--dest", str(out))
    assert r.code == 1, r.err
    j = r.json()
    assert list(j["failures"]) == ["ccn01"]
    assert ("home: member 'job' (PATH itself) is a link, which collect never brings home "
            "in place of PATH") in j["failures"]["ccn01"]
    assert j["hosts"]["ccn01"]["tree"] == "none"
    assert os.listdir(out) == ["ccn02"]

