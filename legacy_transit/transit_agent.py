"""The City Transit agent run on a president or mayor: fans out to its children, prints one JSON line.

This is the recursive pdsh of the paper: the president runs this on each mayor (``python -m
legacy_transit.transit_agent`` through the transport, the plan as JSON on stdin); the mayor
fans out to its nodes and compacts their exit codes into its own, as pdsh forced. Unlike
pdsh it also prints the per-child detail as one JSON line, so the report can name the host.
Imports stay lean (no topology, no networkx): this starts once per mayor per stage.

``transit_agent extract SPEC`` / ``pack SPEC`` / ``probe SPEC`` / ``check SPEC`` /
``check-dest SPEC`` (JSON argument) is the node-side half that each node runs (and the home
server, for collect): unpack by descriptor below a confined destination, archive a
confined path, say what a silent unpacker left, check a path for device nodes before
collect sends anything, or say what extract would do to a destination (stage --dry-run)
(:func:`extract`, :func:`pack_to_stdout`, :func:`probe`, :func:`check_path`,
:func:`check_dest`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

__all__ = ["AgentHost", "host_record", "run_plan", "main", "RESULT_TAG", "extract",
           "pack_to_stdout", "probe", "check_path", "check_dest", "list_sockets",
           "PACK_HEADER", "node_main", "node_result", "tar_x_argv", "ExtractError"]

RESULT_TAG = "CHIBA-TRANSIT-RESULT "  # marks the one line the caller parses


@dataclass
class AgentHost:
    """The few Host attributes a transport needs, rebuilt from JSON on the far side."""

    name: str
    root: str = ""
    address: str | None = None
    ssh: SimpleNamespace = field(default_factory=SimpleNamespace)
    env: dict = field(default_factory=dict)

    @property
    def connect_address(self) -> str:
        return self.address or self.name

    def local_path(self, host_path: str) -> str:
        if not self.root:
            return str(host_path)
        return os.path.join(self.root, str(host_path).lstrip("/"))

    def environment(self) -> dict[str, str]:
        return dict(self.env)


def host_record(host) -> dict:
    """A Host (or AgentHost) as JSON-able data for the agent's plan."""
    ssh = host.ssh
    keys = ("user", "port", "identity_file", "known_hosts", "host_key_policy",
            "connect_timeout", "config_file")
    return {"name": host.name, "root": getattr(host, "root", ""),
            "address": getattr(host, "address", None),
            "ssh": {k: getattr(ssh, k, None) for k in keys}, "env": host.environment()}


def _from_record(d: dict) -> AgentHost:
    return AgentHost(d["name"], d.get("root") or "", d.get("address"),
                     SimpleNamespace(**d.get("ssh") or {}), dict(d.get("env") or {}))


# --- node side: unpack below a confined destination, by file descriptor ----------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP, _OLD = ".chiba-tmp-", ".chiba-old-"  # + job id: exact names of this tool's own files
_TRAILERS = ("Exiting with failure status", "Error is not recoverable")
_READ = 1 << 16
# collect: the node's pack writes one line before its tar stream, listing what GNU tar
# skips (Unix sockets); the home side recreates them after extraction
PACK_HEADER = b"CHIBA-PACK "
_HEADER_MAX = 64 << 20


class ExtractError(Exception):
    """One line saying why a host refused or failed the unpack (the host is named by the caller)."""


def _own(name: str, kind: str, job: str) -> str:
    """``.NAME.chiba-tmp-JOB`` / ``.NAME.chiba-old-JOB``: names a user cannot make by accident."""
    return f".{name}{kind}{job}"


def tar_x_argv() -> list[str]:
    """``tar -x`` from stdin into the working directory, keeping modes; as root also owners.

    As root owners and groups are kept by number (``--same-owner --numeric-owner``), as
    ``rsync -a`` keeps them, so a user's setuid file stays the user's; never root's.
    """
    argv = ["tar", "-x", "-f", "-", "-p"]
    if os.geteuid() == 0:
        argv += ["--same-owner", "--numeric-owner"]
    return argv


def _sweep(parent_fd: int, name: str, lock: int) -> None:
    """Remove what dead runs on this destination left (we hold its lock, ``lock``: no live
    run owns them): their temporary trees, and a killed mark's temporary file."""
    import re

    from inventory.beneath import clean_staged_leftovers, remove_entry

    pat = re.compile(re.escape(f".{name}") + r"\.chiba-(tmp|old)-[0-9a-f]{12}\Z")
    for entry in os.listdir(parent_fd):
        if pat.match(entry):
            remove_entry(parent_fd, entry)
    clean_staged_leftovers(parent_fd, name, lock)


def _first_line(err: bytes) -> str:
    lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(t in ln for t in _TRAILERS)] or lines
    return useful[0][:300] if useful else "?"


def _feed_verified(inp, out, hashes: list[str], chunk: int, size: int) -> None:
    """Copy ``inp`` to ``out`` chunk by chunk, each only after its blake3 matched ``hashes``.

    Raises ExtractError at the first chunk that differs, or when the input is longer or
    shorter than ``size``: an archive swapped or altered on the way is never fed to tar.
    """
    import blake3

    total = 0
    for i, want in enumerate(hashes):
        n = min(chunk, size - total)
        buf = _read_exact(inp, n)
        if len(buf) != n or blake3.blake3(buf).hexdigest() != want:
            raise ExtractError(f"the archive differs from what the home server packed (chunk "
                               f"{i + 1} of {len(hashes)}); refused before tar read it")
        total += n
        out.write(buf)
    if total != size or inp.read(1):
        raise ExtractError("the archive is longer than what the home server packed")


def _read_exact(inp, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = inp.read(min(n - got, 1 << 20))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class _Tally:
    """collect's home side, member by member: the regular files kept and their bytes, and
    the :class:`inventory.homedir.SpaceGuard` of ``DIR`` asked before each member goes to
    tar, then told of each piece of its data as it is written (tar writes a pipe's worth
    behind)."""

    def __init__(self, dir_fd: int, spec: dict):
        from inventory.homedir import SpaceGuard

        self.guard = SpaceGuard(dir_fd, spec.get("min_free"), spec["root"])
        self.files = self.bytes = 0
        self._sizes: dict[str, int] = {}
        self._left = 0  # of the current member's cost, not yet written

    def admit(self, m, name: str, data):
        """Take member ``m``'s space (NoSpace when it does not fit), count it; returns its
        data (a file object, or None) to be read through :meth:`_wrote`."""
        from inventory.homedir import member_cost

        cost = member_cost(m.size if m.isreg() else 0)
        self.guard.take(cost)
        self._left = cost
        if m.isreg():
            self._sizes[name] = m.size
        if m.isreg() or m.islnk():  # as many paths and bytes as the tree will show
            self.files += 1
            self.bytes += self._sizes.get(m.linkname, 0) if m.islnk() else m.size
        return _Metered(data, self._wrote) if data is not None else None

    def _wrote(self, n: int) -> None:
        n = min(n, self._left)
        self._left -= n
        self.guard.wrote(n)

    def settle(self) -> None:
        """The member is handed to tar: the rest of its cost (blocks, inode) is taken."""
        self.guard.wrote(self._left, check=False)
        self._left = 0


class _Metered:
    """A member's data, each piece read reported to ``wrote`` (it goes to tar next)."""

    def __init__(self, f, wrote):
        self._f, self._wrote = f, wrote

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._wrote(len(b))
        return b


def _feed_sanitized(inp, out, top: str, commit: str, tally: _Tally | None = None
                    ) -> list[dict]:
    """Re-emit an untrusted tar stream (a node's, for collect) into ``out``, safe members only.

    The stream starts with the node's header line (:data:`PACK_HEADER` + JSON, see
    :func:`pack_to_stdout`): the sockets below ``top``, returned once checked as members
    are (``top`` or below it, no ``..``, in a directory of the archive, no name twice,
    sane modes, owners and times) for :func:`_make_sockets` to recreate.

    Every member must be ``top`` or below it, without ``..`` or absolute names; types are
    regular files, directories, symlinks, hard links to an earlier regular member, FIFOs
    (``top`` itself not a link); no member may lie below a symlink or a non-directory,
    none may appear twice. Anything else (a device node above all) raises ExtractError
    naming the member. GNU tar reads only what this writes (pax, built here), so no parser
    difference between a checker and tar can be exploited. Owners, modes, mtimes (to the
    nanosecond) pass through as the node's tar recorded them. After the archive only zero
    padding and then ``commit`` may follow (the caller appends it once the node's tar
    exited 0): without it the stream was cut short and ExtractError is raised, so a
    truncated tree is never renamed into place. With ``tally``, each member is counted
    and its space taken first: the home file system's reserve reached raises ExtractError
    (its line says where and how much was left) before the member is written.
    """
    import re
    import tarfile

    from inventory.beneath import shown_name
    from inventory.homedir import NoSpace

    mtime_ok = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,9})?\Z")
    kinds: dict[str, str] = {}  # path -> "d" (directory), "f" (regular), "o" (other)
    w = None
    sockets = _read_header(inp, top)
    try:
        src = tarfile.open(fileobj=inp, mode="r|")
        w = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
        for m in src:
            name = _member_name(m.name, top)
            parent = name.rpartition("/")[0]
            if parent and kinds.get(parent) != "d":
                why = "a symlink or file" if parent in kinds else "no directory of it"
                raise ExtractError(f"member {shown_name(m.name)} lies below {why}")
            if m.ischr() or m.isblk():
                raise ExtractError(f"member {shown_name(m.name)} is a device node (never unpacked)")
            if name == top and not (m.isdir() or m.isreg() or m.isfifo()):
                # a node's PATH that is a link (swapped in after its check, or a crafted
                # stream) would point somewhere on this server once renamed into place
                raise ExtractError(f"member {shown_name(m.name)} (PATH itself) is a link, "
                                   "which collect never brings home in place of PATH")
            if name in kinds:
                raise ExtractError(f"member {shown_name(m.name)} appears twice in the archive")
            if m.islnk():
                target = _member_name(m.linkname, top)
                if kinds.get(target) != "f":
                    raise ExtractError(f"hard link {shown_name(m.name)} -> {shown_name(m.linkname)} does not name"
                                       " an earlier file of the archive")
                m.linkname = target
            elif not (m.isreg() or m.isdir() or m.issym() or m.isfifo()):
                raise ExtractError(f"member {shown_name(m.name)} has a type collect does not unpack "
                                   f"({m.type!r})")
            kinds[name] = "d" if m.isdir() else "f" if m.isreg() else "o"
            mtime = m.pax_headers.get("mtime", "")
            m.pax_headers = {"mtime": mtime} if mtime_ok.match(mtime) else {}
            m.name, m.uname, m.gname = name, "", ""  # numeric owners, as the node recorded
            data = src.extractfile(m) if m.isreg() else None
            if tally is not None:
                data = tally.admit(m, name, data)
            w.addfile(m, data)
            if tally is not None:
                tally.settle()
        rest, token = b"", commit.encode()
        while len(rest) <= (1 << 20):  # tar pads to its record size (10 KiB by default)
            more = src.fileobj.read(_READ)
            if not more:
                break
            rest += more
        if not rest.endswith(token) or rest[:-len(token)].strip(b"\0"):
            raise ExtractError("the node's archive stream did not end as a complete one "
                               "(the node failed or sent trailing data); not committed")
        for sk in sockets:
            parent = sk["path"].rpartition("/")[0]
            if sk["path"] in kinds or (parent and kinds.get(parent) != "d"):
                raise ExtractError(f"socket {sk['path']!r} is not in a directory of the "
                                   "archive or is also a member of it")
        w.close()
        return sockets
    except tarfile.TarError as e:
        raise ExtractError(f"the node sent a damaged tar stream: {e}") from None
    except NoSpace as e:
        raise ExtractError(str(e)) from None
    finally:
        if w is not None and not w.closed:  # refused: tar is killed, flush nothing more
            w.closed = w.fileobj.closed = True


def _read_header(inp, top: str) -> list[dict]:
    """The node's header line: the sockets it listed, each checked (ExtractError if not)."""
    line = inp.readline(_HEADER_MAX)
    if not line.startswith(PACK_HEADER) or not line.endswith(b"\n"):
        raise ExtractError("the node's pack did not start with its header line")
    try:
        listed = json.loads(line[len(PACK_HEADER):])["sockets"]
    except (ValueError, KeyError, TypeError):
        raise ExtractError("the node's pack header is not valid") from None
    out, seen = [], set()
    for sk in listed if isinstance(listed, list) else [None]:
        ok = isinstance(sk, dict) and isinstance(sk.get("path"), str) and all(
            type(sk.get(k)) is int for k in ("mode", "uid", "gid", "mtime_ns"))
        if not ok or not 0 <= sk["mode"] <= 0o7777 or min(sk["uid"], sk["gid"]) < 0:
            raise ExtractError(f"the node's pack header lists a bad socket: {sk!r:.200}")
        try:
            path = _member_name(sk["path"], top)
        except ExtractError:
            raise ExtractError(f"socket {sk['path']!r} listed by the node is outside {top!r}"
                               " (absolute, '..' or another name)") from None
        if path in seen:
            raise ExtractError(f"socket {sk['path']!r} is listed twice")
        seen.add(path)
        out.append({"path": path, **{k: sk[k] for k in ("mode", "uid", "gid", "mtime_ns")}})
    return out


def _member_name(raw: str, top: str) -> str:
    from inventory.beneath import shown_name

    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if raw.startswith("/") or ".." in parts or not parts or parts[0] != top:
        raise ExtractError(f"member {shown_name(raw)} is outside {top!r} (absolute, '..' or another"
                           " name)")
    return "/".join(parts)


def extract(spec: dict, inp) -> dict:
    """Unpack a tar read from ``inp`` into ``spec["root"]/spec["rel"]``, by file descriptor.

    ``spec``: ``root`` (trusted local directory), ``rel`` (destination below it, no ``..``),
    ``inner`` (``"."`` when the archive is the tree itself, else the one name it holds),
    ``job`` (12 hex digits), ``replace`` (bool), ``display`` (the destination as shown to
    the user), ``host_root`` (``root`` as the host names it, for messages), and either
    ``hashes``/``chunk``/``size`` (stage: bytes are verified before tar sees them; ``root``
    must be this host's scratch or one of its dest_roots, :func:`_dest_parts`) or ``top``
    (collect, on the home server: the stream is sanitized, see :func:`_feed_sanitized`;
    ``root_fd``, the descriptor of ``root``, ``DIR``, that the CLI opened once and passed
    down; the missing ``DIR/<host>`` is made ``0700``; ``min_free``, the reserve of its
    :class:`inventory.homedir.SpaceGuard`, None for the default).

    The parent of the destination is walked without following symlinks
    (:mod:`inventory.beneath`), the destination's lock is taken, and tar runs with its
    working directory set by descriptor (``fchdir``) inside ``.NAME.chiba-tmp-JOB``, a
    root-only directory beside the destination, so nothing is written through a planted
    symlink and nothing is reachable before it is complete. Only a complete tree is
    renamed into place; an existing destination is replaced only when an earlier stage
    made it (its staged marker) or ``replace`` is set.

    Returns ``{"ok", "error", "tree", "path", "previous"}``: ``tree`` is ``"complete"``
    (``path`` is the destination), ``"none"`` (nothing of this run is left) or
    ``"partial"`` (``path`` names what could not be removed); ``previous`` is the display
    path of an earlier tree left untouched, if any; collect adds ``files`` and ``bytes``
    (the regular files of the tree and their size).
    """
    from inventory.beneath import (BeneathError, lock_dest, mark_staged, open_dir_beneath,
                                   remove_entry, unlock_dest, was_staged)

    res = {"ok": False, "error": None, "tree": "none", "path": None, "previous": None}
    try:
        parent_rel, name = _dest_parts(spec, own_root="top" not in spec)
    except ExtractError as e:
        res["error"] = str(e)
        return res
    shown = spec.get("display") or spec["rel"]
    shown_parent = shown.rpartition("/")[0] or "/"
    job, inner = spec["job"], spec.get("inner") or "."
    fds: list[int] = []
    try:
        fds.append(_open_dest_root(spec))
        # collect's DIR/<host>: root-only, a node's setuid-root files come home in it
        parent_fd = open_dir_beneath(fds[0], parent_rel, create=True,
                                     mode=0o700 if "top" in spec else 0o755,
                                     display=spec.get("host_root") or spec["root"])
        fds.append(parent_fd)
        lock = lock_dest(parent_fd, name, display=shown_parent)
    except OSError as e:  # BeneathError names its path (a planted lock file included)
        res["error"] = str(e) if isinstance(e, BeneathError) else f"{shown}: {e.strerror or e}"
        _close(fds)
        return res
    tmp = _own(name, _TMP, job)
    try:
        _sweep(parent_fd, name, lock)
        existed = _exists(parent_fd, name)
        if existed and not spec.get("replace") and not was_staged(parent_fd, name):
            res["previous"] = shown
            raise ExtractError(_not_ours(shown))
        os.mkdir(tmp, 0o700, dir_fd=parent_fd)  # root-only until renamed into place
        tmp_fd = os.open(tmp, _DIR_FLAGS, dir_fd=parent_fd)
        fds.append(tmp_fd)
        work = tmp_fd
        if inner == ".":
            os.mkdir("tree", 0o700, dir_fd=tmp_fd)
            work = os.open("tree", _DIR_FLAGS, dir_fd=tmp_fd)
            fds.append(work)
        try:
            tally = _Tally(parent_fd, spec) if "top" in spec else None
            listed = _untar(spec, inp, work, tally)  # collect: the sockets the node listed
            _make_sockets(work, spec.get("sockets") or listed)
        except BaseException:
            if existed:
                res["previous"] = shown
            raise
        _swap(parent_fd, tmp_fd, "tree" if inner == "." else inner, name, job, existed,
              shown)
        mark_staged(parent_fd, name, job)
        res.update(ok=True, tree="complete", path=shown)
        if tally is not None:
            res.update(files=tally.files, bytes=tally.bytes)
        return res
    except (ExtractError, OSError) as e:
        res["error"] = str(e) if isinstance(e, ExtractError) else \
            f"{shown}: {e.strerror or e}"
        return res
    finally:
        os.chdir("/")
        try:
            remove_entry(parent_fd, tmp)
        except OSError as e:
            if not res["ok"]:
                res.update(tree="partial", path=f"{shown_parent.rstrip('/')}/{tmp}")
                res["error"] = f"{res['error']}; cannot remove the partial tree: {e.strerror}"
        unlock_dest(parent_fd, name, lock)
        _close(fds)


def _not_ours(shown: str) -> str:
    """Why an existing destination is left alone (extract, and check_dest's forecast)."""
    return (f"{shown} exists and was not made by chiba-admin stage or collect (left "
            "untouched; pass --replace to replace it)")


def _dest_parts(spec: dict, *, own_root: bool) -> tuple[str, str]:
    """(parent's path below root, name) of ``spec``'s destination, checked here too
    (defence in depth: the CLI confines --dest before any spec is made). Raises
    ExtractError, one line: ``rel`` absolute, with a ``..``, or naming no entry below
    ``root`` (empty, ``.``); with ``own_root``, a ``root`` that is not this host's scratch
    nor one of its dest_roots (``CHIBA_SCRATCH``, ``CHIBA_DEST_ROOTS``: the topology's, in
    every command's environment)."""
    from inventory.beneath import split_rel

    rel, root = spec.get("rel"), spec.get("root")
    try:
        parts = split_rel(rel) if isinstance(rel, str) else None
    except ValueError:
        parts = None
    if not parts:
        raise ExtractError(f"destination {rel!r} refused: not a path below its root "
                           "(absolute, '..' or no name)")
    if own_root:
        mine = [os.environ.get("CHIBA_SCRATCH", ""),
                *os.environ.get("CHIBA_DEST_ROOTS", "").split(os.pathsep)]
        mine = sorted({os.path.normpath(r) for r in mine if r and os.path.isabs(r)} - {"/"})
        if not isinstance(root, str) or os.path.normpath(root) not in mine:
            raise ExtractError(f"destination root {root!r} refused: not this host's scratch "
                               f"or a dest_roots entry ({', '.join(mine) or 'none known'})")
    return "/".join(parts[:-1]), parts[-1]


def _open_dest_root(spec: dict) -> int:
    """``spec["root"]`` opened; a BeneathError names it as the host does (``host_root``).
    collect's (``top``) is a copy of ``root_fd``, the descriptor its CLI opened on ``DIR``
    without following a link: every host's unpacker writes below the directory checked."""
    from inventory.beneath import BeneathError, open_root

    if "top" in spec and spec.get("root_fd") is not None:
        import errno
        import stat

        fd = os.dup(int(spec["root_fd"]))
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise BeneathError(errno.ENOTDIR, "is not a directory", spec["root"])
        return fd
    try:
        return open_root(spec["root"])
    except BeneathError as e:
        raise BeneathError(e.errno, e.what, spec.get("host_root") or e.path) from None


def _replaced(st: os.stat_result, staged: bool) -> str:
    """What a replace would delete, in a few words (stage --dry-run)."""
    import stat

    if stat.S_ISDIR(st.st_mode) and staged:
        return "an earlier stage's tree"
    by = "the run" if staged else "--replace"  # a staged mark beside a non-directory
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link, which {by} deletes, not what it points to"
    kind = ("directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
            else "device node")
    return f"a {kind}{'' if staged else ' no stage made'}, which {by} deletes"


def check_dest(spec: dict) -> dict:
    """stage --dry-run on a node: what :func:`extract` would do with ``spec``'s destination
    (``root``, ``rel``, ``display``, ``host_root``, ``replace`` as extract takes them),
    reading only: no parent made, no lock taken (:func:`inventory.beneath.lock_forecast`),
    no leftover swept.

    Returns ``{"ok", "action", "detail", "error", "previous"}``: ``action`` "create" (the
    destination, and the missing parents ``detail`` names, would be made) or "replace"
    (``detail``: an earlier stage's tree, or the entry ``replace`` would delete); or
    ``error``, the line extract would give (a bad spec, a symlink or a file on the way,
    the lock held or planted, an existing destination without ``replace``: ``previous``
    names it).
    """
    import errno

    from inventory.beneath import (BeneathError, lock_forecast, lstat_at, open_dir_beneath,
                                   was_staged)

    res = {"ok": False, "action": None, "detail": None, "error": None, "previous": None}
    try:
        parent_rel, name = _dest_parts(spec, own_root=True)
        root = _open_dest_root(spec)
    except (ExtractError, BeneathError) as e:
        res["error"] = str(e)
        return res
    shown = spec.get("display") or spec["rel"]
    try:
        parent = open_dir_beneath(root, parent_rel,
                                  display=spec.get("host_root") or spec["root"])
    except BeneathError as e:
        if e.errno != errno.ENOENT:
            res["error"] = str(e)
        else:  # extract makes the missing parents
            res.update(ok=True, action="create",
                       detail=f"and the missing parent directories, from {e.path}")
        return res
    finally:
        os.close(root)
    try:
        locked = lock_forecast(parent, name, display=shown.rpartition("/")[0] or "/")
        st = None if locked else lstat_at(parent, name)
        staged = st is not None and was_staged(parent, name)
        if locked:
            res["error"] = str(locked)
        elif st is None:
            res.update(ok=True, action="create")
        elif spec.get("replace") or staged:
            res.update(ok=True, action="replace", detail=_replaced(st, staged))
        else:
            res.update(error=_not_ours(shown), previous=shown)
        return res
    finally:
        os.close(parent)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _close(fds: list[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)


def _untar(spec: dict, inp, work_fd: int, tally: "_Tally | None" = None) -> list[dict]:
    """Run GNU tar -x in directory ``work_fd`` (fchdir: no path is resolved) fed from ``inp``.

    Returns the sockets a node's sanitized stream listed (collect, whose members are
    counted and guarded by ``tally``; ``[]`` for stage)."""
    import subprocess
    import threading

    os.fchdir(work_fd)
    p = subprocess.Popen(tar_x_argv(), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:  # a pipe as large as a chunk: tar and this relay switch 16 times less often
        import fcntl

        fcntl.fcntl(p.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass
    err: list[bytes] = []
    sockets: list[dict] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    timer = None
    if spec.get("timeout"):
        timer = threading.Timer(float(spec["timeout"]), p.kill)
        timer.start()
    try:
        try:
            if spec.get("top"):
                sockets = _feed_sanitized(inp, p.stdin, spec["top"], spec["commit"], tally)
            else:
                _feed_verified(inp, p.stdin, spec["hashes"], int(spec["chunk"]),
                               int(spec["size"]))
            p.stdin.close()
        except BrokenPipeError:
            pass  # tar stopped: its exit status and message say why
        except BaseException:
            p.kill()
            raise
        finally:
            rc = p.wait()
            reader.join()
    finally:
        if timer is not None:
            timer.cancel()
    if rc == 0:
        return sockets
    if rc < 0 and timer is not None and not timer.is_alive():
        raise ExtractError(f"unpack timed out after {spec['timeout']}s")
    text = b"".join(err)
    why = f"tar -x failed (exit {rc}): {_first_line(text)}"
    if b"Wrote only" in text or b"No space left" in text:
        why += f" (no space left on {spec.get('display') or 'the destination'}?)"
    raise ExtractError(why)


def _make_sockets(tree_fd: int, sockets) -> None:
    """Recreate the source's Unix sockets (GNU tar skips them; rsync -a keeps them).

    ``sockets``: ``{"path", "mode", "uid", "gid", "mtime_ns"}`` each, ``path`` relative to
    the tree. Each parent is walked by descriptor without following symlinks, the socket
    is bound by its bare name from there, then owner, mode and mtime are set, and the
    parent's mtime (already restored by tar) is put back.
    """
    import socket

    from inventory.beneath import BeneathError, open_dir_beneath

    for sk in sockets:
        parent_rel, _, base = sk["path"].rpartition("/")
        try:
            dfd = open_dir_beneath(tree_fd, parent_rel)
        except BeneathError as e:
            raise ExtractError(f"cannot recreate socket {sk['path']!r}: {e}") from None
        try:
            before = os.fstat(dfd)
            os.fchdir(dfd)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(base)
            except OSError as e:
                raise ExtractError(f"cannot recreate socket {sk['path']!r}: "
                                   f"{e.strerror or e}") from None
            finally:
                s.close()
            if os.geteuid() == 0:
                os.chown(base, sk["uid"], sk["gid"], dir_fd=dfd, follow_symlinks=False)
            os.chmod(base, sk["mode"], dir_fd=dfd)  # just bound here: not a symlink
            os.utime(base, ns=(sk["mtime_ns"], sk["mtime_ns"]), dir_fd=dfd,
                     follow_symlinks=False)
            os.utime(dfd, ns=(before.st_atime_ns, before.st_mtime_ns))
        finally:
            os.close(dfd)


def _swap(parent_fd: int, tmp_fd: int, inner: str, name: str, job: str, existed: bool,
          shown: str) -> None:
    """Rename the complete tree ``tmp_fd/inner`` to ``name``; an older one goes, after."""
    from inventory.beneath import remove_entry

    if not _exists(tmp_fd, inner):
        raise ExtractError(f"the archive did not hold {inner!r}")
    old = _own(name, _OLD, job)
    if existed:
        os.rename(name, old, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    try:
        os.rename(inner, name, src_dir_fd=tmp_fd, dst_dir_fd=parent_fd)
    except OSError:
        if existed:
            os.rename(old, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        raise
    if existed:
        remove_entry(parent_fd, old)


def list_sockets(dir_fd: int, name: str | None = None) -> list[dict]:
    """The Unix sockets of a tree, which GNU tar does not archive (rsync -a keeps them).

    The tree is the open directory ``dir_fd`` (paths relative to it), or its entry ``name``
    (paths start with ``name``; ``name`` itself may be the socket). Nothing is followed
    (:func:`inventory.source.walk_below`). Returns ``{"path", "mode", "uid", "gid",
    "mtime_ns"}`` each, as :func:`_make_sockets` takes them; raises OSError.
    """
    import stat

    from inventory.source import walk_below

    def row(path: str, st: os.stat_result) -> dict:
        return {"path": path, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}

    prefix, fd = "", dir_fd
    if name is not None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            return [row(name, st)] if stat.S_ISSOCK(st.st_mode) else []
        prefix, fd = f"{name}/", os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        return [row(prefix + rel, st) for rel, st in walk_below(fd)
                if stat.S_ISSOCK(st.st_mode)]
    finally:
        if fd != dir_fd:
            os.close(fd)


# collect: what to do about a symlink at or above PATH on a node (after "PATH: is a
# symbolic link"); mpitools/collect/ranks.py says the same for the MPI method
SYMLINK_HINT = ("collect reads as root on the nodes and never follows one: name the real "
                "directory below scratch, or remove the link")


def _open_parent(spec: dict) -> tuple[int, str]:
    """(fd of the parent of ``spec["root"]/spec["rel"]``, its name), walked below root
    without following symlinks; raises BeneathError naming the path: ELOOP when the path
    or a directory on its way below root is a symbolic link (collect never sends what a
    link planted in scratch points to, nor the link itself as its PATH), ENOENT missing."""
    import errno
    import stat

    from inventory.beneath import BeneathError, open_dir_beneath, open_root

    parent_rel, _, name = spec["rel"].rpartition("/")
    shown = spec.get("display") or spec["rel"]
    root = open_root(spec["root"])
    try:
        parent = open_dir_beneath(root, parent_rel,
                                  display=spec.get("host_root") or spec["root"])
    finally:
        os.close(root)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.close(parent)
        raise BeneathError(errno.ENOENT, "does not exist", shown) from None
    if stat.S_ISLNK(st.st_mode):
        os.close(parent)
        raise BeneathError(errno.ELOOP, "is a symbolic link (not followed)", shown)
    return parent, name


def check_path(spec: dict) -> dict:
    """collect's preflight on a node: is ``spec["root"]/spec["rel"]`` fit to send?

    Returns ``{"ok", "device", "symlink", "error"}``: ``device`` is one line naming the
    first device node at or below it (inventory.source.find_device), ``symlink`` one line
    naming the path or the directory on its way that is a symbolic link; either refuses
    the whole collect. ``error`` says why the path cannot be walked or read otherwise
    (missing, say: that host fails at pack time).
    """
    import errno

    from inventory.beneath import BeneathError
    from inventory.source import find_device, shown_path, unreadable

    shown = spec.get("display") or spec["rel"]
    try:
        parent, name = _open_parent(spec)
    except BeneathError as e:  # the path escaped: a newline must not cut the line
        if e.errno == errno.ELOOP:
            return {"ok": False, "device": None, "error": None, "symlink":
                    f"{shown_path(e.path)}: is a symbolic link ({SYMLINK_HINT})"}
        return {"ok": False, "device": None, "symlink": None,
                "error": f"{shown_path(e.path)}: {e.what}"}
    try:
        dev = find_device(parent, name)
    except OSError as e:
        return {"ok": False, "device": None, "symlink": None, "error": unreadable(shown, e)}
    finally:
        os.close(parent)
    if dev is not None:
        return {"ok": False, "device": dev.line(shown), "symlink": None, "error": None}
    return {"ok": True, "device": None, "symlink": None, "error": None}


def pack_to_stdout(spec: dict) -> int:
    """``tar -c`` of ``spec["root"]/spec["rel"]`` onto stdout, its parent opened by descriptor.

    The parent is walked without following symlinks, so a symlink planted on the way
    cannot make root archive (and send home) something outside the host's scratch. The
    tar stream is preceded by one header line, :data:`PACK_HEADER` + JSON
    ``{"sockets": [...]}`` (:func:`list_sockets`: GNU tar skips sockets; the home side
    recreates them). Does not return on success (exec); returns 2 with one line on stderr
    when the path is bad.
    """
    from inventory.beneath import BeneathError

    try:
        parent, name = _open_parent(spec)
        header = PACK_HEADER + json.dumps({"sockets": list_sockets(parent, name)}).encode()
        os.fchdir(parent)
    except OSError as e:
        why = str(e) if isinstance(e, BeneathError) else \
            f"{spec.get('display') or spec['rel']}: {e.strerror or e}"
        sys.stderr.write(f"{why}\n")
        return 2
    sys.stdout.flush()
    view = memoryview(header + b"\n")
    while view:
        view = view[os.write(1, view):]
    os.execvp("tar", ["tar", "-c", "-f", "-", "--format=posix",
                      "--pax-option=delete=atime,delete=ctime", "--", name])
    return 127  # not reached


def probe(spec: dict) -> dict:
    """What a node holds after its unpacker went silent: ``{"tree", "path"}``.

    ``tree`` is ``"partial"`` when this run's temporary directory (``.NAME.chiba-tmp-JOB``)
    is there (``path`` names it), else ``"none"``. Walks like :func:`extract`, creates
    nothing, takes no lock (it reads two names). Raises BeneathError when the parent
    cannot be walked.
    """
    from inventory.beneath import BeneathError, open_dir_beneath, open_root

    parent_rel, _, name = spec["rel"].rpartition("/")
    shown_parent = (spec.get("display") or spec["rel"]).rpartition("/")[0] or "/"
    tmp = _own(name, _TMP, spec["job"])
    root = open_root(spec["root"])
    try:
        parent = open_dir_beneath(root, parent_rel, display=spec["root"])
    except BeneathError as e:
        if e.errno == 2:  # the parent is not there: nothing of this run either
            return {"tree": "none", "path": None}
        raise
    finally:
        os.close(root)
    try:
        if _exists(parent, tmp):
            return {"tree": "partial", "path": f"{shown_parent.rstrip('/')}/{tmp}"}
        return {"tree": "none", "path": None}
    finally:
        os.close(parent)


def node_main(action: str, spec_json: str) -> int:
    """``transit_agent extract|pack|probe|check SPEC``: the node-side (and home-side) half."""
    spec = json.loads(spec_json)
    if action == "pack":
        return pack_to_stdout(spec)
    if action in ("probe", "check", "check-dest"):
        got = {"probe": probe, "check": check_path, "check-dest": check_dest}[action](spec)
        sys.stdout.write(RESULT_TAG + json.dumps(got) + "\n")
        return 0
    if spec.get("input", "-") == "-":
        res = extract(spec, sys.stdin.buffer)
    else:
        with open(spec["input"], "rb") as f:
            res = extract(spec, f)
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] else 1


def node_result(r) -> dict | None:
    """The tagged result line of a node's ``extract`` (a RunResult), or None when missing."""
    for line in r.out.splitlines():
        if line.startswith(RESULT_TAG):
            try:
                return json.loads(line[len(RESULT_TAG):])
            except ValueError:
                return None
    return None


def run_plan(plan: dict) -> dict:
    """Carry out one level of the fan-out; returns {"rc", "seconds", "hosts": {...}}."""
    from .fanout import compact_rc, window
    from .transport import UNREACHABLE, RunResult, transport_for

    t0 = time.monotonic()
    action = plan["action"]
    timeout = plan.get("timeout")
    children = [(_from_record(c["host"]), c) for c in plan["children"]]
    by_name = {h.name: c for h, c in children}
    transport = transport_for(plan["kind"])

    def one(h: AgentHost) -> dict:
        c = by_name[h.name]
        s = time.monotonic()
        why = None
        if action == "push":
            try:
                n = transport.put(h, plan["file"], c["remote"])
                r = RunResult(h.name, 0)
            except Exception as e:  # TransportError names the host and path
                n, r = 0, RunResult(h.name, UNREACHABLE, error=str(e))
        elif action in ("unpack", "check-dest"):
            # the node's own agent unpacks by descriptor (node_main), or says what it would
            # do (check-dest, stage --dry-run); its timeout is its own, this one only stops
            # a node that never answers
            limit = timeout + 30 if timeout else None
            if action == "check-dest" or plan.get("mode") == "read":  # nothing on stdin,
                r = transport.run(h, c["argv"], timeout=limit)  # or the tar on the mayor's disk
            else:  # the mayor streams the tar into the node's unpacker
                with open(plan["file"], "rb") as f:
                    r = transport.run(h, c["argv"], timeout=limit, stdin=f)
            got = node_result(r)
            n = plan.get("bytes", 0) if r.ok else 0
            if got is not None:
                return {**got, "rc": r.rc, "bytes": n, "seconds": round(time.monotonic() - s, 6),
                        "end": round(time.monotonic() - t0, 6)}
            return {"ok": False, "rc": UNREACHABLE if r.error or r.ok else r.rc,
                    "error": r.reason() or "the node's unpacker printed no result",
                    "tree": "unknown", "path": None, "previous": None, "bytes": 0,
                    "seconds": round(time.monotonic() - s, 6),
                    "end": round(time.monotonic() - t0, 6)}
        else:
            raise ValueError(f"unknown action {action!r}")
        return {"ok": r.ok, "rc": UNREACHABLE if r.error else r.rc, "error": why or r.reason() or None,
                "bytes": n, "seconds": round(time.monotonic() - s, 6),
                "end": round(time.monotonic() - t0, 6)}

    try:
        got = window([h for h, _ in children], one, int(plan.get("fanout", 32)))
    finally:
        transport.close()
    hosts = {}
    for name, r in got.items():
        hosts[name] = r.value if r.ok else {
            "ok": False, "rc": UNREACHABLE, "error": r.error, "bytes": 0, "seconds": 0.0,
            "end": round(time.monotonic() - t0, 6)}
    return {"rc": compact_rc(h["rc"] for h in hosts.values()),
            "seconds": round(time.monotonic() - t0, 6), "hosts": hosts}


def main(argv: list[str] | None = None) -> int:
    """Read the plan from stdin, run it, print one tagged JSON line, exit with the compacted rc.

    ``extract SPEC`` and ``pack SPEC`` (JSON) run the node-side half instead (node_main).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        return node_main(argv[0], argv[1])
    try:
        plan = json.load(sys.stdin)
        result = run_plan(plan)
    except Exception as e:  # the caller fails every child of this level with this reason
        sys.stderr.write(f"transit agent on {os.environ.get('CHIBA_HOST', '?')}: "
                         f"{type(e).__name__}: {e}\n")
        return 255
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
    return min(int(result["rc"]), 255)


if __name__ == "__main__":
    sys.exit(main())
