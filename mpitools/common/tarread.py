"""Read a tar stream with libarchive: members' metadata and their data written into a fd.

:class:`TarReader` parses; it creates nothing. :class:`mpitools.common.archive.SafeUnpacker`
decides where and how each member is created (below directory fds, never through a
symlink) and hands the reader only a descriptor it opened itself, which libarchive writes a
regular file's data into (``archive_read_data_into_fd``). Parsing and decompressing in C
took an unpacking node's CPU on the CPython standard library (7,733 files, 251 MB, zstd)
from 1.0-1.1 s with :mod:`tarfile` to 0.55 s (docs/design.md, "Per-node CPU").

libarchive is reached through libarchive-c's ``ffi`` module (its loaded library and
prototypes). Only the tar format and the job's own compression filter are enabled, so a
stream can never make libarchive pick another format or an external decompressor.

Two facts travel as PAX ``SCHILY.xattr.chiba.*`` records, which libarchive exposes as
extended attributes of the entry (it drops PAX keys it does not know; nothing here ever
sets an xattr on disk): ``chiba.socket`` marks a FIFO that was a Unix socket (tar has no
type for one), and ``chiba.mtime`` carries a negative fractional mtime exactly (libarchive
3.6 reads PAX ``mtime=-1.5`` as -1 s + 0.5 s).
"""

# Rank-side module: standard library and libarchive-c only.
from __future__ import annotations

import ctypes
import os
import re
import stat
from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = ["Member", "TarReader", "TarReadError", "SOCKET_XATTR", "MTIME_XATTR",
           "exact_mtime"]

SOCKET_XATTR = "chiba.socket"
MTIME_XATTR = "chiba.mtime"
_MTIME_RE = re.compile(r"^(-?)(\d{1,19})(?:\.(\d{1,9}))?$")
_FILTERS = {"zstd": "zstd", "gzip": "gzip", "none": None}
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


@dataclass(slots=True)
class Member:
    """One archive member: ``name`` and ``linkname`` as str (undecodable bytes kept through
    :func:`os.fsdecode`), ``kind`` ("file", "dir", "symlink", "hardlink", "fifo",
    "socket", "chr", "blk" or "other"), permission bits ``mode`` (0o7777), numeric
    ``uid``/``gid``, ``mtime_ns`` (nanoseconds), ``size`` (bytes of data, files only),
    ``bad`` (why the reader could not take a chiba.* record, else "")."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    linkname: str = ""
    bad: str = ""


def _lib():
    """libarchive-c's ffi module plus the prototypes it does not declare (imported on first
    use: ranks that never unpack do not pay for loading libarchive)."""
    from libarchive import ffi

    if not hasattr(ffi, "_chiba"):
        lib, vp, c_int = ffi.libarchive, ctypes.c_void_p, ctypes.c_int

        def proto(name, restype, *argtypes):
            # fresh function objects: libarchive-c's own ones log ARCHIVE_WARN returns
            # and raise its ArchiveError, whose text shows a pointer
            return ctypes.CFUNCTYPE(restype, *argtypes)((name, lib))

        ffi._chiba = {
            "open": proto("archive_read_open", c_int, vp, vp, ffi.OPEN_CALLBACK,
                          ffi.READ_CALLBACK, ffi.CLOSE_CALLBACK),
            "next_header": proto("archive_read_next_header2", c_int, vp, vp),
            "data_into_fd": proto("archive_read_data_into_fd", c_int, vp, c_int),
            "xattr_reset": proto("archive_entry_xattr_reset", c_int, vp),
            "xattr_next": proto("archive_entry_xattr_next", c_int, vp,
                                ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(vp),
                                ctypes.POINTER(ctypes.c_size_t)),
            "error_string": proto("archive_error_string", ctypes.c_char_p, vp),
            "errno": proto("archive_errno", c_int, vp),
        }
    return ffi


class TarReader:
    """The members of the tar (compressed with ``compress``: zstd, gzip or none) whose bytes
    ``next_chunk()`` returns piece by piece (``b""`` once at the end).

    Iterate for :class:`Member` objects; while a file member is current,
    :meth:`write_data` writes its data into a descriptor. An exception raised by
    ``next_chunk`` (a block that fails verification) is re-raised as itself. Other errors:
    TarReadError (not a tar, a damaged header or compressed frame, a truncated stream),
    OSError (writing the data). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, next_chunk: Callable[[], bytes], compress: str):
        if compress not in _FILTERS:
            raise ValueError(f"unknown compression {compress!r}")
        self._ffi = ffi = _lib()
        self._fn = ffi._chiba
        self._next_chunk = next_chunk
        self._keep = b""  # the chunk libarchive is reading: alive until the next callback
        self._source_error: BaseException | None = None
        self._cb = ffi.READ_CALLBACK(self._read)  # referenced: libarchive calls it later
        self._a = ffi.read_new()
        self._e = None
        try:
            ffi.read_support_format_tar(self._a)
            if _FILTERS[compress]:
                getattr(ffi, f"read_support_filter_{_FILTERS[compress]}")(self._a)
            self._e = ffi.entry_new()
            # reads the first bytes, to recognise the format and the compression
            if self._fn["open"](self._a, None, ffi.NO_OPEN_CB, self._cb,
                                ffi.NO_CLOSE_CB) < ffi.ARCHIVE_WARN:
                self._fail("start")
        except BaseException:
            self.close()
            raise

    def _read(self, _archive, _ctx, ptr) -> int:
        try:
            data = self._next_chunk() or b""  # b"": the end of the stream
        except BaseException as e:  # noqa: BLE001 - re-raised by _fail; C cannot unwind it
            self._source_error = e
            return -1
        if not isinstance(data, bytes):
            data = bytes(data)
        self._keep = data
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_char_p))[0] = data
        return len(data)

    def _fail(self, what: str):
        if self._source_error is not None:
            raise self._source_error
        msg = self._fn["error_string"](self._a)
        err = self._fn["errno"](self._a)
        text = msg.decode("utf-8", "replace") if msg else "unknown error"
        if what == "data" and err and text in ("Write error", "Seek error"):
            raise OSError(err, os.strerror(err))
        raise TarReadError(f"{text} (reading the archive's {what})")

    def __iter__(self) -> Iterator[Member]:
        ffi, fn, a, e = self._ffi, self._fn, self._a, self._e
        while True:
            r = fn["next_header"](a, e)
            if r == ffi.ARCHIVE_EOF:
                if self._source_error is not None:
                    raise self._source_error
                return
            if r < ffi.ARCHIVE_WARN:  # a warning (a name not in this locale) still reads
                self._fail("headers")
            yield self._member(e)

    def _member(self, e) -> Member:
        ffi = self._ffi
        mode = ffi.entry_mode(e)
        hard = ffi.entry_hardlink(e)
        kind = "hardlink" if hard is not None else _TYPES.get(stat.S_IFMT(mode), "other")
        link = hard if hard is not None else ffi.entry_symlink(e)
        m = Member(os.fsdecode(ffi.entry_pathname(e) or b""), kind, mode & 0o7777,
                   ffi.entry_uid(e), ffi.entry_gid(e),
                   ffi.entry_mtime(e) * 10**9 + ffi.entry_mtime_nsec(e),
                   ffi.entry_size(e) if kind == "file" else 0,
                   os.fsdecode(link) if link is not None else "")
        if self._fn["xattr_reset"](e):
            self._apply_xattrs(e, m)
        return m

    def _apply_xattrs(self, e, m: Member) -> None:
        name, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
        nxt = self._fn["xattr_next"]
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
        """Write the current file member's data into ``fd`` (holes of a sparse member by
        seeking). Raises OSError when writing fails, TarReadError when the stream does."""
        r = self._fn["data_into_fd"](self._a, fd)
        if r < self._ffi.ARCHIVE_WARN:
            self._fail("data")

    def close(self) -> None:
        """Free libarchive's reader (idempotent)."""
        if self._e is not None:
            self._ffi.entry_free(self._e)
            self._e = None
        if self._a is not None:
            self._ffi.read_free(self._a)
            self._a = None

    def __enter__(self) -> "TarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
