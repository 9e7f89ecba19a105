"""Compressed tar streams: pack a tree, unpack one safely from chunks, hash, temp-dir hygiene."""

# Imported by the rank programs: keep it to the standard library plus zstandard/blake3.
from __future__ import annotations

import errno
import fcntl
import gzip
import os
import queue
import re
import shutil
import tarfile
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable

__all__ = ["COMPRESSIONS", "PackInfo", "new_hasher", "pack_tree", "ChunkWriter",
           "Extractor", "strict_filter", "temp_names", "lock_dir", "clean_stale",
           "remove_tree"]

COMPRESSIONS = ("zstd", "gzip", "none")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.chiba-(?P<kind>stage|collect)-(?P<job>[A-Za-z0-9_-]+)"
                      r"(?P<old>\.old)?$")


def new_hasher(alg: str = "blake3"):
    """A hash object with update()/hexdigest(): blake3, or xxh3_128 when asked or missing."""
    if alg == "blake3":
        try:
            import blake3

            return blake3.blake3()
        except ImportError:  # fall through to xxh3 so a node without blake3 still works
            alg = "xxh3_128"
    if alg == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    raise ValueError(f"unknown hash algorithm {alg!r}")


@dataclass
class PackInfo:
    """What packing produced: archive bytes and hash, tree bytes and member count."""

    bytes: int
    hash: str
    hash_alg: str
    payload_bytes: int
    files: int
    compress: str


class _CountingWriter:
    """Write-through wrapper that counts and hashes every byte it passes on."""

    def __init__(self, out: BinaryIO, hasher):
        self.out, self.hasher, self.count = out, hasher, 0

    def write(self, data) -> int:
        n = len(data)
        if n:
            self.hasher.update(data)
            self.out.write(data)
            self.count += n
        return n

    def flush(self) -> None:
        if hasattr(self.out, "flush"):
            self.out.flush()

    def close(self) -> None:  # the caller owns ``out``
        pass


def pack_tree(src: str, out: BinaryIO, compress: str = "zstd", *, level: int | None = None,
              hash_alg: str = "blake3", arcname: str | None = None) -> PackInfo:
    """Stream ``src``'s contents as a tar into ``out`` (``src`` itself when ``arcname``)."""
    if compress not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compress!r}")
    counter = _CountingWriter(out, new_hasher(hash_alg))
    stats = {"bytes": 0, "files": 0}

    def count(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        stats["files"] += 1
        if ti.isreg():
            stats["bytes"] += ti.size
        return ti

    if compress == "zstd":
        import zstandard

        comp = zstandard.ZstdCompressor(level=level or 3, write_checksum=True).stream_writer(
            counter, closefd=False)
    elif compress == "gzip":
        comp = gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=level or 6, mtime=0)
    else:
        comp = counter
    # PAX keeps long names, newlines and non-ASCII names intact; stream mode never seeks.
    with tarfile.open(fileobj=comp, mode="w|", format=tarfile.PAX_FORMAT,
                      bufsize=1 << 20) as tar:
        if arcname is not None:
            tar.add(src, arcname=arcname, recursive=True, filter=count)
        else:
            for entry in sorted(os.listdir(src)):
                tar.add(os.path.join(src, entry), arcname=entry, recursive=True,
                        filter=count)
    if comp is not counter:
        comp.close()
    counter.flush()
    return PackInfo(counter.count, counter.hasher.hexdigest(), hash_alg, stats["bytes"],
                    stats["files"], compress)


class ChunkWriter:
    """A file-like sink that cuts what is written into ``chunk``-byte pieces for ``put``."""

    def __init__(self, put: Callable[[bytes], None], chunk: int):
        self._put, self._chunk = put, chunk
        self._buf = bytearray()

    def write(self, data) -> int:
        self._buf += data
        while len(self._buf) >= self._chunk:
            self._put(bytes(self._buf[:self._chunk]))
            del self._buf[:self._chunk]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._buf:
            self._put(bytes(self._buf))
            self._buf.clear()


class AbsoluteMemberError(tarfile.FilterError):
    """An archive member named by an absolute path (the data filter would only strip it)."""

    def __init__(self, member: tarfile.TarInfo):
        super().__init__(f"{member.name!r} is an absolute path")
        self.tarinfo = member


def strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The ``data`` extraction filter, but an absolute member name is refused, not rewritten."""
    if member.name.startswith(("/", os.sep)):
        raise AbsoluteMemberError(member)
    return tarfile.data_filter(member, dest)


class _QueueReader:
    """Read side of the chunk queue: a blocking byte stream that hashes what passes."""

    def __init__(self, q: "queue.Queue[bytes | None]", hash_alg: str):
        self._q = q
        self._cur = memoryview(b"")
        self.eof = False
        self.hasher = new_hasher(hash_alg)
        self.count = 0

    def _next(self) -> bool:
        if self.eof:
            return False
        data = self._q.get()
        if data is None:
            self.eof = True
            return False
        self.hasher.update(data)
        self.count += len(data)
        self._cur = memoryview(data)
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [bytes(self._cur)]
            while self._next():
                parts.append(bytes(self._cur))
            self._cur = memoryview(b"")
            return b"".join(parts)
        while not len(self._cur):
            if not self._next():
                return b""
        out, self._cur = bytes(self._cur[:n]), self._cur[n:]
        return out

    def drain(self) -> None:
        self._cur = memoryview(b"")
        while self._next():
            pass


class Extractor:
    """Unpack a compressed tar fed chunk by chunk into ``dest`` on a thread.

    ``feed`` blocks (calling ``idle`` meanwhile) when ``depth`` chunks are queued, so memory
    stays bounded; ``finish`` returns (bytes, hash) of everything fed, or raises the
    extraction error. After an error the thread keeps draining, so feeding never hangs.
    """

    def __init__(self, dest: str, compress: str, *, hash_alg: str = "blake3", depth: int = 4):
        self.dest, self.compress = dest, compress
        self._q: "queue.Queue[bytes | None]" = queue.Queue(maxsize=depth)
        self._reader = _QueueReader(self._q, hash_alg)
        self.error: BaseException | None = None
        self.members = 0
        self._thread = threading.Thread(target=self._run, name="extract", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            src = self._reader
            mode = "r|gz" if self.compress == "gzip" else "r|"
            if self.compress == "zstd":
                import zstandard

                src = zstandard.ZstdDecompressor().stream_reader(self._reader,
                                                                 read_size=1 << 20,
                                                                 closefd=False)

            def counted(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
                self.members += 1
                return strict_filter(member, dest)

            with tarfile.open(fileobj=src, mode=mode, bufsize=1 << 20) as tar:
                tar.extractall(self.dest, filter=counted)
        except BaseException as e:  # noqa: BLE001 - reported by finish() to every rank
            self.error = e
        finally:
            self._reader.drain()

    def feed(self, data: bytes, idle: Callable[[], None] | None = None) -> None:
        while True:
            try:
                self._q.put(data, timeout=0.001)
                return
            except queue.Full:
                if idle is not None:
                    idle()

    def finish(self, idle: Callable[[], None] | None = None) -> tuple[int, str]:
        self.feed(None, idle)  # type: ignore[arg-type]
        while self._thread.is_alive():
            self._thread.join(0.001)
            if idle is not None:
                idle()
        if self.error is not None:
            raise self.error
        return self._reader.count, self._reader.hasher.hexdigest()

    @property
    def received(self) -> int:
        return self._reader.count


def temp_names(dest: str, kind: str, jobid: str) -> tuple[str, str]:
    """(temporary dir, old-aside dir) beside ``dest`` for job ``jobid``."""
    parent, name = os.path.split(os.path.normpath(dest))
    tmp = os.path.join(parent, f".{name}.chiba-{kind}-{jobid}")
    return tmp, tmp + ".old"


def lock_dir(path: str) -> int:
    """Hold an exclusive flock on directory ``path``; the kernel drops it when we die."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_tree(path: str) -> None:
    """Remove a file or tree, tolerating it being absent or changing underfoot."""
    for _ in range(3):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise


def clean_stale(parent: str) -> list[str]:
    """Remove temporary dirs of dead jobs in ``parent``; a dead job's old copy goes back."""
    done = []
    try:
        names = os.listdir(parent)
    except OSError:
        return done
    for n in names:
        m = _TEMP_RE.match(n)
        if not m:
            continue
        path = os.path.join(parent, n)
        try:
            fd = lock_dir(path)
        except BlockingIOError:
            continue  # a live job owns it
        except OSError:
            continue
        try:
            dest = os.path.join(parent, m.group("name"))
            if m.group("old") and not os.path.lexists(dest):
                # died between moving the old copy aside and moving the new one in
                os.rename(path, dest)
            else:
                remove_tree(path)
            done.append(path)
        finally:
            os.close(fd)
    return done
