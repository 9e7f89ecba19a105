"""The staging rank program: rank 0 downloads, MPI spreads the chunks, every node commits or none.

Run as ``mpiexec ... python -m mpitools.stage JOB`` (JOB from ``rankio.encode_job``).
"""

# Rank-side: standard library, mpi4py, zstandard/blake3 only; imports stay lean (every
# rank of a launch imports this; numpy alone cost 0.13 s of CPU per rank)
# because every rank pays for them at start-up (DESIGN.md).
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

from .archive import Extractor, clean_stale, lock_dir, remove_tree, temp_names
from .rankio import (PeerLost, agree_any, emit, maxrss_bytes, rank_hosts, rank_main, test_hook,
                     wait)

__all__ = ["ALGORITHMS", "NodeStage", "chain", "bcast", "main"]

ALGORITHMS = ("chain", "bcast")
_TAG = 17
_NBUF = 2  # double buffering: one chunk in flight downstream while the next arrives


class NodeStage:
    """One node's side of all-or-nothing: temp dir, vote, rename in, or roll back."""

    def __init__(self, dest: str, jobid: str):
        self.dest = os.path.normpath(dest)
        self.tmp, self.old = temp_names(self.dest, "stage", jobid)
        self.parent = os.path.dirname(self.dest)
        self.made_parents: list[str] = []
        self.fds: list[int] = []
        self.state = "new"  # new -> prepared -> committed -> done | removed

    def prepare(self) -> None:
        """Clean dead jobs' leftovers, create the parent if needed and the locked temp dir."""
        missing = []
        p = self.parent
        while p and not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            os.mkdir(d)
            self.made_parents.append(d)
        clean_stale(self.parent)
        if os.path.lexists(self.dest) and not os.path.isdir(self.dest):
            raise OSError(f"{self.dest} exists and is not a directory")
        os.mkdir(self.tmp, 0o755)
        self.fds.append(lock_dir(self.tmp))
        self.state = "prepared"

    def commit(self) -> None:
        """Move an existing destination aside (locked) and the new tree in."""
        if os.path.isdir(self.dest) and not os.path.islink(self.dest):
            os.rename(self.dest, self.old)
            self.state = "aside"
        os.rename(self.tmp, self.dest)
        self.state = "committed"

    def finish(self) -> None:
        """Everyone committed: drop the old copy."""
        if os.path.lexists(self.old):
            remove_tree(self.old)
        self.state = "done"
        self._unlock()

    def abandon(self) -> None:
        """Undo whatever this node did: roll back a commit, remove temp dirs and new parents."""
        try:
            if self.state == "committed":
                os.rename(self.dest, self.tmp)
                self.state = "aside" if os.path.lexists(self.old) else "prepared"
            if self.state == "aside" and os.path.lexists(self.old):
                if not os.path.lexists(self.dest):
                    os.rename(self.old, self.dest)
            for d in (self.tmp, self.old):
                if os.path.lexists(d) and d != self.dest:
                    remove_tree(d)
            for d in reversed(self.made_parents):
                try:
                    os.rmdir(d)
                except OSError:
                    break
        finally:
            self.state = "removed"
            self._unlock()

    def _unlock(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class _Downloader:
    """Rank 0's reader thread: fills ``chunk``-sized pieces from the HTTP response."""

    def __init__(self, resp, chunk: int, depth: int = _NBUF):
        self._resp, self._chunk = resp, chunk
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = False
        self.error: str | None = None
        self._t = threading.Thread(target=self._run, name="download", daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                buf = bytearray(self._chunk)
                view, got = memoryview(buf), 0
                while got < self._chunk:
                    n = self._resp.readinto(view[got:])
                    if not n:
                        break
                    got += n
                self._q.put(bytes(view[:got]) if got < self._chunk else bytes(buf))
                if got < self._chunk:
                    break
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
    """Rank 0's chunk getter: exactly the expected sizes, zero-filled after a download error
    so the other ranks' protocol still completes and the hash vote fails everyone."""

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
    # "primary" marks the node whose own failure decided the outcome (vs. aborted with it)
    report = {"host": host, "ok": False, "bytes": 0, "seconds": 0.0, "stage": "check",
              "error": None, "primary": False}
    phases: dict[str, float] = {}
    t0 = time.time()
    if rank == 0:
        emit("start", time=t0, ranks=size)

    # 1. rank 0 checks the source before anyone touches a disk; the verdict is broadcast
    resp, err = (None, None)
    if rank == 0:
        resp, err = _open_url(job["url"], total, float(job.get("http_timeout", 30)))
    err = comm.bcast(err, root=0)
    phases["check"] = time.time() - t0
    if err is not None:
        report.update(error=err if rank == 0 else "not started: the source check failed",
                      primary=rank == 0)
        return _finish(comm, job, report, phases, t0)

    # 2. every node prepares its temporary directory; any failure stops everyone
    node = NodeStage(dest, job["jobid"])
    t = time.time()
    try:
        try:
            report["stage"] = "prepare"
            node.prepare()
        except OSError as e:
            report.update(error=f"cannot prepare {dest}: {e.strerror or e}", primary=True)
        failed = agree_any(comm, report["error"] is not None)
        phases["prepare"] = time.time() - t
        if failed:
            if resp is not None:
                resp.close()
            node.abandon()
            report["error"] = report["error"] or "aborted: another node failed to prepare"
            return _finish(comm, job, report, phases, t0)

        # 3. move the bytes; each node unpacks while they arrive
        report["stage"] = "transfer"
        t = time.time()
        ex = Extractor(node.tmp, job["compress"], hash_alg=job["hash_alg"],
                       depth=int(job.get("depth", 4)))
        down_failed: list[str] = []
        # the download runs ahead by up to --chunk bytes: a queue two segments deep
        # left rank 0 waiting on HTTP (0.83 of line rate against 0.90 with 4 MiB ahead)
        ahead = max(_NBUF, int(job.get("buffer", chunk)) // chunk)
        down = _Downloader(resp, chunk, ahead) if rank == 0 else None
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
        except Exception as e:  # noqa: BLE001 - the tar filter's refusal or a full disk
            got, digest = ex.received, None
            local_err = local_err or _describe(e)
        report.update(bytes=got, seconds=time.time() - t)

        # 4. verify: everyone compares with rank 0's hash, rank 0 with the packer's
        report["stage"] = "verify"
        ref = comm.bcast(digest, root=0)
        if local_err is None:
            if rank == 0 and digest != job["hash"]:
                local_err = "archive hash differs from the packed one (spool file changed?)"
            elif got != total or digest != ref:
                local_err = f"received {got} of {total} bytes, hash mismatch"
        report.update(error=local_err, primary=local_err is not None)
        failed = agree_any(comm, local_err is not None)
        phases["transfer"] = time.time() - t
        t = time.time()
        if not failed:
            report["stage"] = "commit"
            try:
                node.commit()
            except OSError as e:
                report.update(error=f"cannot rename into {dest}: {e.strerror or e}",
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
