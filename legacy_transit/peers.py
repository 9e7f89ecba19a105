"""The tools users would pick instead of `stage`: pdcp, clush --copy and Slurm's sbcast.

Pure argv builders (``peer_argv`` and the per-tool functions) and their execution
(``run_peer``), plus the byte-for-byte check every peer run gets on every node
(``digest_tree`` here, ``verify_script`` there, ``compare_digests``). Each tool runs at
its defaults unless told otherwise: pdcp fans out to 32 hosts at once, clush to 64, and
sbcast to 8 (a star up to 8 nodes); ``sbcast-tree`` gives sbcast a fan-out near the square
root of the node count (``-F``), so each first-level node forwards to about as many.
"""

from __future__ import annotations

import hashlib
import math
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["PEERS", "SBCAST_MAX_FANOUT", "PeerRun", "tree_width", "sources_of",
           "pdcp_argv", "clush_argv", "sbcast_argv", "peer_argv", "unsupported",
           "verify_script", "parse_sha256sum", "digest_tree", "compare_digests", "run_peer"]

PEERS = ("pdcp", "clush", "sbcast", "sbcast-tree")
SBCAST_MAX_FANOUT = 8  # sbcast(1): "Maximum value is currently eight"
_SBCAST_MAX_FILES = 16  # one job step per file; a tree of files is not what sbcast is for


def tree_width(nodes: int) -> int:
    """sbcast's ``-F`` for a two-level tree: about sqrt(nodes), within 2..8."""
    return max(2, min(SBCAST_MAX_FANOUT, round(math.sqrt(max(1, nodes)))))


def sources_of(src: Path) -> list[str]:
    """The top-level entries of directory ``src`` (absolute, sorted): what the tools copy
    into the destination so that it ends up holding ``src``'s contents, as `stage` does."""
    return [str(p) for p in sorted(Path(src).absolute().iterdir())]


def pdcp_argv(sources: Sequence[str], nodes: str, dest: str, ssh_config: str | Path, *,
              fanout: int | None = None) -> list[str]:
    """``pdcp -r`` over ssh with the testbed's ssh_config (``nodes``: a folded nodeset).

    pdcp runs ``pdcp`` on each target too (its receiving side), so it must be installed
    there; ``dest`` must exist. Default fan-out: pdsh's 32.
    """
    argv = ["env", "PDSH_RCMD_TYPE=ssh", f"PDSH_SSH_ARGS_APPEND=-F {ssh_config}",
            "pdcp", "-r", "-w", nodes]
    if fanout:
        argv += ["-f", str(fanout)]
    return argv + list(sources) + [dest]


def clush_argv(sources: Sequence[str], nodes: str, dest: str, ssh_config: str | Path, *,
               clush: str = "clush", fanout: int | None = None) -> list[str]:
    """``clush --copy`` (scp per node) with the testbed's ssh_config; default fan-out 64.

    ``-S``: exit with the largest return code of the copies, so a failed node shows.
    """
    argv = [clush, "-S", "-w", nodes, "-o", f"-F {ssh_config}"]
    if fanout:
        argv += ["-f", str(fanout)]
    return argv + ["--copy", *sources, "--dest", dest]


def sbcast_argv(files: Sequence[str], nodes: str, count: int, dest: str,
                slurm_conf: str | Path, *, fanout: int | None = None) -> list[str]:
    """``salloc -N COUNT -w NODES sbcast -f [-F FANOUT] FILE DEST/NAME`` for each file.

    sbcast copies one file to the nodes of a job, so the allocation is part of the command
    a user types. Raises ValueError for a fan-out outside 1..8 or no files.
    """
    if fanout is not None and not 1 <= fanout <= SBCAST_MAX_FANOUT:
        raise ValueError(f"sbcast fan-out {fanout} outside 1..{SBCAST_MAX_FANOUT}")
    if not files:
        raise ValueError("no files for sbcast")
    steps = []
    for f in files:
        step = ["sbcast", "-f"] + (["-F", str(fanout)] if fanout else [])
        steps.append(step + [f, f"{dest.rstrip('/')}/{Path(f).name}"])
    head = ["env", f"SLURM_CONF={slurm_conf}", "salloc", "--quiet", "-N", str(count),
            "-w", nodes]
    if len(steps) == 1:
        return head + steps[0]
    return head + ["sh", "-c", " && ".join(shlex.join(s) for s in steps)]


def unsupported(peer: str, src: Path) -> str | None:
    """Why ``peer`` cannot copy ``src`` (None when it can): sbcast copies single files."""
    if peer not in PEERS:
        return f"unknown peer {peer!r} (known: {', '.join(PEERS)})"
    if peer.startswith("sbcast"):
        entries = list(Path(src).iterdir())
        if any(not e.is_file() or e.is_symlink() for e in entries):
            return "sbcast copies single files; this source holds directories or links"
        if len(entries) > _SBCAST_MAX_FILES:
            return f"sbcast copies single files; this source holds {len(entries)}"
    return None


def peer_argv(peer: str, src: Path, nodes: Sequence[str], dest: str, *,
              ssh_config: str | Path, slurm_conf: str | Path | None = None,
              clush: str = "clush") -> list[str]:
    """The command line of ``peer`` copying the contents of ``src`` into ``dest`` (an
    existing directory on every node in ``nodes``). Raises ValueError when the peer cannot
    (``unsupported``) or sbcast has no ``slurm_conf``."""
    from ClusterShell.NodeSet import NodeSet

    why = unsupported(peer, src)
    if why:
        raise ValueError(why)
    folded = str(NodeSet.fromlist(nodes))
    srcs = sources_of(src)
    if peer == "pdcp":
        return pdcp_argv(srcs, folded, dest, ssh_config)
    if peer == "clush":
        return clush_argv(srcs, folded, dest, ssh_config, clush=clush)
    if slurm_conf is None:
        raise ValueError("sbcast needs the Slurm configuration (testbed up --slurm)")
    fan = tree_width(len(nodes)) if peer == "sbcast-tree" else None
    return sbcast_argv(srcs, folded, len(nodes), dest, slurm_conf, fanout=fan)


def verify_script(dest: str) -> str:
    """Shell run on each node: ``sha256sum`` of every file under ``dest`` (sorted)."""
    return (f"cd {shlex.quote(dest)} && find . -type f -print0 | sort -z "
            "| xargs -0 -r sha256sum")


def parse_sha256sum(text: str) -> dict[str, str]:
    """``sha256sum`` output -> {relative path: hex digest} (``./`` dropped)."""
    out = {}
    for ln in text.splitlines():
        digest, _, name = ln.partition("  ")
        if name:
            out[name[2:] if name.startswith("./") else name] = digest
    return out


def digest_tree(root: Path, chunk: int = 1 << 20) -> dict[str, str]:
    """{relative path: sha256 hex} of every regular file under ``root``."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


def compare_digests(expected: dict[str, str], got: dict[str, str]) -> str | None:
    """None when ``got`` equals ``expected``; else one line saying what differs."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = [f"{len(v)} {what} (first {v[0]})" for what, v in
             (("missing", missing), ("differ", wrong), ("unexpected", extra)) if v]
    return "; ".join(parts) or None


@dataclass
class PeerRun:
    """One peer command: exit code, wall seconds, the tail of its output."""

    argv: list[str]
    rc: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run_peer(argv: Sequence[str], *, wrap: Callable[[list[str]], list[str]] = lambda a: a,
             timeout: float = 1800) -> PeerRun:
    """Run a peer's ``argv`` (through ``wrap``, e.g. into the president's namespaces) and
    time it as a user waits for it; a timeout is rc 124 with a message, not an exception."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(wrap(list(argv)), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        rc, out = p.returncode, (p.stderr + p.stdout).strip()
    except subprocess.TimeoutExpired:
        rc, out = 124, f"timed out after {timeout:g}s"
    return PeerRun(list(argv), rc, time.monotonic() - t0, "\n".join(out.splitlines()[-5:]))
