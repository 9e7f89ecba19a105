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
  ``dir/ready``, then read ``dir/go`` (the test decides when the rank goes on).
- ``replace``: nothing happens at the point; the rank program reads the rule's ``file``
  through :meth:`Faults.rule` (a node sending a crafted archive).

Points (count in brackets): ``stage.chunk`` (chunk index), ``stage.locked`` (every lock
taken), ``sync.file`` (files written), ``ping.start``, ``collect.archive``.
"""

# Rank-side module: standard library and chiba_admin.errors only.
from __future__ import annotations

import json
import os
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
    ``{}``: what a driver merges into its job spec. Raises InvalidRequest on bad JSON."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise InvalidRequest(f"{ENV} is not JSON: {e}") from None
    return {"faults": _rules(value)}


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
        with open(os.path.join(rule["dir"], "ready"), "w") as f:
            f.write("ready\n")
        with open(os.path.join(rule["dir"], "go")) as f:
            f.read()
