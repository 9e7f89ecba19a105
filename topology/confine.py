"""Where a tool may write on a host: confine ``--dest`` (and collect's path) to a host root.

Pure planning, no I/O. Every tool that writes on a host (stage, collect, sync-mayors; MPI,
City Transit and rsync alike) turns the user's ``--dest`` into a :class:`HostDest` here,
before anything is sent, so one rule holds for every method (docs/design.md, "Safety"):

- a relative value is taken under the host's root directory for the tool (scratch for
  stage and collect, the repository for sync-mayors); it may not contain ``..``;
- an absolute value must lie under that root or under one of the host's ``dest_roots``
  (listed explicitly in the topology file); ``/`` and ``..`` components are refused;
- the result may not be an ancestor of the host's scratch, spool or repository directory,
  nor (except where the tool allows its own root, as sync-mayors does for the repository)
  one of those directories itself.

The host side then walks ``rel`` below ``root`` without following symlinks
(:mod:`inventory.beneath`), so a symlink planted in scratch cannot redirect the write.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from chiba_admin.errors import InvalidRequest

__all__ = ["HostDest", "confine_dest", "host_path_ok", "is_within"]


@dataclass(frozen=True)
class HostDest:
    """A confined destination on one host: ``root`` (trusted, from the topology) + ``rel``.

    ``root`` is an absolute host path that the topology names (scratch, repository or a
    ``dest_roots`` entry); ``rel`` is a normalised relative path below it with no ``..``
    (empty when the destination is ``root`` itself). ``path`` is the joined host path.
    """

    root: str
    rel: str

    @property
    def path(self) -> str:
        return posixpath.join(self.root, self.rel) if self.rel else self.root

    @property
    def parent_rel(self) -> str:
        """``rel`` of the destination's parent directory (``""`` for a child of root)."""
        return posixpath.dirname(self.rel)

    @property
    def name(self) -> str:
        """The destination's own name (its last component; ``""`` when it is ``root``)."""
        return posixpath.basename(self.rel)

    def to_dict(self) -> dict:
        return {"root": self.root, "rel": self.rel}


def host_path_ok(p: str) -> bool:
    """True for an absolute, normalised host path other than ``/`` (no ``..``, ``//``)."""
    return (isinstance(p, str) and p.startswith("/") and p != "/" and "\0" not in p
            and posixpath.normpath(p) == p and not p.startswith("//")
            and ".." not in p.split("/"))


def is_within(path: str, root: str) -> bool:
    """True when normalised absolute ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


# Names the tools give their own files beside a destination (inventory.beneath,
# inventory.apply): a destination may not take one of them.
_RESERVED = re.compile(r"\..*\.chiba-(lock|staged|tmp-[0-9a-f]{12,32}|old-[0-9a-f]+"
                       r"|stage-.*|collect-.*)")


def _components_ok(value: str, option: str, host: str) -> None:
    if "\0" in value:
        raise InvalidRequest(f"{option} contains a NUL byte", where=host)
    for part in value.split("/"):
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise InvalidRequest(f"{option} has a name of over 255 bytes ({part[:20]}...)",
                             where=host, hint="a file name is at most 255 bytes")
        if _RESERVED.fullmatch(part):
            raise InvalidRequest(f"{option} {value!r} names one of chiba-admin's own files",
                             where=host, hint="pick another name")
    if ".." in value.split("/"):
        raise InvalidRequest(f"{option} {value!r} has a '..' component", where=host,
                         hint="name a path inside the host's directory, without ..")


def confine_dest(host, which: str, value: str | None, *, default_name: str | None = None,
                 option: str = "--dest", allow_root: bool = False) -> HostDest:
    """Confine ``value`` on ``host`` (a ``topology.Host``) below its ``which`` directory.

    ``which`` is ``"scratch"`` or ``"repository"``. ``value`` None means the default:
    ``default_name`` under the root (stage: the source's name), or the root itself when
    ``default_name`` is None and ``allow_root``. ``allow_root`` lets the result be the root
    itself (sync-mayors' repository); otherwise it must lie strictly below it.

    Returns a :class:`HostDest`. Raises ``InvalidRequest`` (exit 2) naming the option, the value
    and the host when the value is empty, has ``..`` components, is ``/``, lies outside the
    root and the host's ``dest_roots``, or is (or contains) one of the host's scratch,
    spool or repository directories that the tool does not own.
    """
    base = host.paths.get(which)
    where = host.name
    if value is None:
        value = default_name if default_name is not None else ""
        if not value and not allow_root:
            raise InvalidRequest(f"no {option} given", where=where)
    elif value == "":
        raise InvalidRequest(f"empty {option}", where=where,
                         hint=f"name a path under the host's {which} ({base})")
    _components_ok(value, option, where)
    if value.startswith("/"):
        path = posixpath.normpath(value)
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
    else:
        path = posixpath.normpath(posixpath.join(base, value)) if value else base
    if path == "/":
        raise InvalidRequest(f"{option} {value!r} is the host's root directory", where=where,
                         hint=f"name a path under the host's {which} ({base})")
    roots = [base, *getattr(host.paths, "dest_roots", ())]
    root = next((r for r in roots if is_within(path, r)), None)
    if root is None:
        listed = ", ".join(roots)
        raise InvalidRequest(f"{option} {value!r} is outside the host's {which} ({path} not under "
                         f"{listed})", where=where,
                         hint="use a path under it, or list another root in the topology's"
                              " dest_roots")
    own = {which: base}
    for other in ("scratch", "spool", "repository"):
        d = host.paths.get(other)
        if is_within(d, path) and not (allow_root and own.get(other) == path):
            what = "is" if d == path else "contains"
            raise InvalidRequest(f"{option} {value!r} {what} the host's {other} directory {d}",
                             where=where,
                             hint=f"name a new directory under {base} instead")
        # nor inside another of them (a dest_roots entry above the spool must not let a
        # stage write into the spool), unless that one holds the tool's own root
        if other != which and is_within(path, d) and not is_within(base, d):
            raise InvalidRequest(f"{option} {value!r} is inside the host's {other} directory {d}",
                             where=where,
                             hint=f"name a new directory under {base} instead")
    if path == root and not allow_root:
        raise InvalidRequest(f"{option} {value!r} is the destination root {root} itself",
                         where=where, hint=f"name a new directory under {root}")
    rel = "" if path == root else path[len(root.rstrip("/")) + 1:]
    return HostDest(root, rel)
