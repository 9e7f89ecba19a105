"""Merging many targets' needs: groups by target set, need bitmaps, vectorised grouping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chiba_admin.errors import InventoryError
from inventory import (DIR, FILE, Entry, Group, Inventory, bitmap_paths, group_bitmaps, group_needs,
                       needs, needs_bitmap, union_bitmaps)

T0 = 1_700_000_000_000_000_000


def source(n=10):
    entries = [Entry("d", DIR, 0, 0o755, T0)]
    entries += [Entry(f"d/f{i}", FILE, 100 + i, 0o644, T0) for i in range(n)]
    return Inventory.from_entries(entries)


def test_group_needs_by_exact_target_set():
    src = source()
    groups = group_needs({
        "n1": ["d/f1", "d/f2", "d/f3"],
        "n2": ["d/f2", "d/f3", "d/f4"],
        "n3": ["d/f3"],
    }, src)
    assert groups == [
        Group(frozenset({"n1", "n2", "n3"}), ("d/f3",), 103),
        Group(frozenset({"n1", "n2"}), ("d/f2",), 102),
        Group(frozenset({"n1"}), ("d/f1",), 101),
        Group(frozenset({"n2"}), ("d/f4",), 104),
    ]
    assert groups[0].to_dict() == {"targets": ["n1", "n2", "n3"], "paths": ["d/f3"], "nbytes": 103}


def test_group_needs_deterministic_and_mixed_target_types():
    needs_by = {3: ["b", "a"], 1: ["a", "b"], "x": ["c"], 0: []}
    g1 = group_needs(needs_by)
    g2 = group_needs(dict(reversed(list(needs_by.items()))))
    assert g1 == g2
    assert g1 == [Group(frozenset({1, 3}), ("a", "b"), 0), Group(frozenset({"x"}), ("c",), 0)]


def test_group_needs_keeps_source_order_and_checks_paths():
    src = source()
    g = group_needs({0: ["d/f9", "d/f0", "d/f5"]}, src)
    assert g[0].paths == ("d/f0", "d/f5", "d/f9")
    with pytest.raises(InventoryError, match="not a file"):
        group_needs({0: ["d"]}, src)


def test_bitmap_round_trip_and_size():
    src = source(100_000)
    wanted = sorted(f"d/f{i}" for i in range(0, 100_000, 7))  # source order is path order
    bm = needs_bitmap(src, wanted)
    assert isinstance(bm, bytes) and len(bm) == 12_500
    # the same bits as numpy's packbits, which the root's grouping unpacks
    ref = np.zeros(100_000, bool)
    order = {e.path: i for i, e in enumerate(src.files())}
    ref[[order[p] for p in wanted]] = True
    assert bm == np.packbits(ref).tobytes()
    assert bitmap_paths(src, bm) == wanted
    assert bitmap_paths(src, np.frombuffer(bm, np.uint8)) == wanted
    with pytest.raises(InventoryError):
        needs_bitmap(src, ["nope"])
    with pytest.raises(InventoryError, match="bytes for"):
        bitmap_paths(src, bm[:-1])


def test_union_bitmaps():
    src = source()
    a = needs_bitmap(src, ["d/f1"])
    b = needs_bitmap(src, ["d/f7", "d/f1"])
    assert bitmap_paths(src, union_bitmaps([a, np.frombuffer(b, np.uint8)])) == ["d/f1", "d/f7"]
    with pytest.raises(InventoryError):
        union_bitmaps([a, np.zeros(1, np.uint8)])
    with pytest.raises(InventoryError):
        union_bitmaps([])


def test_needs_feeds_grouping():
    src = source(4)
    t1 = Inventory.from_entries([Entry("d", DIR, 0, 0o755, T0), Entry("d/f0", FILE, 100, 0o644, T0)])
    t2 = Inventory.from_entries([Entry("d", DIR, 0, 0o755, T0)])
    per = {"a": needs(src, t1), "b": needs(src, t2)}
    assert per["a"] == ["d/f1", "d/f2", "d/f3"]
    groups = group_needs(per, src)
    assert groups[0].targets == {"a", "b"} and groups[1].paths == ("d/f0",)
    assert group_bitmaps(src, {t: needs_bitmap(src, p) for t, p in per.items()}) == groups


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.sets(st.integers(0, 29)), max_size=12),
       st.sampled_from([256, 2]))
def test_group_bitmaps_equals_group_needs(raw, refine_limit):
    import inventory.groups as groups_mod

    src = source(30)
    per = {t: [f"d/f{i}" for i in sorted(idx)] for t, idx in raw.items()}
    expected = group_needs(per, src)
    # a limit of 2 classes sends most examples down the one-key-per-file path
    old, groups_mod._REFINE_CLASSES = groups_mod._REFINE_CLASSES, refine_limit
    try:
        got = group_bitmaps(src, {t: needs_bitmap(src, p) for t, p in per.items()})
    finally:
        groups_mod._REFINE_CLASSES = old
    assert got == expected
    # Every needed (target, path) pair is in exactly one group.
    pairs = {(t, p) for g in got for t in g.targets for p in g.paths}
    assert pairs == {(t, p) for t, ps in per.items() for p in ps}
