"""What every MPI rank program shares: job spec, events to the launcher, quiet waiting, abort."""

# Rank-side module: standard library and mpi4py only (no rich, click, networkx).
from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from typing import Any, Callable

__all__ = ["EVENT_PREFIX", "PeerLost", "load_job", "rank_hosts", "encode_job", "emit", "set_emitter",
           "wait", "wait_all", "agree_any", "Terminated", "rank_main", "test_hook",
           "maxrss_bytes", "SLEEP"]

EVENT_PREFIX = "@@chiba "
# Waiting by Test + a short sleep instead of a blocking call: ranks that outnumber cores
# would otherwise spin and starve each other (docs/design.md, "Waiting without spinning").
SLEEP = 0.001


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
    """Host of each rank: the job's ``rank_hosts`` (a service gives the communicator it
    made), else the launcher's CHIBA_RANK_HOSTS, else the job's own list."""
    if job.get("rank_hosts"):
        return list(job["rank_hosts"])
    env = os.environ.get("CHIBA_RANK_HOSTS")
    return env.split(",") if env else list(job["hosts"])


def _stdout_emitter(event: dict) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


_emitter: Callable[[dict], None] = _stdout_emitter


def set_emitter(fn: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """Send events through ``fn(event_dict)`` from now on (None: stdout lines again);
    returns the previous sink so a caller can put it back."""
    global _emitter
    prev, _emitter = _emitter, fn or _stdout_emitter
    return prev


def emit(event: str, **fields: Any) -> None:
    """One event for the launcher (rank 0 by convention): by default a JSON line on
    stdout after EVENT_PREFIX; a service redirects it with :func:`set_emitter`."""
    _emitter({"event": event, **fields})


def wait(req, idle: Callable[[], None] | None = None, peer: int | None = None) -> None:
    """Complete one request without spinning; ``idle`` runs between tests.

    With ``peer`` given, an MPI error on the request becomes ``PeerLost(peer)``.
    """
    if req is None:
        return
    try:
        while not req.Test():
            if idle is not None:
                idle()
            time.sleep(SLEEP)
    except PeerLost:
        raise
    except Exception as e:  # mpi4py's MPI.Exception, without importing MPI here
        if peer is None or type(e).__module__.split(".")[0] != "mpi4py":
            raise
        raise PeerLost(peer, str(e)) from None


def wait_all(reqs: list, idle: Callable[[], None] | None = None) -> None:
    live = [r for r in reqs if r is not None]
    if not live:
        return
    from mpi4py import MPI

    while not MPI.Request.Testall(live):
        if idle is not None:
            idle()
        time.sleep(SLEEP)


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


def test_hook(name: str, rank: int) -> str | None:
    """Value of test hook ``CHIBA_TEST_<NAME>`` if it targets ``rank`` (``rank:value``)."""
    spec = os.environ.get("CHIBA_TEST_" + name.upper())
    if not spec:
        return None
    r, _, value = spec.partition(":")
    return value if r in ("*", str(rank)) else None


def _on_sigterm(signum, frame):
    raise Terminated()


def rank_main(main: Callable[[Any, dict], int], argv: list[str] | None = None) -> None:
    """Run ``main(comm, job)`` as a rank; an unhandled exception aborts the whole job.

    ``main`` owns its agreed (expected) failures; anything escaping it is a bug or a kill,
    after which peers could wait forever, so we Abort (STYLE #8).
    """
    argv = sys.argv[1:] if argv is None else argv
    import mpi4py

    mpi4py.rc.thread_level = "funneled"  # helper threads never call MPI
    from mpi4py import MPI

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
