"""``mpiexec``, ``mpirun``, ``srun`` and ``pbsdsh`` inside a ``chiba-admin shell`` job.

Standard library only: one of these runs for every parallel command of a job script.

Each turns its arguments into a request (argv, environment, working directory, how many
tasks where) for the shell's rank 0 on ``$CHIBA_SHELL_SOCKET``, then writes the tasks'
output as it arrives (each line prefixed ``TASK: `` with ``-l``/``--label``, srun's and
Hydra's ``-l``) and exits with the command's status: the largest task status, 128+N
for a task killed by signal N (srun's and flux's rule). The options accepted are the
common ones of Open MPI's/MPICH's ``mpiexec`` (``-n``/``-np``, ``-x VAR[=V]``, ``-l``),
Slurm's ``srun`` (``-n``, ``-N``, ``--ntasks-per-node``, ``-l``, ``--export``) and
Torque's ``pbsdsh`` (one task per slot, ``-u`` one per node); anything else is refused
with one line naming the option, exit 2. ``srun --bcast[=DEST]`` and ``mpiexec -s``/
``--preload-binary`` copy the program to every node first (:mod:`mpitools.shell.bcast`);
``--mpi=openmpi`` hands the command to Open MPI's mpiexec (:mod:`mpitools.shell.openmpi`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sys
import threading
import time

from . import openmpi
from .bcast import source_path

__all__ = ["parse", "main", "UsageError"]

_HOLD = 1 << 16  # bytes of one task's unfinished line held back


class UsageError(ValueError):
    """A command line the wrapper cannot carry out (exit 2)."""


def _value(args: list[str], i: int, opt: str) -> tuple[str, int]:
    if "=" in args[i] and args[i].startswith("--"):
        return args[i].split("=", 1)[1], i + 1
    if i + 1 >= len(args):
        raise UsageError(f"{opt} needs a value")
    return args[i + 1], i + 2


def _count(text: str, opt: str) -> int:
    """A task or node count as the user wrote it (``-n 4``, ``--ntasks=4``)."""
    name = opt.split("=", 1)[0]
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{name} {text!r}: not a whole number")
    if int(text) < 1:
        raise UsageError(f"{name} {text}: must be at least 1")
    return int(text)


def parse(tool: str, args: list[str], environ: dict[str, str]) -> dict:
    """The request for ``tool args``: ``{"argv", "env", "cwd", "ntasks", "nodes",
    "per_node", "per_slot", "label"}``. Raises UsageError (exit 2) on a bad option."""
    req: dict = {"env": dict(environ), "cwd": os.getcwd(), "ntasks": None, "nodes": None,
                 "label": False, "stdin": "none" if tool == "pbsdsh" else "0"}
    i = 0
    if tool == "pbsdsh":
        req["per_slot"] = True
        while i < len(args) and args[i].startswith("-"):
            if args[i] == "-u":
                req["per_node"], req["per_slot"] = True, False
                i += 1
            elif args[i] == "--":
                i += 1
                break
            else:
                raise UsageError(f"unsupported pbsdsh option {args[i]!r} (supported: -u)")
        req["argv"] = args[i:]
    else:
        while i < len(args) and args[i].startswith("-"):
            a = args[i]
            if a[:2] in ("-n", "-N") and a[2:].isdigit():  # srun's and mpiexec's -N2, -n4
                args = [*args[:i], a[:2], a[2:], *args[i + 1:]]
                a = args[i]
            if a == "--":
                i += 1
                break
            if a in ("-n", "-np", "--np", "-c") or a.startswith(("--ntasks", "--np=")) \
                    and not a.startswith("--ntasks-per-node"):
                v, i = _value(args, i, a)
                req["ntasks"] = _count(v, a)
            elif a in ("-N",) or a.startswith("--nodes"):
                v, i = _value(args, i, a)
                req["nodes"] = _count(v.split("-")[0], a)
            elif a.startswith("--ntasks-per-node") or a in ("-ppn", "--npernode"):
                v, i = _value(args, i, a)
                req["per_node_tasks"] = _count(v, a)
            elif a in ("-i", "--stdin") or a.startswith(("--input", "--stdin=")):
                v, i = _value(args, i, a)  # srun --input=all|none|N, Open MPI --stdin
                v = {"rank": "0"}.get(v, v)
                if v not in ("all", "none") and not v.isdigit():
                    raise UsageError(f"{a.split('=', 1)[0]} {v!r}: give all, none or a "
                                     "task number")
                req["stdin"] = v
            elif a in ("-l", "--label", "-prepend-rank", "--prepend-rank"):
                req["label"] = True
                i += 1
            elif a == "-x":  # Open MPI: -x VAR (exported as is) or -x VAR=VALUE
                v, i = _value(args, i, a)
                k, eq, val = v.partition("=")
                if eq:
                    req["env"][k] = val
            elif a == "-genv":  # MPICH: -genv VAR VALUE
                if i + 2 >= len(args) or "=" in args[i + 1] or not args[i + 1]:
                    raise UsageError("-genv needs a name (without '=') and a value")
                req["env"][args[i + 1]] = args[i + 2]
                i += 3
            elif a.startswith("--export"):
                v, i = _value(args, i, a)
                req["env"] = _export(v, environ)
            elif (nxt := _launch_option(tool, args, i, req)) is not None:
                i = nxt
            else:
                raise UsageError(f"unsupported {tool} option {a!r}")
        req["argv"] = args[i:]
        _task_count(tool, req, environ)
    if not req["argv"]:
        raise UsageError(f"{tool}: no program given")
    if req.get("bcast"):
        if req.get("mpi") == "openmpi":
            raise UsageError("--bcast with --mpi=openmpi: not supported (Open MPI's mpiexec "
                             "starts the program itself)")
        try:
            req["bcast"]["source"] = source_path(req["argv"][0], req["env"], req["cwd"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    return req


def _task_count(tool: str, req: dict, environ: dict[str, str]) -> None:
    """``ntasks`` from ``--ntasks-per-node`` (times ``-N`` or the job's nodes) and, for
    srun, from ``-N`` alone: one task per node, as Slurm."""
    if req.get("per_node_tasks"):
        nodes = req["nodes"] or int(environ.get("SLURM_NNODES") or
                                    environ.get("PBS_NUM_NODES") or 1)
        req["nodes"] = nodes
        req["ntasks"] = req["ntasks"] or nodes * req["per_node_tasks"]
    if tool == "srun" and req["nodes"] and not req["ntasks"]:
        req["ntasks"] = req["nodes"]


def _launch_option(tool: str, args: list[str], i: int, req: dict) -> int | None:
    """``srun --bcast[=DEST]`` (``=`` only, as srun), ``mpiexec -s``/``--preload-binary``
    and ``--mpi[=]PLUGIN`` into ``req``; the index of the next argument, None if
    ``args[i]`` is none of them."""
    a = args[i]
    if (tool == "srun" and (a == "--bcast" or a.startswith("--bcast="))) or (
            tool != "srun" and a in ("-s", "--preload-binary")):
        req["bcast"] = {"dest": a.partition("=")[2] or None}
        return i + 1
    if a == "--mpi" or a.startswith("--mpi="):
        v, i = _value(args, i, a)
        try:
            req["mpi"] = openmpi.plugin(v)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return i
    return None


def _export(spec: str, environ: dict[str, str]) -> dict[str, str]:
    """srun's ``--export``: ``ALL``, ``NONE`` or ``[ALL,]A,B=1`` (names kept or set)."""
    items = [s for s in spec.split(",") if s]
    env = dict(environ) if "ALL" in items else {k: v for k, v in environ.items()
                                                if k == "PATH" or k.startswith("CHIBA_")}
    for item in items:
        if item in ("ALL", "NONE"):
            continue
        k, eq, v = item.partition("=")
        if eq:
            env[k] = v
        elif k in environ:
            env[k] = environ[k]
    return env


class _Labeller:
    """Write whole lines per (task, stream), prefixed ``TASK: `` when labelling.

    srun and mpiexec users expect the lines of different tasks not to be cut into each
    other; bytes are kept as they are (binary output included), a partial line is held
    until its newline, the end of the task, or :data:`_HOLD` bytes.
    """

    def __init__(self, label: bool):
        self.label, self.partial = label, {}

    def _emit(self, task: int, stream: int, data: bytes) -> None:
        out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
        out.write(b"".join(b"%d: %s\n" % (task, ln) for ln in data.split(b"\n")[:-1])
                  if self.label else data)
        out.flush()

    def write(self, task: int, stream: int, data: bytes) -> None:
        buf = self.partial.get((task, stream), b"") + data
        cut = buf.rfind(b"\n") + 1
        if not cut and len(buf) > _HOLD:
            cut = len(buf)  # a long line without newline: pass it on (labelled: cut it)
        self.partial[(task, stream)] = buf[cut:]
        if cut:
            self._emit(task, stream, buf[:cut] + (b"\n" if self.label and
                                                   not buf[:cut].endswith(b"\n") else b""))

    def close(self) -> None:
        for (task, stream), rest in self.partial.items():
            if rest:
                self._emit(task, stream, rest + b"\n" if self.label else rest)
        self.partial.clear()


_SEND = threading.Lock()  # one frame at a time: stdin thread and Ctrl-C handler share it


def _send(conn: socket.socket, frame: dict) -> None:
    with _SEND:
        conn.sendall(json.dumps(frame).encode() + b"\n")


class Interrupts:
    """srun's two-step Ctrl-C (src/srun/srun_job.c, ``_handle_intr``), as a SIGINT handler.

    A first SIGINT, or one more than ``window`` seconds after the last report, prints
    "interrupt (one more within 1 sec to abort)" and asks the shell which tasks still run
    (the answer, one line, follows); another within ``window`` seconds of that report
    asks the shell to end every task of the command: SIGINT, then SIGTERM, then SIGKILL
    (:class:`mpitools.shell.ranks._StepControl`). ``send(what)`` sends the request;
    ``clock`` is seconds (monotonic).
    """

    def __init__(self, tool: str, send, clock=time.monotonic, window: float = 1.0):
        self.tool, self.send, self.clock, self.window = tool, send, clock, window
        self.last: float | None = None

    def __call__(self, signum=None, frame=None) -> str:
        now = self.clock()
        if self.last is not None and now - self.last <= self.window:
            line, what = f"{self.tool}: sending Ctrl-C to the tasks\n", "abort"
        else:
            line = f"{self.tool}: interrupt (one more within 1 sec to abort)\n"
            what, self.last = "status", now
        # straight to the descriptor: the handler may interrupt a write to sys.stderr
        # (a reentrant write to a buffered stream raises), which is flushed after each use
        os.write(2, line.encode())
        try:
            self.send(what)
        except OSError:
            pass  # the command ended meanwhile
        return what


def _forward_stdin(conn: socket.socket) -> None:
    """Send this process's stdin to the shell as frames, then an end-of-file frame."""
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None
    try:
        while fd is not None:
            data = os.read(fd, 65536)
            if not data:
                break
            _send(conn, {"k": "i", "d": base64.b64encode(data).decode()})
        _send(conn, {"k": "i", "eof": True})
    except OSError:
        pass  # the command ended first


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tool, args = argv[0], argv[1:]
    try:
        req = parse(tool, args, dict(os.environ))
    except UsageError as e:
        sys.stderr.write(f"{tool}: error: {e}\n")
        return 2
    path = os.environ.get("CHIBA_SHELL_SOCKET")
    if not path:
        sys.stderr.write(f"{tool}: error: not inside a `chiba-admin shell` job "
                         "(CHIBA_SHELL_SOCKET is not set)\n")
        return 2
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # before the request goes out: once it has, the tasks may run and be interrupted
    signal.signal(signal.SIGINT, Interrupts(tool, lambda what: _send(
        conn, {"k": "sig", "what": what})))  # even if inherited ignored, as srun does
    try:
        conn.connect(path)
        conn.sendall(json.dumps(req).encode() + b"\n")
        f = conn.makefile("rb")
        if req["stdin"] != "none":  # srun's default: this command's stdin goes to task 0
            threading.Thread(target=_forward_stdin, args=(conn,), daemon=True).start()
    except OSError as e:
        sys.stderr.write(f"{tool}: error: cannot reach the shell at {path}: {e.strerror}\n")
        return 1
    out = _Labeller(req["label"])
    rc = 1
    for line in f:
        frame = json.loads(line)
        kind = frame.get("k")
        if kind == "o":
            out.write(frame["t"], frame["s"], base64.b64decode(frame["d"]))
        elif kind == "st":
            sys.stderr.write(f"{tool}: {frame.get('line')}\n")
        elif kind == "x":
            out.close()
            for err in frame.get("errors", []):
                sys.stderr.write(f"{tool}: {err}\n")
            if frame.get("uninit") and frame.get("ntasks", 0) > 1:
                n = len(frame["uninit"])
                sys.stderr.write(f"{tool}: warning: {n} task(s) loaded Open MPI but never "
                                 "spoke PMI: each ran as an MPI job of size 1 (Open MPI 5 "
                                 "speaks PMIx only): run it with --mpi=openmpi (Open MPI's "
                                 "own mpiexec), or build it with MPICH\n")
            for t, code in sorted(frame.get("aborted", {}).items()):
                sys.stderr.write(f"{tool}: task {t} called MPI_Abort (exit code {code})\n")
            rc = int(frame["rc"])
            break
        elif kind == "e":
            sys.stderr.write(f"{tool}: error: {frame.get('msg')}\n")
            rc = int(frame.get("rc", 1))  # 2: bad input, refused before anything started
            break
    else:
        sys.stderr.write(f"{tool}: error: the shell closed the connection\n")
    out.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
