"""Slurm on a running testbed: munged per host, slurmctld on the president, slurmd per node.

Debian's ``slurm-wlm`` (22.05) as users would run it, confined to the testbed: every file
lives under the testbed's state directory (``slurm/`` and each host's ``slurm/``), every
daemon runs inside its host's network, mount and UTS namespaces (so its hostname is the
host's name and its ports are the host's), and each host's munged gets a private
``/run/munge`` (a bind mount inside the host's mount namespace) while all share one key.
What was measured when this was set up (docs: DESIGN "Slurm on the testbed"): a slurmd in
a namespace needs ``cgroup.conf`` with ``CgroupPlugin=cgroup/v1``; a second slurmctld
started against a live configuration kills the first, so `up` refuses when one runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chiba_admin.errors import TestbedError, InvalidRequest

from . import system
from .configs import Layout
from .plan import TestbedPlan, plan_from_dict
from .state import ProcRecord, State, end_process, proc_alive, proc_record

__all__ = ["SlurmLayout", "slurm_conf", "CGROUP_CONF", "MUNGE_DIR", "TOOLS", "up", "down",
           "is_up", "missing_tools", "conf_path"]

Log = Callable[[str], None]
MUNGE_DIR = "/run/munge"  # munged's and libmunge's default socket directory
TOOLS = ("munged", "slurmctld", "slurmd", "sinfo", "salloc", "sbcast")
# The default MessageTimeout (10 s) is shorter than sbcast's star needs on this network:
# with 8 MiB blocks, 4 nodes behind one 20 Mb/s uplink take 13 s a block, and the first
# bring-up measured "Socket timed out on send/recv operation". 100 is Slurm's maximum.
MESSAGE_TIMEOUT = 100
_PID_TIMEOUT = 15.0
_READY_TIMEOUT = 60.0

CGROUP_CONF = "\n".join([
    "# slurmd inside a network/mount namespace: the v1 plugin loads where v2 does not",
    "CgroupPlugin=cgroup/v1",
    "",
])


@dataclass(frozen=True)
class SlurmLayout:
    """Where Slurm's files live under a testbed's state directory."""

    state: Path

    @property
    def root(self) -> Path:
        return self.state / "slurm"

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def key(self) -> Path:
        return self.root / "munge.key"

    @property
    def ctld_dir(self) -> Path:
        return self.root / "ctld"

    @property
    def ctld_pid(self) -> Path:
        return self.root / "slurmctld.pid"

    @property
    def ctld_log(self) -> Path:
        return self.root / "slurmctld.log"

    def host_dir(self, host: str) -> Path:
        """A host's Slurm files (slurmd spool, pid and log; munged's pid and log)."""
        return self.state / "hosts" / host / "slurm"

    def munge_dir(self, host: str) -> Path:
        """What the host sees as /run/munge (its munged's socket)."""
        return self.host_dir(host) / "munge"

    def slurmd_pid(self, host: str) -> Path:
        return self.host_dir(host) / "slurmd.pid"

    def munged_pid(self, host: str) -> Path:
        return self.host_dir(host) / "munged.pid"


def conf_path(state: Path | str) -> Path:
    """The slurm.conf of the testbed at ``state`` (SLURM_CONF for clients)."""
    return SlurmLayout(Path(state).absolute()).conf


def _hosts(plan: TestbedPlan) -> tuple[str, list[str]]:
    pres = next(h.name for h in plan.hosts if h.role == "president")
    return pres, [h.name for h in plan.hosts if h.role == "node"]


def slurm_conf(plan: TestbedPlan, slay: SlurmLayout, *, tree_width: int | None = None,
               message_timeout: int = MESSAGE_TIMEOUT) -> str:
    """The slurm.conf text (pure): controller on the president, one partition of all nodes.

    ``tree_width``: Slurm's TreeWidth (message fan-out; None keeps Slurm's default, 50,
    which makes sbcast a star up to 50 nodes). Raises InvalidRequest for a width under 1.
    """
    if tree_width is not None and tree_width < 1:
        raise InvalidRequest(f"bad Slurm tree width {tree_width}", hint="use 1 or more")
    pres, nodes = _hosts(plan)
    pres_addr = plan.host(pres).address
    hd = str(slay.state / "hosts" / "%n" / "slurm")  # slurmd expands %n to its node name
    lines = [
        f"# testbed {plan.id}: written by `chiba-admin testbed up --slurm`",
        f"ClusterName=chiba{plan.id}",
        f"SlurmctldHost={pres}({pres_addr})",
        # root runs everything, as on the testbed's hosts; no accounting, no cgroups
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={slay.ctld_dir}",
        f"SlurmctldPidFile={slay.ctld_pid}",
        f"SlurmctldLogFile={slay.ctld_log}",
        f"SlurmdSpoolDir={hd}/spool",
        f"SlurmdPidFile={hd}/slurmd.pid",
        f"SlurmdLogFile={hd}/slurmd.log",
        f"PlugStackConfig={slay.root / 'etc' / 'plugstack.conf'}",
        # every slurmd sees this machine's CPUs and memory: trust the configuration
        "SlurmdParameters=config_overrides",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SelectType=select/linear",
        "ReturnToService=2",
        "MailProg=/bin/true",
        f"MessageTimeout={message_timeout}",
    ]
    if tree_width is not None:
        lines.append(f"TreeWidth={tree_width}")
    for n in nodes:
        lines.append(f"NodeName={n} NodeAddr={plan.host(n).address} CPUs=1 State=UNKNOWN")
    lines.append("PartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def missing_tools() -> list[str]:
    """Slurm and munge programs not on PATH (Debian: slurm-wlm, munge)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def _load(state: Path | str) -> tuple[Layout, State, TestbedPlan]:
    lay = Layout(Path(state).absolute())
    st = State.load(lay.state_file)
    if not st.data.get("plan"):
        raise TestbedError("testbed state has no plan (half-finished up?)",
                           where=str(lay.state), hint="take it down and up again")
    return lay, st, plan_from_dict(st.data["plan"])


def _procs(st: State) -> dict[str, ProcRecord]:
    return {k: ProcRecord.from_dict(v) for k, v in (st.data.get("slurm") or {}).items()}


def is_up(state: Path | str) -> bool:
    """True when any Slurm or munge daemon started for the testbed at ``state`` runs."""
    lay = Layout(Path(state).absolute())
    if not lay.state_file.is_file():
        return False
    return any(proc_alive(r) for r in _procs(State.load(lay.state_file)).values())


def _holder(st: State, host: str) -> int:
    rec = st.proc("holders", host)
    if not proc_alive(rec):
        raise TestbedError(f"the namespaces of {host} are gone",
                           hint="take the testbed down and up again")
    return rec.pid


def _ns_argv(st: State, host: str, cmd: list[str]) -> list[str]:
    return system.nsenter_argv(_holder(st, host), cmd)


def _daemon(st: State, host: str, cmd: list[str], pidfile: Path, log: Path, key: str,
            what: str) -> None:
    """Start a self-daemonizing ``cmd`` in ``host``'s namespaces; record it from its pid file.

    Its output goes to a file, not a pipe: a daemon that kept our pipe would hang us.
    """
    pidfile.unlink(missing_ok=True)
    with open(log, "ab") as out:
        cp = subprocess.run(_ns_argv(st, host, cmd), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, timeout=60)
    if cp.returncode != 0:
        raise TestbedError(f"{what} did not start (exit {cp.returncode}): {_last(log)}",
                           where=host)
    deadline = time.monotonic() + _PID_TIMEOUT
    while True:
        try:
            rec = proc_record(int(pidfile.read_text().split()[0]))
            break
        except (OSError, ValueError, IndexError, TestbedError):
            if time.monotonic() > deadline:
                raise TestbedError(f"{what} wrote no pid file: {_last(log)}", where=host,
                                   hint=f"see {log}") from None
            time.sleep(0.02)
    slurm = dict(st.data.get("slurm") or {})
    slurm[key] = rec.to_dict()
    st.set(slurm=slurm)


def _last(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _write_files(plan: TestbedPlan, slay: SlurmLayout, tree_width: int | None) -> None:
    (slay.root / "etc").mkdir(parents=True, exist_ok=True)
    slay.ctld_dir.mkdir(exist_ok=True)
    slay.conf.write_text(slurm_conf(plan, slay, tree_width=tree_width))
    (slay.root / "etc" / "cgroup.conf").write_text(CGROUP_CONF)
    (slay.root / "etc" / "plugstack.conf").write_text("")
    slay.key.unlink(missing_ok=True)
    # munged refuses a key others can read
    fd = os.open(slay.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    pres, nodes = _hosts(plan)
    for h in [pres, *nodes]:
        slay.munge_dir(h).mkdir(parents=True, exist_ok=True)
        (slay.host_dir(h) / "spool").mkdir(exist_ok=True)


def _refuse_second(st: State, plan: TestbedPlan) -> None:
    """InvalidRequest when a Slurm daemon of ours, or any slurmctld, runs on the president."""
    if any(proc_alive(r) for r in _procs(st).values()):
        raise InvalidRequest(f"Slurm is already up on testbed {plan.id}",
                         where=str(Path(st.path).parent),
                         hint="a second slurmctld would kill the first; take the testbed "
                              "down and up again")
    pres, _ = _hosts(plan)
    ino = system.netns_inode(plan.host(pres).ns)
    for pid in system.processes_in({ino} if ino else set()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "slurmctld":
            raise InvalidRequest(f"a slurmctld (pid {pid}) already runs on {pres}",
                             hint="a second one would kill it; stop it first")


def up(state: Path | str, *, tree_width: int | None = None, log: Log | None = None) -> float:
    """Start munged on the president and every node, slurmctld on the president and a
    slurmd per node, then wait until every node is idle. Returns the seconds it took.

    Raises InvalidRequest (tools missing, Slurm already up) before anything starts;
    TestbedError naming the host when a daemon fails (what started is stopped again).
    """
    missing = missing_tools()
    if missing:
        raise InvalidRequest(f"Slurm on the testbed needs {', '.join(missing)}",
                         hint="run scripts/install-system-deps.sh as root (slurm-wlm, munge)")
    log = log or (lambda m: None)
    lay, st, plan = _load(state)
    _refuse_second(st, plan)
    t0 = time.monotonic()
    slay = SlurmLayout(lay.state)
    pres, nodes = _hosts(plan)
    st.set(slurm={}, slurm_mounts=[])
    if not os.path.exists(MUNGE_DIR):
        st.add("dirs_created", [MUNGE_DIR])  # removed by `down` once no testbed needs it
        os.makedirs(MUNGE_DIR, exist_ok=True)
    try:
        _write_files(plan, slay, tree_width)
        for h in [pres, *nodes]:
            st.add("slurm_mounts", [h])
            system.run(_ns_argv(st, h, ["mount", "--bind", str(slay.munge_dir(h)),
                                        MUNGE_DIR]), what=f"binding {MUNGE_DIR} on {h}")
            d = slay.host_dir(h)
            _daemon(st, h, ["munged", f"--key-file={slay.key}",
                            f"--pid-file={slay.munged_pid(h)}",
                            f"--log-file={d / 'munged.log'}",
                            f"--seed-file={d / 'munged.seed'}"],
                    slay.munged_pid(h), d / "munged.out", f"munged@{h}", "munged")
        log(f"munged on {1 + len(nodes)} hosts ({time.monotonic() - t0:.1f}s)")
        _daemon(st, pres, ["slurmctld", "-f", str(slay.conf)], slay.ctld_pid,
                slay.root / "slurmctld.out", "slurmctld", "slurmctld")
        for n in nodes:
            _daemon(st, n, ["slurmd", "-f", str(slay.conf)], slay.slurmd_pid(n),
                    slay.host_dir(n) / "slurmd.out", f"slurmd@{n}", "slurmd")
        _wait_idle(st, plan, slay)
    except BaseException:
        down(lay.state)
        raise
    secs = time.monotonic() - t0
    st.set(slurm_up_seconds=round(secs, 2))
    log(f"Slurm up: slurmctld on {pres}, {len(nodes)} slurmd ({secs:.1f}s)")
    return secs


def _wait_idle(st: State, plan: TestbedPlan, slay: SlurmLayout) -> None:
    pres, nodes = _hosts(plan)
    argv = _ns_argv(st, pres, ["env", f"SLURM_CONF={slay.conf}", "sinfo", "-h", "-N",
                               "-o", "%N %T"])
    deadline = time.monotonic() + _READY_TIMEOUT
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
        states = dict(ln.split(None, 1) for ln in cp.stdout.splitlines() if " " in ln)
        if all(states.get(n) == "idle" for n in nodes):
            return
        time.sleep(0.1)
    bad = [f"{n} {states.get(n, 'unknown')}" for n in nodes if states.get(n) != "idle"]
    raise TestbedError(f"{len(bad)} slurmd not idle after {_READY_TIMEOUT:g}s: {bad[0]}",
                       where=bad[0].split()[0], hint=f"see {slay.host_dir(bad[0].split()[0])}")


def down(state: Path | str) -> int:
    """Stop every recorded Slurm and munge daemon (slurmd, slurmctld, then munged), undo
    the /run/munge binds of hosts still up, remove Slurm's files. Returns processes ended."""
    lay = Layout(Path(state).absolute())
    if not lay.state_file.is_file():
        return 0
    st = State.load(lay.state_file)
    procs = _procs(st)
    ended = 0
    # slurmds before the controller (no node is marked down in its state), munged last
    # (the others authenticate their goodbyes through it); each stage at once
    for stage in ("slurmd@", "slurmctld", "munged@"):
        recs = [r for k, r in procs.items() if k.startswith(stage)]
        ended += sum(system.parallel(end_process, recs, workers=16))
    st.set(slurm={})
    for h in st.data.get("slurm_mounts") or []:
        rec = st.proc("holders", h) if h in st.data.get("holders", {}) else None
        if proc_alive(rec):
            system.run(system.nsenter_argv(rec.pid, ["umount", MUNGE_DIR]), check=False)
    st.set(slurm_mounts=[])
    slay = SlurmLayout(lay.state)
    shutil.rmtree(slay.root, ignore_errors=True)
    hosts = lay.state / "hosts"
    if hosts.is_dir():
        for hd in hosts.iterdir():
            shutil.rmtree(hd / "slurm", ignore_errors=True)
    return ended
