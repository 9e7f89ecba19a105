"""The stage-out rank program: every node streams its PATH as a tar to rank 0 on the home server.

Run as ``mpiexec ... python -m mpitools.collect.ranks JOB``; rank 0 is the home server and writes
``DIR/<host>/<name>``; at most ``window`` nodes send at once so rank 0's memory is bounded.
"""

# Rank-side: keep imports lean (standard library, mpi4py, zstandard/blake3).
from __future__ import annotations

import errno
import os
import queue
import stat
import threading
import time

from inventory.beneath import (BeneathError, clean_staged_leftovers, lock_dest, mark_staged,
                               open_dir_beneath, open_root, unlock_dest, was_staged)
from inventory.homedir import (NoSpace, SpaceGuard, drop_collect_dir, member_cost,
                               open_collect_dir)

from mpitools.common.archive import (ChunkWriter, Extractor, PackInfo, RefusedMember,
                                     clean_stale, make_locked_temp, new_hasher, pack_tree,
                                     remove_entry, temp_name)
from mpitools.common.chain import Sender
from mpitools.common.faults import NONE, Faults
from mpitools.common.runtime import (Backoff, emit, maxrss_bytes, rank_hosts, rank_main,
                                     wait)

__all__ = ["main", "check_node", "send_tree", "receive_all", "entry_id"]

# _STOP: rank 0 to a sending node, exactly once per node that was told to go: True when
# its stream is refused part-way (the home file system would fill, a member refused: the
# node stops packing, which could otherwise read a 50 TB sparse file for days), False
# after its end mark (nothing is left unmatched on a service's long-lived communicator)
_GO, _DATA, _STATUS, _STOP = 31, 32, 33, 34
# how often a node waiting for its packer's next chunk looks for rank 0's stop
_STOP_POLL = 0.25
# what to do about a symlink at or above collect's PATH on a node (one line, with the path)
SYMLINK_HINT = ("collect reads as root on the nodes and never follows one: name the real "
                "directory below scratch, or remove the link")


class _Stopped(Exception):
    """The packer was told to stop (rank 0 refused this node's stream part-way)."""


class _Packer:
    """A thread packing ``path`` into chunk-sized pieces on a bounded queue.

    :meth:`stop` makes its next piece end it; the thread packs from its own copy of
    ``dir_fd``, so it never reads through a descriptor its caller closed meanwhile."""

    def __init__(self, path: str, arcname: str, compress: str, chunk: int, hash_alg: str,
                 faults: Faults = NONE, dir_fd: int | None = None):
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.faults = faults
        self.dir_fd = None if dir_fd is None else os.dup(dir_fd)
        self.info = None
        self.error: str | None = None
        self.stopped = False
        args = (path, arcname, compress, chunk, hash_alg)
        self._t = threading.Thread(target=self._run, args=args, name="pack", daemon=True)
        self._t.start()

    def _put(self, piece: bytes) -> None:
        if self.stopped:
            raise _Stopped()
        self.q.put(piece)

    def stop(self) -> None:
        """Stop packing; nothing more is read from the queue (the thread ends at its next
        piece, or with the process)."""
        self.stopped = True
        try:
            while True:
                self.q.get_nowait()  # a thread blocked on a full queue goes on to stop
        except queue.Empty:
            pass

    def _run(self, path, arcname, compress, chunk, hash_alg) -> None:
        w = ChunkWriter(self._put, chunk)
        try:
            crafted = self.faults.rule("collect.archive")
            if crafted is not None:
                self.info = _send_file(crafted["file"], w, compress, hash_alg)  # a hostile node
            else:
                self.info = pack_tree(path, w, compress, hash_alg=hash_alg, arcname=arcname,
                                      dir_fd=self.dir_fd)
            w.close()
        except _Stopped:
            pass
        except Exception as e:  # noqa: BLE001 - reported to rank 0 in the status
            self.error = read_error(path, e)
        finally:
            if self.dir_fd is not None:
                os.close(self.dir_fd)
            if not self.stopped:
                self.q.put(None)

    def get(self, timeout: float) -> bytes | None | bool:
        """The next piece, None at the end, False when none came within ``timeout`` s."""
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return False


def read_error(path: str, e: BaseException) -> str:
    """One line for a node that could not pack ``path``: the entry below it that failed
    when the packer named it (``path/sub/file``), else ``path``."""
    name = getattr(e, "filename", None)
    if not (isinstance(name, str) and name.startswith(path.rstrip("/") + "/")):
        name = path
    return f"cannot read {name}: {getattr(e, 'strerror', None) or e}"


def _send_file(path: str, w: ChunkWriter, compress: str, hash_alg: str) -> PackInfo:
    """Fault ``collect.archive`` (``replace``, ``file``): send the file's bytes as this
    node's archive, as a compromised node could (the home server must refuse what it
    holds; mpitools/common/faults.py)."""
    h, n = new_hasher(hash_alg), 0
    # a test fault's file (checked by the CLI: regular, world-readable); never a symlink
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while data := f.read(1 << 16):
            h.update(data)
            w.write(data)
            n += len(data)
    return PackInfo(n, h.hexdigest(), hash_alg, n, 0, compress)


def open_source(spec: dict) -> tuple[int, str]:
    """A node's PATH: (fd of its parent, walked below root without following symlinks,
    its name). Raises BeneathError naming the path: ELOOP when PATH or a directory on the
    way below root is a symbolic link (``/scratch/job -> /etc``, planted by a user: root
    would read and send home what it points to), ENOENT when missing."""
    parent, _, name = spec["rel"].rpartition("/")
    root_fd = open_root(spec["root"])
    try:
        pfd = open_dir_beneath(root_fd, parent, display=spec.get("host_root", spec["root"]))
    finally:
        os.close(root_fd)
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        os.close(pfd)
        raise BeneathError(errno.ENOENT, "does not exist", spec.get("shown", name)) from None
    if stat.S_ISLNK(st.st_mode):
        os.close(pfd)
        raise BeneathError(errno.ELOOP, "is a symbolic link (not followed)",
                           spec.get("shown", name))
    return pfd, name


def send_tree(comm, path: str, arcname: str, job: dict, dir_fd: int | None = None,
              faults: Faults = NONE) -> dict:
    """A node's side: wait for rank 0's go, then send chunks (at most two in flight, a
    :class:`mpitools.common.chain.Sender`), an empty end mark, a status, and take rank 0's
    one stop message (``_STOP``): True part-way stops the packer and the stream at once
    (the status then carries ``stopped`` and no error: rank 0 says why), False after
    the end."""
    if not wait(comm.irecv(source=0, tag=_GO)):
        return {"ok": False}
    t = time.time()
    p = _Packer(path, arcname, job["compress"], int(job["chunk"]), job["hash_alg"], faults,
                dir_fd)
    out = Sender(comm, 0, tag=_DATA, end_tag=_DATA, depth=2)
    told = None
    while told is None and (data := p.get(_STOP_POLL)) is not None:
        if comm.Iprobe(source=0, tag=_STOP):
            told = comm.recv(source=0, tag=_STOP)
            p.stop()
        elif data is not False:
            out.send(data)
    out.end()
    info = None if told else p.info
    status = {"ok": not told and p.error is None and info is not None,
              "error": None if told else p.error, "stopped": bool(told),
              "bytes": info.bytes if info else 0, "hash": info.hash if info else None,
              "payload_bytes": info.payload_bytes if info else 0,
              "files": info.files if info else 0, "seconds": time.time() - t,
              "maxrss": maxrss_bytes()}
    wait(comm.isend(status, dest=0, tag=_STATUS))
    if told is None:
        wait(comm.irecv(source=0, tag=_STOP))
    return status


def _guarded(guard: SpaceGuard):
    """An ``on_member`` for the extractor (:func:`mpitools.common.archive.unpack_stream`):
    ``guard`` is asked before each member is created and told after
    (:func:`inventory.homedir.member_cost`), so a member too large for the home file
    system's space above its reserve is never written (NoSpace, the extraction's error)."""
    def before(m):
        cost = member_cost(m.size if m.kind == "file" else 0)
        guard.take(cost)
        return lambda created: guard.wrote(cost, check=created)
    return before


class _Incoming:
    """Rank 0's state for one sending node: its locked ``DIR/<host>/`` slot (made ``0700``
    when missing), buffer, posted receive, extractor (asking ``guard`` before each member)
    and temporary directory (``.NAME.chiba-collect-JOBID``, 0700); a previous copy is
    moved aside beside it (the same name + ``.old``) while the new one goes in, where
    ``clean_stale`` puts it back if a killed job left no copy in place. A stream the
    extractor refuses part-way stops the node (``_STOP``)."""

    def __init__(self, comm, rank: int, host: str, out_fd: int, job: dict,
                 guard: SpaceGuard):
        from mpi4py import MPI

        self.comm, self.rank, self.host = comm, rank, host
        self.name, self.jobid = job["names"][host], job["jobid"]
        self.shown = os.path.join(job["out_dir"], host, self.name)
        self.made_host = False
        self.faults = Faults.of(job, comm.rank)
        try:
            self.hfd = open_dir_beneath(out_fd, host, display=job["out_dir"])
        except BeneathError as e:
            if e.errno != errno.ENOENT:
                raise
            os.mkdir(host, 0o700, dir_fd=out_fd)  # root-only: a node's setuid files
            self.made_host, self.out_fd = True, out_fd
            self.hfd = open_dir_beneath(out_fd, host, display=job["out_dir"])
        self.out_fd = out_fd
        self.lock = self.tmp_fd = None
        try:
            self.lock = lock_dest(self.hfd, self.name, display=os.path.dirname(self.shown))
            clean_stale(self.hfd, self.name)
            clean_staged_leftovers(self.hfd, self.name, self.lock)
            self._check(bool(job.get("replace")))
            self.tmp = temp_name(self.name, "collect", self.jobid)
            self.tmp_fd = make_locked_temp(self.hfd, self.tmp)
        except BaseException:
            self._release(ok=False)
            raise
        self.ex = Extractor(self.tmp_fd, job["compress"], hash_alg=job["hash_alg"], depth=2,
                            on_member=_guarded(guard))
        self.stop_sent = False
        self.buf = bytearray(int(job["chunk"]))
        self.status = MPI.Status()
        self.t = time.time()
        self.req = None
        self.post()
        comm.send(True, dest=rank, tag=_GO)

    def _check(self, replace: bool) -> None:
        try:
            st = os.stat(self.name, dir_fd=self.hfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not replace and not was_staged(self.hfd, self.name):
            raise OSError(errno.EEXIST, f"{self.shown} exists and was not created by "
                          "chiba-admin collect; pass --replace to replace it")
        del st

    def post(self) -> None:
        from mpi4py import MPI

        self.req = self.comm.Irecv([self.buf, MPI.BYTE], source=self.rank, tag=_DATA)

    def poll(self) -> int | None:
        """Bytes of a chunk that arrived (0 = end), or None when nothing yet."""
        from mpi4py import MPI

        if self.ex.error is not None and not self.stop_sent:
            self._stop(True)  # refused part-way: the node need not pack the rest
        if not self.req.Test(self.status):
            return None
        n = self.status.Get_count(MPI.BYTE)
        if n:
            self.ex.feed(memoryview(self.buf)[:n])  # the extractor copies it
            self.post()
        return n

    def _stop(self, now: bool) -> None:
        """Send the node its one ``_STOP`` (small: it completes without being matched)."""
        self.stop_sent = True
        wait(self.comm.isend(now, dest=self.rank, tag=_STOP))

    def close(self) -> dict:
        """End of stream: verify, move NAME into DIR/<host>/ (within the dir fds), report."""
        st = wait(self.comm.irecv(source=self.rank, tag=_STATUS))
        if not self.stop_sent:
            self._stop(False)
        err = st.get("error")
        try:
            got, digest = self.ex.finish()
        except NoSpace as e:  # its line names the file system, the space left, the reserve
            got, digest = self.ex.received, None
            err = err or str(e)
        except RefusedMember as e:
            got, digest = self.ex.received, None
            err = err or f"archive refused on the home server: {e}"
        except Exception as e:  # noqa: BLE001 - a corrupt stream or a full disk here
            got, digest = self.ex.received, None
            err = err or f"unpack on the home server failed: {e}"
        if err is None and (got != st["bytes"] or digest != st["hash"]):
            err = f"received {got} of {st['bytes']} bytes, hash mismatch"
        if err is None:
            err = self._commit()
        if err is None:
            # the launcher's record of what is in place, should the job be stopped later
            emit("committed", host=self.host, bytes=got, files=st.get("files", 0),
                 payload_bytes=st.get("payload_bytes", 0))
            self.faults.checkpoint("collect.committed")
        self._release(ok=err is None)
        secs = time.time() - self.t
        return {"host": self.host, "ok": err is None, "bytes": got, "seconds": secs,
                "stage": "done" if err is None else "collect", "error": err,
                "primary": err is not None, "payload_bytes": st.get("payload_bytes", 0),
                "files": st.get("files", 0), "maxrss": st.get("maxrss")}

    def _commit(self) -> str | None:
        """Move the verified tree in (an error line, or None once it is in and marked).

        A tree whose top is a symbolic link is refused (a node's PATH swapped for one after
        its check, or a crafted archive): it would point somewhere on this server. Once the
        move has begun, a stop (SIGTERM: ``--timeout``, the launcher stopped) finishes it
        before the rank ends, so that the host's slot holds the new copy, marked, and not a
        previous copy moved aside with nothing in its place; the launcher reads which
        hosts' copies are in place from their marks (mpitools/collect/driver.py).
        """
        try:
            top = os.stat(self.name, dir_fd=self.tmp_fd, follow_symlinks=False)
        except FileNotFoundError:
            return f"the archive from {self.host} did not hold {self.name!r}"
        if stat.S_ISLNK(top.st_mode):
            return (f"archive refused on the home server: it holds {self.name!r} as a "
                    "symbolic link, which collect never brings home in place of PATH")
        self.faults.checkpoint("collect.commit")
        try:
            self._move_in(hold=True)
        except OSError as e:
            self._move_back()
            return f"cannot move into {os.path.dirname(self.shown)}: {e.strerror or e}"
        except BaseException:
            try:  # stopped half-way: finish, then stop
                self._move_in(hold=False)
            except OSError:
                self._move_back()
            raise
        return None

    def _move_in(self, hold: bool) -> None:
        """Previous copy aside, new tree in, marked, previous copy removed. Idempotent:
        called again after a stop, it does what is left."""
        old = self.tmp + ".old"
        if entry_id(self.tmp_fd, self.name):
            if entry_id(self.hfd, self.name):
                os.rename(self.name, old, src_dir_fd=self.hfd, dst_dir_fd=self.hfd)
            if hold:
                self.faults.checkpoint("collect.aside")
            os.rename(self.name, self.name, src_dir_fd=self.tmp_fd, dst_dir_fd=self.hfd)
        mark_staged(self.hfd, self.name, self.jobid)
        try:
            remove_entry(self.hfd, old)
        except OSError:
            pass  # the new copy is in: the next collect here removes what is left of it

    def _move_back(self) -> None:
        """After a failed move: the new tree back into the temp dir (removed with it), the
        previous copy (if it was moved aside) back in place."""
        old = self.tmp + ".old"
        try:
            # the temp dir held the tree when the move began: if it is gone, it went in
            if entry_id(self.tmp_fd, self.name) is None and entry_id(self.hfd, self.name):
                os.rename(self.name, self.name, src_dir_fd=self.hfd, dst_dir_fd=self.tmp_fd)
            if entry_id(self.hfd, old) and entry_id(self.hfd, self.name) is None:
                os.rename(old, self.name, src_dir_fd=self.hfd, dst_dir_fd=self.hfd)
        except OSError:
            pass  # clean_stale puts a previous copy back when nothing is in its place

    def _release(self, ok: bool) -> None:
        if self.tmp_fd is not None:
            remove_entry(self.hfd, self.tmp)
            os.close(self.tmp_fd)
            self.tmp_fd = None
        if self.lock is not None:
            unlock_dest(self.hfd, self.name, self.lock)
            self.lock = None
        os.close(self.hfd)
        if self.made_host and not ok:
            try:
                os.rmdir(self.host, dir_fd=self.out_fd)  # no empty per-host dir is left
            except OSError:
                pass


def entry_id(dir_fd: int, name: str) -> tuple[int, int] | None:
    """Which entry ``name`` of directory ``dir_fd`` is, not followed: (device, inode), or
    None when there is none. A copy moved in is another inode than the one it replaced
    (both exist while it is moved in): the driver compares them after a stopped job."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def receive_all(comm, hosts: list[str], ready: list[dict], out_fd: int,
                job: dict) -> list[dict]:
    """Rank 0: receive every ready node's stream, ``window`` nodes at a time.

    One :class:`~inventory.homedir.SpaceGuard` on ``out_fd`` (``job["min_free"]``: the
    reserve, None for the default) is shared by the streams unpacked at once: a host whose
    next member would take the file system's space for users below the reserve fails
    (nothing of it kept), the others go on.

    The next node to start is taken from the town with the fewest streams running
    (``job["towns"]``, each rank's town): a town's nodes share their mayor's town-side
    link, so four streams from one town take four times as long as one from each of
    four towns (measured on the testbed: 219 s against City Transit's 115 s for 8 nodes
    in 2 towns when the window filled town by town).
    """
    window = max(1, int(job.get("window", 4)))
    towns = job.get("towns") or [None] * len(hosts)
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
    guard = SpaceGuard(out_fd, job.get("min_free"), job["out_dir"])
    total, last = 0, 0.0
    pause = Backoff()
    while todo or active:
        while todo and len(active) < window:
            busy = [towns[a] for a in active]
            r = min(todo, key=lambda x: (busy.count(towns[x]), todo.index(x)))
            todo.remove(r)
            try:
                active[r] = _Incoming(comm, r, hosts[r], out_fd, job, guard)
            except OSError as e:
                comm.send(False, dest=r, tag=_GO)
                why = str(e) if isinstance(e, BeneathError) or not e.strerror else e.strerror
                reports[r] = {"host": hosts[r], "ok": False, "bytes": 0, "seconds": 0.0,
                              "stage": "collect", "primary": True,
                              "error": f"cannot write into {job['out_dir']}: {why}"}
        moved = False
        for r, inc in list(active.items()):
            n = inc.poll()
            if n is None:
                continue
            moved = True
            total += n
            if n == 0:
                reports[r] = inc.close()
                del active[r]
        if time.time() - last > 0.25:
            last = time.time()
            emit("progress", done=total, hosts_done=len(reports), hosts=comm.size - 1)
        pause.pause(moved)
    return [reports[r] for r in sorted(reports)]


def check_node(spec: dict) -> tuple[int | None, str | None, dict]:
    """A node's verdict on its PATH before anything is sent: (parent fd, name, verdict).

    The verdict is ``{"ok", "error", "refused"}``: ``refused`` when a device node lies at
    or below PATH (the check of ``inventory.source.check_source``, made here) or when PATH
    or a directory on its way below the root is a symbolic link (:data:`SYMLINK_HINT`);
    the whole collect is then refused (exit 2). Not ``ok`` when PATH cannot be walked
    otherwise, e.g. it is missing (this host fails, the others are collected). The fd is
    None unless ``ok``.
    """
    from inventory.source import find_device, shown_path, unreadable

    shown = spec.get("shown", spec["rel"])
    try:
        src_fd, name = open_source(spec)
    except BeneathError as e:
        link = e.errno == errno.ELOOP  # the path escaped: a newline must not cut the line
        return None, None, {"ok": False, "refused": link, "error": f"{shown_path(e.path)}: "
                            + (f"is a symbolic link ({SYMLINK_HINT})" if link else e.what)}
    except OSError as e:
        return None, None, {"ok": False, "refused": False,
                            "error": f"{shown}: {e.strerror or e}"}
    try:
        dev = find_device(src_fd, name)
    except OSError as e:
        os.close(src_fd)
        return None, None, {"ok": False, "refused": False, "error": unreadable(shown, e)}
    if dev is not None:
        os.close(src_fd)
        return None, None, {"ok": False, "refused": True, "error": dev.line(shown)}
    return src_fd, name, {"ok": True, "refused": False, "error": None}


def _refused_reports(hosts: list[str], ready: list[dict]) -> list[dict]:
    """Every node's report when one refused its PATH (a device node, a symlink): nothing
    is collected from any."""
    culprits = ", ".join(hosts[r] for r in range(1, len(ready)) if ready[r].get("refused"))
    return [{"host": hosts[r], "ok": False, "bytes": 0, "seconds": 0.0, "stage": "check",
             "primary": bool(ready[r].get("refused")), "refused": bool(ready[r].get("refused")),
             "error": ready[r]["error"] if ready[r].get("refused") else
             f"not collected: PATH was refused on {culprits}"} for r in range(1, len(ready))]


def main(comm, job: dict) -> int:
    """Collect every node's path into ``job['out_dir']/<host>/<name>`` on rank 0.

    Phases, each ending in an agreement: 1. every node checks its PATH (walkable, no
    symbolic link at or above it below the root, no device node) and rank 0 gathers the
    verdicts; 2. a symlink or a device node on any node refuses the whole collect: nothing
    is sent, nothing is created on the home server (``refused`` in the reports); 3.
    otherwise rank 0 makes ``out_dir`` and receives each ready node's stream, and every
    node learns from rank 0 whether to send; each host's copy moved into place is
    announced (event ``committed``). Works on any intracommunicator.
    """
    rank = comm.rank
    hosts = rank_hosts(job)
    t0 = time.time()
    src_fd = name = None
    mine = {"ok": True, "refused": False, "error": None}
    if rank == 0:
        emit("start", time=t0, ranks=comm.size)
    else:
        src_fd, name, mine = check_node(job["paths"][hosts[rank]])
    try:
        # wait quietly while the nodes walk their trees (a blocking gather would spin on
        # ranks that outnumber cores), then gather the verdicts at once
        wait(comm.Ibarrier())
        ready = comm.gather(mine, root=0)
        if rank == 0:
            _receive_phase(comm, job, hosts, ready, t0)
        elif mine["ok"]:
            # packed from the walked parent's fd: nothing on the way is looked up again
            send_tree(comm, name, name, job, dir_fd=src_fd, faults=Faults.of(job, rank))
        else:
            send_tree(comm, "", "", job)  # rank 0 answers "skip"; nothing is sent
    finally:
        if src_fd is not None:
            os.close(src_fd)
    return 0


def _receive_phase(comm, job: dict, hosts: list[str], ready: list[dict], t0: float) -> None:
    """Rank 0: refuse everything, or make ``out_dir`` and receive every ready node's
    stream; emits the result event. Every other rank gets its go or its skip."""
    t = time.time()
    if any(v.get("refused") for v in ready):
        for r in range(1, comm.size):
            comm.send(False, dest=r, tag=_GO)
        emit("result", ok=False, reports=_refused_reports(hosts, ready),
             phases={"check": t - t0}, seconds=time.time() - t0)
        return
    Faults.of(job, comm.rank).checkpoint("collect.open")
    try:
        # opened once, never through a link (a DIR swapped for one after the CLI's check
        # is refused); every host's slot is reached from this descriptor
        out_fd, made_out = open_collect_dir(job["out_dir"], create=True)
    except OSError as e:
        for r in range(1, comm.size):
            comm.send(False, dest=r, tag=_GO)
        why = str(e) if isinstance(e, BeneathError) else \
            f"cannot create {job['out_dir']}: {e.strerror or e}"
        emit("result", ok=False, reports=[], phases={}, seconds=time.time() - t0,
             error=why)
        return
    try:
        reports = receive_all(comm, hosts, ready, out_fd, job)
        Faults.of(job, comm.rank).checkpoint("collect.done")
        emit("result", ok=all(r["ok"] for r in reports), reports=reports,
             phases={"check": t - t0, "collect": time.time() - t},
             seconds=time.time() - t0, maxrss_root=maxrss_bytes())
    finally:
        if made_out:  # every host failed: no empty DIR is left
            drop_collect_dir(job["out_dir"], out_fd)
        os.close(out_fd)


if __name__ == "__main__":
    rank_main(main)
