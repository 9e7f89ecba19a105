"""Shared pytest fixtures: an initialised embedded cluster and an in-process CLI runner."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from chiba_admin.cli import main
from support.cluster import DEMO

# fixtures that live in tests/support (the testbed, a loopback sshd, `cluster`), for every
# test file
pytest_plugins = ["support.testbed", "support.ssh", "support.backends", "support.shm"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run `chiba-admin ARGS` in-process; returns CliResult(code, out, err)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """An initialised embedded demo cluster in a temporary state dir; yields its Topology."""
    from chiba_admin.embedded import bind, init_cluster
    from topology import load_topology

    state = tmp_path / "state"
    monkeypatch.setenv("CHIBA_STATE", str(state))
    monkeypatch.setenv("CHIBA_CLUSTER", DEMO)
    topo = bind(load_topology(DEMO), state)
    init_cluster(topo)
    return topo
