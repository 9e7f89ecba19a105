"""Apply a Plan to a local tree: atomic writes, no symlink following, deletions last."""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

from chiba_admin.errors import InventoryError

from .entries import DIR, FIFO, LINK, SOCK, encode_path
from .hashing import BLOCK_SIZE, new_hasher
from .plan import CLEAR, DELETE, META, MKDIR, MKNOD, SYMLINK, WRITE, Action, Plan

__all__ = [
    "Chunks",
    "Fetch",
    "ApplyResult",
    "DestTree",
    "TMP_MARK",
    "TMP_RE",
    "Conflict",
    "is_tmp_name",
    "new_tmp_tag",
    "local_fetch",
    "write_file_atomic",
    "make_dirs",
    "make_symlinks",
    "delete_extraneous",
    "finalize",
    "apply_plan",
]

Chunks = Union[bytes, bytearray, memoryview, Iterable[bytes]]
Fetch = Callable[[str], Chunks]
TMP_MARK = b".chiba-tmp-"
# A temporary file is exactly ``.NAME.chiba-tmp-<32 hex digits of the run's id>``: nothing
# else is ever taken for one (a user's ``results.chiba-tmp-2024`` is just a file).
TMP_RE = re.compile(rb"\..+\.chiba-tmp-[0-9a-f]{32}", re.S)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ApplyResult:
    """What apply_plan did. ``outcomes`` holds (op, path, outcome) for every action taken."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    meta: int = 0
    bytes: int = 0
    kept: list[str] = field(default_factory=list)  # dirs not deleted: they hold unlisted files
    conflicts: list[str] = field(default_factory=list)  # entries left unlike the source
    outcomes: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"created": self.created, "updated": self.updated, "deleted": self.deleted,
                "meta": self.meta, "bytes": self.bytes, "kept": list(self.kept),
                "conflicts": list(self.conflicts)}


def _move_in(pfd: int, tmp: str, name: str, finish: Callable[[], None]) -> None:
    """Finish ``tmp`` (owner, mode, times), then rename it over ``name`` in ``pfd``; on any
    failure remove ``tmp`` (an exact-named temp of this run) and re-raise."""
    try:
        finish()
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=pfd)
        except OSError:
            pass
        raise


def _split(rel: str) -> tuple[str, str]:
    i = rel.rfind("/")
    return (rel[:i], rel[i + 1:]) if i >= 0 else ("", rel)


def new_tmp_tag() -> str:
    """A run's id for its temporary names: 32 lowercase hex digits."""
    return os.urandom(16).hex()


def is_tmp_name(name: str | bytes) -> bool:
    """True for exactly the names DestTree gives its temporary files."""
    return TMP_RE.fullmatch(os.fsencode(name)) is not None


def tmp_target(name: str | bytes) -> bytes | None:
    """The (on-disk, possibly truncated to 200 bytes) name a temporary file stands in for:
    ``.NAME.chiba-tmp-<hex>`` -> ``NAME``; None for any other name."""
    raw = os.fsencode(name)
    if TMP_RE.fullmatch(raw) is None:
        return None
    return raw[1:raw.rindex(TMP_MARK)]


def _tmp_name(name: str, tag: str) -> bytes:
    # Bytes keep the name valid even when truncation splits a multi-byte character;
    # 200 bytes leaves room for the marker inside the 255-byte NAME_MAX.
    return b"." + encode_path(name)[:200] + TMP_MARK + tag.encode()


class Conflict(InventoryError):
    """An entry could not be put in place without destroying what the plan must keep (a
    directory that is not empty): the target stays different from the source here."""


class DestTree:
    """A destination root whose members are reached only through directory fds opened with
    O_NOFOLLOW, so a directory swapped for a symlink is refused, never written through.

    Keeps the fds of the last directory chain used; actions sorted by path reuse them.
    ``root_fd`` (taken over, closed by close()) is a destination already opened safely
    (inventory.beneath); ``root`` then only names it in messages. ``tmp_tag`` (32 hex) is
    the run's id in temporary names; ``owners`` sets each entry's numeric uid/gid (as root).
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True,
                 root_fd: int | None = None, tmp_tag: str | None = None,
                 owners: bool = False):
        self.root = os.fsdecode(root)
        self.tmp_tag = tmp_tag or new_tmp_tag()
        self.owners = owners
        if root_fd is not None:
            self._root_fd = root_fd
        else:
            if create:
                os.makedirs(self.root, exist_ok=True)
            try:
                self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise InventoryError(f"cannot open destination: {exc.strerror}", where=self.root,
                                     hint="create it or fix its permissions") from exc
        self._names: list[str] = []
        self._fds: list[int] = []

    def __enter__(self) -> "DestTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._trim(0)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def where(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _trim(self, keep: int) -> None:
        while len(self._fds) > keep:
            os.close(self._fds.pop())
            self._names.pop()

    def dir_fd(self, reldir: str) -> int:
        """An fd for directory ``reldir``, every component opened without following links."""
        if not reldir:
            return self._root_fd
        parts = reldir.split("/")
        common = 0
        while common < len(self._names) and common < len(parts) and self._names[common] == parts[common]:
            common += 1
        self._trim(common)
        for i in range(common, len(parts)):
            parent = self._fds[-1] if self._fds else self._root_fd
            try:
                fd = os.open(parts[i], _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                here = "/".join(parts[:i + 1])
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InventoryError("destination path goes through a symlink or non-directory",
                                         where=self.where(here),
                                         hint="refusing to write through it; remove it or rescan") from exc
                raise InventoryError(f"cannot open destination directory: {exc.strerror}",
                                     where=self.where(here), hint="rescan the target and re-plan") from exc
            self._fds.append(fd)
            self._names.append(parts[i])
        return self._fds[-1]

    def _forget(self, rel: str) -> None:
        """Drop cached fds at or below ``rel`` before it is removed or replaced."""
        parts = rel.split("/")
        if self._names[:len(parts)] == parts:
            self._trim(len(parts) - 1)

    def _remove_existing(self, pfd: int, name: str, rel: str) -> None:
        """Make way for a new entry: unlink a non-directory; a directory only if empty
        (its members were cleared by the plan); one that is not raises Conflict."""
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._forget(rel)
            try:
                os.rmdir(name, dir_fd=pfd)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise Conflict("could not make way for the new entry (directory not empty)",
                                   where=self.where(rel),
                                   hint="it holds files the sync must keep") from None
                raise
        else:
            os.unlink(name, dir_fd=pfd)

    def _chown(self, name, pfd: int, uid: int, gid: int) -> None:
        # lchown by name: a symlink swapped in is changed itself, never its target
        if self.owners:
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def mkdir(self, rel: str, *, replace: bool = False, uid: int = 0, gid: int = 0) -> bool:
        """Create directory ``rel`` (mode 0700 until finalize); False if it already was one."""
        parent, name = _split(rel)
        pfd = self.dir_fd(parent)
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
            self._chown(name, pfd, uid, gid)
            return True
        except FileExistsError:
            st = os.lstat(name, dir_fd=pfd)
            if stat.S_ISDIR(st.st_mode):
                return False
            if not replace:
                what = "symlink" if stat.S_ISLNK(st.st_mode) else "non-directory"
                raise InventoryError(f"a {what} is in the way of a directory", where=self.where(rel),
                                     hint="refusing to follow or replace it unplanned; rescan and re-plan") from None
            os.unlink(name, dir_fd=pfd)
            os.mkdir(name, 0o700, dir_fd=pfd)
            self._chown(name, pfd, uid, gid)
            return True

    def write_file(self, rel: str, chunks: Chunks, mode: int, mtime_ns: int, *,
                   size: int | None = None, digest: bytes | None = None,
                   algo: str | None = None, replace: bool = False, fsync: bool = False,
                   uid: int = 0, gid: int = 0) -> int:
        """Write to a temp name in the same directory, then rename over ``rel``: readers see
        the old file or the whole new one. Checks ``size``/``digest`` before the rename."""
        parent, name = _split(rel)
        pfd = self.dir_fd(parent)
        if replace:
            self._remove_existing(pfd, name, rel)
        tmp = _tmp_name(name, self.tmp_tag)
        fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=pfd)
        written = 0
        try:
            hasher = new_hasher(algo) if digest is not None and algo else None
            for chunk in _iter_chunks(chunks):
                view = memoryview(chunk).cast("B")
                if hasher is not None:
                    hasher.update(view)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    written += n
            if size is not None and written != size:
                raise InventoryError(f"source changed during transfer ({written} bytes, expected {size})",
                                     where=self.where(rel), hint="rescan the source and retry")
            if hasher is not None and hasher.digest() != digest:
                raise InventoryError("content does not match the source digest",
                                     where=self.where(rel), hint="rescan the source and retry")
            if self.owners:
                os.fchown(fd, uid, gid)  # before the chmod: chown clears setuid/setgid
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            if fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=pfd)
            except OSError:
                pass
            raise
        return written

    def symlink(self, rel: str, target: str, mtime_ns: int, *, replace: bool = False,
                uid: int = 0, gid: int = 0) -> None:
        """Create or atomically replace symlink ``rel``; its own mtime set, target untouched."""
        parent, name = _split(rel)
        pfd = self.dir_fd(parent)
        if replace:
            self._remove_existing(pfd, name, rel)
        tmp = _tmp_name(name, self.tmp_tag)
        os.symlink(target, tmp, dir_fd=pfd)

        def finish() -> None:
            self._chown(tmp, pfd, uid, gid)
            os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

        _move_in(pfd, tmp, name, finish)

    def mknod(self, rel: str, kind: str, mode: int, mtime_ns: int, *, replace: bool = False,
              uid: int = 0, gid: int = 0) -> None:
        """Create or atomically replace FIFO or socket ``rel`` (its inode, as rsync -a)."""
        parent, name = _split(rel)
        pfd = self.dir_fd(parent)
        if replace:
            self._remove_existing(pfd, name, rel)
        tmp = _tmp_name(name, self.tmp_tag)
        if kind == FIFO:
            os.mkfifo(tmp, 0o600, dir_fd=pfd)
        elif kind == SOCK:
            os.mknod(tmp, 0o600 | stat.S_IFSOCK, dir_fd=pfd)
        else:
            raise InventoryError(f"not a FIFO or socket kind: {kind!r}", where=self.where(rel))
        _move_in(pfd, tmp, name,
                 lambda: self._set_special(tmp, pfd, kind, mode, mtime_ns, uid, gid))

    def _set_special(self, name, pfd: int, kind: str, mode: int, mtime_ns: int,
                     uid: int, gid: int) -> None:
        # Opening a FIFO for I/O would block; an O_PATH fd names the inode without opening
        # it, and chmod through /proc/self/fd changes that inode, never a symlink's target.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            fmt = stat.S_IFMT(os.fstat(fd).st_mode)
            if fmt != (stat.S_IFIFO if kind == FIFO else stat.S_IFSOCK):
                raise InventoryError(f"expected a {'FIFO' if kind == FIFO else 'socket'}",
                                     where=self.where(name if isinstance(name, str) else ""),
                                     hint="rescan the target and re-plan")
            self._chown(name, pfd, uid, gid)
            os.chmod(f"/proc/self/fd/{fd}", mode)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(fd)

    def set_meta(self, rel: str, kind: str, mode: int, mtime_ns: int, *,
                 uid: int = 0, gid: int = 0) -> None:
        """Set owner (with ``owners``), mode and mtime of ``rel`` without following a symlink
        at any component. The owner goes first: chown clears setuid and setgid."""
        ns = (mtime_ns, mtime_ns)
        if kind == DIR:
            fd = self.dir_fd(rel)
            if self.owners:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.utime(fd, ns=ns)
            return
        parent, name = _split(rel)
        pfd = self.dir_fd(parent)
        if kind == LINK:
            self._chown(name, pfd, uid, gid)
            os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
            return
        if kind in (FIFO, SOCK):
            self._set_special(name, pfd, kind, mode, mtime_ns, uid, gid)
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        except PermissionError:
            # Unreadable to us (non-root, mode 0): chmod by name after checking what it is.
            if not stat.S_ISREG(os.lstat(name, dir_fd=pfd).st_mode):
                raise InventoryError("expected a regular file", where=self.where(rel)) from None
            self._chown(name, pfd, uid, gid)
            os.chmod(name, mode, dir_fd=pfd)
            os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InventoryError("expected a regular file", where=self.where(rel),
                                     hint="rescan the target and re-plan")
            if self.owners:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.utime(fd, ns=ns)
        finally:
            os.close(fd)

    def delete(self, rel: str, kind: str) -> str:
        """Remove one entry: 'deleted', 'gone' if already absent, 'kept' for a non-empty dir
        (it holds excluded or unlisted files, which rsync also leaves alone)."""
        parent, name = _split(rel)
        pfd = self.dir_fd(parent)
        try:
            if kind == DIR:
                self._forget(rel)
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            return "gone"
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return "kept"
            raise
        return "deleted"


def _iter_chunks(chunks: Chunks) -> Iterable[bytes]:
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        return (chunks,)
    read = getattr(chunks, "read", None)
    if read is not None:
        return iter(lambda: read(BLOCK_SIZE), b"")
    return chunks


def local_fetch(src_root: str | os.PathLike, *, block_size: int = BLOCK_SIZE) -> Fetch:
    """A fetch for apply_plan reading a local source tree in ``block_size`` blocks."""
    base = os.fsdecode(src_root)

    def fetch(rel: str) -> Iterable[bytes]:
        fd = os.open(os.path.join(base, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            while True:
                data = os.read(fd, block_size)
                if not data:
                    return
                yield data
        finally:
            os.close(fd)

    return fetch


def _tree(dest: str | os.PathLike | DestTree) -> tuple[DestTree, bool]:
    return (dest, False) if isinstance(dest, DestTree) else (DestTree(dest), True)


def _fail(tree: DestTree, a: Action, exc: BaseException) -> InventoryError:
    if isinstance(exc, InventoryError):
        return exc
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return InventoryError(f"cannot {a.op} {'directory' if a.kind == DIR else 'entry'}: {detail}",
                          where=tree.where(a.path), hint="fix the destination and re-run the sync")


def _run(dest, actions: Iterable[Action], step: Callable[[DestTree, Action, ApplyResult], None],
         result: ApplyResult | None) -> ApplyResult:
    result = result if result is not None else ApplyResult()
    tree, owned = _tree(dest)
    try:
        for a in actions:
            try:
                step(tree, a, result)
            except Conflict as exc:
                # not a failure of the run: this entry stays as it was, and is reported
                result.conflicts.append(f"{a.path}: {exc.what}")
            except Exception as exc:
                raise _fail(tree, a, exc) from exc
    finally:
        if owned:
            tree.close()
    return result


def _step_mkdir(tree: DestTree, a: Action, r: ApplyResult) -> None:
    made = tree.mkdir(a.path, replace=a.replace, uid=a.uid, gid=a.gid)
    r.created += made
    r.outcomes.append((MKDIR, a.path, "created" if made else "exists"))


def _step_symlink(tree: DestTree, a: Action, r: ApplyResult) -> None:
    if a.op == MKNOD:
        tree.mknod(a.path, a.kind, a.mode, a.mtime_ns, replace=a.replace, uid=a.uid, gid=a.gid)
    else:
        tree.symlink(a.path, a.target or "", a.mtime_ns, replace=a.replace, uid=a.uid,
                     gid=a.gid)
    new = a.changes == "+"
    r.created += new
    r.updated += not new
    r.outcomes.append((SYMLINK, a.path, "created" if new else "updated"))


def _step_meta(tree: DestTree, a: Action, r: ApplyResult) -> None:
    tree.set_meta(a.path, a.kind, a.mode, a.mtime_ns, uid=a.uid, gid=a.gid)
    r.meta += 1
    r.outcomes.append((META, a.path, "meta"))


def _step_delete(tree: DestTree, a: Action, r: ApplyResult) -> None:
    outcome = tree.delete(a.path, a.kind)
    r.deleted += outcome == "deleted"
    if outcome == "kept":
        r.kept.append(a.path)
    r.outcomes.append((DELETE, a.path, outcome))


def write_file_atomic(dest_root: str | os.PathLike | DestTree, relpath: str, chunks: Chunks,
                      mode: int, mtime_ns: int, **kw) -> int:
    """Write one file atomically under ``dest_root`` (see DestTree.write_file); bytes written."""
    tree, owned = _tree(dest_root)
    try:
        return tree.write_file(relpath, chunks, mode, mtime_ns, **kw)
    except InventoryError:
        raise
    except Exception as exc:
        raise InventoryError(f"cannot write file: {getattr(exc, 'strerror', None) or exc}",
                             where=tree.where(relpath), hint="fix the destination and retry") from exc
    finally:
        if owned:
            tree.close()


def make_dirs(dest, plan: Plan, result: ApplyResult | None = None) -> ApplyResult:
    """First the plan's clears (members of directories the source replaced by a
    non-directory, deepest first: only planned with delete), then its mkdir actions,
    parents first (replacing non-directories in the way)."""
    result = _run(dest, plan.by_op(CLEAR) if plan.delete else [], _step_delete, result)
    return _run(dest, plan.by_op(MKDIR), _step_mkdir, result)


def make_symlinks(dest, plan: Plan, result: ApplyResult | None = None) -> ApplyResult:
    """The plan's symlinks, then its FIFOs and sockets (after every regular file)."""
    return _run(dest, [a for a in plan.actions if a.op in (SYMLINK, MKNOD)], _step_symlink,
                result)


def delete_extraneous(dest, plan: Plan, result: ApplyResult | None = None) -> ApplyResult:
    """The plan's deletions, deepest first; a no-op unless the plan allows deleting."""
    actions = plan.by_op(DELETE) if plan.delete else []
    return _run(dest, actions, _step_delete, result)


def finalize(dest, plan: Plan, result: ApplyResult | None = None) -> ApplyResult:
    """Metadata: files and links, then directories deepest first. Run after all writes and
    deletions, since any change inside a directory bumps its mtime."""
    metas = plan.by_op(META)
    ordered = [a for a in metas if a.kind != DIR] + [a for a in metas if a.kind == DIR]
    return _run(dest, ordered, _step_meta, result)


def apply_plan(plan: Plan, dest_root: str | os.PathLike, fetch: Fetch, *, fsync: bool = False,
               verify: bool = True, tmp_tag: str | None = None) -> ApplyResult:
    """Make ``dest_root`` match the plan: mkdirs, atomic writes of ``fetch(path)`` data,
    symlinks, then (only if everything before succeeded) deletions, then metadata.

    Written sizes are always checked and, with ``verify`` and digests in the plan, content
    too. Any failure raises InventoryError naming the path; temp files are removed.
    """
    result = ApplyResult()
    algo = plan.algo if verify else None

    def step_write(tree: DestTree, a: Action, r: ApplyResult) -> None:
        n = tree.write_file(a.path, fetch(a.path), a.mode, a.mtime_ns, size=a.size,
                            digest=a.digest if algo else None, algo=algo, replace=a.replace,
                            fsync=fsync, uid=a.uid, gid=a.gid)
        r.bytes += n
        new = a.changes == "+"
        r.created += new
        r.updated += not new
        r.outcomes.append((WRITE, a.path, "created" if new else "updated"))

    with DestTree(dest_root, tmp_tag=tmp_tag, owners=plan.owners) as tree:
        make_dirs(tree, plan, result)
        _run(tree, plan.by_op(WRITE), step_write, result)
        make_symlinks(tree, plan, result)
        delete_extraneous(tree, plan, result)
        finalize(tree, plan, result)
    return result
