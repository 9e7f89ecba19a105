"""The one place rich is set up: consoles, verbosity and a progress factory that is a no-op when quiet."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from topology.units import format_bandwidth, format_bytes

__all__ = ["get_console", "get_err_console", "configure", "progress", "print_json",
           "verbosity", "Progressor"]

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
        _console = Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)
    return _console


def get_err_console() -> Console:
    global _err
    if _err is None:
        _err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    return _err


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


class Progressor:
    """A progress handle: ``update(done, total, label)``; does nothing when disabled."""

    def __init__(self, progress: Progress | None, task):
        self._p, self._t = progress, task

    def update(self, done: float | None = None, total: float | None = None,
               label: str | None = None) -> None:
        if self._p is None:
            return
        kw = {}
        if done is not None:
            kw["completed"] = done
        if total is not None:
            kw["total"] = total
        if label is not None:
            kw["description"] = label
        self._p.update(self._t, **kw)


class BytesColumn(ProgressColumn):
    """``done / total`` in IEC bytes, 3 significant digits (the tables' units)."""

    def render(self, task) -> Text:
        total = "?" if task.total is None else format_bytes(task.total)
        return Text(f"{format_bytes(task.completed)} / {total}")


class RateColumn(ProgressColumn):
    """The transfer rate in bit/s, 3 significant digits (the tables' units)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else format_bandwidth(speed * 8))


@contextmanager
def progress(label: str, total: float | None = None, *, unit_bytes: bool = True
             ) -> Iterator[Progressor]:
    """A progress bar on stderr while the block runs; silent when quiet, --json or not a tty."""
    err = get_err_console()
    if _state["quiet"] or _state["json"] or not err.is_terminal:
        yield Progressor(None, None)
        return
    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [BytesColumn(), RateColumn()] if unit_bytes else []
    cols += [TimeElapsedColumn()]
    with Progress(*cols, console=err, transient=True) as p:
        yield Progressor(p, p.add_task(label, total=total))
