"""Driver-side helpers every MPI tool shares: nodes and destinations checked before a
launch, the per-host rows of a result, who to blame when a job gave no result, and the
clean-up after a killed job on the embedded cluster. Runs in the CLI process."""

from __future__ import annotations

import os

from chiba_admin.errors import InvalidRequest, MPIToolError
from chiba_admin.outcome import TransferHost

from mpitools.common.archive import clean_stale
from mpitools.common.launch import LaunchResult

__all__ = ["dest_for", "confine_all", "spool_dir_of", "spool_or_fail", "check_nodes",
           "host_rows", "aborted_rows", "launch_failures", "cleanup_embedded"]


def dest_for(topo, host: str, dest: str | None, *, default_name: str | None = None,
             option: str = "--dest"):
    """``dest`` confined below ``host``'s scratch (:func:`topology.confine.confine_dest`).

    Returns a HostDest; raises InvalidRequest (exit 2) for ``..``, ``/``, a path outside
    scratch and the host's dest_roots, or scratch/spool/repository or an ancestor of one.
    """
    from topology.confine import confine_dest

    return confine_dest(topo.host(host), "scratch", dest, default_name=default_name,
                        option=option)


def _rank_dest(topo, host: str, hd) -> dict:
    """What a rank needs: the root as seen on that machine, ``rel``, and the path to show."""
    return {"root": topo.host(host).local_path(hd.root), "rel": hd.rel, "shown": hd.path,
            "host_root": hd.root}


def spool_dir_of(topo) -> str:
    home = topo.home_server
    return home.local_path(home.spool)


def check_nodes(topo, nodes: list[str]) -> list[str]:
    if not nodes:
        raise InvalidRequest("no nodes selected", hint="name nodes like ccn[01-04] or @nodes")
    for n in nodes:
        topo.host(n)  # unknown -> TopologyError (exit 2)
    return list(dict.fromkeys(nodes))


def host_rows(reports: list[dict]) -> dict[str, TransferHost]:
    """Each host's outcome from the ranks' reports (throughput in bits per second)."""
    rows = {}
    for r in reports:
        secs = float(r.get("seconds") or 0.0)
        rows[r["host"]] = TransferHost(
            ok=bool(r["ok"]), bytes=int(r.get("bytes") or 0), seconds=secs,
            throughput_bps=(r["bytes"] * 8 / secs) if secs > 0 else 0.0,
            stage=r.get("stage"), error=r.get("error"), maxrss=r.get("maxrss"))
    return rows


def aborted_rows(hosts: list[str], failures: dict[str, str]) -> dict[str, TransferHost]:
    """Each host of a job that gave no result: failed in stage "aborted", its reason from
    ``failures`` (launch_failures) or "the job was stopped"."""
    return {h: TransferHost.failed(failures.get(h, "the job was stopped"), stage="aborted")
            for h in hosts}


def launch_failures(res: LaunchResult, hosts: list[str], timeout: float | None
                    ) -> dict[str, str]:
    """Who to blame when the job produced no result: dead ranks, else every host."""
    dead = res.failed_hosts()
    if dead:
        return {h: f"{why} (the job was stopped)" for h, why in dead.items()}
    why = (f"timed out after {timeout:g} s" if res.timed_out and timeout
           else res.describe())
    return {h: why for h in hosts}


def cleanup_embedded(topo, dests: dict[str, dict]) -> None:
    """After a killed job on the embedded cluster: remove its temporary dirs now.

    (On real hosts the next run on that destination does it: temp dirs of dead jobs are
    unlocked.) Walks each destination's parent without following symlinks.
    """
    if topo.kind != "embedded":
        return
    from inventory.beneath import (BeneathError, clean_staged_leftovers, lock_dest,
                                   open_dir_beneath, open_root, unlock_dest)

    for d in dests.values():
        parent, _, name = d["rel"].rpartition("/")
        try:
            root_fd = open_root(d["root"])
        except BeneathError:
            continue
        try:
            pfd = open_dir_beneath(root_fd, parent)
        except BeneathError:
            continue
        finally:
            os.close(root_fd)
        try:
            clean_stale(pfd, name)
            lock = lock_dest(pfd, name)
            try:
                clean_staged_leftovers(pfd, name, lock)  # a mark_staged killed with the job
            finally:
                unlock_dest(pfd, name, lock)  # a killed run's lock file
        except BeneathError:
            pass  # another live run holds it
        finally:
            os.close(pfd)


def confine_all(topo, nodes: list[str], dest: str | None, default_name: str | None,
                 option: str = "--dest") -> dict[str, dict]:
    """Every node's confined destination for the ranks, checked before anything is sent."""
    return {h: _rank_dest(topo, h, dest_for(topo, h, dest, default_name=default_name,
                                            option=option)) for h in nodes}


def spool_or_fail(topo) -> str:
    spool = spool_dir_of(topo)
    if not os.path.isdir(spool):
        raise MPIToolError("spool directory missing", where=spool,
                         hint="run `chiba-admin cluster init` (embedded) or create it")
    return spool


