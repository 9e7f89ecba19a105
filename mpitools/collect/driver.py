"""Stage-out (collect) the MPI way, from the CLI side: check the home directory, launch one
rank per node plus rank 0 on the home server, report per host."""

from __future__ import annotations

import os
import secrets
import time

from chiba_admin.errors import InvalidRequest

from mpitools.common.archive import COMPRESSIONS, clean_stale
from mpitools.common.launch import launch, rank_hosts
from mpitools.common.runtime import encode_job
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
                timeout: float | None = None, progress=None, window: int = 4,
                env: dict[str, str] | None = None, replace: bool = False) -> dict:
    """Bring every node's ``path`` back to ``dest_dir/<host>/<name>`` on the home server.

    Rank 0 runs on the home server (an extra rank) and unpacks at most ``window`` nodes'
    streams at a time; each host's copy is moved in only when complete and verified.
    ``path`` is confined below each node's scratch (option PATH); InvalidRequest (exit 2)
    before any launch for a refused path, a ``dest_dir`` that is a file, or an existing
    ``dest_dir/<host>/<name>`` not made by collect (unless ``replace``). A device node
    below any node's ``path`` refuses the whole collect before anything is sent:
    ``result["refused"]`` (exit 2), ``result["refusal"]`` one line naming each such host
    and device, nothing created on the home server.
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
           "names": names, "window": window, "replace": bool(replace),
           # the town of each rank: rank 0 spreads its window over the towns, so that
           # each town's shared uplink carries one stream, not the whole window's
           "towns": [topo.host(h).town for h in ranks]}

    def on_event(ev: dict) -> None:
        if ev.get("event") == "progress" and progress is not None:
            progress.update(ev.get("done"), None,
                            f"collected {ev.get('hosts_done')}/{ev.get('hosts')} hosts")

    try:
        res = launch(topo, "mpitools.collect.ranks", [encode_job(job)], ranks[1:], home,
                     timeout=timeout, on_event=on_event, env=env)
    except KeyboardInterrupt:
        _clean_collect(dest_dir, names)
        raise
    result = {"method": "mpi", "algorithm": f"window{window}", "ok": False, "source": path,
              "dest": dest_dir, "dest_dir": dest_dir, "nodes": ranks[1:], "bytes": 0,
              "payload_bytes": 0, "files": 0, "seconds": 0.0, "phases": {}, "phase_bytes": {},
              "hosts": {}, "failures": {}, "kind": topo.kind}
    if res.launch_seconds() is not None:
        result["phases"]["launch"] = res.launch_seconds()
    r = res.result
    if r is not None and r.get("reports") is not None and (r["reports"] or r.get("error")):
        result["phases"].update(r.get("phases", {}))
        result["phases"]["exit"] = res.exit_seconds()
        reports = r["reports"]
        result["hosts"] = host_rows(reports)
        result["failures"] = {x["host"]: x["error"] for x in reports
                              if x.get("error") and x.get("primary", True)}
        refused = {x["host"]: x["error"] for x in reports if x.get("refused")}
        if refused:  # a device node below PATH: nothing was sent (the CLI exits 2)
            result["refused"] = True
            result["refusal"] = "; ".join(f"{h}: {why}" for h, why in refused.items())
        if r.get("error"):
            result["failures"][home] = r["error"]
            result["error"] = r["error"]
        result["ok"] = bool(r["ok"]) and res.returncode == 0 and not r.get("error")
        result["bytes"] = sum(x["bytes"] for x in reports)
        result["payload_bytes"] = sum(x.get("payload_bytes") or 0 for x in reports)
        result["files"] = sum(x.get("files") or 0 for x in reports)
        result["peak_rss"] = max([x.get("maxrss") or 0 for x in reports]
                                 + [r.get("maxrss_root") or 0])
    else:
        _clean_collect(dest_dir, names)  # rank 0 ran on this machine: tidy its temp dirs
        result["failures"] = launch_failures(res, ranks[1:], timeout)
        result["error"] = res.describe()
        result["mpiexec_stderr"] = res.stderr.splitlines()[-30:]
    result["phase_bytes"] = {"collect": result["bytes"]}
    result["seconds"] = time.time() - t0
    result["phases"]["total"] = result["seconds"]
    return result
