"""The one progress interface every method of every workload reports through.

Imports nothing of the project, so ``legacy_transit`` and the MPI drivers may call it. The
base class does nothing: a method calls it freely, a caller that shows nothing passes
``None`` (read as :data:`SILENT`), and the CLI subclasses it to draw a bar
(``chiba_admin/console.py``). Calls may come from fan-out threads (``host_done``): a
subclass that keeps state guards it.
"""

from __future__ import annotations

__all__ = ["Progress", "SILENT", "or_silent"]


class Progress:
    """Events of one run, in order: ``phase`` starts a phase, ``advance`` moves it on,
    ``host_done`` says a host finished, ``note`` is a free line of text."""

    def phase(self, name: str, total_bytes: int | None = None, hosts: int = 0) -> None:
        """Phase ``name`` starts (e.g. "pack", "to_mayors", "unpack", "rsync", "sync").

        ``total_bytes``: bytes the phase will move, when known (int). ``hosts``: how many
        hosts it works on (0 when not per host); each ends with :meth:`host_done`.
        """

    def advance(self, done_bytes: int, total_bytes: int | None = None) -> None:
        """``done_bytes`` of the current phase are done: a running total in bytes, not a
        delta. ``total_bytes`` corrects the phase's total when it becomes known."""

    def host_done(self, host: str, ok: bool) -> None:
        """``host`` finished the current phase; ``ok`` False when it failed."""

    def note(self, text: str) -> None:
        """One line about the run for a person (e.g. "collected 3/8 hosts")."""


SILENT = Progress()


def or_silent(progress: Progress | None) -> Progress:
    """``progress``, or the shared no-op one for None."""
    return SILENT if progress is None else progress
