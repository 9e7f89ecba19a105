"""`stage --dry-run` on the ranks: every node says what staging would do to its destination.

Run through the stage rank program (``mpitools.stage.ranks.main`` hands a job with
``dry_run`` here, so the service and shell launches take it as they take a real stage).
Nothing is written anywhere: no parent is made, no lock, temporary directory or mark is
taken, no dead job's leftovers are swept; the checks read with the real run's own
functions (``NodeStage.check``) so that a refusal reads as the real run's.
"""

# Rank-side: standard library and the stage rank program only (docs/design.md, "Lean ranks")
from __future__ import annotations

import errno
import os
import time

from inventory.beneath import BeneathError, open_dir_beneath, open_root

from mpitools.common.runtime import agree_any, emit, maxrss_bytes, rank_hosts, wait
from mpitools.stage.ranks import DestRefused, NodeStage

__all__ = ["main", "dest_action", "spool_reachable"]


def dest_action(node: NodeStage) -> str:
    """What staging would do to ``node``'s destination, reading only: ``"create"`` (it, and
    any missing parent, would be made) or ``"replace"`` (an earlier stage's tree, or one
    ``--replace`` allows). Raises DestRefused as the real run's check phase would, and
    BeneathError where its prepare phase could not walk to the destination (no root)."""
    node.check()
    root_fd = open_root(node.root)
    try:
        pfd = open_dir_beneath(root_fd, node.parent_rel, display=node.host_root)
    except BeneathError as e:
        if e.errno == errno.ENOENT:  # a parent is missing: prepare makes it
            return "create"
        raise
    finally:
        os.close(root_fd)
    try:
        os.stat(node.name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return "create"
    finally:
        os.close(pfd)
    return "replace"  # check() passed: a directory that may be replaced


def spool_reachable(url: str, timeout: float) -> str | None:
    """Rank 0: can it reach the spool server at ``url``? None when the server answers (any
    HTTP status: no archive is published for a dry run), else the real run's line."""
    import urllib.error  # here: only rank 0 asks, and urllib costs 50 ms to import
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        return f"spool unreachable: {url}: {getattr(e, 'reason', e)}"
    return None


def _verdict(job: dict, host: str) -> tuple[str | None, str | None, str | None]:
    """(action, refusal, failure) of this node's destination: one of the three is set."""
    dest = job["dests"][host]
    node = NodeStage(dest["root"], dest["rel"], job["jobid"],
                     replace=bool(job.get("replace")), shown=dest.get("shown"),
                     host_root=dest.get("host_root"))
    try:
        return dest_action(node), None, None
    except DestRefused as e:
        return None, str(e), None
    except OSError as e:  # BeneathError names its path, as the real run's prepare says it
        return None, None, str(e) if isinstance(e, BeneathError) else \
            f"cannot prepare {node.shown}: {e.strerror or e}"


def main(comm, job: dict) -> int:
    """The real run's check and prepare verdicts without its writes; rank 0 emits the one
    ``result`` event, with a report per node as the real run's (``stage`` is ``"would
    create"`` or ``"would replace"`` for a node that would be staged) and ``phases``.

    Agreed as the real run agrees: rank 0's spool verdict first (bcast), then the nodes'
    refusals (exit 2 on the CLI), then the failures its prepare phase would meet."""
    t0, rank = time.time(), comm.rank
    host = rank_hosts(job)[rank]
    if rank == 0:
        emit("start", time=t0, ranks=comm.size)
    report = {"host": host, "ok": False, "bytes": 0, "seconds": 0.0, "stage": "check",
              "error": None, "primary": False, "refused": False}
    err = spool_reachable(job["url"], float(job.get("http_timeout", 30))) if rank == 0 \
        else None
    wait(comm.Ibarrier())  # quiet before a pickled collective (mpitools/stage/ranks.py)
    err = comm.bcast(err, root=0)
    action, refusal, failure = _verdict(job, host) if err is None else (None, None, None)
    any_refused = agree_any(comm, refusal is not None)
    any_failed = agree_any(comm, failure is not None)
    if err is not None:
        report.update(error=err if rank == 0 else "not started: the source check failed",
                      primary=rank == 0)
    elif refusal is not None:
        report.update(error=refusal, primary=True, refused=True)
    elif any_refused:
        report.update(error="not started: another node refused its destination")
    elif any_failed:
        report.update(stage="prepare", primary=failure is not None,
                      error=failure or "aborted: another node failed to prepare")
    else:
        report.update(ok=True, stage=f"would {action}")
    report.update(seconds=time.time() - t0, maxrss=maxrss_bytes())
    wait(comm.Ibarrier())
    reports = comm.gather(report, root=0)
    if rank == 0:
        emit("result", ok=all(r["ok"] for r in reports), reports=reports,
             phases={"check": time.time() - t0}, seconds=time.time() - t0,
             algorithm=job["algorithm"])
    return 0
