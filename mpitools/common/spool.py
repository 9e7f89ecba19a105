"""The HTTP spool: publish packed archives under unguessable names and serve only those."""

from __future__ import annotations

import http.server
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mpitools.common.archive import PackInfo, pack_tree

__all__ = ["SpoolServer", "Published", "publish", "spool_name", "check_url",
           "NAME_RE", "EXTENSIONS", "SUMS_SUFFIX"]

EXTENSIONS = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}
# an archive's block digests (mpitools.common.archive.BLOCK), served beside it for rank 0
SUMS_SUFFIX = ".sums"
# token_urlsafe(24) gives 32 characters; anything else (/, .., listing) is never served
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{32,}\.tar(?:\.zst|\.gz)?(?:\.sums)?$")
_SEND_CHUNK = 1 << 20


def spool_name(compress: str) -> str:
    """A fresh unguessable archive name for the spool."""
    return secrets.token_urlsafe(24) + EXTENSIONS[compress]


@dataclass
class Published:
    """An archive in the spool: its path, name and what packing recorded."""

    path: str
    name: str
    info: PackInfo

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def publish(src: str, spool_dir: str, compress: str = "zstd", *,
            hash_alg: str = "blake3", on_payload=None) -> Published:
    """Pack ``src`` into ``spool_dir`` under a fresh name (written aside, then renamed);
    ``on_payload(n)`` as in :func:`mpitools.common.archive.pack_tree`."""
    name = spool_name(compress)
    final = os.path.join(spool_dir, name)
    part = os.path.join(spool_dir, "." + name + ".part")  # dot names are never served
    try:
        with open(part, "wb", buffering=1 << 20) as out:
            os.chmod(part, 0o600)
            # no zstd checksum: every node verifies each block against the digest table
            # before decompressing it (mpitools/stage/ranks.py); the checksum cost a node
            # 0.02 s per 250 MB tree to check the same bytes again (docs/design.md)
            info = pack_tree(src, out, compress, hash_alg=hash_alg, on_payload=on_payload,
                             checksum=False)
        os.rename(part, final)
    except BaseException:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise
    return Published(final, name, info)


# Linux's SO_MAX_PACING_RATE (asm-generic/socket.h); Python's socket module lacks the name
_SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
_U64_MAX = (1 << 64) - 1


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of one archive by exact name; 404 for everything else, no listing."""

    server_version = "chiba-spool/1"
    spool_dir: str = "."  # set on a subclass per server
    pacing: dict[str, int] = {}  # archive name -> bytes/s (a dict per server subclass)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet by design
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _name(self) -> str:
        """The archive name the request asks for (query string and leading slashes off)."""
        return self.path.split("?", 1)[0].lstrip("/")

    def _open(self):
        name = self._name()
        if not NAME_RE.match(name):
            self.send_error(404, "not found")
            return None
        path = os.path.join(self.spool_dir, name)
        # Only the server's own archives: a symlink planted in the spool (to /etc/shadow)
        # is not followed, and anything but a regular file of the serving user is not served.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            self.send_error(404, "not found")
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            self.send_error(404, "not found")
            return None
        f = os.fdopen(fd, "rb")
        size = st.st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        return f

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        f = self._open()
        if f is not None:
            f.close()

    def _pace(self) -> None:
        rate = self.pacing.get(self._name())
        if not rate or not sys.platform.startswith("linux"):
            return
        # As an unsigned 64-bit value (Linux >= 4.20 reads 8 bytes): Python packs a plain
        # int as a C int, so a rate above 2**31 - 1 bytes/s (17 Gb/s) raised TypeError here
        # and rank 0 got the 200's headers and no body.
        val = struct.pack("=Q", min(int(rate), _U64_MAX))
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, val)
            got = self.connection.getsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, 8)
        except OSError:
            return  # unpaced, as before
        self.log_message("%s paced at %d bytes/s", self.path,
                         int.from_bytes(got, sys.byteorder))

    def do_GET(self) -> None:  # noqa: N802
        self._pace()  # before the response starts: nothing here can cut a 200 short
        f = self._open()
        if f is None:
            return
        with f:
            try:
                shutil.copyfileobj(f, self.wfile, _SEND_CHUNK)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; nothing to tell it


class SpoolServer:
    """A threaded HTTP server for one spool directory, as a context manager."""

    def __init__(self, spool_dir: str, bind: str = "127.0.0.1", port: int = 0, *,
                 verbose: bool = False):
        self.pacing: dict[str, int] = {}
        handler = type("SpoolHandler", (_Handler,), {"spool_dir": str(Path(spool_dir)),
                                                     "pacing": self.pacing})
        self.httpd = http.server.ThreadingHTTPServer((bind, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.verbose = verbose  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def pace(self, name: str, bytes_per_s: int | None) -> None:
        """Send archive ``name`` at most at ``bytes_per_s`` (Linux TCP pacing,
        ``SO_MAX_PACING_RATE``; None or under 1 byte/s: unpaced).

        Why: the president's link is faster than the town link its download crosses, so an
        unpaced TCP sender keeps the mayor's town-side queue full, and a chain hop that
        sends its acknowledgements back through that queue stalls (README, "The grid on
        the paper's network": 8 nodes, 256 MiB, 116.5-116.8 s paced against 133-138 s).
        """
        if bytes_per_s and bytes_per_s >= 1:
            self.pacing[name] = int(bytes_per_s)
        else:
            self.pacing.pop(name, None)

    def url_for(self, name: str, host: str | None = None) -> str:
        h, p = self.address
        return f"http://{host or h}:{p}/{name}"

    def start(self) -> "SpoolServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name="spool",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()

    def __enter__(self) -> "SpoolServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_url(url: str, timeout: float = 10.0) -> int:
    """HEAD ``url``; returns its Content-Length or raises OSError with a clear reason."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.headers.get("Content-Length", -1))
    except urllib.error.HTTPError as e:
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise OSError(f"{url}: {e.reason}") from None
