"""Merge many targets' needs: need bitmaps for cheap MPI reductions, and groups to broadcast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Iterable, Mapping

from chiba_admin.errors import InventoryError

from .entries import Inventory

if TYPE_CHECKING:
    import numpy as np

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


def _check_bitmap(source_files: int, bitmap) -> np.ndarray:
    import numpy as np

    arr = np.frombuffer(bytes(bitmap), np.uint8) if not isinstance(bitmap, np.ndarray) else bitmap
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != (source_files + 7) // 8:
        raise InventoryError(f"need bitmap has {arr.size} bytes for {source_files} files",
                             hint="bitmaps must be made against the same source inventory")
    return arr


def bitmap_paths(source: Inventory, bitmap: np.ndarray | bytes) -> list[str]:
    """The paths a need bitmap names, in source order."""
    import numpy as np

    files = source.files()
    arr = _check_bitmap(len(files), bitmap)
    idx = np.flatnonzero(np.unpackbits(arr, count=len(files)))
    return [files[i].path for i in idx.tolist()]


def union_bitmaps(bitmaps: Iterable[np.ndarray | bytes]) -> np.ndarray:
    """Files needed by anyone: the OR reduction mpisync does to decide what to send at all."""
    import numpy as np

    arrs = [np.frombuffer(bytes(b), np.uint8) if not isinstance(b, np.ndarray) else b
            for b in bitmaps]
    if not arrs:
        raise InventoryError("no need bitmaps to combine")
    if len({a.size for a in arrs}) != 1:
        raise InventoryError("need bitmaps differ in length",
                             hint="bitmaps must be made against the same source inventory")
    return np.bitwise_or.reduce(np.stack(arrs), axis=0)


def group_bitmaps(source: Inventory, bitmaps: Mapping[Hashable, np.ndarray | bytes]) -> list[Group]:
    """group_needs for gathered bitmaps, vectorised: columns of the target x file bit matrix
    with equal bit patterns form one group."""
    import numpy as np  # the root's work only; targets never import it

    files = source.files()
    nfiles = len(files)
    targets = _sorted_targets(bitmaps)
    if not targets or not nfiles:
        return []
    bits = np.stack([np.unpackbits(_check_bitmap(nfiles, bitmaps[t]), count=nfiles)
                     for t in targets])  # (targets, files)
    keys = np.ascontiguousarray(np.packbits(bits, axis=0).T)  # one row of target bits per file
    wanted = keys.any(axis=1)
    idx = np.flatnonzero(wanted)
    if idx.size == 0:
        return []
    rows = keys[idx]
    void = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, inverse, counts = np.unique(void, return_inverse=True, return_counts=True)
    # Stable sort keeps source order inside each group; split avoids a pass per group.
    order = np.argsort(inverse.ravel(), kind="stable")
    sizes = np.array([e.size for e in files], np.int64)
    groups: list[Group] = []
    for members in np.split(idx[order], np.cumsum(counts)[:-1]):
        who = np.flatnonzero(bits[:, members[0]])
        groups.append(Group(frozenset(targets[j] for j in who.tolist()),
                            tuple(files[i].path for i in members.tolist()),
                            int(sizes[members].sum())))
    groups.sort(key=_group_order)
    return groups
