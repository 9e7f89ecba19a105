"""Walk a tree with os.scandir into an Inventory: never follows links, skips device nodes."""

from __future__ import annotations

import os
import stat
from operator import attrgetter
from typing import Iterable

from chiba_admin.errors import InventoryError

from .entries import DIR, FIFO, FILE, LINK, SOCK, Entry, Inventory, Issue
from .excludes import ExcludeMatcher
from .hashing import DEFAULT_ALGO, check_algo, hash_files

__all__ = ["scan", "scan_root_checked"]

# Below the root nothing is followed: a dir swapped for a link mid-scan is not entered.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SPECIAL = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}
_KEPT_SPECIAL = {stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCK}


def scan_root_checked(root: str | os.PathLike) -> str:
    """The root as a str path, or InventoryError if it is missing or not a directory."""
    path = os.fsdecode(root)
    try:
        st = os.stat(path)  # the root itself may be a link to a dir, as rsync allows 'src/'
    except FileNotFoundError as exc:
        raise InventoryError("tree root does not exist", where=path,
                             hint="check the path; refusing to treat a missing tree as empty") from exc
    except OSError as exc:
        raise InventoryError(f"cannot stat tree root: {exc.strerror}", where=path) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise InventoryError("tree root is not a directory", where=path, hint="give a directory")
    return path


def scan(root: str | os.PathLike, *, excludes: Iterable[str] = (), checksum: bool = False,
         algo: str = DEFAULT_ALGO, threads: int | None = None,
         missing_ok: bool = False) -> Inventory:
    """Inventory the tree under ``root``.

    ``excludes`` are rsync ``--exclude`` arguments in order (see inventory.excludes): the
    entries rsync would leave out are left out, and an excluded directory is not entered.
    No file in the tree adds rules. With ``checksum=True`` every
    file gets a content digest (``algo``), hashed by ``threads`` threads. Unreadable
    directories become ``errors`` and device nodes ``skipped`` on the result (FIFOs and
    sockets are entries); directories holding an excluded member are in ``hidden``; a missing
    root raises InventoryError, unless ``missing_ok`` (a target not created yet), which
    gives an empty inventory. Never use ``missing_ok`` for a source.
    """
    if missing_ok and not os.path.lexists(root):
        return Inventory(root=os.fsdecode(root), algo=check_algo(algo) if checksum else None)
    base = scan_root_checked(root)
    if checksum:
        check_algo(algo)
    matcher = ExcludeMatcher(excludes)
    hidden: set[str] = set()
    entries, errors, skipped = _walk(base, matcher, hidden)
    entries.sort(key=attrgetter("path"))
    inv = Inventory({e.path: e for e in entries}, errors, skipped, root=base,
                    algo=algo if checksum else None, hidden=hidden, root_meta=_root_meta(base))
    if checksum:
        _hash_into(inv, threads)
    return inv


def _root_meta(base: str) -> Entry | None:
    try:
        st = os.stat(base)
    except OSError:
        return None
    return Entry("", DIR, 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns, None, None, st.st_uid,
                 st.st_gid)


def _walk(base: str, matcher: ExcludeMatcher,
          hidden: set[str]) -> tuple[list[Entry], list[Issue], list[Issue]]:
    entries: list[Entry] = []
    errors: list[Issue] = []
    skipped: list[Issue] = []
    excluded = matcher.excluded if matcher else None
    append = entries.append
    S_IFMT, S_IMODE = stat.S_IFMT, stat.S_IMODE
    IFREG, IFDIR, IFLNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
    stack: list[tuple[str, str]] = [(base, "")]
    while stack:
        dirpath, prefix = stack.pop()
        try:
            # Listing through a directory fd makes every stat/readlink relative to it, so
            # the kernel does not re-walk the full path for each entry.
            dfd = os.open(dirpath, _DIR_FLAGS if prefix else _ROOT_FLAGS)
        except OSError as exc:
            errors.append(Issue(prefix.rstrip("/"), f"cannot read directory: {exc.strerror}"))
            continue
        try:
            it = os.scandir(dfd)
        except OSError as exc:
            os.close(dfd)
            errors.append(Issue(prefix.rstrip("/"), f"cannot read directory: {exc.strerror}"))
            continue
        try:
            with it:
                while True:
                    try:
                        de = next(it)
                    except StopIteration:
                        break
                    except OSError as exc:
                        errors.append(Issue(prefix.rstrip("/"), f"error listing directory: {exc.strerror}"))
                        break
                    name = de.name
                    rel = prefix + name
                    try:
                        st = de.stat(follow_symlinks=False)
                    except OSError as exc:
                        # Vanished or unreadable between listing and stat: the inventory is incomplete.
                        errors.append(Issue(rel, f"cannot stat: {exc.strerror}"))
                        continue
                    fmt = S_IFMT(st.st_mode)
                    if excluded is not None and excluded(rel, fmt == IFDIR):
                        hidden.add(prefix[:-1])  # rsync protects it: its dir must stay
                        continue
                    if fmt == IFREG:
                        append(Entry(rel, FILE, st.st_size, S_IMODE(st.st_mode), st.st_mtime_ns,
                                     None, None, st.st_uid, st.st_gid))
                    elif fmt == IFDIR:
                        append(Entry(rel, DIR, 0, S_IMODE(st.st_mode), st.st_mtime_ns,
                                     None, None, st.st_uid, st.st_gid))
                        stack.append((dirpath + "/" + name, rel + "/"))
                    elif fmt == IFLNK:
                        try:
                            target = os.readlink(name, dir_fd=dfd)
                        except OSError as exc:
                            errors.append(Issue(rel, f"cannot read symlink: {exc.strerror}"))
                            continue
                        append(Entry(rel, LINK, st.st_size, S_IMODE(st.st_mode), st.st_mtime_ns,
                                     target, None, st.st_uid, st.st_gid))
                    elif fmt in _KEPT_SPECIAL:
                        append(Entry(rel, _KEPT_SPECIAL[fmt], 0, S_IMODE(st.st_mode),
                                     st.st_mtime_ns, None, None, st.st_uid, st.st_gid))
                    else:
                        skipped.append(Issue(rel, f"{_SPECIAL.get(fmt, 'special file')} skipped"))
        finally:
            os.close(dfd)
    return entries, errors, skipped


def _hash_into(inv: Inventory, threads: int | None) -> None:
    files = inv.files()
    results = hash_files(inv.root, [e.path for e in files], inv.algo or DEFAULT_ALGO, threads=threads)
    for e, res in zip(files, results):
        if isinstance(res, OSError):
            # A file we listed but cannot read: leave it out and mark the inventory incomplete.
            inv.errors.append(Issue(e.path, f"cannot hash: {res.strerror}"))
            del inv.entries[e.path]
        else:
            e.digest = res
