"""Where benchmark runs happen: the embedded cluster or the namespace testbed, brought up
for a shape (towns x nodes per town) and taken down afterwards.

Every run is the real command an operator types (``chiba-admin --json ...``), run where the
operator would run it (on the testbed: inside the president's namespaces), timed as a
user waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ChibaError, InvalidRequest

__all__ = ["Site", "embedded_site", "testbed_site", "open_site", "resolve_where",
           "testbed_possible", "parse_shapes", "sync_shape", "NODE_MBIT", "MAYOR_MBIT"]

NODE_MBIT, MAYOR_MBIT = 20.0, 200.0  # the README's testbed: Fast Ethernet vs GigE, scaled


@dataclass
class Site:
    """A cluster to benchmark on: how to run chiba-admin there, its link rates and counters."""

    kind: str
    topo: object
    cluster_args: list[str]
    node_bps: float | None
    mayor_bps: float | None
    measure: Callable[[], contextlib.AbstractContextManager]
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv
    close: Callable[[], None] = lambda: None
    towns: int = 0
    nodes_per_town: int = 0
    disk: str | None = None   # where hosts keep their data (testbed: tmpfs or dir)
    uplink_bps: float | None = None  # each mayor's town-side link (None: the node rate)
    testbed_state: Path | None = None  # the testbed's state dir (peers: ssh_config, Slurm)

    def describe(self) -> dict:
        """The record's ``cluster``: kind, name, shape, link rates (bit/s), host counts."""
        return {"kind": self.kind, "name": self.topo.name, "towns": self.towns,
                "nodes_per_town": self.nodes_per_town, "node_bps": self.node_bps,
                "mayor_bps": self.mayor_bps, "uplink_bps": self.uplink_bps or self.node_bps,
                "shape": ("fat mayors" if self.uplink_bps and self.mayor_bps
                          and self.uplink_bps >= self.mayor_bps else "paper"),
                "hosts": self.topo.summary()["hosts"],
                "disk": self.disk}

    def node_names(self) -> list[str]:
        return [h.name for h in self.topo.nodes]

    def cli(self, *args: str, timeout: float = 1800) -> tuple[dict | None, float, str]:
        """Run ``chiba-admin --json ARGS`` on the site; (parsed JSON or None, wall s, stderr)."""
        exe = str(Path(sys.executable).with_name("chiba-admin"))
        argv = self.wrap([exe, "--json", *self.cluster_args, *args])
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        try:
            out = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            out = None
        return out, wall, p.stderr.strip()

    def wipe(self, hosts: list[str], var: str, rel: str) -> None:
        """Remove ``$var/rel`` and the tools' marker files beside it (``.rel.chiba-*``) on
        ``hosts`` (var: CHIBA_SCRATCH or CHIBA_REPO) with `run`, so the same line serves
        directories, the testbed and real hosts. ChibaError (exit 1) naming the hosts."""
        from topology import fold

        q = shlex.quote(rel)
        script = f'rm -rf -- "${var}"/{q} "${var}"/.{q}.chiba-*'
        out, _, err = self.cli("run", "-w", fold(hosts), "--", "sh", "-c", script)
        if out is None and err:
            raise ChibaError(f"cannot clean ${var}/{rel}: {err}", where=fold(hosts))


    def remove_local(self, path: str | Path) -> None:
        """``rm -rf path`` where the CLI runs (the president's namespaces on the testbed)."""
        subprocess.run(self.wrap(["rm", "-rf", "--", str(path)]), capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=300)


class _NoCounters:
    infrastructure = None


@contextlib.contextmanager
def _no_measure() -> Iterator[_NoCounters]:
    yield _NoCounters()


def embedded_site(towns: int, per_town: int, workdir: Path) -> Site:
    """An embedded cluster of ``towns`` x ``per_town`` nodes in ``workdir`` (no links)."""
    from topology import loads_topology
    from topology.generate import generated_topology_toml

    from ..embedded import bind, init_cluster

    text = generated_topology_toml(towns, per_town, 100e6, 1e9, name="bench-embedded")
    tfile = workdir / f"embedded-{towns}x{per_town}.toml"
    tfile.write_text(text)
    state = workdir / f"cluster-{towns}x{per_town}"
    topo = bind(loads_topology(text, source=str(tfile)), state)
    init_cluster(topo)
    return Site("embedded", topo, ["--cluster", str(tfile), "--state", str(state)], None,
                None, _no_measure, towns=towns, nodes_per_town=per_town,
                close=lambda: shutil.rmtree(state, ignore_errors=True))


def testbed_site(towns: int, per_town: int, workdir: Path, node_mbit: float,
                 mayor_mbit: float, uplink_mbit: float | None = None) -> Site:
    """A namespace testbed brought up for the benchmark and taken down by ``close``.

    Rates in Mbit/s; ``uplink_mbit`` is each mayor's town-side link (default: the node
    rate, the paper's network; ``mayor_mbit`` gives the "fat mayors" shape).
    """
    import testbed
    from topology import load_topology

    state = workdir / f"testbed-{towns}x{per_town}"
    up_bps = uplink_mbit * 1e6 if uplink_mbit else None
    topo0 = testbed.generated_topology(towns, per_town, node_mbit * 1e6, mayor_mbit * 1e6,
                                       up_bps)
    testbed.up(topo0, state, node_bps=node_mbit * 1e6, mayor_bps=mayor_mbit * 1e6,
               uplink_bps=up_bps)
    try:
        tb = testbed.Testbed(state)
        topo = load_topology(tb.topology_file)
        pres = tb.president
    except BaseException:
        testbed.down(state)
        raise
    return Site("testbed", topo, ["--cluster", str(tb.topology_file)], node_mbit * 1e6,
                mayor_mbit * 1e6, lambda: testbed.measure(state),
                wrap=lambda argv: tb.exec_argv(pres, argv),
                close=lambda: testbed.down(state), towns=towns, nodes_per_town=per_town,
                disk=testbed.status(state).get("disk"), uplink_bps=up_bps,
                testbed_state=Path(tb.state))


def testbed_possible() -> bool:
    """Root with ip, tc and sshd: the namespace testbed can come up here."""
    return (os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "tc"))
            and os.path.exists("/usr/sbin/sshd"))


def resolve_where(where: str) -> str:
    """``auto`` -> ``testbed`` when possible here, else ``embedded``; InvalidRequest for a
    testbed without root."""
    if where == "auto":
        return "testbed" if testbed_possible() else "embedded"
    if where == "testbed" and os.geteuid() != 0:
        raise InvalidRequest("the testbed needs root", hint="run as root or use --where embedded")
    return where


def open_site(where: str, towns: int, per_town: int, workdir: Path, *,
              node_mbit: float = NODE_MBIT, mayor_mbit: float = MAYOR_MBIT,
              uplink_mbit: float | None = None) -> Site:
    """Bring up a site of ``towns`` x ``per_town`` nodes; the caller calls ``site.close()``."""
    if resolve_where(where) == "testbed":
        return testbed_site(towns, per_town, workdir, node_mbit, mayor_mbit, uplink_mbit)
    return embedded_site(towns, per_town, workdir)


def parse_shapes(value: str) -> list[tuple[int, int]]:
    """``"2x4,4x8"`` -> [(2, 4), (4, 8)]; InvalidRequest for anything else."""
    out = []
    for part in value.split(","):
        try:
            t, n = part.lower().split("x")
            out.append((int(t), int(n)))
        except ValueError:
            raise InvalidRequest(f"bad shape {part!r}",
                                 hint="write TOWNSxNODES, e.g. 2x4,4x8") from None
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise InvalidRequest(f"bad shape {part!r}", hint="at least 1 town of 1 node")
    return out


def sync_shape(targets: int) -> tuple[int, int]:
    """The shape whose mayors (up to 8), then nodes, give ``targets`` sync targets."""
    towns = min(8, targets)
    return towns, max(1, -(-(targets - towns) // towns))
