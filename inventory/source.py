"""Check a source tree before anything is sent: it exists, is named, holds no device node."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from chiba_admin.errors import UsageError

__all__ = ["SourceInfo", "check_source"]


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


def check_source(src: str | None, *, option: str = "SRC") -> SourceInfo:
    """Refuse (UsageError, exit 2, one line naming the path) a source no method may send.

    An empty or missing ``src`` is refused (``stage ''`` must not pack the working
    directory); so is any character or block device node in the tree: device nodes are
    refused by every method before anything is sent (docs/design.md, "Safety"). The walk
    never follows symlinks below ``src`` (``src`` itself may be one, as rsync's ``src/``).
    """
    if src is None or str(src) == "":
        raise UsageError(f"no {option} given", hint="name an existing file or directory")
    path = os.path.abspath(src)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError("source does not exist", where=path,
                         hint="name an existing file or directory") from None
    except OSError as e:
        raise UsageError(f"cannot read the source: {e.strerror}", where=path) from None
    files = size = 0
    if not stat.S_ISDIR(st.st_mode):
        _refuse_device(st.st_mode, path)
        return SourceInfo(path, False, 1, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    est = e.stat(follow_symlinks=False)
                    if stat.S_ISDIR(est.st_mode):
                        stack.append(e.path)
                        continue
                    _refuse_device(est.st_mode, e.path)
                    files += 1
                    if stat.S_ISREG(est.st_mode):
                        size += est.st_size
        except PermissionError as e:
            raise UsageError(f"cannot read the source: {e.strerror}", where=d) from None
    return SourceInfo(path, True, files, size)


def _refuse_device(mode: int, path: str) -> None:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "character" if stat.S_ISCHR(mode) else "block"
        raise UsageError(f"the source holds a {kind} device node", where=path,
                         hint="device nodes are never copied; remove it or exclude it")
