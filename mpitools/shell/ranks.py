"""``python -m mpitools.shell.ranks JOB``: MPISH, a parallel shell that is an MPI program.

Rank-side module: standard library and mpi4py only (no rich, click, networkx).

The paper's section 6: one MPI job started once on the job's nodes; rank 0 runs the job
script with the real ``bash`` and takes requests on a Unix socket from the small commands
it puts first on the script's ``PATH`` (``mpiexec``, ``mpirun``, ``srun``, ``pbsdsh``:
:mod:`mpitools.shell.client`); every rank starts its host's tasks of a request, serves
their PMI-1 requests (:mod:`mpitools.shell.pmi`, keys exchanged between ranks at each
barrier with one allgather), forwards their output to rank 0 and reports exit statuses.

Messages from rank 0 to the others (``_REQ``): a request dict, or None to stop; from the
others to rank 0: output pieces (``_OUT``) and the statuses at the end (``_DONE``). Every
send from a rank that runs tasks is non-blocking, so a rank waiting in a PMI allgather
never holds up another. Ranks wait without spinning (docs/design.md, "Waiting without
spinning"): 1 ms between tests while a command runs and for a moment after, backing off
to 20 ms when idle.
"""

from __future__ import annotations

import base64
import json
import math
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from mpitools.common.runtime import emit, rank_hosts, rank_main, user_environ
from mpitools.common.unixsock import Pause as _Pause, listen, readline as _readline, refusal
from mpitools.common.unixsock import BUSY_SLEEP, reply as _reply
from . import openmpi, tools
from .bcast import Copies, failure_report
from .pmi import PMIServer
from .tasks import LocalTasks

__all__ = ["main", "place_tasks", "mapping_blocks", "WRAPPERS"]

_REQ, _OUT, _DONE, _IN, _END = 11, 12, 13, 14, 15
WRAPPERS = ("mpiexec", "mpirun", "srun", "pbsdsh")
_KILL_GRACE = 2.5  # SIGTERM to SIGKILL for tasks; within mpiexec's own 5 s grace


def _warn_before(walltime: float) -> float:
    """Seconds before the walltime's end to warn: a tenth of it, between 1 s and 60 s (a
    3 s walltime warns "1 s left", not "0 s left")."""
    return max(1.0, min(60.0, walltime * 0.1))


def place_tasks(ntasks: int, nodes: int, ppn: int, use_nodes: int | None = None
                ) -> dict[int, list[int]]:
    """Block placement: node index -> its task numbers (as mpiexec's ``--map-by slot``).

    ``use_nodes`` (srun's ``-N``) spreads the tasks evenly over that many nodes; otherwise
    nodes fill up ``ppn`` slots at a time. Raises ValueError when the tasks do not fit.
    """
    if ntasks < 1:
        raise ValueError("at least one task is needed")
    if use_nodes is not None:
        if not 1 <= use_nodes <= nodes:
            raise ValueError(f"{use_nodes} nodes asked, the job has {nodes}")
        per = -(-ntasks // use_nodes)
        if per > ppn:
            raise ValueError(f"{ntasks} tasks on {use_nodes} nodes need {per} slots per "
                             f"node, the job has {ppn}")
    else:
        if ntasks > nodes * ppn:
            raise ValueError(f"{ntasks} tasks asked, the job has {nodes * ppn} slots "
                             f"({nodes} nodes x {ppn})")
        per = ppn
    out: dict[int, list[int]] = {}
    for t in range(ntasks):
        out.setdefault(t // per, []).append(t)
    return out


def _whole(value) -> int | None:
    """A count in a request: None or a JSON whole number (``1.5`` or ``"2"`` refused)."""
    if value is None or type(value) is int:
        return value
    raise ValueError(f"a task or node count must be a whole number, not {value!r}")


def mapping_blocks(placement: dict[int, list[int]]) -> str:
    """``PMI_process_mapping`` of a placement: runs of nodes with equal task counts."""
    blocks: list[list[int]] = []
    for node in sorted(placement):
        n = len(placement[node])
        if blocks and blocks[-1][2] == n and blocks[-1][0] + blocks[-1][1] == node:
            blocks[-1][1] += 1
        else:
            blocks.append([node, 1, n])
    return "(vector," + ",".join(f"({a},{b},{c})" for a, b, c in blocks) + ")"


@dataclass
class _Command:
    """One parallel command as every rank sees it."""

    id: int
    req: dict
    tasks: LocalTasks = field(default_factory=LocalTasks)
    pmi: PMIServer | None = None
    sub: object = None
    done_sent: bool = False
    protocol_errors: dict[int, str] = field(default_factory=dict)
    aborted: dict[int, int] = field(default_factory=dict)
    scanned: float = 0.0


class _Rank:
    """State and loop of one rank; rank 0 adds the script, the socket and the clients."""

    def __init__(self, comm, job: dict):
        from mpi4py import MPI

        self.MPI, self.comm, self.job = MPI, comm, job
        self.rank, self.size = comm.rank, comm.size
        self.hosts = rank_hosts(job)
        self.host = self.hosts[self.rank]
        self.cmd: _Command | None = None
        self.pending: list = []  # isend requests still in flight
        self.tools_comm = tools.communicator(comm)  # collective: every rank, at start
        self.stopping = False
        self.copies = Copies(job, self.host)  # --bcast copies, removed when the job ends

    # messages -----------------------------------------------------------------------
    def isend(self, obj, dest: int, tag: int) -> None:
        self.pending.append(self.comm.isend(obj, dest=dest, tag=tag))
        self.pending = [r for r in self.pending if not r.Test()]

    def poll_mpi(self) -> bool:
        st = self.MPI.Status()
        # twice: the first probe's progress takes in what arrived during the sleep
        # (mpitools/service/ranks.py measured a whole sleep saved)
        if not any(self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG,
                                    status=st) for _ in range(2)):
            return False
        msg = self.comm.recv(source=st.Get_source(), tag=st.Get_tag())
        self.on_message(st.Get_source(), st.Get_tag(), msg)
        return True

    def on_message(self, source: int, tag: int, msg) -> None:
        if tag in (tools.TOOL, tools.UP):  # a tool's request (mpitools/shell/tools.py)
            tools.on_message(self, source, tag, msg)
        elif tag == _IN:  # (command, task or None for all of this rank's, bytes or None=EOF)
            cid, task, data = msg
            if self.cmd is not None and self.cmd.id == cid:
                for t in ([task] if task is not None else list(self.cmd.tasks.tasks)):
                    self.cmd.tasks.feed(t, data)
        elif tag == _REQ:
            if msg is None:
                self.stopping = True
            elif msg.get("kill"):
                if self.cmd is not None and self.cmd.id == msg["id"]:
                    self.cmd.tasks.signal_all(msg["kill"])
            else:
                self.begin(msg)

    # a command ----------------------------------------------------------------------
    def begin(self, req: dict) -> None:
        """Start this rank's tasks of ``req`` (every rank calls this for every request)."""
        self.end_command()
        mine = req["placement"].get(str(self.rank), [])
        if len(req["placement"]) == self.size:
            sub = self.comm  # every rank runs tasks: no communicator to make (or free)
        else:  # the ranks that run tasks, for the PMI exchange; every rank takes part
            sub = self.comm.Split(1 if mine else self.MPI.UNDEFINED, self.rank)
        cmd = _Command(req["id"], req, sub=sub)
        self.cmd = cmd
        if req.get("bcast"):  # collective: the executable to every node first
            path, err, failed = self.copies.step(self.comm, req, mine)
            if failed:
                if mine:
                    self.report(cmd.id, failure_report(self.host, mine, err))
                cmd.done_sent = True
                return
            req = {**req, "argv": [path or req["argv"][0], *req["argv"][1:]]}
        if not mine:
            cmd.done_sent = True  # nothing to report
            return
        size = req["ntasks"]

        def exchange(new: dict[str, str]) -> dict[str, str]:
            merged: dict[str, str] = {}
            for part in sub.allgather(new):
                merged.update(part)
            return merged

        cmd.pmi = PMIServer(size, f"kvs_{self.job['jobid']}_{req['id']}",
                            preload={"PMI_process_mapping": req["mapping"]},
                            exchange=exchange,
                            on_abort=lambda r, code, m: cmd.aborted.__setitem__(r, code),
                            on_error=lambda r, why: cmd.protocol_errors.__setitem__(r, why))
        node = sorted(int(k) for k in req["placement"]).index(self.rank)
        base = {**req["env"], **self.job.get("host_env", {}).get(self.host, {})}
        for local, t in enumerate(mine):
            child = cmd.pmi.add_task(t)
            env = {**base, **cmd.pmi.environment(t, child),
                   "SLURM_PROCID": str(t), "SLURM_LOCALID": str(local),
                   "SLURM_NODEID": str(node), "SLURM_STEP_NUM_TASKS": str(size),
                   "PBS_TASKNUM": str(t + 1), "PBS_VNODENUM": str(t),
                   "CHIBA_TASK": str(t)}
            wants = req.get("stdin", "0")
            cmd.tasks.start(t, req["argv"], env, req.get("cwd"), (child.fileno(),),
                            stdin="pipe" if wants == "all" or wants == str(t) else "none")
            child.close()

    def pump_command(self) -> bool:
        """Serve PMI, forward output, report the end; returns whether anything happened."""
        cmd = self.cmd
        if cmd is None or cmd.done_sent:
            return False
        busy = bool(cmd.pmi and cmd.pmi.serve(0))
        now = time.monotonic()
        if now - cmd.scanned > 0.02:  # a task's life between import and exit is ~0.2 s
            cmd.scanned = now
            cmd.tasks.scan_libraries((b"libmpi.so.40",))  # Open MPI's soname
        for task, stream, data in cmd.tasks.pieces():
            busy = True
            if data is not None:
                self.output(cmd.id, task, stream, data)
        finished = cmd.tasks.finished()
        self.note_ends(cmd)
        if finished:
            openmpi = [t for t, libs in cmd.tasks.libraries().items() if libs]
            uninit = [t for t in openmpi if not cmd.pmi.tasks[t].initialised]
            errors = dict(cmd.tasks.errors())
            for t, why in cmd.protocol_errors.items():
                errors.setdefault(t, f"PMI protocol error: {why}")
            self.report(cmd.id, {"host": self.host, "statuses": cmd.tasks.statuses(),
                                 "errors": errors, "uninit": uninit,
                                 "aborted": cmd.aborted,
                                 "pmi_errors": sorted(cmd.protocol_errors)})
            cmd.done_sent = True
            cmd.pmi.close()
            busy = True
        return busy

    def output(self, cid: int, task: int, stream: int, data: bytes) -> None:
        self.isend((cid, task, stream, data), 0, _OUT)

    def note_ends(self, cmd: "_Command") -> None:
        """Tell rank 0 each task's end as it is seen (it answers "which tasks still run"
        and ends a command whose task was lost): ``_END`` (command, task, status, killed
        by a signal)."""
        for task, status, killed in cmd.tasks.take_ended():
            self.task_ended(cmd.id, task, status, killed, self.rank)

    def task_ended(self, cid: int, task: int, status: int, killed: bool, rank: int) -> None:
        self.isend((cid, task, status, killed), 0, _END)

    def report(self, cid: int, done: dict) -> None:
        self.isend((cid, done), 0, _DONE)

    def end_command(self) -> None:
        cmd, self.cmd = self.cmd, None
        if (cmd is not None and cmd.sub is not None and cmd.sub != self.MPI.COMM_NULL
                and cmd.sub is not self.comm):
            cmd.sub.Free()

    def kill_everything(self) -> None:
        """A worker's end: its --bcast copies, then its tasks (SIGTERM, SIGKILL after the
        grace)."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as in stop_all: finish the clean-up
        self.copies.remove_all()  # first: mpiexec may kill this rank before the grace ends
        if self.cmd is not None:
            self.cmd.tasks.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + _KILL_GRACE
            while self.cmd.tasks.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.cmd.tasks.kill_all()

    def finish_sends(self, timeout: float | None = None) -> None:
        """Wait for this rank's sends to complete (at most ``timeout`` seconds: a peer that
        is gone never receives)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.pending and (end is None or time.monotonic() < end):
            self.pending = [r for r in self.pending if not r.Test()]
            time.sleep(BUSY_SLEEP)

    # the loop of ranks other than 0 ---------------------------------------------------
    def run_worker(self) -> int:
        pause = _Pause()
        try:
            while not self.stopping:
                busy = self.poll_mpi()
                busy |= self.pump_command()
                running = self.cmd is not None and not self.cmd.done_sent
                pause.after(busy, running)
        finally:
            self.kill_everything()
        self.finish_sends(timeout=2.0)
        self.end_command()
        return 0


def _ranges(nums: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[list[int]] = []
    for n in sorted(nums):
        if out and out[-1][1] + 1 == n:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)


class _StepControl:
    """Rank 0's part of srun's signal rules for the running command (a "step").

    srun (src/srun/srun_job.c, ``_handle_intr``): a first Ctrl-C prints which tasks still
    run; a second within one second forwards SIGINT and terminates the step (slurmd:
    SIGTERM, then SIGKILL after KillWait). The wrapper keeps the clock
    (:mod:`mpitools.shell.client`) and asks ``{"k": "sig", "what": "status" | "abort"}``.
    A task that ends by a signal the shell did not send is lost: it is named (host, task,
    signal) and the rest of its command is ended the same way, so the script sees a
    non-zero status within a loop turn and two message hops of the task's end (each rank
    polls its tasks every 1 ms while a command runs), plus the grace for the rest.
    The command's status is then the cause's: the lost task's status, or 130 (128+SIGINT,
    what srun gives when its tasks die of the forwarded Ctrl-C) with the larger status of
    a task that had ended before.
    """

    def reset_step(self) -> None:
        self.ended_tasks: dict[int, int] = {}  # task -> status, as the ranks saw them end
        self.lost: list[str] = []
        self.ending: list[tuple[float, int]] = []  # (monotonic time, signal) still to send
        self.cause: int | None = None  # the status an ended command reports
        self.before_end: dict[int, int] = {}

    def on_task_end(self, cid: int, task: int, status: int, killed: bool, rank: int) -> None:
        if self.cmd is None or self.cmd.id != cid:
            return
        self.ended_tasks[task] = status
        if killed and self.cause is None:
            try:
                why = signal.Signals(status - 128).name
            except ValueError:
                why = f"signal {status - 128}"
            self.lost.append(f"{self.hosts[rank]}: task {task}: killed by {why}; "
                             "ending the other tasks")
            self.end_step(status, (signal.SIGTERM, signal.SIGKILL))

    def end_step(self, cause: int, sigs: tuple[int, ...]) -> None:
        """Send ``sigs`` to every task of the command, ``_KILL_GRACE`` seconds apart (each
        after the first only if a task still runs); ``cause`` becomes its status."""
        if self.cause is not None:
            return
        self.cause, self.before_end = cause, dict(self.ended_tasks)
        now = time.monotonic()
        self.ending = [(now + i * _KILL_GRACE, s) for i, s in enumerate(sigs)]

    def escalate(self) -> bool:
        """Send the signals of :meth:`end_step` that are due; whether any was sent."""
        cmd, now, sent = self.cmd, time.monotonic(), False
        while cmd is not None and self.ending and self.ending[0][0] <= now:
            _, sig = self.ending.pop(0)
            if len(self.ended_tasks) >= cmd.req["ntasks"]:
                break  # all ended: nothing to signal
            for r in (int(k) for k in cmd.req["placement"]):
                if r == self.rank:
                    cmd.tasks.signal_all(sig)
                else:
                    self.isend({"id": cmd.id, "kill": sig}, r, _REQ)
            sent = True
        return sent

    def on_interrupt(self, what) -> None:
        """The wrapper's ``sig`` frame: report the running tasks, or end the command."""
        cmd = self.cmd
        if cmd is None or self.client is None:
            return
        if what == "abort":
            self.end_step(128 + signal.SIGINT, (signal.SIGINT, signal.SIGTERM,
                                                signal.SIGKILL))
            return
        where, n = [], 0
        for r, tasks in sorted((int(k), v) for k, v in cmd.req["placement"].items()):
            live = [t for t in tasks if t not in self.ended_tasks]
            n += len(live)
            if live:
                where.append(f"{_ranges(live)} ({self.hosts[r]})")
        line = (f"step {cmd.id}: task{'s' if n > 1 else ''} {', '.join(where)}: running"
                if where else f"step {cmd.id}: every task has ended")
        _reply(self.client, {"k": "st", "line": line})

    def step_outcome(self, rc: int, errors: list[str]) -> tuple[int, list[str]]:
        """The command's status and error lines once it ended, after :meth:`end_step`."""
        if self.cause is not None:
            rc = max([self.cause, *self.before_end.values()])
        return rc, errors + self.lost


class _Leader(_StepControl, _Rank):
    """Rank 0: runs the script, listens on the socket, routes output to clients."""

    def __init__(self, comm, job: dict):
        super().__init__(comm, job)
        self.rundir = tempfile.mkdtemp(prefix="chiba-shell-")  # mode 0700
        self.sock_path = os.path.join(self.rundir, "sock")
        self.sel = selectors.DefaultSelector()
        self.listener = listen(self.sock_path)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.queue: list[tuple[socket.socket, dict]] = []
        self.client: socket.socket | None = None
        self.done: dict[int, dict] = {}
        self.expect: set[int] = set()
        self.next_id = 0
        self.served = 0
        self.script = LocalTasks()
        self.walltime_hit = False
        self.inbuf, self.stdin_closed = b"", False
        self.tool = None  # a tool's request under way (mpitools/shell/tools.py)
        self.reset_step()

    # the script -----------------------------------------------------------------------
    def start_script(self) -> None:
        bindir = os.path.join(self.rundir, "bin")
        os.mkdir(bindir, 0o755)
        for name in WRAPPERS:
            path = os.path.join(bindir, name)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\nexec '{sys.executable}' -m mpitools.shell.client "
                        f"{name} \"$@\"\n")
            os.chmod(path, 0o755)
        env = {**user_environ(), **self.job.get("env", {})}
        if self.job.get("nodefile") is not None:
            nf = os.path.join(self.rundir, "nodefile")
            with open(nf, "w") as f:
                f.write(self.job["nodefile"])
            env["PBS_NODEFILE"] = nf
        env.update(self.job.get("host_env", {}).get(self.host, {}))
        env["CHIBA_SHELL_SOCKET"] = self.sock_path
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        for k in [k for k in env if k.startswith(("OMPI_", "PMIX_", "PRTE_"))]:
            # the script is not a rank of this job: an mpiexec it starts (chiba-admin
            # stage, say) must not find this job's runtime in its environment
            if not k.startswith("OMPI_MCA_"):
                del env[k]
        # nodes share no file system: the script travels in the job spec
        path = os.path.join(self.rundir, "script")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(self.job["script_text"])
        self.script.start(-1, ["bash", path, *self.job.get("args", [])], env,
                          self.job.get("cwd"))

    # clients --------------------------------------------------------------------------
    def poll_clients(self) -> bool:
        busy = False
        for key, _ in self.sel.select(0):
            busy = True
            if key.data == "listen":
                try:
                    conn, _ = self.listener.accept()
                except BlockingIOError:
                    continue
                self.accept(conn)
            elif key.data == "client":
                self.read_client()
        return busy

    def read_client(self, data: bytes | None = None) -> None:
        """Stdin frames from the running command's client: ``{"k": "i", "d": b64}``, and
        ``{"k": "i", "eof": true}``; routed to the task(s) that read stdin."""
        conn = self.client
        if conn is None:
            return
        if data is None:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the client went away: its tasks' stdin ends
                self._unwatch_client()
                self.route_stdin(None)
                return
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, _, self.inbuf = self.inbuf.partition(b"\n")
            try:
                frame = json.loads(line)
            except ValueError:
                continue
            if frame.get("k") == "i":
                self.route_stdin(None if frame.get("eof") else
                                 base64.b64decode(frame.get("d", "")))
            elif frame.get("k") == "sig":
                self.on_interrupt(frame.get("what"))

    def route_stdin(self, data: bytes | None) -> None:
        cmd = self.cmd
        if cmd is None or self.stdin_closed:
            return
        self.stdin_closed = data is None
        wants = cmd.req.get("stdin", "0")
        if wants == "none":
            return
        owners = [int(r) for r, ts in cmd.req["placement"].items()
                  if wants == "all" or int(wants) in ts]
        for r in owners:
            task = None if wants == "all" else int(wants)
            if r == self.rank:
                for t in ([task] if task is not None else list(cmd.tasks.tasks)):
                    cmd.tasks.feed(t, data)
            else:
                self.isend((cmd.id, task, data), r, _IN)

    def _unwatch_client(self) -> None:
        try:
            self.sel.unregister(self.client)
        except (KeyError, ValueError):
            pass

    def accept(self, conn: socket.socket) -> None:
        refused = refusal(conn, os.getuid(), "job")
        if refused:
            _reply(conn, {"k": "e", "msg": refused})
            conn.close()
            return
        try:
            line, rest = _readline(conn, 1 << 20, time.monotonic() + 10)
            req = json.loads(line)
            if tools.is_tool_request(req):
                tools.accept(self, conn, req)
                return
            if not isinstance(req, dict) or not isinstance(req.get("argv"), list) \
                    or not req["argv"]:
                raise ValueError("a request needs a non-empty argv")
        except (OSError, ValueError) as e:
            _reply(conn, {"k": "e", "msg": f"bad request: {e}"})
            conn.close()
            return
        conn.settimeout(None)
        self.queue.append((conn, req, rest))

    def start_next(self) -> bool:
        if self.cmd is not None or tools.busy(self) or not self.queue:
            return False
        conn, req, rest = self.queue.pop(0)
        if tools.is_tool_request(req):
            return tools.start(self, conn, req)
        nodes, ppn = len(self.hosts), int(self.job["ppn"])
        if req.get("mpi") == "openmpi":  # Open MPI's own mpiexec, as one task on this host
            req = openmpi.handoff(req, self.job)
        try:
            if req.get("per_node"):
                placement = {n: [n] for n in range(nodes)}
            elif req.get("per_slot"):
                placement = place_tasks(nodes * ppn, nodes, ppn)
            else:
                placement = place_tasks(_whole(req.get("ntasks")) or nodes * ppn, nodes, ppn,
                                        _whole(req.get("nodes")))
        except (ValueError, TypeError) as e:
            _reply(conn, {"k": "e", "msg": str(e)})
            conn.close()
            return True
        ntasks = sum(len(v) for v in placement.values())
        msg = {"id": self.next_id, "argv": [str(a) for a in req["argv"]],
               "env": {str(k): str(v) for k, v in (req.get("env") or {}).items()},
               "cwd": req.get("cwd"), "ntasks": ntasks,
               "placement": {str(k): v for k, v in placement.items()},
               "mapping": mapping_blocks(placement),
               "stdin": str(req.get("stdin", "0"))}
        if msg["stdin"] not in ("none", "all") and not (
                msg["stdin"].isdigit() and int(msg["stdin"]) < ntasks):
            _reply(conn, {"k": "e", "msg": f"no task {msg['stdin']} to give stdin to"})
            conn.close()
            return True
        if req.get("bcast"):
            try:  # before any rank hears of it: bad input starts nothing
                msg["bcast"] = self.copies.prepare(req["bcast"], msg["id"],
                                                   [self.hosts[n] for n in placement])
            except (ValueError, KeyError, TypeError) as e:
                _reply(conn, {"k": "e", "msg": str(e), "rc": 2})
                conn.close()
                return True
        self.next_id += 1
        self.client = conn
        self.inbuf, self.stdin_closed = b"", False
        self.done, self.expect = {}, {int(k) for k in msg["placement"]}
        self.reset_step()
        for r in range(1, self.size):
            self.isend(msg, r, _REQ)
        self.begin(msg)
        # blocking stays on (output is sent with sendall); recv only after select says so
        self.sel.register(conn, selectors.EVENT_READ, "client")
        if rest:
            self.read_client(rest)
        return True

    # routing ----------------------------------------------------------------------------
    def output(self, cid: int, task: int, stream: int, data: bytes) -> None:
        if self.cmd is not None and self.cmd.id == cid and self.client is not None:
            _reply(self.client, {"k": "o", "t": task, "s": stream,
                                 "d": base64.b64encode(data).decode()})

    def report(self, cid: int, done: dict) -> None:
        self.done[self.rank] = done

    def task_ended(self, cid: int, task: int, status: int, killed: bool, rank: int) -> None:
        self.on_task_end(cid, task, status, killed, rank)

    def on_message(self, source: int, tag: int, msg) -> None:
        if tag == _OUT:
            self.output(*msg)
        elif tag == _DONE:
            cid, done = msg
            if self.cmd is not None and self.cmd.id == cid:
                self.done[source] = done
        elif tag == _END:
            self.on_task_end(*msg, source)
        else:
            super().on_message(source, tag, msg)

    def maybe_end_command(self) -> bool:
        if self.cmd is None or not self.cmd.done_sent or set(self.done) != self.expect:
            return False
        statuses, errors, uninit, aborted = {}, [], [], {}
        for r in sorted(self.done):
            d = self.done[r]
            statuses.update({int(t): s for t, s in d["statuses"].items()})
            errors += [f"{d['host']}: task {t}: {why}" for t, why in d["errors"].items()]
            errors += [f"{d['host']}: {note}" for note in d.get("notes", [])]
            uninit += d["uninit"]
            aborted.update(d["aborted"])
        rc = max(statuses.values(), default=0)
        if aborted:
            rc = max(rc, *(int(c) or 1 for c in aborted.values()))
        if any(d.get("pmi_errors") for d in self.done.values()):
            rc = max(rc, 1)  # a task cut off for breaking the PMI protocol failed
        rc, errors = self.step_outcome(rc, errors)
        if self.client is not None:
            _reply(self.client, {"k": "x", "rc": rc, "errors": errors,
                                 "uninit": sorted(uninit), "ntasks": len(statuses),
                                 "aborted": {str(k): v for k, v in aborted.items()}})
            self._unwatch_client()
            self.client.close()
            self.client = None
        self.served += 1
        self.end_command()
        return True

    # the loop of rank 0 ---------------------------------------------------------------------
    def run_leader(self) -> int:
        t0 = time.monotonic()
        emit("start", ranks=self.size, time=time.time())
        self.start_script()
        walltime = self.job.get("walltime")
        warned = False
        pause = _Pause()
        try:
            while True:
                busy = self.poll_mpi()
                busy |= self.poll_clients()
                busy |= self.start_next()
                busy |= self.pump_command()
                busy |= self.escalate()
                busy |= self.maybe_end_command()
                for _, stream, data in self.script.pieces():
                    busy = True
                    if data is not None:
                        emit("out", s=stream, d=base64.b64encode(data).decode())
                if self.script.finished():
                    break
                if walltime:
                    left = walltime - (time.monotonic() - t0)
                    if not warned and left <= _warn_before(walltime):
                        warned = True
                        emit("warn", msg=f"walltime: {math.ceil(max(left, 0))} s left")
                    if left <= 0:
                        self.walltime_hit = True
                        emit("warn", msg=f"walltime of {walltime:g} s exceeded: ending "
                                         "every task")
                        break
                pause.after(busy, self.cmd is not None or tools.busy(self))
        finally:
            self.stop_all()
        self.end_command()
        status = self.script.statuses().get(-1, 1)
        if self.walltime_hit:
            status = 124
        emit("result", rc=status, requests=self.served, walltime_exceeded=self.walltime_hit,
             seconds=time.monotonic() - t0)
        return 0

    def stop_all(self) -> None:
        """End everything within mpiexec's grace (5 s before it kills): the files first (a
        SIGKILL later must not leave them), then the script and the tasks together, then
        tell the other ranks, without waiting for ranks that are already gone."""
        # A second SIGTERM (mpiexec forwards one, its process group gets another) must not
        # cut this clean-up short; SIGKILL after the grace still ends everything.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.listener.close()
        self._remove_rundir()
        # mpiexec may SIGKILL this rank well before the grace below runs out (seen: under
        # half a second after Ctrl-C mid --bcast), so the copies go now, with the rundir;
        # a running task keeps its unlinked program
        self.copies.remove_all()
        self.script.signal_all(signal.SIGTERM)
        if self.cmd is not None:
            self.cmd.tasks.signal_all(signal.SIGTERM)
        for r in range(1, self.size):
            self.isend(None, r, _REQ)
        deadline = time.monotonic() + _KILL_GRACE
        while time.monotonic() < deadline and (
                self.script.running() or (self.cmd is not None and self.cmd.tasks.running())):
            time.sleep(0.05)
        self.script.kill_all()
        if self.cmd is not None:
            self.cmd.tasks.kill_all()
        self.finish_sends(timeout=1.0)
        for _, stream, data in self.script.pieces(1 << 30):
            if data is not None:
                emit("out", s=stream, d=base64.b64encode(data).decode())
        for conn, _, _ in self.queue:
            conn.close()
        tools.abandon(self)
        if self.client is not None:
            _reply(self.client, {"k": "e", "msg": "the shell job ended"})
            self.client.close()

    def _remove_rundir(self) -> None:
        """Remove the socket, wrappers, script and nodefile: exact names, nothing else."""
        names = ["sock", "nodefile", "script"] + [os.path.join("bin", w) for w in WRAPPERS]
        for name in names:
            try:
                os.unlink(os.path.join(self.rundir, name))
            except FileNotFoundError:
                pass
        for d in (os.path.join(self.rundir, "bin"), self.rundir):
            try:
                os.rmdir(d)
            except OSError:
                pass


def main(comm, job: dict) -> int:
    """Rank 0 leads (script, socket, routing); every other rank serves its host's tasks."""
    if comm.rank == 0:
        return _Leader(comm, job).run_leader()
    return _Rank(comm, job).run_worker()


if __name__ == "__main__":
    rank_main(main)

