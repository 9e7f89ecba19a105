"""The namespace testbed for integration tests (pytest plugin): fixtures and helpers.

Registered in tests/conftest.py through ``pytest_plugins``: the fixtures
``testbed_cluster`` (session) and ``tb`` (the same, skipping when no testbed can run)
need no import. Use::

    import pytest
    from support.testbed import require_testbed, data_dir   # helpers

    @pytest.mark.testbed
    def test_something(testbed_cluster):
        tb = testbed_cluster                    # a testbed.Testbed
        tb.topology_file                        # testbed.toml: pass with --cluster
        tb.exec("pres", ["hostname"]).stdout    # run in a host's namespaces
        tb.exec("pres", tb.ssh_argv("ccn01", "ls /scratch"))   # real ssh from the president
        tb.exec("pres", tb.mpiexec_argv(["ccn01", "ccn05"], [PY, "-m", "mpitools.x"]))
        with tb.measure() as m: ...             # m.delta[host]["tx_bytes"], m.infrastructure

The testbed is 2 towns x 4 nodes (pres, mayor1-2, ccn01-08), node links 20 Mbit/s and
president/mayor links 200 Mbit/s. It is shared by the whole session: a test that injects
a fault heals it in a ``finally``; a test that writes into scratch cleans up after itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

__all__ = ["testbed_cluster", "tb", "require_testbed", "testbed_unavailable", "data_dir",
           "tb_cli", "CHIBA", "TESTBED_SHAPE"]

CHIBA = str(Path(sys.executable).with_name("chiba-admin"))
# towns, nodes per town, node Mbit/s, president/mayor Mbit/s
TESTBED_SHAPE = (2, 4, 20.0, 200.0)


def testbed_unavailable() -> str | None:
    """Why a testbed cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "testbed needs root (network namespaces, tc, sshd)"
    from testbed.system import require_tools

    missing = require_tools()
    if missing:
        return f"testbed needs {', '.join(missing)} (scripts/install-system-deps.sh)"
    if not os.path.isdir("/proc/self/ns") or shutil.which("ip") is None:
        return "no network namespaces here"
    return None


def require_testbed() -> None:
    """Skip the calling test (with the reason) when a testbed cannot run here."""
    reason = testbed_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def testbed_cluster(tmp_path_factory):
    """A running 2 x 4 testbed for the whole session; always taken down at the end."""
    require_testbed()
    import testbed

    towns, per_town, node_mbit, mayor_mbit = TESTBED_SHAPE
    state = tmp_path_factory.mktemp("testbed") / "state"
    topo = testbed.generated_topology(towns, per_town, node_mbit * 1e6, mayor_mbit * 1e6)
    testbed.up(topo, state, node_bps=node_mbit * 1e6, mayor_bps=mayor_mbit * 1e6)
    try:
        yield testbed.Testbed(state)
    finally:
        testbed.down(state)


@pytest.fixture
def tb(request):
    """The session testbed, or a skip naming why none can run here."""
    require_testbed()
    return request.getfixturevalue("testbed_cluster")


def data_dir(tb, host: str, kind: str = "scratch") -> Path:
    """Where ``host``'s private ``kind`` directory (scratch, spool, repository) lives on
    this machine's disk. Raises KeyError when the host has no such mount."""
    for _path, src in tb.plan.host(host).mounts:
        if src.endswith(f"/data/{kind}"):
            return Path(src)
    raise KeyError(f"{host} has no {kind} mount")


def tb_cli(tb, *args: str, host: str | None = None, env: dict | None = None,
           timeout: float = 300) -> tuple[int, str, str]:
    """``chiba-admin --cluster TESTBED ARGS`` on ``host`` (default: the president), in its
    namespaces, as an operator there would run it; returns (exit code, stdout, stderr)."""
    cp = tb.exec(host or tb.president, [CHIBA, "--cluster", str(tb.topology_file), *args],
                 env={**os.environ, **(env or {})}, timeout=timeout)
    return cp.returncode, cp.stdout, cp.stderr
