"""Diff a source and a target inventory into an ordered, serialisable sync plan."""

from __future__ import annotations

import re

import json
from bisect import bisect_left
from dataclasses import dataclass, field
from chiba_admin.errors import InventoryError

from .entries import (DIR, FIFO, FILE, KINDS, LINK, SOCK, Entry, Inventory, check_source,
                      validate_relpath)
from .hashing import ALGOS

__all__ = [
    "MKDIR", "WRITE", "SYMLINK", "MKNOD", "META", "DELETE", "CLEAR", "OPS",
    "Action", "Plan", "make_plan", "needs", "file_differs", "format_plan",
]

MKDIR, WRITE, SYMLINK, MKNOD, META, DELETE = "mkdir", "write", "symlink", "mknod", "meta", "delete"
# CLEAR: a deletion inside a directory that the source replaced by a non-directory; it
# runs first (before any write), as rsync's generator makes way for the new entry
CLEAR = "clear"
OPS = (CLEAR, MKDIR, WRITE, SYMLINK, MKNOD, META, DELETE)
PLAN_VERSION = 2


@dataclass(slots=True)
class Action:
    """One step of a sync. Fields describe the wanted (source) state; for DELETE the doomed one.

    ``changes`` is '+' for something new, otherwise letters of rsync's itemize flags that
    differ: c (content/target), s (size), t (mtime), p (permissions), o (owner), g (group),
    T (type). ``replace`` says an entry of another kind is in the way at ``path`` and is
    removed first (a directory only once empty: ``rmdir``, never a recursive removal).
    """

    op: str
    path: str
    kind: str
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    target: str | None = None
    digest: bytes | None = None
    changes: str = ""
    replace: bool = False
    uid: int = 0
    gid: int = 0

    def to_dict(self) -> dict:
        d: dict = {"op": self.op, "path": self.path, "kind": self.kind, "size": self.size,
                   "mode": self.mode, "mtime_ns": self.mtime_ns, "changes": self.changes,
                   "uid": self.uid, "gid": self.gid}
        if self.target is not None:
            d["target"] = self.target
        if self.digest is not None:
            d["digest"] = self.digest.hex()
        if self.replace:
            d["replace"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Action":
        try:
            op, path, kind = d["op"], d["path"], d["kind"]
            digest = d.get("digest")
            act = cls(op, path, kind, int(d.get("size", 0)), int(d.get("mode", 0)),
                      int(d.get("mtime_ns", 0)), d.get("target"),
                      bytes.fromhex(digest) if digest else None, str(d.get("changes", "")),
                      bool(d.get("replace", False)), int(d.get("uid", 0)), int(d.get("gid", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InventoryError(f"malformed plan action: {exc}", hint="plan is corrupt") from exc
        if op not in OPS or kind not in KINDS or not isinstance(path, str):
            raise InventoryError(f"malformed plan action {op!r}/{kind!r}", where=str(path),
                                 hint="plan is corrupt")
        if not (path == "" and op == META and kind == DIR):  # "" is the root's own metadata
            validate_relpath(path)
        if op == SYMLINK and not isinstance(act.target, str):
            raise InventoryError("symlink action without target", where=path, hint="plan is corrupt")
        return act


@dataclass
class Plan:
    """What to do, in order, to make a target tree equal a source tree. Pure data.

    ``conflicts`` name what the plan cannot make equal (a directory the source replaced by
    a file while it still holds excluded or, without delete, any members): rsync reports
    these and exits 23; a sync with conflicts has not made its target equal its source.
    ``owners`` says the actions carry uid/gid to set (the target runs as root).
    """

    actions: list[Action] = field(default_factory=list)
    delete: bool = False  # deletions requested *and* allowed
    checksum: bool = False
    warnings: list[str] = field(default_factory=list)
    source_root: str = ""
    target_root: str = ""
    algo: str | None = None  # algorithm of the actions' digests, for verifying writes
    conflicts: list[str] = field(default_factory=list)
    owners: bool = False

    def by_op(self, op: str) -> list[Action]:
        return [a for a in self.actions if a.op == op]

    def writes(self) -> list[Action]:
        return self.by_op(WRITE)

    def bytes_to_transfer(self) -> int:
        return sum(a.size for a in self.actions if a.op == WRITE)

    def summary(self) -> dict:
        counts = {op: 0 for op in OPS}
        for a in self.actions:
            counts[a.op] += 1
        counts[DELETE] += counts.pop(CLEAR)
        return {**counts, "replace": sum(1 for a in self.actions if a.replace),
                "bytes": self.bytes_to_transfer(), "delete_enabled": self.delete,
                "warnings": len(self.warnings), "conflicts": len(self.conflicts)}

    def is_noop(self) -> bool:
        return not self.actions

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "delete": self.delete, "checksum": self.checksum,
                "warnings": list(self.warnings), "conflicts": list(self.conflicts),
                "owners": self.owners, "source_root": self.source_root,
                "target_root": self.target_root, "algo": self.algo, "summary": self.summary(),
                "actions": [a.to_dict() for a in self.actions]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            raise InventoryError("unsupported plan format",
                                 hint=f"expected version {PLAN_VERSION}, got {d.get('version') if isinstance(d, dict) else type(d).__name__}")
        return cls([Action.from_dict(a) for a in d.get("actions", [])], bool(d.get("delete")),
                   bool(d.get("checksum")), [str(w) for w in d.get("warnings", [])],
                   str(d.get("source_root", "")), str(d.get("target_root", "")),
                   _algo_or_none(d.get("algo")), [str(c) for c in d.get("conflicts", [])],
                   bool(d.get("owners")))

    def to_json(self) -> str:
        # ensure_ascii keeps surrogate-escaped (non-UTF-8) names as \udcXX, which round-trip.
        return json.dumps(self.to_dict(), ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InventoryError(f"plan is not valid JSON: {exc}", hint="plan is corrupt") from exc
        return cls.from_dict(data)


def _algo_or_none(algo: object) -> str | None:
    if algo is None:
        return None
    if algo not in ALGOS:
        raise InventoryError(f"unknown hash algorithm {algo!r} in plan", hint="plan is corrupt")
    return str(algo)


def file_differs(src: Entry, dst: Entry, checksum: bool, window_ns: int = 0) -> str:
    """Itemize letters saying why ``dst``'s content must be rewritten, '' if it need not be."""
    if checksum:
        if src.digest is None or dst.digest is None:
            raise InventoryError("checksum comparison without digests", where=src.path,
                                 hint="scan both trees with checksum=True")
        flags = ("c" if src.digest != dst.digest else "") + ("s" if src.size != dst.size else "")
        return flags + ("t" if flags and abs(src.mtime_ns - dst.mtime_ns) > window_ns else "")
    flags = ("s" if src.size != dst.size else "") + (
        "t" if abs(src.mtime_ns - dst.mtime_ns) > window_ns else "")
    return flags


def _meta_flags(src: Entry, dst: Entry, window_ns: int, owners: bool = False) -> str:
    flags = "t" if abs(src.mtime_ns - dst.mtime_ns) > window_ns else ""
    # Linux ignores symlink permissions, so comparing them would only cause churn.
    if src.kind != LINK and src.mode != dst.mode:
        flags += "p"
    if owners:
        flags += ("o" if src.uid != dst.uid else "") + ("g" if src.gid != dst.gid else "")
    return flags


def _action(op: str, e: Entry, changes: str, replace: bool = False) -> Action:
    return Action(op, e.path, e.kind, e.size, e.mode, e.mtime_ns, e.target, e.digest, changes,
                  replace, e.uid, e.gid)


_KIND_WORD = {FILE: "regular file", LINK: "symlink", FIFO: "fifo", SOCK: "socket"}


def _protected(hidden: set[str]) -> set[str]:
    """Every directory holding an excluded member at any depth: rsync never removes it."""
    out: set[str] = set()
    for d in hidden:
        while d not in out:
            out.add(d)
            if not d:
                break
            d = _parent(d)
    return out


def _parent(path: str) -> str:
    i = path.rfind("/")
    return path[:i] if i >= 0 else ""


def _depth_key(path: str) -> tuple[int, str]:
    return (-path.count("/"), path)


def _under(path: str, roots: set[str]) -> bool:
    while True:
        i = path.rfind("/")
        if i < 0:
            return False
        path = path[:i]
        if path in roots:
            return True


def _check_algos(source: Inventory, target: Inventory) -> None:
    if source.algo is None or target.algo is None:
        raise InventoryError("checksum mode needs hashed inventories",
                             where=source.root if source.algo is None else target.root,
                             hint="scan both trees with checksum=True")
    if source.algo != target.algo:
        raise InventoryError(f"inventories hashed with {source.algo} and {target.algo}",
                             hint="scan both trees with the same algorithm")


def make_plan(source: Inventory, target: Inventory, *, delete: bool = False,
              checksum: bool = False, allow_empty: bool = False,
              modify_window_ns: int = 0, owners: bool = False) -> Plan:
    """The actions that make ``target`` equal ``source``, in the order a safe sync applies them.

    Order: clears, mkdir (parents first), write, symlink, mknod (FIFOs, sockets), file and
    link metadata, deletions (deepest first, only with ``delete``), directory metadata
    (deepest first). Directory times come after deletions because removing an entry bumps
    its parent's mtime. ``owners`` (the target runs as root) compares and sets numeric
    uid/gid, as ``rsync -a`` does as root.

    A directory that the source replaced by a non-directory is removed only once empty, as
    rsync does: with ``delete`` its members go first (CLEAR actions, deepest first); a
    member protected by an exclude (``target.hidden``), or any member without ``delete``,
    keeps it, and the path is a conflict in ``Plan.conflicts`` (rsync: "could not make way",
    exit 23). A deleted directory holding excluded members is kept, as rsync keeps it. A
    source scan with errors disables deletions. An empty source is refused with ``delete``
    unless ``allow_empty`` (InvalidRequest), and a source with device nodes always.
    """
    if not allow_empty:
        check_source(source, delete=delete)
    if checksum:
        _check_algos(source, target)
    warnings: list[str] = []
    conflicts: list[str] = []
    can_delete = delete
    if delete and source.errors:
        can_delete = False
        warnings.append(f"deletions disabled: source scan had {len(source.errors)} error(s),"
                        f" first: {source.errors[0]}")
    if target.errors:
        warnings.append(f"target scan had {len(target.errors)} error(s), first: {target.errors[0]}")

    clears: list[Action] = []
    mkdirs: list[Action] = []
    writes: list[Action] = []
    links: list[Action] = []
    specials: list[Action] = []
    metas: list[Action] = []
    dir_metas: dict[str, Action] = {}
    touched: set[str] = set()  # dirs whose entries change, so their mtime must be re-set
    gone_dirs: set[str] = set()  # replaced dirs whose members are handled by clears
    src_entries, dst_entries = source.entries, target.entries
    if target.skipped:
        # device nodes on the target: never copied, but in the way or extraneous like any
        # non-directory (rsync -a as root removes them with --delete); size -1 never matches
        dst_entries = {**dst_entries, **{i.path: Entry(i.path, FILE, -1) for i in target.skipped
                                         if i.path not in dst_entries}}
    protected = _protected(target.hidden) if target.hidden else set()
    sorted_dst: list[str] | None = None

    get = dst_entries.get
    for path, s in src_entries.items():
        t = get(path)
        # Fast path for the usual case, an unchanged entry: no calls, no allocations.
        if (t is not None and t.mtime_ns == s.mtime_ns and t.size == s.size and t.kind == s.kind
                and t.mode == s.mode and t.target == s.target
                and (not checksum or t.digest == s.digest)
                and (not owners or (t.uid == s.uid and t.gid == s.gid))):
            continue
        if s.kind == DIR:
            if t is None or t.kind != DIR:
                mkdirs.append(_action(MKDIR, s, "+" if t is None else "T", replace=t is not None))
                touched.add(_parent(path))
                dir_metas[path] = _action(META, s, "+")
            else:
                flags = _meta_flags(s, t, modify_window_ns, owners)
                if flags:
                    dir_metas[path] = _action(META, s, flags)
            continue
        if t is not None and t.kind == DIR:
            if sorted_dst is None:
                sorted_dst = sorted(dst_entries)
            members = _members(sorted_dst, path)
            held = path in protected
            if can_delete:
                gone_dirs.add(path)
                clears.extend(_action(CLEAR, dst_entries[m], "-") for m in members
                              if m not in protected)
            if held or (members and not can_delete):
                why = "it holds excluded files" if held else "it is not empty; needs --delete"
                conflicts.append(f"{path}: could not make way for new {_KIND_WORD[s.kind]}"
                                 f" ({why})")
                continue
        replace = t is not None and t.kind != s.kind
        if s.kind == FILE:
            flags = "+" if t is None else "T" if replace else file_differs(s, t, checksum,
                                                                              modify_window_ns)
            if flags:
                writes.append(_action(WRITE, s, flags, replace))
                touched.add(_parent(path))
            else:
                flags = _meta_flags(s, t, modify_window_ns, owners)
                if flags:
                    metas.append(_action(META, s, flags))
        elif t is None or replace or (s.kind == LINK and t.target != s.target):
            out = links if s.kind == LINK else specials
            out.append(_action(SYMLINK if s.kind == LINK else MKNOD, s,
                               "+" if t is None else "T" if replace else "c", replace))
            touched.add(_parent(path))
        else:
            flags = _meta_flags(s, t, modify_window_ns, owners)
            if flags:
                metas.append(_action(META, s, flags))
    clears.sort(key=lambda a: _depth_key(a.path))

    deletes: list[Action] = []
    if can_delete:
        for path, t in dst_entries.items():
            if (path in src_entries or (gone_dirs and _under(path, gone_dirs))
                    or (t.kind == DIR and path in protected)):
                continue
            deletes.append(_action(DELETE, t, "-"))
            touched.add(_parent(path))
        deletes.sort(key=lambda a: _depth_key(a.path))
    for path in touched:
        if path and path not in dir_metas:
            s = src_entries.get(path)
            if s is not None and s.kind == DIR:
                dir_metas[path] = _action(META, s, "")
    rs, rt = source.root_meta, target.root_meta
    if rs is not None:  # the root gets SRC's metadata, as rsync -a SRC/ DST/ gives it
        flags = "+" if rt is None else _meta_flags(rs, rt, modify_window_ns, owners)
        if flags or "" in touched:
            dir_metas[""] = _action(META, rs, flags)
    dir_list = sorted(dir_metas.values(), key=lambda a: _depth_key(a.path))
    return Plan(clears + mkdirs + writes + links + specials + metas + deletes + dir_list,
                can_delete, checksum, warnings, source.root, target.root, source.algo,
                conflicts, owners)


def _members(sorted_paths: list[str], path: str) -> list[str]:
    """Paths strictly below ``path`` in a sorted list: one contiguous run, found by bisection."""
    prefix = path + "/"
    i = bisect_left(sorted_paths, prefix)
    j = bisect_left(sorted_paths, path + "0")  # '0' follows '/': the end of the run
    return sorted_paths[i:j]


def needs(source: Inventory, target: Inventory, checksum: bool = False) -> list[str]:
    """Source files whose content ``target`` lacks, in source order: what must be sent to it."""
    if checksum:
        _check_algos(source, target)
    get = target.entries.get
    out: list[str] = []
    for path, s in source.entries.items():
        if s.kind != FILE:
            continue
        t = get(path)
        if t is None or t.kind != FILE:
            out.append(path)
        elif checksum:
            if t.digest != s.digest or t.size != s.size:
                out.append(path)
        elif t.size != s.size or t.mtime_ns != s.mtime_ns:
            out.append(path)
    return out


def _quote(path: str) -> str:
    """rsync-like escaping so one action is one printable line whatever the name holds."""
    if path.isprintable():
        return path
    out = []
    for c in path:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte kept by surrogateescape
            out.append(f"\\#{o - 0xDC00:03o}")
        elif c.isprintable():
            out.append(c)
        else:
            out.extend(f"\\#{b:03o}" for b in c.encode("utf-8", "surrogatepass"))
    return "".join(out)


_KIND_LETTER = {FILE: "f", DIR: "d", LINK: "L", FIFO: "S", SOCK: "S"}
_FLAGS = "cstpog"  # rsync's itemize positions c s t p o g, then u a x (never set here)


def _itemize(a: Action) -> str:
    x = _KIND_LETTER[a.kind]
    if a.op in (DELETE, CLEAR):
        return "*deleting  "
    if a.op == META:
        changes = "tp" if a.changes == "+" else a.changes
        return "." + x + "".join(ch if ch in changes else "." for ch in _FLAGS) + "..."
    if a.changes in ("+", "T"):
        y = "c" if a.op in (MKDIR, SYMLINK, MKNOD) else ">"
        return f"{y}{x}+++++++++"
    y = ">" if a.op == WRITE else "c"
    flags = "".join(ch if ch in a.changes else "." for ch in _FLAGS) + "..."
    return f"{y}{x}{flags}"


# One line of rsync's --itemize-changes output (``%i %n``): what format_plan writes for each
# action, and what the rsync method parses from rsync itself.
ITEM_RE = re.compile(r"^(?:\*deleting +|[<>ch.][fdLDS][.+?a-zA-Z ]{9} )")


def itemized_lines(text: str) -> list[str]:
    """The change lines of an itemised listing (warnings, conflicts and summary left out)."""
    return [ln for ln in text.splitlines() if ITEM_RE.match(ln)]


def format_plan(plan: Plan, *, include_dir_times: bool = False) -> str:
    """rsync --itemize-changes style lines, then each conflict, then a one-line summary.

    The same text for ``--dry-run`` and for the run that follows it: it is made from the
    plan alone. Directory time fixes that only follow from a mkdir or from changes inside
    the directory are left out unless ``include_dir_times``, as rsync leaves them out.
    """
    lines = [f"warning: {w}" for w in plan.warnings]
    for a in plan.actions:
        if a.op == META and a.kind == DIR and a.changes in ("", "+") and not include_dir_times:
            continue
        name = (_quote(a.path) + "/" if a.path else "./") if a.kind == DIR else _quote(a.path)
        line = f"{_itemize(a)} {name}"
        if a.kind == LINK and a.op != DELETE:
            line += f" -> {_quote(a.target or '')}"
        lines.append(line)
    lines.extend(f"not in sync: {c}" for c in plan.conflicts)
    s = plan.summary()
    lines.append(f"{s[WRITE]} file(s) to write ({s['bytes']} bytes), {s[MKDIR]} dir(s),"
                 f" {s[SYMLINK]} link(s), {s[MKNOD]} special(s), {s[META]} metadata fix(es),"
                 f" {s[DELETE]} deletion(s)" + ("" if plan.delete else " [deletions off]")
                 + (f", {len(plan.conflicts)} conflict(s)" if plan.conflicts else ""))
    return "\n".join(lines)

