"""Source trees that exercise every kind of entry ``rsync -a`` keeps (names, types, modes, times, owners).

Paths are built as bytes, so a name that is not UTF-8 is as easy as any other. Modes are
set after content is written (a 0555 directory cannot be filled afterwards), owners before
modes (chown clears setuid/setgid), and times last, deepest first, so that creating an
entry never moves its parent's mtime after it was set.
"""

from __future__ import annotations

import os
import stat

__all__ = ["make_awkward_tree", "make_device_tree", "AWKWARD_OWNER", "MTIME_BASE_NS",
           "DEVICE_REL"]

# a user and group that exist on no host: rsync -a as root keeps them numerically
AWKWARD_OWNER = (1234, 5678)
# mtimes: whole seconds far in the past plus a fraction of k/8 s, which a binary float and
# a microsecond both hold exactly, so a tool that passes times as float seconds (tarfile,
# os.utime with floats) is not faulted for a rounding that rsync would not make, while a
# tool that drops the fraction (tar's gnu format) or the time altogether is caught
MTIME_BASE_NS = 1_300_000_000 * 10**9
DEVICE_REL = "dev dir/null device"

# (relative path, bytes content) of regular files; modes below
_FILES: list[tuple[bytes, bytes]] = [
    (b"plain.txt", b"plain text\n"),
    (b"with space.txt", b"a name with spaces\n"),
    (b"it's \"quoted\"", b"single and double quotes\n"),
    (b"new\nline", b"a newline in the name\n"),
    (b"$(touch pwned)", b"a shell substitution in the name\n"),
    (b"-dash", b"a leading dash\n"),
    (b"caf\xe9.txt", b"latin-1 name, not UTF-8\n"),
    (b"d\xff\xfe dir/inner file", b"inside a directory whose name is not UTF-8\n"),
    (b"empty file", b""),
    (b"exec 0775", b"#!/bin/sh\necho 0775\n"),
    (b"group rw 0664", b"0664\n"),
    (b"private 0600", b"0600\n"),
    (b"setuid 4755", b"#!/bin/sh\necho setuid\n"),
    (b"setgid 2755", b"#!/bin/sh\necho setgid\n"),
    (b"hard a", b"one inode, two names\n" * 10),
    (b"nested/a/b/c/deep.txt", b"deep\n"),
    (b"nested/a/sibling", bytes(range(256)) * 8),
    (b"private dir 0700/secret", b"secret\n"),
    (b"readonly dir 0555/kept", b"kept\n"),
    (b"setgid dir 2775/inside", b"inside\n"),
    (b"sticky 1777/tmpfile", b"tmp\n"),
]
_FILE_MODES = {b"exec 0775": 0o775, b"group rw 0664": 0o664, b"private 0600": 0o600,
               b"setuid 4755": 0o4755, b"setgid 2755": 0o2755}
_EMPTY_DIRS = [b"empty dir", b"nested/empty", b"nested/a/b/empty too"]
_DIR_MODES = {b"private dir 0700": 0o700, b"readonly dir 0555": 0o555,
              b"setgid dir 2775": 0o2775, b"sticky 1777": 0o1777, b"nested/a": 0o750}
_HARD_LINKS = [(b"hard a", b"nested/hard b")]
# a symlink is data: relative, to a directory, absolute, dangling, and pointing outside
_SYMLINKS = [
    (b"links/rel", b"../plain.txt"),
    (b"links/rel dir", b"../nested/a"),
    (b"links/abs", b"/etc/passwd"),
    (b"links/abs dangling", b"/nonexistent/chiba-contract/target"),
    (b"links/dangling", b"no such file"),
    (b"links/outside", b"../../../outside the tree"),
    (b"links/odd \n name", b"caf\xe9.txt"),
]
_FIFO = b"specials/fifo"
_SOCKET = b"specials/socket"
# owned by AWKWARD_OWNER when run as root: (path, kind, mode)
_OWNED = [
    (b"owned", "dir", 0o750),
    (b"owned/user file", "file", 0o640),
    (b"owned/setuid user", "file", 0o4755),
    (b"owned/setgid user", "file", 0o2750),
    (b"owned/link", "link", None),
    (b"owned/fifo", "fifo", 0o600),
]


def _p(root: bytes, rel: bytes) -> bytes:
    return os.path.join(root, rel)


def _set_times(root: bytes) -> None:
    """Give every entry, the root included, its own mtime; children before parents."""
    entries = [b"."]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        entries += [os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames]
    entries.sort(key=lambda e: (-e.count(b"/") - (e != b"."), e))
    for i, rel in enumerate(entries):
        t = MTIME_BASE_NS + i * 1000 * 10**9 + (i % 7 + 1) * 125_000_000
        os.utime(_p(root, rel), ns=(t, t), follow_symlinks=False)


def make_awkward_tree(root) -> str:
    """Build the contract's source tree at ``root`` (created); returns ``root`` as str.

    Holds awkward names (spaces, quotes, a newline, non-UTF-8 bytes), nested and empty
    directories, a hard link, a 0-byte file, files of modes 0775/0664/0600/4755/2755,
    directories of modes 0700/0555/2775/1777, relative, absolute and dangling symlinks,
    a FIFO, a Unix socket, a distinct mtime on every entry (symlinks included) and, when
    run as root, entries owned by ``AWKWARD_OWNER`` (a setuid and a setgid file among
    them). No device node: see ``make_device_tree``.
    """
    broot = os.fsencode(root)
    os.makedirs(broot)
    for rel, data in _FILES:
        os.makedirs(os.path.dirname(_p(broot, rel)), exist_ok=True)
        with open(_p(broot, rel), "wb") as f:
            f.write(data)
    for d in _EMPTY_DIRS:
        os.makedirs(_p(broot, d), exist_ok=True)
    for src, dst in _HARD_LINKS:
        os.link(_p(broot, src), _p(broot, dst))
    for rel, target in _SYMLINKS:
        os.makedirs(os.path.dirname(_p(broot, rel)), exist_ok=True)
        os.symlink(target, _p(broot, rel))
    os.makedirs(_p(broot, b"specials"))
    os.mkfifo(_p(broot, _FIFO), 0o640)
    # mknod(S_IFSOCK) makes the same inode a bind() leaves behind, without bind()'s
    # 108-byte limit on the path (pytest's temporary paths are long)
    os.mknod(_p(broot, _SOCKET), stat.S_IFSOCK | 0o755)
    for rel, mode in _FILE_MODES.items():
        os.chmod(_p(broot, rel), mode)
    if os.geteuid() == 0:
        uid, gid = AWKWARD_OWNER
        for rel, kind, mode in _OWNED:
            p = _p(broot, rel)
            if kind == "dir":
                os.makedirs(p)
            elif kind == "file":
                with open(p, "wb") as f:
                    f.write(b"#!/bin/sh\necho " + rel + b"\n")
            elif kind == "fifo":
                os.mkfifo(p)
            else:
                os.symlink(b"user file", p)
            os.chown(p, uid, gid, follow_symlinks=False)
        for rel, kind, mode in _OWNED:
            if mode is not None:
                os.chmod(_p(broot, rel), mode)
    for rel, mode in _DIR_MODES.items():
        os.chmod(_p(broot, rel), mode)
    _set_times(broot)
    return os.fsdecode(broot)


def make_device_tree(root) -> str:
    """A small tree holding one character device node (1, 3, as /dev/null) at DEVICE_REL.

    Needs root (CAP_MKNOD). Returns ``root`` as str; the device's relative path is
    ``DEVICE_REL``, which every method must name when it refuses the tree.
    """
    root = os.fspath(root)
    os.makedirs(os.path.join(root, os.path.dirname(DEVICE_REL)))
    with open(os.path.join(root, "ok.txt"), "w") as f:
        f.write("an ordinary file beside the device\n")
    os.mknod(os.path.join(root, DEVICE_REL), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return root
