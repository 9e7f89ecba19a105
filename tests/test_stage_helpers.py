"""Helpers shared by the staging tests: awkward source trees, byte-for-byte comparison, tars."""

from __future__ import annotations

import io
import os
import stat
import tarfile

__all__ = ["make_tree", "tree_signature", "assert_same_tree", "stage_leftovers",
           "crafted_tar", "NASTY_NAMES"]

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


def tree_signature(root) -> dict:
    """Relative path -> (kind, content or link target, permission bits)."""
    root = str(root)
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
    """Temporary or old-copy dirs of any staging job left in the hosts' scratch trees."""
    found = []
    for h in hosts:
        host = topo.host(h)
        for dirpath, dirnames, filenames in os.walk(host.local_path(host.scratch)):
            for n in dirnames + filenames:
                if ".chiba-stage-" in n or ".chiba-collect-" in n:
                    found.append(os.path.join(dirpath, n))
    return found


def crafted_tar(kind: str) -> bytes:
    """An uncompressed tar with one good file and one hostile member of ``kind``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        good = b"fine\n"
        ti = tarfile.TarInfo("good.txt")
        ti.size = len(good)
        tar.addfile(ti, io.BytesIO(good))
        bad = tarfile.TarInfo({"absolute": "/etc/chiba-evil", "dotdot": "../../evil",
                               "link": "escape", "device": "null-dev"}[kind])
        if kind == "link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "device":
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
        else:
            bad.size = 5
        tar.addfile(bad, io.BytesIO(b"evil\n") if bad.isreg() else None)
    return buf.getvalue()
