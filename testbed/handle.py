"""`Testbed`: a handle on a running testbed for tests and benchmarks (exec, ssh, MPI, counters)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Sequence

from chiba_admin.errors import TestbedError, InvalidRequest

from .counters import Snapshot, counters, measure, snapshot
from . import faults as _faults
from . import lifecycle, slurm as _slurm, system
from .configs import PRTE_IF, Layout
from .plan import TestbedPlan, plan_from_dict
from .state import State, proc_alive

__all__ = ["Testbed", "Cmd", "MPIEXEC", "mpiexec_argv", "open_testbed"]

Cmd = str | Sequence[str]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def _argv(cmd: Cmd) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]


def mpiexec_argv(ssh_config: str | Path, subnet: str, hosts: dict[str, int],
                 cmd: Sequence[str], *, mpiexec: str = MPIEXEC,
                 env: Sequence[str] = ("PATH",), extra: Sequence[str] = ()) -> list[str]:
    """The mpiexec command line (pure) that runs ``cmd`` on testbed ``hosts`` over SSH.

    Run it inside the president's namespaces (``Testbed.exec("pres", argv)``). MPI's TCP
    traffic is held to the testbed subnet, PRRTE's out-of-band traffic to each host's
    primary NIC (eth0, see configs.PRTE_IF); ssh gets our ssh_config.
    """
    argv = [mpiexec, "--allow-run-as-root",
            "--host", ",".join(f"{h}:{n}" for h, n in hosts.items()),
            "--mca", "plm_ssh_args", f"-F {ssh_config}",
            "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", subnet,
            "--prtemca", "prte_if_include", PRTE_IF,
            "--bind-to", "none"]
    for var in env:
        argv += ["-x", var]
    return argv + list(extra) + list(cmd)


class Testbed:
    """A running testbed found from its state directory.

    ``exec(host, cmd)`` runs in the host's namespaces (network, mount, hostname) as a
    process on this machine; ``ssh_argv`` goes through the host's sshd instead;
    ``netns(host)`` moves only this thread's network namespace (for paramiko in-process).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, state: str | Path | None = None):
        self.layout = Layout(Path(state or lifecycle.default_state_dir()).absolute())
        self._state = State.load(self.layout.state_file)
        if not self._state.data.get("plan"):
            raise TestbedError("testbed state has no plan (half-finished up?)",
                               where=str(self.layout.state),
                               hint="run `chiba-admin testbed down` and up again")
        self.plan: TestbedPlan = plan_from_dict(self._state.data["plan"])

    # files ---------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        return self.layout.state

    @property
    def topology_file(self) -> Path:
        return self.layout.topology_file

    @property
    def ssh_config(self) -> Path:
        return self.layout.ssh_config

    @property
    def identity_file(self) -> Path:
        return self.layout.identity

    @property
    def known_hosts(self) -> Path:
        return self.layout.known_hosts

    @property
    def slurm_conf(self) -> Path:
        """The testbed's slurm.conf (exists while `up --slurm` runs it)."""
        return _slurm.conf_path(self.state)

    def slurm_up(self) -> bool:
        """True when Slurm's daemons started by `up --slurm` run."""
        return _slurm.is_up(self.state)

    @property
    def subnet(self) -> str:
        return self.plan.subnet

    @property
    def id(self) -> str:
        return self.plan.id

    # hosts ---------------------------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        return [h.name for h in self.plan.hosts]

    def hosts_by_role(self, role: str) -> list[str]:
        return [h.name for h in self.plan.hosts if h.role == role]

    @property
    def president(self) -> str:
        return self.hosts_by_role("president")[0]

    def address(self, host: str) -> str:
        return self.plan.host(host).address

    def namespace(self, host: str) -> str:
        return self.plan.host(host).ns

    def topology(self):
        from topology import load_topology

        return load_topology(self.topology_file)

    def _holder(self, host: str) -> int:
        self.plan.host(host)
        st = State.load(self.layout.state_file)
        rec = st.proc("holders", host)
        if not proc_alive(rec):
            raise TestbedError(f"the namespaces of {host} are gone",
                               where=str(self.layout.state),
                               hint="see `chiba-admin testbed status`")
        return rec.pid

    # running things --------------------------------------------------------------------
    def exec_argv(self, host: str, cmd: Cmd) -> list[str]:
        """argv running ``cmd`` in ``host``'s namespaces (str: through sh -c)."""
        cwd = os.getcwd() if os.path.isdir(os.getcwd()) else "/"
        return system.nsenter_argv(self._holder(host), _argv(cmd), cwd=cwd)

    def exec(self, host: str, cmd: Cmd, *, check: bool = False, timeout: float | None = 120,
             input: str | None = None, env: dict | None = None,
             capture: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` and wait; text output captured unless ``capture=False``."""
        kw = {"capture_output": True} if capture else {}
        if input is None:
            kw["stdin"] = subprocess.DEVNULL  # ssh and mpiexec must not read our stdin
        cp = subprocess.run(self.exec_argv(host, cmd), text=True, timeout=timeout,
                            input=input, env=env, **kw)
        if check and cp.returncode != 0:
            err = (cp.stderr or "").strip().splitlines()
            raise TestbedError(f"command failed with exit {cp.returncode}: "
                               f"{err[-1] if err else cmd}", where=host)
        return cp

    def popen(self, host: str, cmd: Cmd, **kw) -> subprocess.Popen:
        """Start ``cmd`` on ``host`` without waiting (``subprocess.Popen`` keywords)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.exec_argv(host, cmd), **kw)

    def ssh_argv(self, host: str, cmd: Cmd) -> list[str]:
        """``ssh -F ssh_config HOST CMD``; run it from a testbed host (e.g. via exec)."""
        remote = cmd if isinstance(cmd, str) else " ".join(map(_shq, cmd))
        return ["ssh", "-F", str(self.ssh_config), host, remote]

    def netns(self, host: str) -> AbstractContextManager:
        """``with tb.netns("pres"):`` this thread's sockets/subprocesses use pres's network."""
        return system.in_netns(self.namespace(host))

    def mpiexec_argv(self, hosts: dict[str, int] | Sequence[str], cmd: Sequence[str], *,
                     extra: Sequence[str] = (), env: Sequence[str] = ("PATH",)) -> list[str]:
        """The mpiexec line for ``hosts`` (name -> slots, or names with 1 slot each)."""
        if not isinstance(hosts, dict):
            hosts = {h: 1 for h in hosts}
        for h in hosts:
            self.plan.host(h)
        return mpiexec_argv(self.ssh_config, self.subnet, hosts, cmd, env=env, extra=extra)

    # counters and faults -----------------------------------------------------------------
    def counters(self) -> dict:
        return counters(self.state)

    def snapshot(self) -> Snapshot:
        return snapshot(self.state)

    def measure(self):
        """``with tb.measure() as m: ...``; then ``m.delta``, ``m.infrastructure``."""
        return measure(self.state)

    def fault(self, host: str, kind: str) -> str:
        return _faults.fault(self.state, host, kind)

    def heal(self, host: str) -> list[str]:
        return _faults.heal(self.state, host)

    def status(self) -> dict:
        return lifecycle.status(self.state)

    def down(self, keep_data: bool = False) -> dict:
        return lifecycle.down(self.state, keep_data=keep_data)

    def __repr__(self) -> str:
        return f"Testbed({self.id}, {len(self.hosts)} hosts, {self.subnet}, {self.state})"


def _shq(s: str) -> str:
    import shlex

    return shlex.quote(str(s))


def open_testbed(state: str | Path | None = None) -> Testbed:
    if not Layout(Path(state or lifecycle.default_state_dir())).state_file.is_file():
        raise InvalidRequest("no testbed here", where=str(state or lifecycle.default_state_dir()),
                         hint="bring one up with `chiba-admin testbed up` or pass --state DIR")
    return Testbed(state)
