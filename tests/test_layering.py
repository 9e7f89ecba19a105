"""The layering rules of the code, checked: lean rank programs, short functions, an errors
module that imports nothing of the project, and rank programs that run unchanged on a
sub-communicator of a longer-running MPI job (as the service runs them)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("chiba_admin", "topology", "inventory", "legacy_transit", "mpitools", "testbed")
RANK_PROGRAMS = ("mpitools.stage.ranks", "mpitools.collect.ranks", "mpitools.sync.ranks",
                 "mpitools.ping.ranks", "mpitools.shell.ranks", "mpitools.shell.client")
# numpy cost 0.13-0.2 s of CPU per rank, urllib 50 ms (only stage's rank 0 downloads)
HEAVY = ("rich", "click", "networkx", "topology", "numpy", "ClusterShell", "urllib.request",
         "concurrent.futures", "logging", "secrets", "traceback")
MAX_LINES = 80
# functions over MAX_LINES allowed (none: keep it that way)
TOO_LONG: set[tuple[str, str]] = set()  # none left


def _loaded(module: str, rank: str) -> list[str]:
    code = ("import sys, json, " + module + "; print(json.dumps(sorted(m for m in sys.modules"
            f" if m in {HEAVY!r} or (m.startswith('chiba_admin.') and m != 'chiba_admin.errors'))))")
    env = {**{k: v for k, v in os.environ.items() if k != "PMIX_RANK"}, "PMIX_RANK": rank}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), env=env, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("module", RANK_PROGRAMS)
def test_rank_programs_import_lean(module):
    """Every rank pays for its imports at start-up: no rich, click, networkx, topology or
    numpy, and of the CLI package only chiba_admin.errors (rank 0 and the others)."""
    for rank in ("0", "1"):
        assert _loaded(module, rank) == [], (module, rank)


def _functions():
    for path in sorted((REPO / "mpitools").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, node


def test_no_function_in_mpitools_is_over_80_lines():
    long = {(rel, f.name): f.end_lineno - f.lineno + 1 for rel, f in _functions()
            if f.end_lineno - f.lineno + 1 > MAX_LINES}
    assert set(long) <= TOO_LONG, {k: v for k, v in long.items() if k not in TOO_LONG}


def test_errors_module_imports_nothing_of_the_project():
    tree = ast.parse((REPO / "chiba_admin" / "errors.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            imported.add(node.module or "")
    assert not {m for m in imported if m.split(".")[0] in PROJECT}, imported


# Ending the process or taking signals is rank_main's alone: main(comm, job) also runs
# on a sub-communicator inside a long-running job. Known exceptions: the fault that
# kills a rank on purpose, and work of others in progress (this list only shrinks).
_ENDERS = {"_exit", "Abort", "Finalize", "signal", "exit"}
_ALLOWED_ENDERS = {("mpitools/common/runtime.py", "rank_main"),
                   ("mpitools/common/faults.py", "_apply"),
                   ("mpitools/shell/ranks.py", "kill_everything"),
                   # the service's worker ends its job as rank_main would (a lost peer)
                   ("mpitools/service/ranks.py", "_abort"),
                   ("mpitools/shell/ranks.py", "stop_all")}


def test_only_rank_main_ends_the_process_or_installs_signal_handlers():
    found = set()
    for rel, f in _functions():
        if not (rel.endswith("/ranks.py") or rel.startswith("mpitools/common/")):
            continue
        for node in ast.walk(f):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _ENDERS
                    and not (node.func.attr == "exit" and ast.unparse(node.func) != "sys.exit")
                    and not (node.func.attr == "signal"
                             and ast.unparse(node.func) != "signal.signal")):
                found.add((rel, f.name))
    assert found <= _ALLOWED_ENDERS, found - _ALLOWED_ENDERS


def test_no_rank_program_names_comm_world():
    for module in RANK_PROGRAMS[:5]:
        path = REPO / (module.replace(".", "/") + ".py")
        assert "COMM_WORLD" not in path.read_text(), module


# -- every main(comm, job) on a sub-communicator ----------------------------------------------
_SUBCOMM = '''
"""Run a tool's main(comm, job) on a sub-communicator, as the service will: one rank of
the job sits out, the tool's ranks after its rank 0 come in reverse order."""
import importlib

from mpitools.common.runtime import emit, rank_hosts, rank_main, wait


def main(comm, job):
    from mpi4py import MPI

    world = rank_hosts({})  # the launcher's CHIBA_RANK_HOSTS: one host per world rank
    members = [r for r in range(comm.size) if world[r] != job["idle"]]
    order = members[:1] + members[:0:-1]
    mine = comm.rank in order
    sub = comm.Split(0 if mine else MPI.UNDEFINED, order.index(comm.rank) if mine else 0)
    ran = None
    if mine:
        inner = {**job["job"], "rank_hosts": [world[r] for r in order]}
        code = importlib.import_module(job["tool"]).main(sub, inner)
        ran = {"world": comm.rank, "sub": sub.rank, "code": code,
               "host": rank_hosts(inner)[sub.rank]}
        sub.Free()
    wait(comm.Ibarrier())
    got = comm.gather(ran, root=0)
    if comm.rank == 0:
        emit("subcomm", ranks=[g for g in got if g is not None], world=world)
    return 0


if __name__ == "__main__":
    rank_main(main)
'''


@pytest.fixture
def via_subcomm(tmp_path, monkeypatch):
    """Make a driver launch its tool's main on a sub-communicator (plus an idle rank on
    ``idle``); returns the list the ``subcomm`` events go to."""
    from mpitools.common import launch as real
    from mpitools.common.runtime import encode_job, load_job

    (tmp_path / "subcomm_ranks.py").write_text(textwrap.dedent(_SUBCOMM))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    seen: list[dict] = []

    def install(driver, idle: str):
        def launch(topo, module, args, hosts, root=None, *, on_event=None, **kw):
            def spy(ev):
                (seen.append if ev.get("event") == "subcomm" else on_event or (lambda e: None))(ev)

            spec = {"tool": module, "job": load_job(args[0]), "idle": idle}
            return real.launch(topo, "subcomm_ranks", [encode_job(spec)], [*hosts, idle], root,
                               on_event=spy, **kw)

        monkeypatch.setattr(driver, "launch", launch)
        return seen

    return install


def _check_subcomm(seen: list[dict], tool_hosts: list[str]) -> None:
    assert len(seen) == 1, seen
    ranks = seen[0]["ranks"]
    assert [r["code"] for r in ranks] == [0] * len(tool_hosts)
    assert sorted(r["host"] for r in ranks) == sorted(tool_hosts)
    world = seen[0]["world"]
    assert all(world[r["world"]] == r["host"] for r in ranks)  # job["rank_hosts"] wins
    assert any(r["world"] != r["sub"] for r in ranks)  # not the world's numbering


@pytest.mark.mpi
def test_stage_collect_and_sync_mains_run_on_a_sub_communicator(embedded, cli, tmp_path,
                                                                 via_subcomm):
    import mpitools.collect.driver as collect_driver
    import mpitools.stage.driver as stage_driver
    import mpitools.sync.driver as sync_driver
    from support.trees import assert_same_tree, make_tree

    nodes = ["ccn01", "ccn02", "ccn03", "ccn04"]
    src = make_tree(tmp_path / "proj", big=300_000)
    seen = via_subcomm(stage_driver, "ccn08")
    r = cli("stage", src, "--nodes", ",".join(nodes), "--chunk", "64KiB", "--json")
    assert r.code == 0, r.err
    _check_subcomm(seen, nodes)
    for n in nodes:
        h = embedded.host(n)
        assert_same_tree(src, os.path.join(h.local_path(h.scratch), "proj"))

    seen.clear()
    via_subcomm(collect_driver, "ccn08")
    r = cli("collect", "proj", "--nodes", ",".join(nodes), "--dest", str(tmp_path / "out"),
            "--json", "--chunk", "16KiB")
    assert r.code == 0, r.err
    _check_subcomm(seen, [embedded.home_server.name, *nodes])
    for n in nodes:
        assert_same_tree(src, tmp_path / "out" / n / "proj")

    seen.clear()
    via_subcomm(sync_driver, "ccn08")
    r = cli("--json", "sync-mayors", src)
    assert r.code == 0, r.err
    assert r.json()["ok"] and len(seen) == 1 and len(seen[0]["ranks"]) == 3


@pytest.mark.mpi
def test_ping_main_runs_on_a_sub_communicator(embedded, tmp_path, monkeypatch):
    from mpitools.common.launch import launch
    from mpitools.common.runtime import encode_job

    (tmp_path / "subcomm_ranks.py").write_text(textwrap.dedent(_SUBCOMM))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    events: list[dict] = []
    job = {"tool": "mpitools.ping.ranks", "job": {}, "idle": "ccn04"}
    res = launch(embedded, "subcomm_ranks", [encode_job(job)], ["ccn01", "ccn02", "ccn03",
                 "ccn04"], timeout=120, on_event=events.append)
    assert res.ok, res.describe()
    result = next(e for e in events if e["event"] == "result")
    assert result["ok"] and result["size"] == 3
    assert [r["host"] for r in result["ranks"]] == ["ccn01", "ccn03", "ccn02"]
