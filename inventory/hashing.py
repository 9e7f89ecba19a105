"""Content hashes of files: blake3 (default) or xxh3_128, streamed, mmapped or threaded."""

from __future__ import annotations

import mmap
import os
from typing import Sequence

import blake3
import xxhash

from chiba_admin.errors import InventoryError

__all__ = [
    "ALGOS",
    "DEFAULT_ALGO",
    "BLOCK_SIZE",
    "new_hasher",
    "digest_size",
    "check_algo",
    "hash_bytes",
    "hash_file",
    "hash_files",
]

ALGOS = ("blake3", "xxh3_128")
DEFAULT_ALGO = "blake3"
BLOCK_SIZE = 1 << 20
# Above this, mmap the file and let blake3 hash it on all cores; below, threads per file pay.
_MMAP_THRESHOLD = 16 << 20
_BATCH = 128
_DIGEST_SIZES = {"blake3": 32, "xxh3_128": 16}


def check_algo(algo: str) -> str:
    if algo not in _DIGEST_SIZES:
        raise InventoryError(f"unknown hash algorithm {algo!r}", hint=f"use one of {', '.join(ALGOS)}")
    return algo


def digest_size(algo: str) -> int:
    return _DIGEST_SIZES[check_algo(algo)]


def new_hasher(algo: str = DEFAULT_ALGO, *, threads: int = 1):
    """A fresh incremental hasher with update()/digest(); threads>1 only matters for blake3."""
    check_algo(algo)
    if algo == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads != 1 else 1)
    return xxhash.xxh3_128()


def hash_bytes(data: bytes | memoryview, algo: str = DEFAULT_ALGO) -> bytes:
    h = new_hasher(algo)
    h.update(data)
    return h.digest()


def hash_file(path: str | os.PathLike, algo: str = DEFAULT_ALGO, *, block_size: int = BLOCK_SIZE,
              threads: int | None = None) -> bytes:
    """Hash one file without following a symlink that may have replaced it since the scan.

    Big files are mmapped and, for blake3, hashed by all cores (``threads=None``); others
    are streamed in ``block_size`` blocks into one reused buffer.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size >= _MMAP_THRESHOLD:
            h = new_hasher(algo, threads=1 if threads == 1 else 0)
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                mm.madvise(mmap.MADV_SEQUENTIAL)
                h.update(mm)
            return h.digest()
        h = new_hasher(algo)
        buf = bytearray(min(block_size, max(size, 1) + 1))
        view = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            h.update(view[:n])
        return h.digest()
    finally:
        os.close(fd)


def hash_files(root: str | os.PathLike, relpaths: Sequence[str], algo: str = DEFAULT_ALGO, *,
               threads: int | None = None) -> list[bytes | OSError]:
    """Hash many files under ``root`` in a thread pool; results in input order.

    A file that cannot be read yields its OSError instead of a digest, so the caller can
    record it as a scan error rather than lose the whole inventory.
    """
    check_algo(algo)
    base = os.fspath(root)

    def one(rel: str) -> bytes | OSError:
        try:
            return hash_file(os.path.join(base, rel), algo)
        except OSError as exc:
            return exc

    if threads is None:
        threads = min(8, os.cpu_count() or 1)
    if threads <= 1 or len(relpaths) < 2 * _BATCH:
        return [one(r) for r in relpaths]
    # Futures cost tens of microseconds each, as much as hashing a small file, so the
    # pool gets batches; threads pay off through blake3 and read() releasing the GIL.
    batches = [relpaths[i:i + _BATCH] for i in range(0, len(relpaths), _BATCH)]
    # imported here: concurrent.futures pulls in logging, 15 ms of every rank's start
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chiba-hash") as pool:
        out: list[bytes | OSError] = []
        for part in pool.map(lambda batch: [one(r) for r in batch], batches):
            out.extend(part)
        return out
