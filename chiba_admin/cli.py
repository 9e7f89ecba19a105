"""The chiba-admin command line: global options, command registry, and the one exit-code map."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import click

from . import console
from .errors import ChibaError, InvalidRequest, TopologyError

__all__ = ["main", "run", "cli", "Context", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE",
           "EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "exit_code_for",
           "COMMAND_MODULES"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM to chiba-admin: unwound like Ctrl-C, so that every launcher and fan-out
    stops what it started (mpiexec's process group, remote commands) before exiting."""

# The one place exit codes are decided: bad input and configuration are 2, anything that
# went wrong on hosts is 1, Ctrl-C is 130 (like a shell).
_EXIT_BY_CLASS: list[tuple[type[BaseException], int]] = [
    (InvalidRequest, EXIT_USAGE),  # UsageError (the CLI's own) is one
    (TopologyError, EXIT_USAGE),   # NodeSetError is one
    (click.UsageError, EXIT_USAGE),
    (ChibaError, EXIT_FAILURE),
    (Terminated, EXIT_TERMINATED),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
]

# Each module defines click commands and a `register(group)` function.
COMMAND_MODULES = [
    "chiba_admin.commands.topology",
    "chiba_admin.commands.cluster",
    "chiba_admin.commands.stage",
    "chiba_admin.commands.spool",
    "chiba_admin.commands.testbed",
    "chiba_admin.commands.run",
    "chiba_admin.commands.sync",
    "chiba_admin.commands.bench",
    "chiba_admin.commands.shell",
    "chiba_admin.commands.predict",
    "chiba_admin.commands.service",
]


def exit_code_for(exc: BaseException) -> int:
    for cls, code in _EXIT_BY_CLASS:
        if isinstance(exc, cls):
            return code
    return EXIT_FAILURE


def _default_cluster_file() -> str:
    env = os.environ.get("CHIBA_CLUSTER")
    if env:
        return env
    local = Path("clusters/demo.toml")
    if local.is_file():
        return str(local)
    return str(Path(__file__).resolve().parent.parent / "clusters" / "demo.toml")


@dataclass
class Context:
    """What every command needs: the topology (loaded lazily), output mode and state dir."""

    cluster_file: str
    state: str | None = None
    json: bool = False
    debug: bool = False
    quiet: bool = False
    verbose: int = 0
    _topology: object = field(default=None, repr=False)

    @property
    def topology(self):
        if self._topology is None:
            from topology import load_topology

            from .embedded import bind

            self._topology = bind(load_topology(self.cluster_file),
                                  Path(self.state) if self.state else None)
        return self._topology


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cluster", "cluster_file", metavar="FILE", default=None,
              help="Topology TOML file (default: $CHIBA_CLUSTER or clusters/demo.toml).")
@click.option("--state", metavar="DIR", envvar="CHIBA_STATE", default=None,
              help="State directory of the embedded cluster "
                   "(default: ~/.local/state/chiba-admin/NAME).")
@click.option("--json", "json_output", is_flag=True, help="Print results as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors.")
@click.option("-v", "--verbose", count=True, help="More detail (repeatable).")
@click.version_option(package_name="chiba-admin", prog_name="chiba-admin")
@click.pass_context
def cli(ctx, cluster_file, state, json_output, debug, quiet, verbose):
    """Stage files, synchronise repositories and run jobs on a president/mayor/node cluster."""
    console.configure(quiet=quiet, verbose=verbose, json_output=json_output)
    ctx.obj = Context(cluster_file or _default_cluster_file(), state, json_output, debug,
                      quiet, verbose)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(cli)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process and return its exit code (tests call this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rv = cli.main(args=argv, prog_name="chiba-admin", standalone_mode=False)
        return int(rv or 0)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort as e:  # click turns Ctrl-C (and our SIGTERM) into Abort
        if isinstance(e.__cause__, Terminated):
            console.get_err_console().print("chiba-admin: terminated")
            return EXIT_TERMINATED
        console.get_err_console().print("chiba-admin: interrupted")
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        sys.stderr.write(f"chiba-admin: error: {_click_line(e)}\n")
        return exit_code_for(e)
    except (ChibaError, KeyboardInterrupt) as e:
        if debug:
            traceback.print_exc()
        msg = ("terminated" if isinstance(e, Terminated) else
               "interrupted" if isinstance(e, KeyboardInterrupt) else str(e))
        sys.stderr.write(f"chiba-admin: error: {msg}\n")
        return exit_code_for(e)
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug: say so in one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            sys.stderr.write(f"chiba-admin: internal error: {type(e).__name__}: {e} "
                             "(rerun with --debug for a traceback and report it)\n")
        return EXIT_FAILURE


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _click_line(e: click.ClickException) -> str:
    """click's error as the one line every error gets: where, what, what to do.

    click's own rendering is a usage block of four lines; the option, the value and what
    is allowed are all in ``format_message()``, the command in the context.
    """
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if ctx is not None and isinstance(e, click.UsageError):
        return f"{ctx.command_path}: {msg} (see `{ctx.command_path} --help`)"
    return msg


def run() -> None:
    """Console-script entry point."""
    _exit_now(main())


def _exit_now(code: int) -> None:
    """Exit as a normal exit would, minus tearing down every module (0.1 s with networkx).

    Non-daemon threads are joined and atexit handlers run (paramiko closes transports,
    temporary directories are removed); only the interpreter's final cleanup is skipped.
    """
    import atexit
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away, a closed stream
            pass
    os._exit(code)
