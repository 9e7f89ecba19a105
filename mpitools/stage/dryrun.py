"""`stage --dry-run` on the ranks: every node says what staging would do to its destination.

Run through the stage rank program (``mpitools.stage.ranks.main`` hands a job with
``dry_run`` here, so the service and shell launches take it as they take a real stage).
Nothing is written anywhere: no parent is made, no lock, temporary directory or mark is
taken, no dead job's leftovers are swept. The checks read with the real run's own
functions (``NodeStage.check_at``, the lock's :func:`inventory.beneath.lock_forecast`) so
that a refusal reads as the real run's, and they follow the real run's phases: check
(the destination as it is), then prepare (the lock; a dead job's moved-aside copy that
``clean_stale`` would put back in place of a missing destination, checked again).
"""

# Rank-side: standard library and the stage rank program only (docs/design.md, "Lean ranks")
from __future__ import annotations

import errno
import os
import stat
import time

from inventory.beneath import (BeneathError, flock_held, lock_forecast, lstat_at,
                               open_dir_beneath, open_root, was_staged)

from mpitools.common.archive import TEMP_RE
from mpitools.common.runtime import agree_any, emit, maxrss_bytes, rank_hosts, wait
from mpitools.stage.ranks import DestRefused, NodeStage

__all__ = ["main", "dest_action", "spool_reachable", "stale_copy", "PrepareRefused"]


class PrepareRefused(DestRefused):
    """Refused by the prepare phase's second check: the destination that a dead job's
    moved-aside copy (``put_back``) would be once put back in place."""

    def __init__(self, message: str, put_back: str):
        super().__init__(message)
        self.put_back = put_back


def stale_copy(pfd: int, name: str) -> str | None:
    """The dead job's moved-aside copy of ``name`` (``.NAME.chiba-stage-JOB.old``, a
    directory no live process holds locked) that the real run's ``clean_stale`` would
    put back in place of a missing ``name``, or None. Reads only: liveness comes from
    ``/proc/locks`` (:func:`inventory.beneath.flock_held`), not from a lock taken; where
    that cannot be read, a copy counts as dead (most are: a live run holds one only for
    the moment of its commit)."""
    for entry in os.listdir(pfd):  # clean_stale's order: the first one free goes back
        m = TEMP_RE.match(entry)
        if not m or m.group("name") != name or not m.group("old"):
            continue
        st = lstat_at(pfd, entry)
        if st is not None and stat.S_ISDIR(st.st_mode) and not flock_held(st):
            return entry
    return None


def dest_action(node: NodeStage) -> tuple[str, str | None]:
    """What staging would do to ``node``'s destination, reading only, walking once: (the
    action, the dead job's copy it would put back first or None). The action is
    ``"create"``, with the first missing parent when parents would be made, or
    ``"replace"`` with what would be replaced (an earlier stage's tree, or a directory
    --replace deletes). Raises DestRefused where the real run's check phase refuses,
    PrepareRefused where its prepare phase would (after putting a dead job's copy back),
    and BeneathError where prepare would fail (no root, the lock held or planted)."""
    root_fd = open_root(node.root)
    try:
        pfd = open_dir_beneath(root_fd, node.parent_rel, display=node.host_root)
    except BeneathError as e:
        if e.errno == errno.ENOENT:  # prepare makes the missing parents
            return f"create (and the missing parent directories, from {e.path})", None
        raise DestRefused(str(e)) from None  # as NodeStage.check refuses it
    finally:
        os.close(root_fd)
    try:
        return _in_parent(node, pfd)
    finally:
        os.close(pfd)


def _in_parent(node: NodeStage, pfd: int) -> tuple[str, str | None]:
    """dest_action in the destination's open parent ``pfd``."""
    node.check_at(pfd)  # the check phase
    locked = lock_forecast(pfd, node.name, display=os.path.dirname(node.shown))
    if locked is not None:
        raise locked
    staged = was_staged(pfd, node.name)
    what = ("an earlier stage's tree" if staged else
            "a directory no stage made, which --replace deletes")
    if lstat_at(pfd, node.name) is not None:  # check_at let it through: a directory
        return f"replace ({what})", None
    old = stale_copy(pfd, node.name)
    if old is None:
        return "create", None
    if not node.replace and not staged:
        raise PrepareRefused(
            f"{node.shown} would be a copy that a dead run had moved aside, put back in its"
            f" place from {old} by the real run, which then refuses it: it was not created"
            " by chiba-admin stage; pass --replace to replace it", old)
    return f"replace ({what}, once put back from {old})", old


def spool_reachable(url: str, timeout: float) -> str | None:
    """Rank 0: can it reach the spool server at ``url``? None when the server answers as
    a spool answers a name it does not hold (no archive is published for a dry run: 404)
    or serves it; else the real run's line (unreachable, or another HTTP status, such as
    a 403 or 500 that would fail the real run's download too)."""
    import urllib.error  # here: only rank 0 asks, and urllib costs 50 ms to import
    import urllib.request

    try:  # GET, as the real run asks (a server may answer HEAD otherwise)
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        e.close()
        return None if e.code == 404 else f"spool: {url}: HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        return f"spool unreachable: {url}: {getattr(e, 'reason', e)}"
    return None


def _verdict(job: dict, host: str) -> tuple[str | None, str, str | None, str | None]:
    """(phase, kind, line, tidied) of this node's destination: phase None and kind "ok"
    with the action as the line; or the real run's phase ("check", "prepare"), kind
    "refused" or "failed", and its line; tidied: the dead job's copy its prepare would put
    back first (the real run's report says the same, ranks.py ``_prepare``)."""
    dest = job["dests"][host]
    node = NodeStage(dest["root"], dest["rel"], job["jobid"],
                     replace=bool(job.get("replace")), shown=dest.get("shown"),
                     host_root=dest.get("host_root"))

    def tidied(old: str | None) -> str | None:
        return old and (f"would put back {node.shown} from {old}, a copy a dead run had "
                        "moved aside")
    try:
        action, old = dest_action(node)
        return None, "ok", action, tidied(old)
    except PrepareRefused as e:
        return "prepare", "refused", str(e), tidied(e.put_back)
    except DestRefused as e:
        return "check", "refused", str(e), None
    except OSError as e:  # BeneathError names its path, as the real run's prepare says it
        return "prepare", "failed", (str(e) if isinstance(e, BeneathError) else
                                     f"cannot prepare {node.shown}: {e.strerror or e}"), None


def _report(report: dict, verdict: tuple, in_check: bool, in_prepare: bool) -> None:
    """Fill this node's report from its verdict and the agreed phases' outcomes: as the
    real run's report, with ``stage`` "would ACTION", "would fail at PHASE" (its own
    failure) or "would stop at PHASE" (another node's)."""
    phase, kind, line, tidied = verdict
    if tidied and not in_check:  # a refusal at check stops every node before prepare
        report["tidied"] = tidied
    if in_check or in_prepare:
        where = "check" if in_check else "prepare"
        if phase == where:
            report.update(stage=f"would fail at {where}", error=line, primary=True,
                          refused=kind == "refused")
        else:
            report.update(stage=f"would stop at {where}", error=(
                "not started: another node refused its destination" if in_check else
                "aborted: another node failed to prepare"))
        return
    report.update(ok=True, stage=f"would {line}")


def main(comm, job: dict) -> int:
    """The real run's check and prepare verdicts without its writes; rank 0 emits the one
    ``result`` event, with a report per node as the real run's (``stage`` is ``"would
    create ..."`` or ``"would replace ..."`` for a node that would be staged; ``tidied``
    says what it would put back first) and ``phases``.

    Agreed as the real run agrees: rank 0's spool verdict first (bcast), then the nodes'
    check-phase refusals (exit 2 on the CLI), then what its prepare phase would meet."""
    t0, rank = time.time(), comm.rank
    hosts = rank_hosts(job)
    host = hosts[rank]
    if rank == 0:
        emit("start", time=t0, ranks=comm.size)
    report = {"host": host, "ok": False, "bytes": 0, "seconds": 0.0, "stage": "check",
              "error": None, "primary": False, "refused": False}
    err = spool_reachable(job["url"], float(job.get("http_timeout", 30))) if rank == 0 \
        else None
    wait(comm.Ibarrier())  # quiet before a pickled collective (mpitools/stage/ranks.py)
    err = comm.bcast(err, root=0)
    verdict = _verdict(job, host) if err is None else (None, "none", None, None)
    in_check = agree_any(comm, verdict[0] == "check")
    in_prepare = agree_any(comm, verdict[0] == "prepare")
    if err is not None:
        report.update(error=err if rank == 0 else
                      f"not started: the spool check failed on {hosts[0]}",
                      primary=rank == 0, stage="would fail at check" if rank == 0 else
                      "would stop at check")
    else:
        _report(report, verdict, in_check, in_prepare)
    report.update(seconds=time.time() - t0, maxrss=maxrss_bytes())
    wait(comm.Ibarrier())
    reports = comm.gather(report, root=0)
    if rank == 0:
        emit("result", ok=all(r["ok"] for r in reports), reports=reports,
             phases={"check": time.time() - t0}, seconds=time.time() - t0,
             algorithm=job["algorithm"])
    return 0
