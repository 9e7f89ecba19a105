"""Packing and chunked safe unpacking, temp-dir hygiene and node commit/rollback (no MPI)."""

from __future__ import annotations

import io
import os
import stat

import pytest

from mpitools.common.archive import (BLOCK, BlockVerifier, Extractor, RefusedMember, TarReadError,
                              VerifyError,
                              block_sums, clean_stale, make_locked_temp, new_hasher, pack_tree,
                              temp_name)
from mpitools.stage.ranks import DestRefused, NodeStage
from support.archives import crafted_tar, symlink_chain_tar
from support.trees import assert_same_tree, make_tree, special_tree, tree_signature


def _feed(data: bytes, dest: str, compress: str, chunk: int = 65536) -> tuple[int, str]:
    ex = Extractor(dest, compress, depth=2)
    for i in range(0, len(data), chunk):
        ex.feed(data[i:i + chunk])
    return ex.finish()


@pytest.mark.parametrize("compress", ["zstd", "gzip", "none"])
def test_pack_then_unpack_in_chunks_is_identical(tmp_path, compress):
    src = make_tree(tmp_path / "src")
    out = io.BytesIO()
    info = pack_tree(src, out, compress)
    data = out.getvalue()
    assert info.bytes == len(data) and info.files >= 15
    h = new_hasher("blake3")
    h.update(data)
    assert info.hash == h.hexdigest()
    os.mkdir(tmp_path / "dst")
    got, digest = _feed(data, str(tmp_path / "dst"), compress, chunk=7777)
    assert (got, digest) == (len(data), info.hash)
    assert_same_tree(src, tmp_path / "dst")


def test_zstd_compresses_text_and_payload_counts_file_bytes(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.txt").write_text("same line\n" * 100_000)
    out = io.BytesIO()
    info = pack_tree(str(tmp_path / "s"), out, "zstd")
    assert info.payload_bytes == 1_000_000 and info.bytes < 20_000


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "hardlink-out", "device"])
def test_hostile_members_are_refused(tmp_path, kind):
    dest = tmp_path / "d"
    dest.mkdir()
    data = crafted_tar(kind)
    with pytest.raises(RefusedMember):
        _feed(data, str(dest), "none", chunk=512)
    assert not (tmp_path / "evil").exists()
    assert not os.path.lexists(dest / "escape") and not os.path.lexists(dest / "null-dev")


def test_extractor_error_does_not_block_feeding(tmp_path):
    """After a refused member the thread keeps draining, so the MPI side never stalls."""
    dest = tmp_path / "d"
    dest.mkdir()
    ex = Extractor(str(dest), "none", depth=1, batch=4096)  # every feed queues
    data = crafted_tar("dotdot") + bytes(1 << 20)
    for i in range(0, len(data), 4096):
        ex.feed(data[i:i + 4096])
    with pytest.raises(RefusedMember):
        ex.finish()
    assert ex.received == len(data)


@pytest.mark.parametrize("batch", [1, 5000, 3 * BLOCK + 100, 1 << 20])
def test_extractor_copies_a_reused_buffer_before_it_returns(tmp_path, batch):
    """The chain hands the extractor its receive buffers, which it reuses at once."""
    src = make_tree(tmp_path / "src", big=300_000)
    out = io.BytesIO()
    info = pack_tree(src, out, "zstd")
    data = out.getvalue()
    (tmp_path / "d").mkdir()
    ex = Extractor(str(tmp_path / "d"), "zstd", sums=info.blocks, batch=batch)
    buf = bytearray(4096)
    for i in range(0, len(data), 4096):
        piece = data[i:i + 4096]
        buf[:len(piece)] = piece
        ex.feed(memoryview(buf)[:len(piece)])
        buf[:] = bytes(len(buf))  # reused: what was fed must already be copied
    assert ex.finish()[0] == len(data)
    assert_same_tree(src, tmp_path / "d")


def test_corrupt_stream_is_an_error(tmp_path):
    src = make_tree(tmp_path / "src", big=10_000)
    out = io.BytesIO()
    pack_tree(src, out, "zstd")
    data = bytearray(out.getvalue())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "d").mkdir()
    # a damaged zstd frame (its checksum), or (had the flip kept the frame valid) a
    # damaged tar header: libarchive's message, in one line
    with pytest.raises(TarReadError, match="Zstd|checksum|header") as e:
        _feed(bytes(data), str(tmp_path / "d"), "zstd")
    assert "\n" not in str(e.value)


def _fd(path) -> int:
    return os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)


def test_clean_stale_spares_live_jobs_and_restores_old_copies(tmp_path):
    pfd = _fd(tmp_path)
    live = temp_name("data", "stage", "aaaaaaaaaaaa")
    dead = temp_name("data", "stage", "bbbbbbbbbbbb")
    dead_old = temp_name("data", "stage", "cccccccccccc") + ".old"
    fd = make_locked_temp(pfd, live)
    for d in (dead, dead_old):
        os.mkdir(tmp_path / d)
    # names a user may well have: never touched
    for d in ("unrelated.chiba", ".data.chiba-stage-2024", "results.chiba-tmp-2024"):
        (tmp_path / d).mkdir()
    try:
        removed = clean_stale(pfd)
    finally:
        os.close(fd)
        os.close(pfd)
    assert (tmp_path / live).is_dir() and not (tmp_path / dead).exists()
    # the dead job had moved the old destination aside and died: it goes back in place
    assert (tmp_path / "data").is_dir() and not (tmp_path / dead_old).exists()
    assert (tmp_path / "unrelated.chiba").is_dir() and len(removed) == 2
    assert (tmp_path / ".data.chiba-stage-2024").is_dir()


def _node(root, rel, job, **kw) -> NodeStage:
    return NodeStage(str(root), rel, job, **kw)


def test_node_stage_commit_replaces_and_abandon_rolls_back(tmp_path):
    dest = tmp_path / "a" / "b" / "data"
    n = _node(tmp_path, "a/b/data", "job000000001")
    n.prepare()
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "a" / "b" / ".data.chiba-stage-job000000001" / "new").write_text("new")
    n.commit()
    n.finish()
    assert (dest / "new").read_text() == "new"

    m = _node(tmp_path, "a/b/data", "job000000002")
    m.check()  # staged by n: may be replaced
    m.prepare()
    (tmp_path / "a" / "b" / ".data.chiba-stage-job000000002" / "newer").write_text("x")
    m.commit()
    assert (dest / "newer").exists()
    m.abandon()  # another node failed to commit: the previous tree comes back
    assert (dest / "new").read_text() == "new" and not (dest / "newer").exists()
    assert sorted(os.listdir(tmp_path / "a" / "b")) == [".data.chiba-staged", "data"]

    k = _node(tmp_path, "x/y/z", "job000000003")
    k.prepare()
    k.abandon()  # parents this job created go away with it
    assert not (tmp_path / "x").exists()


def test_prepare_fails_when_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    n = _node(tmp_path, "f/data", "j")
    with pytest.raises(OSError):
        n.prepare()
    n.abandon()
    assert (tmp_path / "f").is_file()


def test_existing_destination_not_staged_is_refused_unless_replace(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep").write_text("other job")
    with pytest.raises(DestRefused, match="--replace"):
        _node(tmp_path, "mine", "j").check()
    n = _node(tmp_path, "mine", "j", replace=True)
    n.check()
    n.prepare()
    n.commit()
    n.finish()
    assert os.listdir(tmp_path / "mine") == []
    _node(tmp_path, "mine", "k").check()  # now it is staged


def test_planted_symlink_on_the_way_is_not_followed(tmp_path):
    away = tmp_path / "away"
    away.mkdir()
    (tmp_path / "scratch").mkdir()
    os.symlink(str(away), tmp_path / "scratch" / "jobdir")
    n = _node(tmp_path / "scratch", "jobdir/x", "j")
    with pytest.raises(DestRefused, match="symbolic link"):
        n.check()
    with pytest.raises(OSError, match="symbolic link"):
        n.prepare()
    n.abandon()
    assert os.listdir(away) == []


def test_second_run_on_the_same_destination_is_refused(tmp_path):
    a = _node(tmp_path, "d", "aaaaaaaaaaaa")
    a.prepare()
    b = _node(tmp_path, "d", "bbbbbbbbbbbb")
    with pytest.raises(OSError, match="another chiba-admin run"):
        b.prepare()
    b.abandon()
    assert (tmp_path / ".d.chiba-stage-aaaaaaaaaaaa").is_dir()  # a's temp dir untouched
    a.abandon()
    assert os.listdir(tmp_path) == []


def test_symlink_chain_archive_cannot_escape(tmp_path):
    """CVE-2025-4517 class: nested symlinked dirs whose resolved path exceeds PATH_MAX."""
    outside = tmp_path / "outside"
    dest = tmp_path / "a" / "b" / "dest"
    dest.mkdir(parents=True)
    outside.mkdir()
    data = symlink_chain_tar(str(dest), str(outside / "pwned"))
    with pytest.raises(RefusedMember):
        _feed(data, str(dest), "none", chunk=4096)
    assert not (outside / "pwned").exists()
    assert [os.path.relpath(d, tmp_path) for d, _, fs in os.walk(tmp_path) if "pwned" in fs] \
        in ([], ["a/b/dest/escape"])  # at most inside the destination


def test_block_verification_refuses_before_unpacking(tmp_path):
    src = make_tree(tmp_path / "src", big=200_000)
    out = io.BytesIO()
    info = pack_tree(src, out, "none")
    data = bytearray(out.getvalue())
    assert info.blocks == block_sums(bytes(data)) and len(info.blocks) % 32 == 0
    data[-600] ^= 1  # the last block only: earlier blocks may be unpacked, this one not
    (tmp_path / "d").mkdir()
    ex = Extractor(str(tmp_path / "d"), "none", sums=info.blocks, depth=2)
    for i in range(0, len(data), 10_000):
        ex.feed(bytes(data[i:i + 10_000]))
    with pytest.raises(VerifyError, match="differs"):
        ex.finish()
    swapped = bytes(len(data))  # a different file from the first byte: nothing created
    (tmp_path / "e").mkdir()
    ex = Extractor(str(tmp_path / "e"), "none", sums=info.blocks, depth=2)
    ex.feed(swapped)
    with pytest.raises(VerifyError):
        ex.finish()
    assert os.listdir(tmp_path / "e") == []
    v = BlockVerifier(info.blocks)
    good = out.getvalue()
    assert v.push(good[:100]) == b""  # held back until its block is whole
    assert v.push(good[100:BLOCK + 5]) == good[:BLOCK]
    with pytest.raises(VerifyError, match="shorter|differs"):
        v.finish()


@pytest.mark.skipif(os.geteuid() != 0, reason="owners need root")
def test_modes_owners_specials_and_absolute_links_survive(tmp_path):
    src = special_tree(tmp_path / "src")
    out = io.BytesIO()
    pack_tree(src, out, "zstd")
    (tmp_path / "d").mkdir()
    _feed(out.getvalue(), str(tmp_path / "d"), "zstd")
    assert tree_signature(src, meta=True) == tree_signature(tmp_path / "d", meta=True)
    st = os.stat(tmp_path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o2775 and st.st_uid == 1234


def test_devices_and_hardlinks_outside_are_refused(tmp_path):
    for kind in ("device", "hardlink-out", "hardlink-abs", "hardlink-later"):
        d = tmp_path / kind
        d.mkdir()
        with pytest.raises(RefusedMember):
            _feed(crafted_tar(kind), str(d), "none", chunk=512)
        assert not os.path.lexists(d / "null-dev") and not os.path.lexists(d / "hl")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_without_root_setuid_and_setgid_are_dropped(tmp_path):
    """Ownership is never widened: a run that cannot set the owner keeps no setuid bit."""
    src = special_tree(tmp_path / "src")
    out = io.BytesIO()
    pack_tree(src, out, "none")
    dest = tmp_path / "d"
    dest.mkdir()
    os.chown(dest, 65534, 65534)
    fd = _fd(dest)  # pytest's tmp dirs are root's: nobody reaches dest only by this fd
    # libarchive is loaded on first use: here, while root can still read the interpreter's
    # own modules (nobody may not: run alone, the child failed to import ctypes.util)
    from mpitools.common.tarread import _lib

    _lib()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and unpacks
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            ex = Extractor(fd, "none")
            ex.feed(out.getvalue())
            ex.finish()
            code = 0
        except BaseException as e:  # noqa: BLE001 - shown by the parent's failure
            os.write(2, f"child: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sig = tree_signature(dest, meta=True)
    assert sig["suid-root"][0] & 0o7777 == 0o755 and sig["user-suid"][0] & 0o7777 == 0o750
    assert all(uid == 65534 and not mode & (stat.S_ISUID | stat.S_ISGID)
               for mode, uid, *_ in sig.values())
    assert stat.S_ISFIFO(sig["fifo"][0]) and stat.S_ISSOCK(sig["shared/sock"][0])


@pytest.mark.parametrize("ns", [1_700_000_000_123_456_789, 5, -1_500_000_000, 0])
def test_mtimes_travel_to_the_nanosecond(tmp_path, ns):
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_text("x")
    os.utime(src / "f", ns=(ns, ns))
    out = io.BytesIO()
    pack_tree(str(src), out, "none")
    (tmp_path / "d").mkdir()
    _feed(out.getvalue(), str(tmp_path / "d"), "none")
    assert os.stat(tmp_path / "d" / "f").st_mtime_ns == ns


def test_directory_swapped_for_a_symlink_while_packing_is_not_followed(tmp_path,
                                                                        monkeypatch):
    """Root packs a user's tree: the user swaps ``sub`` for ``sub -> secrets`` right after
    it was examined; packing must fail rather than read through the symlink."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "mine.txt").write_text("mine")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "shadow").write_text("root's secret")
    real_stat = os.stat
    swapped = []

    def stat_then_swap(path, *args, **kw):
        st = real_stat(path, *args, **kw)
        if path == "sub" and not swapped:
            os.rename(src / "sub", tmp_path / "sub.moved")
            os.symlink(str(secrets), src / "sub")
            swapped.append(True)
        return st

    monkeypatch.setattr(os, "stat", stat_then_swap)
    out = io.BytesIO()
    with pytest.raises(OSError):
        pack_tree(str(src), out, "none")
    monkeypatch.undo()
    assert swapped and b"root's secret" not in out.getvalue()


def test_pack_tells_the_payload_as_it_goes(tmp_path):
    """The packing progress bar's total is the scanned payload; the packer counts up to it."""
    import io

    from inventory.source import check_source
    from mpitools.common.archive import pack_tree

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(b"x" * 5000)
    (src / "d" / "b").write_bytes(b"y" * 123)
    (src / "l").symlink_to("a")
    seen: list[int] = []
    pack_tree(str(src), io.BytesIO(), "zstd", on_payload=seen.append)
    assert sorted(seen) == [123, 5000] and sum(seen) == check_source(str(src)).bytes


@pytest.mark.parametrize("head, total, chunk", [(0, 0, 4096), (32, 1000, 4096),
                                                (4096, 4096, 4096), (4128, 10_000, 4096),
                                                (64, 65408 * 3, 65408)])
def test_frames_carry_the_table_then_the_archive(head, total, chunk):
    from mpitools.common.faults import Faults
    from mpitools.stage.ranks import _Frames

    f = _Frames(head, total, chunk)
    sizes = [f.length(i) for i in range(f.count)]
    assert all(0 < n <= chunk for n in sizes)
    assert sum(sizes[:f.head_frames]) == head and sum(sizes[f.head_frames:]) == total
    # fault points count archive segments only, whatever the table's frames
    seen = []
    faults = Faults([{"point": "stage.chunk", "do": "sleep", "seconds": 0}], 0)
    faults.checkpoint = lambda point, count=0: seen.append((point, count))
    for i in range(f.count):
        f.checkpoint(faults, i)
    assert seen == [("stage.chunk", k) for k in range(f.count - f.head_frames)]


def test_the_verifier_hands_on_whole_blocks_as_a_view_and_checks_each(tmp_path):
    """Block-aligned batches (the extractor's) pass on without a copy; a block that
    differs inside one still stops everything before it is handed on."""
    src = make_tree(tmp_path / "src", big=300_000)
    out = io.BytesIO()
    info = pack_tree(src, out, "none")
    good = out.getvalue()
    batch = bytearray(good[:3 * BLOCK])
    v = BlockVerifier(info.blocks)
    got = v.push(batch)
    assert isinstance(got, memoryview) and got.obj is batch and got == good[:3 * BLOCK]
    rest = bytearray(good[3 * BLOCK:])
    assert v.push(memoryview(rest)[:10]) == b""  # part of a block: held back, copied
    rest[5] ^= 1  # changing the caller's buffer afterwards cannot change what was held
    assert bytes(v.push(memoryview(bytes(good[3 * BLOCK + 10:4 * BLOCK])))) == \
        good[3 * BLOCK:4 * BLOCK]
    forged = bytearray(good[4 * BLOCK:6 * BLOCK])
    forged[BLOCK + 7] ^= 1  # the second block of an aligned batch
    with pytest.raises(VerifyError, match="block 5 differs"):
        v.push(forged)


def test_a_read_only_view_as_the_source_unpacks(tmp_path):
    """TarReader takes a source's read-only views too (copied for libarchive, which ctypes
    can only hand a writable buffer's address)."""
    from mpitools.common.archive import unpack_stream

    src = make_tree(tmp_path / "src")
    out = io.BytesIO()
    pack_tree(src, out, "none")
    data = out.getvalue()
    pieces = iter([memoryview(data)[i:i + 9999] for i in range(0, len(data), 9999)])
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        unpack_stream(lambda: next(pieces, b""), fd, "none")
    finally:
        os.close(fd)
    assert_same_tree(src, tmp_path / "d")



def test_a_file_that_shrinks_while_packed_is_named_with_what_to_do(tmp_path, monkeypatch):
    """tarfile's bare "unexpected end of data" becomes one line naming the file (a job
    still writing its output when collect runs)."""
    import mpitools.common.archive as archive
    from mpitools.collect.ranks import read_error

    src = tmp_path / "job"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "out.dat").write_bytes(b"x" * 1000)
    real = os.fstat

    class Larger:  # the file had 5000 bytes when it was opened, 1000 when read
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return 5000 if name == "st_size" else getattr(self._st, name)

    def fstat(fd):
        st = real(fd)
        return Larger(st) if os.readlink(f"/proc/self/fd/{fd}").endswith("/out.dat") else st

    monkeypatch.setattr(archive.os, "fstat", fstat)
    with pytest.raises(OSError, match="shrank while it was packed") as e:
        pack_tree("job", io.BytesIO(), "zstd", arcname="job",
                  dir_fd=os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    assert e.value.filename == os.path.join("job", "sub", "out.dat")
    assert read_error("job", e.value) == (
        "cannot read job/sub/out.dat: shrank while it was packed (still being written? "
        "collect it again once it is complete)")
    assert read_error("job", OSError(13, "Permission denied", "out.dat")) == \
        "cannot read job: Permission denied"  # a bare name from os.open: the root is shown
