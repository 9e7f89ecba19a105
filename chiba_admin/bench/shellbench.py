"""The ``shell`` workload: `chiba-admin shell` (MPISH, issue 17) against the launches it
replaces, all measured in one run on the same nodes, methods interleaved in each repeat.

Three cases, each a ``shell`` run (records.py's schema, with ``cpu_busy``):

``command``
    ``commands`` parallel ``hostname`` commands on N nodes. ``shell``: ``srun hostname``
    in one shell job (one launch; the time of each command inside the job, taken by the
    script); ``run``: as many ``chiba-admin run -w NODES -- hostname``; ``mpiexec``: as many
    Open MPI ``mpiexec`` of ``hostname`` on the same hosts (the line
    mpitools/common/launch.py builds from the topology); ``srun``: as many ``srun -N N
    hostname`` on the testbed's Slurm (started when missing; testbed only). ``seconds``
    is the median per command, ``per_command`` every one.
``mpi_init``
    examples/allreduce.py under MPICH (.venv-mpich): the time from a stamp taken just
    before the launch command to MPI_Init done on every rank (``init_max``, printed by
    the program, the largest over ranks). ``shell``: its ``mpiexec`` inside the same
    shell job (the shell's PMI); ``hydra``: MPICH's own ``mpiexec`` (over ssh on the
    testbed, its interface pinned). ``seconds`` is the median of ``init_runs``.
``pipeline``
    stage-in, the program, stage-out. ``shell``: in one shell job (``seconds``: the whole
    `chiba-admin shell` command; ``inner_launch``: the ``launch`` key of the inner
    stage's and collect's --json, i.e. whether they reused the job's ranks);
    ``separate``: `chiba-admin stage`, hydra's ``mpiexec``, `chiba-admin collect`.

A method that cannot run here (Slurm off the testbed, MPICH missing) gives one run with
``skipped`` (the reason) in the first repeat.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import data
from .records import cpu_meter
from .sites import Site
from ..errors import ChibaError, InvalidRequest

__all__ = ["shell", "COMMAND_METHODS", "INIT_METHODS", "PIPELINE_METHODS", "MPICH_PYTHON",
           "ALLREDUCE", "COMMAND_TARGET_S", "INIT_TARGET_RATIO"]

_ROOT = Path(__file__).resolve().parents[2]
MPICH_PYTHON = _ROOT / ".venv-mpich" / "bin" / "python"
ALLREDUCE = _ROOT / "examples" / "allreduce.py"
COMMAND_METHODS = ("shell", "run", "mpiexec", "srun")
INIT_METHODS = ("shell", "hydra")
PIPELINE_METHODS = ("shell", "separate")
# Issue 17: each command in a running shell under 0.2 s at 8 nodes, 0.5 s at 32; the
# shell's PMI at most as slow to MPI_Init as hydra
COMMAND_TARGET_S = {8: 0.2, 32: 0.5}
INIT_TARGET_RATIO = 1.0
# The testbed's primary NIC (testbed/configs.py PRTE_IF): MPICH's traffic stays on it
_TESTBED_IFACE = "eth0"


class _Bench:
    """What every case needs: the site, its nodes, the work directory, executables."""

    def __init__(self, site: Site, names: list[str], workdir: Path):
        self.site, self.names, self.work = site, names, workdir
        self.exe = str(Path(sys.executable).with_name("chiba-admin"))
        self.testbed = site.kind == "testbed"
        self.mpi_env = ({"FI_TCP_IFACE": _TESTBED_IFACE, "UCX_NET_DEVICES": _TESTBED_IFACE}
                        if self.testbed else {})

    @property
    def nodeset(self) -> str:
        from topology import fold

        return fold(self.names)

    def exec(self, argv: list[str], env: dict | None = None,
             timeout: float = 600) -> tuple[int, float, str, str]:
        """Run ``argv`` where the CLI runs (the president on the testbed): (rc, wall s,
        stdout, stderr); rc 124 on a timeout."""
        t0 = time.monotonic()
        try:
            p = subprocess.run(self.site.wrap(argv), capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return 124, time.monotonic() - t0, "", f"timed out after {timeout:g} s"
        return p.returncode, time.monotonic() - t0, p.stdout, p.stderr

    def cli_argv(self, *args: str) -> list[str]:
        return [self.exe, *self.site.cluster_args, *args]


def _row(case: str, method: str, nodes: int, i: int, **kw) -> dict:
    return {"workload": "shell", "case": case, "method": method, "nodes": nodes,
            "repeat": i, "nic": None, "failures": {}, **kw}


def _skipped(case: str, method: str, nodes: int, why: str) -> dict:
    return _row(case, method, nodes, 0, ok=False, skipped=why, seconds=0.0, cpu_busy=None)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# -- the shell job: `commands` x srun hostname, then `init_runs` MPICH programs ------------
def _job_script(b: _Bench, out: Path, commands: int, init_runs: int) -> str:
    q = shlex.quote
    n = len(b.names)
    lines = ["#!/bin/bash", f"exec >{q(str(out / 'job.log'))} 2>&1",
             *[f"export {k}={q(v)}" for k, v in b.mpi_env.items()],
             f"for i in $(seq 1 {commands}); do",
             "  t0=$EPOCHREALTIME",
             f"  srun hostname >{q(str(out))}/cmd.$i.out 2>{q(str(out))}/cmd.$i.err",
             "  rc=$?; t1=$EPOCHREALTIME",
             f"  echo \"$i $rc $t0 $t1\" >>{q(str(out / 'cmd.times'))}",
             "done"]
    if init_runs:
        lines += [f"for i in $(seq 1 {init_runs}); do",
                  "  t0=$EPOCHREALTIME",
                  f"  CHIBA_BENCH_T0=$t0 mpiexec -n {n} {q(str(MPICH_PYTHON))} "
                  f"{q(str(ALLREDUCE))} >{q(str(out))}/init.$i.out 2>&1",
                  "  rc=$?; t1=$EPOCHREALTIME",
                  f"  echo \"$i $rc $t0 $t1\" >>{q(str(out / 'init.times'))}",
                  "done"]
    return "\n".join(lines) + "\n"


def _times(path: Path) -> list[tuple[int, int, float]]:
    """(index, rc, seconds) of each line ``I RC T0 T1`` the job script wrote."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for ln in text.splitlines():
        i, rc, t0, t1 = ln.split()
        out.append((int(i), int(rc), float(t1) - float(t0)))
    return out


def _init_max(text: str) -> float | None:
    """Rank 0's ``init_max S`` (seconds). MPICH's mpiexec forwards the ranks' output
    unbuffered, so another rank's line may share its line on either side (seen on the
    testbed: ``init_max 0.592734rank 1 of 8 ...`` and ``... init 2.05 sinit_max 3.115719``)."""
    m = re.search(r"init_max ([0-9]+(?:\.[0-9]+)?)", text)
    return float(m.group(1)) if m else None


def _check_hostnames(text: str, n: int) -> str | None:
    """Why ``hostname`` output of ``n`` tasks is wrong (None: n non-empty lines)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return None if len(lines) == n else f"{len(lines)} lines of output, {n} expected"


def _shell_job(b: _Bench, i: int, commands: int, init_runs: int) -> list[dict]:
    """One shell job: the ``command`` row and (with init_runs) the shell's ``mpi_init``."""
    out = b.work / f"shell-job-{i}"
    out.mkdir(parents=True, exist_ok=True)
    script = out / "job.sh"
    script.write_text(_job_script(b, out, commands, init_runs))
    with cpu_meter() as cpu:
        rc, wall, so, se = b.exec(b.cli_argv("--json", "shell", "--nodes", b.nodeset,
                                             str(script)))
    try:
        res = json.loads(so) if so.strip() else {}
    except ValueError:
        res = {}
    n = len(b.names)
    times = _times(out / "cmd.times")
    failures = {} if rc == 0 else {"-": (se.strip().splitlines() or [f"exit {rc}"])[-1]}
    for k, krc, _ in times:
        why = (f"exit {krc}" if krc else
               _check_hostnames((out / f"cmd.{k}.out").read_text(errors="replace"), n))
        if why:
            failures[f"command {k}"] = why
    if len(times) != commands:
        failures.setdefault("-", f"{len(times)} of {commands} commands ran")
    per = [s for _, _, s in times]
    common = {"cpu_busy": cpu.busy, "job_seconds": wall, "job_rc": res.get("rc"),
              "launch_seconds": res.get("launch_seconds")}
    rows = [_row("command", "shell", n, i, ok=not failures, seconds=_median(per),
                 per_command=per, commands=commands, failures=failures, **common)]
    if init_runs:
        inits, bad = [], {}
        for k, krc, secs in _times(out / "init.times"):
            text = (out / f"init.{k}.out").read_text(errors="replace")
            v = _init_max(text)
            if krc or v is None:
                bad[f"run {k}"] = f"exit {krc}: {text.strip()[-200:]}"
            else:
                inits.append((v, secs))
        ok = not bad and len(inits) == init_runs
        rows.append(_row("mpi_init", "shell", n, i, ok=ok, seconds=_median([v for v, _ in inits]),
                         init_s=[v for v, _ in inits], command_s=[s for _, s in inits],
                         failures=bad if ok or bad else {"-": "no MPICH program ran"},
                         **common))
    return rows


# -- the launches the shell replaces ---------------------------------------------------------
def _mpiexec_hostname(b: _Bench) -> tuple[list[str], dict[str, str]]:
    """Open MPI's mpiexec line for ``hostname`` on the nodes, as the tools build it."""
    from mpitools.common.launch import build_command, child_env

    module = "chiba_bench_placeholder"
    plan = build_command(b.site.topo, module, [], list(b.names), as_root=os.geteuid() == 0)
    if plan.argv[-2:] != ["-m", module]:
        raise ChibaError("unexpected mpiexec line: " + plan.shell(), where="president")
    return plan.argv[:-3] + ["hostname"], child_env(plan.env)


def _slurm_ready(b: _Bench) -> str | None:
    """Why ``srun`` cannot run here (None: the testbed's Slurm is up, started if needed)."""
    if not b.testbed:
        return "srun runs only on the testbed (its Slurm: `testbed up --slurm`)"
    from testbed import slurm

    if slurm.missing_tools():
        return f"Slurm is not installed ({', '.join(slurm.missing_tools())} missing)"
    if not slurm.is_up(b.site.testbed_state):
        try:
            slurm.up(b.site.testbed_state)
        except ChibaError as e:
            return f"Slurm did not come up: {e}"
    return None


def _commands(b: _Bench, method: str, i: int, commands: int) -> dict:
    """``commands`` separate launches of ``hostname`` on the nodes with ``method``."""
    n = len(b.names)
    if method == "run":
        argv, env = b.cli_argv("--json", "run", "-w", b.nodeset, "--", "hostname"), {}
    elif method == "mpiexec":
        argv, env = _mpiexec_hostname(b)
    else:  # srun
        from testbed import slurm

        argv = ["srun", "-N", str(n), "-w", b.nodeset, "hostname"]
        env = {"SLURM_CONF": str(slurm.conf_path(b.site.testbed_state))}
    per, failures, launches = [], {}, set()
    with cpu_meter() as cpu:
        for k in range(1, commands + 1):
            rc, wall, so, se = b.exec(argv, env)
            per.append(wall)
            text = so
            if method == "run":
                res = json.loads(so) if so.strip().startswith("{") else {}
                launches.add(res.get("launch") or "ssh")
                text = "".join((h.get("stdout") or "") for h in (res.get("hosts") or {}).values())
            why = (f"exit {rc}: {(se.strip().splitlines() or [''])[-1]}" if rc else
                   _check_hostnames(text, n))
            if why:
                failures[f"command {k}"] = why
    extra = {"launch": launches.pop()} if len(launches) == 1 else {}
    return _row("command", method, n, i, ok=not failures, seconds=_median(per),
                per_command=per, commands=commands, failures=failures, cpu_busy=cpu.busy,
                **extra)


def _hydra_argv(b: _Bench, program: list[str]) -> list[str]:
    """MPICH's own mpiexec of ``program`` on the nodes: forked locally on the embedded
    cluster; over ssh on the testbed (our ssh_config, a host file, the interface pinned)."""
    mpiexec = str(MPICH_PYTHON.with_name("mpiexec"))
    n = str(len(b.names))
    if not b.testbed:
        return [mpiexec, "-n", n, *program]
    from testbed.configs import Layout

    hostfile = b.work / "hydra.hosts"
    hostfile.write_text("".join(f"{h}:1\n" for h in b.names))
    ssh = b.work / "hydra-ssh"
    ssh.write_text("#!/bin/sh\nexec ssh -F "
                   f"{shlex.quote(str(Layout(b.site.testbed_state).ssh_config))} \"$@\"\n")
    ssh.chmod(0o755)
    return [mpiexec, "-launcher", "ssh", "-launcher-exec", str(ssh), "-f", str(hostfile),
            "-n", n, "-ppn", "1", "-iface", _TESTBED_IFACE,
            *[a for k, v in b.mpi_env.items() for a in ("-genv", k, v)], *program]


def _hydra_init(b: _Bench, i: int, init_runs: int) -> dict:
    argv = _hydra_argv(b, [str(MPICH_PYTHON), str(ALLREDUCE)])
    inits, walls, bad = [], [], {}
    with cpu_meter() as cpu:
        for k in range(1, init_runs + 1):
            rc, wall, so, se = b.exec(argv, {"CHIBA_BENCH_T0": f"{time.time():.6f}"})
            v = _init_max(so)
            if rc or v is None:
                bad[f"run {k}"] = f"exit {rc}: {(so + se).strip()[-200:]}"
            else:
                inits.append(v)
                walls.append(wall)
    return _row("mpi_init", "hydra", len(b.names), i, ok=not bad, seconds=_median(inits),
                init_s=inits, command_s=walls, failures=bad, cpu_busy=cpu.busy)


# -- stage-in, program, stage-out ----------------------------------------------------------
def _spool_server(b: _Bench):
    """On the testbed the job script runs on the first node, where `stage` cannot serve
    its own spool at the home server's address: a `chiba-admin spool serve` there (as the
    example scripts say); (its URL, its process) or (None, None) off the testbed."""
    if not b.testbed:
        return None, None
    import testbed

    first = b.names[0]
    tb = testbed.Testbed(b.site.testbed_state)
    addr = b.site.topo.host(first).address
    proc = tb.popen(first, b.cli_argv("--json", "spool", "serve", "--bind", addr, "--port",
                                      "0"), stdout=subprocess.PIPE, text=True)
    text = ""
    for line in proc.stdout:  # its --json is indented: read up to the closing brace
        text += line
        if line.startswith("}"):
            break
    try:
        return json.loads(text)["url"], proc
    except (ValueError, KeyError):
        proc.terminate()
        proc.wait(timeout=30)
        raise ChibaError(f"the spool server did not start: {text.strip() or 'no output'}",
                         where=first) from None


def _pipeline_script(b: _Bench, out: Path, src: Path, dest: str, back: Path,
                     spool_url: str | None) -> str:
    q = shlex.quote
    steps = q(str(out / "steps"))
    spool = ["--spool-url", spool_url] if spool_url else []
    cmds = {"stage": b.cli_argv("--json", "stage", str(src), "--nodes", b.nodeset, "--dest",
                                dest, *spool),
            "program": ["mpiexec", "-n", str(len(b.names)), str(MPICH_PYTHON),
                        str(ALLREDUCE)],
            "collect": b.cli_argv("--json", "collect", dest, "--nodes", b.nodeset, "--dest",
                                  str(back))}
    lines = ["#!/bin/bash", f"exec >{q(str(out / 'job.log'))} 2>&1",
             *[f"export {k}={q(v)}" for k, v in b.mpi_env.items()]]
    for step, argv in cmds.items():
        lines += ["t0=$EPOCHREALTIME",
                  f"{shlex.join(argv)} >{q(str(out / step))}.out",
                  f"echo \"{step} $? $t0 $EPOCHREALTIME\" >>{steps}"]
    return "\n".join(lines) + "\n"


def _launch_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("launch")
    except (OSError, ValueError, AttributeError):
        return None


def _pipeline_shell(b: _Bench, i: int, src: Path, size: int, spool_url: str | None) -> dict:
    out = b.work / f"pipeline-shell-{i}"
    out.mkdir(parents=True, exist_ok=True)
    back, dest = out / "back", "bench-shell-pipeline"
    b.site.wipe(b.names, "CHIBA_SCRATCH", dest)
    script = out / "job.sh"
    script.write_text(_pipeline_script(b, out, src, dest, back, spool_url))
    with cpu_meter() as cpu:
        rc, wall, so, se = b.exec(b.cli_argv("--json", "shell", "--nodes", b.nodeset,
                                             str(script)))
    steps, failures = {}, {}
    for ln in (out / "steps").read_text().splitlines() if (out / "steps").exists() else []:
        step, step_rc, t0, t1 = ln.split()
        steps[step] = float(t1) - float(t0)
        if int(step_rc):
            failures[step] = (f"exit {step_rc}: "
                              f"{(out / (step + '.out')).read_text(errors='replace')[-200:]}")
    if rc or len(steps) != 3:
        failures.setdefault("-", (se.strip().splitlines() or [f"exit {rc}"])[-1])
    b.site.wipe(b.names, "CHIBA_SCRATCH", dest)
    b.site.remove_local(back)
    return _row("pipeline", "shell", len(b.names), i, ok=not failures, seconds=wall,
                steps=steps, size_bytes=size, failures=failures, cpu_busy=cpu.busy,
                inner_launch={k: _launch_key(out / f"{k}.out") for k in ("stage", "collect")})


def _pipeline_separate(b: _Bench, i: int, src: Path, size: int) -> dict:
    out = b.work / f"pipeline-separate-{i}"
    out.mkdir(parents=True, exist_ok=True)
    back, dest = out / "back", "bench-shell-pipeline"
    b.site.wipe(b.names, "CHIBA_SCRATCH", dest)
    cmds = {"stage": b.cli_argv("--json", "stage", str(src), "--nodes", b.nodeset, "--dest",
                                dest),
            "program": _hydra_argv(b, [str(MPICH_PYTHON), str(ALLREDUCE)]),
            "collect": b.cli_argv("--json", "collect", dest, "--nodes", b.nodeset, "--dest",
                                  str(back))}
    steps, failures, launches = {}, {}, {}
    t0 = time.monotonic()
    with cpu_meter() as cpu:
        for step, argv in cmds.items():
            rc, wall, so, se = b.exec(argv, b.mpi_env)
            steps[step] = wall
            if step != "program":
                try:
                    launches[step] = json.loads(so).get("launch")
                except ValueError:
                    launches[step] = None
            if rc:
                failures[step] = f"exit {rc}: {(so + se).strip()[-200:]}"
    wall = time.monotonic() - t0
    b.site.wipe(b.names, "CHIBA_SCRATCH", dest)
    b.site.remove_local(back)
    return _row("pipeline", "separate", len(b.names), i, ok=not failures, seconds=wall,
                steps=steps, size_bytes=size, failures=failures, cpu_busy=cpu.busy,
                inner_launch=launches)


# -- the workload ---------------------------------------------------------------------------
def shell(site: Site, *, nodes: int, repeat: int, workdir: Path, commands: int = 20,
          init_runs: int = 3, stage_bytes: int = 1 << 20, methods=COMMAND_METHODS,
          on_run=None) -> list[dict]:
    """The three cases on the first ``nodes`` nodes, ``repeat`` times, methods interleaved
    (module docstring). ``methods``: the ``command`` methods to run (``shell`` always
    runs: it is the job that also measures the shell's MPI_Init); ``init_runs`` 0 leaves
    out the MPICH cases. Returns ``shell`` runs; InvalidRequest for more nodes than the
    site has."""
    names = site.node_names()
    if nodes > len(names):
        raise InvalidRequest(f"{nodes} nodes asked, the site has {len(names)}")
    b = _Bench(site, names[:nodes], workdir)
    runs: list[dict] = []

    def emit(run: dict) -> None:
        runs.append(run)
        if on_run:
            on_run(run)

    mpich = None if MPICH_PYTHON.exists() else (
        "MPICH's venv .venv-mpich is missing (`make .venv-mpich/.installed`)")
    srun_why = _slurm_ready(b) if "srun" in methods else None
    if mpich and init_runs:
        for case, ms in (("mpi_init", INIT_METHODS), ("pipeline", PIPELINE_METHODS)):
            for m in ms:
                emit(_skipped(case, m, nodes, mpich))
    if srun_why:
        emit(_skipped("command", "srun", nodes, srun_why))
    src = data.make_random(workdir / f"shell-payload-{stage_bytes}", stage_bytes)
    for i in range(repeat):
        for r in _shell_job(b, i, commands, 0 if mpich else init_runs):
            emit(r)
        for m in methods:
            if m != "shell" and not (m == "srun" and srun_why):
                emit(_commands(b, m, i, commands))
        if mpich or not init_runs:
            continue
        emit(_hydra_init(b, i, init_runs))
        url, proc = _spool_server(b)
        try:
            emit(_pipeline_shell(b, i, src, stage_bytes, url))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        emit(_pipeline_separate(b, i, src, stage_bytes))
    return runs
