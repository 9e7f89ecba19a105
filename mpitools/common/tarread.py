"""Read a tar stream with libarchive: members' metadata and their data written into a fd.

:class:`TarReader` parses; it creates nothing. :class:`mpitools.common.archive.SafeUnpacker`
decides where and how each member is created (below directory fds, never through a
symlink) and hands the reader only a descriptor it opened itself, which libarchive writes a
regular file's data into (``archive_read_data_into_fd``). Parsing in C took one unpack of
the CPython standard library (7,733 files, 251 MB, zstd) from 1.0-1.1 s of CPU with
:mod:`tarfile` to 0.55-0.85 s (docs/design.md, "Per-node CPU").

libarchive (Debian's libarchive13) is loaded with ctypes and only the 23 functions used here
are declared (:func:`_lib`): importing libarchive-c for them cost every rank 20 ms of CPU
(``ctypes.util``, ``logging``, its readers and writers; docs/design.md, "Per-node CPU"),
2% of a node's whole share of a stage. Only its tar format is enabled and none of its
filters (no filter function is even declared): the job's compression
is undone by the zstandard or gzip module, so a stream can never make libarchive pick
another format, and no build of libarchive runs an external decompressor (one built
without libzstd or zlib answers ARCHIVE_WARN to enabling that filter, then runs ``zstd -d``
or ``gzip -d`` from PATH). libarchive is handed the tar at most ``_PIECE`` bytes at a time,
so the read callback can cap the bytes one member's headers take (``_HEADER_LIMIT``):
libarchive holds a GNU sparse map in memory, about 100 bytes per entry, and 17 KB of zstd
(a 200 MB map) took 400 MB while one header was read. Sparse members are refused (the packer
never writes one).

Two facts travel as PAX ``SCHILY.xattr.chiba.*`` records, which libarchive exposes as
extended attributes of the entry (it drops PAX keys it does not know; nothing here ever
sets an xattr on disk): ``chiba.socket`` marks a FIFO that was a Unix socket (tar has no
type for one), and ``chiba.mtime`` carries a negative fractional mtime exactly (libarchive
3.6 reads PAX ``mtime=-1.5`` as -1 s + 0.5 s).
"""

# Rank-side module: standard library, zstandard and the libarchive C library only.
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import stat
import types
from collections.abc import Callable, Iterator

__all__ = ["Member", "Record", "TarReader", "TarReadError", "SOCKET_XATTR", "MTIME_XATTR",
           "exact_mtime"]

SOCKET_XATTR = "chiba.socket"
MTIME_XATTR = "chiba.mtime"
_MTIME_RE = re.compile(r"^(-?)(\d{1,18})(?:\.(\d{1,9}))?$")  # seconds that fit a time_t
_COMPRESSIONS = ("zstd", "gzip", "none")
_PIECE = 1 << 20  # tar bytes handed to libarchive per read callback
# tar bytes one member's headers may take; the packer's take a few KiB (PAX records of a
# path, a link target and an mtime)
_HEADER_LIMIT = 2 << 20
_BLOCK_BYTES = 512  # one tar header
_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk",
          stat.S_IFSOCK: "socket"}


class TarReadError(Exception):
    """The stream is not a tar this reader accepts (libarchive's message), or it ended
    early."""


def exact_mtime(ns: int) -> str:
    """An mtime in nanoseconds as the exact decimal PAX records it (``-1.500000000``)."""
    sign = "-" if ns < 0 else ""
    s, frac = divmod(abs(ns), 10**9)
    return f"{sign}{s}.{frac:09d}" if frac else f"{sign}{s}"


def _parse_mtime(text: str) -> int | None:
    m = _MTIME_RE.match(text)
    if not m:
        return None
    ns = int(m.group(2)) * 10**9 + int((m.group(3) or "").ljust(9, "0"))
    return -ns if m.group(1) else ns


class Record:
    """A plain record: the fields its ``__slots__`` name, compared and shown by them.

    Written out instead of :mod:`dataclasses` because importing that module (it imports
    :mod:`inspect`, :mod:`ast` and :mod:`dis`) cost every rank about 15 ms of CPU at
    start, 1.5% of a node's whole share of a stage (docs/design.md, "Per-node CPU").
    """

    __slots__ = ()

    def __eq__(self, other):
        return type(other) is type(self) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # mutable, as a dataclass is

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Member(Record):
    """One archive member: ``name`` and ``linkname`` as str (undecodable bytes kept through
    :func:`os.fsdecode`), ``kind`` ("file", "dir", "symlink", "hardlink", "fifo",
    "socket", "chr", "blk" or "other"), permission bits ``mode`` (0o7777), numeric
    ``uid``/``gid``, ``mtime_ns`` (nanoseconds), ``size`` (bytes of data, files only),
    ``bad`` (why the reader could not take a chiba.* record, else "")."""

    __slots__ = ("name", "kind", "mode", "uid", "gid", "mtime_ns", "size", "linkname", "bad")

    def __init__(self, name: str, kind: str, mode: int, uid: int, gid: int, mtime_ns: int,
                 size: int = 0, linkname: str = "", bad: str = ""):
        self.name, self.kind, self.mode, self.uid, self.gid = name, kind, mode, uid, gid
        self.mtime_ns, self.size, self.linkname, self.bad = mtime_ns, size, linkname, bad


# libarchive's return codes (archive.h)
ARCHIVE_EOF, ARCHIVE_OK, ARCHIVE_WARN = 1, 0, -20
_SONAME = "libarchive.so.13"  # libarchive 3.x on Linux; else found as libarchive-c does


def _load() -> ctypes.CDLL:
    name = os.environ.get("LIBARCHIVE")  # libarchive-c's variable: a site's own build
    if not name:
        try:
            return ctypes.CDLL(_SONAME)
        except OSError:
            from ctypes.util import find_library

            name = find_library("archive")
    if not name:
        raise OSError(errno.ENOENT, f"libarchive not found ({_SONAME}): install Debian's "
                      "libarchive13, or name the library in LIBARCHIVE")
    try:
        return ctypes.CDLL(name)
    except OSError as e:
        raise OSError(errno.ENOENT, f"libarchive not loaded from {name!r} ({e}): install "
                      "Debian's libarchive13, or name the library in LIBARCHIVE") from None


def _time_t():
    import sysconfig  # 2 ms: only where time_t's width is not the pointer's (32-bit)

    return ctypes.c_int64 if sysconfig.get_config_var("SIZEOF_TIME_T") == 8 else ctypes.c_long


@functools.cache
def _lib() -> types.SimpleNamespace:
    """libarchive's functions used here, as ctypes prototypes (archive.h,
    archive_entry.h), and the read callback's type: loaded on first use, so ranks that
    never unpack do not pay for loading libarchive. Raises OSError when it is missing."""
    lib = _load()
    vp, c_int, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    c_time_t = ctypes.c_int64 if ctypes.sizeof(vp) == 8 else _time_t()  # LP64: 64 bits

    def proto(name, restype, *argtypes):
        # an entry's getters neither block nor call back: called holding the GIL
        # (PYFUNCTYPE), they skip a release and a re-take of it, ten times a member, each a
        # chance for the MPI thread to take it in between (docs/design.md, "Per-node CPU")
        kind = ctypes.PYFUNCTYPE if name.startswith("entry_") else ctypes.CFUNCTYPE
        return kind(restype, *argtypes)(("archive_" + name, lib))

    open_cb = close_cb = ctypes.CFUNCTYPE(c_int, vp, vp)
    read_cb = ctypes.CFUNCTYPE(ctypes.c_ssize_t, vp, vp, ctypes.POINTER(vp))
    ns = types.SimpleNamespace(READ_CALLBACK=read_cb, NO_OPEN_CB=ctypes.cast(None, open_cb),
                               NO_CLOSE_CB=ctypes.cast(None, close_cb))
    for name, restype, *argtypes in (
            ("read_new", vp), ("read_free", c_int, vp), ("entry_new", vp),
            ("entry_free", None, vp), ("read_support_format_tar", c_int, vp),
            ("read_open", c_int, vp, vp, open_cb, read_cb, close_cb),
            ("read_next_header2", c_int, vp, vp),
            ("read_data_into_fd", c_int, vp, c_int), ("read_data_skip", c_int, vp),
            ("error_string", c_char_p, vp), ("errno", c_int, vp),
            ("entry_pathname", c_char_p, vp), ("entry_mode", ctypes.c_uint, vp),
            ("entry_hardlink", c_char_p, vp), ("entry_symlink", c_char_p, vp),
            ("entry_uid", ctypes.c_int64, vp), ("entry_gid", ctypes.c_int64, vp),
            ("entry_mtime", c_time_t, vp), ("entry_mtime_nsec", ctypes.c_long, vp),
            ("entry_size", ctypes.c_int64, vp), ("entry_sparse_count", c_int, vp),
            ("entry_xattr_reset", c_int, vp),
            ("entry_xattr_next", c_int, vp, ctypes.POINTER(c_char_p), ctypes.POINTER(vp),
             ctypes.POINTER(ctypes.c_size_t))):
        try:
            setattr(ns, name, proto(name, restype, *argtypes))
        except AttributeError:  # a LIBARCHIVE library that is not libarchive 3
            raise OSError(errno.ENOENT, f"libarchive {lib._name!r} has no archive_{name}: "
                          "install Debian's libarchive13") from None
    return ns


class _Chunks:
    """``next_chunk()``'s bytes, taken without copying (:meth:`take`) or read as a file by a
    decompressor; ``error`` is what ``next_chunk`` raised (re-raised as itself, not as a
    damaged stream)."""

    def __init__(self, next_chunk: Callable[[], bytes]):
        self._next, self._buf, self._off = next_chunk, b"", 0
        self.error: BaseException | None = None

    def take(self, n: int) -> tuple[bytes | memoryview, int, int]:
        """Up to ``n`` bytes as (buffer, start, end) of the current chunk; start == end at
        the end of the stream."""
        if self._off >= len(self._buf):
            try:
                data = self._next() or b""
            except BaseException as e:
                self.error = e
                raise
            # a view is kept as it is (the extractor's batches: never changed once queued)
            self._buf, self._off = (data if isinstance(data, (bytes, memoryview))
                                    else bytes(data)), 0
        start = self._off
        self._off = min(len(self._buf), start + n)
        return self._buf, start, self._off

    def read(self, n: int = -1) -> bytes | memoryview:
        buf, start, end = self.take(n if n is not None and n >= 0 else 1 << 62)
        return buf if (start, end) == (0, len(buf)) else buf[start:end]


class _BytesReads:
    """``chunks`` read as ``bytes``, for gzip's reader: it concatenates what it reads and
    puts bytes back between members, which a view does not support."""

    def __init__(self, chunks: _Chunks):
        self._chunks = chunks

    def read(self, n: int = -1) -> bytes:
        data = self._chunks.read(n)
        return data if isinstance(data, bytes) else bytes(data)


def _pieces(chunks: _Chunks, compress: str
            ) -> Callable[[], tuple[bytes | bytearray | memoryview, int, int]]:
    """A function returning the tar's next bytes as (buffer, start, end), at most ``_PIECE``
    of them (none at the end), valid until the next call: decompressed into one reused
    buffer (a fresh 1 MiB object per piece cost a page fault per 4 KiB: 190,000 more faults
    unpacking the Python installation's 59,000 files)."""
    if compress == "none":
        return lambda: chunks.take(_PIECE)
    if compress == "zstd":
        import zstandard

        src = zstandard.ZstdDecompressor().stream_reader(
            chunks, read_size=_PIECE, read_across_frames=True, closefd=False)
    else:
        import gzip  # as zstandard above: loaded by the jobs that use it

        src = gzip.GzipFile(fileobj=_BytesReads(chunks), mode="rb")
    buf = bytearray(_PIECE)
    view = memoryview(buf)
    return lambda: (buf, 0, src.readinto(view))


class TarReader:
    """The members of the tar (compressed with ``compress``: zstd, gzip or none) whose bytes
    ``next_chunk()`` returns piece by piece (``b""`` once at the end).

    Iterate for :class:`Member` objects; while a file member is current,
    :meth:`write_data` writes its data into a descriptor. An exception raised by
    ``next_chunk`` (a block that fails verification) is re-raised as itself. Other errors:
    TarReadError (not a tar, a damaged header or compressed stream, a truncated stream, a
    member whose headers take more than ``_HEADER_LIMIT`` bytes), OSError (writing the
    data). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, next_chunk: Callable[[], bytes], compress: str):
        if compress not in _COMPRESSIONS:
            raise ValueError(f"unknown compression {compress!r}")
        self._lib = lib = _lib()
        self._compress = compress
        self._chunks = _Chunks(next_chunk)
        self._next_piece = _pieces(self._chunks, compress)
        self._handed = 0  # tar bytes handed to libarchive
        self._ended = False  # the stream has ended (libarchive was told so)
        self._header_end: int | None = None  # while a header is read: where its cap is
        self._data_read = False  # the current member's data was written
        # what libarchive reads: alive until the next call
        self._keep: bytes | bytearray | memoryview = b""
        self._source_error: BaseException | None = None
        self._cb = lib.READ_CALLBACK(self._read)  # referenced: libarchive calls it later
        self._a = lib.read_new()
        self._e = None
        try:
            if self._a is None:
                raise MemoryError("libarchive could not allocate a reader")
            if lib.read_support_format_tar(self._a) != ARCHIVE_OK:
                self._fail("format")
            self._e = lib.entry_new()
            if self._e is None:
                raise MemoryError("libarchive could not allocate an entry")
            # reads the first bytes, to recognise the format
            if lib.read_open(self._a, None, lib.NO_OPEN_CB, self._cb,
                             lib.NO_CLOSE_CB) < ARCHIVE_WARN:
                self._fail("start")
        except BaseException:
            self.close()
            raise

    def _read(self, _archive, _ctx, ptr) -> int:
        # everything inside the try: an exception cannot unwind through C, and ctypes
        # would hand libarchive an undefined length
        try:
            buf, start, end = self._piece()
            if isinstance(buf, memoryview) and buf.readonly:
                # ctypes takes the address of a writable buffer only
                buf, start, end = bytes(buf[start:end]), 0, end - start
            self._keep = buf
            if isinstance(buf, bytes):
                addr = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
            else:
                addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_void_p))[0] = addr + start
            return end - start
        except BaseException as e:  # noqa: BLE001 - re-raised by _fail; C cannot unwind it
            self._source_error = e
            return -1

    def _piece(self) -> tuple[bytes | bytearray | memoryview, int, int]:
        """The next piece of the tar as (buffer, start, end); start == end at the end."""
        if self._header_end is not None and self._handed >= self._header_end:
            raise TarReadError(f"one member's headers take more than "
                               f"{_HEADER_LIMIT >> 20} MiB of the archive")
        try:
            buf, start, end = self._next_piece()
        except Exception as e:
            if self._chunks.error is not None:
                raise self._chunks.error from None
            if self._compress == "none":
                raise
            raise TarReadError(f"damaged {self._compress} stream: {e}") from None
        self._handed += end - start
        self._ended = start == end
        return buf, start, end

    def _fail(self, what: str):
        if self._source_error is not None:
            raise self._source_error
        msg = self._lib.error_string(self._a)
        err = self._lib.errno(self._a)
        text = msg.decode("utf-8", "replace") if msg else "damaged archive"
        if what == "data" and err and text in ("Write error", "Seek error"):
            raise OSError(err, os.strerror(err))
        if self._ended and (text.startswith("Truncated") or self._handed < _BLOCK_BYTES):
            # a zstd stream cut short just ends (python-zstandard reports no error): say
            # so, not libarchive's "Unrecognized archive format" for a first header cut off
            stream = "stream" if self._compress == "none" else f"{self._compress} stream"
            if not self._handed:
                raise TarReadError(f"empty archive: the {stream} ended before its first "
                                   "header (truncated?)")
            raise TarReadError(f"the archive ends early, after {self._handed} bytes of tar "
                               f"(truncated {stream}?)")
        raise TarReadError(f"{text} (reading the archive's {what})")

    def __iter__(self) -> Iterator[Member]:
        lib, a, e = self._lib, self._a, self._e
        while True:
            self._header_end = self._handed + _HEADER_LIMIT
            try:
                r = lib.read_next_header2(a, e)
            finally:
                self._header_end = None
            if r == ARCHIVE_EOF:
                if self._source_error is not None:
                    raise self._source_error
                return
            # a warning (a name not in this locale) still reads; ARCHIVE_RETRY is a header
            # whose checksum is wrong
            if r not in (ARCHIVE_OK, ARCHIVE_WARN):
                self._fail("headers")
            self._data_read = False
            yield self._member(e)
            # data not written (a link's or a directory's): skipped before the next
            # header is read, so that header's cap does not count it
            if not self._data_read and lib.read_data_skip(a) != ARCHIVE_OK:
                self._fail("data")

    def _member(self, e) -> Member:
        lib = self._lib
        mode = lib.entry_mode(e)
        link = lib.entry_hardlink(e)
        if link is not None:
            kind = "hardlink"
        else:
            kind = _TYPES.get(stat.S_IFMT(mode), "other")
            if kind == "symlink":
                link = lib.entry_symlink(e)
        m = Member(os.fsdecode(lib.entry_pathname(e) or b""), kind, mode & 0o7777,
                   lib.entry_uid(e), lib.entry_gid(e),
                   lib.entry_mtime(e) * 1_000_000_000 + lib.entry_mtime_nsec(e),
                   lib.entry_size(e) if kind == "file" else 0,
                   os.fsdecode(link) if link is not None else "")
        if lib.entry_xattr_reset(e):
            self._apply_xattrs(e, m)
        if kind == "file" and lib.entry_sparse_count(e):
            m.bad = "is a sparse file (the packer never writes one)"
        return m

    def _apply_xattrs(self, e, m: Member) -> None:
        name, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
        nxt = self._lib.entry_xattr_next
        while nxt(e, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)) == 0:
            key = name.value
            raw = ctypes.string_at(value, size.value) if value.value else b""
            if key == SOCKET_XATTR.encode():
                if m.kind == "fifo" and raw == b"1":
                    m.kind = "socket"
                else:
                    m.bad = f"a {SOCKET_XATTR} record on a {m.kind}"
            elif key == MTIME_XATTR.encode():
                ns = _parse_mtime(raw.decode("ascii", "replace"))
                if ns is None:
                    m.bad = f"a malformed {MTIME_XATTR} record"
                else:
                    m.mtime_ns = ns

    def write_data(self, fd: int) -> None:
        """Write the current file member's data into ``fd``. Raises OSError when writing
        fails, TarReadError when the stream does."""
        r = self._lib.read_data_into_fd(self._a, fd)
        if r < ARCHIVE_WARN:
            self._fail("data")
        self._data_read = True

    def close(self) -> None:
        """Free libarchive's reader (idempotent)."""
        if self._e is not None:
            self._lib.entry_free(self._e)
            self._e = None
        if self._a is not None:
            self._lib.read_free(self._a)
            self._a = None

    def __enter__(self) -> "TarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
