"""``srun --bcast[=DEST]`` and ``mpiexec --preload-binary``: the executable copied to every
node's local disk by the shell's own ranks, then run from there.

Rank-side module (and imported by the wrappers): standard library, mpi4py, inventory/ and
mpitools.common only.

Nodes share no file system. The wrapper names the source (``argv[0]`` found as the shell
would find it); rank 0 opens it before the request goes to any other rank; the ranks of
the command (rank 0 and those with tasks) first create their copy, empty, and agree that
every one could, then rank 0 streams the bytes down the pipelined chain of
:mod:`mpitools.common.chain` (each link carries them once) and they agree again; only then
does any task start, with ``argv[0]`` the node's copy. Any failure on any node: no task
starts anywhere, the copies made are removed, each failing host is named.

Where (Slurm's rules, on the topology's node-local disk): no DEST is Slurm's
``slurm_bcast_<jobid>.<stepid>_<node>`` in the host's scratch directory (the topology's
node-local disk plays Slurm's ``BcastParameters=DestDir``); a DEST ending in ``/`` is a
directory for that name; a relative DEST is taken below scratch, an absolute one must lie
below scratch or one of the host's ``dest_roots`` (the rule of every ``--dest``,
topology/confine.py), never in the spool or the repository.

Safety (the ranks run as root): every directory below the trusted root is walked without
following symlinks (:mod:`inventory.beneath`) and each must belong to the job's user or root
and be writable by no one else unless sticky; the copy is created ``O_EXCL | O_NOFOLLOW``
with the source's permission bits less set-user/group-ID; an existing name is replaced
only when it is this job's own copy (same inode), anything else is refused. Slurm leaves
its copies behind; the shell keeps them until the job ends and then removes exactly the
files it made (same inode), so a later command of the job may run ``DEST`` again.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat

__all__ = ["source_path", "host_dirs", "dest_of", "Copies", "failure_report", "FRAME"]

FRAME = 1 << 20  # bytes per chain frame
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def source_path(argv0: str, environ: dict[str, str], cwd: str) -> str:
    """The file ``argv0`` names, found as the shell finds a command (``PATH`` unless it has
    a ``/``), checked: a readable, executable regular file. Raises ValueError (one line)."""
    if "/" in argv0:
        path = os.path.join(cwd, argv0)
    else:
        path = shutil.which(argv0, path=environ.get("PATH", os.defpath)) or ""
        if not path:
            raise ValueError(f"--bcast: {argv0}: command not found")
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):  # only then: opening a FIFO would wait for a writer
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except FileNotFoundError:
        raise ValueError(f"--bcast: {argv0}: no such file") from None
    except OSError as e:
        raise ValueError(f"--bcast: {argv0}: cannot read it: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"--bcast: {argv0}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"--bcast: {argv0}: not a regular file")
    if not st.st_mode & 0o111:
        raise ValueError(f"--bcast: {argv0}: not executable")
    return os.path.abspath(path)


def host_dirs(topo, hosts: list[str]) -> dict[str, dict]:
    """CLI side: what the ranks need per host to place a copy: its root as seen from where
    its rank runs (the embedded cluster's directory, else ""), scratch, ``dest_roots`` and
    the directories no copy may enter (spool, repository)."""
    out = {}
    for h in hosts:
        host = topo.host(h)
        out[h] = {"root": host.root, "scratch": host.scratch,
                  "dest_roots": list(host.paths.dest_roots),
                  "never": [host.spool, host.repository]}
    return out


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def dest_of(dirs: dict, dest: str | None, name: str) -> tuple[str, str, str]:
    """Where the copy goes on one host: (trusted root as a host path, path below it, the
    host path to show). ``name``: Slurm's file name for DEST given as a directory or not at
    all. Raises ValueError (one line) for a DEST outside the host's allowed roots."""
    if dest is not None and ("\0" in dest or ".." in dest.split("/") or not dest.strip("/")):
        raise ValueError(f"--bcast={dest!r}: give a file or directory path without '..'")
    want = dest or ""
    if not want or want.endswith("/"):
        want += name
    path = posixpath.normpath(posixpath.join(dirs["scratch"], want))
    roots = [dirs["scratch"], *dirs.get("dest_roots", [])]
    root = next((r for r in roots if _within(path, r) and path != r), None)
    if root is None or any(_within(path, d) for d in dirs.get("never", [])):
        raise ValueError(f"--bcast={dest}: {path} is outside the host's scratch "
                         f"({', '.join(roots)}) or inside its spool or repository")
    return root, posixpath.relpath(path, root), path


def failure_report(host: str, tasks: list[int], error: str | None) -> dict:
    """The end report of a command that never started because a copy failed: status 1 for
    each task (srun's "step launch aborted" exit status), the host's reason as a note."""
    return {"host": host, "statuses": {t: 1 for t in tasks}, "errors": {}, "uninit": [],
            "aborted": {}, "notes": [error] if error else []}


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _unlink_same(pfd: int, name: str, fd: int) -> None:
    """Remove ``name`` in directory ``pfd`` if it is still the file open as ``fd``."""
    try:
        if _same(os.fstat(fd), os.stat(name, dir_fd=pfd, follow_symlinks=False)):
            os.unlink(name, dir_fd=pfd)
    except OSError:
        pass


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Copies:
    """One rank's copies for the life of the job; rank 0 also holds the open source."""

    def __init__(self, job: dict, host: str):
        self.job, self.host = job, host
        # (dir dev, dir ino, name) -> (dir fd, a read-only fd of the copy: while it is open
        # the copy's inode number cannot be reused, so "the same file" is a sure test)
        self.made: dict[tuple, tuple[int, int]] = {}
        self.source: int | None = None

    # rank 0, before the request leaves -------------------------------------------------
    def prepare(self, spec: dict, step: int, hosts: list[str]) -> dict:
        """Check DEST on every host of the command and open the source; the request's
        ``bcast`` part for the ranks. Raises ValueError (one line: nothing has started)."""
        for h in hosts:
            dest_of(self.job["bcast_dirs"][h], spec.get("dest"), self.name(step, h))
        self.close_source()
        try:
            fd = os.open(spec["source"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ValueError(f"--bcast: {spec['source']}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ValueError(f"--bcast: {spec['source']}: not a regular file")
        self.source = fd
        return {"dest": spec.get("dest"), "size": st.st_size, "mode": st.st_mode & 0o777}

    def close_source(self) -> None:
        if self.source is not None:
            os.close(self.source)
            self.source = None

    def name(self, step: int, host: str) -> str:
        return f"slurm_bcast_{self.job['jobid']}.{step}_{host}"

    # every rank of the command ---------------------------------------------------------
    def step(self, comm, req: dict, mine: list[int]) -> tuple[str | None, str | None, bool]:
        """Collective on ``comm`` (every rank calls it for a ``bcast`` request): make this
        host's copy if it has tasks. Returns (local path of the copy, this host's error,
        whether the command must not start)."""
        from mpi4py import MPI

        part = bool(mine) or comm.rank == 0
        bcomm = comm.Split(1 if part else MPI.UNDEFINED, comm.rank)
        if not part:
            return None, None, False
        try:
            return self._make(bcomm, req, mine)
        finally:
            bcomm.Free()
            self.close_source()

    def _make(self, bcomm, req: dict, mine: list[int]):
        from inventory.beneath import BeneathError
        from mpitools.common.runtime import agree_any

        spec, made, err = req["bcast"], None, None
        if mine:
            try:
                made = self._create(spec, req["id"])
            except (ValueError, BeneathError) as e:  # one line each already
                err = f"--bcast: {e}"
            except OSError as e:
                err = f"--bcast: {e.filename or self.host}: {e.strerror}"
        if agree_any(bcomm, err is not None):
            self._discard(made)
            return None, err, True
        err = self._transfer(bcomm, made, spec["size"])
        if made is not None and err is None:
            try:
                os.fchmod(made[2], spec["mode"])
            except OSError as e:
                err = f"--bcast: {made[4]}: {e.strerror}"
        failed = agree_any(bcomm, err is not None)
        if made is None:
            return None, err, failed
        if failed:
            self._discard(made)
            return None, err, True
        os.close(made[2])  # before any exec: a file open for writing cannot run (ETXTBSY)
        return made[3], None, False

    def _transfer(self, bcomm, made, size: int) -> str | None:
        """Rank 0 streams the source down the chain; every rank writes what it gets."""
        from mpitools.common.chain import chain_receive, chain_send

        state = {"got": 0, "err": None}

        def keep(frame) -> None:
            state["got"] += len(frame)
            if made is not None and state["err"] is None:
                try:
                    _write_all(made[2], frame)
                except OSError as e:
                    state["err"] = f"--bcast: {made[4]}: {e.strerror}"

        if bcomm.rank == 0:
            def frames():
                while state["got"] < size:
                    try:
                        data = os.read(self.source, min(FRAME, size - state["got"]))
                    except OSError as e:
                        data, state["err"] = b"", f"--bcast: reading the source: {e.strerror}"
                    if not data:
                        return
                    keep(data)
                    yield data
            chain_send(bcomm, frames())
        else:
            chain_receive(bcomm, FRAME, keep)
        if state["err"] is None and state["got"] != size:
            state["err"] = f"--bcast: got {state['got']} of {size} bytes"
        return state["err"]

    def _create(self, spec: dict, step: int) -> tuple[int, str, int, str, str]:
        """Open the directory safely and create the copy, empty: (dir fd, name, file fd,
        local path, host path shown)."""
        from inventory.beneath import open_dir_beneath, open_root, split_rel

        dirs = self.job["bcast_dirs"][self.host]
        root, rel, shown = dest_of(dirs, spec.get("dest"), self.name(step, self.host))
        local_root = os.path.join(dirs["root"], root.lstrip("/")) if dirs["root"] else root
        parent, name = posixpath.split(rel)
        pfd = open_root(local_root)
        try:
            # every directory on the way is checked, not only the last: the tasks run the
            # copy by its path, and one that another user could rename (a directory they
            # may write in, not sticky) lets them put their own program at that path
            # between the copy and the exec
            done = root
            self._check_dir(pfd, done)
            for part in split_rel(parent):
                nfd = open_dir_beneath(pfd, part, display=done)
                os.close(pfd)
                pfd, done = nfd, posixpath.join(done, part)
                self._check_dir(pfd, done)
            self._clear(pfd, name, shown)
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
        except BaseException:
            os.close(pfd)
            raise
        # known from its creation on: a job ended mid-transfer (SIGTERM, walltime) removes
        # the partial copy with the others (remove_all)
        pst = os.fstat(pfd)
        self.made[(pst.st_dev, pst.st_ino, name)] = (
            pfd, os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd))
        return pfd, name, fd, os.path.join(local_root, rel), shown

    @staticmethod
    def _check_dir(pfd: int, shown: str) -> None:
        st = os.fstat(pfd)
        if st.st_uid not in (os.geteuid(), 0):
            raise ValueError(f"{shown} belongs to uid {st.st_uid} (not used: give a DEST "
                             "in a directory of the job's user or root)")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ValueError(f"{shown} is writable by others and not sticky (not used: "
                             "chmod go-w or +t, or give another DEST)")

    def _clear(self, pfd: int, name: str, shown: str) -> None:
        """Remove this job's own earlier copy of ``name``; refuse anything else there."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        pst = os.fstat(pfd)
        mine = self.made.get((pst.st_dev, pst.st_ino, name))
        if mine is None or not _same(st, os.fstat(mine[1])):
            raise ValueError(f"{shown} exists and is not this job's copy (not replaced)")
        os.unlink(name, dir_fd=pfd)
        for fd in self.made.pop((pst.st_dev, pst.st_ino, name)):
            os.close(fd)

    def _discard(self, made) -> None:
        """Remove a copy this rank just created (checked by inode) and close its fds."""
        if made is None:
            return
        pfd, name, fd, _, _ = made
        pst = os.fstat(pfd)
        rec = self.made.pop((pst.st_dev, pst.st_ino, name), None)
        _unlink_same(pfd, name, fd)
        os.close(fd)
        if rec is not None:
            os.close(rec[1])
        os.close(pfd)

    def remove_all(self) -> None:
        """The end of the job: remove every copy this rank made that is still the same file."""
        self.close_source()
        for (_, _, name), (pfd, rfd) in list(self.made.items()):
            _unlink_same(pfd, name, rfd)
            os.close(rfd)
            os.close(pfd)
        self.made.clear()
