"""The one exception hierarchy of chiba-admin; imports nothing else of the project.

Shape: one root (:class:`ChibaError`), one neutral class for bad input found anywhere
(:class:`InvalidRequest`, exit 2), and one sub-root per layer for failures while carrying a
request out (exit 1): topology, inventory, legacy_transit, mpitools, testbed. The CLI maps
classes to exit codes in one place (``chiba_admin/cli.py``). Because this module imports
nothing, every layer and every rank program may import it; it is the only module of the
``chiba_admin`` package a rank program loads (``tests/test_launcher.py``,
``test_rank_programs_import_lean``).
"""

from __future__ import annotations

__all__ = [
    "ChibaError",
    "InvalidRequest",
    "UsageError",
    "TopologyError",
    "NodeSetError",
    "InventoryError",
    "TransportError",
    "MPIToolError",
    "TestbedError",
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


class InvalidRequest(ChibaError):
    """Bad input found by any layer (a path, a size, a source, a destination): exit 2.

    Raised before anything is written on any host, so the user can fix the request and rerun.
    """


class UsageError(InvalidRequest):
    """A command line that cannot be carried out as written (raised by the CLI layer only)."""


# --- one sub-root per layer: failures while carrying out a valid request (exit 1) ----------

class TopologyError(ChibaError):
    """topology: a topology file or model that is malformed or inconsistent (exit 2)."""


class NodeSetError(TopologyError):
    """topology: a nodeset naming unknown hosts or groups, or with bad syntax (exit 2)."""


class InventoryError(ChibaError):
    """inventory: a tree that cannot be scanned, diffed, decoded or applied safely."""


class TransportError(ChibaError):
    """legacy_transit: a host that cannot be reached or refused a command or a file."""


class MPIToolError(ChibaError):
    """mpitools: an MPI program that could not be launched, served or ended badly."""


class TestbedError(ChibaError):
    """testbed: the namespace testbed could not be brought up, used or torn down."""

    __test__ = False  # not a pytest test class
