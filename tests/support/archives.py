"""Hostile and crafted archives for the unpacking tests (tar members that escape, links, devices)."""

from __future__ import annotations

import io
import os
import tarfile

__all__ = ["crafted_tar", "symlink_chain_tar"]


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
