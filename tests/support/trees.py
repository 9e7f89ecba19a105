"""Source trees for the tests, and the one byte-for-byte comparison they are judged by.

``make_awkward_tree`` exercises every kind of entry ``rsync -a`` keeps (names, types,
modes, times, owners); ``make_tree`` is the everyday tree (awkward names, a symlink, an
empty directory, a random binary file); ``special_tree`` holds what only root can make;
``make_repo`` is a software repository as ``sync-mayors`` sees one.

Paths are built as bytes, so a name that is not UTF-8 is as easy as any other. Modes are
set after content is written (a 0555 directory cannot be filled afterwards), owners before
modes (chown clears setuid/setgid), and times last, deepest first, so that creating an
entry never moves its parent's mtime after it was set.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

__all__ = ["make_awkward_tree", "make_device_tree", "AWKWARD_OWNER", "MTIME_BASE_NS",
           "DEVICE_REL", "NASTY_NAMES", "make_tree", "count_files", "tree_signature",
           "assert_same_tree", "special_tree", "make_repo", "same_inventory",
           "stage_leftovers"]

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
        for rel, kind, _mode in _OWNED:
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
        for rel, _kind, mode in _OWNED:
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


# names a careless shell line, quoting or encoding would break
NASTY_NAMES = ["plain.txt", "with space.txt", "quote'single", 'quote"double', "new\nline",
               "$(x)", "$(touch pwned)", "back\\slash", "ünïcødé", "-dash", "*star?",
               "semi;colon&amp"]


def make_tree(root, *, big: int = 300_000, seed: int = 1) -> Path:
    """The everyday source tree at ``root`` (created if missing); returns it as a Path.

    Files named ``NASTY_NAMES`` at the top, ``sub dir/`` with a 0640 text file and a
    relative symlink to it, ``sub dir/deeper $(x)/bin.dat`` of ``big`` random bytes
    (seeded: the same tree for the same ``seed``), and the empty directory ``empty``.
    ``count_files`` gives the number of non-directory entries.
    """
    rnd = random.Random(seed)
    root = Path(root)
    os.makedirs(root / "sub dir" / "deeper $(x)", exist_ok=True)
    os.makedirs(root / "empty", exist_ok=True)
    for i, n in enumerate(NASTY_NAMES):
        (root / n).write_text(f"{n!r} {i}\n" * (i + 1))
    (root / "sub dir" / "deeper $(x)" / "bin.dat").write_bytes(rnd.randbytes(big))
    (root / "sub dir" / "text.txt").write_text("compressible line\n" * 5000)
    os.chmod(root / "sub dir" / "text.txt", 0o640)
    os.symlink("text.txt", root / "sub dir" / "link to text")
    return root


def count_files(root, *, links: bool = True) -> int:
    """Entries under ``root`` that are not directories: files and, with ``links``,
    symlinks (what transit reports as ``files``; rsync's ``files_transferred`` counts
    regular files only, ``links=False``)."""
    n = 0
    for d, dirs, files in os.walk(root):
        for name in files + dirs:
            p = os.path.join(d, name)
            if os.path.islink(p):
                n += links
            elif not os.path.isdir(p):
                n += 1
    return n


def tree_signature(root, *, meta: bool = False) -> dict:
    """Relative path -> (kind, content or link target, permission bits).

    With ``meta``: path -> (full st_mode, uid, gid, mtime_ns, content or target, inode
    group) for every entry, the root itself (``.``) included; hard links share a group.
    """
    root = str(root)
    if meta:
        return _meta_signature(root)
    sig = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                sig[rel] = ("link", os.readlink(p), None)
            elif stat.S_ISDIR(st.st_mode):
                sig[rel] = ("dir", None, stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    sig[rel] = ("file", f.read(), stat.S_IMODE(st.st_mode))
    return sig


def assert_same_tree(a, b) -> None:
    """Same names, kinds, bytes, symlink targets and permission bits under ``a`` and ``b``."""
    assert os.path.isdir(b), f"{b} missing"
    sa, sb = tree_signature(a), tree_signature(b)
    assert sorted(sa) == sorted(sb), (sorted(set(sa) ^ set(sb)), a, b)
    for k in sa:
        assert sa[k] == sb[k], (k, a, b)


def stage_leftovers(topo, hosts) -> list[str]:
    """Temporary or old-copy dirs and lock files of any staging job left in scratch trees."""
    found = []
    for h in hosts:
        host = topo.host(h)
        for dirpath, dirnames, filenames in os.walk(host.local_path(host.scratch)):
            for n in dirnames + filenames:
                if ".chiba-stage-" in n or ".chiba-collect-" in n or n.endswith(".chiba-lock"):
                    found.append(os.path.join(dirpath, n))
    return found


def _meta_signature(root: str) -> dict:
    sig, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        entries = ([root] if dirpath == root else []) + [os.path.join(dirpath, n)
                                                          for n in dirnames + filenames]
        for p in entries:
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                data = open(p, "rb").read()
            else:
                data = None
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            sig[rel] = (st.st_mode, st.st_uid, st.st_gid, mtime, data, st.st_ino)
    # hard links: the sorted names sharing an inode, whatever the walk order
    groups = {ino: tuple(sorted(names)) for ino, names in inodes.items()}
    return {rel: v[:5] + (groups.get(v[5]),) for rel, v in sig.items()}


def special_tree(root) -> str:
    """Modes rsync -a keeps (0775, 0664, 0700/0555/2775 dirs, 4755), owners, an absolute
    and a dangling symlink, a FIFO, a socket, hard links, exact mtimes (needs root)."""
    root = str(root)
    os.makedirs(root)
    j = os.path.join
    for d in ("private", "readonly", "shared", "shared/inner"):
        os.mkdir(j(root, d))
    files = {"group-rw.txt": 0o664, "exec.sh": 0o775, "private/secret": 0o600,
             "shared/inner/f": 0o640, "suid-root": 0o4755, "user-suid": 0o4750,
             "readonly/r": 0o444}
    for name, mode in files.items():
        with open(j(root, name), "w") as f:
            f.write(name * 3)
        os.chmod(j(root, name), mode)
    os.chown(j(root, "user-suid"), 1234, 2345)
    os.chmod(j(root, "user-suid"), 0o4750)  # chown cleared it
    os.chown(j(root, "shared/inner/f"), 4321, 1234)
    os.link(j(root, "group-rw.txt"), j(root, "shared/hard link"))
    os.symlink("/etc/passwd", j(root, "abs-link"))
    os.symlink("../nowhere/at all", j(root, "shared/dangling"))
    os.lchown(j(root, "abs-link"), 1234, 1234)
    os.mkfifo(j(root, "fifo"), 0o640)
    os.mknod(j(root, "shared/sock"), stat.S_IFSOCK | 0o660)
    os.chown(j(root, "fifo"), 1234, 2345)
    ns = 1_600_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(j(dirpath, n), ns=(ns, ns), follow_symlinks=False)
            ns += 1_000_000_007
    for d, mode in (("private", 0o700), ("readonly", 0o555), ("shared", 0o2775),
                    ("shared/inner", 0o1777)):
        os.chmod(j(root, d), mode)
    os.chown(root, 1234, 2345)
    os.chmod(root, 0o2775)
    for d in ("private", "readonly", "shared/inner", "shared", ""):
        os.utime(j(root, d) if d else root, ns=(ns, ns))
        ns += 3
    return root




_REPO_ODD = ["plain.txt", "with space", "quote'\"s", "$(touch pwned)", "new\nline", "ünï"]


def make_repo(root, nfiles: int = 60, seed: int = 1) -> str:
    """A repository at ``root`` (created): nested dirs, odd names, ``nfiles`` files of 0 to
    70 000 random bytes, a 9 MiB file, symlinks (one dangling), a mode and an old mtime."""
    rnd = random.Random(seed)
    root = os.fspath(root)
    os.makedirs(root)
    for d in ("bin", "lib/python", "share/doc x"):
        os.makedirs(os.path.join(root, d))
    for i in range(nfiles):
        d = rnd.choice(["", "bin", "lib/python", "share/doc x"])
        with open(os.path.join(root, d, f"f{i:03d}"), "wb") as f:
            f.write(rnd.randbytes(rnd.choice([0, 10, 3000, 70000])))
    for name in _REPO_ODD:
        with open(os.path.join(root, name), "w") as f:
            f.write(name)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(rnd.randbytes(9 << 20 | 123))
    exe = os.path.join(root, "bin", "f000")
    os.chmod(exe if os.path.exists(exe) else os.path.join(root, "plain.txt"), 0o755)
    os.symlink("lib/python", os.path.join(root, "pylink"))
    os.symlink("../../outside", os.path.join(root, "lib", "dangling"))
    os.utime(os.path.join(root, "plain.txt"), ns=(1_000_000_000, 1_000_000_000))
    return root


def same_inventory(a, b, excludes=()) -> bool:
    """Whether the trees at ``a`` and ``b`` are the same by the project's own scanner
    (``inventory.scan`` with checksums), ``excludes`` as rsync rules."""
    from inventory import scan

    ia = scan(a, excludes=excludes, checksum=True)
    ib = scan(b, excludes=excludes, checksum=True)
    return ia.same_tree(ib, content=True)
