"""``python -m mpitools.service.ranks JOB``: the long-running MPI service (issue 19).

Rank-side module: standard library and mpi4py only (no rich, click, networkx).

World rank 0 is the coordinator, on the president beside the president's own worker: it
serves a Unix socket in the service directory (only the starting uid or root may submit)
and never joins a tool's communicator, so it can relay the events of every member while a
request runs. Ranks 1.. are the workers, one per host. A request ``{module, job, hosts,
env}`` goes to the workers of just those hosts (in rank order); they make a communicator of
themselves with ``MPI_Comm_create_group`` (collective over the members only: the other
workers keep waiting), run ``<module>.main(subcomm, job)`` with :func:`emit` sending each
event to the coordinator, and report their exit code. The coordinator forwards the events
and the end to the submitting client.

Waiting without spinning (docs/design.md): Iprobe + a sleep that backs off to
:data:`IDLE_CAP` when idle, 1 ms while a request runs (:class:`mpitools.common.unixsock.Pause`).

A rank that dies ends the whole job: Open MPI's runtime aborts it, and the launching side
names the host from the runtime's message in the service log (mpitools/service/driver.py).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field

from mpitools.common.runtime import (PeerLost, Terminated, emit, encode_job, rank_hosts,
                                     rank_main, set_emitter, wait)
from mpitools.common.unixsock import Pause, listen, refusal, reply

__all__ = ["main", "IDLE_CAP", "READY", "SOCKET", "TOOLS", "cpu_seconds", "module_main",
           "check_request", "serve", "Uplink", "Relay", "member_ranks", "run_message"]

_REQ, _UP = 21, 22
_OPS = ("run", "status", "stop", "add")
IDLE_CAP = 0.05      # seconds between tests when idle: "tens of ms" (issue 19)
# After this long without a request, DEEP_CAP between tests. One wake of an idle Python
# rank (sleep + Iprobe) cost about 60 us of CPU on the 2-core development VM; measured
# for 66 ranks (65 hosts) idle over 60 s: 2.27% of one core at 0.25 s, 1.48% at 0.5 s
# (about 0.4% of either is Open MPI's own threads). The price: the first request after a
# long idle waits up to DEEP_CAP to be seen (`service start --deep-cap` trades it back).
DEEP_AFTER, DEEP_CAP = 30.0, 0.5
SOCKET, READY = "sock", "ready"
_REQUEST_LIMIT = 64 << 20
_REQUEST_WAIT = 10.0  # seconds a client has to send its request line
# imported by every worker once it is up, so that no request pays for them (0.3-0.4 s of
# a first collect on the development VM was its ranks importing zstandard and inventory)
PRELOAD = ("mpitools.stage.ranks", "mpitools.sync.ranks", "mpitools.collect.ranks",
           "mpitools.service.runcmd")
# the only rank programs a request may name (a client never chooses what is imported);
# "mpitools.collect" is the package of its ranks module (module_main)
TOOLS = (*PRELOAD, "mpitools.collect")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _wait_each(reqs: list) -> None:
    """Complete every request, oldest first, without spinning (runtime's ``wait``)."""
    for r in reqs:
        wait(r)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def module_main(module: str):
    """The ``main(comm, job)`` of a tool's rank module (``mpitools.collect`` names its
    package: its ranks module is meant). ValueError for a module not in :data:`TOOLS`."""
    if module not in TOOLS:
        raise ValueError(f"{module!r} is not a tool of the service")
    mod = importlib.import_module(module)
    if not hasattr(mod, "main"):
        mod = importlib.import_module(module + ".ranks")
    return mod.main


def _pause(job: dict, wait=time.sleep) -> Pause:
    return Pause(cap=float(job.get("idle_cap", IDLE_CAP)),
                 deep=(float(job.get("deep_after", DEEP_AFTER)),
                       float(job.get("deep_cap", DEEP_CAP))), wait=wait)


# --- workers ---------------------------------------------------------------------------
def _worker(comm, job: dict) -> int:
    from mpi4py import MPI

    for name in PRELOAD:
        importlib.import_module(name)
    pause = _pause(job)
    while True:
        # a probe runs MPI's progress engine before it matches: a message that arrived
        # during the sleep is taken in by the first and seen by the second (with one
        # probe, measured: every request waited one whole sleep more)
        if not (comm.Iprobe(source=0, tag=_REQ) or comm.Iprobe(source=0, tag=_REQ)):
            pause.after(False, False)
            continue
        msg = comm.recv(source=0, tag=_REQ)
        kind = msg[0]
        if kind == "stop":
            return 0
        if kind == "stat":  # not activity: measuring idle CPU must not end the idling
            _wait_each([comm.isend(("stat", comm.rank, cpu_seconds()), 0, _UP)])
        elif kind == "run":
            up = Uplink(comm, 0, _UP)
            serve(comm, MPI, msg[1], rank_hosts(job), up)
            up.flush()
            pause.after(True, True)
        elif kind == "add":
            job["rank_hosts"] = msg[1]["hosts"]
            comm = grow(comm, MPI, msg[1])
            pause.after(True, True)


def grow(comm, MPI, add: dict):
    """Every rank of the service (collectively): spawn the new host's worker and merge it
    in; returns the communicator the service goes on with (its last rank is the new one).
    ``add``: ``{"hosts": the new rank -> host list, "host", "argv", "info"}``."""
    info = MPI.Info.Create()
    for k, v in (add.get("info") or {}).items():
        info.Set(k, v)
    inter = comm.Spawn(add["argv"][0], add["argv"][1:], maxprocs=1, info=info, root=0)
    info.Free()
    merged = inter.Merge(high=False)
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    return merged


class Uplink:
    """Where a member's messages for the relaying rank go: ``("ev", id, event)`` and
    ``("done", id, rank, rc)`` sent to rank ``dest`` of ``comm`` with ``tag``, without
    blocking (the relay may itself be busy until the request ends)."""

    def __init__(self, comm, dest: int, tag: int):
        self.comm, self.dest, self.tag, self.sends = comm, dest, tag, []

    def send(self, msg: tuple) -> None:
        self.sends.append(self.comm.isend(msg, self.dest, self.tag))

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the sends to complete (at most ``timeout`` seconds)."""
        if timeout is None:
            _wait_each(self.sends)
            self.sends = []
            return
        deadline = time.monotonic() + timeout
        while self.sends and time.monotonic() < deadline:
            self.sends = [r for r in self.sends if not r.Test()]
            time.sleep(0.001)


def serve(comm, MPI, req: dict, hosts: list[str], up) -> None:
    """Run one request as a member: make the members' communicator (collective over the
    members of ``comm`` only), run the tool's main with events sent up, send the exit code
    up. ``req``: :func:`run_message`'s; ``hosts``: rank of ``comm`` -> host; ``up``: an
    :class:`Uplink`, or any object with ``send(msg)`` and ``flush(timeout)``. Shared by
    the service's workers and the shell's ranks (mpitools/shell/tools.py)."""
    members = req["members"]

    def sink(event: dict) -> None:
        up.send(("ev", req["id"], event))

    group = comm.Get_group().Incl(members)
    sub = comm.Create_group(group, tag=1 + req["id"] % 30000)
    group.Free()
    sub.Set_errhandler(MPI.ERRORS_RETURN)
    job = {**req["job"], "rank_hosts": [hosts[m] for m in members]}
    saved = {k: os.environ.get(k) for k in req.get("env", {})}
    os.environ.update(req.get("env", {}))
    previous = set_emitter(sink)
    rc = 70
    try:
        rc = module_main(req["module"])(sub, job) or 0
    except PeerLost as e:
        # as under mpiexec: say which peer vanished, then end the job (its peers would
        # wait forever); the launching side names the host from the runtime's message
        sink({"event": "peer-lost", "rank": sub.rank, "peer": e.peer, "why": e.why})
        _abort(comm, up, 75, f"rank {comm.rank}: {e}; aborting the job")
    except Terminated:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        _abort(comm, up, 70, f"rank {comm.rank}: unhandled error, aborting the job")
    finally:
        set_emitter(previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    sub.Free()
    up.send(("done", req["id"], comm.rank, int(rc)))


def _abort(comm, up, code: int, why: str) -> None:
    up.flush(2.0)
    sys.stderr.write(why + "\n")
    sys.stderr.flush()
    comm.Abort(code)


def member_ranks(hosts, rank_of: dict[str, int], what: str = "the service") -> list[int]:
    """The ranks of a request's ``hosts`` (in that order); ValueError (one line) for a host
    without a rank in ``rank_of`` or a host named twice."""
    hosts = [str(h) for h in hosts or []]
    missing = [h for h in hosts if h not in rank_of]
    if missing:
        raise ValueError(f"{what} has no rank on " + ", ".join(missing))
    if not hosts or len(set(hosts)) != len(hosts):
        raise ValueError("a request names each of its hosts once")
    return [rank_of[h] for h in hosts]


def run_message(rid: int, req: dict, members: list[int]) -> dict:
    """What each member gets for a checked run request (:func:`check_request`)."""
    return {"id": rid, "module": str(req["module"]), "job": req["job"], "members": members,
            "env": {str(k): str(v) for k, v in (req.get("env") or {}).items()}}


@dataclass
class Relay:
    """A run under way, as the rank that relays it sees it: events go to the client as they
    come (``{"k": "ev"}`` frames), each member's exit code is kept; once every member is
    done the client gets ``{"k": "end", "rc": largest, "seconds"}``."""
    id: int
    conn: socket.socket | None
    members: list[int]
    done: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def take(self, msg: tuple) -> bool:
        """One member's message; True once every member is done."""
        if msg[0] == "ev" and msg[1] == self.id and self.conn is not None:
            reply(self.conn, {"k": "ev", "ev": msg[2]})
        elif msg[0] == "done" and msg[1] == self.id:
            self.done[msg[2]] = int(msg[3])
        return set(self.done) == set(self.members)

    def finish(self) -> None:
        """The end frame to the client, which is then closed."""
        if self.conn is not None:
            reply(self.conn, {"k": "end", "rc": max(self.done.values(), default=0),
                              "seconds": time.monotonic() - self.started})
            self.conn.close()
            self.conn = None


# --- the coordinator -------------------------------------------------------------------
def check_request(req) -> None:
    """ValueError (one line) unless ``req`` is a request the service takes: an object with
    ``op`` in run|status|stop|add; a run names a tool of :data:`TOOLS`, its job (an
    object), its hosts (names) and its environment (names -> strings); an add names a
    host and PRRTE's ``add-host`` at most. Nothing a client sends may end the service."""
    if not isinstance(req, dict) or req.get("op") not in _OPS:
        raise ValueError("a request is a JSON object with op " + ", ".join(_OPS))
    if req["op"] == "run":
        env = req.get("env") or {}
        if req.get("module") not in TOOLS:
            raise ValueError(f"module {req.get('module')!r} is not a tool of the service "
                             f"({', '.join(TOOLS)})")
        if not isinstance(req.get("job"), dict):
            raise ValueError("a run's job is a JSON object")
        hosts = req.get("hosts")
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise ValueError("a run's hosts are a list of host names")
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str)
                and "\0" not in v for k, v in env.items()):
            raise ValueError("a run's env maps variable names to strings")
    elif req["op"] == "add":
        info = req.get("info") or {}
        if not isinstance(req.get("host"), str) or not isinstance(info, dict) or not all(
                k == "add-host" and isinstance(v, str) for k, v in info.items()):
            raise ValueError("an add names a host (and PRRTE's add-host at most)")

@dataclass
class _Pending:
    """A client's request line as it arrives, and when it must have arrived by."""
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


@dataclass
class _Request:
    """A status request under way: each worker's CPU seconds as they come."""
    id: int
    conn: socket.socket | None
    kind: str                       # "stat"
    members: list[int]
    done: dict[int, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class _Coordinator:
    def __init__(self, comm, job: dict):
        from mpi4py import MPI

        self.MPI, self.comm, self.job = MPI, comm, job
        self.hosts = rank_hosts(job)
        self.rank_of = {h: r for r, h in enumerate(self.hosts) if r > 0}
        self.dir = job["dir"]
        self.owner = int(job.get("owner", os.getuid()))
        self.listener = listen(os.path.join(self.dir, SOCKET))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.queue: list[tuple[socket.socket, dict]] = []
        self.cur: _Request | Relay | None = None
        self.served, self.next_id, self.t0 = 0, 1, time.time()
        self.stopping = False
        self.sends: list = []

    def loop(self) -> int:
        ready = os.path.join(self.dir, READY)
        with open(ready + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "started": self.t0, "ranks": self.comm.size}, f)
        os.replace(ready + ".tmp", ready)
        emit("start", ranks=self.comm.size, time=self.t0)
        # idle, the coordinator waits in select() on its socket: a client is seen at once
        pause = _pause(self.job, wait=lambda s: self.sel.select(s))
        try:
            while not (self.stopping and self.cur is None):
                busy = self.poll_clients()
                busy |= self.poll_ranks()
                busy |= self.start_next()
                self.sends = [r for r in self.sends if not r.Test()]
                pause.after(busy, self.cur is not None)
        finally:
            self.listener.close()
            for name in (SOCKET, READY):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass
        _wait_each(self.sends)
        return 0

    def poll_clients(self) -> bool:
        busy = False
        for key, _ in self.sel.select(0):
            busy = True
            if key.fileobj is not self.listener:
                self.take(key.fileobj, key.data)
                continue
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                continue
            self.accept(conn)
        now = time.monotonic()
        for key in list(self.sel.get_map().values()):
            if key.data is not None and now > key.data.deadline:
                self.refuse(key.fileobj, f"no request line within {_REQUEST_WAIT:g} s")
        return busy

    def accept(self, conn: socket.socket) -> None:
        """Take a connection; its request line is read as it comes (:meth:`take`): a
        client that sends slowly or nothing holds up no one else."""
        refused = refusal(conn, self.owner, "service")
        if refused:
            reply(conn, {"k": "e", "msg": refused})
            conn.close()
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ,
                          _Pending(time.monotonic() + _REQUEST_WAIT))

    def refuse(self, conn: socket.socket, why: str) -> None:
        self.sel.unregister(conn)
        conn.settimeout(1)
        reply(conn, {"k": "e", "msg": f"bad request: {why}"})
        conn.close()

    def take(self, conn: socket.socket, pending: "_Pending") -> None:
        """More of a client's request line; queued once whole, refused if bad."""
        try:
            data = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        pending.buf += data
        whole = b"\n" in pending.buf or not data
        if not whole and len(pending.buf) <= _REQUEST_LIMIT:
            return
        line = bytes(pending.buf).partition(b"\n")[0]
        try:
            if len(line) > _REQUEST_LIMIT:
                raise ValueError(f"request over {_REQUEST_LIMIT} bytes")
            try:
                req = json.loads(line)
            except RecursionError:  # nested past the parser's depth: not a request
                raise ValueError("JSON nested too deep") from None
            check_request(req)
        except ValueError as e:
            self.refuse(conn, str(e))
            return
        self.sel.unregister(conn)
        conn.settimeout(10)  # replies: a client that stops reading is dropped
        self.queue.append((conn, req))

    def start_next(self) -> bool:
        if self.cur is not None or not self.queue or self.stopping:
            return False
        conn, req = self.queue.pop(0)
        workers = list(range(1, self.comm.size))
        if req["op"] == "stop":
            self.stopping = True
            for r in workers:
                self.sends.append(self.comm.isend(("stop",), r, _REQ))
            reply(conn, {"k": "end", "rc": 0, "served": self.served})
            conn.close()
            return True
        if req["op"] == "add":
            return self.add(conn, req)
        if req["op"] == "status":
            self.cur = _Request(0, conn, "stat", workers)
            for r in workers:
                self.sends.append(self.comm.isend(("stat",), r, _REQ))
            return True
        return self.start_run(conn, req)

    def add(self, conn: socket.socket, req: dict) -> bool:
        """Spawn a worker on ``req["host"]`` and merge it into the service (every rank
        takes part; MPI_Comm_spawn, then MPI_Intercomm_merge)."""
        host = str(req.get("host") or "")
        if not host or host in self.rank_of:
            reply(conn, {"k": "e", "msg": f"the service already has a rank on {host}"
                         if host else "no host to add"})
            conn.close()
            return True
        hosts = [*self.hosts, host]
        job = {**self.job, "rank_hosts": hosts}
        msg = {"hosts": hosts, "host": host, "info": req.get("info") or {},
               "argv": [sys.executable, "-m", "mpitools.service.ranks",
                        encode_job(job)]}
        for r in range(1, self.comm.size):
            self.sends.append(self.comm.isend(("add", msg), r, _REQ))
        _wait_each(self.sends)
        t0 = time.monotonic()
        self.comm = grow(self.comm, self.MPI, msg)
        self.hosts, self.job = hosts, job
        self.rank_of[host] = self.comm.size - 1
        reply(conn, {"k": "end", "rc": 0, "hosts": hosts, "seconds": time.monotonic() - t0})
        conn.close()
        return True

    def start_run(self, conn: socket.socket, req: dict) -> bool:
        try:
            members = member_ranks(req.get("hosts"), self.rank_of)
        except ValueError as e:
            reply(conn, {"k": "e", "msg": str(e)})
            conn.close()
            return True
        msg = run_message(self.next_id, req, members)
        self.cur = Relay(self.next_id, conn, members)
        self.next_id += 1
        for r in members:
            self.sends.append(self.comm.isend(("run", msg), r, _REQ))
        return True

    def poll_ranks(self) -> bool:
        busy = False
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_UP):
            busy = True
            self.on_message(self.comm.recv(source=self.MPI.ANY_SOURCE, tag=_UP))
        return busy

    def on_message(self, msg: tuple) -> None:
        cur = self.cur
        if cur is None:
            return
        if isinstance(cur, Relay):
            if cur.take(msg):
                self.served += 1
                cur.finish()
                self.cur = None
        elif msg[0] == "stat":
            cur.done[msg[1]] = msg[2]
            if set(cur.done) == set(cur.members):
                self.finish_status(cur)

    def finish_status(self, cur: _Request) -> None:
        cpu = {self.hosts[r]: round(float(s), 3) for r, s in cur.done.items()}
        frame = {"k": "status", "hosts": self.hosts[1:], "uptime": time.time() - self.t0,
                 "served": self.served, "pid": os.getpid(), "cpu": cpu,
                 "coordinator_cpu": round(cpu_seconds(), 3)}
        if cur.conn is not None:
            reply(cur.conn, frame)
            cur.conn.close()
        self.cur = None


def main(comm, job: dict) -> int:
    """World rank 0 coordinates; every other rank is its host's worker. A worker spawned by
    ``service add`` (:func:`grow`) first merges with the service that spawned it."""
    from mpi4py import MPI

    parent = MPI.Comm.Get_parent()
    if parent != MPI.COMM_NULL:
        comm = parent.Merge(high=True)
        comm.Set_errhandler(MPI.ERRORS_RETURN)
    if comm.rank == 0:
        return _Coordinator(comm, job).loop()
    return _worker(comm, job)


if __name__ == "__main__":
    rank_main(main)
