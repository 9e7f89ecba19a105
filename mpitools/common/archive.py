"""Compressed tar streams: pack a tree, unpack one safely from verified chunks, temp-dir hygiene.

Packing writes PAX with :mod:`tarfile`. Unpacking relies on no library's extraction
(:mod:`tarfile`'s filters depend on the Python version: the CVE-2025-4517 symlink-chain
escape is fixed only in 3.11.13+; libarchive's secure-extraction flags work on paths
relative to the process's working directory): libarchive only parses the stream and writes
a file's data into a descriptor given to it (mpitools/common/tarread.py), and
:class:`SafeUnpacker` creates every entry itself, relative to directory file descriptors
opened with ``O_NOFOLLOW`` below the temporary directory, so no member can be written
through a symlink or outside it, whatever the archive says (docs/design.md, "Safety").
"""

# Imported by the rank programs: the standard library plus zstandard, blake3 and the
# libarchive C library (loaded when the first archive is read).
from __future__ import annotations

import errno
import fcntl
import os
import queue
import re
import stat
import threading
from collections.abc import Callable

from inventory.beneath import BeneathError, open_dir_beneath, remove_entry
from inventory.beneath import shown_name as _shown

from mpitools.common.runtime import queue_put
from mpitools.common.tarread import (MTIME_XATTR, SOCKET_XATTR, Member, Record, TarReader,
                                     TarReadError, exact_mtime)

TYPE_CHECKING = False  # typing itself is not imported by ranks (rank start-up, as Record)
if TYPE_CHECKING:
    import tarfile
    from typing import BinaryIO

__all__ = ["COMPRESSIONS", "BLOCK", "BATCH", "sums_size", "PackInfo", "new_hasher", "block_sums", "BlockHasher",
           "BlockVerifier", "VerifyError", "pack_tree", "ChunkWriter", "RefusedMember",
           "SafeUnpacker", "Extractor", "temp_name", "make_locked_temp", "clean_stale",
           "remove_entry", "TEMP_RE", "TarReadError"]

COMPRESSIONS = ("zstd", "gzip", "none")
# Archive bytes are verified in blocks of this size against blake3 digests taken while
# packing: 32 bytes of digest per 64 KiB (0.05 %), and a node holds at most one block
# back from its extractor while it waits for the block to complete.
BLOCK = 64 << 10
# The extractor's thread is handed the stream in batches of this size, not frame by frame:
# every handover wakes a thread (tens of microseconds each on a shared virtual machine),
# and a 64 KiB frame at a time cost a node 0.1 ms per frame (docs/design.md, "Per-node CPU")
BATCH = 1 << 20
_DIGEST = 32
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.chiba-(?P<kind>stage|collect)-(?P<job>[0-9a-f]{12})"
                     r"(?P<old>\.old)?$")
# PAX records libarchive hands on as the entry's xattrs (mpitools/common/tarread.py): a FIFO
# that was a socket (tar has no type for one; rsync -a recreates them), an exact negative
# fractional mtime
SOCKET_ATTR = "SCHILY.xattr." + SOCKET_XATTR
MTIME_ATTR = "SCHILY.xattr." + MTIME_XATTR
# (uid_t)-1: chown's "leave it as it is"
_NO_ID = 2**32 - 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


def _blake3(data=b""):
    import blake3  # block digests must be cryptographic: no xxh3 fallback here

    return blake3.blake3(data)


def block_sums(data: bytes, block: int = BLOCK) -> bytes:
    """The concatenated 32-byte blake3 digests of ``data`` cut into ``block``-byte pieces."""
    h = BlockHasher(block)
    h.update(data)
    return h.finish()


def sums_size(size: int, block: int = BLOCK) -> int:
    """Bytes of the digest table of a ``size``-byte archive (32 per started ``block``)."""
    return -(-size // block) * _DIGEST


class BlockHasher:
    """Digests of consecutive ``block``-byte pieces of a stream (the last one may be short)."""

    def __init__(self, block: int = BLOCK):
        self.block = block
        self._h = _blake3()
        self._fill = 0
        self._digests = bytearray()

    def update(self, data) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), self.block - self._fill)
            self._h.update(mv[:take])
            self._fill += take
            mv = mv[take:]
            if self._fill == self.block:
                self._digests += self._h.digest()
                self._h, self._fill = _blake3(), 0

    def finish(self) -> bytes:
        """All digests (32 bytes each), the partial last block included."""
        if self._fill:
            self._digests += self._h.digest()
            self._h, self._fill = _blake3(), 0
        return bytes(self._digests)


class VerifyError(Exception):
    """Archive bytes that differ from what was packed (a swapped or altered spool file)."""


class BlockVerifier:
    """Pass on only bytes whose ``block``-sized piece matches its digest from packing.

    ``push`` returns the verified bytes now available (whole blocks; the bytes of an
    incomplete block are held back): a view of ``data`` when no earlier bytes are held back,
    so ``data`` must not change while the result is used. ``finish`` returns the verified
    last block. Both raise
    VerifyError at the first block that differs, or when the stream is longer or shorter
    than what was packed.
    """

    def __init__(self, sums: bytes, block: int = BLOCK):
        if len(sums) % _DIGEST:
            raise ValueError("block digests must be 32 bytes each")
        self.sums, self.block = sums, block
        self._k = 0
        self._buf = bytearray()

    def _check(self, blk) -> None:
        k = self._k
        if (k + 1) * _DIGEST > len(self.sums):
            raise VerifyError("archive is longer than the packed one (spool file changed?)")
        if _blake3(blk).digest() != self.sums[k * _DIGEST:(k + 1) * _DIGEST]:
            raise VerifyError(f"archive block {k} differs from the packed one "
                              "(spool file changed?); nothing of it was unpacked")
        self._k += 1

    def push(self, data) -> bytes | memoryview:
        mv = memoryview(data).cast("B")
        held = b""  # the block completed from bytes held back by an earlier push
        if self._buf:
            need = self.block - len(self._buf)
            self._buf += mv[:need]
            mv = mv[need:]
            if len(self._buf) < self.block:
                return b""
            self._check(self._buf)
            held, self._buf = bytes(self._buf), bytearray()
        whole = len(mv) - len(mv) % self.block
        for off in range(0, whole, self.block):
            self._check(mv[off:off + self.block])
        self._buf += mv[whole:]  # copied: the caller may reuse ``data``
        # without held bytes (the extractor's block-aligned batches) a view, not a copy
        return held + mv[:whole] if held else mv[:whole]

    def finish(self) -> bytes:
        rest = bytes(self._buf)
        self._buf = bytearray()
        if rest:
            self._check(rest)
        if self._k * _DIGEST != len(self.sums):
            raise VerifyError("archive is shorter than the packed one (spool file changed?)")
        return rest


class PackInfo(Record):
    """What packing produced: archive ``bytes`` and ``hash`` (hex, by ``hash_alg``), tree
    bytes (``payload_bytes``) and member count (``files``), ``compress``, and the digests
    of every ``block`` bytes of the archive (``blocks``, 32 bytes each)."""

    __slots__ = ("bytes", "hash", "hash_alg", "payload_bytes", "files", "compress", "blocks",
                 "block")

    def __init__(self, bytes: int, hash: str, hash_alg: str, payload_bytes: int, files: int,
                 compress: str, blocks: bytes = b"", block: int = BLOCK):
        self.bytes, self.hash, self.hash_alg = bytes, hash, hash_alg
        self.payload_bytes, self.files, self.compress = payload_bytes, files, compress
        self.blocks, self.block = blocks, block


class _CountingWriter:
    """Write-through wrapper that counts and hashes (whole and per block) what it passes on."""

    def __init__(self, out: BinaryIO, hasher, block: int):
        self.out, self.hasher, self.count = out, hasher, 0
        self.blocks = BlockHasher(block)

    def write(self, data) -> int:
        n = len(data)
        if n:
            self.hasher.update(data)
            self.blocks.update(data)
            self.out.write(data)
            self.count += n
        return n

    def flush(self) -> None:
        if hasattr(self.out, "flush"):
            self.out.flush()

    def close(self) -> None:  # the caller owns ``out``
        pass


class _TarSink:
    """What tarfile writes into in its random-access mode (``w:``): appends to a buffer
    handed on in ``size``-byte writes, and the position tarfile asks for.

    tarfile's stream mode (``w|``) re-copied its 1 MiB buffer on every 512-byte header
    it added: packing the CPython standard library took 4.4 s of user CPU there.
    """

    def __init__(self, out, size: int = 1 << 20):
        self._out, self._size = out, size
        self._buf = bytearray()
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        n = len(data)
        self._pos += n
        if not self._buf and n >= self._size:
            self._out.write(data)
            return n
        self._buf += data
        if len(self._buf) >= self._size:
            self.flush()
        return n

    def flush(self) -> None:
        if self._buf:
            self._out.write(self._buf)
            self._buf = bytearray()


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


class _Packer:
    """Walk a tree with directory fds into a tar: nothing below the top is followed.

    Root reads users' trees: a directory swapped for a symlink while it is packed
    (``sub -> /etc``) must not make it read ``/etc``. Every entry is opened relative to its
    parent's fd with ``O_NOFOLLOW``; regular files and directories take their metadata from
    the opened fd, so what is recorded is what is read.
    """

    def __init__(self, tar: tarfile.TarFile, on_payload: Callable[[int], None] | None = None):
        self.tar = tar
        self.files = self.bytes = 0
        self._links: dict[tuple[int, int], str] = {}
        self._on_payload = on_payload

    def _info(self, st: os.stat_result, arcname: str, where: str) -> tarfile.TarInfo:
        import tarfile  # packing only: ranks that only unpack never load it (PackInfo)

        ti = tarfile.TarInfo(arcname)
        ti.mode, ti.uid, ti.gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
        ti.mtime = st.st_mtime
        # exact: a float loses the nanoseconds rsync keeps
        ti.pax_headers = {"mtime": exact_mtime(st.st_mtime_ns)}
        if st.st_mtime_ns < 0 and st.st_mtime_ns % 10**9:
            ti.pax_headers[MTIME_ATTR] = ti.pax_headers["mtime"]
        m = st.st_mode
        if stat.S_ISREG(m):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._links:
                ti.type, ti.linkname = tarfile.LNKTYPE, self._links[key]
            else:
                ti.size = st.st_size
                if st.st_nlink > 1:
                    self._links[key] = arcname
        elif stat.S_ISDIR(m):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISFIFO(m):
            ti.type = tarfile.FIFOTYPE
        elif stat.S_ISSOCK(m):
            ti.type = tarfile.FIFOTYPE
            ti.pax_headers[SOCKET_ATTR] = "1"
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            raise OSError(errno.EPERM, "device nodes are never copied", where)
        elif not stat.S_ISLNK(m):
            raise OSError(errno.EOPNOTSUPP, "file type tar cannot carry", where)
        return ti

    def add_at(self, dir_fd: int | None, name: str, arcname: str, where: str) -> None:
        """Add ``name`` in ``dir_fd`` (a path when ``dir_fd`` is None) and its tree."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            import tarfile  # see _info

            ti = self._info(st, arcname, where)
            ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
            self._emit(ti)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            flags = _READ_FLAGS | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0)
            fd = os.open(name, flags, dir_fd=dir_fd)
            try:
                fst = os.fstat(fd)
                if stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode):
                    raise OSError(errno.EAGAIN, "changed while it was packed", where)
                self.add_fd(fd, fst, arcname, where)
            finally:
                os.close(fd)
        else:
            self._emit(self._info(st, arcname, where))

    def add_fd(self, fd: int, st: os.stat_result, arcname: str, where: str) -> None:
        ti = self._info(st, arcname, where)
        if ti.isreg():
            self.bytes += ti.size
            with os.fdopen(os.dup(fd), "rb") as f:
                try:
                    self._emit(ti, f)
                except OSError as e:
                    if e.errno is not None:
                        raise
                    # tarfile's "unexpected end of data": fewer bytes than fstat said
                    raise OSError(errno.EAGAIN, "shrank while it was packed (still being "
                                  "written? collect it again once it is complete)",
                                  where) from None
            return
        self._emit(ti)
        if ti.isdir():
            for entry in sorted(os.listdir(fd)):
                self.add_at(fd, entry, entry if arcname == "." else f"{arcname}/{entry}",
                            os.path.join(where, entry))

    def _emit(self, ti: tarfile.TarInfo, f=None) -> None:
        self.files += 1
        self.tar.addfile(ti, f)
        if self._on_payload is not None and ti.isreg():
            self._on_payload(ti.size)


def pack_tree(src: str, out: BinaryIO, compress: str = "zstd", *, level: int | None = None,
              hash_alg: str = "blake3", arcname: str | None = None, dir_fd: int | None = None,
              block: int = BLOCK, on_payload: Callable[[int], None] | None = None,
              checksum: bool = True) -> PackInfo:
    """Stream ``src`` as a tar into ``out``; returns its PackInfo (sizes, hash, block digests).

    Without ``arcname`` the directory ``src`` is packed as ``.`` (its own mode, owner and
    mtime travel too, as ``rsync -a src/ dest`` keeps them; ``src`` itself may be a symlink
    to it) followed by its contents; with ``arcname`` the entry ``src`` (a file, symlink or
    tree; relative to ``dir_fd`` when given) is packed under that name, not followed.
    ``on_payload(n)`` is told each regular file's size (bytes) once it is packed, for a
    progress bar whose total is known from the scan. Nothing below is followed (see
    :class:`_Packer`). Symlinks are stored as they are,
    FIFOs as FIFOs, sockets as FIFOs marked by a PAX attribute, mtimes exactly. Raises
    OSError for a device node (refused before anything is sent by every method).
    ``checksum=False`` leaves zstd's content checksum (XXH64 of the whole tar) out of the
    frame: only for a stream whose every block is verified against the digests returned
    here before it is decompressed (the stage spool), where it would check the same bytes
    a second time.
    """
    if compress not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compress!r}")
    import tarfile  # here, not at the top: see _Packer._info

    counter = _CountingWriter(out, new_hasher(hash_alg), block)
    if compress == "zstd":
        import zstandard

        comp = zstandard.ZstdCompressor(level=level or 3, write_checksum=checksum).stream_writer(
            counter, closefd=False)
    elif compress == "gzip":
        import gzip

        comp = gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=level or 6, mtime=0)
    else:
        comp = counter
    # PAX keeps long names, newlines and non-ASCII names intact; "w:" on a sink that only
    # appends never seeks either.
    sink = _TarSink(comp)
    with tarfile.open(fileobj=sink, mode="w:", format=tarfile.PAX_FORMAT,
                      copybufsize=1 << 20) as tar:
        packer = _Packer(tar, on_payload)
        if arcname is None:
            fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                packer.add_fd(fd, os.fstat(fd), ".", src)
            finally:
                os.close(fd)
            packer.files -= 1  # "." is the destination itself, not a member of it
        else:
            packer.add_at(dir_fd, src, arcname, src)
    sink.flush()
    if comp is not counter:
        comp.close()
    counter.flush()
    return PackInfo(counter.count, counter.hasher.hexdigest(), hash_alg, packer.bytes,
                    packer.files, compress, counter.blocks.finish(), block)


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


class RefusedMember(Exception):
    """An archive member that would reach outside the destination or is never created."""

    def __init__(self, member: Member | None, why: str):
        name = member.name if member is not None else "?"
        super().__init__(f"{_shown(name)}: {why}")
        self.member = member


def _member_parts(m: Member, name: str | None = None) -> tuple[str, ...]:
    """The components of a member name; refuses absolute names, ``..``, NUL and empty."""
    name = m.name if name is None else name
    if not name or "\0" in name:
        raise RefusedMember(m, "empty name or NUL byte")
    if name.startswith("/"):
        raise RefusedMember(m, "is an absolute path")
    parts = name.split("/")
    if "" in parts or "." in parts:  # "a//b", "./a", "a/": rare, so filtered only then
        parts = [p for p in parts if p not in ("", ".")]
    parts = tuple(parts)
    if ".." in parts:
        raise RefusedMember(m, "has a '..' component")
    return parts


class _Dir:
    """A directory made below the root: its subdirectories by name, and the member that
    listed it (None: a parent made for a member inside it)."""

    __slots__ = ("kids", "member")

    def __init__(self):
        self.kids: dict[str, _Dir] = {}
        self.member: Member | None = None


class SafeUnpacker:
    """Create a tar's members below the directory ``root_fd``, safely by construction.

    Every parent is opened from ``root_fd`` one component at a time with ``O_NOFOLLOW |
    O_DIRECTORY`` (:func:`inventory.beneath.open_dir_beneath`); regular files are created
    ``O_CREAT | O_EXCL | O_NOFOLLOW``; directories are made ``0700`` and get their real mode,
    owner and mtime last (deepest first); symlinks (targets kept verbatim, absolute ones
    included) and hard links are made only after every other member, hard links only to
    members already extracted here; device nodes, absolute names and ``..`` are refused
    (RefusedMember), so are owner or group ids no file can have and a link name queued
    twice. As root, owners and groups are set from the numeric ids; otherwise
    setuid/setgid bits are dropped, so ownership is never widened.
    """

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.as_root = os.geteuid() == 0
        # what this process creates is its own, and a chown to its own ids is skipped, unless
        # the root is setgid or of another group: then new entries take the root's group
        st = os.fstat(root_fd)
        own = not st.st_mode & stat.S_ISGID and st.st_gid == os.getegid()
        self._ids = (os.geteuid(), os.getegid()) if own else None
        self.members = 0
        # every directory made here, as a tree: a deep name costs its depth, not its square
        self._root = _Dir()
        self._nondirs: set[tuple[str, ...]] = set()
        self._later: list[tuple[Member, tuple[str, ...]]] = []
        self._queued: set[tuple[str, ...]] = set()  # the names in _later
        self._cached: tuple[tuple[str, ...], int, _Dir] | None = None

    # -- walking ---------------------------------------------------------------------------
    def _parent(self, m: Member, parts: tuple[str, ...]) -> int:
        """The fd of ``parts``' parent (cached for the next member; do not close it)."""
        key = parts[:-1]
        if self._cached is None or self._cached[0] != key:
            fd, node = self._walk(m, key, create=True)
            self._drop_cache()
            self._cached = (key, fd, node)
        return self._cached[1]

    def _walk(self, m: Member, key: tuple[str, ...], *, create: bool) -> tuple[int, _Dir]:
        """A new fd of directory ``key`` and its node, its missing components made when
        ``create`` (RefusedMember when one is not a directory, or is missing)."""
        fd, node = os.dup(self.root_fd), self._root
        try:
            for i, part in enumerate(key):
                try:
                    nfd = open_dir_beneath(fd, part)
                except BeneathError as e:
                    if e.errno != errno.ENOENT or not create:
                        raise RefusedMember(m, f"parent {_shown('/'.join(key[:i + 1]))} "
                                                f"{e.what}") from None
                    os.mkdir(part, 0o700, dir_fd=fd)  # as tar does for a missing parent
                    nfd = open_dir_beneath(fd, part)
                os.close(fd)
                fd = nfd
                node = node.kids.get(part) or node.kids.setdefault(part, _Dir())
        except BaseException:
            os.close(fd)
            raise
        return fd, node

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    # -- metadata --------------------------------------------------------------------------
    def _mode(self, m: Member) -> int:
        return m.mode if self.as_root else m.mode & ~(stat.S_ISUID | stat.S_ISGID)

    def _chown(self, m: Member) -> bool:
        # a chown to the ids a new entry already has is skipped (one syscall per file)
        return self.as_root and (m.uid, m.gid) != self._ids

    def _meta_fd(self, fd: int, m: Member) -> None:
        if self._chown(m):
            os.fchown(fd, m.uid, m.gid)  # before chmod: chown clears setuid/setgid
        os.fchmod(fd, self._mode(m))
        os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))

    def _meta_at(self, pfd: int, name: str, m: Member, *, link: bool) -> None:
        if self._chown(m):
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if not link:
            # a node created a moment ago in a 0700 directory only this process writes to
            os.chmod(name, self._mode(m), dir_fd=pfd)
        os.utime(name, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    # -- members ---------------------------------------------------------------------------
    def add(self, m: Member, write_data: Callable[[int], None]) -> None:
        """Create member ``m`` (a file's data written by ``write_data(fd)``), or queue it
        for :meth:`close`."""
        self.members += 1
        if m.bad:
            raise RefusedMember(m, m.bad)
        if not (0 <= m.uid < _NO_ID and 0 <= m.gid < _NO_ID):
            # no file has such an owner; -1 would leave the file root's, setuid kept
            raise RefusedMember(m, f"has an owner or group id out of range ({m.uid}:{m.gid})")
        parts = _member_parts(m)
        kind = m.kind
        if kind == "dir":
            self._dir(m, parts)
        elif not parts:
            raise RefusedMember(m, "a non-directory as the destination itself")
        elif kind in ("symlink", "hardlink"):
            # refused now, not at close(): a million copies of one link header are 47 KB
            # of zstd and held 300 MB here until then
            if parts in self._queued:
                raise RefusedMember(m, "appears twice")
            self._queued.add(parts)
            self._later.append((m, parts))
        elif kind == "file":
            self._file(m, parts, write_data)
        elif kind in ("fifo", "socket"):
            pfd = self._parent(m, parts)
            if kind == "socket":
                os.mknod(parts[-1], stat.S_IFSOCK | 0o600, dir_fd=pfd)
            else:
                os.mkfifo(parts[-1], 0o600, dir_fd=pfd)
            self._meta_at(pfd, parts[-1], m, link=False)
            self._nondirs.add(parts)
        elif kind in ("chr", "blk"):
            raise RefusedMember(m, "is a device node (never created)")
        else:
            raise RefusedMember(m, "has an unsupported type")

    def _dir(self, m: Member, parts: tuple[str, ...]) -> None:
        node = self._root
        if parts:
            pfd = self._parent(m, parts)
            parent = self._cached[2]
            node = parent.kids.get(parts[-1])
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=pfd)
            except FileExistsError:
                if node is None:  # only a directory made here for an earlier member
                    raise RefusedMember(m, "already exists") from None
            else:
                node = parent.kids[parts[-1]] = _Dir()
        if node.member is not None:
            raise RefusedMember(m, "appears twice")
        node.member = m

    def _file(self, m: Member, parts: tuple[str, ...],
              write_data: Callable[[int], None]) -> None:
        pfd = self._parent(m, parts)
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        except FileExistsError:
            raise RefusedMember(m, "already exists") from None
        try:
            write_data(fd)
            self._meta_fd(fd, m)
        finally:
            os.close(fd)
        self._nondirs.add(parts)

    def close(self) -> None:
        """Hard links, then symlinks, then every directory's metadata (deepest first)."""
        try:
            for m, parts in [x for x in self._later if x[0].kind == "hardlink"]:
                self._hardlink(m, parts)
            for m, parts in [x for x in self._later if x[0].kind == "symlink"]:
                pfd = self._parent(m, parts)
                try:
                    os.symlink(m.linkname, parts[-1], dir_fd=pfd)
                except FileExistsError:
                    raise RefusedMember(m, "already exists") from None
                self._meta_at(pfd, parts[-1], m, link=True)
                self._nondirs.add(parts)
            self._drop_cache()
            self._dir_metadata()
        finally:
            self._drop_cache()

    def _dir_metadata(self) -> None:
        """Every directory's mode, owner and mtime, each after those below it: one walk of
        the tree with one descriptor, down by name and up by ``..`` (opened before the
        directory's own mode is set), each ``O_NOFOLLOW | O_DIRECTORY``. Nothing else can
        move these directories: they are below ``root_fd``, which only this process
        enters until its own metadata is set, last."""
        fd = os.dup(self.root_fd)
        stack = [(self._root, iter(list(self._root.kids.items())))]
        try:
            while stack:
                node, kids = stack[-1]
                name, kid = next(kids, (None, None))
                if kid is not None:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                    stack.append((kid, iter(list(kid.kids.items()))))
                    continue
                stack.pop()
                up = os.open("..", _DIR_FLAGS, dir_fd=fd) if stack else -1
                try:
                    if node.member is not None:
                        self._meta_fd(fd, node.member)
                    elif stack:
                        os.fchmod(fd, 0o755)  # a parent the archive did not list
                finally:
                    os.close(fd)
                    fd = up
        finally:
            if fd >= 0:
                os.close(fd)

    def _hardlink(self, m: Member, parts: tuple[str, ...]) -> None:
        target = _member_parts(m, m.linkname)
        if target not in self._nondirs:
            raise RefusedMember(m, f"hard link to {_shown(m.linkname)}, which is not a file "
                                    "extracted before it")
        tfd = self._walk(m, target[:-1], create=False)[0]
        try:
            pfd = self._parent(m, parts)
            try:
                os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            except FileExistsError:
                raise RefusedMember(m, "already exists") from None
        finally:
            os.close(tfd)
        self._nondirs.add(parts)


def _told(created: bool) -> None:
    """The ``on_member`` follow-up of an unpacking nobody watches."""


def unpack_stream(source, root_fd: int, compress: str,
                  on_member: Callable[[Member], Callable[[bool], None]] | None = None
                  ) -> SafeUnpacker:
    """Parse the tar (compressed with ``compress``) and create it below ``root_fd``.

    ``source``: a binary file object, or a callable returning the stream's next bytes
    (``b""`` at the end). ``on_member(m)`` is asked before each member is created (it may
    raise to refuse it: that error ends the unpacking) and returns what to call after,
    with True once the member is created (symlinks and hard links: once queued, since
    :class:`SafeUnpacker` makes them last; an error making them ends the unpacking), False
    when creating it failed (collect's free-space guard, mpitools/collect/ranks.py).
    Raises RefusedMember, TarReadError, OSError, or whatever the callable or
    ``on_member`` raised (VerifyError).
    """
    if callable(source):
        next_chunk = source
    else:
        def next_chunk() -> bytes:
            return source.read(1 << 20)
    unpacker = SafeUnpacker(root_fd)
    with TarReader(next_chunk, compress) as tar:
        for m in tar:
            done = _told if on_member is None else on_member(m)
            try:
                unpacker.add(m, tar.write_data)
            except BaseException:
                done(False)
                raise
            done(True)
        unpacker.close()
    return unpacker


class _QueueReader:
    """Read side of the chunk queue: hashes what passes and, given block digests, hands on
    only bytes verified against them (:meth:`next_chunk`, a TarReader's source)."""

    def __init__(self, q: "queue.Queue[bytes | None]", hash_alg: str,
                 verifier: BlockVerifier | None):
        self._q = q
        self.eof = False
        self.hasher = new_hasher(hash_alg)
        self.count = 0
        self._verifier = verifier

    def next_chunk(self) -> bytes:
        """The next verified bytes (never empty before the end), ``b""`` at the end.
        Raises VerifyError at the first block that differs."""
        while not self.eof:
            data = self._q.get()
            if data is None:
                self.eof = True
                return self._verifier.finish() if self._verifier is not None else b""
            self.hasher.update(data)
            self.count += len(data)
            if self._verifier is not None:
                data = self._verifier.push(data)
            if data:
                return data
        return b""

    def drain(self) -> None:
        """After an error: swallow the rest unverified (nothing reads it any more)."""
        self._verifier = None
        while self.next_chunk():
            pass


class Extractor:
    """Unpack a compressed tar fed chunk by chunk into directory ``dest`` on a thread.

    ``dest`` is a directory fd (not closed here) or a path. With ``sums`` (block digests
    from packing, :class:`PackInfo`.blocks) the unpacker only ever sees verified bytes: a
    block that differs stops it with VerifyError before any of that block is used.
    ``feed`` copies the bytes given (any bytes-like object, reusable once it returns) into a
    batch of ``batch`` bytes (whole blocks of ``block`` bytes with ``sums``), and queues
    each full batch to the thread without copying it again; it blocks (calling
    ``idle`` meanwhile) when ``depth`` batches are queued, so memory stays bounded.
    ``finish`` returns (bytes, hash) of everything fed, or raises the extraction error
    (RefusedMember, VerifyError, OSError, TarReadError, or what ``on_member`` raised: see
    :func:`unpack_stream`). After an error the thread keeps draining, so feeding never
    hangs.
    """

    def __init__(self, dest: str | int, compress: str, *, hash_alg: str = "blake3",
                 depth: int = 4, sums: bytes | None = None, block: int = BLOCK,
                 batch: int = BATCH,
                 on_member: Callable[[Member], Callable[[bool], None]] | None = None):
        self.compress = compress
        self._on_member = on_member
        # batches are cut at a block boundary when verifying, so the verifier hands each
        # on as a view instead of joining copies of its blocks
        align = block if sums is not None else 1
        self._batch_size = max(align, batch - batch % align)
        self._batch, self._fill = bytearray(self._batch_size), 0
        self._own = isinstance(dest, str)
        self._fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if self._own \
            else dest
        self._q: "queue.Queue[bytes | None]" = queue.Queue(maxsize=depth)
        verifier = BlockVerifier(sums, block) if sums is not None else None
        self._reader = _QueueReader(self._q, hash_alg, verifier)
        self.error: BaseException | None = None
        self.members = 0
        self._thread = threading.Thread(target=self._run, name="extract", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.members = unpack_stream(self._reader.next_chunk, self._fd,
                                         self.compress, self._on_member).members
        except BaseException as e:  # noqa: BLE001 - reported by finish() to every rank
            self.error = e
        finally:
            self._reader.drain()

    def feed(self, data, idle: Callable[[], None] | None = None) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            # one copy per byte: into the batch, which is handed over whole (never touched
            # again here) and replaced by a fresh one
            take = min(len(mv), self._batch_size - self._fill)
            self._batch[self._fill:self._fill + take] = mv[:take]
            self._fill += take
            mv = mv[take:]
            if self._fill == self._batch_size:
                self._hand_over(idle)

    def _hand_over(self, idle: Callable[[], None] | None) -> None:
        batch = memoryview(self._batch)[:self._fill]
        self._batch, self._fill = bytearray(self._batch_size), 0
        queue_put(self._q, batch, idle)

    def finish(self, idle: Callable[[], None] | None = None) -> tuple[int, str]:
        if self._fill:
            self._hand_over(idle)
        queue_put(self._q, None, idle)
        while self._thread.is_alive():
            self._thread.join(0.001)
            if idle is not None:
                idle()
        if self._own:
            os.close(self._fd)
            self._own = False
        if self.error is not None:
            raise self.error
        return self._reader.count, self._reader.hasher.hexdigest()

    @property
    def received(self) -> int:
        return self._reader.count


def temp_name(name: str, kind: str, jobid: str) -> str:
    """The exact name of job ``jobid``'s temporary directory beside destination ``name``."""
    return f".{name}.chiba-{kind}-{jobid}"


def make_locked_temp(parent_fd: int, tname: str) -> int:
    """Create directory ``tname`` (0700) in ``parent_fd`` and hold an exclusive flock on it.

    Returns its fd; the kernel drops the lock when this process dies, which is how
    :func:`clean_stale` tells a dead job's directory from a live one.
    """
    os.mkdir(tname, 0o700, dir_fd=parent_fd)
    fd = os.open(tname, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def clean_stale(parent_fd: int, name: str | None = None) -> list[str]:
    """Remove dead jobs' temporary dirs in ``parent_fd`` (only ``name``'s when given).

    Only exact names (``.NAME.chiba-stage-JOBID``, ``-collect-``, ``.old``) whose flock no
    live process holds are touched; a dead job's old copy goes back in place when the
    destination is missing. Returns the names handled.

    A collect's previous copy moved aside may be a file (collect of a file PATH): such a
    ``.NAME.chiba-collect-JOBID.old`` (a regular file, FIFO or socket, never a symlink) is
    known to be the tool's own by its job's temporary directory beside it, a directory
    this process's user owns, which only the tool makes, whose flock no live process
    holds; without that directory it is a user's file and is left alone. Copies aside are
    handled first, before that directory is removed.
    """
    done = []
    try:
        names = os.listdir(parent_fd)
    except OSError:
        return done
    for n in sorted(names, key=lambda x: not x.endswith(".old")):
        m = TEMP_RE.match(n)
        if not m or (name is not None and m.group("name") != name):
            continue
        try:
            fd = os.open(n, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError:
            fd = None  # not a directory: a collect's copy of a file aside, or a user's
            try:
                st = os.stat(n, dir_fd=parent_fd, follow_symlinks=False)
                if m.group("old") and m.group("kind") == "collect" and (
                        stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)
                        or stat.S_ISSOCK(st.st_mode)):
                    fd = os.open(n[:-len(".old")], _DIR_FLAGS, dir_fd=parent_fd)
                    if os.fstat(fd).st_uid != os.geteuid():
                        os.close(fd)
                        fd = None
            except OSError:
                fd = None
            if fd is None:
                continue  # not the tool's own
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live job owns it
            dest = m.group("name")
            try:
                os.stat(dest, dir_fd=parent_fd, follow_symlinks=False)
                present = True
            except FileNotFoundError:
                present = False
            if m.group("old") and not present:
                # died between moving the old copy aside and moving the new one in
                os.rename(n, dest, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            else:
                remove_entry(parent_fd, n)
            done.append(n)
        finally:
            os.close(fd)
    return done
