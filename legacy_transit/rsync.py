"""The rsync baseline: one real rsync per target (over ssh, or local for embedded) in a fan-out window."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from chiba_admin.errors import InvalidRequest
from chiba_admin.outcome import ABSENT, SyncHost, SyncRun
from chiba_admin.progress import Progress, or_silent
from inventory.plan import itemized_lines
from inventory.source import check_source
from topology.confine import HostDest, confine_dest

from .fanout import DEFAULT_FANOUT, window

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# rsync's exit statuses for "some files were not transferred" (23) and "vanished" (24):
# the transfer ran, but the target is left unlike the source
NOT_IN_SYNC = (23, 24)

__all__ = ["RsyncJob", "RsyncStats", "ssh_command", "plan_rsync", "rsync_argv",
           "parse_stats", "sync_rsync"]

_STAT_FIELDS = {
    "files_transferred": r"Number of regular files transferred:\s*([\d,.]+)",
    "files_total": r"Number of files:\s*([\d,.]+)",
    "total_size": r"Total file size:\s*([\d,.]+)",
    "bytes_sent": r"Total bytes sent:\s*([\d,.]+)",
    "bytes_received": r"Total bytes received:\s*([\d,.]+)",
    "literal_data": r"Literal data:\s*([\d,.]+)",
}


@dataclass(frozen=True)
class RsyncJob:
    """One target's rsync: the target host, its host path and the argv to run here."""

    host: str
    dest: str
    argv: tuple[str, ...]
    known_hosts: str | None = None  # named in host-key failures


@dataclass
class RsyncStats:
    """What rsync --stats said about one transfer."""

    files_transferred: int = 0
    files_total: int = 0
    total_size: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    literal_data: int = 0


def parse_stats(text: str) -> RsyncStats:
    """Numbers from ``rsync --stats`` output (thousands separators allowed)."""
    vals = {}
    for k, pat in _STAT_FIELDS.items():
        m = re.search(pat, text)
        if m:
            vals[k] = int(float(m.group(1).replace(",", "")))
    return RsyncStats(**vals)


def ssh_command(host, strict: bool | None = None) -> str:
    """The ``-e`` string for rsync: ssh with the host's port, key, known_hosts and user."""
    s = host.ssh
    policy = "accept-new" if s.host_key_policy == "accept-new" else "yes"
    argv = ["ssh", "-F", os.path.expanduser(s.config_file) if s.config_file else "/dev/null",
            "-p", str(s.port), "-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={policy}",
            "-o", f"ConnectTimeout={int(max(1, s.connect_timeout))}"]
    if s.identity_file:
        argv += ["-i", os.path.expanduser(s.identity_file), "-o", "IdentitiesOnly=yes"]
    if s.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(s.known_hosts)}"]
    if s.user:
        argv += ["-l", s.user]
    # rsync splits -e itself, honouring single and double quotes
    return shlex.join(argv)


def guard_argv(hd: HostDest, dry_run: bool, python: str) -> list[str]:
    """The target-side guard (legacy_transit.rsync_guard) for a confined destination."""
    return [python, "-m", "legacy_transit.rsync_guard", hd.root, hd.rel,
            "dry" if dry_run else "run", "--"]


def rsync_argv(src: str, host, hd: HostDest, *, kind: str, delete: bool = False,
               dry_run: bool = False, excludes: tuple[str, ...] = (),
               exclude_from: tuple[str, ...] = (), checksum: bool = False,
               itemize: bool = False, python: str | None = None) -> tuple[str, ...]:
    """The command for one target (pure): rsync wrapped in the guard that walks ``hd``
    without following symlinks and holds its lock (locally for the embedded cluster, as
    ``--rsync-path`` on the target over SSH)."""
    # always itemised: the per-target created/updated/deleted counts come from rsync's own
    # change list (the same columns mpisync reports); the list is shown with -i/--dry-run
    argv = ["rsync", "-a", "--stats", "--itemize-changes"]
    if delete:
        argv.append("--delete")
    if dry_run:
        argv.append("--dry-run")
    if checksum:
        argv.append("--checksum")
    for pat in excludes:
        argv += ["--exclude", pat]
    for path in exclude_from:
        argv += ["--exclude-from", path]
    src = src.rstrip("/") + "/"  # the contents, not the directory itself
    if kind == "embedded":
        root = HostDest(host.local_path(hd.root), hd.rel)
        return tuple(guard_argv(root, dry_run, python or sys.executable)
                     + argv + ["--", src, root.path.rstrip("/") + "/"])
    remote = ["env", f"PYTHONPATH={_REPO_ROOT}",
              *guard_argv(hd, dry_run, python or sys.executable), "rsync"]
    argv += ["-e", ssh_command(host), "--rsync-path", shlex.join(remote)]
    return tuple(argv + ["--", src, f"{host.connect_address}:{hd.path.rstrip('/') or '/'}/"])


def plan_rsync(topo, src: str, targets: list[str], dest: str | None = None, **opts
               ) -> list[RsyncJob]:
    """Check the request and build one job per target; raises InvalidRequest on bad input
    (before anything is sent): a missing source or one with a device node, a
    non-directory, an empty source with --delete, a --dest outside a target's repository."""
    if not targets:
        raise InvalidRequest("no targets selected", hint="name hosts like @mayors")
    src = check_source(src).path
    if not os.path.isdir(src):
        raise InvalidRequest("source is not a directory", where=src,
                         hint="sync-mayors copies a repository tree")
    if opts.get("delete") and not os.listdir(src):
        # an empty source with --delete would wipe every target (mpiFileUtils dsync refuses too)
        raise InvalidRequest("refusing to --delete from an empty source", where=src,
                         hint="check the source path; drop --delete to sync nothing")
    python = (topo.mpi or {}).get("python") or sys.executable
    jobs = []
    for t in targets:
        if t not in topo:
            raise InvalidRequest(f"unknown host {t!r}", where=topo.source)
        h = topo.host(t)
        hd = confine_dest(h, "repository", dest, allow_root=True)
        kh = os.path.expanduser(h.ssh.known_hosts or "~/.ssh/known_hosts")
        jobs.append(RsyncJob(t, hd.path, rsync_argv(src, h, hd, kind=topo.kind, python=python,
                                                    **opts),
                             None if topo.kind == "embedded" else kh))
    return jobs


def _run_job(job: RsyncJob, timeout: float | None) -> SyncHost:
    t0 = time.monotonic()
    try:
        p = subprocess.run(list(job.argv), capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        rc, out, err = p.returncode, p.stdout.decode(errors="replace"), \
            p.stderr.decode(errors="replace")
        error = None
    except subprocess.TimeoutExpired:
        rc, out, err, error = 255, "", "", f"rsync timed out after {timeout:g}s"
    except OSError as e:
        rc, out, err, error = 255, "", "", f"cannot run rsync: {e.strerror or e}"
    st = parse_stats(out)
    if error is None and rc != 0:
        error = (f"not in sync (rsync exit {rc})" if rc in NOT_IN_SYNC else f"rsync exit {rc}"
                 ) + (f": {_why(err)}" if err.strip() else "")
        if "Host key verification failed" in err and job.known_hosts:
            error += f" (host key of {job.host} not as in known_hosts {job.known_hosts})"
    items = itemized_lines(out)  # rsync's own --itemize-changes lines
    return SyncHost(ok=error is None, rc=rc, seconds=round(time.monotonic() - t0, 6),
                    in_sync=error is None,
                    conflicts=_conflicts(err) if rc in NOT_IN_SYNC else [],
                    changes=items, **_counts(items), dest=job.dest,
                    files_transferred=st.files_transferred, files_total=st.files_total,
                    total_size=st.total_size, bytes_sent=st.bytes_sent,
                    bytes_received=st.bytes_received, error=error)


def _counts(items: list[str]) -> dict[str, int]:
    """created / updated / deleted from rsync's itemised lines (as mpisync counts them:
    entries made new, regular files rewritten, entries removed)."""
    deleted = sum(1 for ln in items if ln.startswith("*deleting"))
    created = sum(1 for ln in items if ln[2:11] == "+++++++++"
                  and not ln.endswith(" ./"))  # the destination itself is not an entry
    updated = sum(1 for ln in items if ln[:2] in (">f", "<f") and ln[2:11] != "+++++++++")
    return {"created": created, "updated": updated, "deleted": deleted}


def _conflicts(stderr: str) -> list[str]:
    """rsync's own lines about what it left unlike the source."""
    return [ln.strip() for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith(_GENERIC)]


_GENERIC = ("rsync error:", "rsync: connection unexpectedly closed", "@@@")


def _why(stderr: str) -> str:
    """The informative part of rsync's (or ssh's) complaint, not its generic trailer."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_GENERIC)] or lines
    why = useful[-1]
    offending = [ln for ln in lines if ln.startswith("Offending")]  # names known_hosts:line
    if offending and offending[0] != why:
        why += f" ({offending[0]})"
    return why


def sync_rsync(topo, src: str, targets: list[str], dest: str | None = None, *,
               delete: bool = False, dry_run: bool = False, excludes: tuple[str, ...] = (),
               exclude_from: tuple[str, ...] = (), checksum: bool = False,
               fanout: int = DEFAULT_FANOUT, timeout: float | None = None,
               progress: Progress | None = None, itemize: bool = False) -> SyncRun:
    """Synchronise ``src`` to every target with its own rsync; failures are per host.

    rsync's exit 23/24 (a target left unlike the source) is a failure of that host, named
    "not in sync". A dry run creates nothing on any target (rsync --dry-run, no lock).
    ``progress`` hears one phase ("rsync") and each target's end.
    """
    if shutil.which("rsync") is None:
        raise InvalidRequest("rsync is not installed", hint="run scripts/install-system-deps.sh")
    jobs = plan_rsync(topo, src, targets, dest, delete=delete, dry_run=dry_run,
                      excludes=tuple(excludes), exclude_from=tuple(exclude_from),
                      checksum=checksum, itemize=itemize)
    t0 = time.monotonic()
    progress = or_silent(progress)
    progress.phase("rsync", hosts=len(jobs))
    by_host = {j.host: j for j in jobs}

    def done(got) -> None:
        progress.host_done(got.host, got.ok and got.value.ok)

    got = window([topo.host(j.host) for j in jobs],
                 lambda h: _run_job(by_host[h.name], timeout), fanout, on_done=done)
    hosts = {name: r.value if r.ok else SyncHost.failed(
                 r.error, rc=255, dest=by_host[name].dest, in_sync=False, conflicts=[],
                 files_total=0, total_size=0)
             for name, r in got.items()}
    failures = {name: h.error for name, h in hosts.items() if not h.ok}
    secs = time.monotonic() - t0
    if not (dry_run or itemize):  # listed only when asked, as mpisync lists its plan
        for h in hosts.values():
            h.changes = ABSENT
    dests = sorted({j.dest for j in jobs})
    return SyncRun(method="rsync", ok=not failures, source=os.path.abspath(src),
                   dest=dests[0] if len(dests) == 1 else (dest or "<repository>"),
                   targets=[j.host for j in jobs], dry_run=dry_run, seconds=round(secs, 6),
                   bytes_sent=sum(h.bytes_sent for h in hosts.values()), hosts=hosts,
                   failures=failures)
