"""MPISH on the namespace testbed: the shell's ranks over ssh-launched mpiexec, real MPICH
programs wiring up through its PMI across hosts, the example Slurm job unchanged."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


pytestmark = [pytest.mark.testbed, pytest.mark.mpi]

REPO = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("chiba-admin"))
MPICH_PY = REPO / ".venv-mpich" / "bin" / "python"


def _shell(tb, tmp_path, script: str, *opts: str, env: dict | None = None):
    path = tmp_path / "job.sh"
    path.write_text(script)
    bindir = str(Path(sys.executable).parent)
    cp = tb.exec("pres", [EXE, "--cluster", str(tb.topology_file), "shell", *opts, str(path)],
                 env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", **(env or {})},
                 timeout=300)
    return cp.returncode, cp.stdout, cp.stderr


def test_tasks_run_on_their_hosts_over_the_testbed(testbed_cluster, tmp_path):
    rc, out, err = _shell(testbed_cluster, tmp_path, """
echo "script on $(hostname)"
srun -l hostname
pbsdsh -u sh -c 'exit $((SLURM_NODEID == 3 ? 5 : 0))'
echo "rc=$?"
""", "--nodes", "ccn[01-04]")
    assert rc == 0, err
    assert "script on ccn01" in out
    for t, host in enumerate(["ccn01", "ccn02", "ccn03", "ccn04"]):
        assert f"{t}: {host}\n" in out  # each task ran on its own host (its namespaces)
    assert "rc=5" in out


@pytest.mark.skipif(not MPICH_PY.exists(), reason="MPICH's own venv .venv-mpich is missing "
                                                   "(make creates it)")
def test_example_slurm_job_with_an_mpich_program(testbed_cluster, tmp_path):
    """examples/slurm-job.sh unchanged: 8 MPICH ranks over 4 hosts, then collect (no
    input: the stage-in from a node needs a served spool, SPOOL_URL, on a real cluster)."""
    env = {"MPI_PROGRAM": f"{MPICH_PY} {REPO / 'examples' / 'allreduce.py'}"}
    script = (REPO / "examples" / "slurm-job.sh").read_text()
    # the submit directory: results land beside the input, as sbatch users expect
    cp = testbed_cluster.exec(
        "pres", ["sh", "-c", f"cd {tmp_path} && exec {EXE} --cluster "
                 f"{testbed_cluster.topology_file} -q shell --slurm --nodes 'ccn[01-04]' "
                 f"{REPO / 'examples' / 'slurm-job.sh'}"],
        env={**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:"
                                          f"{os.environ['PATH']}"}, timeout=300)
    assert cp.returncode == 0, cp.stderr
    ranks = [ln for ln in cp.stdout.splitlines() if "sum 28" in ln]
    assert len(ranks) == 8, cp.stdout  # 8 MPICH ranks wired up through the shells' PMI
    assert {ln.split(" on ")[1].split(":")[0] for ln in ranks} == \
        {"ccn01", "ccn02", "ccn03", "ccn04"}
    results = [p for p in tmp_path.iterdir() if p.name.startswith("results-")]
    assert len(results) == 1 and sorted(p.name for p in results[0].iterdir()) == \
        ["ccn01", "ccn02", "ccn03", "ccn04"]
    assert "#SBATCH" in script  # the example is a real Slurm script, run unchanged
