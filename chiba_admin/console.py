"""The one place rich is set up: consoles, verbosity, and the progress bar that draws a run's
events (chiba_admin/progress.py); silent when quiet.

Both consoles read no markup and no emoji codes in strings: what they print is full of
strings from users and hosts (a source path, --dest, a host's error line) in which
``[red]``, ``[/x]`` or ``:smile:`` must print as typed; as markup ``[/x]`` raised
MarkupError after a stage had committed. A deliberate style is a ``rich.text.Text``.
"""

from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from topology.units import format_bandwidth, format_bytes

from .progress import SILENT, Progress

__all__ = ["get_console", "get_err_console", "configure", "progress", "print_json",
           "verbosity", "BarProgress"]

_state = {"quiet": False, "verbose": 0, "json": False}
_console: Console | None = None
_err: Console | None = None


def configure(*, quiet: bool = False, verbose: int = 0, json_output: bool = False) -> None:
    global _console, _err
    _state.update(quiet=quiet, verbose=verbose, json=json_output)
    _console = _err = None


def verbosity() -> int:
    """-1 when quiet, 0 normally, >0 with -v."""
    return -1 if _state["quiet"] else _state["verbose"]


def get_console() -> Console:
    global _console
    if _console is None:
        # a fresh Console each configure() so tests capturing sys.stdout see output
        # a pipe or file gets wide tables rather than columns squeezed to 80 characters
        width = None if sys.stdout.isatty() else 160
        _console = Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width,
                           markup=False, emoji=False)
    return _console


def get_err_console() -> Console:
    global _err
    if _err is None:
        _err = Console(file=sys.stderr, highlight=False, soft_wrap=True, markup=False,
                       emoji=False)
    return _err


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


class BytesColumn(ProgressColumn):
    """``done / total`` in IEC bytes, 3 significant digits (the tables' units); nothing
    while a phase counts hosts rather than bytes."""

    def render(self, task) -> Text:
        if getattr(task, "fields", {}).get("hosts"):
            return Text("")
        total = "?" if task.total is None else format_bytes(task.total)
        return Text(f"{format_bytes(task.completed)} / {total}")


class RateColumn(ProgressColumn):
    """The transfer rate in bit/s, 3 significant digits (the tables' units)."""

    def render(self, task) -> Text:
        if getattr(task, "fields", {}).get("hosts"):
            return Text("")
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else format_bandwidth(speed * 8))


class BarProgress(Progress):
    """The run's events (chiba_admin/progress.py) drawn as one rich bar on stderr.

    A phase with a byte total fills with bytes; a phase over hosts without one fills with
    hosts done. Thread-safe: fan-out threads report ``host_done``.
    """

    def __init__(self, bar: RichProgress, label: str):
        self._bar, self._label = bar, label
        self._task = bar.add_task(label, total=None, hosts=0)
        self._lock = threading.Lock()
        self._hosts = self._done = 0
        self._name, self._by_hosts = "", False

    def _describe(self, extra: str = "") -> str:
        text = f"{self._label}: {self._name}" if self._name else self._label
        if self._hosts:
            text += f" ({self._done}/{self._hosts} hosts)"
        return text + (f" {extra}" if extra else "")

    def phase(self, name: str, total_bytes: int | None = None, hosts: int = 0) -> None:
        with self._lock:
            self._name, self._hosts, self._done = name, hosts, 0
            self._by_hosts = total_bytes is None and hosts > 0
            self._bar.reset(self._task, total=hosts if self._by_hosts else total_bytes,
                            description=self._describe(), hosts=self._by_hosts)

    def advance(self, done_bytes: int, total_bytes: int | None = None) -> None:
        with self._lock:
            self._by_hosts = False
            kw = {} if total_bytes is None else {"total": total_bytes}
            self._bar.update(self._task, completed=done_bytes, hosts=False, **kw)

    def host_done(self, host: str, ok: bool) -> None:
        with self._lock:
            self._done += 1
            kw = {"completed": self._done} if self._by_hosts else {}
            self._bar.update(self._task, description=self._describe(), **kw)

    def note(self, text: str) -> None:
        with self._lock:
            self._bar.update(self._task, description=self._describe(text))


@contextmanager
def progress(label: str) -> Iterator[Progress]:
    """A Progress drawn on stderr while the block runs; the silent one when quiet, with
    --json, or when stderr is not a terminal."""
    err = get_err_console()
    if _state["quiet"] or _state["json"] or not err.is_terminal:
        yield SILENT
        return
    cols = [TextColumn("{task.description}", markup=False), BarColumn(), BytesColumn(),
            RateColumn(), TimeElapsedColumn()]
    with RichProgress(*cols, console=err, transient=True) as bar:
        yield BarProgress(bar, label)
