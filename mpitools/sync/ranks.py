"""mpisync's rank side: walk, agree, plan, reduce needs, stream each group, apply, report.

Rank 0 holds the source; every other rank is a target. The steps follow mpiFileUtils'
dsync, one phase function each, every phase ending in a collective all ranks take part in
(the state they pass along is one ``_Sync``):

1. ``_scan_source``: the root inventories the source; all agree on its verdict;
2. ``_share_inventory``: the root broadcasts the inventory;
3. ``_plan``: each target inventories its destination and plans; the root gathers the
   plans with their need bitmaps;
4. ``_group``: files needed by the same set of targets form one group; all agree on them;
5. ``_transfer``: each group is streamed once down a pipelined chain over a
   sub-communicator of the root and just those targets (``Comm.Split``, one per group);
   targets write to temporary names and rename into place;
6. ``_apply``: targets make links, delete (only if asked and safe) and set metadata; the
   root gathers their outcomes and ``_report`` shapes the result.

A target that fails locally keeps taking part in every collective, so the others complete.
``main`` runs on any intracommunicator it is given (rank 0 the source) and never ends the
process (save the test hook that simulates a target's crash): only ``rank_main`` aborts
or finalises.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mpi4py

from chiba_admin.errors import ChibaError, InvalidRequest
from inventory import (DestTree, Inventory, check_source, decode_inventory, delete_extraneous,
                       encode_inventory, finalize, format_plan, group_bitmaps, hash_file,
                       make_dirs, make_plan, make_symlinks, needs_bitmap, scan)
from inventory.apply import ApplyResult, Conflict, new_tmp_tag, tmp_target
from inventory.entries import decode_path, encode_path
from inventory.beneath import (BeneathError, clean_staged_leftovers, lock_dest,
                               open_dir_beneath, open_root, split_rel, unlock_dest)
from inventory.entries import DIR
from inventory.plan import WRITE

from mpitools.common.chain import chain_frames, chain_send
from mpitools.common.faults import NONE, Faults
from mpitools.common.runtime import PeerLost, emit, rank_hosts, rank_main, wait

# the thread level rank_main asks for: importing mpi4py.MPI initialises MPI, and this module
# is imported before rank_main runs (no thread of a sync rank calls MPI)
mpi4py.rc.thread_level = "funneled"
from mpi4py import MPI  # noqa: E402

__all__ = ["main", "run_sync", "PIECE", "pack_frames", "iter_pieces", "MAX_PIECES"]

# One piece of one file inside a frame. ``last`` marks a file's final piece; ``bad`` says
# the root could not read the file, so receivers drop what they have of it.
# file index, offset, length, flags; packed, little-endian
PIECE = struct.Struct("<IQIB")
_LAST, _BAD = 1, 2
MAX_PIECES = 128  # small files share a frame: 3,000 files are a few dozen messages
_HDR = struct.Struct("<I")
_SLACK = 64  # room for MPI's own header, so a whole frame stays under the eager limit


def _max_frame(chunk: int) -> int:
    return chunk


def _payload_budget(chunk: int) -> int:
    """Payload bytes per frame, so header + payload never exceed ``chunk``."""
    budget = chunk - _HDR.size - MAX_PIECES * PIECE.size - _SLACK
    if budget < 4096:
        raise ValueError(f"chunk of {chunk} bytes is too small (at least 8 KiB)")
    return budget


# -- root: frames from files ---------------------------------------------------------------
def pack_frames(src_root: str, files: list, indices: list[int], chunk: int,
                errors: list[str]) -> Iterator[bytes]:
    """Frames carrying the files ``indices`` (into ``files``) read once from ``src_root``.

    Each frame is ``u32 header length | PIECE array | payload`` with at most ``chunk``
    payload bytes; small files share a frame and large ones span several.
    """
    pieces: list[tuple[int, int, int, int]] = []
    payload = bytearray()
    chunk = _payload_budget(chunk)

    def flush() -> bytes:
        hdr = b"".join(PIECE.pack(*p) for p in pieces)
        frame = _HDR.pack(len(hdr)) + hdr + bytes(payload)
        pieces.clear()
        payload.clear()
        return frame

    for idx in indices:
        entry = files[idx]
        try:
            fd = os.open(os.path.join(src_root, entry.path),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            errors.append(f"{entry.path}: cannot read source file: {exc.strerror}")
            if len(pieces) >= MAX_PIECES:
                yield flush()
            pieces.append((idx, 0, 0, _LAST | _BAD))
            continue
        try:
            offset, remaining = 0, entry.size
            while True:
                room = chunk - len(payload)
                if room <= 0 or len(pieces) >= MAX_PIECES:
                    yield flush()
                    room = chunk
                data = os.read(fd, min(room, remaining)) if remaining else b""
                remaining -= len(data)
                # a file that shrank since the scan ends early; receivers see the short
                # size and refuse it rather than commit a truncated file
                last = remaining == 0 or not data
                pieces.append((idx, offset, len(data), _LAST if last else 0))
                payload += data
                offset += len(data)
                if last:
                    break
        finally:
            os.close(fd)
    if pieces:
        yield flush()


# -- targets: pieces from frames -------------------------------------------------------------
def iter_pieces(frames: Iterator[memoryview]) -> Iterator[tuple[int, int, memoryview, int]]:
    """(file index, offset, data, flags) for every piece of every frame, in order."""
    for frame in frames:
        (hlen,) = _HDR.unpack_from(frame)
        pos = _HDR.size + hlen
        for idx, offset, length, flags in PIECE.iter_unpack(frame[_HDR.size:pos]):
            yield idx, offset, frame[pos:pos + length], flags
            pos += length


class _Target:
    """A target's local state: its plan, destination tree, counters, conflicts, first error.

    The destination is ``root`` (from the topology, trusted) + ``rel`` (confined by the
    CLI): every component of ``rel`` is opened without following symlinks, and a real run
    holds the destination's lock (inventory.beneath) from before the scan to the end.
    A dry run creates, locks and removes nothing.
    """

    def __init__(self, host: str, dest: dict, source: Inventory, opts: dict):
        self.host, self.source, self.opts = host, source, opts
        self.root, self.rel = dest["root"], dest["rel"]
        self.dest = os.path.join(self.root, self.rel) if self.rel else self.root
        self.error: str | None = None
        self.conflicts: list[str] = []
        self.plan = None
        self.tree: DestTree | None = None
        self.writes: dict[str, object] = {}
        self.got: set[str] = set()
        self.unplaced: set[str] = set()  # received, but a conflict kept the old entry
        self._parent_fd = self._lock_fd = -1
        self._name = ""
        self.created = False
        self.faults = NONE  # fault injection (tests): the job's rules for this rank
        self.stats = {"created": 0, "updated": 0, "deleted": 0, "meta": 0,
                      "bytes_received": 0, "files_received": 0, "temps_removed": 0}

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = (str(exc) if isinstance(exc, (ChibaError, BeneathError))
                          else f"{self.dest}: {exc}")

    def _open(self) -> int | None:
        """The destination's fd (locked unless dry run); None when a dry run finds it missing."""
        dry = self.opts["dry_run"]
        try:
            if self.rel:
                parts = split_rel(self.rel)
                self._name = parts[-1]
                root_fd = open_root(self.root)
                try:
                    self._parent_fd = open_dir_beneath(root_fd, "/".join(parts[:-1]),
                                                       create=not dry, display=self.root)
                finally:
                    os.close(root_fd)
            else:  # the repository itself: its lock sits beside it, in its parent
                self._name = os.path.basename(self.root)
                self._parent_fd = open_root(os.path.dirname(self.root))
            if not dry:
                self._lock_fd = lock_dest(self._parent_fd, self._name,
                                          display=os.path.dirname(self.dest))
                # a stage's or collect's mark_staged killed there
                clean_staged_leftovers(self._parent_fd, self._name, self._lock_fd)
            if self.rel:
                try:
                    os.stat(self._name, dir_fd=self._parent_fd, follow_symlinks=False)
                except FileNotFoundError:
                    self.created = not dry  # a new destination: planned as the dry run plans it
                return open_dir_beneath(self._parent_fd, self._name, create=not dry,
                                        display=os.path.dirname(self.dest))
            return open_root(self.root)
        except BeneathError as exc:
            if dry and exc.errno == errno.ENOENT:
                return None
            raise

    def _scan(self, fd: int) -> Inventory:
        # /proc/self/fd/N is the directory opened beneath the root: the scan starts there
        # whatever has been done to the path since
        src = self.source
        inv = scan(f"/proc/self/fd/{fd}", excludes=self.opts["excludes"],
                   checksum=self.opts["checksum"], algo=src.algo or "blake3")
        inv.root = self.dest
        return inv

    def plan_needs(self) -> bytes:
        src = self.source
        try:
            fd = self._open()
            if fd is None:
                target = Inventory(root=self.dest, algo=src.algo if self.opts["checksum"]
                                   else None)
            else:
                if not self.opts["dry_run"]:
                    self.tree = DestTree(self.dest, root_fd=os.dup(fd),
                                         tmp_tag=self.opts["tmp_tag"], owners=self.opts["owners"])
                try:
                    target = self._scan(fd)
                    if self._drop_stale_temps(target) and self.tree is not None:
                        target = self._scan(fd)  # their directories' times changed
                    if self.created:
                        target.root_meta = None
                finally:
                    os.close(fd)
            self.plan = make_plan(src, target, delete=self.opts["delete"],
                                  checksum=self.opts["checksum"], owners=self.opts["owners"],
                                  allow_empty=True)
            self.conflicts = list(self.plan.conflicts)
            self.writes = {a.path: a for a in self.plan.actions if a.op == WRITE}
            return needs_bitmap(src, self.writes)
        except (ChibaError, OSError) as exc:
            self.fail(exc)
            return needs_bitmap(src, ())

    def _drop_stale_temps(self, target: Inventory) -> int:
        """Temporary files of a killed run: exact names only, never a source path, and
        removed only by a run holding the lock (no live run can own them then). A dry
        run leaves them and only keeps them out of its plan, as the real run would."""
        stale = [e for p, e in target.entries.items()
                 if e.kind != DIR and p not in self.source.entries and self._beside_source(p)]
        for e in stale:
            del target.entries[e.path]
            if self.tree is not None:
                self.tree.delete(e.path, e.kind)
        self.stats["temps_removed"] = len(stale) if self.tree is not None else 0
        return len(stale)

    def _beside_source(self, path: str) -> bool:
        """A dead run's temp file sits beside the file that run was writing, which the
        source has; a temp-shaped name beside nothing of the source is a user's file
        (the tool itself may have synced it there as data) and is left alone."""
        d, _, base = path.rpartition("/")
        stem = tmp_target(base)
        if stem is None:
            return False
        prefix = f"{d}/" if d else ""
        if len(stem) < 200:
            return prefix + decode_path(stem) in self.source.entries
        return any(p.startswith(prefix) and "/" not in p[len(prefix):]
                   and encode_path(p[len(prefix):]).startswith(stem)
                   for p in self.source.entries)

    def _took(self, res: ApplyResult) -> None:
        self.conflicts.extend(res.conflicts)

    def prepare(self) -> None:
        if self.error or self.opts["dry_run"] or self.tree is None:
            return
        try:
            made = make_dirs(self.tree, self.plan)  # clears, then mkdirs
            self._took(made)
            self.stats["created"] += made.created  # new directories count, as rsync lists them
            self.stats["deleted"] += made.deleted
        except (ChibaError, OSError) as exc:
            self.fail(exc)

    def receive(self, frames: Iterator[memoryview]) -> None:
        """Write every file of one group's stream; after a failure, only drain the stream."""
        files = self.source.files()
        pieces = iter_pieces(frames)
        for idx, _offset, data, flags in pieces:
            self.stats["bytes_received"] += len(data)
            if flags & _LAST and (flags & _BAD or self.error):
                continue
            rel = files[idx].path
            stream = _file_stream(data, flags, pieces, self.stats)
            if self.error or self.tree is None:
                for _ in stream:
                    pass
                continue
            a = self.writes.get(rel)
            try:
                if a is None:
                    raise ChibaError(f"received {rel!r}, which this target did not ask for")
                self.tree.write_file(rel, stream, a.mode, a.mtime_ns, size=a.size,
                                     replace=a.replace, uid=a.uid, gid=a.gid)
                self.stats["files_received"] += 1
                self.got.add(rel)
                self.faults.checkpoint("sync.file", len(self.got))  # a node dying here
                self.stats["created" if a.changes == "+" else "updated"] += 1
            except Conflict as exc:  # a directory in the way got members: keep it, report
                self.unplaced.add(rel)
                self.conflicts.append(f"{rel}: {exc.what}")
            except (ChibaError, OSError) as exc:
                self.fail(exc if isinstance(exc, ChibaError)
                          else ChibaError(f"cannot write: {exc.strerror or exc}",
                                          where=os.path.join(self.dest, rel)))
            for _ in stream:  # the rest of a file whose write failed
                pass

    def finish(self) -> None:
        if self.error or self.tree is None:
            return
        try:
            missing = [p for p in self.writes if p not in self.got and p not in self.unplaced]
            if missing:
                raise ChibaError(f"{len(missing)} file(s) not received, first {missing[0]!r}",
                                 where=self.dest, hint="the source could not read them; "
                                 "see the source errors and rerun")
            made = make_symlinks(self.tree, self.plan)
            self._took(made)
            self.stats["created"] += made.created
            self.stats["updated"] += made.updated
            if self.opts["verify"]:
                self._verify()
            gone = delete_extraneous(self.tree, self.plan)
            self.stats["deleted"] += gone.deleted
            fixed = finalize(self.tree, self.plan)
            self._took(fixed)
            self.stats["meta"] += fixed.meta
        except (ChibaError, OSError) as exc:
            self.fail(exc)

    def _verify(self) -> None:
        src = self.source
        for rel in self.got:
            want = src.entries[rel].digest
            got = hash_file(f"/proc/self/fd/{self.tree.dir_fd('')}/{rel}", src.algo)
            if want is not None and got != want:
                raise ChibaError("content differs from the source after transfer",
                                 where=os.path.join(self.dest, rel),
                                 hint="check the target's disk and rerun")

    def close(self) -> None:
        if self.tree is not None:
            self.tree.close()
        if self._lock_fd >= 0:
            unlock_dest(self._parent_fd, self._name, self._lock_fd)
            self._lock_fd = -1
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
            self._parent_fd = -1


def _not_in_sync(conflicts: list[str]) -> str:
    """One line for a target left unlike its source (each conflict is listed with it)."""
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return f"not in sync: {conflicts[0]}{more}"


def _file_stream(first: memoryview, flags: int, pieces, stats) -> Iterator[memoryview]:
    """The data of one file: its first piece, then pieces pulled until the last one."""
    yield first
    while not flags & _LAST:
        _idx, _off, data, flags = next(pieces)
        stats["bytes_received"] += len(data)
        if flags & _BAD:
            raise ChibaError("the source could not read this file")
        yield data


def _counted(frames: Iterator[bytes], base: int, total: int,
             progress: Callable[[int, int], None] | None) -> Iterator[bytes]:
    done = base
    for f in frames:
        yield f
        done += len(f)
        if progress is not None:
            progress(min(done, total), total)


def run_sync(comm: MPI.Comm, spec: dict,
             progress: Callable[[int, int], None] | None = None) -> dict | None:
    """Collective: synchronise; the result dict on rank 0, None elsewhere (see _run_sync).

    An MPI error outside a point-to-point exchange (a collective with a dead rank) names
    no peer; it becomes PeerLost so the launcher's blame comes from the witnesses.
    """
    try:
        return _run_sync(comm, spec, progress)
    except MPI.Exception as e:
        raise PeerLost(_failed_rank(comm), e.Get_error_string()) from None
    except PeerLost as e:
        if e.peer is None:
            raise PeerLost(_failed_rank(comm), e.why) from None
        raise


def _failed_rank(comm: MPI.Comm) -> int | None:
    """The first rank ULFM knows to have failed (None without ULFM or when none is known)."""
    try:
        group = comm.Get_failed()
        n = group.Get_size()
        if n == 0:
            return None
        ranks = MPI.Group.Translate_ranks(group, list(range(n)), comm.Get_group())
        return min(r for r in ranks if r != MPI.UNDEFINED)
    except (MPI.Exception, NotImplementedError, AttributeError, ValueError):
        return None


@dataclass
class _Sync:
    """What one run's phases hand each other, on every rank (the phase filling each field
    is named beside it). ``comm`` is any intracommunicator: rank 0 is the source."""

    comm: MPI.Comm
    spec: dict
    opts: dict
    chunk: int  # bytes per frame
    t0: float  # time.monotonic() at the start
    phases: dict[str, float] = field(default_factory=dict)  # rank 0: seconds per phase
    src: Inventory | None = None  # _scan_source on rank 0, _share_inventory elsewhere
    files: list = field(default_factory=list)  # _share_inventory: src.files()
    me: _Target | None = None  # _plan: this rank's target (None on rank 0)
    reports: list | None = None  # _plan, rank 0: each rank's _plan_report (None for 0)
    groups: list = field(default_factory=list)  # _group: (target ranks, file indices, bytes)
    source_errors: list[str] = field(default_factory=list)  # _transfer, rank 0: unread files
    sent: int = 0  # _transfer, rank 0: payload bytes sent

    @property
    def root(self) -> bool:
        return self.comm.rank == 0


def _options(spec: dict) -> dict:
    """The run's options from the job spec, with defaults (the same on every rank)."""
    return {"delete": bool(spec.get("delete")), "checksum": bool(spec.get("checksum")),
            "verify": bool(spec.get("verify")), "dry_run": bool(spec.get("dry_run")),
            "excludes": list(spec.get("excludes", ())),
            "itemize": bool(spec.get("itemize")) or bool(spec.get("dry_run")),
            "tmp_tag": str(spec.get("tmp_tag") or new_tmp_tag()),
            # as rsync -a: numeric owners and groups are kept where the target runs as root
            "owners": os.geteuid() == 0}


def _run_sync(comm: MPI.Comm, spec: dict,
              progress: Callable[[int, int], None] | None = None) -> dict | None:
    """Collective: synchronise; returns the result dict on rank 0, None elsewhere.

    ``spec``: source (root's local path), hosts (host of each rank), dests (local dest
    path of each rank, rank 0's unused), delete, checksum, verify, dry_run, excludes, chunk
    (bytes per frame). ``progress(sent, total)`` is called on the root as payload bytes
    leave it. Each phase below ends in a collective every rank takes part in, so a target
    that failed locally still completes the run with the others.
    """
    t0 = time.monotonic()
    run = _Sync(comm, spec, _options(spec), int(spec.get("chunk", 4 << 20)), t0)
    verdict, blob = _scan_source(run)
    if verdict is not None:
        return ({"ok": False, "error": verdict[1], "error_kind": verdict[0],
                 "stage": "source scan"} if run.root else None)
    _share_inventory(run, blob)
    _plan(run)
    _group(run)
    _transfer(run, progress)
    results = _apply(run)
    return _report(run, results) if run.root else None


def _scan_source(run: _Sync) -> tuple[tuple[str, str] | None, bytes]:
    """Phase 1: the root walks the source; every rank agrees on its verdict.

    Returns ``(verdict, blob)``: verdict None, or ``("invalid", why)`` for bad input (an
    empty source with --delete, exit 2) or ``("failed", why)`` for a source the root could
    not read (exit 1, see mpitools/sync/driver.py); ``blob`` the encoded inventory (root).
    """
    comm, opts = run.comm, run.opts
    blob, verdict = b"", None
    if run.root:
        try:
            run.src = scan(run.spec["source"], excludes=opts["excludes"],
                           checksum=opts["checksum"] or opts["verify"])
            check_source(run.src, delete=opts["delete"])
            blob = encode_inventory(run.src)
        except InvalidRequest as exc:  # an empty source with --delete: bad input, exit 2
            verdict = ("invalid", str(exc))
        except ChibaError as exc:      # an unreadable source: a failure on the president
            verdict = ("failed", str(exc))
    # quiet barriers before collectives that wait on uneven work: a blocking collective
    # spins, and spinning ranks starve the ones still scanning when cores are shared
    wait(comm.Ibarrier())
    return comm.bcast(verdict if run.root else None, root=0), blob


def _share_inventory(run: _Sync, blob: bytes) -> None:
    """Phase 2: the root's inventory reaches every rank (one Bcast of its encoding)."""
    comm = run.comm
    n = comm.bcast(len(blob), root=0)
    buf = bytearray(blob) if run.root else bytearray(n)
    comm.Bcast([buf, MPI.BYTE], root=0)
    if run.root:
        run.phases["scan"] = time.monotonic() - run.t0
    else:
        run.src = decode_inventory(bytes(buf))
    run.files = run.src.files()


def _plan(run: _Sync) -> None:
    """Phase 3: each target scans its destination and plans; the root gathers the plans."""
    t1 = time.monotonic()
    comm, report = run.comm, None
    if not run.root:
        run.me = _Target(run.spec["hosts"][comm.rank], run.spec["dests"][comm.rank], run.src,
                         run.opts)
        report = _plan_report(run.me, run.me.plan_needs(), run.opts["itemize"])
    wait(comm.Ibarrier())
    run.reports = comm.gather(report, root=0)
    if run.root:
        run.phases["plan"] = time.monotonic() - t1


def _plan_report(me: _Target, bitmap: bytes, itemize: bool) -> tuple:
    """What a target tells the root: (need bitmap, error, plan text, summary, warnings)."""
    return (bitmap, me.error, format_plan(me.plan) if itemize and me.plan else None,
            me.plan.summary() if me.plan else None, list(me.plan.warnings) if me.plan else [])


def _group(run: _Sync) -> None:
    """Phase 4: the root groups files by the set of targets needing them; all agree."""
    wire = None
    if run.root:
        reports = run.reports
        bitmaps = {r: reports[r][0] for r in range(1, run.comm.size) if reports[r][1] is None}
        groups = group_bitmaps(run.src, bitmaps) if bitmaps and not run.opts["dry_run"] else []
        index = {e.path: i for i, e in enumerate(run.files)}
        wire = [(sorted(g.targets), [index[p] for p in g.paths], g.nbytes) for g in groups]
    wait(run.comm.Ibarrier())  # the root groups the files meanwhile
    run.groups = run.comm.bcast(wire, root=0)


def _transfer(run: _Sync, progress: Callable[[int, int], None] | None) -> None:
    """Phase 5: each group streamed once down a chain; a barrier ends it for everyone."""
    t2 = time.monotonic()
    if run.me is not None:
        run.me.faults = Faults.of(run.spec, run.comm.rank)
        run.me.prepare()
    total = sum(g[2] for g in run.groups)
    for ranks, indices, _nbytes in run.groups:
        _stream_group(run, ranks, indices, total, progress)
    # everyone has received everything before the root calls the transfer done
    wait(run.comm.Ibarrier())
    if run.root:
        run.phases["transfer"] = time.monotonic() - t2


def _stream_group(run: _Sync, ranks: list[int], indices: list[int], total: int,
                  progress: Callable[[int, int], None] | None) -> None:
    """One group: a sub-communicator of the root and ``ranks`` (``Comm.Split``, collective
    over ``run.comm``), down which the root streams the files ``indices``."""
    rank = run.comm.rank
    member = rank == 0 or rank in ranks
    sub = run.comm.Split(0 if member else MPI.UNDEFINED, key=rank)
    if sub == MPI.COMM_NULL:
        return
    world = [0] + sorted(ranks)  # Split by key=rank keeps the parent's order
    try:
        if rank == 0:
            frames = pack_frames(run.spec["source"], run.files, indices, run.chunk,
                                 run.source_errors)
            run.sent += chain_send(sub, _counted(frames, run.sent, total, progress),
                                   world=world)
        else:
            run.me.receive(chain_frames(sub, _max_frame(run.chunk), world=world))
    finally:
        sub.Free()


def _apply(run: _Sync) -> list | None:
    """Phase 6: targets make links, delete and set metadata; the root gathers outcomes."""
    t3 = time.monotonic()
    mine = None
    if run.me is not None:
        me = run.me
        if not run.opts["dry_run"]:
            me.finish()
        me.close()
        mine = {"host": me.host, "dest": me.dest, "ok": me.error is None and not me.conflicts,
                "in_sync": me.error is None and not me.conflicts, "conflicts": me.conflicts,
                "error": me.error, **me.stats}
    wait(run.comm.Ibarrier())
    results = run.comm.gather(mine, root=0)
    if run.root:
        run.phases["finish"] = time.monotonic() - t3
    return results


def _report(run: _Sync, results: list) -> dict:
    """The root's result: each target's outcome with its plan, failures, source errors."""
    hosts = {}
    for r in range(1, run.comm.size):
        res = results[r]
        _bitmap, _err, plan_text, summary, warnings = run.reports[r]
        res["plan_summary"] = summary
        res["warnings"] = warnings
        if plan_text is not None:
            res["plan"] = plan_text
        hosts[res["host"]] = res
    failures = {h: r["error"] or _not_in_sync(r["conflicts"])
                for h, r in hosts.items() if not r["ok"]}
    src = run.src
    # a source that could not be read completely leaves every target unlike it (rsync 23)
    source_errors = [str(i) for i in src.errors] + run.source_errors
    return {
        "ok": not failures and not source_errors,
        "source_files": len(run.files), "source_bytes": src.total_bytes(),
        "source_warnings": [str(i) for i in src.errors],
        "source_errors": source_errors, "groups": len(run.groups),
        "bytes_sent": run.sent, "seconds": time.monotonic() - run.t0, "phases": run.phases,
        "dry_run": run.opts["dry_run"], "hosts": hosts, "failures": failures,
    }


def main(comm, job: dict) -> int:
    """Run one synchronisation; rank 0 emits progress events and the result event."""
    hosts = rank_hosts(job)
    # each target's {"root", "rel"} (confined by the CLI); rank 0, the source, has none
    spec = {**job, "hosts": hosts, "dests": [job["dests"].get(h) for h in hosts]}
    last = [0.0]

    def progress(sent: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25 or sent >= total:
            last[0] = now
            emit("progress", done=sent, total=total)

    if comm.rank == 0:
        emit("start", ranks=comm.size)
    result = run_sync(comm, spec, progress=progress if comm.rank == 0 else None)
    if comm.rank == 0:
        emit("result", **result)
    return 0


if __name__ == "__main__":
    rank_main(main)
