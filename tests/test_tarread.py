"""libarchive as the tar parser (mpitools/common/tarread.py): what it reads against what
tarfile reads, its errors, and the chiba.* records (no MPI)."""

from __future__ import annotations

import errno
import io
import os
import tarfile

import pytest

from mpitools.common.archive import RefusedMember, unpack_stream
from mpitools.common.tarread import TarReader, TarReadError, exact_mtime


def _tar(fmt=tarfile.PAX_FORMAT, members=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, type_, data, kw in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.size = type_, len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _chunks(data: bytes, size: int = 700):
    it = iter([data[i:i + size] for i in range(0, len(data), size)])
    return lambda: next(it, b"")


def _read(data: bytes, compress: str = "none") -> list[tuple]:
    out = []
    with TarReader(_chunks(data), compress) as tar:
        for m in tar:
            r, w = os.pipe()
            try:
                if m.kind == "file":
                    tar.write_data(w)
                os.close(w)
                w = -1
                body = os.read(r, 1 << 20)
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
            out.append((m.name, m.kind, m.mode, m.uid, m.gid, m.mtime_ns, m.size,
                        m.linkname, body))
    return out


_KINDS = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink", tarfile.FIFOTYPE: "fifo"}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT,
                                 tarfile.GNU_FORMAT])
def test_reads_what_tarfile_reads(fmt):
    """Every header kind the packer writes, and GNU's and ustar's long-name and base-256
    forms, read by libarchive as tarfile reads them."""
    members = [
        ("d/", tarfile.DIRTYPE, b"", dict(mode=0o755)),
        ("d/f", tarfile.REGTYPE, b"x" * 700, dict(mode=0o4755, uid=1000, gid=1000,
                                                  mtime=1_700_000_000)),
        ("p" * 80 + "/" + "q" * 80, tarfile.REGTYPE, b"long", {}),  # ustar: prefix + name
        ("d/big-ids", tarfile.REGTYPE, b"", dict(uid=0o7777777 + 1 if fmt !=
                                                  tarfile.USTAR_FORMAT else 7)),
        ("d/l", tarfile.SYMTYPE, b"", dict(linkname="../f")),
        ("d/h", tarfile.LNKTYPE, b"", dict(linkname="d/f")),
        ("d/fifo", tarfile.FIFOTYPE, b"", {}),
    ]
    data = _tar(fmt, members)
    want = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for ti in tar:
            body = tar.extractfile(ti).read() if ti.isreg() else b""
            want.append((ti.name, _KINDS[ti.type], ti.mode, ti.uid, ti.gid,
                         int(ti.mtime) * 10**9, ti.size if ti.isreg() else 0,
                         ti.linkname, body))
    got = [(n.rstrip("/"), *rest) for n, *rest in _read(data)]
    assert got == want


def test_pax_names_and_exact_mtimes_come_through():
    """Non-UTF-8 bytes, newlines and 200-byte names; nanosecond and negative mtimes."""
    name = os.fsdecode(b"caf\xe9\nname-" + b"x" * 200)
    members = []
    for i, ns in enumerate([1_700_000_000_123_456_789, 5, -1_500_000_000, -250_000_000, 0]):
        pax = {"mtime": exact_mtime(ns)}
        if ns < 0 and ns % 10**9:
            pax["SCHILY.xattr.chiba.mtime"] = exact_mtime(ns)
        members.append((f"{name}{i}", tarfile.REGTYPE, b"", dict(pax_headers=pax)))
    got = _read(_tar(members=members))
    assert [(g[0], g[5]) for g in got] == [
        (f"{name}{i}", ns) for i, ns in
        enumerate([1_700_000_000_123_456_789, 5, -1_500_000_000, -250_000_000, 0])]


@pytest.mark.parametrize("data,compress,match", [
    (b"this is not a tar archive at all" * 40, "none", "Unrecognized|format"),
    (b"", "none", "empty|format|Truncated|EOF"),
])
def test_not_a_tar_is_one_clear_error(data, compress, match):
    with pytest.raises(TarReadError, match=match):
        _read(data, compress)


def test_only_the_jobs_compression_is_accepted():
    """A zstd stream announced as uncompressed (or gzip) is refused, never auto-detected:
    no other filter or external decompressor is ever enabled."""
    import zstandard

    data = zstandard.ZstdCompressor().compress(_tar(members=[("f", tarfile.REGTYPE, b"x", {})]))
    assert _read(data, "zstd")[0][0] == "f"
    for compress in ("none", "gzip"):
        with pytest.raises(TarReadError):
            _read(data, compress)
    with pytest.raises(ValueError):
        TarReader(_chunks(data), "lzop")


def test_truncated_stream_is_an_error():
    data = _tar(members=[("f", tarfile.REGTYPE, b"y" * 5000, {})])
    with pytest.raises(TarReadError, match="runcated|EOF|end"):
        _read(data[:1536])


@pytest.mark.parametrize("compress", ["zstd", "none"])
@pytest.mark.parametrize("share", [0, 0.002, 0.05, 0.3, 0.6, 0.99])
def test_a_stream_cut_short_says_it_ended_early(compress, share):
    """python-zstandard ends a zstd stream cut inside a frame without an error, and
    libarchive then called a first header cut off "Unrecognized archive format": the
    message says the archive ended early, and after how many bytes of tar."""
    import zstandard

    tar = _tar(members=[("f", tarfile.REGTYPE, b"y" * 3000, {}), ("g", tarfile.REGTYPE,
                                                                  os.urandom(3000), {})])
    data = zstandard.ZstdCompressor().compress(tar) if compress == "zstd" else tar
    # cut within what carries the members (a tar's trailing zero blocks may go missing)
    cut = int(share * (len(data) if compress == "zstd" else 2 * 512 + 2 * 3000))
    with pytest.raises(TarReadError, match=r"^(empty archive: the (zstd )?stream ended before"
                                           r" its first header|the archive ends early, "
                                           r"after \d+ bytes of tar) \(truncated"):
        _read(data[:cut], compress)


def test_the_sources_own_error_comes_through_as_itself(tmp_path):
    """A VerifyError raised while libarchive asks for bytes is what the caller sees."""
    class Boom(Exception):
        pass

    data = _tar(members=[("f", tarfile.REGTYPE, b"z" * 70_000, {})])
    parts = [data[:1024]]

    def src():
        if parts:
            return parts.pop()
        raise Boom("block 3 differs")

    with pytest.raises(Boom, match="block 3"):
        with TarReader(src, "none") as tar:
            for _m in tar:
                with open(tmp_path / "f", "wb") as f:
                    tar.write_data(f.fileno())


def test_a_failed_write_is_an_os_error(tmp_path):
    data = _tar(members=[("f", tarfile.REGTYPE, b"w" * 5000, {})])
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with TarReader(_chunks(data), "none") as tar, pytest.raises(OSError) as e:
            for _m in tar:
                tar.write_data(fd)
        assert e.value.errno == 9  # EBADF: the descriptor was not open for writing
    finally:
        os.close(fd)


@pytest.mark.parametrize("pax,why", [
    ({"SCHILY.xattr.chiba.socket": "1"}, "chiba.socket record on a file"),
    ({"SCHILY.xattr.chiba.mtime": "yesterday"}, "malformed chiba.mtime"),
])
def test_chiba_records_that_do_not_fit_are_refused(tmp_path, pax, why):
    """A socket mark on anything but a FIFO, or an mtime record that is not a number,
    refuses the member (collect unpacks what nodes send)."""
    data = _tar(members=[("f", tarfile.REGTYPE, b"q", dict(pax_headers=pax))])
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(RefusedMember, match=why):
            unpack_stream(io.BytesIO(data), fd, "none")
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_a_missing_libarchive_is_one_line_naming_the_package(monkeypatch):
    """The binding loads libarchive by its soname, else where LIBARCHIVE (libarchive-c's
    variable) or the linker's cache says; missing, it says what to install."""
    import ctypes.util

    from mpitools.common import tarread

    monkeypatch.delenv("LIBARCHIVE", raising=False)
    assert tarread._load()._name == tarread._SONAME  # the Debian package's library
    monkeypatch.setenv("LIBARCHIVE", "/nonexistent/libarchive.so")
    with pytest.raises(OSError, match="not loaded from '/nonexistent/libarchive.so'.*"
                                      "libarchive13") as e:
        tarread._load()
    assert "\n" not in str(e.value)
    monkeypatch.delenv("LIBARCHIVE")
    monkeypatch.setattr(tarread, "_SONAME", "libarchive-nonexistent.so.99")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(OSError, match="libarchive not found.*libarchive13"):
        tarread._load()
    monkeypatch.setattr(tarread, "_SONAME", "libc.so.6")  # a library, not libarchive
    tarread._lib.cache_clear()  # bound again on the next call
    with pytest.raises(OSError, match="has no archive_read_new.*libarchive13"):
        tarread._lib()


def test_a_multi_member_gzip_read_from_views_unpacks():
    """gzip's reader is handed bytes: it concatenates what it reads and puts bytes back
    between members, which views (the extractor's batches) do not allow. pigz, bgzip and
    concatenated .gz files are several members; here one ends exactly where a view ends."""
    import gzip

    data = _tar(members=[(f"f{i}", tarfile.REGTYPE, os.urandom(3000), {}) for i in range(4)])
    first, second = gzip.compress(data[:2048]), gzip.compress(data[2048:])
    for cut in (len(first), len(first) - 1, len(first) + 1, 8192):
        stream = first + second
        views = iter([memoryview(bytearray(stream[:cut])), memoryview(bytearray(stream[cut:]))])
        with TarReader(lambda: next(views, b""), "gzip") as tar:
            assert [m.name for m in tar] == ["f0", "f1", "f2", "f3"]



def test_a_missing_libarchive_surfaces_through_the_extractor(tmp_path, monkeypatch):
    """What a node reports: one line naming the package, nothing created."""
    import ctypes.util

    from mpitools.common import tarread
    from mpitools.common.archive import Extractor

    monkeypatch.delenv("LIBARCHIVE", raising=False)
    tarread._lib.cache_clear()  # bound again on the next call
    monkeypatch.setattr(tarread, "_SONAME", "libarchive-nonexistent.so.99")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    ex = Extractor(str(tmp_path), "none")
    ex.feed(_tar(members=[("f", tarfile.REGTYPE, b"x" * 100_000, {})]))
    with pytest.raises(OSError, match="libarchive not found.*libarchive13") as e:
        ex.finish()
    assert e.value.errno == errno.ENOENT and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []
