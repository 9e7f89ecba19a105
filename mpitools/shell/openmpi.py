"""``srun --mpi=openmpi`` / ``mpiexec --mpi openmpi``: a command handed to Open MPI's own
``mpiexec`` with the job's hosts and slots.

Rank-side module (and imported by the wrappers): standard library only, apart from
:func:`launcher`, which runs in the CLI process.

Open MPI 5 programs speak PMIx only: under the shell's PMI-1 server each task would run as
an MPI job of size 1 (the wrapper says so when it sees it: tasks that mapped
``libmpi.so.40`` and never sent PMI init). With ``--mpi openmpi`` rank 0 runs the command
as one task on its own host, ``mpiexec -n N --host h1:ppn,... ARGV``, built by the launcher
every MPI tool uses (mpitools/common/launch.py: the venv's ``mpiexec``, the topology's
``[mpi]`` settings); its output, exit status, signals and walltime are those of any task.
"""

from __future__ import annotations

import os
import re

__all__ = ["plugin", "launcher", "handoff", "PLUGINS"]

PLUGINS = {"none": "pmi1", "pmi1": "pmi1", "pmi": "pmi1", "openmpi": "openmpi",
           "pmix": "openmpi"}
# never handed to Open MPI's mpiexec: the batch system's variables (PRRTE would take its
# allocation from them and call srun or ssh on its own), another runtime's, the shell's
_NOT_PASSED = ("SLURM_", "PBS_", "SBATCH_", "SRUN_", "OMPI_COMM_", "PMIX_", "PRTE_", "PMI_",
               "CHIBA_SHELL_SOCKET", "CHIBA_TASK")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def plugin(value: str) -> str:
    """srun's ``--mpi`` value as the shell takes it: ``"pmi1"`` (its own PMI-1 server, the
    default; also ``none``, ``pmi``) or ``"openmpi"`` (also ``pmix``). ValueError else."""
    try:
        return PLUGINS[value.lower()]
    except KeyError:
        raise ValueError(f"--mpi={value}: the shell offers pmi1 (its PMI-1 server, the "
                         "default, for MPICH programs) and openmpi (Open MPI's own mpiexec;"
                         " also pmix)") from None


def launcher(topo, hosts: list[str], ppn: int) -> dict:
    """CLI side: the mpiexec line for the job's hosts, without the task count and program:
    ``{"argv", "env", "embedded"}`` (the job spec carries it to rank 0)."""
    from mpitools.common.launch import RANK_HOSTS_ENV, build_command

    # a user's program: Open MPI decides whether it spins (our ranks' yield is not forced on it)
    plan = build_command(topo, "", [], list(hosts), as_root=os.geteuid() == 0, tool=False)
    argv = list(plan.argv[:-3])  # less "python -m MODULE": the command's argv goes there
    drop = {RANK_HOSTS_ENV, "PYTHONPATH"}  # the rank programs' own
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "-x" and i + 1 < len(argv) and argv[i + 1] in drop:
            i += 2
            continue
        if argv[i] == "--host" and i + 1 < len(argv):
            out += ["--host", ",".join(f"{h}:{ppn}" for h in hosts)]
            i += 2
            continue
        out.append(argv[i])
        i += 1
    env = {k: v for k, v in plan.env.items() if k not in drop}
    return {"argv": out, "env": env, "embedded": plan.embedded}


def handoff(req: dict, job: dict) -> dict:
    """Rank 0: the request that runs ``req`` under Open MPI's mpiexec, as task 0 here.

    ``-n`` is the request's task count (all the job's slots by default); ``-N`` keeps
    the first N hosts. The command's environment goes to the ranks (``-x`` for remote
    hosts), less :data:`_NOT_PASSED`.
    """
    spec = job["openmpi"]
    hosts, ppn = list(job["hosts"]), int(job["ppn"])
    if req.get("nodes"):
        hosts = hosts[:int(req["nodes"])]
    ntasks = int(req.get("ntasks") or len(hosts) * ppn)
    if req.get("nodes"):  # spread over the N nodes as srun -N does (place_tasks): Open
        # MPI fills a host's slots first, so -N 2 -n 2 would put both tasks on the first
        ppn = min(ppn, -(-ntasks // len(hosts)))
    argv = list(spec["argv"])
    if "--host" in argv:
        argv[argv.index("--host") + 1] = ",".join(f"{h}:{ppn}" for h in hosts)
    argv[argv.index("-n") + 1] = str(ntasks)
    env = {k: v for k, v in (req.get("env") or {}).items() if not k.startswith(_NOT_PASSED)}
    if not spec["embedded"]:
        argv += [a for k in sorted(env) if _NAME.fullmatch(k) for a in ("-x", k)]
    env.update(spec["env"])
    return {**req, "argv": [*argv, *req["argv"]], "env": env, "ntasks": 1, "nodes": None,
            "per_node": False, "per_slot": False,
            # mpiexec's stdin is /dev/null: Open MPI 5 never passes on its end of file
            # (mpitools/shell/driver.py), a rank reading it would wait for ever
            "stdin": "none"}
