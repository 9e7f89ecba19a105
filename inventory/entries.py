"""Entry and Inventory: the data a tree scan produces and every planner consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from chiba_admin.errors import InvalidRequest, InventoryError

__all__ = [
    "FILE",
    "DIR",
    "LINK",
    "FIFO",
    "SOCK",
    "KINDS",
    "Entry",
    "Issue",
    "Inventory",
    "check_source",
    "encode_path",
    "decode_path",
    "validate_relpath",
]

FILE = "f"
DIR = "d"
LINK = "l"
FIFO = "p"  # named pipe: recreated, as rsync -a (--specials) does
SOCK = "s"  # unix socket: recreated as an inode (its listener is not copied), as rsync -a
KINDS = (FILE, DIR, LINK, FIFO, SOCK)


def encode_path(path: str) -> bytes:
    """Paths are str with surrogateescape for undecodable bytes; this is the exact on-disk name."""
    return path.encode("utf-8", "surrogateescape")


def decode_path(raw: bytes) -> str:
    # Explicit UTF-8 rather than os.fsdecode so every host decodes a broadcast inventory alike.
    return raw.decode("utf-8", "surrogateescape")


@dataclass(slots=True)
class Entry:
    """One tree member. ``path`` is relative, '/'-separated, never empty, '.' or '..'."""

    path: str
    kind: str  # FILE, DIR, LINK, FIFO or SOCK
    size: int = 0  # bytes for files, target length for links, 0 otherwise
    mode: int = 0  # permission bits (st_mode & 0o7777)
    mtime_ns: int = 0
    target: str | None = None  # symlink target, recorded verbatim, never followed
    digest: bytes | None = None  # content hash of files when scanned with checksum=True
    uid: int = 0  # numeric owner and group, kept (as rsync -a) when the target runs as root
    gid: int = 0

    def to_dict(self) -> dict:
        d = {"path": self.path, "kind": self.kind, "size": self.size, "mode": self.mode,
             "mtime_ns": self.mtime_ns, "uid": self.uid, "gid": self.gid}
        if self.target is not None:
            d["target"] = self.target
        if self.digest is not None:
            d["digest"] = self.digest.hex()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        digest = d.get("digest")
        return cls(d["path"], d["kind"], int(d.get("size", 0)), int(d.get("mode", 0)),
                   int(d.get("mtime_ns", 0)), d.get("target"),
                   bytes.fromhex(digest) if digest else None, int(d.get("uid", 0)),
                   int(d.get("gid", 0)))


@dataclass(slots=True, frozen=True)
class Issue:
    """A scan problem: an unreadable directory (error) or a skipped special file (warning)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '.'}: {self.message}"


def validate_relpath(path: str) -> None:
    """Reject paths that could escape or alias a root: absolute, empty, '.', '..', NUL."""
    if not path:
        raise InventoryError("empty path in inventory", hint="inventory is corrupt or hostile")
    if path.startswith("/"):
        raise InventoryError("absolute path in inventory", where=path,
                             hint="inventories hold paths relative to their root")
    if "\0" in path:
        raise InventoryError("NUL byte in path", where=repr(path), hint="inventory is corrupt")
    for part in path.split("/"):
        if part == "":
            raise InventoryError("empty path component", where=path,
                                 hint="inventory is corrupt or hostile")
        if part in (".", ".."):
            raise InventoryError(f"'{part}' path component", where=path,
                                 hint="paths must not climb out of the root")


@dataclass
class Inventory:
    """A scanned tree: entries keyed by path in parents-first (sorted) order, plus scan issues.

    ``errors`` are problems that make the inventory incomplete (unreadable directories);
    a sync from an inventory with errors must not delete. ``skipped`` are device nodes,
    reported and left out (a source holding one is refused before anything is sent).
    ``hidden`` (target scans) holds the directories ("" for the root) with a member left
    out by an exclude pattern: rsync protects those members, so such a directory is never
    removed, and a plan that would have to is a conflict.
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    errors: list[Issue] = field(default_factory=list)
    skipped: list[Issue] = field(default_factory=list)
    root: str = ""
    algo: str | None = None  # hash algorithm of the digests, None if not hashed
    hidden: set[str] = field(default_factory=set)
    # the root directory itself (path ""): rsync -a SRC/ DST/ gives DST the mode, mtime and
    # owner of SRC; None when unknown (a destination not created yet)
    root_meta: Entry | None = None

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], **kw) -> "Inventory":
        """Build an inventory, sorting so parents precede children and rejecting duplicates."""
        items = sorted(entries, key=_path_key)
        table: dict[str, Entry] = {}
        for e in items:
            if e.path in table:
                raise InventoryError("duplicate path in inventory", where=e.path)
            table[e.path] = e
        return cls(table, **kw)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def __getitem__(self, path: str) -> Entry:
        return self.entries[path]

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def files(self) -> list[Entry]:
        """Regular files in inventory order: the index space of need bitmaps."""
        return [e for e in self.entries.values() if e.kind == FILE]

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.kind == FILE)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for e in self.entries.values():
            out[e.kind] += 1
        return {"files": out[FILE], "dirs": out[DIR], "links": out[LINK],
                "specials": out[FIFO] + out[SOCK],
                "errors": len(self.errors), "skipped": len(self.skipped)}

    def same_tree(self, other: "Inventory", *, content: bool = True,
                  owners: bool = False) -> bool:
        """True if both describe the same tree (paths, kinds, sizes, modes, mtimes, targets,
        and with ``owners`` numeric uid and gid)."""
        if self.entries.keys() != other.entries.keys():
            return False
        for path, a in self.entries.items():
            b = other.entries[path]
            if (a.kind, a.size, a.mode, a.mtime_ns, a.target) != (
                    b.kind, b.size, b.mode, b.mtime_ns, b.target):
                return False
            if owners and (a.uid, a.gid) != (b.uid, b.gid):
                return False
            if content and a.kind == FILE and a.digest != b.digest:
                return False
        return True


def _path_key(e: Entry) -> str:
    return e.path


def check_source(inv: Inventory, *, delete: bool = True) -> None:
    """Refuse a source that cannot be sent: one holding a device node (``skipped``), or,
    with ``delete``, an empty one, which would wipe every target (rsync accepts an empty
    source without --delete, and so does this). Raises InvalidRequest (exit 2) for those,
    InventoryError (exit 1) for an empty result of a tree that could not be read."""
    if inv.skipped:
        raise InvalidRequest(f"the source holds a {inv.skipped[0].message.split(' skipped')[0]}",
                             where=inv.skipped[0].path,
                             hint="device nodes are never copied; remove it or exclude it")
    # excluded members (``hidden``) mean the tree is not empty, only selected away: with
    # protected target members nothing would be deleted, as with rsync --exclude '*'
    if delete and not inv.entries and not inv.hidden:
        where = inv.root or None
        if inv.errors:
            raise InventoryError("source tree could not be read", where=where,
                                 hint=f"{len(inv.errors)} scan error(s), first: {inv.errors[0]}")
        raise InvalidRequest("source tree is empty", where=where,
                             hint="refusing to sync: it would delete everything on the targets;"
                                  " check the source path")
