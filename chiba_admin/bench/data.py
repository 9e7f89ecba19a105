"""Generated benchmark payloads: incompressible data, a compressible tree, a synthetic
repository, many small files. Deterministic for a seed."""

from __future__ import annotations

import os
import random
from pathlib import Path

__all__ = ["make_random", "make_text_tree", "make_repository", "mutate_repository",
           "make_small_files", "tree_bytes"]

_WORDS = ("cluster node mayor president town stage sync broadcast reduce rank chunk "
          "archive tar spool scratch repository inventory plan apply rsync pdsh transit "
          "bandwidth latency ethernet switch kernel module library header source build "
          "install configure compile link test result report figure table").split()


def make_random(root: str | Path, size: int, seed: int = 0) -> Path:
    """A directory holding one file of ``size`` incompressible bytes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    with open(root / "data.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return root


def _text_block(rnd: random.Random, size: int) -> bytes:
    words = rnd.choices(_WORDS, k=size // 6 + 16)
    lines, line = [], []
    for w in words:
        line.append(w if rnd.random() > 0.05 else f"{w}{rnd.randrange(10_000)}")
        if len(line) >= 12:
            lines.append(" ".join(line))
            line = []
    return ("\n".join(lines) + "\n").encode()[:size]


def make_text_tree(root: str | Path, size: int, files: int = 400, seed: int = 0) -> Path:
    """About ``size`` bytes of source-like text in ``files`` files under nested dirs
    (compresses roughly 3-4x with zstd, like a source tree)."""
    root = Path(root)
    rnd = random.Random(seed)
    block = _text_block(rnd, 1 << 20)
    per = max(1, size // files)
    written = 0
    for i in range(files):
        d = root / f"pkg{i % 8}" / f"mod{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        n = per if i < files - 1 else max(0, size - written)
        start = rnd.randrange(len(block))
        data = (block[start:] + block)[: n] if n <= len(block) else (block * (n // len(block) + 1))[:n]
        (d / f"file{i:04d}.txt").write_bytes(data)
        written += n
    return root


def make_repository(root: str | Path, files: int = 3000, size: int = 150 << 20,
                    seed: int = 0) -> Path:
    """A software-repository-like tree: many small files, some medium, a few large,
    totalling about ``size`` bytes in ``files`` files, plus a few symlinks."""
    root = Path(root)
    rnd = random.Random(seed)
    nlarge = max(1, files // 300)
    nmedium = max(1, files // 10)
    nsmall = files - nlarge - nmedium
    small = [rnd.randint(200, 16_000) for _ in range(nsmall)]
    medium = [rnd.randint(40_000, 400_000) for _ in range(nmedium)]
    rest = max(nlarge, size - sum(small) - sum(medium))
    large = [rest // nlarge] * nlarge
    sizes = small + medium + large
    rnd.shuffle(sizes)
    for i, n in enumerate(sizes):
        d = root / f"pkg{i % 40:02d}" / ("lib" if i % 3 else "bin")
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:05d}", "wb") as f:
            left = n
            while left:
                k = min(left, 1 << 20)
                f.write(rnd.randbytes(k))
                left -= k
    for i in range(min(10, files)):
        link = root / f"pkg{i:02d}" / "current"
        if not link.exists():
            os.symlink("lib", link)
    return root


def mutate_repository(root: str | Path, fraction: float = 0.05, seed: int = 1) -> int:
    """Rewrite ``fraction`` of the files (new content, same size, new mtime); bytes changed."""
    root = Path(root)
    rnd = random.Random(seed)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    chosen = rnd.sample(files, max(1, int(len(files) * fraction)))
    changed = 0
    for p in chosen:
        n = p.stat().st_size
        with open(p, "r+b") as f:
            f.write(rnd.randbytes(n))
        changed += n
    return changed


def make_small_files(root: str | Path, files: int, per_dir: int = 500) -> Path:
    """``files`` files of 2-32 distinct bytes, ``per_dir`` to a directory (an inventory's
    worst case: metadata, not data; distinct contents so digests do not compress away)."""
    root = Path(root)
    for i in range(files):
        d = root / f"pkg{i // per_dir:04d}" / f"sub{(i // 50) % 10}"
        if i % 50 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file_{i:06d}.dat").write_bytes(f"{i}\n".encode() * ((i % 16) + 1))
    return root


def tree_bytes(root: str | Path) -> int:
    """Bytes in the regular files below ``root`` (symlinks not followed)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*")
               if p.is_file() and not p.is_symlink())
