"""What every MPI rank program shares: job spec, events to the launcher, quiet waiting, abort."""

# Rank-side module: standard library, mpi4py and chiba_admin.errors only (docs/design.md,
# "Lean ranks").
from __future__ import annotations

import base64
import json
import os
import queue
import signal
import sys
import time
from collections.abc import Callable

TYPE_CHECKING = False  # typing: not loaded by rank modules (zstandard still loads it)
if TYPE_CHECKING:
    from typing import Any


__all__ = ["EVENT_PREFIX", "PeerLost", "load_job", "rank_hosts", "encode_job", "emit",
           "set_emitter", "Backoff", "wait", "queue_get", "queue_put", "agree_any",
           "Terminated", "rank_main", "maxrss_bytes", "SLEEP", "IDLE_CAP", "FORCED_ENV",
           "user_environ"]

EVENT_PREFIX = "@@chiba "
# The environment variables the launcher set for our rank programs only (comma-separated
# names; mpitools/common/launch.py), among them the MCA parameters Open MPI hands every rank
# as OMPI_MCA_<name>: a user's command that a rank runs must not inherit them (nor this list).
FORCED_ENV = "CHIBA_FORCED_ENV"
_FORCEABLE = frozenset({"UCX_MEM_EVENTS"})  # beside Open MPI's OMPI_MCA_* parameters
# Waiting by Test + a short sleep instead of a blocking call: ranks that outnumber cores
# would otherwise spin and starve each other (docs/design.md, "Waiting without spinning").
SLEEP = 0.001
# Long idle waits back off to this (docs/design.md: 1 ms while work runs, doubling to
# 20 ms when idle); data paths keep the 1 ms the chain's line rate was measured with.
IDLE_CAP = 0.02


def user_environ() -> dict[str, str]:
    """This rank's environment for a user's command: less the settings the launcher forced
    on our own ranks (:data:`FORCED_ENV`), so that an MPI program the command starts keeps
    Open MPI's and UCX's defaults or the site's own settings."""
    env = dict(os.environ)
    names = env.pop(FORCED_ENV, "")
    for name in filter(None, names.split(",")):
        # only what the launcher can force: the list cannot take PATH from a user
        if name.startswith("OMPI_MCA_") or name in _FORCEABLE:
            env.pop(name, None)
    return env


class Terminated(BaseException):
    """SIGTERM (mpiexec ending the job, a timeout or Ctrl-C on the launcher side)."""


class PeerLost(Exception):
    """A point-to-point operation with ``peer`` failed: that rank (or its link) is gone."""

    def __init__(self, peer: int | None, why: str):
        super().__init__(f"lost rank {peer}: {why}")
        self.peer, self.why = peer, why


def encode_job(job: dict) -> str:
    """The job spec as one argv word: ``b64:`` + base64 JSON (no quoting issues anywhere)."""
    raw = json.dumps(job, separators=(",", ":")).encode()
    return "b64:" + base64.urlsafe_b64encode(raw).decode()


def load_job(arg: str) -> dict:
    """Decode a job spec given as ``b64:...`` or as the path of a JSON file."""
    if arg.startswith("b64:"):
        return json.loads(base64.urlsafe_b64decode(arg[4:].encode()))
    with open(arg, encoding="utf-8") as f:
        return json.load(f)


def rank_hosts(job: dict) -> list[str]:
    """Host of each rank of the job's communicator: ``job["rank_hosts"]`` (a service
    running the job on a sub-communicator says so), else the launcher's CHIBA_RANK_HOSTS,
    else the job's own ``hosts``."""
    if job.get("rank_hosts"):
        return list(job["rank_hosts"])
    env = os.environ.get("CHIBA_RANK_HOSTS")
    return env.split(",") if env else list(job["hosts"])


def _print_event(record: dict) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


_emitter: Callable[[dict], None] = _print_event


def set_emitter(fn: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """Send events to ``fn(record)`` from now on (``record``: ``{"event": name, **fields}``)
    instead of stdout lines for the launcher; ``None`` restores those. Returns the previous
    emitter, so a caller (the long-running service) can put it back."""
    global _emitter
    previous, _emitter = _emitter, fn or _print_event
    return previous


def emit(event: str, **fields: Any) -> None:
    """One event for whoever runs the job: by default a JSON line on stdout for the
    launcher (rank 0 by convention), else the emitter given to :func:`set_emitter`."""
    _emitter({"event": event, **fields})


class Backoff:
    """The one sleep schedule between tests: ``SLEEP`` while things move, then doubling up
    to ``cap`` once nothing moved for ``linger`` seconds (``cap == SLEEP``: a steady 1 ms)."""

    def __init__(self, cap: float = SLEEP, linger: float = 0.0):
        self.cap, self.linger = cap, linger
        self.sleep, self.last = SLEEP, time.monotonic()

    def pause(self, moved: bool = False) -> None:
        """End of one turn of a polling loop: sleep unless it ``moved`` something."""
        if moved:
            self.sleep, self.last = SLEEP, time.monotonic()
            return
        time.sleep(self.sleep)
        if self.sleep < self.cap and time.monotonic() - self.last >= self.linger:
            self.sleep = min(self.cap, self.sleep * 2)


def wait(req, idle: Callable[[], None] | None = None, peer: int | None = None, *,
         status=None, cap: float = SLEEP, linger: float = 0.0) -> Any:
    """Complete one request without spinning: test it, run ``idle``, sleep (see Backoff).

    Returns the received object for a request from ``comm.irecv`` (else None); a ``None``
    request is complete. ``status`` (an ``MPI.Status``) is filled in as by ``Test``. With
    ``peer`` (a rank of the request's communicator) an MPI error on the request becomes
    ``PeerLost(peer)``; without it the MPI error propagates.
    """
    if req is None:
        return None
    pause = Backoff(cap, linger)
    try:
        while True:
            done, value = req.test(status)
            if done:
                return value
            if idle is not None:
                idle()
            pause.pause()
    except PeerLost:
        raise
    except Exception as e:  # mpi4py's MPI.Exception, without importing MPI here
        if peer is None or type(e).__module__.split(".")[0] != "mpi4py":
            raise
        raise PeerLost(peer, str(e)) from None


def queue_get(q: queue.Queue, idle: Callable[[], None] | None = None) -> Any:
    """``q.get()`` that runs ``idle`` every ``SLEEP`` while the queue is empty (the MPI
    thread keeps its requests moving while a helper thread produces); without ``idle``
    it just blocks (waking every 1 ms for nothing cost CPU on every node)."""
    if idle is None:
        return q.get()
    while True:
        try:
            return q.get(timeout=SLEEP)
        except queue.Empty:
            if idle is not None:
                idle()


def queue_put(q: queue.Queue, item: Any, idle: Callable[[], None] | None = None) -> None:
    """``q.put(item)`` that runs ``idle`` every ``SLEEP`` while the queue is full (without
    ``idle``: blocks)."""
    if idle is None:
        q.put(item)
        return
    while True:
        try:
            q.put(item, timeout=SLEEP)
            return
        except queue.Full:
            if idle is not None:
                idle()


def agree_any(comm, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a LOR allreduce, waited quietly)."""
    import array

    from mpi4py import MPI

    send = array.array("i", [1 if flag else 0])
    recv = array.array("i", [0])
    wait(comm.Iallreduce(send, recv, op=MPI.MAX))
    return bool(recv[0])


def maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _on_sigterm(signum, frame):
    raise Terminated()


def rank_main(main: Callable[[Any, dict], int], argv: list[str] | None = None) -> None:
    """Run ``main(comm, job)`` as a rank; an unhandled exception aborts the whole job.

    ``main`` owns its agreed (expected) failures; anything escaping it is a bug or a kill,
    after which peers could wait forever, so we Abort (as mpi4py's ``run.py`` does).
    """
    argv = sys.argv[1:] if argv is None else argv
    import mpi4py

    mpi4py.rc.thread_level = "funneled"  # helper threads never call MPI
    from mpi4py import MPI

    # Only this function ends the process (Abort, Finalize, os._exit) or takes signals:
    # ``main`` also runs on a sub-communicator of a long-running job (tests/test_layering.py)
    signal.signal(signal.SIGTERM, _on_sigterm)
    comm = MPI.COMM_WORLD
    # errors come back as exceptions, so a rank can say which peer vanished before aborting
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    MPI.COMM_SELF.Set_errhandler(MPI.ERRORS_RETURN)
    try:
        job = load_job(argv[0])
        code = main(comm, job)
    except PeerLost as e:
        # any rank may print events: the launcher blames ``peer``, not this rank
        emit("peer-lost", rank=comm.rank, peer=e.peer, why=e.why)
        sys.stderr.write(f"rank {comm.rank}: {e}; aborting the job\n")
        sys.stderr.flush()
        comm.Abort(75)
        return
    except Terminated:
        sys.stderr.write(f"rank {comm.rank}: terminated\n")
        sys.stderr.flush()
        os._exit(143)
    except BaseException:
        sys.stderr.write(f"rank {comm.rank}: unhandled error, aborting the job\n")
        import traceback  # the error path only: 5 ms of every rank's start otherwise

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(70)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # Past MPI_Finalize nothing is left to do: main has joined its threads and closed its
    # files. Skipping the interpreter's teardown (module and GC cleanup) cut mpiexec's
    # exit for 9 testbed ranks from 0.8 to 0.5 s with ULFM, 0.3 to 0.1 s without.
    MPI.Finalize()
    os._exit(code or 0)
