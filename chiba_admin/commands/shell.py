"""`chiba-admin shell SCRIPT`: MPISH, a parallel shell that is itself an MPI program."""

from __future__ import annotations

import sys

import click

from topology import expand

from ..cli import pass_ctx
from ..console import print_json
from ..errors import UsageError

__all__ = ["register", "shell_cmd"]


def _walltime(value: str | None) -> float | None:
    if value is None:
        return None
    from mpitools.shell.directives import parse_walltime

    try:
        return parse_walltime(value)
    except ValueError as e:
        raise UsageError(f"bad --walltime: {e}", hint="e.g. 10:00 or 1:30:00") from None


@click.command("shell", context_settings={"allow_interspersed_args": False})
@click.option("--nodes", "-w", "nodeset", metavar="NODESET", default=None,
              help="Nodes of the job, one shell rank each (default: the allocation's, from "
                   "PBS_NODEFILE or SLURM_JOB_NODELIST).")
@click.option("--ppn", type=click.IntRange(1, 4096), default=None,
              help="Slots (tasks) per node (default: the script's directive, else 1).")
@click.option("--pbs", "mode", flag_value="pbs", help="Read #PBS directives; PBS_* variables.")
@click.option("--slurm", "mode", flag_value="slurm",
              help="Read #SBATCH directives; SLURM_* variables.")
@click.option("--walltime", metavar="[[HH:]MM:]SS", default=None,
              help="End every task after this long (default: the script's directive).")
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def shell_cmd(ctx, nodeset, ppn, mode, walltime, script, args):
    """Run SCRIPT with bash on the first node; its mpiexec, mpirun, srun and pbsdsh run
    their tasks through the shell's MPI ranks (one per node, started once)."""
    from mpitools.shell.driver import plan_shell, run_shell

    topo = ctx.topology
    if topo.kind == "embedded":
        from ..embedded import require_initialized

        require_initialized(topo)
    nodes = expand(topo, nodeset) if nodeset else None
    if nodeset is not None and not nodes:
        raise UsageError(f"--nodes {nodeset!r} selects no host")
    plan = plan_shell(topo, script, nodes, args=tuple(args), ppn=ppn, mode=mode or "plain",
                      walltime=_walltime(walltime))
    files = {}
    try:
        if plan.stdout:
            files[1] = open(plan.stdout, "ab")
        if plan.join:
            files[2] = files.get(1) or sys.stdout.buffer
        elif plan.stderr:
            files[2] = open(plan.stderr, "ab")
    except OSError as e:
        raise UsageError(f"cannot open the job's output file: {e.strerror}",
                         where=e.filename) from None

    def write(stream: int, data: bytes) -> None:
        out = files.get(stream) or (sys.stdout.buffer if stream == 1 else sys.stderr.buffer)
        out.write(data)
        out.flush()

    try:
        result = run_shell(topo, plan, write=write)
    finally:
        for f in set(files.values()):
            if f not in (sys.stdout.buffer, sys.stderr.buffer):
                f.close()
    if ctx.json:
        print_json(result)
    return int(result["rc"] or 0)


def register(group: click.Group) -> None:
    group.add_command(shell_cmd)
