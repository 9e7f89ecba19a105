"""The home server's end of collect: ``DIR`` opened once, never through a symbolic link
and made root-only, and a guard that stops a host's copy before the file system fills.

Standard library only: collect's rank 0 (mpitools/collect/ranks.py) and the City Transit
agent's home-side unpacker (legacy_transit/transit_agent.py) import it.

collect runs as root and writes what nodes send. ``DIR`` is opened with ``O_NOFOLLOW |
O_DIRECTORY`` and everything below it is reached from that descriptor, so a ``DIR``
swapped for a link after the CLI checked it cannot redirect the writes (its parents are
the administrator's, followed: ``/home -> /data/home`` stays usable). What collect makes
(``DIR``, ``DIR/<host>``) is ``0700``: a node's setuid-root file must not sit in a tree
every user can enter. A node's ``truncate -s 50T`` comes home as 50 TB of data, so each
host's stream is stopped (:class:`SpaceGuard`) before the space left for users on the
home file system (``statvfs``: ``f_bavail * f_frsize``) would drop below a reserve;
root's reserved blocks are never counted as free.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

__all__ = ["open_collect_dir", "drop_collect_dir", "SpaceGuard", "NoSpace",
           "default_reserve", "RESERVE_CAP", "RESERVE_SHARE", "member_cost"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The default reserve: 1 GiB, or 5% of a file system smaller than 20 GiB (a reserve larger
# than a small file system would refuse every collect into it). --min-free sets another.
RESERVE_CAP = 1 << 30
RESERVE_SHARE = 20  # 1/20: 5%
# statvfs between two looks at the file system, in bytes written by this process: other
# writers are noticed within this much (one fstatvfs, microseconds, per 64 MiB)
_LOOK_EVERY = 64 << 20
_BLOCK = 4096  # what one member takes at the least (an inode, a directory entry, a block)


def open_collect_dir(path: str, *, create: bool) -> tuple[int, bool]:
    """``(fd, made)``: collect's ``DIR`` (absolute ``path``) opened ``O_NOFOLLOW |
    O_DIRECTORY``, made ``0700`` when missing and ``create`` (its missing parents as
    ``mkdir -p`` makes them); ``made`` says this call made it. Raises BeneathError (ELOOP,
    one line naming ``DIR``) when it is a symbolic link, else OSError (ENOTDIR, ENOENT,
    EACCES)."""
    from inventory.beneath import BeneathError

    parent, name = os.path.split(path)
    if create:
        os.makedirs(parent, exist_ok=True)  # the administrator's parents, links followed
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        made = False
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
                made = True
            except FileExistsError:
                pass  # an existing DIR keeps its mode
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=pfd), made
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                    os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                raise BeneathError(errno.ELOOP, "is a symbolic link (collect never follows "
                                   "one to write)", path) from None
            raise
    finally:
        os.close(pfd)


def drop_collect_dir(path: str, fd: int) -> None:
    """Remove ``DIR`` (``path``, open as ``fd``) if it is still that directory and empty:
    a collect that made it and kept nothing leaves no trace."""
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if os.path.samestat(os.stat(name, dir_fd=pfd, follow_symlinks=False), os.fstat(fd)):
            os.rmdir(name, dir_fd=pfd)
    except OSError:
        pass  # not empty (a host's copy, someone's file), or gone
    finally:
        os.close(pfd)


def default_reserve(st: os.statvfs_result) -> int:
    """The space a collect leaves free for users when ``--min-free`` is not given: 1 GiB,
    or 5% of a file system smaller than 20 GiB."""
    return min(RESERVE_CAP, st.f_blocks * st.f_frsize // RESERVE_SHARE)


def member_cost(size: int) -> int:
    """What writing a member of ``size`` data bytes may take: whole blocks, and one more
    (an empty file or a directory takes an inode and an entry)."""
    return (max(0, size) + 2 * _BLOCK - 1) // _BLOCK * _BLOCK


class NoSpace(OSError):
    """Writing on would take the home file system below its reserve; ``str()`` is the
    one line to report (the caller puts the host's name first)."""

    def __str__(self) -> str:
        return self.strerror


class SpaceGuard:
    """Asked before (:meth:`take`) and after (:meth:`wrote`) writing bytes below ``fd``
    (``DIR``); raises :class:`NoSpace` when they would leave less than ``reserve`` bytes
    (None: :func:`default_reserve`) free for users on its file system. Thread-safe: the
    hosts unpacked at once by one process share one guard, so their bytes being written
    count against each other; other processes' writes are seen at each look (every
    64 MiB written here, and whenever what is asked does not fit what was left)."""

    def __init__(self, fd: int, reserve: int | None, shown: str):
        st = os.fstatvfs(fd)
        self.reserve = default_reserve(st) if reserve is None else max(0, int(reserve))
        self.fd, self.shown = fd, shown
        self._lock = threading.Lock()
        self._pending = 0  # taken, not yet written
        self._written = 0  # since the last look
        self.free = self._left = 0
        self._look(st)

    def _look(self, st: os.statvfs_result | None = None) -> None:
        st = st or os.fstatvfs(self.fd)
        self.free = st.f_bavail * st.f_frsize
        self._left = self.free - self.reserve - self._pending
        self._written = 0

    def take(self, n: int) -> None:
        """Before writing ``n`` bytes: raises NoSpace when they do not fit above the
        reserve (nothing is taken then)."""
        with self._lock:
            if n > self._left:
                self._look()
            if n > self._left:
                raise self._refusal(n)
            self._left -= n
            self._pending += n

    def wrote(self, n: int, *, check: bool = True) -> None:
        """``n`` bytes :meth:`take` gave are written (or, after a failure, will not be).
        With ``check``, every 64 MiB look again, and raise NoSpace when what is still
        taken no longer fits (another process used the space)."""
        with self._lock:
            self._pending -= n
            self._written += n
            if check and self._written >= _LOOK_EVERY:
                self._look()
                if self._left < 0:
                    raise self._refusal(0)

    def _refusal(self, n: int) -> NoSpace:
        need = n + self._pending
        what = f"{_iec(need)} more to write" if need else "more to write"
        return NoSpace(errno.ENOSPC, (
            f"stopped before the home server's file system {_mount_of(self.shown)} "
            f"(holding {self.shown}) would have less than {_iec(self.reserve)} free: "
            f"{_iec(self.free)} left, {what}; nothing of this host was kept (free some "
            "space there, or set --min-free)"))


def _iec(n: int) -> str:
    """``n`` bytes as ``3.2 GiB`` (3 significant digits; whole bytes below 1 KiB)."""
    n = max(0, n)
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 999.5 or unit == "PiB":
            return f"{n:.3g} {unit}"
    raise AssertionError("unreachable")


def _mount_of(path: str) -> str:
    """The mount point holding ``path`` (for a message): its highest ancestor on the same
    device."""
    try:
        here = os.path.realpath(path)
        dev = os.stat(here).st_dev
        while here != "/" and os.stat(os.path.dirname(here)).st_dev == dev:
            here = os.path.dirname(here)
        return here
    except OSError:
        return path
