"""The `shell` bench workload (issue 17's benchmarks): `chiba-admin shell` against separate
launches, srun and MPICH's own mpiexec; its rows, their aggregation and the report table."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from chiba_admin.bench import aggregate, suites
from chiba_admin.bench.render import to_markdown
from chiba_admin.bench.shellbench import MPICH_PYTHON

CLUSTER = {"kind": "testbed", "node_bps": 20e6, "mayor_bps": 200e6}


def _rec(runs):
    return {"schema": "chiba-bench/2", "suite": "shell", "cluster": CLUSTER, "runs": runs,
            "date": "2026-11-30", "commit": "abc1234"}


def _run(case, method, seconds, nodes=8, **kw):
    return {"workload": "shell", "case": case, "method": method, "nodes": nodes, "ok": True,
            "seconds": seconds, "cpu_busy": 0.4, **kw}


def test_shell_rows_compare_each_case_with_the_shell_and_the_targets():
    runs = [_run("command", "shell", s) for s in (0.1, 0.15, 0.3)]
    runs += [_run("command", "run", 0.9), _run("command", "mpiexec", 1.5),
             _run("command", "srun", 0.45), _run("command", "shell", 0.6, nodes=32),
             _run("mpi_init", "shell", 0.8), _run("mpi_init", "hydra", 1.0),
             _run("pipeline", "shell", 6.0, inner_launch={"stage": "mpiexec"}),
             _run("pipeline", "separate", 8.5, inner_launch={"stage": "mpiexec"}),
             {**_run("command", "srun", 0.0, nodes=32), "ok": False, "skipped": "no Slurm"}]
    rows = aggregate.shell_rows([_rec(runs)])
    got = [(r["nodes"], r["case"], r["label"]) for r in rows]
    assert got == [(8, "command", "srun in one shell job"), (8, "command", "chiba-admin run"),
                   (8, "command", "mpiexec (Open MPI)"), (8, "command", "srun (Slurm)"),
                   (8, "mpi_init", "shell's PMI"), (8, "mpi_init", "MPICH mpiexec (hydra)"),
                   (8, "pipeline", "one shell job"), (8, "pipeline", "three commands"),
                   (32, "command", "srun in one shell job")]  # a skipped run is no row
    by = {(r["nodes"], r["case"], r["method"]): r for r in rows}
    sh = by[8, "command", "shell"]
    assert sh["median_s"] == 0.15 and sh["target"] == "< 0.2 s" and sh["met"] is True
    assert by[32, "command", "shell"]["met"] is False  # 0.6 s against 0.5 s
    assert by[8, "command", "srun"]["vs_shell"] == pytest.approx(3.0)
    assert by[8, "command", "shell"]["vs_shell"] is None
    init = by[8, "mpi_init", "shell"]
    assert init["ratio"] == pytest.approx(0.8) and init["met"] is True
    assert by[8, "pipeline", "separate"]["saved_s"] == pytest.approx(2.5)
    assert by[8, "pipeline", "shell"]["inner_launch"] == {"stage": "mpiexec"}
    md = to_markdown(aggregate.report_dict([_rec(runs)]))
    table = md.split("### The parallel shell (chiba-admin shell)")[1].split("###")[0]
    assert "| 8 | command | srun in one shell job | 0.150 |" in table
    assert "| 8 | mpi_init | shell's PMI | 0.800 |" in table and "| 0.80 | <= 1.0 x hydra |" \
        in table


def test_shell_suite_plans():
    plan = suites.describe_plan(suites.SUITES["shell"]("testbed"), "testbed")
    assert [(s["workload"], s["shape"], s["nodes"]) for s in plan] == [
        ("shell", "2x4", 8), ("shell", "4x8", 32)]
    (small,) = suites.describe_plan(suites.SUITES["shell"]("embedded"), "embedded")
    assert small["repeat"] == 1 and small["site"] == "embedded"


def test_bench_shell_refuses_options_of_its_own(cli):
    r = cli("bench", "shell", "--where", "embedded", "--repeat", "2", "--dry-run")
    assert r.code == 2 and "--repeat" in r.err


@pytest.mark.mpi
def test_embedded_bench_shell_runs_every_method_and_the_report_shows_them(cli):
    """`chiba-admin bench shell` on the embedded cluster with real mpiexec, the shell, run
    and (when its venv exists) MPICH: one record, a well-formed row per method and case
    (srun skipped off the testbed), rendered in the report's shell table."""
    work = Path(tempfile.mkdtemp(prefix="cbs-", dir="/tmp"))  # short: Unix socket paths
    try:
        r = cli("-q", "--json", "bench", "shell", "--where", "embedded", "--out",
                work / "results", "--workdir", work)
        assert r.code == 0, r.err
        (path,) = json.loads(r.out)["records"]
        rec = json.loads(Path(path).read_text())
        r = cli("report", "--markdown", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert rec["suite"] == "shell" and rec["cluster"]["kind"] == "embedded"
    runs = {(x["case"], x["method"]): x for x in rec["runs"]}
    mpich = MPICH_PYTHON.exists()
    want = {("command", m) for m in ("shell", "run", "mpiexec", "srun")}
    want |= {("mpi_init", "shell"), ("mpi_init", "hydra"), ("pipeline", "shell"),
             ("pipeline", "separate")}
    assert set(runs) == want
    assert "testbed" in runs["command", "srun"]["skipped"]
    for key, x in runs.items():
        assert x["workload"] == "shell" and x["nodes"] == 2 and "cpu_busy" in x
        if x.get("skipped"):
            assert key == ("command", "srun") or not mpich, x
            continue
        assert x["ok"], x
        assert x["seconds"] > 0 and 0 <= x["cpu_busy"] <= 1
    for m in ("shell", "run", "mpiexec"):  # every command timed, each checked
        assert len(runs["command", m]["per_command"]) == 5
    if mpich:
        assert len(runs["mpi_init", "shell"]["init_s"]) == 1
        for m in ("shell", "separate"):
            p = runs["pipeline", m]
            assert set(p["steps"]) == {"stage", "program", "collect"}
            assert set(p["inner_launch"]) == {"stage", "collect"}
    assert r.code == 0, r.err
    table = r.out.split("### The parallel shell (chiba-admin shell)")[1].split("###")[0]
    assert "| 2 | command | srun in one shell job |" in table
    assert "| 2 | command | chiba-admin run |" in table
    assert ("| 2 | mpi_init | shell's PMI |" in table) == mpich


class _TestbedSite:
    """What _Bench reads of a testbed Site: kind, state directory, CLI arguments."""

    kind = "testbed"
    cluster_args = ["--cluster", "testbed.toml"]

    def __init__(self, state: Path):
        self.testbed_state = state


def test_hydra_goes_over_the_testbeds_ssh_with_its_interface_pinned(tmp_path):
    from chiba_admin.bench.shellbench import _Bench, _hydra_argv, _job_script

    b = _Bench(_TestbedSite(tmp_path / "state"), ["ccn01", "ccn02"], tmp_path)
    argv = _hydra_argv(b, ["prog"])
    assert argv[0].endswith(".venv-mpich/bin/mpiexec") and argv[-1] == "prog"
    i = argv.index("-launcher-exec")
    assert argv[i - 2:i] == ["-launcher", "ssh"]
    wrapper = Path(argv[i + 1]).read_text()
    assert f"ssh -F {tmp_path / 'state' / 'ssh' / 'ssh_config'} \"$@\"" in wrapper
    assert Path(argv[argv.index("-f") + 1]).read_text() == "ccn01:1\nccn02:1\n"
    assert argv[argv.index("-iface") + 1] == "eth0"
    assert ["-genv", "FI_TCP_IFACE", "eth0"] == argv[argv.index("-genv"):][:3]
    # the shell job's MPICH tasks get the same pinning, and the script is valid bash
    script = _job_script(b, tmp_path, 20, 3)
    assert "export FI_TCP_IFACE=eth0" in script and "mpiexec -n 2 " in script
    assert "srun hostname" in script and "seq 1 20" in script
    import subprocess

    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_init_max_is_read_when_another_ranks_output_follows_on_its_line():
    """MPICH's mpiexec on the testbed printed ``init_max 0.592734rank 1 of 8 ...``."""
    from chiba_admin.bench.shellbench import _init_max

    assert _init_max("rank 0 of 8\ninit_max 0.592734rank 1 of 8 on ccn02\n") == 0.592734
    assert _init_max("init_max 1.5\n") == 1.5
    assert _init_max("rank 14 of 32 on ccn15: sum 496, init 2.05 sinit_max 3.115719\n") == \
        3.115719
    assert _init_max("rank 0 of 8\n") is None
