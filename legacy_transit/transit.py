"""City Transit: tar on the home server, store-and-forward via president and mayors, nodes unpack; and rpdcp-style collect."""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from chiba_admin.errors import TransportError, UsageError

from .fanout import DEFAULT_FANOUT, window
from .transit_agent import RESULT_TAG, host_record
from .transport import Transport, transport_for

__all__ = ["STAGES", "TransitPlan", "TownLeg", "plan_transit", "stage_transit",
           "collect_transit", "tree_size", "agent_argv"]

STAGES = ("pack", "to_president", "to_mayors", "unpack", "cleanup")
Progress = Callable[..., None] | None
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- planning (pure) -----------------------------------------------------------------------
@dataclass
class TownLeg:
    """One mayor and the destination nodes it serves, with the tar's path on its disk."""

    mayor: object
    nodes: list
    tar: str  # host path on the mayor


@dataclass
class TransitPlan:
    """Everything City Transit will do, decided before any host is touched."""

    source: str
    is_dir: bool
    member: str  # what the archive holds: "." for a directory, the file's dest name otherwise
    home: object
    president: object
    home_tar: str  # host path on the home server
    president_tar: str
    legs: list[TownLeg]
    dests: dict[str, str] = field(default_factory=dict)  # node -> host path of the staged copy

    @property
    def nodes(self) -> list:
        return [n for leg in self.legs for n in leg.nodes]

    def extract_dir(self, node) -> str:
        """Host path the node unpacks into (created first): dest itself, or a file's parent."""
        d = self.dests[node.name]
        return d if self.is_dir else posixpath.dirname(d) or "/"

    @property
    def same_host(self) -> bool:
        """The home server is the president: the tar is on the president's disk once packed."""
        return self.home.name == self.president.name


def _tar_name(source: str) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(source))
    return f"transit-{base[:40] or 'root'}-{uuid.uuid4().hex[:12]}.tar"


def plan_transit(topo, src: str, nodes: list[str], dest: str | None = None) -> TransitPlan:
    """Validate the request and decide routes and paths; raises UsageError on bad input."""
    if not nodes:
        raise UsageError("no nodes selected", hint="name nodes like ccn[01-04] or @nodes")
    if not src:
        raise UsageError("no source path given")
    source = os.path.abspath(src)
    if not os.path.lexists(source):
        raise UsageError("source does not exist", where=source,
                         hint="stage an existing file or directory of the home server")
    hosts = []
    for n in nodes:
        if n not in topo:
            raise UsageError(f"unknown host {n!r}", where=topo.source,
                             hint="see `chiba-admin topology show`")
        h = topo.host(n)
        if h.role != "node":
            raise UsageError(f"{n} is a {h.role}, not a compute node",
                             hint="City Transit stages onto nodes (e.g. @nodes)")
        hosts.append(h)
    is_dir = os.path.isdir(source)
    rel = dest if dest else os.path.basename(source.rstrip("/")) or "root"
    dests = {h.name: h.resolve("scratch", rel) for h in hosts}
    name = _tar_name(source)
    home, pres = topo.home_server, topo.president
    legs = []
    for town, members in topo.towns_of([h.name for h in hosts]).items():
        mayor = topo.host(topo.towns[town])
        legs.append(TownLeg(mayor, [topo.host(m) for m in members],
                            posixpath.join(mayor.spool, name)))
    member = "." if is_dir else posixpath.basename(next(iter(dests.values())))
    return TransitPlan(source, is_dir, member, home, pres, posixpath.join(home.spool, name),
                       posixpath.join(pres.spool, name), legs, dests)


def pack_argv(plan: TransitPlan, archive: str, link_dir: str | None = None) -> list[str]:
    """``tar -cf`` of the source, uncompressed as City Transit did; a file may be renamed via a link."""
    if plan.is_dir:
        return ["tar", "-c", "-f", archive, "-C", plan.source, "."]
    parent, base = os.path.split(plan.source)
    if base == plan.member or link_dir is None:
        return ["tar", "-c", "-f", archive, "-C", parent, base]
    # staged under another name: archive a symlink to it, dereferenced (-h) for this one file
    return ["tar", "-c", "-h", "-f", archive, "-C", link_dir, plan.member]


def agent_argv(topo) -> list[str]:
    """How to start the transit agent on a president or mayor.

    The topology's ``[mpi] python`` names the remote interpreter when set; otherwise this
    one (right for the embedded cluster, the loopback and namespace testbeds).
    """
    python = (topo.mpi or {}).get("python") or sys.executable
    return ["env", f"PYTHONPATH={_REPO_ROOT}", python, "-m", "legacy_transit.transit_agent"]


def tree_size(path: str) -> tuple[int, int]:
    """(bytes of regular files, number of regular files) under ``path`` (or of the file)."""
    if not os.path.isdir(path):
        return os.path.getsize(path), 1
    total = files = 0
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
                files += 1
    return total, files


# --- execution -------------------------------------------------------------------------------
class _Run:
    """Bookkeeping of one staging: stage times and bytes, per-node outcome."""

    def __init__(self, nodes: list[str], progress: Progress):
        self.t0 = time.monotonic()
        self.phases = {s: 0.0 for s in STAGES}
        self.phase_bytes = {s: 0 for s in STAGES}
        self.progress = progress
        self.hosts = {n: {"ok": False, "bytes": 0, "seconds": 0.0, "throughput_bps": 0.0,
                          "stage": None, "error": None} for n in nodes}
        self.failures: dict[str, str] = {}

    def emit(self, event: str, **info) -> None:
        if self.progress is not None:
            self.progress(event, **info)

    def fail(self, node: str, stage: str, reason: str) -> None:
        h = self.hosts[node]
        if h["stage"] is None:  # the first failure is the one that matters
            h.update(ok=False, stage=stage, error=reason,
                     seconds=round(time.monotonic() - self.t0, 6))
            self.failures[node] = f"{stage}: {reason}"

    def pending(self, nodes) -> list:
        return [n for n in nodes if self.hosts[n.name]["stage"] is None]

    def stage(self, name: str, hosts: list[str]):
        return _Stage(self, name, hosts)


class _Stage:
    def __init__(self, run: _Run, name: str, hosts: list[str]):
        self.run, self.name, self.hosts = run, name, hosts

    def __enter__(self):
        self.t = time.monotonic()
        self.run.emit("start", stage=self.name, hosts=self.hosts)
        return self

    def __exit__(self, *exc):
        dt = time.monotonic() - self.t
        self.run.phases[self.name] += dt
        self.run.emit("end", stage=self.name, seconds=dt,
                      bytes=self.run.phase_bytes[self.name],
                      failed=sorted(n for n, h in self.run.hosts.items()
                                    if h["stage"] == self.name))


def stage_transit(topo, src: str, nodes: list[str], dest: str | None = None, *,
                  fanout: int = DEFAULT_FANOUT, timeout: float | None = None,
                  progress: Progress = None, transport: Transport | None = None) -> dict:
    """Stage ``src`` onto ``nodes`` the City Transit way; per-host failures are in the result."""
    plan = plan_transit(topo, src, nodes, dest)
    names = [n.name for n in plan.nodes]
    run = _Run(names, progress)
    payload, files = tree_size(plan.source)
    own = transport is None
    transport = transport or transport_for(topo)
    home, pres = plan.home, plan.president
    local_tar = home.local_path(plan.home_tar)
    size = 0
    mayor_tars: list[TownLeg] = []
    try:
        # 1. pack: an uncompressed tar in the home server's spool (this machine)
        with run.stage("pack", [home.name]):
            err = _pack(plan, local_tar)
            if err:
                for n in names:
                    run.fail(n, "pack", err)
            else:
                size = os.path.getsize(local_tar)
                run.phase_bytes["pack"] = size
        # 2. to the president's disk, when the home server is another machine
        if size and not plan.same_host:
            with run.stage("to_president", [pres.name]):
                try:
                    transport.put(pres, local_tar, plan.president_tar)
                    run.phase_bytes["to_president"] = size
                except TransportError as e:
                    for n in names:
                        run.fail(n, "to_president", str(e))
        # 3. the president pushes to the mayors of the destination towns (barrier after)
        legs = [leg for leg in plan.legs if run.pending(leg.nodes)]
        if legs:
            with run.stage("to_mayors", [leg.mayor.name for leg in legs]):
                pushed = _to_mayors(topo, plan, legs, transport, local_tar, fanout, timeout)
                for leg in legs:
                    err = pushed.get(leg.mayor.name)
                    if err is None:
                        mayor_tars.append(leg)
                        run.phase_bytes["to_mayors"] += size
                    else:
                        for n in leg.nodes:
                            run.fail(n.name, "to_mayors", f"mayor {leg.mayor.name}: {err}")
        # 4. the mayors fan out to their nodes, which unpack the tar read from the mayor
        legs = [leg for leg in mayor_tars if run.pending(leg.nodes)]
        if legs:
            with run.stage("unpack", [n.name for leg in legs for n in leg.nodes]):
                _unpack(topo, plan, legs, transport, run, size, fanout, timeout)
    finally:
        # 5. clean up: each tar was useful once (the paper's first complaint)
        with run.stage("cleanup", [leg.mayor.name for leg in mayor_tars]):
            _cleanup(plan, mayor_tars, transport, local_tar, run, fanout)
        if own:
            transport.close()
    total = time.monotonic() - run.t0
    for n, h in run.hosts.items():
        if h["stage"] is None:
            h["stage"] = "done"
    dests = sorted(set(plan.dests.values()))
    return {
        "method": "transit", "ok": not run.failures, "source": plan.source,
        "dest": dests[0] if len(dests) == 1 else (dest or os.path.basename(plan.source)),
        "dests": plan.dests, "nodes": names, "bytes": size, "payload_bytes": payload,
        "files": files, "seconds": round(total, 6),
        "phases": {k: round(v, 6) for k, v in run.phases.items()},
        "phase_bytes": run.phase_bytes, "hosts": run.hosts, "failures": run.failures,
    }


def _pack(plan: TransitPlan, local_tar: str) -> str | None:
    """Write the archive; returns an error line or None."""
    link_dir = None
    try:
        os.makedirs(os.path.dirname(local_tar), exist_ok=True)
        if not plan.is_dir and os.path.basename(plan.source) != plan.member:
            link_dir = tempfile.mkdtemp(prefix="transit-")
            os.symlink(plan.source, os.path.join(link_dir, plan.member))
        p = subprocess.run(pack_argv(plan, local_tar, link_dir), capture_output=True)
    except OSError as e:
        return f"cannot archive {plan.source} into {local_tar}: {e.strerror or e}"
    finally:
        if link_dir:
            shutil.rmtree(link_dir, ignore_errors=True)
    if p.returncode != 0:
        _unlink(local_tar)
        last = (p.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return f"tar -c of {plan.source} failed (exit {p.returncode}): {last}"
    return None


def _to_mayors(topo, plan, legs, transport, local_tar, fanout, timeout) -> dict[str, str | None]:
    """mayor -> None when it has the tar, else the reason."""
    if plan.same_host:  # we are the president: push from here
        def put(m):
            transport.put(m, local_tar, _leg_of(legs, m).tar)

        got = window([leg.mayor for leg in legs], put, fanout)
        return {m: None if not isinstance(r, BaseException) else str(r)
                for m, r in got.items()}
    # the home server is elsewhere: the president's own agent pushes over the core links
    child = [{"host": host_record(leg.mayor), "remote": leg.tar} for leg in legs]
    agent = {"action": "push", "kind": topo.kind, "fanout": fanout, "timeout": timeout,
             "file": plan.president.local_path(plan.president_tar), "children": child}
    detail, err = _call_agent(topo, transport, plan.president, agent, timeout, len(legs),
                              fanout)
    out = {}
    for leg in legs:
        d = (detail or {}).get(leg.mayor.name)
        out[leg.mayor.name] = err if d is None else (None if d["ok"] else d["error"])
    return out


def _leg_of(legs, mayor) -> TownLeg:
    return next(leg for leg in legs if leg.mayor.name == mayor.name)


def _unpack(topo, plan, legs, transport, run: _Run, size: int, fanout, timeout) -> None:
    """Run the agent on every mayor at once; each fans out to its nodes."""
    t_stage = time.monotonic()
    by_mayor = {leg.mayor.name: leg for leg in legs}

    def on_mayor(m):
        pend = run.pending(by_mayor[m.name].nodes)
        agent = {"action": "unpack", "kind": topo.kind, "fanout": fanout, "timeout": timeout,
                 "bytes": size, "file": m.local_path(by_mayor[m.name].tar),
                 # embedded: the node's process reads the tar on the mayor's "disk" (the
                 # paper's NFS mount); over SSH the mayor streams it into the node's tar -x
                 "mode": "read" if topo.kind == "embedded" else "stream",
                 "children": [{"host": host_record(n), "dest": n.local_path(plan.extract_dir(n))}
                              for n in pend]}
        detail, err = _call_agent(topo, transport, m, agent, timeout, len(pend), fanout)
        return pend, detail, err

    got = window([leg.mayor for leg in legs], on_mayor, len(legs))
    for mname, r in got.items():
        if isinstance(r, BaseException):  # a bug here must not hide the other towns
            for n in run.pending(by_mayor[mname].nodes):
                run.fail(n.name, "unpack", f"mayor {mname}: {type(r).__name__}: {r}")
            continue
        pend, detail, err = r
        for n in pend:
            d = (detail or {}).get(n.name)
            if d is None:
                run.fail(n.name, "unpack", f"mayor {mname}: {err or 'no result'}")
            elif not d["ok"]:
                run.fail(n.name, "unpack", d["error"] or f"exit {d['rc']}")
            else:
                secs = (t_stage - run.t0) + d["end"]
                run.hosts[n.name].update(ok=True, bytes=size, seconds=round(secs, 6),
                                         throughput_bps=round(size * 8 / secs, 1) if secs else 0.0)
                run.phase_bytes["unpack"] += size


def _call_agent(topo, transport, host, plan: dict, timeout, children: int, fanout
                ) -> tuple[dict | None, str | None]:
    """Run the agent on ``host``; (per-child detail, None) or (None/partial, reason)."""
    limit = None
    if timeout is not None:  # the agent needs one timeout per window of children, plus start-up
        limit = timeout * (math.ceil(children / max(1, fanout)) + 1) + 30
    r = transport.run(host, agent_argv(topo), timeout=limit, stdin=json.dumps(plan))
    for line in r.out.splitlines():
        if line.startswith(RESULT_TAG):
            try:
                return json.loads(line[len(RESULT_TAG):])["hosts"], None
            except (ValueError, KeyError):
                break
    return None, r.reason() or "the transit agent printed no result"


def _cleanup(plan, legs, transport, local_tar, run: _Run, fanout) -> None:
    by_mayor = {leg.mayor.name: leg for leg in legs}
    if legs:
        got = window([leg.mayor for leg in legs],
                     lambda m: transport.run(m, ["rm", "-f", "--",
                                                 m.local_path(by_mayor[m.name].tar)]),
                     fanout)
        for m, r in got.items():
            if isinstance(r, BaseException) or not r.ok:
                why = str(r) if isinstance(r, BaseException) else r.reason()
                run.failures[m] = f"cleanup: cannot remove {by_mayor[m].tar}: {why}"
    if not plan.same_host and run.phase_bytes["to_president"]:
        r = transport.run(plan.president, ["rm", "-f", "--",
                                           plan.president.local_path(plan.president_tar)])
        if not r.ok:
            run.failures[plan.president.name] = f"cleanup: {r.reason()}"
    _unlink(local_tar)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- stage-out --------------------------------------------------------------------------
def collect_transit(topo, path: str, nodes: list[str], dest_dir: str, *,
                    fanout: int = DEFAULT_FANOUT, timeout: float | None = None,
                    progress: Progress = None, transport: Transport | None = None) -> dict:
    """Bring ``path`` from every node to ``dest_dir/<host>/`` like rpdcp: one tar stream per node."""
    if not nodes:
        raise UsageError("no nodes selected", hint="name nodes like ccn[01-04] or @nodes")
    if not path:
        raise UsageError("no path given", hint="name a path relative to each node's scratch")
    hosts = []
    for n in nodes:
        if n not in topo:
            raise UsageError(f"unknown host {n!r}", where=topo.source,
                             hint="see `chiba-admin topology show`")
        hosts.append(topo.host(n))
    dest_dir = os.path.abspath(dest_dir)
    try:
        os.makedirs(dest_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the destination: {e.strerror or e}",
                         where=dest_dir) from None
    own = transport is None
    transport = transport or transport_for(topo)
    t0 = time.monotonic()
    if progress is not None:
        progress("start", stage="collect", hosts=[h.name for h in hosts])

    def one(h) -> dict:
        s = time.monotonic()
        remote = h.resolve("scratch", path)
        parent, base = posixpath.split(remote.rstrip("/") or "/")
        out = os.path.join(dest_dir, h.name)
        os.makedirs(out, exist_ok=True)
        untar = subprocess.Popen(["tar", "-x", "-f", "-", "-C", out, "--no-same-owner"],
                                 stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        moved = [0]

        def sink(b: bytes) -> None:
            moved[0] += len(b)
            try:
                untar.stdin.write(b)
            except BrokenPipeError:
                pass

        r = transport.run(h, ["tar", "-c", "-f", "-", "-C", h.local_path(parent or "/"), base],
                          timeout=timeout, on_stdout=sink)
        try:
            untar.stdin.close()
        except BrokenPipeError:
            pass
        lrc = untar.wait()
        lerr = untar.stderr.read().decode(errors="replace").strip()
        untar.stderr.close()
        err = None
        if not r.ok:
            err = r.reason()
        elif lrc != 0:
            err = f"local tar -x into {out} failed: {(lerr.splitlines() or ['?'])[-1]}"
        if err and not os.listdir(out):
            os.rmdir(out)
        secs = time.monotonic() - s
        return {"ok": err is None, "bytes": moved[0], "seconds": round(secs, 6),
                "throughput_bps": round(moved[0] * 8 / secs, 1) if secs else 0.0,
                "stage": "done" if err is None else "collect", "error": err}

    try:
        got = window(hosts, one, fanout)
    finally:
        if own:
            transport.close()
    hosts_out, failures = {}, {}
    for name, r in got.items():
        if isinstance(r, BaseException):
            r = {"ok": False, "bytes": 0, "seconds": 0.0, "throughput_bps": 0.0,
                 "stage": "collect", "error": f"{type(r).__name__}: {r}"}
        hosts_out[name] = r
        if not r["ok"]:
            failures[name] = f"collect: {r['error']}"
    total = time.monotonic() - t0
    moved = sum(h["bytes"] for h in hosts_out.values())
    payload, files = tree_size(dest_dir)
    if progress is not None:
        progress("end", stage="collect", seconds=total, bytes=moved, failed=sorted(failures))
    return {"method": "transit", "ok": not failures, "source": path, "dest_dir": dest_dir,
            "nodes": [h.name for h in hosts], "bytes": moved, "payload_bytes": payload,
            "files": files, "seconds": round(total, 6), "phases": {"collect": round(total, 6)},
            "phase_bytes": {"collect": moved}, "hosts": hosts_out, "failures": failures}

