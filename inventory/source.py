"""Check a source tree before anything is sent: it exists, is named, holds no device node.

Standard library only below :func:`check_source` (which raises the CLI's InvalidRequest): rank
programs and the City Transit agent run :func:`find_device` on the nodes (collect's PATH).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator

__all__ = ["check_collect_root", "check_collect_name", "SourceInfo", "check_source",
           "walk_below", "find_device", "DeviceNode", "unreadable", "DEVICE_HINT", "shown_path",
           "COLLECT_NAME_MAX"]

DEVICE_HINT = "device nodes are never copied; remove it or exclude it"
# the longest name collect puts beside a copy NAME is ".NAME.chiba-collect-JOBID.old"
# (NAME + 32 bytes; the staged mark's temporary name takes 31): NAME_MAX (255) less that
COLLECT_NAME_MAX = 255 - 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class SourceInfo:
    """A checked source: absolute ``path``, whether it is a directory, and what it holds.

    ``files`` counts every non-directory entry (regular files, symlinks, FIFOs, sockets);
    ``bytes`` is the sum of regular files' sizes.
    """

    path: str
    is_dir: bool
    files: int
    bytes: int


@dataclass(frozen=True)
class DeviceNode:
    """A character or block device found in a tree: ``rel`` below the tree's top (``""``
    for the top itself) and ``kind`` (``"character"`` or ``"block"``)."""

    rel: str
    kind: str

    @property
    def what(self) -> str:
        return f"the source holds a {self.kind} device node"

    def line(self, top: str) -> str:
        """One line naming the device below ``top`` (the tree as shown to the user), what
        it is and what to do; undecodable bytes of names shown as ``\\xNN``."""
        return f"{_shown(top, self.rel)}: a {self.kind} device node ({DEVICE_HINT})"


def unreadable(top: str, e: OSError) -> str:
    """One line for an OSError of :func:`walk_below` or :func:`find_device` on the tree
    shown as ``top``: which path could not be read, and why."""
    rel = e.filename if isinstance(e.filename, str) and e.filename != "." else ""
    return f"cannot read {_shown(top, rel)}: {e.strerror or e}"


def _shown(top: str, rel: str) -> str:
    return shown_path(os.path.join(top, rel) if rel else top)


def shown_path(path: str) -> str:
    """``path`` for a one-line message: as it is (bytes that are not UTF-8 as ``\\xNN``)
    when every character prints, else quoted and escaped as
    :func:`inventory.beneath.shown_name` does: a newline in a user's PATH must not split
    the line, nor a control character rewrite the terminal."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    from inventory.beneath import shown_name

    return shown_name(text)


def walk_below(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below the open directory ``dir_fd``: ``(relative path, lstat)``.

    Directories are entered by descriptor with ``O_NOFOLLOW`` (a symlink is an entry, never
    followed; nothing is looked up by path), parents before their contents. Raises OSError
    (``filename`` is the relative path of the directory that could not be read).
    """
    stack: list[list] = []  # [fd, relative path, its entries once read]
    try:
        stack.append([os.dup(dir_fd), "", None])
        while stack:
            top = stack[-1]
            if top[2] is None:
                top[2] = _entries(top[0], top[1])
            got = next(top[2], None)
            if got is None:
                os.close(stack.pop()[0])
                continue
            name, st = got
            path = f"{top[1]}/{name}" if top[1] else name
            yield path, st
            if stat.S_ISDIR(st.st_mode):  # depth first: one open descriptor per level
                try:
                    stack.append([os.open(name, _DIR_FLAGS, dir_fd=top[0]), path, None])
                except OSError as e:
                    raise OSError(e.errno, e.strerror, path) from None
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _entries(fd: int, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """The entries of directory ``fd`` (read at once) with their lstat."""
    try:
        with os.scandir(fd) as it:
            return iter([(e.name, e.stat(follow_symlinks=False)) for e in it])
    except OSError as e:
        raise OSError(e.errno, e.strerror, rel or ".") from None


def find_device(dir_fd: int, name: str) -> DeviceNode | None:
    """The first device node at or below entry ``name`` of ``dir_fd``, or None.

    Nothing is followed: ``name`` and everything below it are looked at as they are
    (:func:`walk_below`). The check :func:`check_source` makes, done where the tree is
    (collect's PATH on each node). Raises OSError when the tree cannot be read, its
    ``filename`` the path below ``name`` (``"."`` for ``name``; see :func:`unreadable`).
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = _device_kind(st.st_mode)
        if kind or not stat.S_ISDIR(st.st_mode):
            return DeviceNode("", kind) if kind else None
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, ".") from None
    try:
        for rel, est in walk_below(fd):
            kind = _device_kind(est.st_mode)
            if kind:
                return DeviceNode(rel, kind)
    finally:
        os.close(fd)
    return None


def check_source(src: str | None, *, option: str = "SRC") -> SourceInfo:
    """Refuse (InvalidRequest, exit 2, one line naming the path) a source no method may send.

    An empty or missing ``src`` is refused (``stage ''`` must not pack the working
    directory); so is any character or block device node in the tree: device nodes are
    refused by every method before anything is sent (docs/design.md, "Safety"). The walk
    never follows symlinks below ``src`` (``src`` itself may be one, as rsync's ``src/``).
    """
    from chiba_admin.errors import InvalidRequest  # here: the node-side checks stay stdlib-only

    if src is None or str(src) == "":
        raise InvalidRequest(f"no {option} given", hint="name an existing file or directory")
    path = os.path.abspath(src)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidRequest("source does not exist", where=path,
                         hint="name an existing file or directory") from None
    except OSError as e:
        raise InvalidRequest(f"cannot read the source: {e.strerror}", where=path) from None
    if not stat.S_ISDIR(st.st_mode):
        _refuse_device(DeviceNode("", _device_kind(st.st_mode)), path)
        return SourceInfo(path, False, 1, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    files = size = 0
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for rel, est in walk_below(fd):
            if stat.S_ISDIR(est.st_mode):
                continue
            _refuse_device(DeviceNode(rel, _device_kind(est.st_mode)), path)
            files += 1
            if stat.S_ISREG(est.st_mode):
                size += est.st_size
    except PermissionError as e:
        raise InvalidRequest(f"cannot read the source: {e.strerror}",
                         where=os.path.normpath(os.path.join(path, e.filename or "."))
                         ) from None
    finally:
        if fd is not None:
            os.close(fd)
    return SourceInfo(path, True, files, size)


def _device_kind(mode: int) -> str:
    return "character" if stat.S_ISCHR(mode) else "block" if stat.S_ISBLK(mode) else ""


def _refuse_device(dev: DeviceNode, top: str) -> None:
    if dev.kind:
        from chiba_admin.errors import InvalidRequest

        raise InvalidRequest(dev.what, where=os.path.join(top, dev.rel) if dev.rel else top,
                         hint=DEVICE_HINT)


def check_collect_root(dest_dir: str) -> str:
    """The home server's directory for collected copies (absolute), refusing ``/``: every
    method writes ``DIR/<host>/<name>`` there, and under ``/`` that is a new top-level
    directory per host; refusing a ``DIR`` that is itself a symbolic link (a user's
    ``/tmp/udir -> /etc`` would have root write there; its parents are the
    administrator's, followed). Raises InvalidRequest (exit 2)."""
    from chiba_admin.errors import InvalidRequest

    path = os.path.abspath(dest_dir)
    if os.path.islink(path):
        raise InvalidRequest("--dest is a symbolic link, which collect (writing as root) "
                             "never follows", where=path,
                             hint="name the directory it points to instead; links among "
                                  "its parents are followed")
    if os.path.realpath(path) == "/":
        raise InvalidRequest("--dest is the root directory", where=dest_dir,
                         hint="name a directory for the collected copies, e.g. ./results")
    return path


def check_collect_name(name: str) -> None:
    """Refuse (InvalidRequest, exit 2), before anything is sent, a PATH whose last
    component ``name`` is too long for the names collect makes beside each copy (its lock,
    staged mark and temporary entries: :data:`COLLECT_NAME_MAX` bytes at most)."""
    from chiba_admin.errors import InvalidRequest

    size = len(os.fsencode(name))
    if size > COLLECT_NAME_MAX:
        raise InvalidRequest(f"PATH's last component is {size} bytes long; collect takes at "
                             f"most {COLLECT_NAME_MAX} (it names its lock, mark and temporary "
                             "entries after it)", where=shown_path(name),
                             hint="collect the directory above it, or rename it")
