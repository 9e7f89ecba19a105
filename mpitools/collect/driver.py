"""Stage-out (collect) the MPI way, from the CLI side: check the home directory, launch one
rank per node plus rank 0 on the home server, report per host."""

from __future__ import annotations

import os
import secrets
import time

from chiba_admin.errors import InvalidRequest
from chiba_admin.outcome import TransferRun
from chiba_admin.progress import Progress, or_silent

from mpitools.common.archive import COMPRESSIONS, clean_stale
from mpitools.common.launch import LaunchResult, launch, rank_hosts
from mpitools.common.runtime import encode_job
from mpitools.common.faults import from_environ  # tests inject faults
from mpitools.common.targets import (check_nodes, confine_all, host_rows,
                                     launch_failures)
from mpitools.stage.driver import DEFAULT_CHUNK

__all__ = ["collect_mpi", "check_collect_dest"]


def check_collect_dest(dest_dir: str, names: dict[str, str], replace: bool) -> None:
    """Refuse (InvalidRequest, exit 2) a home-server ``DIR`` that is not a directory, and a
    ``DIR/<host>/<name>`` that exists but was not made by collect (unless ``replace``) or
    whose ``DIR/<host>`` is a symlink or a file. Touches nothing."""
    import stat

    from inventory.beneath import was_staged

    from inventory.source import check_collect_root

    check_collect_root(dest_dir)
    if os.path.lexists(dest_dir) and not os.path.isdir(dest_dir):
        raise InvalidRequest("--dest exists and is not a directory", where=dest_dir,
                         hint="name a directory (it is made when missing)")
    if not os.path.isdir(dest_dir):
        return
    for host, name in names.items():
        hdir = os.path.join(dest_dir, host)
        try:
            st = os.lstat(hdir)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidRequest("exists and is not a directory (a symlink is not followed)",
                             where=hdir, hint="remove it or pick another --dest")
        fd = os.open(hdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.path.lexists(os.path.join(hdir, name)) and not replace \
                    and not was_staged(fd, name):
                raise InvalidRequest("exists and was not created by chiba-admin collect",
                                 where=os.path.join(hdir, name),
                                 hint="pass --replace to replace it, or pick another --dest")
        finally:
            os.close(fd)


def _clean_collect(dest_dir: str, names: dict[str, str]) -> None:
    """After a killed collect: remove its dead temp dirs (and lock-free leftovers) now."""
    for host, name in names.items():
        try:
            fd = os.open(os.path.join(dest_dir, host), os.O_RDONLY | os.O_DIRECTORY
                         | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            clean_stale(fd, name)
        finally:
            os.close(fd)


def collect_mpi(topo, path: str, nodes: list[str], dest_dir: str, *,
                chunk: int = DEFAULT_CHUNK, compress: str = "zstd",
                timeout: float | None = None, progress: Progress | None = None,
                window: int = 4, env: dict[str, str] | None = None,
                replace: bool = False) -> TransferRun:
    """Bring every node's ``path`` back to ``dest_dir/<host>/<name>`` on the home server.

    Rank 0 runs on the home server (an extra rank) and unpacks at most ``window`` nodes'
    streams at a time; each host's copy is moved in only when complete and verified.
    ``path`` is confined below each node's scratch (option PATH); InvalidRequest (exit 2)
    before any launch for a refused path, a ``dest_dir`` that is a file, or an existing
    ``dest_dir/<host>/<name>`` not made by collect (unless ``replace``). A device node
    below any node's ``path`` refuses the whole collect before anything is sent:
    ``refused`` (exit 2), ``refusal`` one line naming each such host and device, nothing
    created on the home server. ``progress`` hears one phase ("collect") with bytes done.
    """
    nodes = check_nodes(topo, nodes)
    home = topo.home_server.name
    if home in nodes:
        raise InvalidRequest(f"{home} is the home server; collect brings data to it",
                         hint="select only the hosts to collect from")
    if compress not in COMPRESSIONS:
        raise InvalidRequest(f"unknown compression {compress!r}", hint="zstd, gzip or none")
    paths = confine_all(topo, nodes, path if path is not None else "", None, option="PATH")
    names = {h: d["rel"].rpartition("/")[2] for h, d in paths.items()}
    dest_dir = os.path.abspath(dest_dir)
    check_collect_dest(dest_dir, names, replace)
    t0 = time.time()
    ranks = rank_hosts(topo, nodes, home)
    job = {"jobid": secrets.token_hex(6), "compress": compress, "chunk": int(chunk),
           "hash_alg": "blake3", "hosts": ranks, "paths": paths, "out_dir": dest_dir,
           "names": names, "window": window, "replace": bool(replace), **from_environ(),
           # the town of each rank: rank 0 spreads its window over the towns, so that
           # each town's shared uplink carries one stream, not the whole window's
           "towns": [topo.host(h).town for h in ranks]}
    progress = or_silent(progress)
    progress.phase("collect", hosts=len(nodes))

    def on_event(ev: dict) -> None:
        if ev.get("event") == "progress":
            progress.advance(ev.get("done") or 0)
            progress.note(f"collected {ev.get('hosts_done')}/{ev.get('hosts')} hosts")

    try:
        res = launch(topo, "mpitools.collect.ranks", [encode_job(job)], ranks[1:], home,
                     timeout=timeout, on_event=on_event, env=env)
    except KeyboardInterrupt:
        _clean_collect(dest_dir, names)
        raise
    out = TransferRun(method="mpi", algorithm=f"window{window}", source=path, dest=dest_dir,
                      dest_dir=dest_dir, nodes=ranks[1:], phases={}, kind=topo.kind)
    if not _collect_hosts(out, res, home):
        _clean_collect(dest_dir, names)  # rank 0 ran on this machine: tidy its temp dirs
        out.failures = launch_failures(res, ranks[1:], timeout)
        out.error = res.describe()
        out.mpiexec_stderr = res.stderr.splitlines()[-30:]
    out.phase_bytes = {"collect": out.bytes}
    out.seconds = time.time() - t0
    out.phases["total"] = out.seconds
    return out


def _collect_hosts(out: TransferRun, res: LaunchResult, home: str) -> bool:
    """Fill ``out`` from the job's reports; False when the job gave none (out untouched
    but for the launch time). ok only when every host is, mpiexec ended well and rank 0
    had no error of its own (named under ``home``)."""
    if res.launch_seconds() is not None:
        out.phases["launch"] = res.launch_seconds()
    r = res.result
    if r is None or r.get("reports") is None or not (r["reports"] or r.get("error")):
        return False
    out.phases.update(r.get("phases", {}))
    out.phases["exit"] = res.exit_seconds()
    reports = r["reports"]
    out.hosts = host_rows(reports)
    out.failures = {x["host"]: x["error"] for x in reports
                    if x.get("error") and x.get("primary", True)}
    refused = {x["host"]: x["error"] for x in reports if x.get("refused")}
    if refused:  # a device node below PATH: nothing was sent (the CLI exits 2)
        out.refused = True
        out.refusal = "; ".join(f"{h}: {why}" for h, why in refused.items())
    if r.get("error"):
        out.failures[home] = r["error"]
        out.error = r["error"]
    out.ok = bool(r["ok"]) and res.returncode == 0 and not r.get("error")
    out.bytes = sum(x["bytes"] for x in reports)
    out.payload_bytes = sum(x.get("payload_bytes") or 0 for x in reports)
    out.files = sum(x.get("files") or 0 for x in reports)
    out.peak_rss = max([x.get("maxrss") or 0 for x in reports] + [r.get("maxrss_root") or 0])
    return True
