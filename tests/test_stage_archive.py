"""Packing and chunked safe unpacking, temp-dir hygiene and node commit/rollback (no MPI)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from mpitools.archive import (Extractor, clean_stale, lock_dir, new_hasher, pack_tree,
                              temp_names)
from mpitools.stage import NodeStage
from test_stage_helpers import assert_same_tree, crafted_tar, make_tree


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


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "link", "device"])
def test_hostile_members_are_refused(tmp_path, kind):
    dest = tmp_path / "d"
    dest.mkdir()
    data = crafted_tar(kind)
    with pytest.raises(tarfile.FilterError):
        _feed(data, str(dest), "none", chunk=512)
    assert not (tmp_path / "evil").exists()
    assert not os.path.lexists(dest / "escape") and not os.path.lexists(dest / "null-dev")


def test_extractor_error_does_not_block_feeding(tmp_path):
    """After a refused member the thread keeps draining, so the MPI side never stalls."""
    dest = tmp_path / "d"
    dest.mkdir()
    ex = Extractor(str(dest), "none", depth=1)
    data = crafted_tar("dotdot") + bytes(1 << 20)
    for i in range(0, len(data), 4096):
        ex.feed(data[i:i + 4096])
    with pytest.raises(tarfile.FilterError):
        ex.finish()
    assert ex.received == len(data)


def test_corrupt_stream_is_an_error(tmp_path):
    src = make_tree(tmp_path / "src", big=10_000)
    out = io.BytesIO()
    pack_tree(src, out, "zstd")
    data = bytearray(out.getvalue())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "d").mkdir()
    with pytest.raises(Exception):
        _feed(bytes(data), str(tmp_path / "d"), "zstd")


def test_clean_stale_spares_live_jobs_and_restores_old_copies(tmp_path):
    dest = str(tmp_path / "data")
    live, _ = temp_names(dest, "stage", "live1")
    dead, _ = temp_names(dest, "stage", "dead1")
    _, dead_old = temp_names(dest, "stage", "dead2")
    for d in (live, dead, dead_old):
        os.mkdir(d)
    (tmp_path / "unrelated.chiba").mkdir()
    fd = lock_dir(live)
    try:
        removed = clean_stale(str(tmp_path))
    finally:
        os.close(fd)
    assert os.path.isdir(live) and not os.path.exists(dead)
    # the dead job had moved the old destination aside and died: it goes back in place
    assert os.path.isdir(dest) and not os.path.exists(dead_old)
    assert (tmp_path / "unrelated.chiba").is_dir() and len(removed) == 2


def test_node_stage_commit_replaces_and_abandon_rolls_back(tmp_path):
    dest = tmp_path / "a" / "b" / "data"
    n = NodeStage(str(dest), "job1")
    n.prepare()
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "a" / "b" / ".data.chiba-stage-job1" / "new").write_text("new")
    n.commit()
    n.finish()
    assert (dest / "new").read_text() == "new"

    m = NodeStage(str(dest), "job2")
    m.prepare()
    (tmp_path / "a" / "b" / ".data.chiba-stage-job2" / "newer").write_text("x")
    m.commit()
    assert (dest / "newer").exists()
    m.abandon()  # another node failed to commit: the previous tree comes back
    assert (dest / "new").read_text() == "new" and not (dest / "newer").exists()
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["data"]

    k = NodeStage(str(tmp_path / "x" / "y" / "z"), "job3")
    k.prepare()
    k.abandon()  # parents this job created go away with it
    assert not (tmp_path / "x").exists()


def test_prepare_fails_when_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    n = NodeStage(str(tmp_path / "f" / "data"), "j")
    with pytest.raises(OSError):
        n.prepare()
    n.abandon()
    assert (tmp_path / "f").is_file()
