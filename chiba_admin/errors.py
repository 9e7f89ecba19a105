"""The one exception hierarchy of chiba-admin; imports nothing else of the project."""

from __future__ import annotations

__all__ = [
    "ChibaError",
    "UsageError",
    "TopologyError",
    "NodeSetError",
    "InventoryError",
    "TransportError",
    "HostFailure",
    "MPIToolError",
    "TestbedError",
    "StageError",
    "SyncError",
]


class ChibaError(Exception):
    """Root of every error chiba-admin reports to a user.

    ``what`` says what failed, ``where`` names the host, path or file:line, and
    ``hint`` says what to do. ``str()`` renders the one line the CLI prints.
    """

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        line = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            line = f"{line} ({self.hint})"
        return line


class UsageError(ChibaError):
    """A command line that cannot be carried out as written."""


class TopologyError(ChibaError):
    """A topology file or model that is malformed or inconsistent."""


class NodeSetError(ChibaError):
    """A nodeset naming unknown hosts or groups, or with bad syntax."""


class InventoryError(ChibaError):
    """A tree that cannot be scanned, diffed, decoded or applied safely."""


class TransportError(ChibaError):
    """A host that cannot be reached or refused a command or a file."""


class HostFailure(ChibaError):
    """One or more hosts failed an operation; ``failures`` maps host -> reason."""

    def __init__(self, what: str, failures: dict[str, str] | None = None, **kw):
        super().__init__(what, **kw)
        self.failures = dict(failures or {})


class MPIToolError(ChibaError):
    """An MPI program that could not be launched or ended badly."""


class TestbedError(ChibaError):
    """The namespace testbed could not be brought up, used or torn down."""

    __test__ = False  # not a pytest test class


class StageError(ChibaError):
    """Staging in or out failed."""


class SyncError(ChibaError):
    """Synchronising a repository failed."""
