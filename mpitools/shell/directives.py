"""Job-script directives (``#PBS``, ``#SBATCH``) and the environment a batch job sees.

Pure: text in, data out. The names and meanings follow Torque/PBS (``qsub`` options and
the ``PBS_*`` variables of its job environment) and Slurm (``sbatch`` options and its
``SLURM_*`` output environment), so scripts written for either run unchanged under
``chiba-admin shell --pbs`` / ``--slurm``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

__all__ = ["JobRequest", "DirectiveError", "parse_pbs", "parse_slurm", "parse_walltime",
           "positive_int",
           "pbs_environment", "slurm_environment", "nodefile_text"]


class DirectiveError(ValueError):
    """A directive with a bad value; ``str()`` names ``file:line``, the directive and why."""


@dataclass
class JobRequest:
    """What a job script asks for (None: not said; the command line or defaults decide).

    ``nodes`` and ``ppn`` (tasks per node), ``ntasks`` (Slurm's ``-n``), ``walltime`` in
    seconds, ``name``, ``stdout``/``stderr`` paths, ``join`` (``-j oe``: stderr into
    stdout), ``export_all`` (``-V``), ``variables`` (``-v A=1,B``).
    """

    nodes: int | None = None
    ppn: int | None = None
    ntasks: int | None = None
    walltime: float | None = None
    name: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    join: bool = False
    export_all: bool = False
    variables: dict[str, str] = field(default_factory=dict)


def parse_walltime(text: str) -> float:
    """``[[HH:]MM:]SS`` or Slurm's ``D-HH[:MM[:SS]]`` / ``MM`` -> seconds (positive).

    Raises ValueError for anything else (``abc``, ``0``, ``-5``).
    """
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ValueError(f"walltime {text!r} is not [[HH:]MM:]SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (parts + [0, 0])[:3]
        secs = ((int(days) * 24 + h) * 60 + mi) * 60 + s
    elif len(parts) == 3:
        secs = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    elif len(parts) == 2:
        secs = parts[0] * 60 + parts[1]
    else:
        secs = parts[0]
    if secs <= 0:
        raise ValueError(f"walltime {text!r} must be positive")
    return float(secs)


def _directive_lines(text: str, prefix: str):
    """(line number, argv) of each directive before the first command (as qsub/sbatch)."""
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if i == 1 and s.startswith("#!"):
            continue
        if not s:
            continue
        if s.startswith(prefix + " ") or s == prefix:
            try:
                yield i, shlex.split(s[len(prefix):], comments=True)
            except ValueError as e:
                raise DirectiveError(f"line {i}: {prefix}: {e}") from None
            continue
        if s.startswith("#"):
            continue
        return  # the first command ends the directives


def positive_int(value: str, what: str) -> int:
    """``value`` as a whole number of at least 1; ValueError naming ``what`` otherwise."""
    # int() would also take " 2", "1_5" and other scripts' digits
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        raise ValueError(f"{what}={value!r} is not a whole number")
    n = int(value)
    if n < 1:
        raise ValueError(f"{what}={n} must be at least 1")
    return n


def _positive(value: str, what: str, where: str) -> int:
    try:
        return positive_int(value, what)
    except ValueError as e:
        raise DirectiveError(f"{where}: {e}") from None


def _sbatch_count(value: str, word: str, where: str) -> int:
    """A count of an ``#SBATCH`` option, the error naming it as written (``-N 0``)."""
    opt = word.split("=", 1)[0]
    try:
        return positive_int(value, opt)
    except ValueError:
        why = "must be at least 1" if value.isascii() and value.isdigit() else \
            "not a whole number"
        raise DirectiveError(f"{where}: #SBATCH {opt} {value}: {why}") from None


def _walltime(value: str, where: str) -> float:
    try:
        return parse_walltime(value)
    except ValueError as e:
        raise DirectiveError(f"{where}: {e}") from None


def parse_pbs(text: str, source: str = "script") -> JobRequest:
    """The ``#PBS`` directives of ``text`` (``-N``, ``-l nodes=N:ppn=M``, ``-l walltime``,
    ``-o``, ``-e``, ``-j oe``, ``-V``, ``-v``). Raises DirectiveError naming file:line."""
    req = JobRequest()
    for lineno, argv in _directive_lines(text, "#PBS"):
        where = f"{source}:{lineno}"
        it = iter(argv)
        for opt in it:
            val = next(it, None) if opt in ("-N", "-l", "-o", "-e", "-j", "-v") else None
            if opt in ("-N", "-l", "-o", "-e", "-j", "-v") and val is None:
                raise DirectiveError(f"{where}: #PBS {opt} needs a value")
            if opt == "-N":
                req.name = val
            elif opt == "-l":
                for res in val.split(","):
                    key, _, v = res.partition("=")
                    if key == "nodes":
                        parts = v.split(":")
                        req.nodes = _positive(parts[0], "nodes", where)
                        for p in parts[1:]:
                            k2, _, v2 = p.partition("=")
                            if k2 == "ppn":
                                req.ppn = _positive(v2, "ppn", where)
                    elif key == "walltime":
                        req.walltime = _walltime(v, where)
                    elif key in ("ncpus", "procs"):
                        req.ntasks = _positive(v, key, where)
            elif opt == "-o":
                req.stdout = val
            elif opt == "-e":
                req.stderr = val
            elif opt == "-j":
                req.join = val in ("oe", "eo")
            elif opt == "-V":
                req.export_all = True
            elif opt == "-v":
                for item in val.split(","):
                    k, eq, v = item.partition("=")
                    req.variables[k] = v if eq else ""
            else:
                raise DirectiveError(f"{where}: unsupported #PBS option {opt!r} "
                                     "(supported: -N -l -o -e -j -V -v)")
    return req


_SLURM_LONG = {"--nodes": "-N", "--ntasks": "-n", "--time": "-t", "--job-name": "-J",
               "--output": "-o", "--error": "-e", "--ntasks-per-node": "--ntasks-per-node"}


def parse_slurm(text: str, source: str = "script") -> JobRequest:
    """The ``#SBATCH`` directives of ``text`` (``-N``, ``-n``, ``--ntasks-per-node``,
    ``-t``, ``-J``, ``-o``, ``-e``; long forms with ``=``). Raises DirectiveError."""
    req = JobRequest()
    for lineno, argv in _directive_lines(text, "#SBATCH"):
        where = f"{source}:{lineno}"
        it = iter(argv)
        for word in it:
            opt, eq, val = word.partition("=") if word.startswith("--") else (word, "", "")
            opt = _SLURM_LONG.get(opt, opt)
            if opt not in ("-N", "-n", "-t", "-J", "-o", "-e", "--ntasks-per-node"):
                raise DirectiveError(f"{where}: unsupported #SBATCH option {word!r} "
                                     "(supported: -N -n --ntasks-per-node -t -J -o -e)")
            if not eq:
                val = next(it, None)
                if val is None:
                    raise DirectiveError(f"{where}: #SBATCH {opt} needs a value")
            if opt == "-N":
                req.nodes = _sbatch_count(val.split("-")[0], word, where)
            elif opt == "-n":
                req.ntasks = _sbatch_count(val, word, where)
            elif opt == "--ntasks-per-node":
                req.ppn = _sbatch_count(val, word, where)
            elif opt == "-t":
                req.walltime = _walltime(val, where)
            elif opt == "-J":
                req.name = val
            elif opt == "-o":
                req.stdout = val
            elif opt == "-e":
                req.stderr = val
    return req


def nodefile_text(nodes: list[str], ppn: int) -> str:
    """``PBS_NODEFILE``'s content: one line per slot, each node ``ppn`` times in a row."""
    return "".join(f"{n}\n" * ppn for n in nodes)


def pbs_environment(*, jobid: str, name: str, nodes: list[str], ppn: int, nodefile: str,
                    workdir: str, submit_host: str) -> dict[str, str]:
    """The ``PBS_*`` variables of a Torque job (what ``qsub`` sets for the script)."""
    return {"PBS_JOBID": jobid, "PBS_JOBNAME": name, "PBS_NODEFILE": nodefile,
            "PBS_O_WORKDIR": workdir, "PBS_O_HOST": submit_host,
            "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_NUM_NODES": str(len(nodes)),
            "PBS_NUM_PPN": str(ppn), "PBS_NP": str(len(nodes) * ppn),
            "PBS_TASKNUM": "1", "PBS_NODENUM": "0"}


def slurm_environment(*, jobid: str, name: str, nodelist: str, nodes: int, ntasks: int,
                      ppn: int, submit_dir: str, submit_host: str) -> dict[str, str]:
    """The ``SLURM_*`` variables of a batch job (what ``sbatch`` sets for the script)."""
    return {"SLURM_JOB_ID": jobid, "SLURM_JOBID": jobid, "SLURM_JOB_NAME": name,
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
            "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
            "SLURM_TASKS_PER_NODE": f"{ppn}(x{nodes})" if nodes > 1 else str(ppn),
            "SLURM_SUBMIT_DIR": submit_dir, "SLURM_SUBMIT_HOST": submit_host}
