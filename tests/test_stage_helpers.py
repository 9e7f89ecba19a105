"""Helpers shared by the staging tests: awkward source trees, byte-for-byte comparison, tars."""

from __future__ import annotations

import io
import os
import stat
import tarfile

__all__ = ["make_tree", "tree_signature", "assert_same_tree", "stage_leftovers",
           "crafted_tar", "NASTY_NAMES", "special_tree", "symlink_chain_tar"]

NASTY_NAMES = ["with space.txt", "quote'single", 'quote"double', "new\nline", "$(x)",
               "back\\slash", "ünïcødé", "-dash", "*star?"]


def make_tree(root, *, big: int = 300_000, seed: int = 1) -> str:
    """A tree with awkward names, an empty dir, a relative symlink and a random binary file."""
    import random

    rnd = random.Random(seed)
    root = str(root)
    os.makedirs(os.path.join(root, "sub dir", "deeper $(x)"), exist_ok=True)
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    for i, n in enumerate(NASTY_NAMES):
        with open(os.path.join(root, n), "w") as f:
            f.write(f"{n!r} {i}\n" * (i + 1))
    with open(os.path.join(root, "sub dir", "deeper $(x)", "bin.dat"), "wb") as f:
        f.write(rnd.randbytes(big))
    with open(os.path.join(root, "sub dir", "text.txt"), "w") as f:
        f.write("compressible line\n" * 5000)
    os.chmod(os.path.join(root, "sub dir", "text.txt"), 0o640)
    os.symlink("text.txt", os.path.join(root, "sub dir", "link to text"))
    return root


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


def symlink_chain_tar(dest: str, target: str) -> bytes:
    """The CVE-2025-4517 archive: 16 nested symlinked directories whose resolved path
    exceeds PATH_MAX, then a symlink through them to ``target``'s directory and a file
    written through that symlink. Python 3.11.7's ``data`` filter lets it write ``target``.
    """
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        path = ""
        for step in steps:
            a = tarfile.TarInfo(os.path.join(path, comp))
            a.type = tarfile.DIRTYPE
            tar.addfile(a)
            b = tarfile.TarInfo(os.path.join(path, step))
            b.type, b.linkname = tarfile.SYMTYPE, comp
            tar.addfile(b)
            path = os.path.join(path, comp)
        linkpath = os.path.join(*steps, "l" * 254)
        link = tarfile.TarInfo(linkpath)
        link.type, link.linkname = tarfile.SYMTYPE, "../" * len(steps)
        tar.addfile(link)
        esc = tarfile.TarInfo("escape")
        esc.type = tarfile.SYMTYPE
        esc.linkname = linkpath + "/" + os.path.relpath(os.path.dirname(target), dest)
        tar.addfile(esc)
        body = b"written outside the destination\n"
        f = tarfile.TarInfo("escape/" + os.path.basename(target))
        f.size = len(body)
        tar.addfile(f, io.BytesIO(body))
    return buf.getvalue()


def crafted_tar(kind: str) -> bytes:
    """An uncompressed tar with one good file and one hostile member of ``kind``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        good = b"fine\n"
        ti = tarfile.TarInfo("good.txt")
        ti.size = len(good)
        tar.addfile(ti, io.BytesIO(good))
        bad = tarfile.TarInfo({"absolute": "/etc/chiba-evil", "dotdot": "../../evil",
                               "link": "escape", "device": "null-dev", "hardlink-out": "hl",
                               "hardlink-abs": "hl", "hardlink-later": "hl"}[kind])
        if kind.startswith("hardlink"):
            bad.type = tarfile.LNKTYPE
            bad.linkname = {"hardlink-out": "../../etc/passwd", "hardlink-abs": "/etc/passwd",
                            "hardlink-later": "later.txt"}[kind]
        elif kind == "link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "device":
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
        else:
            bad.size = 5
        tar.addfile(bad, io.BytesIO(b"evil\n") if bad.isreg() else None)
    return buf.getvalue()
