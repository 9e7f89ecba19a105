"""The tools inside a shell job: `chiba-admin stage | collect | sync-mayors | run` over the
job's live ranks, with no new mpiexec (the paper's closing idea: tools compose).

Rank-side module: standard library and mpi4py only (through mpitools.service.ranks).

The CLI inside the job script finds ``$CHIBA_SHELL_SOCKET`` (mpitools/service/driver.py,
:class:`~mpitools.service.driver.ShellJob`) and sends the long-running service's requests
to the shell's rank 0: ``{"op": "hosts"}`` (the job's rank -> host list, answered at once)
and ``{"op": "run", "module", "job", "hosts", "env"}``. Rank 0 checks a run as the service
does (:func:`mpitools.service.ranks.check_request`, and every host a rank of the job), queues
it with the parallel commands (one thing at a time: a tool request starts when no command
runs, and no command starts while it runs), sends it to the member ranks, and each member
runs :func:`mpitools.service.ranks.serve`: the same request handling as the service's
workers, on a communicator of the members made with ``MPI_Comm_create_group``.

Rank 0 is a rank of the job, so it may be a member too (collect's receiver on the home
server, run on the first node): it then runs its part in its own loop, its events go
straight to the client, and the other members' events (tag :data:`UP`) are relayed once
its part is done. Its loop (the script's output, other clients) waits meanwhile; the
script itself waits for the command anyway.
"""

from __future__ import annotations

import json
import socket

from mpitools.common.unixsock import reply
from mpitools.service.ranks import (Relay, Uplink, check_request, member_ranks, run_message,
                                    serve)

__all__ = ["TOOL", "UP", "communicator", "is_tool_request", "accept", "start", "busy", "on_message",
           "abandon"]

TOOL, UP = 15, 16  # tags of comm: a run to a member; a member's events and end to rank 0
_OPS = ("hosts", "run")


def communicator(comm):
    """The communicator tools' sub-communicators are made from (every rank calls this once,
    at start): a duplicate of the shell's, because ``MPI_Comm_create_group`` talks on its
    parent, and a rank probing the shell's communicator for any tag (the shell's loop)
    would take in another member's messages of it (seen: an unpickling error)."""
    return comm.Dup()


def is_tool_request(req) -> bool:
    """Whether a request line is a tool's (``op``), not a parallel command's (``argv``)."""
    return isinstance(req, dict) and "op" in req and "argv" not in req


def accept(leader, conn: socket.socket, req: dict) -> None:
    """Rank 0: answer ``hosts`` at once; check a ``run`` and queue it with the commands,
    or refuse it with one line (``{"k": "e", "msg"}``) and close."""
    try:
        if req.get("op") not in _OPS:
            raise ValueError("a tool's request has op " + " or ".join(_OPS))
        if req["op"] == "hosts":
            reply(conn, {"k": "hosts", "hosts": list(leader.hosts)})
            conn.close()
            return
        check_request(req)
        member_ranks(req["hosts"], _rank_of(leader), "the shell job")
    except ValueError as e:
        reply(conn, {"k": "e", "msg": f"bad request: {e}"})
        conn.close()
        return
    conn.settimeout(10)  # replies: a client that stops reading is dropped
    leader.queue.append((conn, req, b""))


def _rank_of(leader) -> dict[str, int]:
    return {h: r for r, h in enumerate(leader.hosts)}


def busy(leader) -> bool:
    """Rank 0: a tool request runs (no parallel command may start)."""
    return getattr(leader, "tool", None) is not None


def start(leader, conn: socket.socket, req: dict) -> bool:
    """Rank 0: start a queued run on its members; when rank 0 is one of them, run its
    part now (its own events go straight to the client). Returns True (work was done)."""
    leader.tool_ids = getattr(leader, "tool_ids", 0) + 1
    members = member_ranks(req["hosts"], _rank_of(leader), "the shell job")
    msg = run_message(leader.tool_ids, req, members)
    relay = Relay(msg["id"], conn, members)
    leader.tool = relay
    for r in members:
        if r != leader.rank:
            leader.isend(msg, r, TOOL)
    if leader.rank in members:
        serve(leader.tools_comm, leader.MPI, msg, leader.hosts, _Local(leader))
    return True


class _Local:
    """Rank 0's own uplink when it is a member: straight to the relay (an MPI send to
    itself would wait for a receive its own loop cannot post while the tool runs)."""

    def __init__(self, leader):
        self.leader = leader

    def send(self, msg: tuple) -> None:
        on_message(self.leader, self.leader.rank, UP, msg)

    def flush(self, timeout: float | None = None) -> None:
        pass


def on_message(rank, source: int, tag: int, msg) -> None:
    """A message of tag :data:`TOOL` (a member: run its part now, then go on with its
    loop) or :data:`UP` (rank 0: relay it; the client gets the end once all are done)."""
    if tag == TOOL:
        up = Uplink(rank.comm, 0, UP)
        serve(rank.tools_comm, rank.MPI, msg, rank.hosts, up)
        rank.pending.extend(up.sends)  # completed by the rank's loop, as its other sends
        return
    relay = getattr(rank, "tool", None)
    if relay is not None and relay.take(msg):
        relay.finish()
        rank.tool = None
        rank.served += 1


def abandon(leader) -> None:
    """Rank 0 ends: tell the client of a run under way, in one line."""
    relay = getattr(leader, "tool", None)
    if relay is not None and relay.conn is not None:
        reply(relay.conn, {"k": "e", "msg": "the shell job ended during the request"})
        relay.conn.close()
    leader.tool = None


def hosts_reply(line: bytes) -> list[str]:
    """The host list of a ``{"op": "hosts"}`` reply line; ValueError for anything else."""
    frame = json.loads(line)
    if frame.get("k") == "e":
        raise ValueError(frame.get("msg"))
    hosts = frame.get("hosts")
    if frame.get("k") != "hosts" or not isinstance(hosts, list):
        raise ValueError("not a shell job's answer")
    return [str(h) for h in hosts]
