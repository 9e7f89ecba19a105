"""The stage-out rank program: every node streams its PATH as a tar to rank 0 on the home server.

Run as ``mpiexec ... python -m mpitools.collect JOB``; rank 0 is the home server and writes
``DIR/<host>/<name>``; at most ``window`` nodes send at once so rank 0's memory is bounded.
"""

# Rank-side: keep imports lean (standard library, mpi4py, zstandard/blake3).
from __future__ import annotations

import os
import queue
import threading
import time

from .archive import (ChunkWriter, Extractor, clean_stale, lock_dir, pack_tree, remove_tree,
                      temp_names)
from .rankio import agree_any, emit, maxrss_bytes, rank_hosts, rank_main, wait

__all__ = ["main", "send_tree", "receive_all"]

_GO, _DATA, _STATUS = 31, 32, 33


class _Packer:
    """A thread packing ``path`` into chunk-sized pieces on a bounded queue."""

    def __init__(self, path: str, arcname: str, compress: str, chunk: int, hash_alg: str):
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.info = None
        self.error: str | None = None
        args = (path, arcname, compress, chunk, hash_alg)
        self._t = threading.Thread(target=self._run, args=args, name="pack", daemon=True)
        self._t.start()

    def _run(self, path, arcname, compress, chunk, hash_alg) -> None:
        w = ChunkWriter(self.q.put, chunk)
        try:
            self.info = pack_tree(path, w, compress, hash_alg=hash_alg, arcname=arcname)
            w.close()
        except Exception as e:  # noqa: BLE001 - reported to rank 0 in the status
            self.error = f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
        finally:
            self.q.put(None)

    def get(self, idle) -> bytes | None:
        while True:
            try:
                return self.q.get(timeout=0.001)
            except queue.Empty:
                idle()


def send_tree(comm, path: str, arcname: str, job: dict) -> dict:
    """A node's side: wait for rank 0's go, then send chunks, an empty end mark, a status."""
    from mpi4py import MPI

    req = comm.irecv(source=0, tag=_GO)
    while True:
        done, go = req.test()
        if done:
            break
        time.sleep(0.001)
    if not go:
        return {"ok": False}
    t = time.time()
    p = _Packer(path, arcname, job["compress"], int(job["chunk"]), job["hash_alg"])
    sends: list = [None, None]
    held: list = [None, None]
    i = 0
    while True:
        data = p.get(lambda: None)
        if data is None:
            break
        b = i % 2
        wait(sends[b])
        held[b] = data
        sends[b] = comm.Isend([data, len(data), MPI.BYTE], dest=0, tag=_DATA)
        i += 1
    for r in sends:
        wait(r)
    wait(comm.Isend([b"", 0, MPI.BYTE], dest=0, tag=_DATA))
    info = p.info
    status = {"ok": p.error is None and info is not None, "error": p.error,
              "bytes": info.bytes if info else 0, "hash": info.hash if info else None,
              "payload_bytes": info.payload_bytes if info else 0,
              "files": info.files if info else 0, "seconds": time.time() - t,
              "maxrss": maxrss_bytes()}
    wait(comm.isend(status, dest=0, tag=_STATUS))
    return status


class _Incoming:
    """Rank 0's state for one sending node: buffer, posted receive, extractor, temp dir."""

    def __init__(self, comm, rank: int, host: str, out_dir: str, job: dict):
        from mpi4py import MPI

        self.comm, self.rank, self.host = comm, rank, host
        self.final = os.path.join(out_dir, host)
        self.tmp, _ = temp_names(self.final, "collect", job["jobid"])
        os.mkdir(self.tmp)
        self.fd = lock_dir(self.tmp)
        self.ex = Extractor(self.tmp, job["compress"], hash_alg=job["hash_alg"], depth=2)
        self.buf = bytearray(int(job["chunk"]))
        self.status = MPI.Status()
        self.t = time.time()
        self.req = None
        self.post()
        comm.send(True, dest=rank, tag=_GO)

    def post(self) -> None:
        from mpi4py import MPI

        self.req = self.comm.Irecv([self.buf, MPI.BYTE], source=self.rank, tag=_DATA)

    def poll(self) -> int | None:
        """Bytes of a chunk that arrived (0 = end), or None when nothing yet."""
        from mpi4py import MPI

        if not self.req.Test(self.status):
            return None
        n = self.status.Get_count(MPI.BYTE)
        if n:
            self.ex.feed(bytes(self.buf[:n]))
            self.post()
        return n

    def close(self, name: str) -> dict:
        """End of stream: verify, move ``name`` into DIR/<host>/, report."""
        req = self.comm.irecv(source=self.rank, tag=_STATUS)
        while True:
            done, st = req.test()
            if done:
                break
            time.sleep(0.001)
        err = st.get("error")
        try:
            got, digest = self.ex.finish()
        except Exception as e:  # noqa: BLE001 - a refused member or a full disk here
            got, digest = self.ex.received, None
            err = err or f"unpack on the home server failed: {e}"
        if err is None and (got != st["bytes"] or digest != st["hash"]):
            err = f"received {got} of {st['bytes']} bytes, hash mismatch"
        if err is None:
            try:
                os.makedirs(self.final, exist_ok=True)
                target = os.path.join(self.final, name)
                old = os.path.join(self.tmp, ".old")
                if os.path.lexists(target):
                    os.rename(target, old)
                os.rename(os.path.join(self.tmp, name), target)
            except OSError as e:
                err = f"cannot move into {self.final}: {e.strerror or e}"
        remove_tree(self.tmp)
        os.close(self.fd)
        secs = time.time() - self.t
        return {"host": self.host, "ok": err is None, "bytes": got, "seconds": secs,
                "stage": "done" if err is None else "collect", "error": err,
                "primary": err is not None, "payload_bytes": st.get("payload_bytes", 0),
                "files": st.get("files", 0), "maxrss": st.get("maxrss")}


def receive_all(comm, hosts: list[str], ready: list[dict], out_dir: str, name: str,
                job: dict) -> list[dict]:
    """Rank 0: receive every ready node's stream, ``window`` nodes at a time."""
    window = max(1, int(job.get("window", 4)))
    reports: dict[int, dict] = {}
    todo = []
    for r in range(1, comm.size):
        if ready[r]["ok"]:
            todo.append(r)
        else:
            comm.send(False, dest=r, tag=_GO)
            reports[r] = {"host": hosts[r], "ok": False, "bytes": 0, "seconds": 0.0,
                          "stage": "check", "error": ready[r]["error"], "primary": True}
    active: dict[int, _Incoming] = {}
    total, last = 0, 0.0
    while todo or active:
        while todo and len(active) < window:
            r = todo.pop(0)
            try:
                active[r] = _Incoming(comm, r, hosts[r], out_dir, job)
            except OSError as e:
                comm.send(False, dest=r, tag=_GO)
                reports[r] = {"host": hosts[r], "ok": False, "bytes": 0, "seconds": 0.0,
                              "stage": "collect", "primary": True,
                              "error": f"cannot write into {out_dir}: {e.strerror or e}"}
        moved = False
        for r, inc in list(active.items()):
            n = inc.poll()
            if n is None:
                continue
            moved = True
            total += n
            if n == 0:
                reports[r] = inc.close(name)
                del active[r]
        if time.time() - last > 0.25:
            last = time.time()
            emit("progress", done=total, hosts_done=len(reports), hosts=comm.size - 1)
        if not moved:
            time.sleep(0.001)
    return [reports[r] for r in sorted(reports)]


def main(comm, job: dict) -> int:
    """Collect every node's path into ``job['out_dir']/<host>/`` on rank 0."""
    rank = comm.rank
    hosts = rank_hosts(job)
    t0 = time.time()
    if rank == 0:
        emit("start", time=t0, ranks=comm.size)
        err = None
        try:
            os.makedirs(job["out_dir"], exist_ok=True)
            clean_stale(job["out_dir"])
        except OSError as e:
            err = f"cannot create {job['out_dir']}: {e.strerror or e}"
        mine = {"ok": err is None, "error": err}
    else:
        path = job["paths"][hosts[rank]]
        ok = os.path.exists(path)
        shown = job.get("host_paths", {}).get(hosts[rank], path)
        mine = {"ok": ok, "error": None if ok else f"{shown} does not exist"}
    if agree_any(comm, rank == 0 and not mine["ok"]):
        if rank == 0:
            emit("result", ok=False, reports=[], error=mine["error"], phases={},
                 seconds=time.time() - t0)
        return 0
    ready = comm.gather(mine, root=0)
    t = time.time()
    if rank == 0:
        reports = receive_all(comm, hosts, ready, job["out_dir"], job["name"], job)
        emit("result", ok=all(r["ok"] for r in reports), reports=reports,
             phases={"check": t - t0, "collect": time.time() - t},
             seconds=time.time() - t0, maxrss_root=maxrss_bytes())
    elif mine["ok"]:
        send_tree(comm, job["paths"][hosts[rank]], job["name"], job)
    else:
        send_tree(comm, "", job["name"], job)  # rank 0 answers "skip"; nothing is sent
    return 0


if __name__ == "__main__":
    rank_main(main)
