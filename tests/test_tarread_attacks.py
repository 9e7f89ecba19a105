"""Crafted tar streams against the libarchive reader (mpitools/common/tarread.py) and
SafeUnpacker: collect unpacks what nodes send, so every byte here is the attacker's (no MPI).
"""

from __future__ import annotations

import io
import os

import pytest
import zstandard

from mpitools.common.archive import RefusedMember, SafeUnpacker, unpack_stream
from mpitools.common.tarread import TarReader, TarReadError

END = b"\0" * 1024


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _hdr(name: bytes, typ: bytes = b"0", size: int = 0, mode: int = 0o644,
         magic: bytes = b"ustar\x0000", link: bytes = b"", extra=()) -> bytes:
    """One 512-byte header with a valid checksum; ``extra``: (offset, bytes) to patch in."""
    b = bytearray(512)
    b[0:100] = name.ljust(100, b"\0")
    b[100:108] = b"%07o\0" % mode
    b[108:124] = b"0000000\0" * 2
    b[124:136] = b"%011o\0" % size
    b[136:148] = b"%011o\0" % 0
    b[156:157] = typ
    b[157:257] = link.ljust(100, b"\0")
    b[257:265] = magic
    for off, data in extra:
        b[off:off + len(data)] = data
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _pax(records: dict) -> bytes:
    body = b""
    for k, v in records.items():
        rec = b" " + k.encode() + b"=" + v.encode() + b"\n"
        n = len(rec) + len(str(len(rec)))
        n += len(str(n)) - len(str(len(rec)))
        body += str(n).encode() + rec
    return _hdr(b"././@PaxHeader", b"x", len(body)) + _pad(body)


def _file(name: bytes, data: bytes = b"", **kw) -> bytes:
    return _hdr(name, size=len(data), **kw) + _pad(data)


def _unpack(tmp_path, data: bytes, compress: str = "none"):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return unpack_stream(io.BytesIO(data), fd, compress)
    finally:
        os.close(fd)


def _members(data: bytes, compress: str = "none") -> list:
    it = iter([data])
    with TarReader(lambda: next(it, b""), compress) as tar:
        return list(tar)


def test_a_damaged_header_is_an_archive_error(tmp_path):
    """A header whose checksum is wrong ends the read with libarchive's "Damaged tar
    archive" (its ARCHIVE_RETRY), not with a nameless member refused as "empty"."""
    bad = bytearray(_file(b"b", b"y"))
    bad[0] = ord("c")  # checksum no longer matches
    with pytest.raises(TarReadError, match="Damaged tar archive"):
        _unpack(tmp_path, _file(b"a", b"x") + bytes(bad) + _file(b"d", b"z") + END)


def _old_gnu_sparse(name: bytes, blocks: list[tuple[int, int]], realsize: int,
                    data: bytes, ext_blocks: int = 0) -> bytes:
    """GNU's old 'S' member: four map slots in the header, then ``ext_blocks`` extension
    blocks of 21 slots each."""
    extra = [(386 + 24 * i, b"%011o\0%011o\0" % blk) for i, blk in enumerate(blocks)]
    extra += [(482, b"\1" if ext_blocks else b"\0"), (483, b"%011o\0" % realsize)]
    out = _hdr(name, b"S", len(data), magic=b"ustar  \0", extra=extra)
    ext = bytearray(512)
    for i in range(21):
        ext[24 * i:24 * i + 24] = b"%011o\0%011o\0" % (1, 0)
    ext[504] = 1
    last = bytes(ext[:504]) + b"\0" * 8
    if ext_blocks:
        out += bytes(ext) * (ext_blocks - 1) + last
    return out + _pad(data)


@pytest.mark.parametrize("member", [
    # PAX 0.1: 5 bytes at 0 and at 4096 of a 1 MiB file (a trailing hole)
    _pax({"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": "s",
          "GNU.sparse.realsize": "1048576", "GNU.sparse.map": "0,5,4096,5"})
    + _file(b"GNUSparseFile.0/s", b"AAAAABBBBB"),
    # PAX 1.0: the map at the start of the data
    _pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
          "GNU.sparse.realsize": "65536"})
    + _file(b"GNUSparseFile.0/s", _pad(b"2\n0\n5\n8192\n5\n") + b"AAAAABBBBB"),
    _old_gnu_sparse(b"s", [(0, 5), (4096, 5)], 100_000, b"AAAAABBBBB"),
], ids=["pax-0.1", "pax-1.0", "gnu-old"])
def test_sparse_members_are_refused(tmp_path, member):
    """The packer never writes a sparse member; libarchive's data-into-fd seeks over holes
    but never sets the size, so one ending in a hole came out short (and a map may point
    anywhere up to 2^63). Refused before anything is created."""
    with pytest.raises(RefusedMember, match="sparse"):
        _unpack(tmp_path, member + END)
    assert os.listdir(tmp_path) == []


def test_one_members_headers_are_bounded():
    """GNU sparse extension blocks (21 map entries each, about 100 bytes of libarchive
    memory per entry) compress thousands to one: 17 KB of zstd took 400 MB of memory while
    the header was parsed. The tar bytes one member's headers take are capped."""
    bomb = _old_gnu_sparse(b"s", [(1, 0)] * 4, 10, b"", ext_blocks=16 * 2048)  # 16 MiB
    data = zstandard.ZstdCompressor(level=3).compress(bomb + END)
    assert len(data) < 64 << 10
    with pytest.raises(TarReadError, match="headers take more than"):
        _members(data, "zstd")
    with pytest.raises(TarReadError, match="headers take more than"):
        _members(bomb + END, "none")


def test_large_data_after_a_header_is_not_a_header():
    """The cap is on headers only: a member's data (here 40 MiB of one byte, a few KiB of
    zstd) and data skipped for a member that has none to write are not counted."""
    big = 40 << 20
    pax_size = _pax({"size": str(big)})
    # not zeros: read as headers, these bytes would be a damaged header, not the end
    tar = (_hdr(b"f", size=big) + b"\1" * big
           + pax_size + _hdr(b"s", b"2", link=b"t") + b"\1" * big + END)
    data = zstandard.ZstdCompressor(level=1).compress(tar)
    it = iter([data])
    seen = []
    with TarReader(lambda: next(it, b""), "zstd") as reader:
        for m in reader:
            seen.append((m.name, m.kind, m.size))
            if m.kind == "file":
                fd = os.open(os.devnull, os.O_WRONLY)
                try:
                    reader.write_data(fd)
                finally:
                    os.close(fd)
    assert seen == [("f", "file", big), ("s", "symlink", 0)]


@pytest.mark.parametrize("pax", [
    {"uid": "-1", "gid": "-1"},            # chown(-1, -1): would stay root's, setuid kept
    {"uid": str(2**32 - 1)},               # (uid_t)-1 as well
    {"uid": str(2**32)},
    {"gid": "-5"},
    {"uid": "99999999999999999999"},
])
def test_ids_outside_uid_t_are_refused(tmp_path, pax):
    """An owner or group no file can have is refused by name, not mapped to "leave it
    root's" nor raised as a bare OverflowError."""
    with pytest.raises(RefusedMember, match="id out of range"):
        _unpack(tmp_path, _pax(pax) + _file(b"f", b"x", mode=0o4755) + END)
    assert os.listdir(tmp_path) == []


def test_sizes_and_ids_past_32_bits_are_read_whole():
    """Sizes, owners and groups are libarchive's 64-bit integers: a 5 GiB member and ids
    past 2**32 come through untruncated (the ids are then refused by the unpacker)."""
    big = 5 << 30
    data = _pax({"size": str(big), "uid": str(2**32 + 7), "gid": str(2**33)}) + \
        _hdr(b"huge", size=0)
    it = iter([data])
    with TarReader(lambda: next(it, b""), "none") as tar:
        m = next(iter(tar))
    assert (m.name, m.size, m.uid, m.gid) == ("huge", big, 2**32 + 7, 2**33)


def test_chiba_mtime_out_of_range_is_refused(tmp_path):
    with pytest.raises(RefusedMember, match="chiba.mtime"):
        _unpack(tmp_path, _pax({"SCHILY.xattr.chiba.mtime": "-9999999999999999999.5"})
                + _file(b"f", b"x") + END)


@pytest.mark.parametrize("compress", ["zstd", "gzip"])
def test_an_uncompressed_tar_is_not_taken_for_a_compressed_one(tmp_path, compress):
    """libarchive's filters passed a plain tar through when the job said zstd or gzip."""
    with pytest.raises(TarReadError, match=compress):
        _unpack(tmp_path, _file(b"f", b"x") + END, compress)
    assert os.listdir(tmp_path) == []


def test_libarchive_never_decompresses(tmp_path):
    """A libarchive built without libzstd or zlib answers ARCHIVE_WARN to enabling that
    filter and then runs an external ``zstd -d``/``gzip -d`` found on PATH. No filter of
    libarchive is ever enabled (none is even declared in the binding): the stream is
    decompressed by the zstandard and gzip modules and libarchive reads a plain tar."""
    from mpitools.common.tarread import _lib

    declared = [n for n in vars(_lib()) if not n.isupper()]
    assert "read_support_format_tar" in declared
    assert not [n for n in declared if "filter" in n or "support_format_all" in n]
    import gzip

    plain = _file(b"f", b"data") + END
    zc = zstandard.ZstdCompressor()
    for compress, data in (("zstd", zc.compress(plain)), ("gzip", gzip.compress(plain)),
                           ("none", plain)):
        assert [(m.name, m.kind) for m in _members(data, compress)] == [("f", "file")]
    # compressed twice: once undone by the job's decompressor, what libarchive gets is
    # still compressed; with a filter of its own enabled it would read the tar inside
    for compress, data in (("zstd", zc.compress(zc.compress(plain))),
                           ("gzip", gzip.compress(gzip.compress(plain)))):
        with pytest.raises(TarReadError):
            _members(data, compress)


def test_the_sources_error_comes_through_a_decompressor_as_itself(tmp_path):
    """A VerifyError raised while zstandard asks for bytes is what the caller sees, not a
    damaged zstd stream."""
    class Boom(Exception):
        pass

    data = zstandard.ZstdCompressor().compress(_file(b"f", os.urandom(300_000)) + END)
    parts = [data[:2000]]

    def src():
        if parts:
            return parts.pop()
        raise Boom("block 2 differs")

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Boom, match="block 2"):
            unpack_stream(src, fd, "zstd")
    finally:
        os.close(fd)


@pytest.mark.parametrize("data,compress,match", [
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 600, "zstd", "(?i)zstd"),
    (b"\x1f\x8b\x08\x00" + b"\xff" * 600, "gzip", "gzip"),
    (_pax({"=x": "1"}) + _file(b"f") + END, "none", "damaged"),
])
def test_errors_are_one_clear_line(data, compress, match):
    """A damaged frame names the compression; a record libarchive rejects without saying
    why is a damaged archive, not "unknown error"."""
    with pytest.raises(TarReadError, match=match) as e:
        _members(data, compress)
    text = str(e.value)
    assert "\n" not in text and "0x" not in text and "unknown" not in text


@pytest.mark.mpi
def test_collect_refuses_a_header_bomb_from_a_node(embedded, cli, tmp_path, monkeypatch):
    """ccn02 is compromised and sends, as its zstd stream, a member whose GNU sparse map is
    64 MiB (6 KB of zstd; libarchive held about twice the map's size in memory while it read
    the header, and collect committed the member). The home server refuses it in one line
    and keeps nothing of ccn02."""
    import json

    from support.trees import make_tree

    def scratch(host):
        h = embedded.host(host)
        return h.local_path(h.scratch)

    for n in ("ccn01", "ccn02"):
        make_tree(os.path.join(scratch(n), "results"), big=2_000)
    bomb = (_hdr(b"results/", b"5", mode=0o755)
            + _old_gnu_sparse(b"results/s", [(1, 0)] * 4, 10, b"", ext_blocks=64 * 2048))
    evil = tmp_path / "evil.tar.zst"
    evil.write_bytes(zstandard.ZstdCompressor(level=3).compress(bomb + END))
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps(  # rank 2 is ccn02
        {"point": "collect.archive", "rank": 2, "do": "replace", "file": str(evil)}))
    out = tmp_path / "out"
    r = cli("collect", "results", "--nodes", "ccn[01-02]", "--dest", str(out), "--json",
            "--compress", "zstd")
    assert r.code == 1, r.err
    j = r.json()
    assert list(j["failures"]) == ["ccn02"]
    why = j["failures"]["ccn02"]
    assert "headers take more than 2 MiB" in why and "\n" not in why, why
    assert sorted(os.listdir(out)) == ["ccn01"]


@pytest.mark.parametrize("link", [(b"2", b"t"), (b"1", b"f")], ids=["symlink", "hardlink"])
def test_a_repeated_link_is_refused_at_once(tmp_path, link):
    """Links wait for close(): a stream repeating one link's header (10,000 of them here;
    a million are 47 KB of zstd and held 300 MB until close) is refused at the second."""
    typ, target = link
    stream = _file(b"f", b"x") + _hdr(b"l", typ, link=target) * 10_000 + END
    it = iter([stream])
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        unpacker = SafeUnpacker(fd)
        with TarReader(lambda: next(it, b""), "none") as tar, \
                pytest.raises(RefusedMember, match="'l': appears twice"):
            for m in tar:
                unpacker.add(m, tar.write_data)
    finally:
        os.close(fd)
    assert unpacker.members == 3


def test_a_deep_name_costs_linear_work(tmp_path, monkeypatch):
    """One member named a/a/.../a/f made SafeUnpacker keep every prefix of the chain
    (O(depth^2) memory) and open each directory from the root again at close(), building
    each path's text component by component: 4,000 levels (130 bytes of zstd) took 31 s of
    CPU, and a PAX name may be 1 MiB long. Here 900 levels (shutil.rmtree of 3.11 recurses
    once per level), counted in directory opens and in memory: linear in the depth."""
    import tracemalloc

    depth = 900
    opens = []
    real_open = os.open

    def counting_open(path, flags, *args, **kw):
        if flags & os.O_DIRECTORY:
            opens.append(path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    tracemalloc.start()
    try:
        _unpack(tmp_path, _pax({"path": "a/" * depth + "f"}) + _file(b"f", b"x") + END)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.isfile(os.path.join(tmp_path, *["a"] * depth, "f"))
    assert len(opens) < 5 * depth, len(opens)  # at most 4 per level; the root walk: 405,000
    assert peak < 2 << 20, peak  # the prefixes of the chain alone: 3.3 MB
    import subprocess

    subprocess.run(["rm", "-rf", "--", str(tmp_path / "a")], check=True)  # not left to rmtree


@pytest.mark.mpi
def test_collect_removes_a_deep_refused_tree(embedded, cli, tmp_path, monkeypatch):
    """ccn02 sends a chain of 1,100 directories, then a device node: refused. Removing
    what was unpacked used shutil.rmtree, which in Python 3.11 recurses once per level: a
    RecursionError left the temporary tree (and its lock) behind. Nothing of ccn02 stays."""
    import json

    from support.trees import make_tree

    for n in ("ccn01", "ccn02"):
        h = embedded.host(n)
        make_tree(os.path.join(h.local_path(h.scratch), "results"), big=2_000)
    deep = "results/" + "d/" * 1100
    evil = tmp_path / "evil.tar"
    evil.write_bytes(_hdr(b"results/", b"5", mode=0o755) + _pax({"path": deep + "f"})
                     + _file(b"f", b"x") + _hdr(b"results/null", b"3") + END)
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps(  # rank 2 is ccn02
        {"point": "collect.archive", "rank": 2, "do": "replace", "file": str(evil)}))
    out = tmp_path / "out"
    try:
        r = cli("collect", "results", "--nodes", "ccn[01-02]", "--dest", str(out), "--json",
                "--compress", "none")
        assert r.code == 1 and r.out, (r.code, r.err[-3000:])
        j = r.json()
        assert list(j["failures"]) == ["ccn02"]
        assert "is a device node" in j["failures"]["ccn02"]
        assert sorted(os.listdir(out)) == ["ccn01"], os.listdir(out)
    finally:  # whatever happened: never leave pytest's own rmtree a tree this deep
        import subprocess

        subprocess.run(["rm", "-rf", "--", str(out)], check=True)


def test_remove_entry_takes_a_deep_tree_and_follows_nothing(tmp_path):
    """remove_entry (a refused stream's temporary tree, an old copy) on 1,500 levels, with
    files, FIFOs and symlinks to outside on the way: all gone, the outside untouched."""
    from mpitools.common.archive import remove_entry

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "t"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(1500):
            if i % 100 == 0:
                os.symlink(str(outside), "to-outside", dir_fd=fd)
                os.mkfifo("fifo", dir_fd=fd)
                with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
                    f.write("x")
                os.mkdir("side", dir_fd=fd)
            os.mkdir("d", 0o700, dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    pfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_entry(pfd, "t")
    finally:
        os.close(pfd)
        if top.exists():  # never leave pytest's own rmtree a tree this deep
            import subprocess

            subprocess.run(["rm", "-rf", "--", str(top)], check=True)
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert os.listdir(outside) == ["keep"]


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are set only as root")
def test_root_owned_members_keep_their_group_below_a_setgid_directory(tmp_path):
    """The temporary directory is made in the destination's parent; when that is setgid
    (a project directory), everything made below takes its group. The chown to root:root
    skipped as a no-op left a root:root setgid program setgid to the project's group."""
    import tarfile

    from mpitools.common.archive import make_locked_temp

    parent = tmp_path / "proj"
    parent.mkdir()
    os.chown(parent, 0, 1234)
    os.chmod(parent, 0o2775)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode, ids in (("d", 0o755, 0), ("d/tool", 0o2755, 0), ("d/user", 0o644, 1000)):
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.DIRTYPE if name == "d" else tarfile.REGTYPE
            ti.mode, ti.uid, ti.gid = mode, ids, ids
            tar.addfile(ti, io.BytesIO(b""))
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tfd = make_locked_temp(pfd, ".d.chiba-stage-0123456789ab")
        try:
            unpack_stream(io.BytesIO(buf.getvalue()), tfd, "none")
        finally:
            os.close(tfd)
    finally:
        os.close(pfd)
    got = {n: (os.lstat(parent / ".d.chiba-stage-0123456789ab" / n).st_uid,
               os.lstat(parent / ".d.chiba-stage-0123456789ab" / n).st_gid)
           for n in ("d", "d/tool", "d/user")}
    assert got == {"d": (0, 0), "d/tool": (0, 0), "d/user": (1000, 1000)}


def test_a_refusal_names_a_long_member_in_a_short_line(tmp_path):
    """A PAX name may be 1 MiB: the refusal (a line of collect's report) shows its ends."""
    name = "x" * 100_000 + "/../evil"
    with pytest.raises(RefusedMember) as e:
        _unpack(tmp_path, _pax({"path": name}) + _file(b"f", b"x") + END)
    text = str(e.value)
    assert len(text) < 300 and text.endswith("has a '..' component") and "/../evil" in text
    with pytest.raises(RefusedMember) as e:
        _unpack(tmp_path, _pax({"linkpath": "y" * 100_000}) + _hdr(b"h", b"1", link=b"y") + END)
    assert len(str(e.value)) < 400 and "hard link to 'yyy" in str(e.value)
