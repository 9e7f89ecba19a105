"""The City Transit agent run on a president or mayor: fans out to its children, prints one JSON line.

This is the recursive pdsh of the paper: the president runs this on each mayor (``python -m
legacy_transit.transit_agent`` through the transport, the plan as JSON on stdin); the mayor
fans out to its nodes and compacts their exit codes into its own, as pdsh forced. Unlike
pdsh it also prints the per-child detail as one JSON line, so the report can name the host.
Imports stay lean (no topology, no networkx): this starts once per mayor per stage.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

__all__ = ["AgentHost", "host_record", "unpack_command", "run_plan", "main", "RESULT_TAG"]

RESULT_TAG = "CHIBA-TRANSIT-RESULT "  # marks the one line the caller parses


@dataclass
class AgentHost:
    """The few Host attributes a transport needs, rebuilt from JSON on the far side."""

    name: str
    root: str = ""
    address: str | None = None
    ssh: SimpleNamespace = field(default_factory=SimpleNamespace)
    env: dict = field(default_factory=dict)

    @property
    def connect_address(self) -> str:
        return self.address or self.name

    def local_path(self, host_path: str) -> str:
        if not self.root:
            return str(host_path)
        return os.path.join(self.root, str(host_path).lstrip("/"))

    def environment(self) -> dict[str, str]:
        return dict(self.env)


def host_record(host) -> dict:
    """A Host (or AgentHost) as JSON-able data for the agent's plan."""
    ssh = host.ssh
    keys = ("user", "port", "identity_file", "known_hosts", "host_key_policy",
            "connect_timeout", "config_file")
    return {"name": host.name, "root": getattr(host, "root", ""),
            "address": getattr(host, "address", None),
            "ssh": {k: getattr(ssh, k, None) for k in keys}, "env": host.environment()}


def _from_record(d: dict) -> AgentHost:
    return AgentHost(d["name"], d.get("root") or "", d.get("address"),
                     SimpleNamespace(**d.get("ssh") or {}), dict(d.get("env") or {}))


def unpack_command(dest_dir: str, archive: str | None = None) -> str:
    """``mkdir -p DEST && tar -xf ARCHIVE|- -C DEST --no-same-owner`` quoted for a POSIX shell."""
    mk = shlex.join(["mkdir", "-p", "--", dest_dir])
    tar = shlex.join(["tar", "-x", "-f", archive or "-", "-C", dest_dir, "--no-same-owner"])
    return f"{mk} && {tar}"


def run_plan(plan: dict) -> dict:
    """Carry out one level of the fan-out; returns {"rc", "seconds", "hosts": {...}}."""
    from .fanout import compact_rc, window
    from .transport import UNREACHABLE, RunResult, transport_for

    t0 = time.monotonic()
    action = plan["action"]
    timeout = plan.get("timeout")
    children = [(_from_record(c["host"]), c) for c in plan["children"]]
    by_name = {h.name: c for h, c in children}
    transport = transport_for(plan["kind"])

    def one(h: AgentHost) -> dict:
        c = by_name[h.name]
        s = time.monotonic()
        why = None
        if action == "push":
            try:
                n = transport.put(h, plan["file"], c["remote"])
                r = RunResult(h.name, 0)
            except Exception as e:  # TransportError names the host and path
                n, r = 0, RunResult(h.name, UNREACHABLE, error=str(e))
        elif action == "unpack":
            if plan.get("mode") == "read":  # the node reads the tar from its mayor's disk
                r = transport.run(h, unpack_command(c["dest"], plan["file"]), timeout=timeout)
            else:  # the mayor streams the tar into the node's tar -x
                with open(plan["file"], "rb") as f:
                    r = transport.run(h, unpack_command(c["dest"]), timeout=timeout, stdin=f)
            n = plan.get("bytes", 0) if r.ok else 0
            if not r.ok and "Wrote only" in r.err:
                # GNU tar reports ENOSPC as a short write without saying why
                why = f"{r.reason()} (short write: no space left on {c['dest']}?)"
        else:
            raise ValueError(f"unknown action {action!r}")
        return {"ok": r.ok, "rc": UNREACHABLE if r.error else r.rc, "error": why or r.reason() or None,
                "bytes": n, "seconds": round(time.monotonic() - s, 6),
                "end": round(time.monotonic() - t0, 6)}

    try:
        got = window([h for h, _ in children], one, int(plan.get("fanout", 32)))
    finally:
        transport.close()
    hosts = {}
    for name, r in got.items():
        if isinstance(r, BaseException):
            r = {"ok": False, "rc": UNREACHABLE, "error": f"{type(r).__name__}: {r}",
                 "bytes": 0, "seconds": 0.0, "end": round(time.monotonic() - t0, 6)}
        hosts[name] = r
    return {"rc": compact_rc(h["rc"] for h in hosts.values()),
            "seconds": round(time.monotonic() - t0, 6), "hosts": hosts}


def main(argv: list[str] | None = None) -> int:
    """Read the plan from stdin, run it, print one tagged JSON line, exit with the compacted rc."""
    try:
        plan = json.load(sys.stdin)
        result = run_plan(plan)
    except Exception as e:  # the caller fails every child of this level with this reason
        sys.stderr.write(f"transit agent on {os.environ.get('CHIBA_HOST', '?')}: "
                         f"{type(e).__name__}: {e}\n")
        return 255
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
    return min(int(result["rc"]), 255)


if __name__ == "__main__":
    sys.exit(main())
