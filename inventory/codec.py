"""Compact, versioned binary encoding of an Inventory, with a decoder that distrusts its input."""

from __future__ import annotations

import json
import struct
import sys
from array import array

import zstandard

from chiba_admin.errors import InventoryError

from .entries import DIR, FIFO, FILE, LINK, SOCK, Entry, Inventory, Issue, decode_path, encode_path
from .hashing import digest_size

__all__ = ["MAGIC", "FORMAT_VERSION", "MAX_DECODED", "encode_inventory", "decode_inventory"]

MAGIC = b"CHIBAINV"
FORMAT_VERSION = 2  # 2: FIFO and socket kinds, numeric uid and gid columns
MAX_DECODED = 1 << 30  # refuse to inflate more than this: a hostile frame must not eat RAM
# magic, version, flags, algo id, reserved, body length, compressed length
_HEADER = struct.Struct("<8sBBBBQQ")
_COUNTS = struct.Struct("<IIIII")  # entries, links, errors, skipped, root length
_ROOT_META = struct.Struct("<BHqII")  # present, mode, mtime_ns, uid, gid of the root dir
_FLAG_DIGESTS = 1
_ALGO_IDS = {None: 0, "blake3": 1, "xxh3_128": 2}
_ALGO_NAMES = {v: k for k, v in _ALGO_IDS.items()}
_KIND_CODES = {FILE: 0, DIR: 1, LINK: 2, FIFO: 3, SOCK: 4}
_KIND_NAMES = (FILE, DIR, LINK, FIFO, SOCK)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1
    while lo < hi:  # binary search on C-level slice compares beats a Python byte loop
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# Little-endian columns through the standard library's array (no numpy: every mpisync
# target decodes an inventory, and importing numpy cost each rank 0.16 s of CPU).
_CODES = {"<u4": "I", "<u2": "H", "u1": "B", "<u8": "Q", "<i8": "q"}
_SIZES = {"<u4": 4, "<u2": 2, "u1": 1, "<u8": 8, "<i8": 8}
assert all(array(_CODES[t]).itemsize == n for t, n in _SIZES.items())
_SWAP = sys.byteorder == "big"


def _column_bytes(values: list[int], dtype: str) -> bytes:
    a = array(_CODES[dtype], values)  # out-of-range values raise instead of wrapping
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def _column(raw: bytes, dtype: str) -> list[int]:
    a = array(_CODES[dtype])
    a.frombytes(raw)
    if _SWAP:
        a.byteswap()
    return a.tolist()


def _shuffle(values: list[int], dtype: str) -> bytes:
    # Grouping byte k of every value together turns slowly varying columns into long runs.
    raw, k, n = _column_bytes(values, dtype), _SIZES[dtype], len(values)
    out = bytearray(len(raw))
    for j in range(k):
        out[j * n:(j + 1) * n] = raw[j::k]
    return bytes(out)


def _unshuffle(raw: bytes, n: int, dtype: str) -> list[int]:
    k = _SIZES[dtype]
    out = bytearray(n * k)
    for j in range(k):
        out[j::k] = raw[j * n:(j + 1) * n]
    return _column(bytes(out), dtype)


def encode_inventory(inv: Inventory, *, level: int = 9) -> bytes:
    """Bytes for broadcasting ``inv``: header + one zstd frame of columnar, prefix-shared data."""
    entries = list(inv.entries.values())
    n = len(entries)
    has_digests = inv.algo is not None
    dlen = digest_size(inv.algo) if has_digests else 0
    shared, suflen, kinds, modes, sizes, mtimes, uids, gids = ([0] * n for _ in range(8))
    suffixes: list[bytes] = []
    targets: list[bytes] = []
    digests: list[bytes] = []
    prev = b""
    for i, e in enumerate(entries):
        raw = encode_path(e.path)
        k = _common_prefix(prev, raw)
        shared[i], suflen[i] = k, len(raw) - k
        suffixes.append(raw[k:])
        prev = raw
        kinds[i] = _KIND_CODES[e.kind]
        modes[i] = e.mode
        sizes[i] = e.size
        mtimes[i] = e.mtime_ns
        uids[i] = e.uid
        gids[i] = e.gid
        if e.kind == LINK:
            targets.append(encode_path(e.target or ""))
        elif e.kind == FILE and has_digests:
            if e.digest is None or len(e.digest) != dlen:
                raise InventoryError("file without a digest in a hashed inventory", where=e.path,
                                     hint="rescan with checksum=True")
            digests.append(e.digest)
    root = encode_path(inv.root)
    rm = inv.root_meta
    issues = json.dumps([[i.path, i.message] for i in inv.errors]
                        + [[i.path, i.message] for i in inv.skipped]).encode("ascii")
    body = b"".join([
        _COUNTS.pack(n, len(targets), len(inv.errors), len(inv.skipped), len(root)), root,
        _ROOT_META.pack(1, rm.mode, rm.mtime_ns, rm.uid, rm.gid) if rm is not None
        else _ROOT_META.pack(0, 0, 0, 0, 0),
        _column_bytes(shared, "<u4"), _column_bytes(suflen, "<u4"), b"".join(suffixes),
        _column_bytes(kinds, "u1"), _column_bytes(modes, "<u2"), _shuffle(sizes, "<u8"),
        _shuffle(mtimes, "<i8"), _shuffle(uids, "<u4"), _shuffle(gids, "<u4"),
        _column_bytes([len(t) for t in targets], "<u4"),
        b"".join(targets),
        b"".join(digests), struct.pack("<I", len(issues)), issues,
    ])
    frame = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                     write_content_size=True).compress(body)
    flags = _FLAG_DIGESTS if has_digests else 0
    return _HEADER.pack(MAGIC, FORMAT_VERSION, flags, _ALGO_IDS[inv.algo], 0, len(body),
                        len(frame)) + frame


class _Reader:
    """Bounds-checked cursor: every overrun is a clear 'truncated' error, never an IndexError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise _corrupt(f"truncated {what}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def column(self, n: int, dtype: str, what: str) -> list[int]:
        return _column(self.take(n * _SIZES[dtype], what), dtype)


def _corrupt(what: str, where: str | None = None) -> InventoryError:
    return InventoryError(f"corrupt inventory: {what}", where=where,
                          hint="re-send it; if this persists the sender is broken or hostile")


def _decompress(frame: bytes, limit: int) -> bytes:
    """The frame's content, read 1 MiB at a time: ``decompress(max_output_size=limit)``
    allocated the size the header claims before decoding a byte (a mutated header of 40
    bytes made it ask for hundreds of MB: MemoryError, not InventoryError). Raises
    InventoryError when the content is longer than ``limit``."""
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
        while piece := reader.read(1 << 20):
            out += piece
            if len(out) > limit:
                raise _corrupt("body longer than its header says")
    return bytes(out)


def decode_inventory(data: bytes | bytearray | memoryview, *,
                     max_decoded: int = MAX_DECODED) -> Inventory:
    """Inverse of encode_inventory. Rejects anything malformed or unsafe with InventoryError:
    bad magic/version, truncation, checksum failure, absolute or climbing paths, empty
    components, duplicates, children of symlinks or of files, children before parents."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise _corrupt("shorter than its header")
    magic, version, flags, algo_id, _res, body_len, frame_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InventoryError("not a chiba inventory (bad magic)", hint="check what was sent")
    if version != FORMAT_VERSION:
        raise InventoryError(f"unsupported inventory format version {version}",
                             hint=f"this build reads version {FORMAT_VERSION}; upgrade the older side")
    if algo_id not in _ALGO_NAMES or bool(flags & _FLAG_DIGESTS) != (algo_id != 0) or flags & ~1:
        raise _corrupt("bad flags or hash algorithm id")
    if body_len > max_decoded:
        raise _corrupt(f"claims {body_len} bytes, more than the {max_decoded} allowed")
    if len(data) != _HEADER.size + frame_len:
        # Truncated or padded: either way not what the sender produced.
        raise _corrupt(f"{len(data) - _HEADER.size} body bytes where the header says {frame_len}")
    try:
        body = _decompress(data[_HEADER.size:], body_len)
    except zstandard.ZstdError as exc:
        raise _corrupt(f"compressed body does not decode ({exc})") from exc
    if len(body) != body_len:
        raise _corrupt("body length differs from header")
    algo = _ALGO_NAMES[algo_id]
    try:
        inv = _parse_body(_Reader(body), algo)
    except (ValueError, UnicodeError, struct.error, RecursionError) as exc:
        raise _corrupt(str(exc)) from exc
    return inv


def _parse_body(r: _Reader, algo: str | None) -> Inventory:
    n, n_links, n_err, n_skip, root_len = _COUNTS.unpack(r.take(_COUNTS.size, "counts"))
    if n_links > n:
        raise _corrupt("more links than entries")
    root = decode_path(r.take(root_len, "root"))
    has_rm, rmode, rmtime, ruid, rgid = _ROOT_META.unpack(r.take(_ROOT_META.size, "root meta"))
    if has_rm > 1 or rmode > 0o7777:
        raise _corrupt("bad root metadata")
    root_meta = Entry("", DIR, 0, rmode, rmtime, None, None, ruid, rgid) if has_rm else None
    shared = r.column(n, "<u4", "path prefixes")
    suflen = r.column(n, "<u4", "path lengths")
    blob = r.take(sum(suflen), "paths")
    kinds = r.column(n, "u1", "kinds")
    modes = r.column(n, "<u2", "modes")
    sizes = _unshuffle(r.take(8 * n, "sizes"), n, "<u8")
    mtimes = _unshuffle(r.take(8 * n, "mtimes"), n, "<i8")
    uids = _unshuffle(r.take(4 * n, "uids"), n, "<u4")
    gids = _unshuffle(r.take(4 * n, "gids"), n, "<u4")
    tlens = r.column(n_links, "<u4", "link lengths")
    tblob = r.take(sum(tlens), "link targets")
    if kinds.count(2) != n_links:
        raise _corrupt("link count does not match kinds")
    n_files = kinds.count(0)
    dlen = digest_size(algo) if algo else 0
    dblob = r.take(dlen * n_files, "digests")
    (ilen,) = struct.unpack("<I", r.take(4, "issue length"))
    issues = json.loads(r.take(ilen, "issues").decode("ascii"))
    if r.pos != len(r.buf):
        raise _corrupt("trailing bytes after the issues")
    if (not isinstance(issues, list) or len(issues) != n_err + n_skip
            or not all(isinstance(i, list) and len(i) == 2 and all(isinstance(x, str) for x in i)
                       for i in issues)):
        raise _corrupt("malformed issue list")

    raws = _rebuild_paths(shared, suflen, blob)
    # One C-level scan of all paths finds any unsafe one; only then go looking for which.
    joined = b"\0" + b"\0".join(raws) + b"\0"
    suspicious = (b"\0" in blob or any(bad in joined for bad in _BAD_SEQUENCES)
                  or len(set(raws)) != n)
    table: dict[str, Entry] = {}
    kind_of: dict[bytes, int] = {}
    tpos = tsum = dpos = 0
    for i, raw in enumerate(raws):
        kind = kinds[i]
        if kind > 4:
            raise _corrupt(f"unknown entry kind {kind}", decode_path(raw))
        if suspicious:
            _check_raw_path(raw, kind_of)
        cut = raw.rfind(b"/")
        if cut > 0 and kind_of.get(raw[:cut]) != 1:
            _check_raw_path(raw, kind_of)  # raises the precise parent error
        kind_of[raw] = kind
        if modes[i] > 0o7777:
            raise _corrupt("mode out of range", decode_path(raw))
        target = digest = None
        if kind == 2:
            tl = tlens[tpos]
            rawt = tblob[tsum:tsum + tl]
            if not rawt or b"\0" in rawt:
                raise _corrupt("empty or NUL-bearing symlink target", decode_path(raw))
            target = decode_path(rawt)
            tsum += tl
            tpos += 1
        elif kind == 0 and dlen:
            digest = dblob[dpos:dpos + dlen]
            dpos += dlen
        path = decode_path(raw)
        table[path] = Entry(path, _KIND_NAMES[kind], sizes[i], modes[i], mtimes[i], target, digest,
                            uids[i], gids[i])
    errors = [Issue(p, m) for p, m in issues[:n_err]]
    skipped = [Issue(p, m) for p, m in issues[n_err:]]
    return Inventory(table, errors, skipped, root=root, algo=algo, root_meta=root_meta)


_BAD_SEQUENCES = (b"\0/", b"/\0", b"//", b"\0\0", b"/./", b"/../", b"\0./", b"\0../",
                  b"/.\0", b"/..\0", b"\0.\0", b"\0..\0")


def _rebuild_paths(shared: list[int], suflen: list[int], blob: bytes) -> list[bytes]:
    out: list[bytes] = []
    prev = b""
    pos = 0
    for i, (k, ln) in enumerate(zip(shared, suflen)):
        if k > len(prev):
            raise _corrupt(f"entry {i} shares more than the previous path")
        prev = prev[:k] + blob[pos:pos + ln]
        pos += ln
        out.append(prev)
    return out


def _check_raw_path(raw: bytes, kind_of: dict[bytes, int]) -> None:
    if not raw:
        raise InventoryError("empty path in inventory", hint="inventory is corrupt or hostile")
    if raw.startswith(b"/"):
        raise InventoryError("absolute path in inventory", where=decode_path(raw),
                             hint="inventories hold paths relative to their root")
    if b"\0" in raw:
        raise InventoryError("NUL byte in path", where=repr(raw), hint="inventory is corrupt")
    if raw.endswith(b"/") or b"//" in raw:
        raise InventoryError("empty path component", where=decode_path(raw),
                             hint="inventory is corrupt or hostile")
    wrapped = b"/" + raw + b"/"
    if b"/../" in wrapped or b"/./" in wrapped:
        raise InventoryError("'.' or '..' path component", where=decode_path(raw),
                             hint="paths must not climb out of the root")
    if raw in kind_of:
        raise InventoryError("duplicate path in inventory", where=decode_path(raw),
                             hint="inventory is corrupt or hostile")
    cut = raw.rfind(b"/")
    if cut > 0:
        parent_kind = kind_of.get(raw[:cut])
        if parent_kind == 2:
            raise InventoryError("path goes through a symlink", where=decode_path(raw),
                                 hint="a symlinked directory must not have members; inventory is hostile")
        if parent_kind is None:
            raise InventoryError("parent directory missing or listed after its child",
                                 where=decode_path(raw), hint="inventory is corrupt or hostile")
        if parent_kind != 1:
            raise InventoryError("parent is not a directory", where=decode_path(raw),
                                 hint="inventory is corrupt or hostile")
