"""The test session's clean-up of Open MPI segments (tests/support/shm.py)."""

from __future__ import annotations

import mmap
import os

import pytest

from support.shm import leftovers, segments


def test_only_new_unmapped_segments_are_left_overs(tmp_path):
    (tmp_path / "sm_segment.vm.0.1.0").write_bytes(b"\0" * 4096)  # there before: kept
    before = segments(tmp_path)
    (tmp_path / "sm_segment.vm.0.2.0").write_bytes(b"\0" * 4096)  # new, nobody maps it
    live = tmp_path / "sm_segment.vm.0.3.0"
    live.write_bytes(b"\0" * 4096)
    (tmp_path / "other-file").write_bytes(b"x")  # not Open MPI's
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert leftovers(before, tmp_path) == [tmp_path / "sm_segment.vm.0.2.0"]
        # the session's own process (a singleton MPI_Init) does not keep its segment
        assert len(leftovers(before, tmp_path, ignore=os.getpid())) == 2
    assert [p.name for p in leftovers(before, tmp_path)] == ["sm_segment.vm.0.2.0",
                                                              "sm_segment.vm.0.3.0"]


def test_no_shm_directory_means_no_segments(tmp_path):
    assert segments(tmp_path / "absent") == set()
    assert leftovers(set(), tmp_path / "absent") == []


def test_another_users_segment_is_not_a_left_over(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: only root can give a file to another user")
    seg = tmp_path / "sm_segment.vm.65534.4.0"
    seg.write_bytes(b"\0" * 4096)
    os.chown(seg, 65534, 65534)
    assert leftovers(set(), tmp_path) == []
