"""Stage-out (collect) the MPI way, from the CLI side: check the home directory, launch one
rank per node plus rank 0 on the home server, report per host."""

from __future__ import annotations

import os
import secrets
import stat
import time

from chiba_admin.errors import InvalidRequest
from chiba_admin.outcome import TransferHost, TransferRun
from chiba_admin.progress import Progress, or_silent

from mpitools.collect.ranks import entry_id
from mpitools.common.archive import COMPRESSIONS, clean_stale, temp_name
from mpitools.common.launch import LaunchResult, last_launch, launch, rank_hosts
from mpitools.common.runtime import encode_job
from mpitools.common.faults import from_environ  # tests inject faults
from mpitools.common.targets import (check_nodes, confine_all, host_rows,
                                     launch_failures)
from mpitools.stage.driver import DEFAULT_CHUNK

__all__ = ["collect_mpi", "check_collect_dest"]


def check_collect_dest(dest_dir: str, names: dict[str, str], replace: bool) -> None:
    """Refuse (InvalidRequest, exit 2) a home-server ``DIR`` that is not a directory, and a
    ``DIR/<host>/<name>`` that exists but was not made by collect (unless ``replace``) or
    whose ``DIR/<host>`` is a symlink or a file; a ``DIR`` that is a symlink
    (:func:`inventory.source.check_collect_root`), a ``<name>`` too long for collect's
    names beside it. Touches nothing."""
    from inventory.beneath import was_staged

    from inventory.source import check_collect_name, check_collect_root

    for name in set(names.values()):
        check_collect_name(name)
    check_collect_root(dest_dir)
    if os.path.lexists(dest_dir) and not os.path.isdir(dest_dir):
        raise InvalidRequest("--dest exists and is not a directory", where=dest_dir,
                         hint="name a directory (it is made when missing)")
    if not os.path.isdir(dest_dir):
        return
    for host, name in names.items():
        hdir = os.path.join(dest_dir, host)
        try:
            st = os.lstat(hdir)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidRequest("exists and is not a directory (a symlink is not followed)",
                             where=hdir, hint="remove it or pick another --dest")
        fd = os.open(hdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.path.lexists(os.path.join(hdir, name)) and not replace \
                    and not was_staged(fd, name):
                raise InvalidRequest("exists and was not created by chiba-admin collect",
                                 where=os.path.join(hdir, name),
                                 hint="pass --replace to replace it, or pick another --dest")
        finally:
            os.close(fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(dest_dir: str) -> int | None:
    """``DIR`` opened without following a symlink there (rank 0 refuses one), or None."""
    try:
        return os.open(dest_dir, _DIR_FLAGS)
    except OSError:
        return None


def _open_host_dir(dest_dir: str, host: str) -> int | None:
    """``DIR/<host>`` opened without following a symlink at ``DIR`` or there, or None."""
    dfd = _open_dir(dest_dir)
    if dfd is None:
        return None
    try:
        return os.open(host, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)


def _slots(dest_dir: str, names: dict[str, str]) -> dict:
    """Before the launch, what the home server holds: whether ``DIR`` exists (key None)
    and, per host, whether ``DIR/<host>`` exists and what ``DIR/<host>/<name>`` is."""
    out: dict = {None: os.path.lexists(dest_dir)}
    for host, name in names.items():
        fd = _open_host_dir(dest_dir, host)
        out[host] = (fd is not None, entry_id(fd, name) if fd is not None else None)
        if fd is not None:
            os.close(fd)
    return out


def _marked_by(fd: int, name: str, jobid: str) -> bool:
    """Whether ``name`` in ``fd`` is there with the staged mark of job ``jobid``. The mark
    is read only if it is a regular file when opened (``O_NONBLOCK``: a FIFO swapped in
    after :func:`~inventory.beneath.was_staged` looked must not hang the command)."""
    from inventory.beneath import staged_marker, was_staged

    if entry_id(fd, name) is None or not was_staged(fd, name):
        return False
    try:
        mfd = os.open(staged_marker(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                      | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(mfd).st_mode) and \
            os.read(mfd, 64).strip() == jobid.encode()
    finally:
        os.close(mfd)


def _clean_collect(dest_dir: str, names: dict[str, str], before: dict,
                   stopped: str | None = None) -> None:
    """After a stopped or killed collect: remove its dead temp dirs (a previous copy left
    aside goes back in place: ``clean_stale``); when the job's ranks are gone (a fresh
    mpiexec, stopped), also its lock files and the per-host directories and ``DIR`` it
    made that stayed empty. A job on the service's ranks may still be at work: only what
    no live process holds is touched then. ``stopped``: the id of a job that was stopped
    (SIGTERM, Ctrl-C, ``--timeout``), whose moves begun are finished (:func:`_finish_move`)
    rather than undone."""
    from inventory.beneath import (BeneathError, clean_staged_leftovers, lock_dest,
                                   unlock_dest)

    ended = last_launch() == "mpiexec"
    dfd = _open_dir(dest_dir)
    if dfd is None:
        return
    try:
        for host, name in names.items():
            try:
                fd = os.open(host, _DIR_FLAGS, dir_fd=dfd)
            except OSError:
                continue
            try:
                # the job's ranks are gone: its slot's lock (its file left by a killed
                # rank) is taken, so that no other run is at work there meanwhile
                lock = lock_dest(fd, name) if ended else None
                try:
                    if lock is not None and stopped:
                        _finish_move(fd, name, stopped)
                    clean_stale(fd, name)
                    if lock is not None:  # a mark_staged killed with the ranks
                        clean_staged_leftovers(fd, name, lock)
                finally:
                    if lock is not None:
                        unlock_dest(fd, name, lock)
            except BeneathError:
                pass  # another live run holds it
            finally:
                os.close(fd)
            if ended and not before[host][0]:
                try:
                    os.rmdir(host, dir_fd=dfd)
                except OSError:
                    pass  # not empty: a copy of this run, or someone else's files
        if ended and not before[None]:
            from inventory.homedir import drop_collect_dir

            drop_collect_dir(dest_dir, dfd)
    finally:
        os.close(dfd)


def _finish_move(fd: int, name: str, jobid: str) -> None:
    """In ``DIR/<host>`` (``fd``, its lock held): finish the move rank 0 of the stopped job
    ``jobid`` began, as it would have. mpiexec SIGKILLs every rank moments after one has
    ended, so a rank 0 stopped while it moved a copy in can be killed before it finishes.
    Begun means the previous copy lies aside as this job's ``.old``, and the job's
    temporary directory (dead: no flock held) then holds the verified copy (nothing is
    moved before it is verified) or has already moved it in: the copy goes in and is
    marked with the job, and the previous copy is removed. Anything else is left to
    ``clean_stale``."""
    import fcntl

    from inventory.beneath import mark_staged, remove_entry

    tmp = temp_name(name, "collect", jobid)
    if entry_id(fd, tmp + ".old") is None:
        return  # no move begun
    try:
        tfd = os.open(tmp, _DIR_FLAGS, dir_fd=fd)
    except OSError:
        return
    try:
        fcntl.flock(tfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if entry_id(fd, name) is None and entry_id(tfd, name) is not None:
            os.rename(name, name, src_dir_fd=tfd, dst_dir_fd=fd)
        if entry_id(fd, name) is not None and entry_id(tfd, name) is None:
            if not _marked_by(fd, name, jobid):
                mark_staged(fd, name, jobid)
            remove_entry(fd, tmp + ".old")
    except OSError:
        pass  # a live process holds it, or the move failed: clean_stale puts it back
    finally:
        os.close(tfd)


def collect_mpi(topo, path: str, nodes: list[str], dest_dir: str, *,
                chunk: int = DEFAULT_CHUNK, compress: str = "zstd",
                timeout: float | None = None, progress: Progress | None = None,
                window: int = 4, env: dict[str, str] | None = None,
                replace: bool = False, min_free: int | None = None) -> TransferRun:
    """Bring every node's ``path`` back to ``dest_dir/<host>/<name>`` on the home server.

    Rank 0 runs on the home server (an extra rank) and unpacks at most ``window`` nodes'
    streams at a time; each host's copy is moved in only when complete and verified.
    ``path`` is confined below each node's scratch (option PATH); InvalidRequest (exit 2)
    before any launch for a refused path, a ``dest_dir`` that is a file or a symlink, or
    an existing ``dest_dir/<host>/<name>`` not made by collect (unless ``replace``). A
    device node at or below any node's ``path``, or a symbolic link at it or on its way
    below the node's root (planted by a user: collect reads as root), refuses the whole
    collect before anything is sent: ``refused`` (exit 2), ``refusal`` one line naming
    each such host and path, nothing created on the home server. ``progress`` hears one
    phase ("collect") with bytes done. What this makes in ``dest_dir`` is ``0700``; a host
    that would leave less than ``min_free`` bytes free there fails (:mod:`inventory.homedir`).

    A job stopped before its result (``--timeout``, SIGTERM) keeps the copies already
    moved into place; what ``dest_dir`` then holds is read from the disk (each copy's
    staged mark names this job): those hosts are ok, ``outcome`` says which hosts' copies
    are in and that the others' slots are as they were, and the job's lock files, temp
    dirs and empty directories are removed. Stopped by a SIGTERM or Ctrl-C to this
    process, the same line goes to stderr before the interrupt is raised again.
    """
    nodes = check_nodes(topo, nodes)
    home = topo.home_server.name
    if home in nodes:
        raise InvalidRequest(f"{home} is the home server; collect brings data to it",
                         hint="select only the hosts to collect from")
    if compress not in COMPRESSIONS:
        raise InvalidRequest(f"unknown compression {compress!r}", hint="zstd, gzip or none")
    paths = confine_all(topo, nodes, path if path is not None else "", None, option="PATH")
    names = {h: d["rel"].rpartition("/")[2] for h, d in paths.items()}
    dest_dir = os.path.abspath(dest_dir)
    check_collect_dest(dest_dir, names, replace)
    t0 = time.time()
    ranks = rank_hosts(topo, nodes, home)
    job = {"jobid": secrets.token_hex(6), "compress": compress, "chunk": int(chunk),
           "hash_alg": "blake3", "hosts": ranks, "paths": paths, "out_dir": dest_dir,
           "names": names, "window": window, "replace": bool(replace), "min_free": min_free,
           # the town of each rank: rank 0 spreads its window over the towns, so that
           # each town's shared uplink carries one stream, not the whole window's
           "towns": [topo.host(h).town for h in ranks], **from_environ()}
    progress = or_silent(progress)
    progress.phase("collect", hosts=len(nodes))
    before = _slots(dest_dir, names)
    committed: dict[str, dict] = {}  # host -> rank 0's "committed" event

    def on_event(ev: dict) -> None:
        if ev.get("event") == "progress":
            progress.advance(ev.get("done") or 0)
            progress.note(f"collected {ev.get('hosts_done')}/{ev.get('hosts')} hosts")
        elif ev.get("event") == "committed":
            committed[str(ev.get("host"))] = ev

    try:
        res = launch(topo, "mpitools.collect.ranks", [encode_job(job)], ranks[1:], home,
                     timeout=timeout, on_event=on_event, env=env)
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C: the ranks are stopped; say what is in
        jid = job["jobid"]
        _clean_collect(dest_dir, names, before, jid)
        said = _stopped_outcome(_held(dest_dir, names, before, jid), dest_dir, names, jid)
        _say("chiba-admin collect: stopped; "
             + (said or f"nothing was collected (nothing of this run is in {dest_dir})"))
        raise
    out = TransferRun(method="mpi", algorithm=f"window{window}", source=path, dest=dest_dir,
                      dest_dir=dest_dir, nodes=ranks[1:], phases={}, kind=topo.kind)
    if not _collect_hosts(out, res, home):
        _clean_collect(dest_dir, names, before, job["jobid"] if res.timed_out else None)
        out.failures = launch_failures(res, ranks[1:], timeout)
        out.error = res.describe()
        out.mpiexec_stderr = res.stderr.splitlines()[-30:]
        _stopped_hosts(out, _held(dest_dir, names, before, job["jobid"]), committed,
                       dest_dir, names, job["jobid"])
    out.phase_bytes = {"collect": out.bytes}
    out.seconds = time.time() - t0
    out.phases["total"] = out.seconds
    return out


def _held(dest_dir: str, names: dict[str, str], before: dict, jobid: str) -> dict[str, str]:
    """After a job that gave no result, what each host's slot on the home server holds,
    read from the disk: "collected" (its copy is in place with this job's mark), "changed"
    (another entry than before the launch, without that mark: killed while it was moved
    in), "aside" (the previous copy is gone from its place and still lies aside, as this
    job's ``.old``: it could not be put back), "gone" (the previous copy is gone, and not
    aside either), "left" (this job's temporary directory could not be removed) or "none"
    (nothing of this job)."""
    out = {}
    for host, name in names.items():
        fd = _open_host_dir(dest_dir, host)
        if fd is None:
            out[host] = "gone" if before[host][1] is not None else "none"
            continue
        try:
            tmp = temp_name(name, "collect", jobid)
            now = entry_id(fd, name)
            if _marked_by(fd, name, jobid):
                out[host] = "collected"
            elif now is None and before[host][1] is not None:
                out[host] = "aside" if entry_id(fd, tmp + ".old") else "gone"
            elif now != before[host][1]:
                out[host] = "changed"
            elif entry_id(fd, tmp) or entry_id(fd, tmp + ".old"):
                out[host] = "left"
            else:
                out[host] = "none"
        finally:
            os.close(fd)
    return out


def _stopped_outcome(held: dict[str, str], dest_dir: str, names: dict[str, str],
                     jobid: str) -> str | None:
    """One line: which hosts' copies are in ``DIR`` after a stopped job, and what the
    others hold; None when nothing of this job is anywhere in ``DIR`` and its ranks are
    gone (the failure lines then say it all)."""
    from topology import fold

    ended = last_launch() == "mpiexec"
    live = "" if ended else (
        f" (the job may still be running on the {last_launch()}'s ranks: what {dest_dir} "
        "holds can still change)")
    by: dict[str, list[str]] = {}
    for host, state in held.items():
        by.setdefault(state, []).append(host)
    if set(by) == {"none"}:
        return None if ended else f"nothing was collected yet{live}"
    slot = os.path.join(dest_dir, "<host>", next(iter(names.values())))
    when = "before the job was stopped" if ended else "before the command stopped waiting"
    parts = []
    if len(by.get("collected", ())) == len(held):
        parts.append(f"every host's copy was collected into {slot} {when}, and is kept")
    elif by.get("collected"):
        parts.append(f"collected {when}, into {slot}: {fold(by['collected'])} "
                     f"({len(by['collected'])} of {len(held)})")
    if by.get("changed"):
        parts.append(f"{fold(by['changed'])}: {slot} changed but has no mark of this run "
                     "(stopped while it was moved in): look at it, and collect again with "
                     "--replace")
    if by.get("aside"):
        old = temp_name(next(iter(names.values())), "collect", jobid) + ".old"
        parts.append(f"{fold(by['aside'])}: {slot} is missing; its previous copy is still "
                     f"beside it as {old} (move it back)")
    if by.get("gone"):
        parts.append(f"{fold(by['gone'])}: {slot} is missing, and its previous copy is "
                     "not beside it either")
    if by.get("left"):
        parts.append(f"{fold(by['left'])}: a partial copy of this run is left beside {slot}"
                     " (the next collect there removes it)" if ended else
                     f"{fold(by['left'])}: still being received beside {slot}")
    if by.get("none"):
        parts.append(f"not collected: {fold(by['none'])} (their slots are as they were)")
    return "; ".join(parts) + live


def _stopped_hosts(out: TransferRun, held: dict[str, str], committed: dict[str, dict],
                   dest_dir: str, names: dict[str, str], jobid: str) -> None:
    """A job stopped before its result: the hosts whose copies are in place (``held``) are
    ok and no longer failures; ``outcome`` says what ``DIR`` holds."""
    said = _stopped_outcome(held, dest_dir, names, jobid)
    if said is None:
        return  # nothing of this run anywhere: every host failed, as the failures say
    out.outcome = said
    rows = {}
    for host, state in held.items():
        if state == "collected":
            ev = committed.get(host, {})
            rows[host] = TransferHost(ok=True, bytes=int(ev.get("bytes") or 0),
                                      stage="done")
            out.failures.pop(host, None)
            out.bytes += rows[host].bytes
            out.files += int(ev.get("files") or 0)
            out.payload_bytes += int(ev.get("payload_bytes") or 0)
        else:
            rows[host] = TransferHost.failed(out.failures.get(host, "the job was stopped"),
                                             stage="aborted")
    out.hosts = rows


def _say(line: str) -> None:
    from chiba_admin.console import get_err_console

    get_err_console().print(line, markup=False, highlight=False)


def _collect_hosts(out: TransferRun, res: LaunchResult, home: str) -> bool:
    """Fill ``out`` from the job's reports; False when the job gave none (out untouched
    but for the launch time). ok only when every host is, mpiexec ended well and rank 0
    had no error of its own (named under ``home``)."""
    if res.launch_seconds() is not None:
        out.phases["launch"] = res.launch_seconds()
    r = res.result
    if r is None or r.get("reports") is None or not (r["reports"] or r.get("error")):
        return False
    out.phases.update(r.get("phases", {}))
    out.phases["exit"] = res.exit_seconds()
    reports = r["reports"]
    out.hosts = host_rows(reports)
    out.failures = {x["host"]: x["error"] for x in reports
                    if x.get("error") and x.get("primary", True)}
    refused = {x["host"]: x["error"] for x in reports if x.get("refused")}
    if refused:  # a device node or a symlink at PATH: nothing was sent (the CLI exits 2)
        out.refused = True
        out.refusal = "; ".join(f"{h}: {why}" for h, why in refused.items())
    if r.get("error"):
        out.failures[home] = r["error"]
        out.error = r["error"]
    out.ok = bool(r["ok"]) and res.returncode == 0 and not r.get("error")
    if r["ok"] and not out.ok:  # every host's copy is in; only mpiexec's end went wrong
        out.error = res.describe()
        out.outcome = ("every host's copy was collected; then the job overran --timeout "
                       "while exiting" if res.timed_out else "every host's copy was "
                       "collected; then mpiexec ended badly")
    out.bytes = sum(x["bytes"] for x in reports)
    kept = [x for x in reports if x.get("ok")]  # what DIR holds: the copies moved in
    out.payload_bytes = sum(x.get("payload_bytes") or 0 for x in kept)
    out.files = sum(x.get("files") or 0 for x in kept)
    out.peak_rss = max([x.get("maxrss") or 0 for x in reports] + [r.get("maxrss_root") or 0])
    return True
