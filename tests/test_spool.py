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
