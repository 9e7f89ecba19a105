"""The testbed's state file: what `up` created, written before each creation, read by `down`."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from chiba_admin.errors import TestbedError
from chiba_admin.procfs import proc_stat

__all__ = ["ProcRecord", "State", "proc_record", "proc_alive", "end_process",
           "STATE_VERSION"]

STATE_VERSION = 1


@dataclass(frozen=True)
class ProcRecord:
    """A process we started, identified by PID *and* start time, so a reused PID is safe."""

    pid: int
    start: int
    cmdline: str

    def to_dict(self) -> dict:
        return {"pid": self.pid, "start": self.start, "cmdline": self.cmdline}

    @classmethod
    def from_dict(cls, d: dict) -> "ProcRecord":
        return cls(int(d["pid"]), int(d["start"]), str(d.get("cmdline", "")))


def _start_time(pid: int) -> int | None:
    st = proc_stat(pid)
    if st is None or st.state == "Z":
        return None  # gone, or a zombie: it has ended, only its parent's wait is missing
    return st.start_ticks


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def proc_record(pid: int) -> ProcRecord:
    """The record of a live process; raises TestbedError when it is gone."""
    st = _start_time(pid)
    if st is None:
        raise TestbedError(f"process {pid} ended right after it started")
    return ProcRecord(pid, st, _cmdline(pid))


def proc_alive(rec: ProcRecord | None) -> bool:
    """True when ``rec``'s process still runs (same PID and same start time)."""
    return rec is not None and _start_time(rec.pid) == rec.start


def end_process(rec: ProcRecord, timeout: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; only if it is still the same process."""
    if not proc_alive(rec):
        return False
    try:
        os.kill(rec.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive(rec):
            return True
        time.sleep(0.02)
    if proc_alive(rec):
        try:
            os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


class State:
    """The JSON state file; every mutation is saved at once (atomically)."""

    def __init__(self, path: Path, data: dict | None = None):
        self.path = Path(path)
        self.data = data if data is not None else {
            "version": STATE_VERSION, "id": None, "phase": "planning", "created": time.time(),
            "namespaces": [], "bridges": [], "veths": [], "dirs_created": [], "disks": [],
            "holders": {}, "sshd": {}, "faults": {}, "plan": None,
        }

    @classmethod
    def load(cls, path: Path) -> "State":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TestbedError("no testbed state file", where=str(path),
                               hint="bring one up with `chiba-admin testbed up` or pass "
                                    "--state DIR") from None
        except (OSError, ValueError) as e:
            raise TestbedError(f"unreadable testbed state file: {e}", where=str(path),
                               hint="remove leftovers by hand: ip netns list | grep chiba-"
                               ) from None
        return cls(path, data)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    # mutations (each saves) -------------------------------------------------------
    def set(self, **kw) -> None:
        self.data.update(kw)
        self.save()

    def add(self, key: str, items: list) -> None:
        self.data.setdefault(key, [])
        for it in items:
            if it not in self.data[key]:
                self.data[key].append(it)
        self.save()

    def set_proc(self, key: str, host: str, rec: ProcRecord | None) -> None:
        if rec is None:
            self.data[key].pop(host, None)
        else:
            self.data[key][host] = rec.to_dict()
        self.save()

    def set_faults(self, host: str, faults: list[str]) -> None:
        if faults:
            self.data["faults"][host] = sorted(set(faults))
        else:
            self.data["faults"].pop(host, None)
        self.save()

    # queries ------------------------------------------------------------------------
    @property
    def id(self) -> str | None:
        return self.data.get("id")

    def proc(self, key: str, host: str) -> ProcRecord | None:
        d = self.data[key].get(host)
        return ProcRecord.from_dict(d) if d else None

    def faults(self, host: str) -> list[str]:
        return list(self.data["faults"].get(host, []))
