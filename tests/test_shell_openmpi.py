"""``--mpi=openmpi`` in a `chiba-admin shell` job: an Open MPI 5 program (PMIx only) handed
to Open MPI's own mpiexec with the job's hosts and slots, so it runs as one job of N ranks;
without it the shell says what happened and what to do."""

from __future__ import annotations

import subprocess
import sys

from mpitools.shell.openmpi import handoff

from test_shell import shell

RANKS = ("from mpi4py import MPI; import os, sys; c = MPI.COMM_WORLD; "
         "print('rank', c.rank, 'of', c.size, os.environ.get('MYVAR')); "
         "sys.exit(3 if c.rank == 1 and len(sys.argv) > 1 else 0)")


def no_shell_left() -> None:
    """No rank of a shell started from this checkout runs (other checkouts may run theirs)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if ("mpitools.shell.ranks" in ln or "prterun" in ln
                                                 or "prted" in ln)
                and sys.executable in ln]


def test_handoff_builds_mpiexec_from_the_job():
    job = {"hosts": ["a", "b", "c"], "ppn": 2,
           "openmpi": {"argv": ["/v/mpiexec", "-n", "3", "--host", "a:2,b:2,c:2",
                                "--map-by", "slot"], "env": {"X": "1"}, "embedded": False}}
    req = {"argv": ["prog", "-v"], "env": {"PATH": "/bin", "SLURM_JOB_ID": "9", "A": "2",
                                           "BASH_FUNC_f%%": "()"},
           "ntasks": 3, "nodes": 2, "stdin": "all"}
    out = handoff(req, job)
    assert out["argv"] == ["/v/mpiexec", "-n", "3", "--host", "a:2,b:2", "--map-by", "slot",
                           "-x", "A", "-x", "PATH", "prog", "-v"]
    assert out["env"] == {"PATH": "/bin", "A": "2", "BASH_FUNC_f%%": "()", "X": "1"}
    assert (out["ntasks"], out["nodes"], out["stdin"]) == (1, None, "none")
    assert handoff({**req, "ntasks": None, "nodes": None}, job)["argv"][2] == "6"


def test_open_mpi_program_runs_as_one_job_of_n(embedded, tmp_path):
    r = shell(embedded, tmp_path, f"""
export MYVAR=seen
srun --mpi=openmpi -n 4 {sys.executable} -c "{RANKS}"
echo "rc=$?"
mpiexec --mpi openmpi -n 3 {sys.executable} -c "{RANKS}" fail
echo "rc=$?"
mpiexec -n 2 {sys.executable} -c "{RANKS}"
echo "rc=$?"
""", "--nodes", "ccn[01-04]", "--slurm")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    first, second, third = out.split("rc=")[:3]
    assert sorted(ln for ln in first.splitlines() if ln.startswith("rank")) == \
        [f"rank {i} of 4 seen" for i in range(4)], (out, err)
    # a task's exit status comes back through mpiexec's, as any task's
    assert [ln for ln in out.splitlines() if ln.startswith("rc=")] == ["rc=0", "rc=3", "rc=0"]
    assert sorted(ln for ln in second.splitlines() if ln.startswith("rank")) == \
        [f"rank {i} of 3 seen" for i in range(3)]
    # under the shell's PMI-1 each is a job of size 1, and the wrapper says what to do
    assert "rank 0 of 1 seen" in third
    assert "never spoke PMI" in err and "run it with --mpi=openmpi" in err
    no_shell_left()
