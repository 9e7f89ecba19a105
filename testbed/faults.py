"""Fault injection on testbed hosts (cable pulled, sshd killed, disk full) and healing."""

from __future__ import annotations

import shlex
from pathlib import Path

from chiba_admin.errors import TestbedError, InvalidRequest

from . import system
from .configs import Layout
from .lifecycle import default_state_dir, start_sshd
from .plan import HostPlan, TestbedPlan, plan_from_dict
from .state import State, end_process, proc_alive

__all__ = ["FAULTS", "fault", "heal", "fault_commands"]

FAULTS = ("link-down", "kill-sshd", "fill-disk")
_FILL_SIZE = "1m"
_FILL_TAG = "chiba-fill"


def _load(state_dir) -> tuple[Layout, State, TestbedPlan]:
    lay = Layout(Path(state_dir or default_state_dir()).absolute())
    st = State.load(lay.state_file)
    if st.data.get("phase") != "up" or not st.data.get("plan"):
        raise TestbedError(f"testbed is not up (phase {st.data.get('phase')})",
                           where=str(lay.state), hint="run `chiba-admin testbed up`")
    return lay, st, plan_from_dict(st.data["plan"])


def _scratch(h: HostPlan) -> str:
    """The host path of ``h``'s scratch (its data dir is .../data/scratch)."""
    return next(t for t, src in h.mounts if src.endswith("/data/scratch"))


def fault_commands(plan: TestbedPlan, h: HostPlan, kind: str, down: bool = True
                   ) -> list[list[str]]:
    """The argv lists (pure) that inject (``down``) or undo a link or disk fault."""
    if kind == "link-down":
        # the switch-side port goes down: the host sees NO-CARRIER but keeps its
        # addresses and routes, as when a cable is pulled
        state = "down" if down else "up"
        return [["ip", "-n", plan.switch_ns, "link", "set", n.port, state] for n in h.nics]
    if kind == "fill-disk":
        target = _scratch(h)
        if down:
            fill = (f"dd if=/dev/zero of={shlex.quote(target)}/.chiba-fill bs=64k "
                    "2>/dev/null; sync; true")
            return [["mount", "-t", "tmpfs", "-o", f"size={_FILL_SIZE}", _FILL_TAG, target],
                    ["sh", "-c", fill]]
        return [["umount", "-l", target]]
    raise InvalidRequest(f"unknown fault {kind!r}", hint=f"use one of {', '.join(FAULTS)}")


def fault(state_dir, host: str, kind: str) -> str:
    """Inject ``kind`` on ``host``; returns a one-line description."""
    if kind not in FAULTS:
        raise InvalidRequest(f"unknown fault {kind!r}", hint=f"use one of {', '.join(FAULTS)}")
    lay, st, plan = _load(state_dir)
    h = plan.host(host)
    if kind in st.faults(host):
        raise InvalidRequest(f"{host} already has fault {kind}",
                         hint=f"heal it first: chiba-admin testbed heal {host}")
    # recorded first, so `heal` and `down` know about a half-done fault
    st.set_faults(host, st.faults(host) + [kind])
    if kind == "kill-sshd":
        end_process(st.proc("sshd", host))
        return f"{host}: sshd killed"
    holder = st.proc("holders", host)
    for argv in fault_commands(plan, h, kind):
        if kind == "fill-disk":
            argv = ["nsenter", "-t", str(holder.pid), "-m", "--", *argv]
        system.run(argv, what=f"{kind} on {host}")
    if kind == "link-down":
        return f"{host}: link down ({', '.join(n.ifname for n in h.nics)} lost carrier)"
    return f"{host}: {_scratch(h)} is a full {_FILL_SIZE} tmpfs"


def heal(state_dir, host: str) -> list[str]:
    """Undo every fault of ``host`` and restart its sshd if it is not running."""
    lay, st, plan = _load(state_dir)
    h = plan.host(host)
    healed = []
    holder = st.proc("holders", host)
    if not proc_alive(holder):
        raise TestbedError(f"the namespaces of {host} are gone; heal cannot restore them",
                           hint="take the testbed down and up again")
    for kind in st.faults(host):
        if kind in ("link-down", "fill-disk"):
            for argv in fault_commands(plan, h, kind, down=False):
                if kind == "fill-disk":
                    argv = ["nsenter", "-t", str(holder.pid), "-m", "--", *argv]
                system.run(argv, check=False, what=f"healing {kind} on {host}")
        healed.append(kind)
    if not proc_alive(st.proc("sshd", host)):
        st.set_proc("sshd", host, start_sshd(h, lay, st))
        if "kill-sshd" not in healed:
            healed.append("sshd restarted")
    st.set_faults(host, [])
    return healed
