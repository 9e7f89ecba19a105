"""The HTTP spool: archives by secret name only, no listing, no escape; `spool serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from mpitools.common.spool import NAME_RE, SpoolServer, check_url, publish, spool_name
from support.trees import make_tree


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_names_are_unguessable_and_distinct():
    names = {spool_name("zstd") for _ in range(100)}
    assert len(names) == 100
    assert all(NAME_RE.match(n) and n.endswith(".tar.zst") for n in names)
    assert spool_name("none").endswith(".tar") and spool_name("gzip").endswith(".tar.gz")


def test_serves_published_archive_and_nothing_else(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    pub = publish(make_tree(tmp_path / "src", big=1000), str(spool), "zstd")
    (spool / "secret.txt").write_text("not for you")
    (spool / ("." + spool_name("none") + ".part")).write_text("half")
    with SpoolServer(str(spool), "127.0.0.1", 0) as srv:
        code, body = _get(srv.url_for(pub.name))
        assert code == 200 and body == open(pub.path, "rb").read()
        assert check_url(srv.url_for(pub.name)) == pub.info.bytes
        for bad in ("", "secret.txt", "../" + pub.name, "%2e%2e/" + pub.name,
                    "." + pub.name, spool_name("zstd")):
            assert _get(srv.url_for(bad))[0] == 404, bad
        with pytest.raises(OSError, match="404"):
            check_url(srv.url_for(spool_name("zstd")))
    pub.remove()
    assert os.listdir(spool) != [] and not os.path.exists(pub.path)


def test_check_url_unreachable():
    with pytest.raises(OSError, match="127.0.0.1:1"):
        check_url("http://127.0.0.1:1/" + spool_name("zstd"), timeout=2)


def test_spool_serve_command(embedded, tmp_path):
    """`chiba-admin spool serve` runs until stopped, bound to the home server's address."""
    spool = embedded.home_server.local_path(embedded.home_server.spool)
    pub = publish(make_tree(tmp_path / "src", big=1000), spool, "gzip")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from chiba_admin.cli import run; run()",
                             "--json", "spool", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        first = "".join(iter(proc.stdout.readline, "}\n")) + "}"
        info = json.loads(first)
        assert info["url"].startswith("http://127.0.0.1:") and info["directory"] == spool
        assert _get(info["url"] + pub.name)[0] == 200
        assert _get(info["url"])[0] == 404
    finally:
        proc.terminate()
        proc.wait(10)


def test_spool_serve_missing_dir(cli, embedded, tmp_path):
    r = cli("spool", "serve", "--dir", str(tmp_path / "nope"))
    assert r.code == 1 and "spool directory missing" in r.err


def test_a_symlink_or_another_users_file_in_the_spool_is_not_served(tmp_path):
    """A user who can write in the spool plants `NAME.tar -> /etc/shadow`: not followed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root:*:secret")
    link = spool_name("none")
    (spool / link).symlink_to(secret)
    fifo = spool_name("none")
    os.mkfifo(spool / fifo)
    other = spool_name("none")
    (spool / other).write_text("someone else's")
    if os.geteuid() == 0:
        os.chown(spool / other, 65534, 65534)
    with SpoolServer(str(spool), "127.0.0.1", 0) as srv:
        assert _get(srv.url_for(link))[0] == 404
        assert _get(srv.url_for(fifo))[0] == 404  # and no hang opening it
        if os.geteuid() == 0:
            assert _get(srv.url_for(other))[0] == 404


def test_a_paced_archive_goes_out_on_a_paced_socket(tmp_path, capsys):
    """SpoolServer.pace sets Linux's SO_MAX_PACING_RATE on the connection that sends that
    archive (read back from the socket), and on no other. (Loopback's 64 KiB packets make
    the cap's effect on time unmeasurable here; the testbed measures it: README.)"""
    if not sys.platform.startswith("linux"):
        pytest.skip("TCP pacing is Linux's")
    spool = tmp_path / "spool"
    spool.mkdir()
    pub = publish(make_tree(tmp_path / "src", big=1000), str(spool), "none")
    other = publish(make_tree(tmp_path / "src2", big=10), str(spool), "none")
    body = open(pub.path, "rb").read()
    with SpoolServer(str(spool), "127.0.0.1", 0, verbose=True) as srv:
        srv.pace(pub.name, 2_425_000)
        assert _get(srv.url_for(pub.name)) == (200, body)
        assert _get(srv.url_for(other.name))[0] == 200
        srv.pace(pub.name, None)
        assert srv.pacing == {}
        assert _get(srv.url_for(pub.name)) == (200, body)
    err = capsys.readouterr().err
    assert err.count("paced at") == 1 and f"/{pub.name} paced at 2425000 bytes/s" in err
    pub.remove()
    other.remove()


def test_download_pacing_follows_the_narrowest_link_below_the_home_servers_own():
    from mpitools.stage.driver import PACING_SHARE, download_pacing
    from topology import loads_topology
    from topology.generate import generated_topology_toml

    def topo(node=20e6, core=200e6, **kw):  # generated files are embedded: as ssh hosts
        text = generated_topology_toml(2, 4, node, core, **kw)
        return loads_topology(text.replace('kind = "embedded"', 'kind = "ssh"'), source="t")

    # the paper's network: 200 Mb/s core, 20 Mb/s town links: paced at the town link
    assert download_pacing(topo(), "ccn01") == int(PACING_SHARE * 20e6 / 8)
    # "fat mayors": the node's own link is still the narrowest
    assert download_pacing(topo(uplink_bps=200e6), "ccn05") == int(PACING_SHARE * 20e6 / 8)
    # the home server's own link is the narrowest: nothing to pace
    assert download_pacing(topo(node=200e6, core=20e6), "ccn01") is None
    assert download_pacing(topo(), "pres") is None
    # the embedded cluster has no links to queue in
    emb = loads_topology(generated_topology_toml(2, 4, 20e6, 200e6), source="t")
    assert emb.kind == "embedded" and download_pacing(emb, "ccn01") is None


def test_a_rate_above_a_c_int_still_sends_the_whole_archive_paced(tmp_path, capsys):
    """A narrowest link above 17.6 Gb/s gives a rate above 2**31 - 1 bytes/s: the socket
    takes it as 64 bits (it used to raise in the handler after the 200's headers, and
    rank 0 read no body); nonsense rates leave the archive unpaced."""
    if not sys.platform.startswith("linux"):
        pytest.skip("TCP pacing is Linux's")
    spool = tmp_path / "spool"
    spool.mkdir()
    pub = publish(make_tree(tmp_path / "src", big=1000), str(spool), "none")
    body = open(pub.path, "rb").read()
    with SpoolServer(str(spool), "127.0.0.1", 0, verbose=True) as srv:
        srv.pace(pub.name, 3_031_250_000)  # 0.97 of 25 Gb/s
        assert _get(srv.url_for(pub.name)) == (200, body)
        for nonsense in (0, -5, 0.5):
            srv.pace(pub.name, nonsense)
            assert srv.pacing == {}
    assert f"/{pub.name} paced at 3031250000 bytes/s" in capsys.readouterr().err
    pub.remove()


def test_pacing_is_per_server_and_keyed_by_the_served_name_only(tmp_path, capsys):
    """Two servers in one process (`spool serve` beside a stage's own) pace independently;
    a client's spelling of the path (query, doubled slash) reaches the same archive at the
    same rate, and the digest list beside it, a HEAD or a 404 is never paced."""
    if not sys.platform.startswith("linux"):
        pytest.skip("TCP pacing is Linux's")
    import http.client

    spool = tmp_path / "spool"
    spool.mkdir()
    pub = publish(make_tree(tmp_path / "src", big=1000), str(spool), "none")
    (spool / (pub.name + ".sums")).write_bytes(b"x" * 32)
    os.chmod(spool / (pub.name + ".sums"), 0o600)
    with SpoolServer(str(spool), verbose=True) as a, SpoolServer(str(spool), verbose=True) as b:
        a.pace(pub.name, 1_000_000)
        assert b.pacing == {} and a.pacing == {pub.name: 1_000_000}
        assert _get(b.url_for(pub.name))[0] == 200
        assert "paced at" not in capsys.readouterr().err
        host, port = a.address
        for method, path, status, paced in (
                ("GET", f"//{pub.name}?x=1&rate=9", 200, True),
                ("GET", f"/{pub.name}.sums", 200, False),
                ("HEAD", f"/{pub.name}", 200, False),
                ("GET", f"/{pub.name}/..", 404, False)):
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request(method, path)
            r = c.getresponse()
            r.read()
            c.close()
            assert r.status == status, path
            assert ("paced at 1000000" in capsys.readouterr().err) == paced, path
    pub.remove()


def test_download_pacing_on_the_shipped_cluster_and_other_homes():
    """Where the queue would build in the network, and only there: the shipped Chiba City
    (1 Gb/s core, 100 Mb/s towns), a home server that is a mayor or a node, staging to a
    mayor, a core of unlimited rate."""
    from pathlib import Path

    from mpitools.stage.driver import PACING_SHARE, download_pacing
    from topology import load_topology, loads_topology
    from topology.generate import generated_topology_toml

    city = load_topology(Path(__file__).parent.parent / "clusters" / "chiba-city.toml")
    assert download_pacing(city, "ccn001") == int(PACING_SHARE * 100e6 / 8)
    assert download_pacing(city, "mayor2") is None  # the core link all the way

    def topo(home=None, **kw):
        text = generated_topology_toml(2, 4, 20e6, 200e6, **kw).replace(
            'kind = "embedded"', 'kind = "ssh"' + (f'\nhome = "{home}"' if home else ""))
        return loads_topology(text, source="t")

    town = int(PACING_SHARE * 20e6 / 8)
    # a mayor at home: its own town-side link is the narrowest into its town, not into others
    assert [download_pacing(topo("mayor1"), n) for n in ("ccn01", "ccn05", "mayor2")] == [
        None, town, None]
    assert download_pacing(topo("mayor1", uplink_bps=200e6), "ccn01") == town
    # a node at home: its own 20 Mb/s link is the narrowest everywhere
    assert [download_pacing(topo("ccn01"), n) for n in ("ccn02", "ccn05", "pres")] == [
        None, None, None]
    inf = loads_topology(generated_topology_toml(2, 4, 20e6, 200e6).replace(
        'kind = "embedded"', 'kind = "ssh"').replace("200000000.0", "inf"), source="t")
    assert download_pacing(inf, "ccn01") == town and download_pacing(inf, "mayor1") is None


def test_a_failed_paced_download_names_the_rate_it_was_paced_at():
    """Rank 0's download error says the spool paced it, and at what rate, when the job says
    so (a topology that understates its links can make the download time out)."""
    from mpitools.common.archive import block_sums
    from mpitools.stage.ranks import _Downloader

    class _Stalled:
        def read(self, n):
            raise TimeoutError("timed out")

        def close(self):
            pass

    for paced, want in ((2, "download failed: timed out (the spool paced it at 2 bytes/s "
                            "from the topology file's link rates)"),
                        (None, "download failed: timed out")):
        down = _Downloader(_Stalled(), 64 << 10, 2, block_sums(b"x" * 10), 64 << 10, paced)
        assert down.get(lambda: None) is None
        assert down.error == want


def test_the_spooled_archive_carries_no_zstd_checksum_yet_every_flip_is_refused(tmp_path):
    """The stage spool leaves zstd's frame checksum out (each node checks every block
    against the digest table before decompressing it); a flipped byte anywhere is still
    refused before any of its block is unpacked."""
    import io

    import zstandard

    from mpitools.common.archive import Extractor, VerifyError, pack_tree

    src = make_tree(tmp_path / "src", big=300_000)
    spool = tmp_path / "spool"
    spool.mkdir()
    pub = publish(src, str(spool), "zstd")
    data = open(pub.path, "rb").read()
    assert not zstandard.get_frame_parameters(data).has_checksum
    out = io.BytesIO()
    pack_tree(src, out, "zstd")  # every other zstd stream (collect's) keeps its checksum
    assert zstandard.get_frame_parameters(out.getvalue()).has_checksum
    for where in (40, len(data) // 2, len(data) - 3):
        bad = bytearray(data)
        bad[where] ^= 0x10
        dest = tmp_path / f"d{where}"
        dest.mkdir()
        ex = Extractor(str(dest), "zstd", sums=pub.info.blocks)
        ex.feed(bad)
        with pytest.raises(VerifyError, match="differs"):
            ex.finish()
        if where < 65536:  # the first block: nothing at all was unpacked
            assert os.listdir(dest) == []

