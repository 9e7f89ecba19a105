"""Host-side walking below a trusted root without following symlinks, and destination locks.

Standard library only: rank programs and the City Transit agent import it.

A tool running as root writes under a root directory that the topology names (scratch,
repository, a ``dest_roots`` entry); the path below it may cross directories that any user
can write, where a symlink planted by that user (``scratch/jobdir -> /etc``) would redirect
a write done by path. So every component below the root is opened relative to its parent's
file descriptor with ``O_NOFOLLOW | O_DIRECTORY`` (the approach of openat2's
``RESOLVE_NO_SYMLINKS``, done one component at a time so it works on any kernel), and the
tool then works with ``*at`` calls on the final descriptor.

The lock (:func:`lock_dest`) is one exact-named file beside the destination,
``.NAME.chiba-lock``, held with ``flock`` for the life of a run: every method (MPI stage,
City Transit, mpisync, rsync's wrapper) takes the same lock, so a second run on the same
destination of a host is refused whatever the method. A dry run asks
:func:`lock_forecast` instead: the same verdict and line, from ``lstat`` and
``/proc/locks``, taking no lock and making no file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time

__all__ = ["BeneathError", "open_root", "open_dir_beneath", "split_rel", "lock_dest",
           "unlock_dest", "lock_forecast", "flock_held", "lstat_at", "LOCK_SUFFIX", "lock_name", "STAGED_SUFFIX", "staged_marker",
           "mark_staged", "was_staged", "unmark_staged", "remove_entry", "shown_name",
           "clean_staged_leftovers", "STAGED_TMP_MAX", "STAGED_TMP_MIN_AGE"]

LOCK_SUFFIX = ".chiba-lock"
STAGED_SUFFIX = ".chiba-staged"
# A killed mark_staged's temporary file (.NAME.chiba-staged.PID-8HEX) holds a job id and a
# newline: one larger is not the tool's. One younger than this many seconds is left alone
# (clean_staged_leftovers: a second guard beside the lock, for a file system whose flock
# is local to each host).
STAGED_TMP_MAX = 64
STAGED_TMP_MIN_AGE = 60.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BeneathError(OSError):
    """A path below a root could not be walked safely (symlink, not a directory, missing).

    ``str()`` is one line naming the path and why; ``errno`` is kept from the cause.
    """

    def __init__(self, err: int, what: str, path: str):
        super().__init__(err, what, path)
        self.what = what
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def split_rel(rel: str) -> list[str]:
    """The components of a relative path; raises ValueError on ``..``, ``.``-only or absolute.

    ``""`` gives ``[]``. Repeated slashes are tolerated, ``..`` never.
    """
    if rel.startswith("/"):
        raise ValueError(f"not a relative path: {rel!r}")
    parts = [p for p in rel.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise ValueError(f"'..' in {rel!r}")
    return parts


def open_root(root: str, *, create: bool = False, mode: int = 0o755) -> int:
    """Open the trusted root directory (symlinks in it are the administrator's, followed).

    With ``create`` missing directories are made (``mode``). Returns a directory fd.
    Raises BeneathError when it is missing or not a directory.
    """
    try:
        if create:
            os.makedirs(root, mode=mode, exist_ok=True)
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BeneathError(errno.ENOENT, "directory does not exist (run `chiba-admin cluster"
                           " init`)", root) from None
    except NotADirectoryError:
        raise BeneathError(errno.ENOTDIR, "not a directory", root) from None


def open_dir_beneath(root_fd: int, rel: str, *, create: bool = False, mode: int = 0o755,
                     display: str = "") -> int:
    """Open directory ``rel`` below ``root_fd`` without following any symlink in ``rel``.

    Each component is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous
    one; with ``create`` a missing component is made with ``mkdirat`` (``mode``, umask
    applies). Returns a new fd (the caller closes it). ``display`` prefixes paths in errors.
    Raises BeneathError (ELOOP for a symlink, ENOTDIR for a non-directory, ENOENT missing).
    """
    fd = os.dup(root_fd)
    done = display.rstrip("/")
    try:
        for part in split_rel(rel):
            done = f"{done}/{part}" if done else part
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise BeneathError(errno.ENOENT, "does not exist", done) from None
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass  # a racing creator: open it below, with the same checks
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise BeneathError(errno.ELOOP, "is a symbolic link (not followed)",
                                           done) from None
                    raise BeneathError(errno.ENOTDIR, "is not a directory", done) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def lock_name(name: str) -> str:
    """The exact lock-file name for a destination called ``name``: ``.NAME.chiba-lock``."""
    return f".{name}{LOCK_SUFFIX}"


def _lock_refused(st: os.stat_result, lname: str, shown: str) -> BeneathError | None:
    """Why the lock file ``lname`` (``st``, not followed) may not be used, or None.

    Planted by someone else (in a scratch any user can write) it is neither trusted nor
    removed: a symlink, a file of another owner, anything but a regular file."""
    if stat.S_ISLNK(st.st_mode):
        return _lock_symlink(lname, shown)
    if st.st_uid != os.geteuid():
        return BeneathError(errno.EPERM, f"lock file {lname} belongs to uid {st.st_uid}, "
                            "not to chiba-admin's user (remove it, or pick another --dest)",
                            shown)
    if not stat.S_ISREG(st.st_mode):
        return BeneathError(errno.EPERM, f"lock file {lname} is not a regular file (remove"
                            " it, or pick another --dest)", shown)
    return None


def _lock_symlink(lname: str, shown: str) -> BeneathError:
    return BeneathError(errno.ELOOP, f"lock file {lname} is a symbolic link (remove it, or"
                        " pick another --dest)", shown)


def _busy(shown: str) -> BeneathError:
    return BeneathError(errno.EBUSY, "another chiba-admin run is writing this destination"
                        " (wait for it, or pick another --dest)", shown)


def lstat_at(parent_fd: int, name: str) -> os.stat_result | None:
    """``name`` in directory ``parent_fd``, not followed; None when it does not exist."""
    try:
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _lock_shown(name: str, display: str) -> str:
    return f"{display.rstrip('/')}/{name}" if display else name


def flock_held(st: os.stat_result) -> bool | None:
    """Does a process hold a ``flock`` on the file ``st`` describes? Read from Linux's
    ``/proc/locks`` (by device and inode), taking no lock: a probe with ``flock`` itself,
    even shared, would make a real run's ``LOCK_EX | LOCK_NB`` fail while it held it.
    None when ``/proc/locks`` cannot be read."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 5722 fe:00:2196438 0 EOF"; waiters have "->" after
        # the number and hold nothing
        f = line.split()
        if len(f) > 5 and f[1] == "FLOCK" and f[5] == key:
            return True
    return False


def lock_forecast(parent_fd: int, name: str, *, display: str = "") -> BeneathError | None:
    """What :func:`lock_dest` would raise for destination ``name`` now (the same error and
    line), or None when it would take the lock; for a dry run: reads only (``lstat``,
    :func:`flock_held`), makes no lock file and takes no lock. A held lock is not seen
    where ``/proc/locks`` cannot be read."""
    lname = lock_name(name)
    shown = _lock_shown(name, display)
    st = lstat_at(parent_fd, lname)
    if st is None:
        return None  # lock_dest makes it
    refused = _lock_refused(st, lname, shown)
    if refused is None and flock_held(st):
        return _busy(shown)
    return refused


def lock_dest(parent_fd: int, name: str, *, display: str = "") -> int:
    """Take the run lock of destination ``name`` in directory ``parent_fd``; returns its fd.

    Non-blocking: raises BeneathError(EBUSY) when another live run holds it (the message
    says so). A lock file planted by another user (a symlink, another owner's file, a FIFO)
    is refused by ``lstat`` before it is opened, then the file is opened ``O_NOFOLLOW`` and
    checked again; a lock file removed by its previous holder while we waited is not
    trusted. Every failure is a BeneathError naming the destination and the lock file.
    Release with :func:`unlock_dest`.
    """
    lname = lock_name(name)
    shown = _lock_shown(name, display)
    for _ in range(8):
        st = lstat_at(parent_fd, lname)
        if st is not None and (refused := _lock_refused(st, lname, shown)) is not None:
            raise refused
        try:
            fd = os.open(lname, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped in after the lstat
                raise _lock_symlink(lname, shown) from None
            raise BeneathError(e.errno or errno.EIO, f"cannot open lock file {lname}: "
                               f"{e.strerror or e}", shown) from None
        refused = _lock_refused(os.fstat(fd), lname, shown)
        if refused is not None:  # swapped in after the lstat
            os.close(fd)
            raise refused
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(shown) from None
        try:
            now = os.stat(lname, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            return fd
        os.close(fd)  # its holder removed it while we waited: take the new one
    raise BeneathError(errno.EBUSY, "could not take the destination lock", shown)


def unlock_dest(parent_fd: int, name: str, fd: int) -> None:
    """Release a lock from :func:`lock_dest`: remove the file (still held), then close."""
    try:
        st = os.stat(lock_name(name), dir_fd=parent_fd, follow_symlinks=False)
        if (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev):
            os.unlink(lock_name(name), dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def staged_marker(name: str) -> str:
    """The exact marker-file name recording that ``name`` was created by a stage/collect."""
    return f".{name}{STAGED_SUFFIX}"


def mark_staged(parent_fd: int, name: str, jobid: str) -> None:
    """Record (beside it, in ``parent_fd``) that destination ``name`` is chiba-admin's own.

    An existing destination without this marker was not made by a stage or collect, and
    every method refuses to replace it unless the user says ``--replace``. The caller holds
    ``name``'s lock (:func:`lock_dest`). Raises BeneathError when the marker cannot be
    written (OSError when its temporary file cannot be created); that file is removed on
    any later error or interruption (an exception such as KeyboardInterrupt is raised
    again) while its name is still that file: a stop just after the rename leaves the name
    it freed, which another user may hold by then, alone. The one a killed process left is
    removed by the next run's :func:`clean_staged_leftovers`.
    """
    # A fresh file of ours renamed over the name: whatever another user planted there (a
    # FIFO that would hang an open, a symlink, a file they own) is replaced, never written
    # through; a directory in its place is refused.
    marker = staged_marker(name)
    tmp = f"{marker}.{os.getpid()}-{os.urandom(4).hex()}"  # _staged_tmp_re matches it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=parent_fd)
    ours = None  # the temporary file (alive as the marker once renamed: never reused)
    try:
        try:
            ours = os.fstat(fd)
            os.write(fd, f"{jobid}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, marker, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except BaseException as e:  # a stop (SIGTERM raised as an exception) included
        try:
            # a SIGTERM handler raises when the rename returns: the name is free by then
            st = os.stat(tmp, dir_fd=parent_fd, follow_symlinks=False)
            if ours is None or os.path.samestat(st, ours):
                os.unlink(tmp, dir_fd=parent_fd)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        raise BeneathError(e.errno or errno.EIO, f"cannot write the staged marker {marker}"
                           f" ({e.strerror}); remove what is in its place", name) from None


def _staged_tmp_re(name: str) -> re.Pattern:
    """The exact names :func:`mark_staged` gives its temporary files for ``name`` (to be
    matched whole: ``fullmatch``); ``name`` is escaped, its metacharacters match only
    themselves."""
    return re.compile(re.escape(staged_marker(name)) + r"\.[0-9]+-[0-9a-f]{8}")


def _holds_lock(parent_fd: int, name: str, lock_fd: int) -> bool:
    """Is ``lock_fd`` the file that is ``name``'s lock in ``parent_fd`` now (same device and
    inode; :func:`lock_dest` holds its flock for as long as it is open)?"""
    st = lstat_at(parent_fd, lock_name(name))
    return st is not None and os.path.samestat(st, os.fstat(lock_fd))


def clean_staged_leftovers(parent_fd: int, name: str, lock_fd: int) -> list[str]:
    """Remove the temporary files that a killed :func:`mark_staged` of ``name`` left in
    ``parent_fd`` (``.NAME.chiba-staged.PID-8HEX``: SIGKILL or a crash between its create
    and its rename); returns the names removed.

    Only while ``lock_fd``, from :func:`lock_dest`, holds ``name``'s lock: every writer of
    the marker holds that lock (stage, collect, the City Transit agent), so no live run is
    between its create and its rename. Nothing is removed when ``lock_fd`` is not that
    lock file. An entry is removed only if it is certainly the tool's own and dead: its
    name matched whole for this ``name``, and (``lstat``, never followed) a regular file
    with one link, owned by this process's effective uid (another user's file in a
    world-writable scratch is never touched), at most :data:`STAGED_TMP_MAX` bytes, last
    written at least :data:`STAGED_TMP_MIN_AGE` seconds ago. A symlink, FIFO or directory
    of that name is left. In a sticky directory no other user can swap a file of ours
    between the ``lstat`` and the ``unlink`` (which removes a name, never follows it).

    Raises nothing: what cannot be listed, read or removed stays for a later run.
    """
    try:
        if not _holds_lock(parent_fd, name, lock_fd):
            return []
        names = os.listdir(parent_fd)
    except OSError:
        return []
    pattern, uid, now, done = _staged_tmp_re(name), os.geteuid(), time.time(), []
    for entry in sorted(n for n in names if pattern.fullmatch(n)):
        try:
            st = os.stat(entry, dir_fd=parent_fd, follow_symlinks=False)
            if (stat.S_ISREG(st.st_mode) and st.st_uid == uid and st.st_nlink == 1
                    and st.st_size <= STAGED_TMP_MAX
                    and now - st.st_mtime >= STAGED_TMP_MIN_AGE):
                os.unlink(entry, dir_fd=parent_fd)
                done.append(entry)
        except OSError:
            continue  # gone meanwhile, or not removable: left for a later run
    return done


def was_staged(parent_fd: int, name: str) -> bool:
    """True when ``name`` in ``parent_fd`` carries a marker from :func:`mark_staged`.

    The marker must be a regular file owned by this process's user (the one that writes
    markers): in a world-writable scratch another user could otherwise forge one beside
    someone else's directory and have it replaced without ``--replace``.
    """
    try:
        st = os.stat(staged_marker(name), dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def unmark_staged(parent_fd: int, name: str) -> None:
    """Remove the marker of ``name`` (when a rollback removes what a stage created)."""
    try:
        os.unlink(staged_marker(name), dir_fd=parent_fd)
    except FileNotFoundError:
        pass


def remove_entry(parent_fd: int, name: str) -> None:
    """Remove ``name`` in ``parent_fd`` (a tree, never followed if a symlink); absent is fine."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(parent_fd, name)
        else:
            os.unlink(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass


def _clear_files(fd: int) -> list[str]:
    """Unlink every entry but directories in ``fd``'s directory; returns the directories."""
    subdirs = []
    with os.scandir(fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
            else:
                try:
                    os.unlink(e.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
    return subdirs


def _remove_tree(parent_fd: int, name: str) -> None:
    """Remove directory ``name`` in ``parent_fd`` and all below it, following no symlink.

    shutil.rmtree recurses once per level in Python 3.11: a tree 1,000 levels deep (an
    archive from a node can hold one) raised RecursionError and stayed. Here one descriptor
    walks the tree: down by name (``O_NOFOLLOW``), up by ``..``, which must be the directory
    it came down from (device and inode), so a directory moved meanwhile never leads the
    removal anywhere else (OSError).
    """
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        # (the name of fd's directory in its parent, the parent's stat, subdirectories left)
        stack = [(name, os.fstat(parent_fd), _clear_files(fd))]
        while stack:
            if stack[-1][2]:
                sub = stack[-1][2].pop()
                st = os.fstat(fd)
                try:
                    nfd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                os.close(fd)
                fd = nfd
                stack.append((sub, st, _clear_files(fd)))
                continue
            done, parent_st, _ = stack.pop()
            up = os.open("..", _DIR_FLAGS, dir_fd=fd) if stack else os.dup(parent_fd)
            os.close(fd)
            fd = up
            if not os.path.samestat(os.fstat(fd), parent_st):
                raise OSError(errno.ESTALE, "a directory moved while it was being removed")
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)


def shown_name(name: str, limit: int = 200) -> str:
    """``name`` quoted for a one-line message, its middle cut when long (an archive member's
    PAX name may be 1 MiB; a node may send one)."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"
