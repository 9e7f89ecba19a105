"""The embedded cluster: every host is a directory on this machine standing for its root."""

from __future__ import annotations

import os
from pathlib import Path

from topology import Topology

from .errors import InvalidRequest

__all__ = ["default_state_dir", "bind", "init_cluster", "is_initialized", "host_root"]


def default_state_dir(topo: Topology) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "chiba-admin" / topo.name


def host_root(state: Path, host: str) -> str:
    return str(Path(state) / "hosts" / host)


def bind(topo: Topology, state: Path | None) -> Topology:
    """The topology with each host's ``root`` set when it is embedded; unchanged otherwise."""
    if topo.kind != "embedded":
        return topo
    state = Path(state) if state else default_state_dir(topo)
    bound = topo.with_root(lambda h: host_root(state, h.name))
    bound.state_dir = str(state)
    return bound


def is_initialized(topo: Topology) -> bool:
    return topo.kind == "embedded" and all(
        os.path.isdir(h.local_path(h.scratch)) for h in topo.hosts())


def init_cluster(topo: Topology) -> list[str]:
    """Create every host's directory tree (scratch, spool, repository); returns created roots."""
    if topo.kind != "embedded":
        raise InvalidRequest(f"cluster {topo.name!r} is of kind {topo.kind!r}; only an embedded "
                         "cluster is initialised here", where=topo.source,
                         hint="`chiba-admin cluster init` prepares SSH hosts "
                              "(chiba_admin.hostcheck.init_hosts)")
    made = []
    for h in topo.hosts():
        for which in ("scratch", "spool", "repository"):
            os.makedirs(h.local_path(h.paths.get(which)), exist_ok=True)
        made.append(h.root)
    return made


def require_initialized(topo: Topology) -> None:
    """For embedded clusters: fail clearly when `cluster init` has not run."""
    if topo.kind == "embedded" and not is_initialized(topo):
        raise InvalidRequest("the embedded cluster is not initialised",
                         where=getattr(topo, "state_dir", None),
                         hint="run `chiba-admin cluster init` first")
