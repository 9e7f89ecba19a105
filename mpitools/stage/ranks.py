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
from typing import Callable

from inventory.beneath import (BeneathError, lock_dest, mark_staged, open_dir_beneath,
                               open_root, split_rel, unlock_dest, was_staged)

from mpitools.common.archive import (BlockVerifier, Extractor, RefusedMember, VerifyError, clean_stale,
                      make_locked_temp, remove_entry, temp_name)
from mpitools.common.runtime import (PeerLost, agree_any, emit, maxrss_bytes, rank_hosts, rank_main, test_hook,
                     wait)

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


class NodeStage:
    """One node's side of all-or-nothing below a confined destination ``root`` + ``rel``.

    Every directory below ``root`` is opened without following symlinks
    (:mod:`inventory.beneath`); the destination's run lock is held from ``prepare`` to the
    end; the temporary directory ``.NAME.chiba-stage-JOBID`` (0700, flock-held) becomes the
    destination by a rename within the parent's fd, and the destination is marked as staged.
    An existing destination without that mark is refused unless ``replace``.
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
                self._check_dest(pfd)
            finally:
                os.close(pfd)
        finally:
            os.close(root_fd)

    def _check_dest(self, pfd: int) -> None:
        st = _exists(pfd, self.name)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            raise DestRefused(f"{self.shown} is a symbolic link (not followed, not replaced)")
        if not stat.S_ISDIR(st.st_mode):
            raise DestRefused(f"{self.shown} exists and is not a directory")
        if not self.replace and not was_staged(pfd, self.name):
            raise DestRefused(f"{self.shown} exists and was not created by chiba-admin stage;"
                              " pass --replace to replace it")

    def prepare(self) -> None:
        """Walk (making missing parents), lock, clean dead jobs' leftovers, re-check, make
        the locked temp dir. Raises OSError/BeneathError (EBUSY: another run holds the
        lock) or DestRefused."""
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
        clean_stale(fd, self.name)  # we hold the lock: no live run of ours uses them
        self._check_dest(fd)
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

    def __init__(self, resp, chunk: int, depth: int, sums: bytes, block: int):
        self._resp, self._chunk = resp, chunk
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
        finally:
            self._q.put(None)

    def get(self, idle: Callable[[], None]) -> bytes | None:
        while True:
            try:
                return self._q.get(timeout=0.001)
            except queue.Empty:
                idle()

    def close(self) -> None:
        self._stop = True
        try:
            self._resp.close()
        except Exception:  # noqa: BLE001
            pass


def _chunk_len(i: int, total: int, chunk: int) -> int:
    return min(chunk, total - i * chunk)


def _source(down: _Downloader, total: int, chunk: int, failed: list[str]):
    """Rank 0's chunk getter: exactly the expected sizes, zero-filled after a download or
    verification error so the other ranks' protocol still completes; zeros fail every
    node's own block check, so nothing is unpacked from them."""

    def get(i: int, idle: Callable[[], None]) -> bytes:
        n = _chunk_len(i, total, chunk)
        data = None if failed else down.get(idle)
        if data is None or len(data) != n:
            if not failed:
                failed.append(down.error or "archive shorter than announced")
            return bytes(n)
        return data

    return get


def chain(comm, total: int, chunk: int, get: Callable | None, sink: Callable,
          hooks: Callable[[int], None]) -> None:
    """Pipelined chain in rank order: each rank receives from rank-1 and forwards to rank+1.

    Non-blocking sends and receives, two buffers per rank, waits by Test + sleep.
    """
    from mpi4py import MPI

    rank, size = comm.rank, comm.size
    nxt = rank + 1 if rank + 1 < size else None
    n_chunks = -(-total // chunk)
    bufs = [bytearray(chunk) for _ in range(_NBUF)] if rank else []
    recvs: list = [None] * _NBUF
    sends: list = [None] * _NBUF
    held: list = [None] * _NBUF  # rank 0 sends from bytes objects; keep them alive

    def progress() -> None:
        for b in range(_NBUF):
            if sends[b] is not None:
                try:
                    if sends[b].Test():
                        sends[b], held[b] = None, None
                except MPI.Exception as e:
                    raise PeerLost(nxt, e.Get_error_string()) from None

    def post_recv(i: int) -> None:
        b = i % _NBUF
        recvs[b] = comm.Irecv([bufs[b], _chunk_len(i, total, chunk), MPI.BYTE],
                              source=rank - 1, tag=_TAG)

    try:
        _chain_loop(comm, total, chunk, get, sink, hooks, n_chunks, bufs, recvs, sends, held,
                    progress, post_recv, nxt)
    except MPI.Exception as e:  # an error not tied to one request: neighbour unknown
        raise PeerLost(None, e.Get_error_string()) from None


def _chain_loop(comm, total, chunk, get, sink, hooks, n_chunks, bufs, recvs, sends, held,
                progress, post_recv, nxt) -> None:
    from mpi4py import MPI

    rank = comm.rank
    if rank:
        for i in range(min(_NBUF, n_chunks)):
            post_recv(i)
    for i in range(n_chunks):
        b, n = i % _NBUF, _chunk_len(i, total, chunk)
        if rank == 0:
            wait(sends[b], progress, nxt)
            data = get(i, progress)
        else:
            wait(recvs[b], progress, rank - 1)
            data = memoryview(bufs[b])[:n]
        hooks(i)
        if nxt is not None:
            wait(sends[b], None, nxt)
            held[b] = data
            sends[b] = comm.Isend([data, n, MPI.BYTE], dest=nxt, tag=_TAG)
        sink(bytes(data), progress)
        if rank and i + _NBUF < n_chunks:
            wait(sends[b], progress, nxt)  # the buffer is reused by chunk i + _NBUF
            post_recv(i + _NBUF)
    for r in sends:
        wait(r, None, nxt)


def bcast(comm, total: int, chunk: int, get: Callable | None, sink: Callable,
          hooks: Callable[[int], None]) -> None:
    """MPI_Bcast per chunk into a preallocated buffer (the paper's Userstage)."""
    from mpi4py import MPI

    buf = bytearray(chunk)
    for i in range(-(-total // chunk)):
        n = _chunk_len(i, total, chunk)
        if comm.rank == 0:
            buf[:n] = get(i, lambda: None)
        comm.Bcast([buf, n, MPI.BYTE], root=0)
        hooks(i)
        sink(bytes(buf[:n]), None)


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

    from mpitools.common.archive import new_hasher

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


def _hold(fifo_dir: str) -> None:
    """Test hook CHIBA_TEST_HOLD=rank:DIR: with every lock taken, say so through the FIFO
    DIR/ready and wait for DIR/go (a barrier with the test, no sleeps)."""
    with open(os.path.join(fifo_dir, "ready"), "w") as f:
        f.write("ready\n")
    with open(os.path.join(fifo_dir, "go")) as f:
        f.read()


def _make_hooks(rank: int) -> Callable[[int], None]:
    """Test hooks (CHIBA_TEST_DIE=rank:chunk, CHIBA_TEST_DELAY=rank:seconds)."""
    die = test_hook("die", rank)
    delay = test_hook("delay", rank)
    die_at = int(die) if die is not None else None
    pause = float(delay) if delay is not None else 0.0

    def hooks(i: int) -> None:
        if die_at is not None and i >= die_at:
            os._exit(9)  # a node dying mid-transfer, without any goodbye
        if pause:
            time.sleep(pause)

    return hooks


def main(comm, job: dict) -> int:
    """Stage one archive to every rank's destination; rank 0 emits the result event."""
    rank, size = comm.rank, comm.size
    host = rank_hosts(job)[rank]
    dest = job["dests"][host]
    total, chunk = int(job["size"]), int(job["chunk"])
    # "primary" marks the node whose own failure decided the outcome (vs. aborted with it);
    # "refused" a destination refused before anything was touched (the CLI exits 2)
    report = {"host": host, "ok": False, "bytes": 0, "seconds": 0.0, "stage": "check",
              "error": None, "primary": False, "refused": False}
    phases: dict[str, float] = {}
    t0 = time.time()
    if rank == 0:
        emit("start", time=t0, ranks=size)

    # 1. rank 0 checks the source (archive and its block digests) and every node its
    #    destination, before anyone touches a disk; the verdicts are agreed
    resp, err, sums = None, None, None
    timeout = float(job.get("http_timeout", 30))
    if rank == 0:
        resp, err = _open_url(job["url"], total, timeout)
        if err is None:
            sums, err = _fetch_sums(job["sums_url"], job["sums_hash"], timeout)
            if err is not None:
                resp.close()
                resp = None
    err, sums = comm.bcast((err, sums), root=0)
    node = NodeStage(dest["root"], dest["rel"], job["jobid"], replace=bool(job.get("replace")),
                     shown=dest.get("shown"), host_root=dest.get("host_root"))
    refusal = None
    if err is None:
        try:
            node.check()
        except DestRefused as e:
            refusal = str(e)
    any_refused = agree_any(comm, refusal is not None)  # waited quietly, as every vote
    phases["check"] = time.time() - t0
    if err is not None or any_refused:
        if resp is not None:
            resp.close()
        if refusal is not None:
            report.update(error=refusal, primary=True, refused=True)
        elif err is not None:
            report.update(error=err if rank == 0 else "not started: the source check failed",
                          primary=rank == 0)
        else:
            report.update(error="not started: another node refused its destination")
        return _finish(comm, job, report, phases, t0)

    # 2. every node prepares its temporary directory; any failure stops everyone
    t = time.time()
    try:
        try:
            report["stage"] = "prepare"
            node.prepare()
        except DestRefused as e:
            report.update(error=str(e), primary=True, refused=True)
        except BeneathError as e:  # names its path: a symlink on the way, the lock held
            report.update(error=str(e), primary=True)
        except OSError as e:
            report.update(error=f"cannot prepare {node.shown}: {e.strerror or e}",
                          primary=True)
        failed = agree_any(comm, report["error"] is not None)
        phases["prepare"] = time.time() - t
        if failed:
            if resp is not None:
                resp.close()
            node.abandon()
            report["error"] = report["error"] or "aborted: another node failed to prepare"
            return _finish(comm, job, report, phases, t0)

        hold = test_hook("hold", rank)
        if hold is not None:
            _hold(hold)

        # 3. move the bytes; each node unpacks only blocks it has verified, as they arrive
        report["stage"] = "transfer"
        t = time.time()
        ex = Extractor(node.tmp_fd, job["compress"], hash_alg=job["hash_alg"],
                       depth=int(job.get("depth", 4)), sums=sums, block=int(job["block"]))
        down_failed: list[str] = []
        # the download runs ahead by up to --chunk bytes: a queue two segments deep
        # left rank 0 waiting on HTTP (0.83 of line rate against 0.90 with 4 MiB ahead)
        ahead = max(_NBUF, int(job.get("buffer", chunk)) // chunk)
        down = _Downloader(resp, chunk, ahead, sums, int(job["block"])) if rank == 0 else None
        get = _source(down, total, chunk, down_failed) if rank == 0 else None
        sent = [0, t]

        def sink(data: bytes, idle) -> None:
            ex.feed(data, idle)
            if rank == 0:
                sent[0] += len(data)
                if time.time() - sent[1] > 0.25 or sent[0] == total:
                    sent[1] = time.time()
                    emit("progress", done=sent[0], total=total)

        algo = chain if job["algorithm"] == "chain" else bcast
        algo(comm, total, chunk, get, sink, _make_hooks(rank))
        if down is not None:
            down.close()
        local_err = down_failed[0] if down_failed else None
        try:
            got, digest = ex.finish(lambda: None)
        except Exception as e:  # noqa: BLE001 - a refused member, a bad block, a full disk
            got, digest = ex.received, None
            local_err = local_err or _describe(e)
        report.update(bytes=got, seconds=time.time() - t)

        # 4. verify: everyone compares with rank 0's hash, rank 0 with the packer's; when
        #    rank 0 refused the download, the others only say they unpacked none of it
        report["stage"] = "verify"
        ref, src_err = comm.bcast((digest, down_failed[0] if down_failed else None)
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
        failed = agree_any(comm, local_err is not None)
        phases["transfer"] = time.time() - t
        t = time.time()
        if not failed:
            report["stage"] = "commit"
            try:
                node.commit()
            except OSError as e:
                report.update(error=f"cannot rename into {node.shown}: {e.strerror or e}",
                              primary=True)
            failed = agree_any(comm, report["error"] is not None)
        if failed:
            node.abandon()
            report["error"] = report["error"] or "aborted: another node failed"
        else:
            node.finish()
            report.update(ok=True, stage="done")
        phases["commit"] = time.time() - t
    except BaseException:
        node.abandon()
        raise
    return _finish(comm, job, report, phases, t0)


def _describe(e: BaseException) -> str:
    name = type(e).__name__
    if isinstance(e, RefusedMember):
        return f"extract refused: {e}"
    if isinstance(e, VerifyError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"extract failed: {e.strerror}: {e.filename or ''}".rstrip(": ")
    return f"extract refused: {name}: {e}" if "Error" in name else f"extract failed: {e}"


def _finish(comm, job: dict, report: dict, phases: dict, t0: float) -> int:
    """Gather every node's report to rank 0, which emits the one result event."""
    report["maxrss"] = maxrss_bytes()
    reports = comm.gather(report, root=0)
    if comm.rank == 0:
        emit("result", ok=all(r["ok"] for r in reports), reports=reports, phases=phases,
             seconds=time.time() - t0, algorithm=job["algorithm"])
    return 0


if __name__ == "__main__":
    rank_main(main)
