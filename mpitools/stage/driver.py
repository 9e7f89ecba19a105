"""Stage-in the MPI way, from the CLI side: pack into the spool, serve it, launch, report
(or, for a dry run, check and say what would happen, writing nothing)."""

from __future__ import annotations

import os
import secrets
import stat
import time
from contextlib import contextmanager
from typing import Iterator

from chiba_admin.errors import InvalidRequest, MPIToolError
from chiba_admin.outcome import TransferRun
from chiba_admin.progress import Progress, or_silent

from mpitools.common.archive import COMPRESSIONS, BlockHasher, PackInfo, new_hasher
from mpitools.common.chain import EAGER_FRAME
from mpitools.common.launch import LaunchResult, launch, rank_hosts
from mpitools.common.runtime import encode_job
from mpitools.common.faults import from_environ  # tests inject faults
from mpitools.common.spool import SUMS_SUFFIX, Published, SpoolServer, publish, spool_name
from mpitools.common.targets import (aborted_rows, check_nodes, cleanup_embedded, confine_all,
                                     host_rows, launch_failures, spool_dir_of, spool_or_fail)

__all__ = ["stage_mpi", "stage_mpi_dry_run", "stage_archive", "pipeline_segment",
           "download_pacing", "route_plan", "tree_counts", "DEFAULT_CHUNK",
           "DEFAULT_ALGORITHM"]

DEFAULT_CHUNK = 4 << 20
# measured faster on every setup we tried (README, "Staging (Figure 1)")
DEFAULT_ALGORITHM = "chain"


# Chain messages just under 64 KiB: on the testbed (8 nodes, 20 Mb/s) a chain moved 64 MiB
# at 0.94 of line rate with 64 KiB messages, 0.90 with 256 KiB, 0.77 with 1 MiB and 0.64
# with 4 MiB (same run): store-and-forward fill grows with the message; and every frame
# of EAGER_FRAME bytes is sent eagerly (mpitools/common/chain.py).
SEGMENT = EAGER_FRAME


def pipeline_segment(total: int, ranks: int, chunk: int, *, segment: int = SEGMENT) -> int:
    """Message size for the chain: ``segment`` (never above ``chunk``; ``chunk`` for a
    chain of one rank, where nothing is forwarded)."""
    if ranks < 2:
        return chunk
    return min(segment, chunk)


# Pace at this share of the path's narrowest link: TCP's pacing counts IP bytes, the link
# also carries each frame's Ethernet header; 0.97 of 20 Mb/s kept the town link's queue
# empty and still ran ahead of the chain (README, "The grid on the paper's network").
PACING_SHARE = 0.97


def download_pacing(topo, downloader: str) -> int | None:
    """Bytes/s at which the home server should send the archive to ``downloader`` (rank
    0): ``PACING_SHARE`` of the narrowest link on the route, when that link is slower than
    the home server's own (the queue then builds in the network, at a mayor, where it
    delays everyone else's packets); None on the embedded cluster, for the home server
    itself, or when its own link is the narrowest (its own queue paces it). Every link has
    a bandwidth (the topology loader requires one)."""
    home = topo.home_server.name
    if topo.kind == "embedded" or downloader == home:
        return None
    links = topo.route(home, downloader)
    narrow = min(lk.bandwidth for lk in links)
    if not 0 < narrow < links[0].bandwidth:
        return None
    return int(PACING_SHARE * narrow / 8)


@contextmanager
def _spool_url(topo, name: str, spool_url: str | None,
               pacing: int | None = None) -> Iterator[str]:
    """The archive's URL: under a given spool server, or one we run for this command
    (sending ``name`` at most at ``pacing`` bytes/s)."""
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
    server.pace(name, pacing)
    with server:
        yield server.url_for(name)


def stage_mpi(topo, src: str, nodes: list[str], dest: str | None = None, *,
              algorithm: str = DEFAULT_ALGORITHM, chunk: int = DEFAULT_CHUNK,
              compress: str = "zstd", timeout: float | None = None,
              progress: Progress | None = None, spool_url: str | None = None,
              env: dict[str, str] | None = None, replace: bool = False) -> TransferRun:
    """Pack ``src`` into the spool and stage it to ``nodes`` through MPI; a TransferRun.

    Raises InvalidRequest (exit 2) before anything is sent for an empty or missing source,
    one holding a device node, a non-directory, or a ``dest`` that confine_dest refuses.
    An existing destination an earlier stage did not create is refused on the nodes
    (``refused``, nothing touched) unless ``replace``. ``progress`` hears the phases
    pack, launch and distribute, with bytes done.
    """
    info, nodes, dests = _request(topo, src, nodes, dest, compress)
    src = info.path
    spool = spool_or_fail(topo)
    t0 = time.time()
    progress = or_silent(progress)
    progress.phase("pack", total_bytes=info.bytes)  # the scan told the payload's size
    packed = [0]

    def on_payload(n: int) -> None:
        packed[0] += n
        progress.advance(packed[0])
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


def _request(topo, src: str, nodes: list[str], dest: str | None, compress: str):
    """The checks of a stage before anything is written: (SourceInfo, the nodes, each
    rank's confined destination). Raises InvalidRequest (exit 2) as stage_mpi says."""
    from inventory.source import check_source

    info = check_source(src)
    if not info.is_dir:
        raise InvalidRequest("source is not a directory", where=info.path,
                         hint="stage a directory of the home file system")
    nodes = check_nodes(topo, nodes)
    if compress not in COMPRESSIONS:
        raise InvalidRequest(f"unknown compression {compress!r}", hint="zstd, gzip or none")
    dests = confine_all(topo, rank_hosts(topo, nodes), dest, os.path.basename(info.path))
    return info, nodes, dests


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ("chain", "bcast"):
        raise InvalidRequest(f"unknown algorithm {algorithm!r}", hint="chain or bcast")


def tree_counts(src: str) -> tuple[int, int]:
    """(entries, payload bytes) of the directory ``src`` as packing counts them
    (mpitools/common/archive.py ``pack_tree``): every entry below it, directories
    included; the sizes of regular files, a hard-linked file's once. Reads metadata only,
    nothing below ``src`` is followed; raises OSError."""
    from inventory.source import walk_below

    entries = size = 0
    seen: set[tuple[int, int]] = set()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _, st in walk_below(fd):
            entries += 1
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            size += st.st_size
    finally:
        os.close(fd)
    return entries, size


def route_plan(topo, ranks: list[str], algorithm: str, spool_url: str | None = None
               ) -> dict:
    """Where a stage's bytes would go (pure): ``from`` (the home server, or the given
    spool URL) serves the archive over HTTP to ``download`` (rank 0), which passes it on
    in ``order``: down one pipelined chain (``tree`` "chain"), or by MPI_Bcast (``tree``
    "MPI_Bcast": the MPI library picks the tree); ``pacing`` is the download's bytes/s
    (download_pacing; None: unpaced)."""
    return {"from": spool_url or topo.home_server.name, "download": ranks[0],
            "order": list(ranks), "tree": "chain" if algorithm == "chain" else "MPI_Bcast",
            "pacing": None if spool_url else download_pacing(topo, ranks[0])}


def stage_mpi_dry_run(topo, src: str, nodes: list[str], dest: str | None = None, *,
                      algorithm: str = DEFAULT_ALGORITHM, chunk: int = DEFAULT_CHUNK,
                      compress: str = "zstd", timeout: float | None = None,
                      progress: Progress | None = None, spool_url: str | None = None,
                      env: dict[str, str] | None = None, replace: bool = False
                      ) -> TransferRun:
    """What :func:`stage_mpi` would do, writing nothing anywhere; a TransferRun with
    ``dry_run`` True and its ``plan`` (:func:`route_plan`).

    The same checks before anything is sent (raising InvalidRequest, exit 2, with the
    same lines), nothing packed: the source's entries and bytes are counted as packing
    counts them. The ranks are launched as for a real run (every host reached, rank 0
    reaching the spool server) and each node checks its destination with the real run's
    check, making nothing (mpitools/stage/dryrun.py): a node's ``stage`` is "would create"
    or "would replace", or it fails as the real run would (``refused`` for a destination
    that exists without --replace, a non-directory or a symlink: exit 2). ``bytes`` is
    None (nothing is packed) and ``phase_bytes`` empty: nothing crossed.
    """
    info, nodes, dests = _request(topo, src, nodes, dest, compress)
    spool_or_fail(topo)
    _check_algorithm(algorithm)
    try:
        files, payload = tree_counts(info.path)
    except OSError as e:
        raise MPIToolError(f"cannot read {info.path}: {e}", where=info.path) from None
    ranks = rank_hosts(topo, nodes)
    t0 = time.time()
    progress = or_silent(progress)

    def on_event(ev: dict) -> None:
        if ev.get("event") == "start":
            progress.phase("check", hosts=len(ranks))

    progress.phase("launch")
    # a server that answers for this run's URL (no archive is published under it), so
    # that rank 0 checks it can reach the spool as the real run's rank 0 would
    with _spool_url(topo, spool_name(compress), spool_url) as url:
        job = {"dry_run": True, "jobid": secrets.token_hex(6), "url": url,
               "algorithm": algorithm, "hosts": ranks, "dests": dests,
               "replace": bool(replace)}
        res = launch(topo, "mpitools.stage.ranks", [encode_job(job)], ranks, None,
                     timeout=timeout, on_event=on_event, env=env)
    seg = pipeline_segment(payload, len(ranks), chunk) if algorithm == "chain" else chunk
    out = TransferRun(
        method="mpi", algorithm=algorithm, source=info.path, dest=dests[ranks[0]]["shown"],
        nodes=ranks, bytes=None, payload_bytes=payload, files=files, phases={},
        compress=compress, chunk=int(chunk), segment=seg, kind=topo.kind, dry_run=True,
        plan=route_plan(topo, ranks, algorithm, spool_url))
    _take_result(out, res, timeout)
    out.seconds = time.time() - t0
    out.phases["total"] = out.seconds
    return out


def stage_archive(topo, archive: str, nodes: list[str], dest: str, *, compress: str,
                  algorithm: str = DEFAULT_ALGORITHM, chunk: int = DEFAULT_CHUNK,
                  timeout: float | None = None, env: dict[str, str] | None = None,
                  spool_url: str | None = None, progress: Progress | None = None,
                  replace: bool = False) -> TransferRun:
    """Stage an already-built archive file as is (the lower-level entry point).

    The archive is copied into the spool under a fresh name and hashed (whole and per
    block) on the way, so hand-made tars (tests of the extractor) take the same path, with
    consistent digests, as packed trees.
    """
    nodes = check_nodes(topo, nodes)
    dests = confine_all(topo, rank_hosts(topo, nodes), dest, None)
    t0 = time.time()
    name = spool_name(compress)
    path = os.path.join(spool_or_fail(topo), name)
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
           progress: Progress | None, spool_url: str | None, env: dict[str, str] | None,
           replace: bool) -> TransferRun:
    _check_algorithm(algorithm)
    progress = or_silent(progress)
    ranks = rank_hosts(topo, nodes)
    info = pub.info
    sums_path, sums_hash = _publish_sums(pub)
    # chain: segments sized for the pipeline; bcast: the paper's one chunk per MPI_Bcast
    seg = pipeline_segment(info.bytes, len(ranks), chunk) if algorithm == "chain" else chunk

    def on_event(ev: dict) -> None:
        if ev.get("event") == "start":
            progress.phase("distribute", total_bytes=info.bytes, hosts=len(ranks))
        elif ev.get("event") == "progress":
            progress.advance(ev.get("done") or 0, ev.get("total"))

    try:
        pacing = None if spool_url else download_pacing(topo, ranks[0])
        with _spool_url(topo, pub.name, spool_url, pacing) as url:
            job = {**from_environ(), "jobid": secrets.token_hex(6), "url": url, "size": info.bytes,
                   "hash": info.hash, "hash_alg": info.hash_alg, "compress": info.compress,
                   "sums_url": url + SUMS_SUFFIX, "sums_hash": sums_hash, "block": info.block,
                   "chunk": seg, "buffer": int(chunk), "algorithm": algorithm,
                   "hosts": ranks, "dests": dests, "replace": bool(replace),
                   "pacing": pacing}
            progress.phase("launch", total_bytes=info.bytes)
            try:
                res = launch(topo, "mpitools.stage.ranks", [encode_job(job)], ranks, None,
                             timeout=timeout, on_event=on_event, env=env)
            except KeyboardInterrupt:
                cleanup_embedded(topo, dests)  # ranks were killed; leave no temp dirs here
                raise
    finally:
        os.unlink(sums_path)
    out = TransferRun(
        method="mpi", algorithm=algorithm, source=src, dest=dests[ranks[0]]["shown"],
        nodes=ranks, bytes=info.bytes, payload_bytes=info.payload_bytes, files=info.files,
        phases={"pack": pack}, compress=info.compress, chunk=int(chunk), segment=seg,
        kind=topo.kind)
    _stage_hosts(out, res, topo, dests, timeout)
    n_ok = out.hosts_ok
    out.phase_bytes = {"pack": info.payload_bytes, "download": info.bytes,
                       "distribute": info.bytes * max(0, len(ranks) - 1),
                       "unpack": info.payload_bytes * n_ok}
    out.seconds = time.time() - t0
    out.phases["total"] = out.seconds
    return out


def _stopped_outcome(res: LaunchResult) -> str | None:
    """What the nodes hold when the job was stopped before its result: unknown once rank 0
    announced the commit (None: nothing was committed on any node)."""
    if res.first_event("committed") is not None:
        return ("every node had moved the new tree into place when the job was stopped, "
                "and keeps it (a node killed outright may lack its staged mark: the next "
                "stage to it then needs --replace)")
    if res.detached():  # nothing stopped it: it may still commit, or roll back
        return (f"the job goes on in the ranks of the {res.argv[0]}: each node may yet "
                "get the new tree or keep what it held; look before staging again "
                "(with --replace)")
    if res.first_event("commit") is not None:
        return ("stopped during the commit: each node holds either the new tree or what it "
                "held before (a node stopped in time rolled back); stage again with "
                "--replace to make them agree")
    return None


def _stage_hosts(out: TransferRun, res: LaunchResult, topo, dests: dict[str, dict],
                 timeout: float | None) -> None:
    """Fill ``out`` from the job (:func:`_take_result`); a job that gave no result has its
    temporary dirs removed here (embedded) and says what the nodes hold."""
    if res.result is None:  # no rank reported: every host failed
        cleanup_embedded(topo, dests)
    if not _take_result(out, res, timeout):
        stopped = _stopped_outcome(res)
        if stopped:
            out.outcome = stopped
        return
    if res.result["ok"] and not out.ok:  # every node committed; only mpiexec's end failed
        out.error = res.describe()
        out.outcome = ("every node committed the new tree; then the job overran --timeout "
                       "while exiting" if res.timed_out else "every node committed the "
                       "new tree; then mpiexec ended badly")


def _take_result(out: TransferRun, res: LaunchResult, timeout: float | None) -> bool:
    """Fill ``out`` from the job, a real run's or a dry run's: ok only when every rank
    reported ok and mpiexec ended well; per-host outcomes, the failures (primary errors
    first), refused, phases; for a refused run ``outcome`` names what the nodes put back
    first (a dead job's moved-aside copy, ``tidied``). False when no rank reported (every
    host failed)."""
    if res.launch_seconds() is not None:
        out.phases["launch"] = res.launch_seconds()
    if res.result is None:
        out.failures = launch_failures(res, out.nodes, timeout)
        out.hosts = aborted_rows(out.nodes, out.failures)
        out.error = res.describe()
        out.mpiexec_stderr = res.stderr.splitlines()[-30:]
        return False
    r = res.result
    out.phases.update(r.get("phases", {}))
    out.phases["exit"] = res.exit_seconds()
    out.hosts = host_rows(r["reports"])
    out.failures = {x["host"]: x["error"] for x in r["reports"]
                    if x.get("primary") and x.get("error")}
    out.ok = bool(r["ok"]) and res.returncode == 0
    out.refused = any(x.get("refused") for x in r["reports"])
    tidied = {x["host"]: x["tidied"] for x in r["reports"] if x.get("tidied")}
    if out.refused and tidied:  # "refused" must not then say that nothing was touched
        out.outcome = "; ".join(f"{h} {what}" for h, what in tidied.items())
    if not out.ok and not out.failures:
        out.failures = {x["host"]: x["error"] or "failed" for x in r["reports"] if not x["ok"]}
    out.peak_rss = max((x.get("maxrss") or 0) for x in r["reports"])
    return True
