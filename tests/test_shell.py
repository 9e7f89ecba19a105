"""MPISH (`chiba-admin shell`): directives, placement, the wrappers' options, and whole
jobs through real mpiexec on the embedded cluster (MPICH programs through its PMI)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpitools.shell.client import UsageError as WrapperUsage
from mpitools.shell.client import parse
from mpitools.shell.directives import (DirectiveError, nodefile_text, parse_pbs, parse_slurm,
                                       parse_walltime)
from mpitools.shell.ranks import mapping_blocks, place_tasks
from support.procs import default_sigint

REPO = Path(__file__).resolve().parent.parent
MPICH_PY = REPO / ".venv-mpich" / "bin" / "python"
BIN = Path(sys.executable).parent


# pure parts -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,secs", [("30", 30), ("10:00", 600), ("1:30:00", 5400),
                                       ("2-00:00:00", 172800), ("1-2", 93600)])
def test_walltime(text, secs):
    assert parse_walltime(text) == secs


@pytest.mark.parametrize("text", ["abc", "0", "", "1:2:3:4", "-5"])
def test_walltime_refused(text):
    with pytest.raises(ValueError):
        parse_walltime(text)


def test_pbs_directives_stop_at_the_first_command():
    req = parse_pbs("#!/bin/bash\n#PBS -N job1\n#PBS -l nodes=3:ppn=2,walltime=00:05:00\n"
                    "#PBS -j oe\n#PBS -V -v A=1,B\n\necho hi\n#PBS -N ignored\n")
    assert (req.name, req.nodes, req.ppn, req.walltime, req.join, req.export_all) == \
        ("job1", 3, 2, 300.0, True, True)
    assert req.variables == {"A": "1", "B": ""}
    assert nodefile_text(["a", "b"], 2) == "a\na\nb\nb\n"


@pytest.mark.parametrize("line,words", [("#PBS -l nodes=0", "nodes=0 must be at least 1"),
                                        ("#PBS -l walltime=abc", "walltime 'abc'"),
                                        ("#PBS -l nodes=x", "not a whole number"),
                                        ("#PBS -q batch", "unsupported #PBS option")])
def test_pbs_bad_directives_name_file_and_line(line, words):
    with pytest.raises(DirectiveError) as e:
        parse_pbs(f"#!/bin/sh\n{line}\n", "job.sh")
    assert str(e.value).startswith("job.sh:2: ") and words in str(e.value)


def test_slurm_directives():
    req = parse_slurm("#!/bin/bash\n#SBATCH -N 2 --ntasks-per-node=3\n#SBATCH --time=1:00\n"
                      "#SBATCH -J x -o out.txt\nsrun hostname\n")
    assert (req.nodes, req.ppn, req.walltime, req.name, req.stdout) == (2, 3, 60, "x",
                                                                         "out.txt")
    with pytest.raises(DirectiveError, match="unsupported #SBATCH option"):
        parse_slurm("#SBATCH --gres=gpu:1\n")


def test_placement_and_process_mapping():
    assert place_tasks(8, 4, 2) == {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7]}
    assert place_tasks(3, 4, 2) == {0: [0, 1], 1: [2]}
    assert place_tasks(4, 4, 2, use_nodes=4) == {0: [0], 1: [1], 2: [2], 3: [3]}
    assert mapping_blocks(place_tasks(3, 4, 2)) == "(vector,(0,1,2),(1,1,1))"
    assert mapping_blocks(place_tasks(8, 4, 2)) == "(vector,(0,4,2))"
    with pytest.raises(ValueError, match="9 tasks asked, the job has 8 slots"):
        place_tasks(9, 4, 2)


def test_wrapper_options():
    env = {"PATH": "/bin", "X": "1", "CHIBA_HOST": "n"}
    r = parse("mpiexec", ["-n", "4", "-x", "Y=2", "-l", "prog", "-n", "5"], env)
    assert (r["ntasks"], r["label"], r["argv"], r["env"]["Y"]) == (4, True, ["prog", "-n", "5"],
                                                                  "2")
    r = parse("srun", ["-N", "2", "--ntasks-per-node=3", "--export=NONE,Z=9", "a.out"], env)
    assert (r["nodes"], r["ntasks"], r["env"]) == (2, 6, {"PATH": "/bin", "CHIBA_HOST": "n",
                                                          "Z": "9"})
    # srun -N without -n runs one task per node (Slurm's default), -n still wins
    assert parse("srun", ["-N", "2", "hostname"], env)["ntasks"] == 2
    assert parse("srun", ["-N", "2", "-n", "4", "hostname"], env)["ntasks"] == 4
    assert parse("mpiexec", ["-N", "2", "hostname"], env)["ntasks"] is None
    assert parse("pbsdsh", ["-u", "hostname"], env)["per_node"] is True
    for bad in (["-n", "0", "x"], ["--frobnicate", "x"], ["-n", "4"]):
        with pytest.raises(WrapperUsage):
            parse("mpiexec", bad, env)


# whole jobs ----------------------------------------------------------------------------
def shell(embedded, tmp_path, script: str, *opts: str, env: dict | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    path = tmp_path / "job.sh"
    path.write_text(script)
    full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([str(BIN / "chiba-admin"), "shell", *opts, str(path)],
                          capture_output=True, env=full, timeout=timeout, cwd=tmp_path)


def no_shell_left() -> None:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    # this checkout's ranks and their run directories only: other checkouts may run shell
    # jobs on the same machine at the same time
    mine = [ln.split()[0] for ln in ps.splitlines()
            if f"{sys.executable} -m mpitools.shell.ranks" in ln]
    assert not mine
    assert not [d for d in os.listdir("/tmp") if d.startswith("chiba-shell-")
                and os.stat(f"/tmp/{d}").st_uid == os.getuid() and _ours(d)]


def _ours(rundir: str) -> bool:
    """Whether a shell run directory holds wrappers of this checkout's Python."""
    try:
        with open(f"/tmp/{rundir}/bin/srun") as f:
            return sys.executable in f.read()
    except OSError:
        return False  # gone meanwhile, or not a wrapper directory


def test_the_script_and_its_tasks_do_not_inherit_the_ranks_forced_mca(embedded, tmp_path):
    """The shell's ranks run with OMPI_MCA_mpi_yield_when_idle (our tools yield the core)
    and UCX_MEM_EVENTS=no; the user's script, and the MPI programs and tasks it starts,
    keep Open MPI's and UCX's defaults."""
    r = shell(embedded, tmp_path, """
env | grep -c -e OMPI_MCA_mpi_yield_when_idle -e CHIBA_FORCED_ENV -e UCX_MEM_EVENTS
mpiexec -n 2 sh -c 'env | grep -c -e OMPI_MCA_mpi_yield_when_idle -e CHIBA_FORCED_ENV -e UCX_MEM_EVENTS'
exit 0
""", "--nodes", "ccn[01-02]")
    assert r.returncode == 0, r.stderr.decode()
    assert [ln.strip() for ln in r.stdout.decode().splitlines() if ln.strip().isdigit()] == [
        "0", "0", "0"], r.stdout.decode()


def test_parallel_commands_labels_statuses_and_errors(embedded, tmp_path):
    r = shell(embedded, tmp_path, """
mpiexec -n 4 -l sh -c 'echo "out $SLURM_PROCID $CHIBA_HOST"; echo "err $PMI_RANK" >&2'
echo "rc=$?"
srun -N 2 -n 2 sh -c 'exit $((SLURM_PROCID + 3))'
echo "rc=$?"
mpiexec -n 2 sh -c 'kill -9 $$'
echo "rc=$?"
mpiexec -n 2 no-such-command-here
echo "rc=$?"
mpiexec -n 99 true
echo "rc=$?"
exit 7
""", "--nodes", "ccn[01-04]")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 7, err  # the shell's status is the script's
    for t, host in enumerate(["ccn01", "ccn02", "ccn03", "ccn04"]):
        assert f"{t}: out {t} {host}\n" in out and f"{t}: err {t}\n" in err
    assert out.count("rc=0") == 1 and "rc=4" in out and "rc=137" in out
    assert "rc=127" in out and "ccn01: task 0: command not found: no-such-command-here" in err
    assert "ccn02: task 1: command not found" in err
    assert "99 tasks asked, the job has 4 slots" in err and "rc=1" in out
    no_shell_left()


def test_output_is_complete_ordered_and_binary_intact(embedded, tmp_path):
    gen = tmp_path / "gen.py"
    gen.write_text("import os, sys\nt = int(os.environ['SLURM_PROCID'])\n"
                   "sys.stdout.write(''.join(f'{t} {i}\\n' for i in range(200000)))\n")
    blob = tmp_path / "blob.py"
    blob.write_text("import random, sys\nr = random.Random(5)\n"
                    "sys.stdout.buffer.write(bytes(r.getrandbits(8) for _ in range(1 << 20)))\n")
    r = shell(embedded, tmp_path, f"""
srun -l -n 4 {sys.executable} {gen} > lines.txt
srun -n 1 {sys.executable} {blob} > blob.bin
""", "--nodes", "ccn[01-04]")
    assert r.returncode == 0, r.stderr.decode()
    per: dict[str, list[int]] = {}
    for line in (tmp_path / "lines.txt").read_text().splitlines():
        label, t, i = line.split()
        assert label == f"{t}:"
        per.setdefault(t, []).append(int(i))
    assert {t: v == list(range(200000)) for t, v in per.items()} == \
        {str(t): True for t in range(4)}  # 10 MB over 4 tasks, every line, in order
    import random
    rng = random.Random(5)
    want = bytes(rng.getrandbits(8) for _ in range(1 << 20))
    assert hashlib.sha256((tmp_path / "blob.bin").read_bytes()).hexdigest() == \
        hashlib.sha256(want).hexdigest()


def test_pbs_job_environment_nodefile_and_home(embedded, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = shell(embedded, tmp_path, """#!/bin/bash
#PBS -N myjob
#PBS -l nodes=2:ppn=3
echo "$PBS_JOBNAME $PBS_NUM_NODES $PBS_NUM_PPN $PBS_NP $(pwd)"
cat "$PBS_NODEFILE"
pbsdsh sh -c 'echo "$PBS_VNODENUM $CHIBA_HOST"' | sort -n
""", "--pbs", "--nodes", "ccn[01-04]", env={"HOME": str(home)})
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert f"myjob 2 3 6 {home}\n" in out  # Torque starts in $HOME
    assert "ccn01\nccn01\nccn01\nccn02\nccn02\nccn02\n" in out
    assert "0 ccn01\n1 ccn01\n2 ccn01\n3 ccn02\n4 ccn02\n5 ccn02\n" in out


def test_slurm_job_environment(embedded, tmp_path):
    r = shell(embedded, tmp_path, """#!/bin/bash
#SBATCH -N 3
#SBATCH --ntasks-per-node=2
echo "$SLURM_JOB_NODELIST $SLURM_NNODES $SLURM_NTASKS $SLURM_TASKS_PER_NODE $(pwd)"
srun -l sh -c 'echo "$SLURM_NODEID $SLURM_LOCALID"'
""", "--slurm", "--nodes", "ccn[01-04]")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert f"ccn[01-03] 3 6 2(x3) {tmp_path}\n" in out  # sbatch starts in the submit dir
    assert "5: 2 1\n" in out and "0: 0 0\n" in out


def _long_sleep() -> str:
    """A sleep command line no other process on the machine is likely to share."""
    return f"sleep {7000 + os.getpid() % 1000}"


def test_walltime_ends_every_task(embedded, tmp_path):
    nap = _long_sleep()
    r = shell(embedded, tmp_path, f"srun -n 4 {nap}\necho never\n", "--nodes", "ccn[01-04]",
              "--walltime", "3", timeout=60)
    assert r.returncode == 124 and b"never" not in r.stdout
    assert b"walltime of 3 s exceeded" in r.stderr
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert nap not in ps
    no_shell_left()


@pytest.mark.parametrize("script,opts,words", [
    (None, ("--nodes", "ccn01"), "job script does not exist"),
    ("#PBS -l nodes=0\n", ("--pbs", "--nodes", "ccn01"), "nodes=0 must be at least 1"),
    ("#PBS -l walltime=abc\n", ("--pbs", "--nodes", "ccn01"), "walltime 'abc'"),
    ("#PBS -l nodes=5\n", ("--pbs", "--nodes", "ccn[01-02]"), "asks for 5 nodes, 2 given"),
    ("true\n", (), "no nodes for the job"),
    ("true\n", ("--nodes", "ccn01", "--walltime", "soon"), "bad --walltime"),
])
def test_bad_input_one_line_exit_2(embedded, tmp_path, script, opts, words):
    path = tmp_path / "job.sh"
    if script is not None:
        path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PBS_NODEFILE",
                                                             "SLURM_JOB_NODELIST")}
    r = subprocess.run([str(BIN / "chiba-admin"), "shell", *opts, str(path)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# What another user would run: connect to the job's socket and ask for a command. Plain
# system Python, nothing of the checkout (another user may not read the checkout at all).
_INTRUDER = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n"
    "    s.connect(sys.argv[1])\n"
    "except OSError as e:\n"
    "    print('connect:', e.strerror, file=sys.stderr); sys.exit(1)\n"
    "s.sendall(json.dumps({'argv': ['true']}).encode() + b'\\n')\n"
    "print('reply:', s.makefile().readline().strip(), file=sys.stderr)\n"
    "sys.exit(1)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")
def test_request_from_another_user_is_refused(embedded, tmp_path):
    probe = Path("/tmp") / f"chiba-intruder-{os.getpid()}.py"
    probe.write_text(_INTRUDER)
    probe.chmod(0o644)
    nobody = (f"setpriv --reuid 65534 --regid 65534 --clear-groups /usr/bin/python3 {probe} "
              '"$CHIBA_SHELL_SOCKET"')
    try:
        r = shell(embedded, tmp_path, f"""
{nobody}
echo "rc=$?"
# even with the directory and the socket opened to everyone, the peer's uid is checked
chmod 755 "$(dirname "$CHIBA_SHELL_SOCKET")" && chmod 777 "$CHIBA_SHELL_SOCKET"
{nobody}
echo "rc=$?"
""", "--nodes", "ccn[01-02]")
    finally:
        probe.unlink()
    out, err = r.stdout.decode(), r.stderr.decode()
    assert out == "rc=1\nrc=1\n", (out, err)
    assert "connect: Permission denied" in err  # the socket's directory is the owner's, 0700
    assert "refused: uid 65534 is not the job's owner" in err


@pytest.mark.skipif(not MPICH_PY.exists(), reason="MPICH's own venv .venv-mpich is missing "
                                                   "(make creates it)")
def test_mpich_program_wires_up_through_the_shells_pmi(embedded, tmp_path):
    r = shell(embedded, tmp_path, f"""
mpiexec -n 8 {MPICH_PY} {REPO / 'examples' / 'allreduce.py'}
mpiexec -n 2 {sys.executable} -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.size)'
""", "--nodes", "ccn[01-04]", "--ppn", "2")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert sorted(ln.split(" on ")[0] for ln in out.splitlines() if "sum" in ln) == \
        sorted(f"rank {i} of 8" for i in range(8))
    assert out.count("sum 28") == 8
    # an Open MPI program cannot speak PMI-1: each task runs alone, and the shell says so
    # (it looks at each live task's mappings; a task starved of CPU on a loaded machine
    # may end unseen, so at least one of the two is named)
    assert re.search(r"[12] task\(s\) loaded Open MPI but never spoke PMI", err), err


def test_job_environment_is_exported_as_sbatch_and_qsub_do(embedded, tmp_path):
    from mpitools.shell.driver import plan_shell

    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    environ = {"PATH": "/opt/bin:/bin", "FOO": "1", "OMPI_COMM_WORLD_RANK": "3",
               "SLURM_JOB_ID": "99", "PWD": "/x"}
    job = plan_shell(embedded, str(script), ["ccn01"], mode="slurm", environ=environ).job
    assert job["env"]["FOO"] == "1" and job["env"]["PATH"] == "/opt/bin:/bin"
    assert "OMPI_COMM_WORLD_RANK" not in job["env"] and "PWD" not in job["env"]
    assert job["env"]["SLURM_JOB_ID"] != "99"  # the job's own, not an outer allocation's
    # chiba-admin inside the job works on the job's cluster
    assert job["env"]["CHIBA_CLUSTER"] == os.path.abspath(embedded.source)
    job = plan_shell(embedded, str(script), ["ccn01"], mode="pbs", environ=environ).job
    assert "FOO" not in job["env"] and job["env"]["PBS_O_PATH"] == "/opt/bin:/bin"
    script.write_text("#!/bin/sh\n#PBS -V\ntrue\n")
    job = plan_shell(embedded, str(script), ["ccn01"], mode="pbs", environ=environ).job
    assert job["env"]["FOO"] == "1"


def test_stdin_goes_to_task_0_or_to_all(embedded, tmp_path):
    """srun's rule: a command's stdin to task 0 (the others read /dev/null), or with
    --input=all to every task; whole and in order, end of file included."""
    big = tmp_path / "big.txt"
    big.write_text("".join(f"{i}\n" for i in range(100000)))
    r = shell(embedded, tmp_path, f"""
srun -n 3 -l sh -c 'wc -l; echo "task $SLURM_PROCID done"' < {big}
printf 'to all\\n' | srun -n 3 --input=all -l cat
srun -n 2 -l cat
echo "rc=$?"
""", "--nodes", "ccn[01-04]")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "0: 100000\n" in out and "1: 0\n" in out and "2: 0\n" in out
    assert all(f"{t}: to all\n" in out for t in range(3))
    assert "rc=0" in out  # the script's own stdin is /dev/null: cat ends at once


def test_sigterm_to_the_shell_ends_every_task(embedded, tmp_path):
    """SIGTERM to `chiba-admin shell` reaches every task (srun's rule); nothing is left."""
    import signal
    import select

    marks = tmp_path / "marks"
    os.mkfifo(marks)  # each task writes its rank here: an event to wait for, not a poll
    script = tmp_path / "job.sh"
    nap = _long_sleep()
    script.write_text(f"srun -n 4 sh -c 'echo $SLURM_PROCID > {marks}; exec {nap}'\n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    reader = os.open(marks, os.O_RDONLY | os.O_NONBLOCK)
    keep = os.open(marks, os.O_WRONLY)  # no end of file between the tasks' writes
    p = subprocess.Popen([str(BIN / "chiba-admin"), "shell", "--nodes", "ccn[01-04]",
                          str(script)], env=env, stderr=subprocess.PIPE,
                         preexec_fn=default_sigint)
    got = b""
    try:
        while got.count(b"\n") < 4:  # every task is running
            ready, _, _ = select.select([reader], [], [], 60)
            assert ready and p.poll() is None, p.stderr.read()
            got += os.read(reader, 64)
    finally:
        os.close(keep)
        os.close(reader)
    assert sorted(got.split()) == [b"0", b"1", b"2", b"3"]
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 143
    assert b"terminated" in p.stderr.read()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert nap not in ps
    no_shell_left()


def test_what_a_task_leaves_behind_is_ended_with_it(embedded, tmp_path):
    """srun's rule: a step ends with its tasks. A background child holding the output open
    would otherwise hang the command; a setsid'd one would outlive the job."""
    nap = _long_sleep()
    r = shell(embedded, tmp_path, f"""
srun -n 2 sh -c '{nap} & echo started'
echo "rc=$?"
srun -n 2 sh -c 'setsid {nap} >/dev/null 2>&1 < /dev/null & echo detached'
echo "rc=$?"
""", "--nodes", "ccn[01-02]", timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert out.count("started") == 2 and out.count("detached") == 2 and out.count("rc=0") == 2
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert nap not in ps
    no_shell_left()
