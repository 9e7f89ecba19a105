"""A PMI-1 server for the tasks one MPISH rank manages: wire protocol, local KVS, barriers.

Rank-side module: standard library only.

MPICH's processes wire up through PMI-1 (docs/design.md, "MPISH and PMI"): each task gets
a pre-connected socket (``PMI_FD``, or ``PMI_PORT`` + ``PMI_ID`` over TCP), sends
newline-terminated ``cmd=... key=value`` requests in lock-step and reads one response per
request. The protocol followed is PMI 1.1 as documented in Flux RFC 13 ("Simple Process
Manager Interface v1") and spoken by MPICH's simple PMI client: ``init``, ``get_maxes``,
``get_appnum``, ``get_my_kvsname``, ``get_universe_size``, ``put``, ``get``,
``barrier_in``, ``finalize``, ``abort``, plus the ``initack`` handshake of the TCP form.

Scaling (the reason this is not one central server): every shell rank serves only its own
host's tasks and answers ``get`` from its local copy of the KVS. At a barrier, once all
local tasks have entered it, the rank hands the keys its tasks put since the last barrier
to ``exchange`` (in MPISH an MPI allgather over the shell's ranks) and merges what comes
back; only then are its tasks released. A 16-node job that made 2,880 requests to one
central server makes them here to 16 servers, and the ranks exchange keys once a barrier.

Hostile or broken clients: a line longer than :data:`MAX_LINE` bytes, a request that does
not parse, an unknown command, or a value outside the wire's character set is a protocol
error: the connection is closed and ``on_error(task, why)`` reports it (the shell ends the
command and names the task), as RFC 13 asks ("close the connection and abort").
"""

from __future__ import annotations

import selectors
import socket
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["MAX_LINE", "KVSNAME_MAX", "KEYLEN_MAX", "VALLEN_MAX", "ProtocolError",
           "parse_request", "format_response", "process_mapping", "PMIServer", "Task"]

# Limits we announce in ``maxes`` and enforce. MPICH's own simple server (hydra) uses
# kvsname 256, key 64, value 1024; a line holds cmd, kvsname, key and value.
KVSNAME_MAX = 256
KEYLEN_MAX = 64
VALLEN_MAX = 1024
MAX_LINE = 64 + KVSNAME_MAX + KEYLEN_MAX + VALLEN_MAX


class ProtocolError(ValueError):
    """A request that breaks the PMI-1 wire protocol (one line saying what and why)."""


def parse_request(line: bytes) -> dict[str, str]:
    """``b"cmd=put kvsname=k key=a value=b\\n"`` -> ``{"cmd": "put", ...}``.

    Tuples may come in any order with extra white space; duplicate keys, a missing
    ``cmd``, bytes outside printable ASCII and lines over :data:`MAX_LINE` raise
    ProtocolError. A value may be empty (RFC 13: "a zero length string value SHALL be
    considered valid").
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request of {len(line)} bytes (limit {MAX_LINE})")
    try:
        text = line.decode("ascii").rstrip("\n")
    except UnicodeDecodeError:
        raise ProtocolError("request is not ASCII") from None
    if any(not (32 <= ord(c) < 127) and c != "\t" for c in text):
        raise ProtocolError("control character in request")
    out: dict[str, str] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ProtocolError(f"malformed tuple {word[:40]!r}")
        if key in out:
            raise ProtocolError(f"duplicate key {key!r}")
        out[key] = value
    if "cmd" not in out:
        raise ProtocolError("request without cmd=")
    return out


def format_response(cmd: str, **fields: object) -> bytes:
    """One response line: ``format_response("get_result", rc=0, value="x")`` gives
    ``b"cmd=get_result rc=0 value=x\\n"``."""
    parts = [f"cmd={cmd}"] + [f"{k}={v}" for k, v in fields.items()]
    return (" ".join(parts) + "\n").encode("ascii")


def process_mapping(nodes: int, ppn: int) -> str:
    """``PMI_process_mapping`` for block placement: ``(vector,(0,NODES,PPN))`` (RFC 13)."""
    return f"(vector,(0,{nodes},{ppn}))"


@dataclass
class Task:
    """One client process: its global ``rank`` and its connection's state."""

    rank: int
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    initialised: bool = False
    finalised: bool = False
    in_barrier: bool = False


Exchange = Callable[[dict[str, str]], dict[str, str]]


class PMIServer:
    """Serve the PMI-1 requests of this host's tasks (one thread calls :meth:`serve`).

    ``size`` is the job's total number of tasks, ``kvsname`` the job's KVS name,
    ``preload`` keys every get can see from the start (``PMI_process_mapping``),
    ``exchange(new) -> all_new`` merges keys across the shell's ranks at a barrier (identity
    when the job has one host), ``on_abort(rank, code, msg)`` and ``on_error(rank, why)``
    report an abort or a protocol error; ``universe_size`` defaults to ``size``.
    """

    def __init__(self, size: int, kvsname: str, *, preload: dict[str, str] | None = None,
                 exchange: Exchange | None = None,
                 on_abort: Callable[[int, int, str], None] | None = None,
                 on_error: Callable[[int, str], None] | None = None,
                 universe_size: int | None = None, appnum: int = 0):
        self.size, self.kvsname, self.appnum = size, kvsname, appnum
        self.universe_size = universe_size or size
        self.kvs: dict[str, str] = dict(preload or {})
        self._pending: dict[str, str] = {}
        self._exchange = exchange or (lambda new: new)
        self._on_abort = on_abort or (lambda rank, code, msg: None)
        self._on_error = on_error or (lambda rank, why: None)
        self._sel = selectors.DefaultSelector()
        self.tasks: dict[int, Task] = {}
        self.requests = 0
        self.barriers = 0

    # connections --------------------------------------------------------------------
    def add_task(self, rank: int) -> socket.socket:
        """A socketpair for task ``rank``: keep ours, return the child's end (for PMI_FD).

        The child's end is inheritable; the caller passes ``str(fileno())`` as ``PMI_FD``
        and closes it after the fork.
        """
        ours, theirs = socket.socketpair()
        theirs.set_inheritable(True)
        self._watch(Task(rank, ours, initialised=False))
        return theirs

    def add_connection(self, sock: socket.socket) -> None:
        """A TCP client (``PMI_PORT``): its rank comes with ``cmd=initack pmiid=N``."""
        self._watch(Task(-1, sock))

    def _watch(self, task: Task) -> None:
        task.sock.setblocking(False)
        if task.rank >= 0:
            self.tasks[task.rank] = task
        self._sel.register(task.sock, selectors.EVENT_READ, task)

    def local_ranks(self) -> list[int]:
        return sorted(self.tasks)

    def close(self) -> None:
        for key in list(self._sel.get_map().values()):
            self._drop(key.data)
        self._sel.close()

    # the loop -----------------------------------------------------------------------
    def serve(self, timeout: float | None = None) -> int:
        """Handle what is readable within ``timeout`` seconds; returns requests handled."""
        done = 0
        for key, _ in self._sel.select(timeout):
            task: Task = key.data
            try:
                data = task.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(task)
                continue
            task.buf += data
            while True:
                nl = task.buf.find(b"\n")
                if nl < 0:
                    if len(task.buf) > MAX_LINE:
                        self._fail(task, f"request of over {MAX_LINE} bytes without newline")
                    break
                line = bytes(task.buf[:nl + 1])
                del task.buf[:nl + 1]
                try:
                    self._handle(task, parse_request(line))
                except ProtocolError as e:
                    self._fail(task, str(e))
                    break
                done += 1
        self.requests += done
        return done

    def _drop(self, task: Task) -> None:
        try:
            self._sel.unregister(task.sock)
        except (KeyError, ValueError):
            pass
        task.sock.close()

    def _fail(self, task: Task, why: str) -> None:
        self._drop(task)
        self._on_error(task.rank, why)

    def _send(self, task: Task, data: bytes) -> None:
        task.sock.setblocking(True)
        try:
            task.sock.sendall(data)
        except OSError:
            pass  # a client that died; its process exit is reported by the shell
        finally:
            task.sock.setblocking(False)

    # requests -----------------------------------------------------------------------
    def _handle(self, task: Task, req: dict[str, str]) -> None:
        cmd = req["cmd"]
        if cmd == "initack":  # PMI_PORT form: "cmd=initack pmiid=N" names the rank
            self._initack(task, req)
            return
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            raise ProtocolError(f"unknown command {cmd!r}")
        handler(task, req)

    def _initack(self, task: Task, req: dict[str, str]) -> None:
        try:
            rank = int(req.get("pmiid", ""))
        except ValueError:
            raise ProtocolError("initack without a numeric pmiid") from None
        if not 0 <= rank < self.size or rank in self.tasks:
            raise ProtocolError(f"initack for rank {rank}, not one of this host's free ranks")
        task.rank = rank
        self.tasks[rank] = task
        self._send(task, format_response("initack", rc=0)
                   + format_response("set", size=self.size)
                   + format_response("set", rank=rank)
                   + format_response("set", debug=0))

    def _cmd_init(self, task: Task, req: dict[str, str]) -> None:
        task.initialised = True
        self._send(task, format_response("response_to_init", rc=0, pmi_version=1,
                                         pmi_subversion=1))

    def _cmd_get_maxes(self, task: Task, req: dict[str, str]) -> None:
        self._send(task, format_response("maxes", rc=0, kvsname_max=KVSNAME_MAX,
                                         keylen_max=KEYLEN_MAX, vallen_max=VALLEN_MAX))

    def _cmd_get_appnum(self, task: Task, req: dict[str, str]) -> None:
        self._send(task, format_response("appnum", rc=0, appnum=self.appnum))

    def _cmd_get_my_kvsname(self, task: Task, req: dict[str, str]) -> None:
        self._send(task, format_response("my_kvsname", rc=0, kvsname=self.kvsname))

    def _cmd_get_universe_size(self, task: Task, req: dict[str, str]) -> None:
        self._send(task, format_response("universe_size", rc=0, size=self.universe_size))

    def _cmd_put(self, task: Task, req: dict[str, str]) -> None:
        key, value = req.get("key", ""), req.get("value")
        if not key or value is None or len(key) >= KEYLEN_MAX or len(value) >= VALLEN_MAX:
            raise ProtocolError(f"bad put of key {key[:40]!r}")
        if req.get("kvsname") != self.kvsname:
            self._send(task, format_response("put_result", rc=-1, msg="unknown_kvsname"))
            return
        self._pending[key] = value
        self.kvs[key] = value  # a task's own puts are visible to it at once
        self._send(task, format_response("put_result", rc=0, msg="success"))

    def _cmd_get(self, task: Task, req: dict[str, str]) -> None:
        key = req.get("key", "")
        if key in self.kvs:
            self._send(task, format_response("get_result", rc=0, msg="success",
                                             value=self.kvs[key]))
        else:  # MPICH treats rc != 0 as "not found" (tried with the mpich wheel)
            self._send(task, format_response("get_result", rc=1, msg="key_not_found"))

    def _cmd_barrier_in(self, task: Task, req: dict[str, str]) -> None:
        task.in_barrier = True
        if all(t.in_barrier or t.finalised for t in self.tasks.values()):
            self._release_barrier()

    def _release_barrier(self) -> None:
        new, self._pending = self._pending, {}
        self.kvs.update(self._exchange(new))
        self.barriers += 1
        for t in self.tasks.values():
            if t.in_barrier:
                t.in_barrier = False
                self._send(t, format_response("barrier_out", rc=0))

    def _cmd_finalize(self, task: Task, req: dict[str, str]) -> None:
        task.finalised = True
        self._send(task, format_response("finalize_ack", rc=0))

    def _cmd_abort(self, task: Task, req: dict[str, str]) -> None:
        try:
            code = int(req.get("exitcode", "1"))
        except ValueError:
            code = 1
        self._on_abort(task.rank, code, req.get("msg", ""))
        self._drop(task)

    # helpers for the shell ----------------------------------------------------------
    def environment(self, rank: int, child: socket.socket) -> dict[str, str]:
        """The PMI variables task ``rank`` needs, given its end of :meth:`add_task`."""
        return {"PMI_FD": str(child.fileno()), "PMI_RANK": str(rank),
                "PMI_SIZE": str(self.size), "PMI_DEBUG": "0",
                "PMI_SPAWNED": "0"} if rank >= 0 else {}

