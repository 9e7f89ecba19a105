"""What a rank serving a Unix socket needs: a private socket directory, the peer's uid,
JSON-line frames, and a pause between loop turns that backs off when idle.

Rank-side module: standard library only. Shared by the shell (mpitools/shell/ranks.py)
and the service (mpitools/service/ranks.py).
"""

from __future__ import annotations

import json
import socket
import struct
import time

__all__ = ["Pause", "IDLE_CAP", "BUSY_SLEEP", "LINGER", "listen", "peer_uid", "refusal",
           "reply", "readline"]

IDLE_CAP = 0.02    # seconds between tests when nothing runs (docs/design.md)
BUSY_SLEEP = 0.001
# Requests come back to back: after activity a rank keeps testing every millisecond
# this long before it backs off, so the next request is seen at once.
LINGER = 0.5


class Pause:
    """Sleep between loop turns without spinning: ``BUSY_SLEEP`` while work runs or ran in
    the last ``linger`` seconds, then doubling up to ``cap`` seconds; with ``deep`` =
    ``(seconds, cap)``, up to that second cap once idle that long."""

    def __init__(self, cap: float = IDLE_CAP, linger: float = LINGER,
                 deep: tuple[float, float] | None = None, wait=time.sleep):
        # ``wait(seconds)``: how to pause; a select() on a socket ends it early
        self.cap, self.linger, self.deep, self.wait = cap, linger, deep, wait
        self.sleep, self.last = BUSY_SLEEP, time.monotonic()

    def after(self, busy: bool, running: bool) -> None:
        """Called at the end of each turn; ``busy``: it did something; ``running``: a
        command is under way."""
        now = time.monotonic()
        if busy or running:
            self.last = now
        cap = self.cap
        if self.deep is not None and now - self.last >= self.deep[0]:
            cap = self.deep[1]
        self.sleep = (BUSY_SLEEP if now - self.last < self.linger
                      else min(cap, self.sleep * 2))
        if not busy:
            self.wait(self.sleep)


def listen(path: str, backlog: int = 64) -> socket.socket:
    """A non-blocking listening Unix socket at ``path`` (its directory should be 0700)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def refusal(conn: socket.socket, owner: int, what: str) -> str | None:
    """None when the peer is ``owner`` or root; else the one line to refuse it with."""
    uid = peer_uid(conn)
    if uid in (owner, 0):
        return None
    return f"refused: uid {uid} is not the {what}'s owner"


def reply(conn: socket.socket, frame: dict) -> None:
    """One JSON line to ``conn``; a peer that went away is ignored (it was interrupted)."""
    try:
        conn.sendall(json.dumps(frame, separators=(",", ":"), default=str).encode() + b"\n")
    except OSError:
        pass


def readline(conn: socket.socket, limit: int, deadline: float | None = None
             ) -> tuple[bytes, bytes]:
    """The first line from ``conn`` and whatever came after it; ValueError over ``limit``
    bytes; TimeoutError once ``time.monotonic()`` passes ``deadline`` (a client trickling
    a byte at a time must not hold the reader longer than that in all)."""
    buf = bytearray()
    while b"\n" not in buf:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole request line in time")
            conn.settimeout(left)
        data = conn.recv(65536)
        if not data:
            break
        buf += data
        if len(buf) > limit:
            raise ValueError(f"request over {limit} bytes")
    line, _, rest = bytes(buf).partition(b"\n")
    return line, rest
