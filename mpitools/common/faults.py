"""Fault injection for tests: inert unless the job spec carries ``faults``.

The CLI process copies the environment variable CHIBA_FAULTS (JSON: one rule or a list of
rules) into the job spec (:func:`from_environ`, one line in each tool's driver); ranks
read faults from their job only, never from their environment. A rank program builds
``Faults.of(job, comm.rank)`` and calls ``checkpoint(point, count)`` at named points of
its loops; without rules that is a no-op.

A rule is ``{"point": P, "rank": R, "do": ACTION, ...}``; ``rank`` is a rank of the job's
communicator, or ``"*"`` (the default) for every rank. Actions:

- ``exit``: ``os._exit(status)`` (default 9) once ``count >= after`` (default 0): a node
  dying without any goodbye, mid-transfer. The one hard exit below ``rank_main``, on
  purpose: a simulated death must not clean up after itself.
- ``sleep``: sleep ``seconds`` each time the point is reached (a slow node); with
  ``announce``, first emit ``holding`` (rank, pid) so a test can kill this process.
- ``barrier``: a handshake with the test through FIFOs in ``dir``: write ``ready`` to
  ``dir/ready``, then read ``dir/go`` to its end (the test decides when the rank goes on).
  Anything but a FIFO there is refused: the rank writes no file. Bounded by ``timeout``
  (default 300 s) overall: a test that died or was interrupted never answers, and a rank
  left waiting would hold its whole job (mpiexec, every rank, their shared memory) for
  good; it raises TimeoutError then, which aborts the job.
- ``replace``: nothing happens at the point; the rank program reads the rule's ``file``
  through :meth:`Faults.rule` (a node sending a crafted archive).

The CLI takes a rule's ``dir`` or ``file`` only when it is a test fixture on this machine
(:func:`_check_paths`): CHIBA_FAULTS set in the environment of a root-run CLI must not
make every rank write, or send, a file of the attacker's choosing.

Points (count in brackets): ``stage.chunk`` (chunk index), ``stage.locked`` (every lock
taken), ``stage.commit`` (before this node moves its tree in), ``stage.committed`` (every
node has), ``sync.file`` (files written), ``ping.start``; collect's rank 0:
``collect.open`` (every node checked, before it opens ``DIR``), and for each host
``collect.commit`` (before its copy is moved in), ``collect.aside`` (its previous copy
moved aside, the new one not yet in), ``collect.committed`` (its copy in and marked), and
``collect.done`` (every host handled, before the result); ``replace`` points:
``collect.archive`` (a node's archive), ``stage.table`` (rank 0's block-digest table).
"""

# Rank-side module: standard library and chiba_admin.errors only.
from __future__ import annotations

import json
import os
import sys
import time

from chiba_admin.errors import InvalidRequest

__all__ = ["ENV", "ACTIONS", "Faults", "NONE", "from_environ"]

ENV = "CHIBA_FAULTS"
ACTIONS = ("exit", "sleep", "barrier", "replace")


def _rules(value) -> list[dict]:
    """The rules of a CHIBA_FAULTS value (parsed JSON); raises InvalidRequest."""
    rules = [value] if isinstance(value, dict) else value
    if not isinstance(rules, list):
        raise InvalidRequest(f"{ENV} must be a JSON object or a list of objects")
    for r in rules:
        if not isinstance(r, dict) or not isinstance(r.get("point"), str):
            raise InvalidRequest(f"{ENV}: every rule needs a \"point\": {r!r}")
        if r.get("do") not in ACTIONS:
            raise InvalidRequest(f"{ENV}: \"do\" must be one of {', '.join(ACTIONS)}: {r!r}")
    return rules


def from_environ(environ=None) -> dict:
    """``{"faults": [rule, ...]}`` when CHIBA_FAULTS is set in this (CLI) process, else
    ``{}``: what a driver merges into its job spec; says so on stderr (one line). Raises
    InvalidRequest on bad JSON or a rule naming something other than a test fixture."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise InvalidRequest(f"{ENV} is not JSON: {e}") from None
    rules = _rules(value)
    for r in rules:
        _check_paths(r)
    # a variable left over from testing must not go unnoticed on a real run
    sys.stderr.write(f"chiba-admin: {ENV} is set: {len(rules)} test fault(s) injected "
                     "into this job\n")
    return {"faults": rules}


def _check_paths(rule: dict) -> None:
    """A rule's files must be test fixtures, not a way to make a root-run tool write or
    send any file on every host (CHIBA_FAULTS may reach the environment of a root CLI):
    a barrier's ``dir`` holds the FIFOs ``ready`` and ``go``; a replacement ``file`` is a
    regular file that any user may read. Both owned by this user or root, no symlink, and
    checked here, where the CLI runs (a cluster whose hosts do not share these paths
    cannot take such a rule). Raises InvalidRequest."""
    import stat

    if rule["do"] == "barrier":
        paths = [(os.path.join(str(rule.get("dir", "")), n), stat.S_ISFIFO, "a FIFO")
                 for n in ("ready", "go")]
    elif rule["do"] == "replace":
        paths = [(str(rule.get("file", "")), stat.S_ISREG, "a regular file any user may read")]
    else:
        return
    for path, kind, what in paths:
        try:
            st = os.lstat(path) if os.path.isabs(path) else None
        except OSError:
            st = None
        if (st is None or not kind(st.st_mode) or st.st_uid not in (0, os.geteuid())
                or (rule["do"] == "replace" and not st.st_mode & stat.S_IROTH)):
            raise InvalidRequest(f"{ENV}: {path!r} is not {what} (absolute, owned by you "
                                 f"or root, not a symlink): {rule!r}")


class Faults:
    """The rules of one job that target one rank; ``checkpoint`` applies them."""

    def __init__(self, rules: list[dict], rank: int):
        self.rank = rank
        self.rules = [r for r in rules if r.get("rank", "*") in ("*", rank, str(rank))]

    @classmethod
    def of(cls, job: dict, rank: int) -> "Faults":
        """The faults of ``job`` for ``rank`` (:data:`NONE` when the job has none)."""
        rules = job.get("faults")
        return cls(_rules(rules), rank) if rules else NONE

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule(self, point: str) -> dict | None:
        """The first rule for ``point`` on this rank, or None."""
        for r in self.rules:
            if r["point"] == point:
                return r
        return None

    def checkpoint(self, point: str, count: int = 0) -> None:
        """Apply this rank's rules for ``point``; ``count``: how far the loop has got."""
        for r in self.rules:
            if r["point"] == point:
                _apply(r, self.rank, count)


NONE = Faults([], -1)


def _apply(rule: dict, rank: int, count: int) -> None:
    do = rule["do"]
    if do == "exit" and count >= int(rule.get("after", 0)):
        os._exit(int(rule.get("status", 9)))
    elif do == "sleep":
        if rule.get("announce"):
            from mpitools.common.runtime import emit

            emit("holding", rank=rank, pid=os.getpid())
        time.sleep(float(rule.get("seconds", 1.0)))
    elif do == "barrier":
        _barrier(rule["dir"], time.monotonic() + float(rule.get("timeout", 300)))


def _barrier(where: str, deadline: float) -> None:
    """Write ``ready`` into the FIFO ``where/ready`` once the test reads it, then read
    ``where/go`` until the test has written it and closed it; TimeoutError at
    ``deadline``. Non-blocking opens and ``poll``: a FIFO's blocking open has no timeout."""
    import errno
    import select

    while True:
        try:  # without a reader a non-blocking open for writing fails (ENXIO): retry
            fd = _fifo(os.path.join(where, "ready"), os.O_WRONLY)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        _left(deadline, where)
        time.sleep(0.05)
    try:
        os.write(fd, b"ready\n")
    finally:
        os.close(fd)
    fd = _fifo(os.path.join(where, "go"), os.O_RDONLY)
    try:
        p = select.poll()
        # Linux reports no hang-up on a FIFO until a writer has come (and gone) since it
        # was opened for reading: poll waits for the test, then for its close
        p.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            if not p.poll(_left(deadline, where) * 1000):
                continue
            try:
                if not os.read(fd, 4096):
                    return  # the test wrote "go" and closed it
            except BlockingIOError:
                pass
    finally:
        os.close(fd)


def _left(deadline: float, where: str) -> float:
    """Seconds left before ``deadline`` (at most 1); TimeoutError when none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"fault barrier in {where}: the test did not answer in time")
    return min(left, 1.0)


def _fifo(path: str, flags: int) -> int:
    """``path`` opened non-blocking if it is a FIFO (never followed if a symlink); OSError
    if it is anything else."""
    import stat

    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a FIFO (fault barrier)")
    return fd
