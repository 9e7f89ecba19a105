"""City Transit: tar on the home server, store-and-forward via president and mayors, nodes unpack; and rpdcp-style collect."""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from chiba_admin.errors import InvalidRequest, TransportError
from chiba_admin.outcome import TransferHost, TransferRun
from chiba_admin.progress import Progress, or_silent
from inventory.source import check_collect_name, check_collect_root, check_source
from topology import fold
from topology.confine import HostDest, confine_dest

from .fanout import DEFAULT_FANOUT, window
from .transit_agent import RESULT_TAG, _exists, host_record, list_sockets, node_result
from .transport import Transport, transport_for

__all__ = ["STAGES", "TransitPlan", "TownLeg", "plan_transit", "stage_transit",
           "stage_transit_dry_run", "transit_route", "collect_transit", "agent_argv"]

STAGES = ("pack", "to_president", "to_mayors", "unpack", "cleanup")
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
    confined: dict[str, HostDest] = field(default_factory=dict)  # node -> root + rel
    files: int = 0
    payload: int = 0
    sockets: list = field(default_factory=list)  # Unix sockets of the source (tar skips them)
    job: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def nodes(self) -> list:
        return [n for leg in self.legs for n in leg.nodes]

    @property
    def same_host(self) -> bool:
        """The home server is the president: the tar is on the president's disk once packed."""
        return self.home.name == self.president.name


def _tar_name(source: str) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(source))
    return f"transit-{base[:40] or 'root'}-{uuid.uuid4().hex[:12]}.tar"


def plan_transit(topo, src: str, nodes: list[str], dest: str | None = None) -> TransitPlan:
    """Validate the request and decide routes and paths; raises InvalidRequest on bad input.

    The source is checked (named, exists, no device node) and ``dest`` is confined on every
    node (``topology.confine``: under its scratch or an explicit ``dest_roots`` entry, no
    ``..``, never ``/`` nor a scratch/spool/repository directory) before anything is sent.
    """
    if not nodes:
        raise InvalidRequest("no nodes selected", hint="name nodes like ccn[01-04] or @nodes")
    info = check_source(src)
    source = info.path
    hosts = []
    for n in nodes:
        if n not in topo:
            raise InvalidRequest(f"unknown host {n!r}", where=topo.source,
                             hint="see `chiba-admin topology show`")
        h = topo.host(n)
        if h.role != "node":
            raise InvalidRequest(f"{n} is a {h.role}, not a compute node",
                             hint="City Transit stages onto nodes (e.g. @nodes)")
        hosts.append(h)
    default = os.path.basename(source.rstrip("/")) or None
    confined = {h.name: confine_dest(h, "scratch", dest, default_name=default) for h in hosts}
    dests = {n: d.path for n, d in confined.items()}
    name = _tar_name(source)
    home, pres = topo.home_server, topo.president
    legs = []
    for town, members in topo.towns_of([h.name for h in hosts]).items():
        mayor = topo.host(topo.towns[town])
        legs.append(TownLeg(mayor, [topo.host(m) for m in members],
                            posixpath.join(mayor.spool, name)))
    member = "." if info.is_dir else next(iter(confined.values())).name
    return TransitPlan(source, info.is_dir, member, home, pres, posixpath.join(home.spool, name),
                       posixpath.join(pres.spool, name), legs, dests, confined, info.files,
                       info.bytes, _sockets(source) if info.is_dir else [])


def transit_route(plan: TransitPlan) -> dict:
    """Where City Transit would carry the tar (pure): packed uncompressed on ``from`` (the
    home server), copied to ``via`` (the president; None when it is the home server), then
    to each mayor of ``towns`` (mayor -> its destination nodes), whose nodes unpack it."""
    return {"from": plan.home.name, "via": None if plan.same_host else plan.president.name,
            "towns": {leg.mayor.name: [n.name for n in leg.nodes] for leg in plan.legs}}


def _sockets(source: str) -> list[dict]:
    """The Unix sockets below ``source`` (GNU tar does not archive them; the nodes recreate
    them as rsync -a does): relative path, mode, owner, group, mtime."""
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return list_sockets(fd)
    finally:
        os.close(fd)


# pax keeps mtimes to the nanosecond (as rsync -a does); atime/ctime records are noise
TAR_FORMAT = ["--format=posix", "--pax-option=delete=atime,delete=ctime"]
MAX_CHUNKS = 512  # per-chunk hashes ride in the node's command line: keep it short


def pack_argv(plan: TransitPlan, archive: str, link_dir: str | None = None) -> list[str]:
    """``tar -cf`` of the source, uncompressed as City Transit did; a file may be renamed via a link."""
    if plan.is_dir:
        return ["tar", "-c", "-f", archive, *TAR_FORMAT, "-C", plan.source, "."]
    parent, base = os.path.split(plan.source)
    if base == plan.member or link_dir is None:
        return ["tar", "-c", "-f", archive, *TAR_FORMAT, "-C", parent, "--", base]
    # staged under another name: archive a symlink to it, dereferenced (-h) for this one file
    return ["tar", "-c", "-h", "-f", archive, *TAR_FORMAT, "-C", link_dir, "--", plan.member]


def chunk_hashes(path: str, min_chunk: int = 1 << 20) -> tuple[int, list[str]]:
    """(chunk size in bytes, blake3 hex of each chunk) of the file at ``path``.

    The chunk is at least ``min_chunk`` and large enough for at most MAX_CHUNKS chunks.
    Nodes feed tar only chunks that match (transit_agent._feed_verified).
    """
    import blake3

    size = os.path.getsize(path)
    chunk = max(min_chunk, -(-size // MAX_CHUNKS))
    out = []
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            out.append(blake3.blake3(buf).hexdigest())
    return chunk, out


def agent_argv(topo) -> list[str]:
    """How to start the transit agent on a president or mayor.

    The topology's ``[mpi] python`` names the remote interpreter when set; otherwise this
    one (right for the embedded cluster, the loopback and namespace testbeds).
    """
    python = (topo.mpi or {}).get("python") or sys.executable
    return ["env", f"PYTHONPATH={_REPO_ROOT}", python, "-m", "legacy_transit.transit_agent"]


# --- execution -------------------------------------------------------------------------------
class _Run:
    """Bookkeeping of one staging: stage times and bytes, per-node outcome."""

    def __init__(self, nodes: list[str], progress: Progress | None):
        self.t0 = time.monotonic()
        self.phases = {s: 0.0 for s in STAGES}
        self.phase_bytes = {s: 0 for s in STAGES}
        self.progress = or_silent(progress)
        # stage None: still under way; tree "none" until a node says what it holds
        self.hosts = {n: TransferHost(tree="none", tree_path=None, previous=None)
                      for n in nodes}
        self.failures: dict[str, str] = {}
        self.chunk, self.hashes = 0, []

    def fail(self, node: str, stage: str, reason: str) -> None:
        h = self.hosts[node]
        if h.stage is None:  # the first failure is the one that matters
            h.ok, h.stage, h.error = False, stage, reason
            h.seconds = round(time.monotonic() - self.t0, 6)
            self.failures[node] = f"{stage}: {reason}"
            self.progress.host_done(node, False)

    def pending(self, nodes) -> list:
        return [n for n in nodes if self.hosts[n.name].stage is None]

    def stage(self, name: str, hosts: list[str], *, per_host: bool = False):
        """Time stage ``name`` on ``hosts``; ``per_host``: each of them reports its end."""
        return _Stage(self, name, hosts, per_host)


class _Stage:
    def __init__(self, run: _Run, name: str, hosts: list[str], per_host: bool):
        self.run, self.name, self.hosts, self.per_host = run, name, hosts, per_host

    def __enter__(self):
        self.t = time.monotonic()
        self.run.progress.phase(self.name, hosts=len(self.hosts) if self.per_host else 0)
        return self

    def __exit__(self, *exc):
        self.run.phases[self.name] += time.monotonic() - self.t


def stage_transit(topo, src: str, nodes: list[str], dest: str | None = None, *,
                  fanout: int = DEFAULT_FANOUT, timeout: float | None = None,
                  progress: Progress | None = None, transport: Transport | None = None,
                  replace: bool = False) -> TransferRun:
    """Stage ``src`` onto ``nodes`` the City Transit way; per-host failures are in the result.

    Stages as the paper measured them (pack, to_president, to_mayors, unpack, cleanup).
    Each node unpacks by descriptor into a root-only temporary directory beside its
    destination (only bytes matching the home server's per-chunk hashes reach tar), under
    the destination's lock, then renames the complete tree into place: the result is the
    source tree, replacing what an earlier stage put there. An existing destination that
    no stage made is refused on that node unless ``replace``.

    Returns a TransferRun; ``hosts[node]`` has ``tree`` ("complete", "none", "partial",
    "unknown"), ``tree_path`` and ``previous`` (an earlier tree left as it was), and
    ``outcome`` says in one line which hosts hold what. ``progress`` hears each stage start
    and each node end. Raises InvalidRequest on bad input (nothing sent).
    """
    plan = plan_transit(topo, src, nodes, dest)
    names = [n.name for n in plan.nodes]
    run = _Run(names, progress)
    payload, files = plan.payload, plan.files
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
                run.chunk, run.hashes = chunk_hashes(local_tar)
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
            with run.stage("unpack", [n.name for leg in legs for n in leg.nodes],
                           per_host=True):
                _unpack(topo, plan, legs, transport, run, size, fanout, timeout, replace)
                silent = [n for leg in legs for n in leg.nodes
                          if run.hosts[n.name].tree == "unknown"]
                if silent:  # ask them directly what this run left there
                    _probe(topo, plan, silent, transport, run, fanout)
    finally:
        # 5. clean up: each tar was useful once (the paper's first complaint)
        with run.stage("cleanup", [leg.mayor.name for leg in mayor_tars]):
            _cleanup(plan, mayor_tars, transport, local_tar, run, fanout)
        if own:
            transport.close()
    total = time.monotonic() - run.t0
    for h in run.hosts.values():
        if h.stage is None:
            h.stage = "done"
    _tell_trees(run.hosts, run.failures)
    dests = sorted(set(plan.dests.values()))
    return TransferRun(
        method="transit", ok=not run.failures, source=plan.source,
        dest=dests[0] if len(dests) == 1 else (dest or os.path.basename(plan.source)),
        dests=plan.dests, nodes=names, bytes=size, payload_bytes=payload, files=files,
        seconds=round(total, 6), phases={k: round(v, 6) for k, v in run.phases.items()},
        phase_bytes=run.phase_bytes, hosts=run.hosts, failures=run.failures,
        outcome=outcome(run.hosts, "node"))


def stage_transit_dry_run(topo, src: str, nodes: list[str], dest: str | None = None, *,
                          fanout: int = DEFAULT_FANOUT, timeout: float | None = None,
                          progress: Progress | None = None, transport: Transport | None = None,
                          replace: bool = False) -> TransferRun:
    """What :func:`stage_transit` would do, writing nothing anywhere: a TransferRun with
    ``dry_run`` True and its ``plan`` (:func:`transit_route`).

    The same planning and checks (raising InvalidRequest on bad input); no tar is packed
    (``bytes`` None) and nothing is sent. The home server checks the spool directory the
    tar would be copied to on the president (when it is another host) and on each mayor,
    whose agent then asks each of its nodes what extract would do with its destination
    (``transit_agent check-dest``: reads only, the lock included). A node that would be
    staged has stage "would create ..." or "would replace ..." (what would be made or
    deleted); one that would fail has stage "would fail at STAGE" and the real run's
    failure line (an existing destination without --replace: "unpack: ...", exit 1).
    """
    plan = plan_transit(topo, src, nodes, dest)
    names = [n.name for n in plan.nodes]
    run = _Run(names, progress)
    run.phases = {"check": 0.0}
    own = transport is None
    transport = transport or transport_for(topo)
    try:
        with run.stage("check", names, per_host=True):
            if not plan.same_host:  # the real run copies the tar there first
                err = _spool_missing(transport, plan.president, timeout)
                for n in names if err else []:
                    run.fail(n, "to_president", err)
            legs = [leg for leg in plan.legs if run.pending(leg.nodes)]
            if legs:
                _check_dests(topo, plan, legs, transport, run, fanout, timeout, replace)
    finally:
        if own:
            transport.close()
    _tell_trees(run.hosts, run.failures)
    for h in run.hosts.values():
        if not h.ok and h.stage:  # nothing was sent or unpacked: a forecast
            h.stage = f"would fail at {h.stage}"
    dests = sorted(set(plan.dests.values()))
    return TransferRun(
        method="transit", ok=not run.failures, source=plan.source,
        dest=dests[0] if len(dests) == 1 else (dest or os.path.basename(plan.source)),
        dests=plan.dests, nodes=names, bytes=None, payload_bytes=plan.payload,
        files=plan.files,
        seconds=round(time.monotonic() - run.t0, 6),
        phases={k: round(v, 6) for k, v in run.phases.items()}, hosts=run.hosts,
        failures=run.failures, outcome="dry run: nothing was written on any host",
        dry_run=True, plan=transit_route(plan))


def _spool_missing(transport, host, timeout) -> str | None:
    """Why the real run could not copy its tar into ``host``'s spool directory (missing,
    not a directory, not writable, the host unreachable), or None; reads only."""
    spool = host.local_path(host.spool)
    r = transport.run(host, ["sh", "-c", 'test -d "$1" || exit 3; test -w "$1" || exit 4',
                             "sh", spool], timeout=timeout or 60)
    if r.ok:
        return None
    if r.error is None and r.rc in (3, 4):  # the real run's put says the same
        what = "is missing" if r.rc == 3 else "is not writable"
        return (f"{host.name}: spool directory {host.spool} {what} (run `chiba-admin "
                "cluster init`)")
    return r.reason()


def _check_dests(topo, plan: TransitPlan, legs: list[TownLeg], transport, run: _Run,
                 fanout, timeout, replace: bool) -> None:
    """On every mayor at once: check the spool the tar would be copied to, then run the
    agent, which asks each of the mayor's nodes what extract would do."""
    base = agent_argv(topo)
    by_mayor = {leg.mayor.name: leg for leg in legs}

    def on_mayor(m):
        err = _spool_missing(transport, m, timeout)
        if err:
            return None, err
        kids = []
        for n in by_mayor[m.name].nodes:
            d = plan.confined[n.name]
            spec = {"root": n.local_path(d.root), "rel": d.rel, "display": d.path,
                    "host_root": d.root, "replace": bool(replace)}
            kids.append({"host": host_record(n), "argv": [*base, "check-dest",
                                                          json.dumps(spec)]})
        agent = {"action": "check-dest", "kind": topo.kind, "fanout": fanout,
                 "timeout": timeout, "children": kids}
        return _call_agent(topo, transport, m, agent, timeout, len(kids), fanout)

    for mname, got in window([leg.mayor for leg in legs], on_mayor, len(legs)).items():
        detail, err = got.value if got.ok else (None, got.error)
        for n in by_mayor[mname].nodes:
            d = (detail or {}).get(n.name)
            if d is None:  # the real run's copy to this mayor would fail the same way
                run.fail(n.name, "to_mayors", f"mayor {mname}: {err or 'no result'}")
            elif not d["ok"]:
                run.hosts[n.name].previous = d.get("previous")
                run.fail(n.name, "unpack", d["error"] or f"exit {d['rc']}")
            else:
                h = run.hosts[n.name]
                what = f" ({d['detail']})" if d.get("detail") else ""
                h.ok, h.stage = True, f"would {d['action']}{what}"
                h.seconds = round(time.monotonic() - run.t0, 6)
                run.progress.host_done(n.name, True)


def _tell_trees(hosts: dict[str, TransferHost], failures: dict, where: str = "on it") -> None:
    """Add to each failed host's failure line what it holds now (the truth, per host).

    ``where`` says where the trees are: on the node (stage) or the home server (collect).
    """
    for name, why in list(failures.items()):
        h = hosts.get(name)
        if h is None or h.ok:
            continue
        tree, path = h.tree, h.tree_path
        if tree == "partial":
            note = f"a partial tree is left at {path}"
        elif tree == "unknown":
            note = "no word from it: what it holds is unknown" + (
                f" (a partial tree may be at {path})" if path else "")
        else:
            note = f"nothing of this run is left {where}"
        if h.previous:
            note += f"; {h.previous} is as it was"
        failures[name] = f"{why} [{note}]"


def outcome(hosts: dict[str, TransferHost], what: str = "node") -> str:
    """One line: which hosts hold a complete, partial, unknown or no tree (folded names).

    For collect the trees are the home server's copies, one per host.
    """
    by: dict[str, list[str]] = {}
    for name, h in hosts.items():
        by.setdefault(h.tree or "none", []).append(name)
    parts = []
    for tree, label in (("complete", "complete tree"), ("partial", "PARTIAL tree"),
                        ("unknown", "unknown state"), ("none", "no tree from this run")):
        if by.get(tree):
            parts.append(f"{label} on {fold(sorted(by[tree]))} ({len(by[tree])})")
    return f"{'; '.join(parts)}" if parts else f"no {what}s"


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
        return {m: None if r.ok else str(r.exc) for m, r in got.items()}
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


def node_extract_spec(plan: TransitPlan, node, run: _Run, size: int, timeout,
                      replace: bool, file: str | None) -> dict:
    """What a node's unpacker (transit_agent.extract) is told; JSON in its command line."""
    d = plan.confined[node.name]
    return {"root": node.local_path(d.root), "rel": d.rel, "display": d.path,
            "host_root": d.root, "inner": "." if plan.is_dir else plan.member, "job": plan.job,
            "replace": bool(replace), "timeout": timeout, "input": file or "-",
            "size": size, "chunk": run.chunk, "hashes": run.hashes, "sockets": plan.sockets}


def _tmp_path(plan: TransitPlan, node) -> str:
    """Where a node's unpacker builds the tree before renaming it into place (host path)."""
    d = plan.confined[node.name]
    return posixpath.join(posixpath.dirname(d.path), f".{d.name}.chiba-tmp-{plan.job}")


def _unpack(topo, plan, legs, transport, run: _Run, size: int, fanout, timeout,
            replace: bool = False) -> None:
    """Run the agent on every mayor at once; each fans out to its nodes."""
    t_stage = time.monotonic()
    by_mayor = {leg.mayor.name: leg for leg in legs}
    base = agent_argv(topo)

    def on_mayor(m):
        pend = run.pending(by_mayor[m.name].nodes)
        # embedded: the node's process reads the tar on the mayor's "disk" (the paper's NFS
        # mount); over SSH the mayor streams it into the node's unpacker
        read = topo.kind == "embedded"
        file = m.local_path(by_mayor[m.name].tar)
        agent = {"action": "unpack", "kind": topo.kind, "fanout": fanout, "timeout": timeout,
                 "bytes": size, "file": file, "mode": "read" if read else "stream",
                 "children": [{"host": host_record(n), "argv": [*base, "extract", json.dumps(
                     node_extract_spec(plan, n, run, size, timeout, replace,
                                       file if read else None))]} for n in pend]}
        detail, err = _call_agent(topo, transport, m, agent, timeout, len(pend), fanout)
        return pend, detail, err

    got = window([leg.mayor for leg in legs], on_mayor, len(legs))
    for mname, r in got.items():
        if not r.ok:  # a bug here must not hide the other towns
            pend, detail, err = run.pending(by_mayor[mname].nodes), None, r.error
        else:
            pend, detail, err = r.value
        for n in pend:
            d = (detail or {}).get(n.name)
            h = run.hosts[n.name]
            if d is None:
                h.tree, h.tree_path = "unknown", _tmp_path(plan, n)
                run.fail(n.name, "unpack", f"mayor {mname}: {err or 'no result'}")
                continue
            h.tree, h.tree_path = d.get("tree", "unknown"), d.get("path")
            h.previous = d.get("previous")
            if not d["ok"]:
                run.fail(n.name, "unpack", d["error"] or f"exit {d['rc']}")
            else:
                secs = (t_stage - run.t0) + d["end"]
                h.ok, h.bytes, h.seconds = True, size, round(secs, 6)
                h.throughput_bps = round(size * 8 / secs, 1) if secs else 0.0
                run.phase_bytes["unpack"] += size
                run.progress.host_done(n.name, True)


def _probe(topo, plan, nodes, transport, run: _Run, fanout) -> None:
    """For nodes whose unpacker never answered: is this run's temporary tree there?"""
    base = agent_argv(topo)

    def one(n):
        d = plan.confined[n.name]
        spec = {"root": n.local_path(d.root), "rel": d.rel, "display": d.path, "job": plan.job}
        return node_result(transport.run(n, [*base, "probe", json.dumps(spec)], timeout=60))

    for name, got in window(nodes, one, fanout).items():
        said = got.value if got.ok else None
        if isinstance(said, dict) and said.get("tree") in ("partial", "none"):
            run.hosts[name].tree, run.hosts[name].tree_path = said["tree"], said.get("path")


def _call_agent(topo, transport, host, plan: dict, timeout, children: int, fanout
                ) -> tuple[dict | None, str | None]:
    """Run the agent on ``host``; (per-child detail, None) or (None/partial, reason)."""
    limit = None
    if timeout is not None:  # the agent needs one timeout per window of children, plus start-up
        limit = (timeout + 30) * (math.ceil(children / max(1, fanout)) + 1) + 30
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
            if not r.ok or not r.value.ok:
                why = str(r.exc) if not r.ok else r.value.reason()
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
                    progress: Progress | None = None, transport: Transport | None = None,
                    replace: bool = False, min_free: int | None = None) -> TransferRun:
    """Bring ``path`` from every node to ``dest_dir/<host>/<name>`` like rpdcp: one tar stream per node.

    ``path`` is confined on every node (under its scratch or a ``dest_roots`` entry) before
    anything runs. Each node archives it with its parent opened by descriptor; the home
    server treats the stream as untrusted: it is re-emitted member by member (nothing
    outside ``<name>``, no ``..``, no absolute name, nothing below a symlink, no device
    node) into GNU tar running by descriptor in a root-only temporary directory under
    ``dest_dir/<host>/``, and only a complete tree is renamed into place, under the same
    lock and staged-marker rule as stage (an existing copy not made by collect is refused
    unless ``replace``). Owners, groups, modes and mtimes are kept as ``rsync -a`` keeps
    them. ``dest_dir`` (never a symlink: refused, exit 2) is opened once and every host's
    unpacker writes below that descriptor; what collect makes there is ``0700``. A host
    whose next member would leave less than ``min_free`` bytes (None: the default of
    :func:`inventory.homedir.default_reserve`) free for users on the home file system
    fails, its node's pack ended, nothing of it kept. Returns a TransferRun
    (``hosts[h].tree`` as for stage; ``files`` and ``payload_bytes`` count the regular
    files of the trees collected); raises InvalidRequest on bad input.
    """
    if not nodes:
        raise InvalidRequest("no nodes selected", hint="name nodes like ccn[01-04] or @nodes")
    dest_dir = check_collect_root(dest_dir)
    hosts = []
    for n in nodes:
        if n not in topo:
            raise InvalidRequest(f"unknown host {n!r}", where=topo.source,
                             hint="see `chiba-admin topology show`")
        hosts.append(topo.host(n))
    if path is None or path == "":
        raise InvalidRequest("no PATH given", hint="name a path relative to each node's scratch")
    confined = {h.name: confine_dest(h, "scratch", path, option="PATH") for h in hosts}
    for name in {d.name for d in confined.values()}:
        check_collect_name(name)
    dest_dir = os.path.abspath(dest_dir)
    own = transport is None
    transport = transport or transport_for(topo)
    try:
        return _collect(topo, path, hosts, confined, dest_dir, transport, fanout=fanout,
                        timeout=timeout, progress=progress, replace=replace,
                        min_free=min_free)
    finally:
        if own:
            transport.close()


class _Stopper:
    """The stop of a collect (SIGTERM, Ctrl-C): from then on no host starts, and every host
    under way has its ``cancel`` set, which ends its node's pack (the transport ends the
    command and its processes) and keeps its stream from being committed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._under_way: set[threading.Event] = set()
        self.stopped = False

    def start(self) -> threading.Event | None:
        """A new host's cancel event, or None once stopped (the host does not start)."""
        with self._lock:
            if self.stopped:
                return None
            ev = threading.Event()
            self._under_way.add(ev)
            return ev

    def end(self, ev: threading.Event) -> None:
        with self._lock:
            self._under_way.discard(ev)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            for ev in self._under_way:
                ev.set()


def _collect(topo, path: str, hosts: list, confined: dict[str, HostDest], dest_dir: str,
             transport: Transport, *, fanout: int, timeout: float | None,
             progress: Progress | None, replace: bool, min_free: int | None) -> TransferRun:
    """collect_transit once its input is checked: preflight, then one stream per node."""
    from inventory.beneath import BeneathError
    from inventory.homedir import drop_collect_dir, open_collect_dir

    t0 = time.monotonic()
    refused = _preflight(topo, hosts, confined, transport, fanout, timeout)
    if refused:  # a device node or a symlink on some node: nothing is sent or made here
        return _refused_collect(path, dest_dir, hosts, refused, time.monotonic() - t0)
    try:  # opened once, never through a link: every host's unpacker writes below it
        dfd, made = open_collect_dir(dest_dir, create=True)
    except BeneathError as e:
        raise InvalidRequest(e.what, where=e.path) from None
    except OSError as e:
        raise InvalidRequest(f"cannot create the destination: {e.strerror or e}",
                         where=dest_dir) from None
    tally: dict[str, tuple[int, int]] = {}  # host -> (regular files, their bytes) kept
    try:
        hosts_out = _collect_hosts(topo, hosts, confined, dest_dir, dfd, transport, tally,
                                   fanout=fanout, timeout=timeout, progress=progress,
                                   replace=replace, min_free=min_free)
    finally:
        if made:  # nothing of the run in it (every host failed, or stopped): no trace
            drop_collect_dir(dest_dir, dfd)
        os.close(dfd)
    checked = hosts_out.pop(None)
    failures = {n: f"collect: {h.error}" for n, h in hosts_out.items() if not h.ok}
    _tell_trees(hosts_out, failures, "on the home server")
    total = time.monotonic() - t0
    moved = sum(h.bytes for h in hosts_out.values())
    kept = [tally.get(n, (0, 0)) for n, h in hosts_out.items() if h.ok]
    return TransferRun(
        method="transit", ok=not failures, source=path, dest=dest_dir, dest_dir=dest_dir,
        nodes=[h.name for h in hosts], bytes=moved,
        payload_bytes=sum(b for _, b in kept), files=sum(f for f, _ in kept),
        seconds=round(total, 6),
        phases={"check": round(checked - t0, 6), "collect": round(total - checked + t0, 6)},
        phase_bytes={"collect": moved}, hosts=hosts_out, failures=failures,
        outcome=outcome(hosts_out, "host"))


def _collect_hosts(topo, hosts: list, confined: dict[str, HostDest], dest_dir: str,
                   dfd: int, transport: Transport, tally: dict, *, fanout: int,
                   timeout: float | None, progress: Progress | None, replace: bool,
                   min_free: int | None) -> dict:
    """Every host's TransferHost (and, under None, when the streams began: monotonic);
    ``tally`` gets each host's (regular files, bytes) its unpacker kept."""
    job = uuid.uuid4().hex[:12]
    # appended by us after a node's tar ended well; the node never sees it, so a stream
    # cut short (node failed, killed, timed out) is never committed however it looks
    commit = f"CHIBA-COMMIT-{uuid.uuid4().hex}"
    base = agent_argv(topo)
    home_argv = [sys.executable, "-m", "legacy_transit.transit_agent", "extract"]
    began = time.monotonic()
    progress = or_silent(progress)
    progress.phase("collect", hosts=len(hosts))
    stopper = _Stopper()

    def one(h) -> TransferHost:
        s = time.monotonic()
        cancel = stopper.start()
        if cancel is None:
            return TransferHost.failed("not started: the collect was stopped",
                                       stage="collect", tree="none", tree_path=None,
                                       previous=None)
        try:
            return _collect_one(h, confined[h.name], dest_dir, dfd, transport, cancel,
                                stopper, s, [*base, "pack"], home_argv, tally,
                                {"job": job, "replace": bool(replace), "timeout": timeout,
                                 "commit": commit, "min_free": min_free})
        finally:
            stopper.end(cancel)

    def done(got) -> None:
        progress.host_done(got.host, got.ok and got.value.ok)

    return {None: began, **_stoppable(hosts, one, fanout, done, stopper)}


def _collect_one(h, d: HostDest, dest_dir: str, dfd: int, transport: Transport,
                 cancel: threading.Event, stopper: _Stopper, s: float, pack_argv: list,
                 home_argv: list, tally: dict, common: dict) -> TransferHost:
    """One host: its node's pack streamed into the home unpacker (transit_agent extract,
    DIR passed down as the descriptor ``dfd``). ``cancel`` ends the node's pack: set by a
    stop, or here when the unpacker refused the stream (a member refused, the home file
    system's reserve reached), so that the node does not read the rest for nothing."""
    shown = os.path.join(dest_dir, h.name, d.name)
    spec = {"root": dest_dir, "root_fd": dfd, "rel": f"{h.name}/{d.name}",
            "display": shown, "inner": d.name, "top": d.name, "input": "-", **common}
    # its own session: a Ctrl-C at the terminal must not stop it half-way through
    # renaming a tree into place; the end of its input (with or without the commit
    # token) decides what it does
    untar = subprocess.Popen([*home_argv, json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": _REPO_ROOT}, cwd="/",
                             start_new_session=True, pass_fds=(dfd,))
    moved = [0]
    refused_home = threading.Event()

    def sink(b: bytes) -> None:
        if cancel.is_set():
            return  # stopped or refused: the rest of this node's stream is not unpacked
        moved[0] += len(b)
        try:
            untar.stdin.write(b)
        except (BrokenPipeError, ValueError):
            refused_home.set()  # the home side refused the stream: its result says why
            cancel.set()

    had_dir = _exists(dfd, h.name)
    node_spec = {"root": h.local_path(d.root), "rel": d.rel, "display": d.path,
                 "host_root": d.root}
    r = transport.run(h, [*pack_argv, json.dumps(node_spec)], timeout=common["timeout"],
                      on_stdout=sink, cancel=cancel)
    if r.ok and not cancel.is_set():  # only then may the home side rename it in
        sink(common["commit"].encode())
        moved[0] -= len(common["commit"])
    out, lerr = untar.communicate()  # closes its stdin: end of the stream
    got = node_result(_Out(out)) or {
        "ok": False, "tree": "unknown", "path": None, "previous": None,
        "error": f"the home unpacker printed no result: "
                 f"{(lerr.decode(errors='replace').strip().splitlines() or ['?'])[-1]}"}
    err = None
    if stopper.stopped and not got["ok"]:
        err = "not collected: the collect was stopped while it was under way"
    elif not r.ok and not refused_home.is_set():
        err = f"on {h.name}: {r.reason()}"
    if err is None and not got["ok"]:
        err = f"home: {got['error']}" if refused_home.is_set() or r.ok else \
            f"on {h.name}: {r.reason()}; home: {got['error']}"
    if err and not had_dir and got.get("tree") == "none":
        try:
            os.rmdir(h.name, dir_fd=dfd)  # made for this run and still empty: no trace
        except OSError:
            pass
    tally[h.name] = (int(got.get("files") or 0), int(got.get("bytes") or 0))
    secs = time.monotonic() - s
    return TransferHost(ok=err is None, bytes=moved[0], seconds=round(secs, 6),
                        throughput_bps=round(moved[0] * 8 / secs, 1) if secs else 0.0,
                        stage="done" if err is None else "collect", error=err,
                        tree=got.get("tree"), tree_path=got.get("path"),
                        previous=got.get("previous"))


def _stoppable(hosts: list, one, fanout: int, done, stopper: _Stopper
               ) -> dict[str, TransferHost]:
    """Every host's outcome of ``one`` (a window of ``fanout``), the main thread left free
    to take a SIGTERM or Ctrl-C. Stopped, ``stopper`` stops: no host starts and none is
    committed from then on, and the hosts under way have their nodes' packs ended; once
    they have ended, one line on stderr says which hosts' copies are in place before the
    stop goes on (exit 143 or 130). A second SIGTERM or Ctrl-C meanwhile is ignored (the
    hosts end within moments): the line is still said and nothing half-done is left."""
    got: dict = {}
    ended = threading.Event()  # not Thread.join: one interrupted by a signal marks a
    # live thread as ended (CPython's bpo-45274 fix), and the next join returns at once

    def run() -> None:
        try:
            got.update(window(hosts, one, fanout, done))
        finally:
            ended.set()

    threading.Thread(target=run, name="collect-window", daemon=True).start()
    try:
        while not ended.wait(0.2):
            pass
    except KeyboardInterrupt:
        # Python runs its handlers in the main thread whichever thread the signal reached,
        # so a blocked mask would not hold a second one off: ignore it until the line is said
        before = _ignore_stops()
        try:
            stopper.stop()
            ended.wait()
            from chiba_admin.console import get_err_console

            said = outcome(_host_rows(got), "host")
            get_err_console().print(f"chiba-admin collect: stopped; {said}", markup=False,
                                    highlight=False)
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)
        raise
    return _host_rows(got)


def _ignore_stops() -> dict:
    """Ignore SIGTERM and SIGINT (main thread only); returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}


def _host_rows(got: dict) -> dict[str, TransferHost]:
    return {name: r.value if r.ok else TransferHost.failed(
        r.error, stage="collect", tree="unknown", tree_path=None, previous=None)
        for name, r in got.items()}


def _preflight(topo, hosts: list, confined: dict[str, HostDest], transport, fanout: int,
               timeout: float | None) -> dict[str, str]:
    """Every node checks its PATH (transit_agent check) before any sends: a device node at
    or below it, or a symbolic link at it or on its way below the root, refuses it.

    Returns host -> the line naming its device node or symlink, for the hosts that hold
    one. A node that cannot answer or walk its PATH otherwise (missing, say) is not
    refused here: its pack fails and names it.
    """
    base = agent_argv(topo)

    def one(h) -> dict | None:
        d = confined[h.name]
        spec = {"root": h.local_path(d.root), "rel": d.rel, "display": d.path,
                "host_root": d.root}  # paths in its lines as the host names them
        return node_result(transport.run(h, [*base, "check", json.dumps(spec)],
                                         timeout=timeout))

    said = {name: got.value for name, got in window(hosts, one, fanout).items() if got.ok}
    return {h.name: said[h.name].get("device") or said[h.name]["symlink"] for h in hosts
            if isinstance(said.get(h.name), dict)
            and (said[h.name].get("device") or said[h.name].get("symlink"))}


def _refused_collect(path: str, dest_dir: str, hosts: list, refused: dict[str, str],
                     seconds: float) -> TransferRun:
    """The outcome of a collect refused before anything was sent (the CLI exits 2)."""
    culprits = ", ".join(refused)
    rows = {h.name: TransferHost.failed(refused.get(h.name) or
                                        f"not collected: PATH was refused on {culprits}",
                                        stage="check", tree="none", tree_path=None,
                                        previous=None) for h in hosts}
    return TransferRun(
        method="transit", ok=False, source=path, dest=dest_dir, dest_dir=dest_dir,
        nodes=[h.name for h in hosts], seconds=round(seconds, 6),
        phases={"check": round(seconds, 6)}, phase_bytes={"collect": 0}, hosts=rows,
        failures=dict(refused), refused=True,
        refusal="; ".join(f"{h}: {why}" for h, why in refused.items()))


class _Out:
    """Just enough of a RunResult for node_result()."""

    def __init__(self, stdout: bytes):
        self.out = stdout.decode("utf-8", "replace")
