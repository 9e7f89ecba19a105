"""Stage-in the MPI way, from the CLI side: pack into the spool, serve it, launch, report."""

from __future__ import annotations

import os
import secrets
import time
from contextlib import contextmanager
from typing import Iterator

from chiba_admin.errors import MPIToolError, InvalidRequest

from .archive import COMPRESSIONS, BlockHasher, PackInfo, clean_stale, new_hasher
from .launcher import LaunchResult, launch, rank_hosts
from .rankio import encode_job
from .spool import SUMS_SUFFIX, Published, SpoolServer, publish, spool_name

__all__ = ["stage_mpi", "stage_archive", "collect_mpi", "pipeline_segment", "dest_for",
           "spool_dir_of", "check_nodes", "check_collect_dest", "DEFAULT_CHUNK",
           "DEFAULT_ALGORITHM", "host_rows", "launch_failures", "cleanup_embedded"]

DEFAULT_CHUNK = 4 << 20
# measured faster on every setup we tried (see mpitools/README-section.md)
DEFAULT_ALGORITHM = "chain"


# Chain messages of 64 KiB: on the testbed (8 nodes, 20 Mb/s) a chain moved 64 MiB at 0.94
# of line rate with 64 KiB messages, 0.90 with 256 KiB, 0.77 with 1 MiB and 0.64 with
# 4 MiB (same run). Store-and-forward fill grows with the message, and messages above
# Open MPI's TCP eager limit (64 KiB) add a rendezvous round trip through shaped queues.
SEGMENT = 64 << 10


def pipeline_segment(total: int, ranks: int, chunk: int, *, segment: int = SEGMENT) -> int:
    """Message size for the chain: ``segment`` (never above ``chunk``; ``chunk`` for a
    chain of one rank, where nothing is forwarded)."""
    if ranks < 2:
        return chunk
    return min(segment, chunk)


def dest_for(topo, host: str, dest: str | None, *, default_name: str | None = None,
             option: str = "--dest"):
    """``dest`` confined below ``host``'s scratch (:func:`topology.confine.confine_dest`).

    Returns a HostDest; raises InvalidRequest (exit 2) for ``..``, ``/``, a path outside
    scratch and the host's dest_roots, or scratch/spool/repository or an ancestor of one.
    """
    from topology.confine import confine_dest

    return confine_dest(topo.host(host), "scratch", dest, default_name=default_name,
                        option=option)


def _rank_dest(topo, host: str, hd) -> dict:
    """What a rank needs: the root as seen on that machine, ``rel``, and the path to show."""
    return {"root": topo.host(host).local_path(hd.root), "rel": hd.rel, "shown": hd.path,
            "host_root": hd.root}


def spool_dir_of(topo) -> str:
    home = topo.home_server
    return home.local_path(home.spool)


def check_nodes(topo, nodes: list[str]) -> list[str]:
    if not nodes:
        raise InvalidRequest("no nodes selected", hint="name nodes like ccn[01-04] or @nodes")
    for n in nodes:
        topo.host(n)  # unknown -> TopologyError (exit 2)
    return list(dict.fromkeys(nodes))


@contextmanager
def _spool_url(topo, name: str, spool_url: str | None) -> Iterator[str]:
    """The archive's URL: under a given spool server, or one we run for this command."""
    if spool_url:
        yield spool_url.rstrip("/") + "/" + name
        return
    home = topo.home_server
    bind = "127.0.0.1" if topo.kind == "embedded" else (home.address or "127.0.0.1")
    try:
        server = SpoolServer(spool_dir_of(topo), bind, 0)
    except OSError as e:
        raise MPIToolError(f"cannot start the spool HTTP server on {bind}: {e.strerror or e}",
                         where=home.name, hint="run `chiba-admin spool serve` on the home "
                         "server and pass --spool-url") from None
    with server:
        yield server.url_for(name)


def host_rows(reports: list[dict]) -> dict[str, dict]:
    """Per-host entries of the result schema from the ranks' reports (bits per second)."""
    rows = {}
    for r in reports:
        secs = float(r.get("seconds") or 0.0)
        rows[r["host"]] = {
            "ok": bool(r["ok"]), "bytes": int(r.get("bytes") or 0), "seconds": secs,
            "throughput_bps": (r["bytes"] * 8 / secs) if secs > 0 else 0.0,
            "stage": r.get("stage"), "error": r.get("error"), "maxrss": r.get("maxrss"),
        }
    return rows


def launch_failures(res: LaunchResult, hosts: list[str], timeout: float | None
                    ) -> dict[str, str]:
    """Who to blame when the job produced no result: dead ranks, else every host."""
    dead = res.failed_hosts()
    if dead:
        return {h: f"{why} (the job was stopped)" for h, why in dead.items()}
    why = (f"timed out after {timeout:g} s" if res.timed_out and timeout
           else res.describe())
    return {h: why for h in hosts}


def cleanup_embedded(topo, dests: dict[str, dict]) -> None:
    """After a killed job on the embedded cluster: remove its temporary dirs now.

    (On real hosts the next run on that destination does it: temp dirs of dead jobs are
    unlocked.) Walks each destination's parent without following symlinks.
    """
    if topo.kind != "embedded":
        return
    from inventory.beneath import (BeneathError, lock_dest, open_dir_beneath, open_root,
                                   unlock_dest)

    for d in dests.values():
        parent, _, name = d["rel"].rpartition("/")
        try:
            root_fd = open_root(d["root"])
        except BeneathError:
            continue
        try:
            pfd = open_dir_beneath(root_fd, parent)
        except BeneathError:
            continue
        finally:
            os.close(root_fd)
        try:
            clean_stale(pfd, name)
            unlock_dest(pfd, name, lock_dest(pfd, name))  # a killed run's lock file
        except BeneathError:
            pass  # another live run holds it
        finally:
            os.close(pfd)


def _confine_all(topo, nodes: list[str], dest: str | None, default_name: str | None,
                 option: str = "--dest") -> dict[str, dict]:
    """Every node's confined destination for the ranks, checked before anything is sent."""
    return {h: _rank_dest(topo, h, dest_for(topo, h, dest, default_name=default_name,
                                            option=option)) for h in nodes}


def _spool_or_fail(topo) -> str:
    spool = spool_dir_of(topo)
    if not os.path.isdir(spool):
        raise MPIToolError("spool directory missing", where=spool,
                         hint="run `chiba-admin cluster init` (embedded) or create it")
    return spool


def stage_mpi(topo, src: str, nodes: list[str], dest: str | None = None, *,
              algorithm: str = DEFAULT_ALGORITHM, chunk: int = DEFAULT_CHUNK,
              compress: str = "zstd", timeout: float | None = None, progress=None,
              spool_url: str | None = None, env: dict[str, str] | None = None,
              replace: bool = False) -> dict:
    """Pack ``src`` into the spool and stage it to ``nodes`` through MPI; the result dict.

    Raises InvalidRequest (exit 2) before anything is sent for an empty or missing source,
    one holding a device node, a non-directory, or a ``dest`` that confine_dest refuses.
    An existing destination an earlier stage did not create is refused on the nodes
    (``result["refused"]``, nothing touched) unless ``replace``.
    """
    from inventory.source import check_source

    info = check_source(src)
    if not info.is_dir:
        raise InvalidRequest("source is not a directory", where=info.path,
                         hint="stage a directory of the home file system")
    src = info.path
    nodes = check_nodes(topo, nodes)
    if compress not in COMPRESSIONS:
        raise InvalidRequest(f"unknown compression {compress!r}", hint="zstd, gzip or none")
    dests = _confine_all(topo, rank_hosts(topo, nodes), dest, os.path.basename(src))
    spool = _spool_or_fail(topo)
    t0 = time.time()
    on_payload = None
    if progress is not None:  # the scan told the payload's size: a bar with a total
        progress.update(0, info.bytes, "packing")
        packed = [0]

        def on_payload(n: int) -> None:
            packed[0] += n
            progress.update(packed[0])
    try:
        pub = publish(src, spool, compress, on_payload=on_payload)
    except OSError as e:
        raise MPIToolError(f"cannot pack {src}: {e}", where=src) from None
    try:
        return _stage(topo, pub, src, nodes, dests, t0=t0, pack=time.time() - t0,
                      algorithm=algorithm, chunk=chunk, timeout=timeout, progress=progress,
                      spool_url=spool_url, env=env, replace=replace)
    finally:
        pub.remove()  # a spooled archive is useful once


def stage_archive(topo, archive: str, nodes: list[str], dest: str, *, compress: str,
                  algorithm: str = DEFAULT_ALGORITHM, chunk: int = DEFAULT_CHUNK,
                  timeout: float | None = None, env: dict[str, str] | None = None,
                  spool_url: str | None = None, progress=None, replace: bool = False) -> dict:
    """Stage an already-built archive file as is (the lower-level entry point).

    The archive is copied into the spool under a fresh name and hashed (whole and per
    block) on the way, so hand-made tars (tests of the extractor) take the same path, with
    consistent digests, as packed trees.
    """
    nodes = check_nodes(topo, nodes)
    dests = _confine_all(topo, rank_hosts(topo, nodes), dest, None)
    t0 = time.time()
    name = spool_name(compress)
    path = os.path.join(_spool_or_fail(topo), name)
    h, blocks, size = new_hasher("blake3"), BlockHasher(), 0
    with open(archive, "rb") as fi, open(path, "wb") as fo:
        while block := fi.read(1 << 20):
            h.update(block)
            blocks.update(block)
            fo.write(block)
            size += len(block)
    pub = Published(path, name, PackInfo(size, h.hexdigest(), "blake3", 0, 0, compress,
                                          blocks.finish()))
    try:
        return _stage(topo, pub, archive, nodes, dests, t0=t0, pack=time.time() - t0,
                      algorithm=algorithm, chunk=chunk, timeout=timeout, progress=progress,
                      spool_url=spool_url, env=env, replace=replace)
    finally:
        pub.remove()


def _publish_sums(pub: Published) -> tuple[str, str]:
    """Write the block digests beside the archive (NAME.sums); (path, blake3 of them)."""
    path = pub.path + SUMS_SUFFIX
    with open(path, "wb") as f:
        os.chmod(path, 0o600)
        f.write(pub.info.blocks)
    h = new_hasher("blake3")
    h.update(pub.info.blocks)
    return path, h.hexdigest()


def _stage(topo, pub: Published, src: str, nodes: list[str], dests: dict[str, dict], *,
           t0: float, pack: float, algorithm: str, chunk: int, timeout: float | None,
           progress, spool_url: str | None, env: dict[str, str] | None,
           replace: bool) -> dict:
    if algorithm not in ("chain", "bcast"):
        raise InvalidRequest(f"unknown algorithm {algorithm!r}", hint="chain or bcast")
    ranks = rank_hosts(topo, nodes)
    host_dest = dests[ranks[0]]["shown"]
    info = pub.info
    sums_path, sums_hash = _publish_sums(pub)
    # chain: segments sized for the pipeline; bcast: the paper's one chunk per MPI_Bcast
    seg = pipeline_segment(info.bytes, len(ranks), chunk) if algorithm == "chain" else chunk
    def on_event(ev: dict) -> None:
        if ev.get("event") == "start":
            if progress is not None:
                progress.update(0, info.bytes, f"staging to {len(ranks)} nodes")
        elif ev.get("event") == "progress" and progress is not None:
            progress.update(ev.get("done"), ev.get("total"))

    try:
        with _spool_url(topo, pub.name, spool_url) as url:
            job = {"jobid": secrets.token_hex(6), "url": url, "size": info.bytes,
                   "hash": info.hash, "hash_alg": info.hash_alg, "compress": info.compress,
                   "sums_url": url + SUMS_SUFFIX, "sums_hash": sums_hash, "block": info.block,
                   "chunk": seg, "buffer": int(chunk), "algorithm": algorithm,
                   "hosts": ranks, "dests": dests, "replace": bool(replace)}
            if progress is not None:
                progress.update(0, info.bytes, "starting MPI")
            try:
                res = launch(topo, "mpitools.stage", [encode_job(job)], ranks, None,
                             timeout=timeout, on_event=on_event, env=env)
            except KeyboardInterrupt:
                cleanup_embedded(topo, dests)  # ranks were killed; leave no temp dirs here
                raise
    finally:
        os.unlink(sums_path)
    result = {
        "method": "mpi", "algorithm": algorithm, "ok": False, "source": src,
        "dest": host_dest, "nodes": ranks, "bytes": info.bytes,
        "payload_bytes": info.payload_bytes, "files": info.files,
        "seconds": 0.0, "phases": {"pack": pack}, "phase_bytes": {}, "hosts": {},
        "failures": {}, "compress": info.compress, "chunk": int(chunk), "segment": seg,
        "kind": topo.kind,
    }
    if res.launch_seconds() is not None:
        result["phases"]["launch"] = res.launch_seconds()
    if res.result is not None:
        r = res.result
        result["phases"].update(r.get("phases", {}))
        result["phases"]["exit"] = res.exit_seconds()
        result["hosts"] = host_rows(r["reports"])
        result["failures"] = {x["host"]: x["error"] for x in r["reports"]
                              if x.get("primary") and x.get("error")}
        result["ok"] = bool(r["ok"]) and res.returncode == 0
        result["refused"] = any(x.get("refused") for x in r["reports"])
        if not result["ok"] and not result["failures"]:
            result["failures"] = {x["host"]: x["error"] or "failed" for x in r["reports"]
                                  if not x["ok"]}
        result["peak_rss"] = max((x.get("maxrss") or 0) for x in r["reports"])
    else:
        cleanup_embedded(topo, dests)
        result["failures"] = launch_failures(res, ranks, timeout)
        result["hosts"] = {h: {"ok": False, "bytes": 0, "seconds": 0.0,
                               "throughput_bps": 0.0, "stage": "aborted",
                               "error": result["failures"].get(h, "the job was stopped")}
                           for h in ranks}
        result["error"] = res.describe()
        result["mpiexec_stderr"] = res.stderr.splitlines()[-30:]
    n_ok = sum(1 for h in result["hosts"].values() if h["ok"])
    result["phase_bytes"] = {"pack": info.payload_bytes, "download": info.bytes,
                             "distribute": info.bytes * max(0, len(ranks) - 1),
                             "unpack": info.payload_bytes * n_ok}
    result["seconds"] = time.time() - t0
    result["phases"]["total"] = result["seconds"]
    return result


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
    paths = _confine_all(topo, nodes, path if path is not None else "", None, option="PATH")
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
        res = launch(topo, "mpitools.collect", [encode_job(job)], ranks[1:], home,
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
