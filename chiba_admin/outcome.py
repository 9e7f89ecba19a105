"""The one outcome model: what a host and a run came to, for every method of every workload.

Imports nothing of the project (like ``chiba_admin/errors.py``), so ``legacy_transit`` and
the MPI drivers return these objects and the commands render them. ``to_dict()`` is the
``--json`` schema; ``tests/test_outcome_schema.py`` pins its keys per workload and method.

Shape: :class:`HostOutcome` (``ok``, ``seconds``, ``error``) and :class:`RunOutcome`
(``method``, ``ok``, ``seconds``, ``hosts``, ``failures``, ``phases``), one subclass of each
per workload adding its fields: stage and collect (:class:`TransferHost`,
:class:`TransferRun`), sync-mayors (:class:`SyncHost`, :class:`SyncRun`) and run
(:class:`CommandHost`, :class:`CommandRun`). A field left :data:`ABSENT` is not in the
JSON, so a method that never had a key does not grow one. A fan-out's per-host calls give
:class:`CallOutcome` (a value, or the exception that was raised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

__all__ = ["ABSENT", "HostOutcome", "RunOutcome", "TransferHost", "TransferRun",
           "SyncHost", "SyncRun", "CommandHost", "CommandRun", "CallOutcome"]

T = TypeVar("T")


class _Absent:
    """A field this method does not report: left out of ``to_dict()``."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


def _plain(value):
    """A field's JSON value: outcomes become their dicts, containers are walked."""
    if isinstance(value, (HostOutcome, RunOutcome)):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Keyed:
    """``to_dict()`` in the order of ``KEYS``, leaving out every ABSENT field."""

    KEYS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        out = {}
        for k in self.KEYS:
            v = getattr(self, k)
            if v is not ABSENT:
                out[k] = _plain(v)
        return out

    def get(self, key: str, default=None):
        """``to_dict().get(key)`` without building the dict (for renderers)."""
        v = getattr(self, key, ABSENT)
        return default if v is ABSENT or v is None else v


# --- hosts ---------------------------------------------------------------------------------
@dataclass
class HostOutcome(_Keyed):
    """One host's outcome: ``ok`` only when the host holds what it was asked to hold;
    ``seconds`` since the run started (float s); ``error`` one line, or None."""

    ok: bool = False
    seconds: float = 0.0
    error: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("ok", "seconds", "error")
    # the fields of a host that failed, besides ok=False and its error (see failed())
    FAILED: ClassVar[dict[str, Any]] = {}

    @classmethod
    def failed(cls, why: str, **fields):
        """The one constructor of a failed host: ``ok`` False, ``error`` ``why``, the
        workload's defaults for a host that got nothing (``FAILED``), then ``fields``."""
        return cls(**{**cls.FAILED, **fields, "ok": False, "error": why})


@dataclass
class TransferHost(HostOutcome):
    """A host of stage or collect (every method): ``bytes`` moved (int), its
    ``throughput_bps`` (bits per second), the ``stage`` it reached or failed in; MPI adds
    ``maxrss`` (KiB, from getrusage), City Transit the ``tree`` it holds now ("complete",
    "partial", "none", "unknown"), ``tree_path`` and ``previous`` (an earlier tree left as
    it was)."""

    bytes: int = 0
    throughput_bps: float = 0.0
    stage: str | None = None
    maxrss: int | None = ABSENT
    tree: str | None = ABSENT
    tree_path: str | None = ABSENT
    previous: str | None = ABSENT

    KEYS: ClassVar[tuple[str, ...]] = ("ok", "bytes", "seconds", "throughput_bps", "stage",
                                       "error", "maxrss", "tree", "tree_path", "previous")
    FAILED: ClassVar[dict[str, Any]] = {"bytes": 0, "seconds": 0.0, "throughput_bps": 0.0}


@dataclass
class SyncHost(HostOutcome):
    """A target of sync-mayors: ``rc`` (0 in sync, 1 not; rsync's own exit status),
    ``files_transferred``, ``bytes_sent``/``bytes_received`` (bytes, as each method counts
    them), ``created``/``updated``/``deleted`` entries, ``in_sync`` and the ``conflicts``
    (paths left unlike the source). mpisync adds ``meta``, ``warnings``, ``temps_removed``
    and with a plan ``plan``/``plan_summary``; rsync adds ``files_total``/``total_size``;
    both list ``changes`` (rsync's ``%i %n`` lines) when asked."""

    rc: int = 0
    files_transferred: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    created: int = ABSENT
    updated: int = ABSENT
    deleted: int = ABSENT
    meta: int = ABSENT
    dest: str = ABSENT
    warnings: list = ABSENT
    in_sync: bool = ABSENT
    conflicts: list = ABSENT
    temps_removed: int = ABSENT
    plan: str = ABSENT
    plan_summary: dict = ABSENT
    changes: list = ABSENT
    files_total: int = ABSENT
    total_size: int = ABSENT

    KEYS: ClassVar[tuple[str, ...]] = (
        "ok", "rc", "seconds", "files_transferred", "bytes_sent", "bytes_received", "created",
        "updated", "deleted", "meta", "dest", "warnings", "error", "in_sync", "conflicts",
        "temps_removed", "plan", "plan_summary", "changes", "files_total", "total_size")
    FAILED: ClassVar[dict[str, Any]] = {"rc": 1, "files_transferred": 0, "bytes_sent": 0,
                                        "bytes_received": 0}


@dataclass
class CommandHost(HostOutcome):
    """A host of ``run``: its exit status ``rc`` (255 when unreachable or timed out) and
    its whole ``stdout``/``stderr`` as text."""

    rc: int = 0
    stdout: str = ""
    stderr: str = ""

    KEYS: ClassVar[tuple[str, ...]] = ("rc", "ok", "error", "seconds", "stdout", "stderr")


# --- runs ----------------------------------------------------------------------------------
@dataclass
class RunOutcome(_Keyed):
    """One run of one method: ``ok`` only when every host is; ``seconds`` wall time (float
    s); ``hosts`` name -> HostOutcome in the run's order; ``failures`` name -> one line for
    each host (or helper, e.g. a mayor's cleanup) that failed; ``phases`` name -> seconds."""

    method: str = ""
    ok: bool = False
    seconds: float = 0.0
    hosts: dict[str, HostOutcome] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = ABSENT
    launch: str = ABSENT  # MPI methods: "mpiexec" (a fresh job), "service" or "shell"

    KEYS: ClassVar[tuple[str, ...]] = ("method", "ok", "seconds", "hosts", "failures",
                                       "phases", "launch")

    @property
    def hosts_ok(self) -> int:
        """How many hosts are ok."""
        return sum(1 for h in self.hosts.values() if h.ok)


@dataclass
class TransferRun(RunOutcome):
    """stage or collect: ``source``, ``dest`` (as shown), ``nodes``, ``bytes`` (what
    crossed: the archive, or the streams), ``payload_bytes`` and ``files`` (the tree's),
    ``phase_bytes`` (bytes per phase). ``refused`` (nothing was touched: exit 2) with
    ``refusal`` (one line), ``error`` (the run's own failure), ``outcome`` (City Transit:
    who holds what) and the MPI details (algorithm, compress, chunk, segment, kind,
    peak_rss in KiB, the tail of mpiexec's stderr) when the method reports them. A dry run
    (``stage --dry-run``) has ``dry_run`` True and its ``plan`` (where the bytes would go:
    ``mpitools.stage.driver.route_plan``, ``legacy_transit.transit.transit_route``); both
    are absent from a real run's JSON."""

    algorithm: str | None = ABSENT
    source: str | None = None
    dest: str | None = None
    dest_dir: str = ABSENT
    dests: dict[str, str] = ABSENT
    nodes: list[str] = field(default_factory=list)
    bytes: int = 0
    payload_bytes: int = 0
    files: int = 0
    phase_bytes: dict[str, int] = field(default_factory=dict)
    compress: str = ABSENT
    chunk: int = ABSENT
    segment: int = ABSENT
    kind: str = ABSENT
    refused: bool = ABSENT
    refusal: str = ABSENT
    error: str = ABSENT
    peak_rss: int = ABSENT
    mpiexec_stderr: list[str] = ABSENT
    outcome: str = ABSENT
    dry_run: bool = ABSENT
    plan: dict = ABSENT

    KEYS: ClassVar[tuple[str, ...]] = (
        "method", "algorithm", "ok", "dry_run", "source", "dest", "dest_dir", "dests",
        "nodes", "bytes", "payload_bytes", "files", "seconds", "phases", "phase_bytes",
        "hosts", "failures", "compress", "chunk", "segment", "kind", "refused", "refusal",
        "error", "peak_rss", "mpiexec_stderr", "outcome", "plan", "launch")


@dataclass
class SyncRun(RunOutcome):
    """sync-mayors: ``source``, ``dest`` (as shown), ``targets``, ``dry_run`` and
    ``bytes_sent`` (bytes that left the president). mpisync adds ``launch_seconds``,
    ``sync_seconds``, the source's ``source_files``/``source_bytes``/``source_warnings``
    and ``groups`` (broadcasts, one per set of targets needing the same files)."""

    source: str = ""
    dest: str = ""
    targets: list[str] = field(default_factory=list)
    dry_run: bool = False
    launch_seconds: float | None = ABSENT
    sync_seconds: float = ABSENT
    bytes_sent: int = 0
    source_files: int = ABSENT
    source_bytes: int = ABSENT
    groups: int = ABSENT
    source_warnings: list[str] = ABSENT

    KEYS: ClassVar[tuple[str, ...]] = (
        "method", "source", "dest", "targets", "dry_run", "launch_seconds", "ok", "seconds",
        "sync_seconds", "bytes_sent", "source_files", "source_bytes", "groups", "phases",
        "source_warnings", "hosts", "failures", "launch")


@dataclass
class CommandRun(RunOutcome):
    """run: ``rc`` (pdsh -S: the largest exit status, 255 for an unreachable host) and,
    once the command has grouped them, ``groups``/``stderr_groups`` (dshbak -c blocks)."""

    rc: int = 0
    groups: list[dict] = ABSENT
    stderr_groups: list[dict] = ABSENT

    KEYS: ClassVar[tuple[str, ...]] = ("ok", "rc", "hosts", "failures", "groups",
                                       "stderr_groups", "launch")


# --- one call of a fan-out -----------------------------------------------------------------
@dataclass(frozen=True)
class CallOutcome(Generic[T]):
    """What one call of a fan-out gave for one host: its ``value``, or the exception it
    raised (``exc``); a fan-out never raises halfway."""

    host: str
    value: T | None = None
    exc: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.exc is None

    @property
    def error(self) -> str | None:
        """``Type: message`` of the exception, or None."""
        return None if self.exc is None else f"{type(self.exc).__name__}: {self.exc}"
