"""Merge many targets' needs: need bitmaps for cheap MPI reductions, and groups to broadcast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

from chiba_admin.errors import InventoryError

from .entries import Inventory

__all__ = [
    "Group",
    "group_needs",
    "needs_bitmap",
    "bitmap_paths",
    "union_bitmaps",
    "group_bitmaps",
]


@dataclass(frozen=True)
class Group:
    """Files needed by exactly the same set of targets: one broadcast to one communicator."""

    targets: frozenset
    paths: tuple[str, ...]
    nbytes: int

    def to_dict(self) -> dict:
        return {"targets": _sorted_targets(self.targets), "paths": list(self.paths),
                "nbytes": self.nbytes}


def _target_key(t: Hashable) -> tuple[str, object]:
    # Targets may be ranks (int) or host names (str); never compare an int with a str.
    return (type(t).__name__, t)


def _sorted_targets(targets: Iterable[Hashable]) -> list:
    return sorted(targets, key=_target_key)


def _group_order(g: Group) -> tuple:
    # Widest audience first (one broadcast serves the most targets), then a stable tiebreak.
    return (-len(g.targets), [_target_key(t) for t in _sorted_targets(g.targets)])


def group_needs(needs_by_target: Mapping[Hashable, Iterable[str]],
                source: Inventory | None = None) -> list[Group]:
    """Group paths by the exact set of targets that need them, in a deterministic order.

    With ``source`` the paths are checked against it, keep its file order and ``nbytes``
    is their total size; without it paths are sorted and ``nbytes`` is 0.
    """
    who: dict[str, set] = {}
    for target, paths in needs_by_target.items():
        for p in paths:
            s = who.get(p)
            if s is None:
                who[p] = {target}
            else:
                s.add(target)
    if source is not None:
        order = {e.path: (i, e.size) for i, e in enumerate(source.files())}
        missing = [p for p in who if p not in order]
        if missing:
            raise InventoryError("needed path is not a file of the source inventory",
                                 where=missing[0], hint="need lists must come from this source")
        paths_in_order = sorted(who, key=lambda p: order[p][0])
    else:
        order = {}
        paths_in_order = sorted(who)
    by_set: dict[frozenset, list[str]] = {}
    for p in paths_in_order:
        by_set.setdefault(frozenset(who[p]), []).append(p)
    groups = [Group(ts, tuple(ps), sum(order[p][1] for p in ps) if order else 0)
              for ts, ps in by_set.items()]
    groups.sort(key=_group_order)
    return groups


def needs_bitmap(source: Inventory, paths: Iterable[str]) -> bytes:
    """One bit per source file (source.files() order), set if needed: 12.5 KB per 100k files.

    Bits are packed most significant first (numpy's packbits order). The bytes are a
    ready MPI buffer: a BOR reduction gives the union, a gather every target's needs for
    group_bitmaps. Built without numpy: targets make one and never pay its import.
    """
    files = source.files()
    index = {e.path: i for i, e in enumerate(files)}
    bits = bytearray((len(files) + 7) // 8)
    for p in paths:
        i = index.get(p)
        if i is None:
            raise InventoryError("needed path is not a file of the source inventory", where=p,
                                 hint="need lists must come from this source")
        bits[i >> 3] |= 0x80 >> (i & 7)
    return bytes(bits)


# bit-reversed bytes: a bitmap's file i (most significant bit first in each byte) becomes
# bit i of a little-endian integer, so Python's big ints do the set algebra in C
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _as_int(source_files: int, bitmap) -> int:
    """A need bitmap as an int whose bit i is file i; a bitmap of the wrong size is refused."""
    raw = bytes(bitmap)
    if len(raw) != (source_files + 7) // 8:
        raise InventoryError(f"need bitmap has {len(raw)} bytes for {source_files} files",
                             hint="bitmaps must be made against the same source inventory")
    return int.from_bytes(raw.translate(_REVERSED), "little")


def _indices(bits: int) -> list[int]:
    """Positions of the set bits of ``bits``, ascending (str.find runs in C)."""
    s = bin(bits)[:1:-1]
    out, i = [], s.find("1")
    while i >= 0:
        out.append(i)
        i = s.find("1", i + 1)
    return out


def bitmap_paths(source: Inventory, bitmap: bytes) -> list[str]:
    """The paths a need bitmap names, in source order."""
    files = source.files()
    return [files[i].path for i in _indices(_as_int(len(files), bitmap))]


def union_bitmaps(bitmaps: Iterable[bytes]) -> bytes:
    """Files needed by anyone: the OR reduction mpisync does to decide what to send at all."""
    raws = [bytes(b) for b in bitmaps]
    if not raws:
        raise InventoryError("no need bitmaps to combine")
    if len({len(r) for r in raws}) != 1:
        raise InventoryError("need bitmaps differ in length",
                             hint="bitmaps must be made against the same source inventory")
    acc = 0
    for r in raws:
        acc |= int.from_bytes(r, "big")
    return acc.to_bytes(len(raws[0]), "big")


# Refining costs classes x (files / 64) word operations per target; past this many classes
# one key per file (a Python operation per needed pair) is cheaper.
_REFINE_CLASSES = 256


def group_bitmaps(source: Inventory, bitmaps: Mapping[Hashable, bytes]) -> list[Group]:
    """group_needs for gathered bitmaps, with big integers of one bit per file.

    Each target splits every class of files into those it needs and those it does not
    (partition refinement), so the classes left are the files with one exact audience.
    Many audiences make many classes; then each file gets a key of its targets' bits
    instead. Hand-written rather than numpy: the root no longer pays numpy's import
    (0.17 s of CPU) on cores its targets share while they start.
    """
    files = source.files()
    nfiles = len(files)
    targets = _sorted_targets(bitmaps)
    if not targets or not nfiles:
        return []
    needs = [_as_int(nfiles, bitmaps[t]) for t in targets]
    classes = _refine(nfiles, needs)
    if classes is None:
        classes = _by_file_key(nfiles, needs)
    groups = []
    for idx, audience in classes:
        if not audience:
            continue  # needed by nobody
        groups.append(Group(frozenset(targets[j] for j in audience),
                            tuple(files[i].path for i in idx), sum(files[i].size for i in idx)))
    groups.sort(key=_group_order)
    return groups


def _refine(nfiles: int, needs: list[int]) -> list[tuple[list[int], tuple]] | None:
    """(file indices, target indices) classes by partition refinement; None past the limit."""
    classes: list[tuple[int, tuple]] = [((1 << nfiles) - 1, ())]
    for j, need in enumerate(needs):
        split: list[tuple[int, tuple]] = []
        for members, audience in classes:
            inside, outside = members & need, members & ~need
            if inside:
                split.append((inside, audience + (j,)))
            if outside:
                split.append((outside, audience))
        if len(split) > _REFINE_CLASSES:
            return None
        classes = split
    return [(_indices(members), audience) for members, audience in classes]


def _by_file_key(nfiles: int, needs: list[int]) -> list[tuple[list[int], tuple]]:
    """The same classes from one key per file: bit j set when target j needs it."""
    keys = [0] * nfiles
    for j, need in enumerate(needs):
        bit = 1 << j
        for i in _indices(need):
            keys[i] |= bit
    members: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        if k:
            members.setdefault(k, []).append(i)
    return [(idx, tuple(_indices(k))) for k, idx in members.items()]
