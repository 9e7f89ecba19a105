"""The staging rank program: rank 0 downloads, MPI spreads the chunks, every node commits or none.

Run as ``mpiexec ... python -m mpitools.stage.ranks JOB`` (JOB from
``mpitools.common.runtime.encode_job``).
"""

# Rank-side: standard library, mpi4py, zstandard/blake3 only; imports stay lean (every
# rank of a launch imports this; numpy alone cost 0.13 s of CPU per rank)
# because every rank pays for them at start-up (docs/design.md, "Lean ranks").
from __future__ import annotations

import errno
import fcntl
import os
import queue
import stat
import threading
import time
from collections.abc import Callable

from inventory.beneath import (BeneathError, clean_staged_leftovers, lock_dest, mark_staged,
                               open_dir_beneath, open_root, split_rel, unlock_dest,
                               was_staged)

from mpitools.common.archive import (BlockVerifier, Extractor, RefusedMember, VerifyError,
                                     clean_stale, make_locked_temp, new_hasher, remove_entry,
                                     sums_size, temp_name)
from mpitools.common.chain import Chain
from mpitools.common.faults import NONE, Faults
from mpitools.common.runtime import (PeerLost, agree_any, emit, maxrss_bytes, queue_get,
                                     rank_hosts, rank_main, wait)

__all__ = ["ALGORITHMS", "NodeStage", "DestRefused", "chain", "bcast", "main"]

ALGORITHMS = ("chain", "bcast")
_TAG = 17
_NBUF = 2  # double buffering: one chunk in flight downstream while the next arrives


class DestRefused(Exception):
    """The destination may not be replaced (not made by stage, not a directory, a symlink
    on the way): refused on this host before anything is touched (the CLI exits 2)."""


def _exists(parent_fd: int, name: str):
    try:
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _put_back(parent_fd: int, name: str) -> str | None:
    """Remove dead jobs' leftovers of ``name`` (``clean_stale``; the caller holds the lock:
    no live run of ours uses them); the name of the moved-aside copy put back in place of
    a missing ``name``, if one was."""
    missing = _exists(parent_fd, name) is None
    done = clean_stale(parent_fd, name)
    if missing and _exists(parent_fd, name) is not None:
        return next((n for n in done if n.endswith(".old")), None)
    return None


class NodeStage:
    """One node's side of all-or-nothing below a confined destination ``root`` + ``rel``.

    Every directory below ``root`` is opened without following symlinks
    (:mod:`inventory.beneath`); the destination's run lock is held from ``prepare`` to the
    end; the temporary directory ``.NAME.chiba-stage-JOBID`` (0700, flock-held) becomes the
    destination by a rename within the parent's fd, and the destination is marked as staged.
    An existing destination without that mark is refused unless ``replace``. ``restored``
    names a dead job's moved-aside copy that ``prepare`` put back in place of a missing
    destination (``clean_stale``), so that a refusal of it does not read as untouched.
    """

    def __init__(self, root: str, rel: str, jobid: str, *, replace: bool = False,
                 shown: str | None = None, host_root: str | None = None):
        parts = split_rel(rel)
        if not parts:
            raise ValueError("the destination must lie below its root")
        self.root, self.rel, self.jobid, self.replace = root, rel, jobid, replace
        self.name, self.parent_rel = parts[-1], "/".join(parts[:-1])
        self.shown = shown or os.path.join(root, rel)
        self.host_root = host_root or root  # the root as the host names it, for messages
        self.tmp = temp_name(self.name, "stage", jobid)
        self.old = self.tmp + ".old"
        self.parent_fd: int | None = None
        self.tmp_fd: int | None = None
        self._lock: int | None = None
        self._old_fd: int | None = None
        self._made: list[tuple[int, str]] = []  # (fd of its parent, name) of dirs we made
        self.restored: str | None = None
        self.state = "new"  # new -> prepared -> aside -> committed -> done | removed

    def check(self) -> None:
        """Would the destination be refused? Raises DestRefused; touches nothing.

        A missing root or parent is fine here (``prepare`` makes the parents).
        """
        try:
            root_fd = open_root(self.root)
        except BeneathError:
            return
        try:
            try:
                pfd = open_dir_beneath(root_fd, self.parent_rel, display=self.host_root)
            except BeneathError as e:
                if e.errno == errno.ENOENT:
                    return
                raise DestRefused(str(e)) from None
            try:
                self.check_at(pfd)
            finally:
                os.close(pfd)
        finally:
            os.close(root_fd)

    def check_at(self, pfd: int) -> None:
        """:meth:`check` in the open parent directory ``pfd``: raises DestRefused."""
        st = _exists(pfd, self.name)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            raise DestRefused(f"{self.shown} is a symbolic link (not followed, not replaced)")
        if not stat.S_ISDIR(st.st_mode):
            raise DestRefused(f"{self.shown} exists and is not a directory")
        if not self.replace and not was_staged(pfd, self.name):
            back = (f" (a copy that a dead run had moved aside, put back in its place from "
                    f"{self.restored} by this run)" if self.restored else "")
            raise DestRefused(f"{self.shown} exists and was not created by chiba-admin stage;"
                              f" pass --replace to replace it{back}")

    def prepare(self) -> None:
        """Walk (making missing parents), lock, clean dead jobs' leftovers (temporary dirs,
        a killed mark's temporary file), re-check, make the locked temp dir. Raises
        OSError/BeneathError (EBUSY: another run holds the lock) or DestRefused."""
        root_fd = open_root(self.root)
        fd = root_fd
        shown = self.host_root
        try:
            for part in split_rel(self.parent_rel):
                try:
                    nfd = open_dir_beneath(fd, part, display=shown)
                except BeneathError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._made.append((os.dup(fd), part))
                    nfd = open_dir_beneath(fd, part, display=shown)
                os.close(fd)
                fd = nfd
                shown = f"{shown}/{part}"
        except BaseException:
            os.close(fd)
            raise
        self.parent_fd = fd
        self._lock = lock_dest(fd, self.name, display=os.path.dirname(self.shown))
        self.restored = _put_back(fd, self.name)
        clean_staged_leftovers(fd, self.name, self._lock)  # a killed mark_staged's file
        self.check_at(fd)
        self.tmp_fd = make_locked_temp(fd, self.tmp)
        self.state = "prepared"

    def commit(self) -> None:
        """Move an existing destination aside (locked) and the new tree in."""
        pfd = self.parent_fd
        if _exists(pfd, self.name) is not None:
            os.rename(self.name, self.old, src_dir_fd=pfd, dst_dir_fd=pfd)
            self.state = "aside"
            self._old_fd = os.open(self.old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                   dir_fd=pfd)
            fcntl.flock(self._old_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(self.tmp, self.name, src_dir_fd=pfd, dst_dir_fd=pfd)
        self.state = "committed"

    def finish(self) -> None:
        """Everyone committed: mark the destination as staged, drop the old copy."""
        mark_staged(self.parent_fd, self.name, self.jobid)
        if self.state == "committed" and self._old_fd is not None:
            remove_entry(self.parent_fd, self.old)
        self.state = "done"
        self._release()

    def abandon(self) -> None:
        """Undo whatever this node did: roll back a commit, remove the temp dir, the parents
        this job made and the lock. Only the exact names this job created are removed."""
        try:
            pfd = self.parent_fd
            if pfd is not None:
                if self.state == "committed":
                    os.rename(self.name, self.tmp, src_dir_fd=pfd, dst_dir_fd=pfd)
                if self._old_fd is not None and _exists(pfd, self.name) is None:
                    os.rename(self.old, self.name, src_dir_fd=pfd, dst_dir_fd=pfd)
                if self.tmp_fd is not None:
                    remove_entry(pfd, self.tmp)
        finally:
            self.state = "removed"
            self._release()
            for dfd, part in reversed(self._made):
                try:
                    os.rmdir(part, dir_fd=dfd)
                except OSError:
                    pass  # someone else put something there meanwhile: keep it
            for dfd, _ in self._made:
                os.close(dfd)
            self._made.clear()

    def _release(self) -> None:
        for fd in (self.tmp_fd, self._old_fd):
            if fd is not None:
                os.close(fd)
        self.tmp_fd = self._old_fd = None
        if self._lock is not None:
            unlock_dest(self.parent_fd, self.name, self._lock)
            self._lock = None
        if self.parent_fd is not None:
            os.close(self.parent_fd)
            self.parent_fd = None
        if self.state == "done":
            for dfd, _ in self._made:
                os.close(dfd)
            self._made.clear()


class _Downloader:
    """Rank 0's reader thread: verifies the HTTP body block by block against the digests
    from packing and queues only verified ``chunk``-sized pieces (nothing unverified is
    ever forwarded or unpacked)."""

    def __init__(self, resp, chunk: int, depth: int, sums: bytes, block: int,
                 paced: int | None = None):
        self._resp, self._chunk, self._paced = resp, chunk, paced
        self._verifier = BlockVerifier(sums, block)
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = False
        self.error: str | None = None
        self._t = threading.Thread(target=self._run, name="download", daemon=True)
        self._t.start()

    def _run(self) -> None:
        pending = bytearray()
        try:
            while not self._stop:
                data = self._resp.read(self._chunk)
                last = not data
                pending += self._verifier.finish() if last else self._verifier.push(data)
                while len(pending) >= self._chunk or (last and pending):
                    self._q.put(bytes(pending[:self._chunk]))
                    del pending[:self._chunk]
                if last:
                    break
        except VerifyError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - becomes this rank's agreed failure
            self.error = f"download failed: {e}"
            if self._paced:  # a topology that understates its links slows the download
                self.error += (f" (the spool paced it at {self._paced} bytes/s from the "
                               "topology file's link rates)")
        finally:
            self._q.put(None)

    def get(self, idle: Callable[[], None]) -> bytes | None:
        return queue_get(self._q, idle)

    def close(self) -> None:
        self._stop = True
        try:
            self._resp.close()
        except Exception:  # noqa: BLE001
            pass


def _chunk_len(i: int, total: int, chunk: int) -> int:
    return min(chunk, total - i * chunk)


class _Frames:
    """The stream every rank receives, cut into frames of at most ``chunk`` bytes: the
    archive's block-digest table (``head`` bytes, 32 per block) in ``head_frames`` frames,
    then the archive (``total`` bytes). Every rank computes it from the job alone."""

    def __init__(self, head: int, total: int, chunk: int):
        self.head, self.total, self.chunk = head, total, chunk
        self.head_frames = -(-head // chunk)
        self.count = self.head_frames + -(-total // chunk)

    def length(self, i: int) -> int:
        """Bytes of frame ``i`` (0 <= i < count)."""
        if i < self.head_frames:
            return _chunk_len(i, self.head, self.chunk)
        return _chunk_len(i - self.head_frames, self.total, self.chunk)

    def checkpoint(self, faults: Faults, i: int) -> None:
        """The fault-injection point ``stage.chunk``, counted in archive segments."""
        if i >= self.head_frames:
            faults.checkpoint("stage.chunk", i - self.head_frames)


def _source(down: _Downloader, sums: bytes, frames: _Frames, failed: list[str],
            faults: Faults = NONE):
    """Rank 0's frame getter: the digest table, then the archive's verified segments of
    exactly the expected sizes, zero-filled after a download or verification error so the
    other ranks' protocol still completes; zeros fail every node's own block check, so
    nothing is unpacked from them. A ``stage.table`` replace rule sends that file's bytes
    as the table instead (a rank relaying a forged table; tests only)."""
    forged = faults.rule("stage.table")
    if forged is not None:
        with open(forged["file"], "rb") as f:
            sums = f.read(frames.head).ljust(frames.head, b"\0")

    def get(i: int, idle: Callable[[], None]) -> bytes:
        n = frames.length(i)
        if i < frames.head_frames:
            return sums[i * frames.chunk:i * frames.chunk + n]
        data = None if failed else down.get(idle)
        if data is None or len(data) != n:
            if not failed:
                failed.append(down.error or "archive shorter than announced")
            return bytes(n)
        return data

    return get


def chain(comm, frames: _Frames, get: Callable | None, sink: Callable,
          faults: Faults = NONE) -> None:
    """Move the ``frames`` down the one pipelined chain
    (:class:`mpitools.common.chain.Chain`) in rank order; every rank ``sink``s each.

    ``get(i, idle)`` gives rank 0's frame i; ``sink(data, idle)`` consumes a frame.
    """
    from mpi4py import MPI

    ch = Chain(comm, max_frame=frames.chunk, depth=_NBUF)
    try:
        if comm.rank == 0:
            for i in range(frames.count):
                data = get(i, ch.progress)
                frames.checkpoint(faults, i)
                ch.send(data)  # its wait tests the send itself; nothing else to move
                sink(data, ch.progress)
            ch.end()
        else:
            for i, data in enumerate(ch.frames(count=frames.count)):
                frames.checkpoint(faults, i)
                sink(data, ch.progress)  # the sink copies what it keeps
    except MPI.Exception as e:  # an error not tied to one request: neighbour unknown
        raise PeerLost(None, e.Get_error_string()) from None


def bcast(comm, frames: _Frames, get: Callable | None, sink: Callable,
          faults: Faults = NONE) -> None:
    """MPI_Bcast per frame into a preallocated buffer (the paper's Userstage)."""
    from mpi4py import MPI

    buf = bytearray(frames.chunk)
    for i in range(frames.count):
        n = frames.length(i)
        if comm.rank == 0:
            buf[:n] = get(i, lambda: None)
        comm.Bcast([buf, n, MPI.BYTE], root=0)
        frames.checkpoint(faults, i)
        sink(memoryview(buf)[:n], None)  # the sink copies what it keeps


def _open_url(url: str, size: int, timeout: float):
    """Rank 0's precondition: the archive is there and has the announced size."""
    import urllib.error  # here: only rank 0 downloads, and urllib costs 50 ms to import
    import urllib.request

    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        return None, f"spool: {url}: HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, f"spool unreachable: {url}: {reason}"
    length = resp.headers.get("Content-Length")
    if length is not None and int(length) != size:
        resp.close()
        return None, f"spool: {url}: archive is {length} bytes, expected {size}"
    return resp, None


def _fetch_sums(url: str, want: str, timeout: float) -> tuple[bytes | None, str | None]:
    """Rank 0: the archive's block digests, checked against the hash the job carries (the
    job comes from the CLI, not the spool, so a swapped digest file is refused too)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            sums = r.read()
    except urllib.error.HTTPError as e:
        return None, f"spool: {url}: HTTP {e.code} {e.reason}"
    except OSError as e:
        return None, f"spool unreachable: {url}: {getattr(e, 'reason', e)}"
    h = new_hasher("blake3")
    h.update(sums)
    if h.hexdigest() != want:
        return None, (f"spool: {url}: block digests differ from the packed ones (spool "
                      "changed?); nothing was sent")
    return sums, None


class _Run:
    """One rank's state through the phases of :func:`main`."""

    def __init__(self, comm, job: dict):
        self.comm, self.job, self.rank = comm, job, comm.rank
        self.host = rank_hosts(job)[self.rank]
        self.total, self.chunk = int(job["size"]), int(job["chunk"])
        self.faults = Faults.of(job, self.rank)
        dest = job["dests"][self.host]
        self.node = NodeStage(dest["root"], dest["rel"], job["jobid"],
                              replace=bool(job.get("replace")), shown=dest.get("shown"),
                              host_root=dest.get("host_root"))
        # "primary" marks the node whose own failure decided the outcome (vs. aborted with
        # it); "refused" a destination refused before anything was touched (the CLI exits 2)
        self.report = {"host": self.host, "ok": False, "bytes": 0, "seconds": 0.0,
                       "stage": "check", "error": None, "primary": False, "refused": False}
        self.phases: dict[str, float] = {}
        self.t0 = time.time()
        self.committed = False  # every node has moved its new tree in (the commit point)
        self.resp = None  # rank 0: the archive's HTTP response
        self.sums: bytes | None = None  # rank 0: the archive's block digests, from the spool

    def close_source(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None


def main(comm, job: dict) -> int:
    """Stage one archive to every rank's destination; rank 0 emits the result event.

    A sequence of phases, each ending in an agreement of every rank (mpiFileUtils' dsync
    is the model): check (the source, every destination), prepare (temp dirs, locks),
    transfer (move, unpack, verify), commit (renames); then every report goes to rank 0.
    Works on any intracommunicator (``rank_hosts(job)`` names each rank's host). A job
    with ``dry_run`` only checks, writing nothing (mpitools/stage/dryrun.py).
    """
    if job.get("dry_run"):
        from mpitools.stage.dryrun import main as dry_run

        return dry_run(comm, job)
    run = _Run(comm, job)
    if run.rank == 0:
        emit("start", time=run.t0, ranks=comm.size)
    if _check(run):
        try:
            if _prepare(run):
                _commit(run, _transfer(run))
        except BaseException:
            _stop(run)
            raise
    return _finish(run)


def _stop(run: _Run) -> None:
    """This rank was stopped mid-job (SIGTERM from mpiexec ending the job, an error): before
    the commit point it rolls back, after it (every node agreed its tree is in) it finishes
    forward, so that a job stopped there leaves every node with the new tree, not some
    nodes with the old one (two-phase commit)."""
    if not run.committed:
        run.node.abandon()
        return
    try:
        if run.node.state != "done":
            run.node.finish()
    except OSError:
        pass  # the tree is in place; only its mark or the old copy's removal is missing


def _check(run: _Run) -> bool:
    """Rank 0 checks the source (archive and its block digests) and every node its
    destination, before anyone touches a disk; agreed. False: nobody goes on."""
    comm, job, report = run.comm, run.job, run.report
    err = None
    if run.rank == 0:
        timeout = float(job.get("http_timeout", 30))
        run.resp, err = _open_url(job["url"], run.total, timeout)
        if err is None:
            run.sums, err = _fetch_sums(job["sums_url"], job["sums_hash"], timeout)
            if err is not None:
                run.close_source()
    # only the verdict: the digest table itself heads the data stream (_Frames), so it
    # crosses each link once, pipelined, instead of in a tree of whole copies before
    # anything moves (1.1-1.5 s of check at 32 nodes and 256 MiB on the testbed).
    # Quiet barriers before each pickled collective that waits on uneven work (here the
    # ranks' own start-up and rank 0's HTTP): a blocking collective spins in Open MPI's
    # progress loop, and spinning ranks take the cores from those still working
    wait(comm.Ibarrier())
    err = comm.bcast(err, root=0)
    refusal = None
    if err is None:
        try:
            run.node.check()
        except DestRefused as e:
            refusal = str(e)
    any_refused = agree_any(comm, refusal is not None)  # waited quietly, as every vote
    run.phases["check"] = time.time() - run.t0
    if err is None and not any_refused:
        return True
    run.close_source()
    if refusal is not None:
        report.update(error=refusal, primary=True, refused=True)
    elif err is not None:
        report.update(error=err if run.rank == 0 else "not started: the source check failed",
                      primary=run.rank == 0)
    else:
        report.update(error="not started: another node refused its destination")
    return False


def _prepare(run: _Run) -> bool:
    """Every node makes its locked temporary directory; agreed. False: nobody goes on
    (every node has undone what it did)."""
    t, report, node = time.time(), run.report, run.node
    try:
        report["stage"] = "prepare"
        node.prepare()
    except DestRefused as e:
        report.update(error=str(e), primary=True, refused=True)
    except BeneathError as e:  # names its path: a symlink on the way, the lock held
        report.update(error=str(e), primary=True)
    except OSError as e:
        report.update(error=f"cannot prepare {node.shown}: {e.strerror or e}", primary=True)
    if node.restored:  # what a refusal may not call untouched (driver: outcome)
        report["tidied"] = (f"put back {node.shown} from {node.restored}, a copy a dead run "
                            "had moved aside")
    failed = agree_any(run.comm, report["error"] is not None)
    run.phases["prepare"] = time.time() - t
    if failed:
        run.close_source()
        node.abandon()
        report["error"] = report["error"] or "aborted: another node failed to prepare"
        return False
    run.faults.checkpoint("stage.locked")
    return True


def _transfer(run: _Run) -> bool:
    """Move the bytes; each node unpacks only blocks it has verified, as they arrive; then
    everyone compares with rank 0's hash, rank 0 with the packer's; agreed. Returns
    whether any node failed."""
    job, rank, total, chunk, report = run.job, run.rank, run.total, run.chunk, run.report
    report["stage"] = "transfer"
    t = time.time()
    frames = _Frames(sums_size(total, int(job["block"])), total, chunk)
    rx = _Receiver(run, frames, t)
    down_failed: list[str] = []
    # the download runs ahead by up to --chunk bytes: a queue two segments deep
    # left rank 0 waiting on HTTP (0.83 of line rate against 0.90 with 4 MiB ahead)
    ahead = max(_NBUF, int(job.get("buffer", chunk)) // chunk)
    down = (_Downloader(run.resp, chunk, ahead, run.sums, int(job["block"]),
                        job.get("pacing")) if rank == 0 else None)
    get = _source(down, run.sums, frames, down_failed, run.faults) if rank == 0 else None
    algo = chain if job["algorithm"] == "chain" else bcast
    algo(run.comm, frames, get, rx, run.faults)
    if down is not None:
        down.close()
    local_err = down_failed[0] if down_failed else None
    if rx.ex is None:  # the digest table arrived damaged: nothing was unpacked
        got, digest = 0, None
        local_err = local_err or rx.error
    else:
        try:
            got, digest = rx.ex.finish(lambda: None)
        except Exception as e:  # noqa: BLE001 - a refused member, a bad block, a full disk
            got, digest = rx.ex.received, None
            local_err = local_err or _describe(e)
    report.update(bytes=got, seconds=time.time() - t)
    # verify: when rank 0 refused the download, the others only say they unpacked none
    report["stage"] = "verify"
    wait(run.comm.Ibarrier())  # nodes finish unpacking at different times
    ref, src_err = run.comm.bcast((digest, down_failed[0] if down_failed else None)
                                  if rank == 0 else None, root=0)
    primary = True
    if local_err is None:
        if rank == 0 and digest != job["hash"]:
            local_err = "archive hash differs from the packed one (spool file changed?)"
        elif got != total or digest != ref:
            local_err = f"received {got} of {total} bytes, hash mismatch"
    if rank and src_err is not None and local_err is not None:
        local_err, primary = "not unpacked: the archive was refused on rank 0", False
    report.update(error=local_err, primary=local_err is not None and primary)
    failed = agree_any(run.comm, local_err is not None)
    run.phases["transfer"] = time.time() - t
    return failed


class _Receiver:
    """Every rank's consumer of the stream (the ``sink`` of :func:`chain` and
    :func:`bcast`): the digest table first, checked against the job's ``sums_hash`` (the
    job comes from the CLI, not from the ranks that relayed the table), then the archive
    into an Extractor that unpacks only blocks verified against that table. A damaged
    table leaves ``ex`` None and ``error`` set: the rest of the stream is still taken (and
    forwarded by the chain) but nothing of it is used. Rank 0 reports progress every
    0.25 s."""

    def __init__(self, run: _Run, frames: _Frames, t: float):
        self.run, self.frames = run, frames
        self.ex: Extractor | None = None
        self.error: str | None = None
        self._table = bytearray()
        self._i = 0
        self._sent, self._shown = 0, t
        if frames.head_frames == 0:
            self._start()

    def __call__(self, data, idle) -> None:
        """Take one frame (bytes-like, valid only during the call: copied if kept)."""
        i, self._i = self._i, self._i + 1
        if i < self.frames.head_frames:
            self._table += data
            if i == self.frames.head_frames - 1:
                self._start()
            return
        if self.ex is not None:
            self.ex.feed(data, idle)
        if self.run.rank == 0:
            self._sent += len(data)
            if time.time() - self._shown > 0.25 or self._sent == self.frames.total:
                self._shown = time.time()
                emit("progress", done=self._sent, total=self.frames.total)

    def _start(self) -> None:
        job = self.run.job
        h = new_hasher("blake3")
        h.update(self._table)
        if h.hexdigest() != job["sums_hash"]:
            self.error = ("the archive's block digests arrived damaged (they differ from "
                          "the packed ones); nothing was unpacked")
            return
        self.ex = Extractor(self.run.node.tmp_fd, job["compress"], hash_alg=job["hash_alg"],
                            depth=int(job.get("depth", 4)), sums=bytes(self._table),
                            block=int(job["block"]))


def _commit(run: _Run, failed: bool) -> None:
    """Unless a node failed, every node renames its tree into place; agreed. Then every
    node marks its destination (all committed) or rolls back (any failed)."""
    t, report, node = time.time(), run.report, run.node
    if not failed:
        report["stage"] = "commit"
        if run.rank == 0:
            # from here a stopped job may leave nodes changed: the launcher must not
            # then say that nothing was committed (chiba_admin/commands/stage.py)
            emit("commit")
        run.faults.checkpoint("stage.commit")
        try:
            node.commit()
        except OSError as e:
            report.update(error=f"cannot rename into {node.shown}: {e.strerror or e}",
                          primary=True)
        failed = agree_any(run.comm, report["error"] is not None)
        if not failed:
            run.committed = True
            if run.rank == 0:
                emit("committed")  # every node has its new tree in place
            run.faults.checkpoint("stage.committed")
    if failed:
        node.abandon()
        report["error"] = report["error"] or "aborted: another node failed"
    else:
        node.finish()
        report.update(ok=True, stage="done")
    run.phases["commit"] = time.time() - t


def _describe(e: BaseException) -> str:
    name = type(e).__name__
    if isinstance(e, RefusedMember):
        return f"extract refused: {e}"
    if isinstance(e, VerifyError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"extract failed: {e.strerror}: {e.filename or ''}".rstrip(": ")
    return f"extract refused: {name}: {e}" if "Error" in name else f"extract failed: {e}"


def _finish(run: _Run) -> int:
    """Gather every node's report to rank 0, which emits the one result event."""
    run.report["maxrss"] = maxrss_bytes()
    wait(run.comm.Ibarrier())
    reports = run.comm.gather(run.report, root=0)
    if run.rank == 0:
        emit("result", ok=all(r["ok"] for r in reports), reports=reports, phases=run.phases,
             seconds=time.time() - run.t0, algorithm=run.job["algorithm"])
    return 0


if __name__ == "__main__":
    rank_main(main)
