"""`chiba-admin spool serve`: the home server's spool over HTTP, archives only, no listing."""

from __future__ import annotations

import os

import click

from ..cli import EXIT_OK, pass_ctx
from ..console import get_console, get_err_console, print_json
from ..errors import MPIToolError

__all__ = ["register", "spool_group"]

DEFAULT_PORT = 8765


@click.group("spool")
def spool_group():
    """The HTTP spool that MPI staging downloads archives from."""


@spool_group.command("serve")
@click.option("--bind", default=None, metavar="ADDR",
              help="Address to listen on (default: the home server's address).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT,
              show_default=True, help="TCP port (0: pick a free one).")
@click.option("--dir", "directory", default=None, metavar="DIR",
              help="Spool directory (default: the home server's spool).")
@pass_ctx
def serve(ctx, bind, port, directory):
    """Serve the spool until interrupted; each archive only under its own secret name."""
    from mpitools.common.spool import SpoolServer

    topo = ctx.topology
    home = topo.home_server
    directory = directory or home.local_path(home.spool)
    if not os.path.isdir(directory):
        raise MPIToolError("spool directory missing", where=directory,
                         hint="run `chiba-admin cluster init` (embedded) or create it")
    bind = bind or ("127.0.0.1" if topo.kind == "embedded" else home.address or "127.0.0.1")
    try:
        server = SpoolServer(directory, bind, port, verbose=ctx.verbose > 0)
    except OSError as e:
        raise MPIToolError(f"cannot listen on {bind}:{port}: {e.strerror or e}",
                         where=home.name, hint="pick another --port or --bind") from None
    host, real_port = server.address
    info = {"url": f"http://{host}:{real_port}/", "directory": directory}
    if ctx.json:
        print_json(info)
    else:
        get_console().print(f"serving spool {directory} at {info['url']} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        get_err_console().print("spool: stopped")
    finally:
        server.httpd.server_close()
    return EXIT_OK


def register(group: click.Group) -> None:
    group.add_command(spool_group)
