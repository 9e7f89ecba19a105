"""The reference and the judge: a real ``rsync -a`` copy, per-entry fields, and readable diffs.

``tree_fields`` reduces a tree to what ``rsync -a`` promises to keep, per entry; two trees
are "the same" when ``diff_trees`` of their fields is empty. ``snapshot_hosts`` is the
stricter record used where nothing may change at all (inodes and ctimes included).
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import subprocess
import tempfile

__all__ = ["VOLATILE", "without_timings", "FIELDS", "rsync_copy", "rsync_precision", "tree_fields", "diff_trees",
           "snapshot_hosts", "diff_snapshots", "show_path"]

# "path" is presence (an entry missing or unexpected); the others compare entries present
# in both trees. Link counts are not a field: rsync -a without -H copies hard links as
# separate files, so only their content is compared.
FIELDS = ("path", "type", "content", "mode", "mtime", "target", "rdev", "owner")


def rsync_copy(src, dst) -> None:
    """Copy the contents of ``src`` into ``dst`` (created) with the real ``rsync -a``.

    ``-a`` is ``-rlptgoD``: as root it keeps owners, groups, devices and specials (FIFOs,
    sockets); otherwise owners fall back to the caller and devices are skipped.
    Raises ``subprocess.CalledProcessError`` (with rsync's stderr) if rsync fails.
    """
    subprocess.run(["rsync", "-a", "--", os.fspath(src).rstrip("/") + "/",
                    os.fspath(dst).rstrip("/") + "/"], check=True, capture_output=True)


@functools.cache
def rsync_precision() -> tuple[int, bool]:
    """(mtime precision in ns that ``rsync -a`` keeps here, whether it keeps symlink mtimes).

    Probed once with the real rsync on this file system: rsync 3.1+ on Linux keeps
    nanoseconds and, through lutimes, symlink times; older ones kept seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "s"), os.path.join(tmp, "d")
        os.mkdir(src)
        open(os.path.join(src, "f"), "w").close()
        os.symlink("f", os.path.join(src, "l"))
        t = 1_000_000_000_123_456_789
        os.utime(os.path.join(src, "f"), ns=(t, t))
        os.utime(os.path.join(src, "l"), ns=(t, t), follow_symlinks=False)
        rsync_copy(src, dst)
        got = os.stat(os.path.join(dst, "f")).st_mtime_ns
        link = os.lstat(os.path.join(dst, "l")).st_mtime_ns
    precision = next(p for p in (1, 1000, 10**9) if got // p == t // p)
    return precision, link // precision == t // precision


def _type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "char device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return f"unknown type {stat.S_IFMT(mode):o}"


def _content(path: bytes, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{size} bytes sha256:{h.hexdigest()[:16]}"


def tree_fields(root, *, owners: bool | None = None) -> dict[bytes, dict[str, object]]:
    """Per entry of the tree at ``root`` (``b"."`` is the root itself), the fields rsync keeps.

    Keys are relative bytes paths; values map field name -> value: ``type`` (file, dir,
    symlink, fifo, socket, char device, block device), ``content`` (size and sha256 of a
    regular file), ``mode`` (permission bits with setuid/setgid/sticky, octal string;
    not for symlinks, whose mode Linux fixes at 0777), ``mtime`` (ns, truncated to the
    precision rsync keeps; for symlinks only where rsync keeps them), ``target`` (a
    symlink's target, bytes, never followed), ``rdev`` of devices, and ``owner``
    (``"uid:gid"``) when ``owners`` (default: running as root, the only case in which
    rsync -a keeps them). Raises ``FileNotFoundError`` if ``root`` does not exist.
    """
    precision, link_times = rsync_precision()
    if owners is None:
        owners = os.geteuid() == 0
    out: dict[bytes, dict[str, object]] = {}

    def record(path: bytes, rel: bytes) -> bool:
        st = os.lstat(path)
        kind = _type(st.st_mode)
        f: dict[str, object] = {"type": kind}
        if kind == "file":
            f["content"] = _content(path, st.st_size)
        if kind != "symlink":
            f["mode"] = f"{stat.S_IMODE(st.st_mode):04o}"
        if kind != "symlink" or link_times:
            f["mtime"] = st.st_mtime_ns // precision * precision
        if kind == "symlink":
            f["target"] = os.readlink(path)
        if kind.endswith("device"):
            f["rdev"] = f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
        if owners:
            f["owner"] = f"{st.st_uid}:{st.st_gid}"
        out[rel] = f
        return kind == "dir"

    def walk(path: bytes, rel: bytes) -> None:
        for name in sorted(os.listdir(path)):
            p, r = os.path.join(path, name), (name if rel == b"." else rel + b"/" + name)
            if record(p, r):
                walk(p, r)

    broot = os.fsencode(root)
    if record(broot, b"."):
        walk(broot, b".")
    return out


def show_path(rel: bytes) -> str:
    """A path as a test report shows it: quoted, control characters and bad bytes escaped."""
    try:
        return repr(rel.decode())
    except UnicodeDecodeError:
        return repr(rel)


def _show(field: str, value: object) -> str:
    if isinstance(value, bytes):
        return show_path(value)
    if field == "mtime" and isinstance(value, int):
        return f"{value // 10**9}.{value % 10**9:09d}"  # seconds.nanoseconds
    return str(value)


def diff_trees(expected: dict, actual: dict, fields=FIELDS) -> list[str]:
    """Human-readable differences between two ``tree_fields`` results, field by field.

    One line per difference: ``PATH: missing (TYPE)``, ``PATH: unexpected (TYPE)`` (field
    ``path``) or ``PATH: FIELD: expected X, got Y``. Only ``fields`` are reported; a field
    recorded on one side only (say ``owner``) is not compared. After a type mismatch the
    entry's other fields are not compared (they differ as a consequence).
    """
    lines = []
    for rel in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(rel), actual.get(rel)
        if e is None or a is None:
            if "path" in fields:
                lines.append(f"{show_path(rel)}: " + (f"missing ({e['type']})" if a is None
                                                     else f"unexpected ({a['type']})"))
            continue
        for field in (f for f in FIELDS if f != "path"):
            if field not in e and field not in a:
                continue
            if field == "owner" and (field not in e or field not in a):
                continue
            if e.get(field) != a.get(field):
                if field in fields:
                    lines.append(f"{show_path(rel)}: {field}: expected "
                                 f"{_show(field, e.get(field))}, got {_show(field, a.get(field))}")
                if field == "type":
                    break
    return lines


def snapshot_hosts(paths) -> dict[str, dict[bytes, tuple] | None]:
    """Every entry under each of ``paths`` (host roots, or any directory), as it is now.

    ``paths`` is an iterable of paths or a mapping label -> path (say host name -> root),
    and the result maps each label (or path) to ``{relative bytes path: (type, inode,
    ctime_ns, mtime_ns, size, mode, uid, gid)}`` (``b"."`` is the root itself), or to None
    if the path does not exist. Two snapshots are equal only if nothing was created,
    removed, written, renamed, re-created or had its metadata changed (ctime moves on any
    of those); reads (atime) are not recorded.
    """
    items = paths.items() if hasattr(paths, "items") else ((p, p) for p in paths)
    snap: dict[str, dict[bytes, tuple] | None] = {}
    for label, path in items:
        path = os.fspath(path)
        if not os.path.lexists(path):
            snap[str(label)] = None
            continue
        entries = {}
        stack = [(os.fsencode(path), b".")]
        while stack:
            p, rel = stack.pop()
            st = os.lstat(p)
            entries[rel] = (_type(st.st_mode), st.st_ino, st.st_ctime_ns, st.st_mtime_ns,
                            st.st_size, f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid,
                            st.st_gid)
            if stat.S_ISDIR(st.st_mode):
                for name in os.listdir(p):
                    stack.append((os.path.join(p, name),
                                  name if rel == b"." else rel + b"/" + name))
        snap[str(label)] = entries
    return snap


_SNAP_FIELDS = ("type", "inode", "ctime", "mtime", "size", "mode", "uid", "gid")
_OPAQUE = {"inode", "ctime", "mtime"}


def diff_snapshots(before: dict, after: dict) -> list[str]:
    """What changed between two ``snapshot_hosts`` results: one line per difference."""
    lines = []
    for root in sorted(before.keys() | after.keys()):
        b, a = before.get(root), after.get(root)
        if b is None and a is None:
            continue
        b, a = b or {}, a or {}  # a root created or removed: every entry in it is listed
        for rel in sorted(b.keys() | a.keys()):
            where = f"{root}: {show_path(rel)}"
            if rel not in a:
                lines.append(f"{where}: removed ({b[rel][0]})")
            elif rel not in b:
                lines.append(f"{where}: created ({a[rel][0]})")
            else:
                # inode and times: that they moved is the news, not their values
                changed = [n if n in _OPAQUE else f"{n} {x} -> {y}"
                           for n, x, y in zip(_SNAP_FIELDS, b[rel], a[rel]) if x != y]
                if changed:
                    lines.append(f"{where}: changed " + ", ".join(changed))
    return lines


# the --json keys that differ between two runs of one request: timings, and the way the MPI
# job was launched (a fresh mpiexec or the service); nothing else may
VOLATILE = {"seconds", "sync_seconds", "launch_seconds", "phases", "throughput_bps",
            "peak_rss", "maxrss", "launch", "retried"}


def without_timings(obj):
    """``obj`` (a --json result) less its VOLATILE keys, at every depth."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj
