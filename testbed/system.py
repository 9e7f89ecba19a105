"""Thin wrappers over ip, tc, nsenter and setns(2): the only place the testbed runs system tools."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from chiba_admin.errors import TestbedError

__all__ = ["is_mount_point", "run", "ip_batch", "tc_batch_run", "sysctl_in", "netns_list", "netns_inode",
           "root_cidrs", "processes_in", "nsenter_argv", "in_netns", "require_tools",
           "parallel"]

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 60.0, what: str | None = None) -> subprocess.CompletedProcess:
    """Run ``argv``; on failure raise a one-line TestbedError with the tool's message."""
    try:
        cp = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                            timeout=timeout)
    except FileNotFoundError:
        raise TestbedError(f"{argv[0]} not found", hint="run scripts/install-system-deps.sh"
                           ) from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{what or argv[0]} timed out after {timeout:g}s") from None
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip().splitlines()
        detail = msg[-1] if msg else f"exit {cp.returncode}"
        raise TestbedError(f"{what or ' '.join(argv[:4])} failed: {detail}")
    return cp


def ip_batch(lines: list[str], ns: str | None = None, what: str = "ip -batch") -> None:
    """Run ``ip -batch`` lines, in namespace ``ns`` when given (no fork per line)."""
    if not lines:
        return
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    run(argv, input="\n".join(lines) + "\n", what=f"{what}" + (f" in {ns}" if ns else ""))


def tc_batch_run(lines: list[str], ns: str, what: str = "tc -batch") -> None:
    if lines:
        run(["tc", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
            what=f"{what} in {ns}")


def sysctl_in(ns: str, assignments: list[str]) -> None:
    run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *assignments],
        what=f"sysctl in {ns}")


def is_mount_point(path: str) -> bool:
    """True when ``path`` is a mount point here (also a bind mount on the same fs)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(ln.split()[4] == path for ln in f)
    except OSError:
        return False


def netns_list() -> list[str]:
    try:
        return sorted(p.name for p in _NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_inode(ns: str) -> int | None:
    try:
        return os.stat(_NETNS_DIR / ns).st_ino
    except OSError:
        return None


def root_cidrs() -> list[str]:
    """Every destination routed or addressed in this (the machine's) namespace."""
    out = []
    cp = run(["ip", "-j", "route", "show", "table", "all"], check=False)
    try:
        for r in json.loads(cp.stdout or "[]"):
            dst = r.get("dst", "")
            if dst and dst != "default" and ":" not in dst:
                out.append(dst if "/" in dst else f"{dst}/32")
    except ValueError:
        pass
    cp = run(["ip", "-j", "-4", "addr"], check=False)
    try:
        for link in json.loads(cp.stdout or "[]"):
            for a in link.get("addr_info", []):
                out.append(f"{a['local']}/{a['prefixlen']}")
    except (ValueError, KeyError):
        pass
    return out


def processes_in(inodes: set[int]) -> list[int]:
    """PIDs whose network namespace is one of ``inodes`` (ours), never this process."""
    me = {os.getpid(), os.getppid()}
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in me:
            continue
        try:
            link = os.readlink(f"/proc/{d}/ns/net")
        except OSError:
            continue
        if link.startswith("net:[") and int(link[5:-1]) in inodes:
            found.append(int(d))
    return found


def nsenter_argv(holder_pid: int, cmd: Sequence[str], *, cwd: str | None = None) -> list[str]:
    """argv that runs ``cmd`` in a host's net, mount and UTS namespaces."""
    argv = ["nsenter", "-t", str(holder_pid), "-n", "-m", "-u"]
    if cwd:
        argv.append(f"--wd={cwd}")
    return argv + ["--", *cmd]


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise TestbedError(f"setns failed: {os.strerror(err)}", hint="this needs root")


@contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block (this thread only) in network namespace ``ns``.

    Sockets opened inside keep that namespace afterwards, so a paramiko client connected
    here keeps working; subprocesses started here inherit it. Mounts and hostname stay
    the machine's: use `exec` for a host's full view.
    """
    path = _NETNS_DIR / ns
    try:
        target = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise TestbedError(f"no network namespace {ns}",
                           hint="is the testbed up? see `chiba-admin testbed status`") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def require_tools() -> list[str]:
    """Names of missing tools the testbed needs (empty when all are there)."""
    missing = [t for t in ("ip", "tc", "nsenter", "unshare", "setsid", "mount")
               if shutil.which(t) is None]
    if not os.access("/usr/sbin/sshd", os.X_OK):
        missing.append("/usr/sbin/sshd")
    return missing


def parallel(fn, items: list, workers: int = 8) -> list:
    """``[fn(x) for x in items]`` on a few threads; the first exception is re-raised."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as ex:
        return list(ex.map(fn, items))
