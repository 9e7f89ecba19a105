"""Bring a testbed up, take it down, report its status: the executor of a TestbedPlan."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from chiba_admin.errors import TestbedError, InvalidRequest
from topology import Topology, loads_topology

from . import configs, slurm as _slurm, system
from .configs import Layout
from .plan import (HostPlan, TestbedPlan, choose_octet, generated_topology_toml,
                   host_batch, host_sysctls, new_testbed_id, plan_testbed, switch_batch,
                   switch_tc_batch, tc_batch)
from .state import ProcRecord, State, end_process, proc_alive, proc_record

__all__ = ["up", "down", "status", "default_state_dir", "generated_topology",
           "start_sshd", "is_up"]

Log = Callable[[str], None]
_HOLDER_TIMEOUT = 20.0
_SSHD_TIMEOUT = 15.0
# Each host's data lives on its own tmpfs by default, as real hosts have their own disks.
# Sharing the machine's disk made one host's work everyone's: on a journal-less ext4,
# creating a file scans the inodes deleted in the last minute, and a full sync to 8 mayors
# after a wipe spent a third of its CPU there (transfer 11-12 s against 6.8 s on tmpfs).
DISKS = ("tmpfs", "dir")
DEFAULT_DISK_SIZE = "2G"


def default_state_dir() -> Path:
    """$CHIBA_TESTBED_STATE, else ~/.local/state/chiba-admin/testbed."""
    env = os.environ.get("CHIBA_TESTBED_STATE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "chiba-admin" / "testbed"


def generated_topology(towns: int, nodes_per_town: int, node_bps: float,
                       mayor_bps: float, uplink_bps: float | None = None) -> Topology:
    """A generated Chiba-shaped topology (rates in bits/s; uplink default: node rate)."""
    return loads_topology(generated_topology_toml(towns, nodes_per_town, node_bps, mayor_bps,
                                                  uplink_bps=uplink_bps),
                          source="<testbed --towns>")


def _anything_left(st: State) -> bool:
    have = set(system.netns_list())
    if any(ns in have for ns in st.data["namespaces"]):
        return True
    return any(proc_alive(ProcRecord.from_dict(d))
               for key in ("holders", "sshd") for d in st.data[key].values())


def is_up(state_dir: Path) -> bool:
    """True when ``state_dir`` holds a testbed with any namespace or process still there."""
    f = Layout(Path(state_dir)).state_file
    return f.is_file() and _anything_left(State.load(f))


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InvalidRequest(f"testbed {what} needs root (network namespaces, tc, sshd)",
                         hint="run it as root, e.g. sudo chiba-admin testbed " + what)
    missing = system.require_tools()
    if missing:
        raise InvalidRequest(f"testbed {what} needs {', '.join(missing)}",
                         hint="run scripts/install-system-deps.sh as root")


def up(topo: Topology, state_dir: Path | str | None = None, *, node_bps: float | None = None,
       mayor_bps: float | None = None, uplink_bps: float | None = None,
       log: Log | None = None,
       rollback: bool = True, disk: str = "tmpfs",
       disk_size: str = DEFAULT_DISK_SIZE, slurm: bool = False) -> TestbedPlan:
    """Create the testbed for ``topo`` under ``state_dir``; return its plan.

    ``disk``: "tmpfs" gives each host's data directory its own tmpfs of at most
    ``disk_size``; "dir" keeps it on the state directory's filesystem.
    ``slurm``: also start Slurm (testbed.slurm: munged per host, slurmctld on the
    president, a slurmd per node).
    On failure everything created so far is removed again (unless ``rollback`` is false;
    then `down` removes it, guided by the state file written before each step).
    """
    _require_root("up")
    if slurm and _slurm.missing_tools():
        raise InvalidRequest(f"testbed up --slurm needs {', '.join(_slurm.missing_tools())}",
                         hint="run scripts/install-system-deps.sh as root (slurm-wlm, munge)")
    if disk not in DISKS:
        raise InvalidRequest(f"unknown disk kind {disk!r}", hint="use tmpfs or dir")
    if not re.fullmatch(r"[1-9][0-9]*[kmgKMG]?|[1-9][0-9]?%", disk_size):
        raise InvalidRequest(f"bad disk size {disk_size!r}",
                         hint="a tmpfs size such as 512M, 2G or 10% (of RAM)")
    log = log or (lambda msg: None)
    lay = Layout(Path(state_dir or default_state_dir()).absolute())
    if lay.state_file.is_file():
        old = State.load(lay.state_file)
        if _anything_left(old):
            raise InvalidRequest(f"testbed {old.id} is already up", where=str(lay.state),
                             hint=f"take it down first: chiba-admin testbed down --state "
                                  f"{lay.state}")
        lay.state_file.unlink()
    taken = {ns.split("-")[1] for ns in system.netns_list() if ns.startswith("chiba-")
             and ns.count("-") >= 2}
    plan = plan_testbed(topo, new_testbed_id(taken), choose_octet(system.root_cidrs()),
                        lay.state, node_bps=node_bps, mayor_bps=mayor_bps,
                        uplink_bps=uplink_bps)
    created_state = not lay.state.exists()
    lay.state.mkdir(parents=True, exist_ok=True)
    st = State(lay.state_file)
    st.set(id=plan.id, plan=plan.to_dict(), state_created=created_state,
           subnet=plan.subnet, prefix=plan.prefix, topology_source=topo.source,
           disk=disk, disk_size=disk_size if disk == "tmpfs" else None)
    try:
        _bring_up(plan, topo, lay, st, log)
        if slurm:
            _slurm.up(lay.state, log=log)
    except BaseException:
        if rollback:
            log("failed; removing what was created")
            try:
                down(lay.state)
            except Exception:
                pass
        raise
    return plan


def _bring_up(plan: TestbedPlan, topo: Topology, lay: Layout, st: State, log: Log) -> None:
    t0 = time.monotonic()
    _write_files(plan, topo, lay, st)
    _make_mount_points(plan, st)
    log(f"files written ({time.monotonic() - t0:.1f}s)")

    if not system.is_mount_point("/run/netns"):
        # `ip netns add` turns /run/netns into a mount point; undo that in `down` too
        st.set(netns_mount_created=True)
        if not os.path.exists("/run/netns"):
            st.add("dirs_created", ["/run/netns"])
    st.add("namespaces", plan.namespaces)
    system.ip_batch([f"netns add {ns}" for ns in plan.namespaces], what="creating namespaces")
    system.parallel(lambda h: system.sysctl_in(h.ns, host_sysctls(h)), list(plan.hosts))
    system.sysctl_in(plan.switch_ns, host_sysctls(None))
    log(f"{len(plan.namespaces)} namespaces ({time.monotonic() - t0:.1f}s)")

    st.add("bridges", list(plan.bridges))
    st.add("veths", [n.port for h in plan.hosts for n in h.nics])
    system.ip_batch(switch_batch(plan), plan.switch_ns, what="wiring the switch")
    system.tc_batch_run(switch_tc_batch(plan), plan.switch_ns, what="shaping switch ports")

    def wire(h: HostPlan) -> None:
        system.ip_batch(host_batch(h), h.ns, what=f"addressing {h.name}")
        system.tc_batch_run(tc_batch(h), h.ns, what=f"shaping {h.name}")

    system.parallel(wire, list(plan.hosts))
    log(f"links wired and shaped ({time.monotonic() - t0:.1f}s)")

    st.set(phase="starting")
    for h, rec in zip(plan.hosts, system.parallel(lambda h: _start_holder(h, lay),
                                                  list(plan.hosts))):
        st.set_proc("holders", h.name, rec)
    for h, rec in zip(plan.hosts, system.parallel(lambda h: start_sshd(h, lay, st),
                                                  list(plan.hosts))):
        st.set_proc("sshd", h.name, rec)
    log(f"{len(plan.hosts)} hosts with sshd ({time.monotonic() - t0:.1f}s)")
    _check_reachable(plan)
    lay.topology_file.write_text(configs.testbed_toml(plan, topo, lay))
    st.set(phase="up", up_seconds=round(time.monotonic() - t0, 2))
    log(f"up in {time.monotonic() - t0:.1f}s")


def _write_files(plan: TestbedPlan, topo: Topology, lay: Layout, st: State) -> None:
    lay.ssh_dir.mkdir(exist_ok=True)
    (lay.state / "etc").mkdir(exist_ok=True)
    priv, pub = configs.generate_ed25519(f"chiba-testbed-{plan.id}")
    lay.identity.write_text(priv)
    lay.identity.chmod(0o600)
    Path(str(lay.identity) + ".pub").write_text(pub + "\n")
    lay.authorized_keys.write_text(pub + "\n")
    pubs = {}
    for h in plan.hosts:
        d = lay.host_dir(h.name)
        if st.data.get("disk") == "tmpfs":
            _mount_disk(d / "data", f"chiba-{plan.id}-{h.name}", st.data["disk_size"], st)
        for _, src in h.mounts:
            Path(src).mkdir(parents=True, exist_ok=True)
        hpriv, hpub = configs.generate_ed25519(f"root@{h.name}")
        lay.host_key(h.name).write_text(hpriv)
        lay.host_key(h.name).chmod(0o600)
        Path(str(lay.host_key(h.name)) + ".pub").write_text(hpub + "\n")
        pubs[h.name] = hpub
        lay.sshd_config(h.name).write_text(configs.sshd_config(h, lay))
        d.mkdir(exist_ok=True)
    lay.known_hosts.write_text(configs.known_hosts(plan, pubs))
    lay.ssh_config.write_text(configs.ssh_config(plan, lay))
    lay.etc_hosts.write_text(configs.etc_hosts(plan))
    lay.bashrc.write_text(configs.BASHRC)


def _mount_disk(path: Path, name: str, size: str, st: State) -> None:
    """A tmpfs at ``path`` (recorded before mounting, so `down` finds it after a crash)."""
    path.mkdir(parents=True, exist_ok=True)
    st.add("disks", [str(path)])
    system.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", name, str(path)],
               what=f"mounting a {size} tmpfs on {path}")


def _unmount_disks(st: State, keep_data: bool) -> int:
    """Unmount each host's tmpfs; with ``keep_data`` its files are copied to disk first."""
    n = 0
    for d in st.data.get("disks", []):
        path = Path(d)
        if not system.is_mount_point(d):
            continue
        if keep_data:
            kept = path.with_name(path.name + ".kept")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(path, kept, symlinks=True)
        if system.run(["umount", d], check=False).returncode:
            # busy (a shell's cwd): detach it now, the kernel frees it when released
            system.run(["umount", "-l", d], what=f"unmounting {d}")
        n += 1
        if keep_data:
            path.rmdir()
            kept.rename(path)
    return n


def _make_mount_points(plan: TestbedPlan, st: State) -> None:
    """Create missing mount points (and sshd's privilege-separation dir) on the root fs."""
    wanted = sorted({t for h in plan.hosts for t, _ in h.mounts} | {"/run/sshd"})
    for target in wanted:
        missing = []
        p = Path(target)
        while not p.exists():
            missing.append(str(p))
            p = p.parent
        if missing:
            st.add("dirs_created", list(reversed(missing)))
            Path(target).mkdir(parents=True, exist_ok=True)


def _start_holder(h: HostPlan, lay: Layout) -> ProcRecord:
    argv = ["setsid", "-f", "ip", "netns", "exec", h.ns, "unshare", "--uts", "--mount",
            "--propagation", "private", "sh", "-c", configs.holder_script(h, lay)]
    with open(lay.holder_log(h.name), "w") as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=err, text=True)
        try:
            out, _ = p.communicate(timeout=_HOLDER_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            raise TestbedError(f"namespace setup of {h.name} hung",
                               where=str(lay.holder_log(h.name))) from None
    words = out.split()
    if len(words) != 2 or words[0] != "ready":
        detail = lay.holder_log(h.name).read_text().strip().splitlines()
        raise TestbedError(f"namespace setup of {h.name} failed: "
                           f"{detail[-1] if detail else 'no output'}",
                           where=str(lay.holder_log(h.name)))
    return proc_record(int(words[1]))


def start_sshd(h: HostPlan, lay: Layout, st: State) -> ProcRecord:
    """Start ``h``'s sshd inside its holder's namespaces and wait until it listens."""
    holder = st.proc("holders", h.name)
    if not proc_alive(holder):
        raise TestbedError(f"the namespaces of {h.name} are gone",
                           hint="take the testbed down and up again")
    pidfile = lay.sshd_pid(h.name)
    pidfile.unlink(missing_ok=True)
    argv = ["setsid", "-f", *system.nsenter_argv(holder.pid, [
        "/usr/sbin/sshd", "-D", "-f", str(lay.sshd_config(h.name)),
        "-E", str(lay.sshd_log(h.name))])]
    # stdio to /dev/null: sshd outlives this call and must not hold our pipes open
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    deadline = time.monotonic() + _SSHD_TIMEOUT
    while time.monotonic() < deadline:
        # sshd writes its PidFile only once it listens
        try:
            pid = int(pidfile.read_text().split()[0])
            return proc_record(pid)
        except (OSError, ValueError, IndexError):
            time.sleep(0.02)
    log = lay.sshd_log(h.name)
    detail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    raise TestbedError(f"sshd of {h.name} did not start: {detail[0] if detail else 'no log'}",
                       where=str(log))


def _check_reachable(plan: TestbedPlan) -> None:
    """Every host's sshd answers from the president: proves addresses, routes, forwarding."""
    pres = next(h for h in plan.hosts if h.role == "president")
    bad = []
    with system.in_netns(pres.ns):
        for h in plan.hosts:
            try:
                with socket.create_connection((h.address, 22), timeout=5) as s:
                    s.recv(4)
            except OSError as e:
                bad.append(f"{h.name} ({h.address}): {e}")
    if bad:
        raise TestbedError(f"{len(bad)} hosts unreachable from {pres.name}: {bad[0]}")


def down(state_dir: Path | str | None = None, *, keep_data: bool = False,
         log: Log | None = None) -> dict:
    """Remove exactly what `up` recorded; returns counts of what was removed."""
    _require_root("down")
    log = log or (lambda msg: None)
    lay = Layout(Path(state_dir or default_state_dir()).absolute())
    st = State.load(lay.state_file)
    st.set(phase="stopping")
    # Slurm first: its daemons live in the hosts' namespaces and write under the state
    ended = _slurm.down(lay.state)
    st = State.load(lay.state_file)
    for key in ("sshd", "holders"):
        for host in list(st.data[key]):
            if end_process(st.proc(key, host)):
                ended += 1
            st.set_proc(key, host, None)
    have = set(system.netns_list())
    mine = [ns for ns in st.data["namespaces"] if ns in have]
    inodes = {i for i in (system.netns_inode(ns) for ns in mine) if i is not None}
    # whatever still runs in our namespaces was started through our sshds (stray ranks,
    # shells): it is ours, and it would keep the namespaces and mounts alive
    strays = system.processes_in(inodes)
    for pid in strays:
        rec = _maybe_record(pid)
        if rec:
            end_process(rec, timeout=1.0)
    if mine:
        system.run(["ip", "-force", "-batch", "-"], check=False,
                   input="".join(f"netns del {ns}\n" for ns in mine))
    left = [ns for ns in mine if ns in set(system.netns_list())]
    if left:
        raise TestbedError(f"could not delete namespaces {', '.join(left)}",
                           hint="check `ip netns pids NAME` and retry down")
    if st.data.get("netns_mount_created") and not system.netns_list() \
            and system.is_mount_point("/run/netns"):
        system.run(["umount", "/run/netns"], check=False)
    removed_dirs = _remove_mount_points(st)
    # the namespaces that bound these disks are gone, so nothing holds them any more
    disks = _unmount_disks(st, keep_data)
    _remove_state(lay, st, keep_data)
    log(f"removed {len(mine)} namespaces, ended {ended + len(strays)} processes")
    return {"namespaces": len(mine), "processes": ended + len(strays),
            "dirs": removed_dirs, "disks": disks, "id": st.id}


def _maybe_record(pid: int) -> ProcRecord | None:
    try:
        return proc_record(pid)
    except TestbedError:
        return None


def _remove_mount_points(st: State) -> int:
    # another testbed may bind onto the same paths (an rmdir would unmount them there)
    others = [ns for ns in system.netns_list() if ns.startswith("chiba-")
              and not ns.startswith(st.data.get("prefix") or "\0")]
    if others:
        return 0
    n = 0
    for d in reversed(st.data["dirs_created"]):
        try:
            os.rmdir(d)
            n += 1
        except OSError:
            pass  # not empty or already gone: leave it
    return n


def _remove_state(lay: Layout, st: State, keep_data: bool) -> None:
    for name in ("testbed.toml", "ssh", "etc"):
        p = lay.state / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    hosts = lay.state / "hosts"
    if hosts.is_dir():
        if keep_data:
            for hd in hosts.iterdir():
                for f in hd.iterdir():
                    if f.name != "data":
                        shutil.rmtree(f) if f.is_dir() else f.unlink()
        else:
            shutil.rmtree(hosts, ignore_errors=True)
    lay.state_file.unlink(missing_ok=True)
    if st.data.get("state_created") and not keep_data:
        try:
            lay.state.rmdir()
        except OSError:
            pass


def status(state_dir: Path | str | None = None) -> dict:
    """Per-host liveness (namespace, holder, sshd), faults and the testbed's files."""
    lay = Layout(Path(state_dir or default_state_dir()).absolute())
    st = State.load(lay.state_file)
    have = set(system.netns_list())
    plan = st.data.get("plan") or {}
    hosts = []
    for h in plan.get("hosts", []):
        hosts.append({
            "host": h["name"], "role": h["role"], "town": h["town"],
            "address": h["nics"][0]["address"], "namespace": h["ns"] in have,
            "holder": proc_alive(st.proc("holders", h["name"])),
            "sshd": proc_alive(st.proc("sshd", h["name"])),
            "faults": st.faults(h["name"]),
        })
    healthy = bool(hosts) and all(h["namespace"] and h["holder"] and h["sshd"]
                                  and not h["faults"] for h in hosts)
    return {"id": st.id, "phase": st.data.get("phase"), "state": str(lay.state),
            "subnet": st.data.get("subnet"), "topology_file": str(lay.topology_file),
            "disk": st.data.get("disk", "dir"), "disk_size": st.data.get("disk_size"),
            "ssh_config": str(lay.ssh_config), "healthy": healthy,
            "slurm": _slurm.is_up(lay.state),
            "up_seconds": st.data.get("up_seconds"), "hosts": hosts}
