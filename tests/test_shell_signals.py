"""MPISH's signals and losses: srun's two-step Ctrl-C in a job's wrappers, a task or a
rank lost mid-command, and the small refusals (each a test, through real mpiexec on the
embedded cluster where a job is needed)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpitools.shell.client import Interrupts, UsageError, parse
from mpitools.shell.directives import DirectiveError, parse_slurm
from support.procs import default_sigint

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    """This process's environment as it is now, so that the ``embedded`` fixture's
    CHIBA_STATE and CHIBA_CLUSTER reach the command (built at import, it sent every job to
    the default state directory, which a fresh machine does not have)."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def _nap() -> str:
    """A sleep command line no other process on the machine is likely to share."""
    return f"sleep {8000 + os.getpid() % 1000}"


def _nothing_left(nap: str) -> None:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert nap not in ps
    # this checkout's ranks only: other checkouts may run shell jobs on the same machine
    assert f"{sys.executable} -m mpitools.shell.ranks" not in ps


class _Job:
    """A `chiba-admin shell` job whose script's tasks announce themselves on a FIFO."""

    def __init__(self, tmp_path: Path, script: str, nodes: str = "ccn[01-04]"):
        self.marks = tmp_path / "marks"
        os.mkfifo(self.marks)
        path = tmp_path / "job.sh"
        path.write_text(script.replace("MARKS", str(self.marks)))
        self.reader = os.open(self.marks, os.O_RDONLY | os.O_NONBLOCK)
        self.keep = os.open(self.marks, os.O_WRONLY)  # no end of file between writers
        self.p = subprocess.Popen([str(BIN / "chiba-admin"), "shell", "--nodes", nodes,
                                   str(path)], env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=tmp_path,
                                  preexec_fn=default_sigint)
        self.got, self.err = b"", b""

    def marked(self, n: int) -> list[bytes]:
        """Wait for ``n`` lines on the FIFO (events, not time); returns them."""
        deadline = time.monotonic() + 60
        while self.got.count(b"\n") < n:
            # a job that ended (or never started) fails the test now, not after 60 s
            ready, _, _ = select.select([self.reader], [], [], 0.2)
            assert self.p.poll() is None, self.p.stderr.read()
            assert ready or time.monotonic() < deadline, "no mark within 60 s"
            if ready:
                self.got += os.read(self.reader, 256)
        return self.got.split(b"\n")[:n]

    def srun_pid(self, tasks: int) -> int:
        """Wait for ``tasks`` task marks and the script's ``srun PID`` line; the PID."""
        lines = self.marked(tasks + 1)
        return int(next(ln for ln in lines if ln.startswith(b"srun")).split()[1])

    def stderr_until(self, words: bytes) -> bytes:
        """Read the job's stderr until ``words`` appear (the job's own output, in order)."""
        fd = self.p.stderr.fileno()
        while words not in self.err:
            ready, _, _ = select.select([fd], [], [], 60)
            chunk = os.read(fd, 4096) if ready else b""
            assert chunk, self.err
            self.err += chunk
        return self.err

    def finish(self) -> tuple[int, str, str]:
        out, err = self.p.communicate(timeout=120)
        os.close(self.keep)
        os.close(self.reader)
        return self.p.returncode, out.decode(), (self.err + err).decode()


# The srun before it runs in the background so that the test can signal it: its pid goes
# to the FIFO, and the script waits for it and prints its status.
_BACKGROUND = '&\necho "srun $!" > MARKS\nwait $!\necho "rc=$?"'


# srun's two-step Ctrl-C ------------------------------------------------------------------
def test_interrupt_rule_reports_then_aborts_within_one_second():
    """srun_job.c's _handle_intr: report; again within 1 s: abort; later: report again."""
    now = [100.0]
    sent: list[str] = []
    intr = Interrupts("srun", sent.append, clock=lambda: now[0])
    assert intr() == "status"
    now[0] += 0.9
    assert intr() == "abort"
    now[0] += 1.5  # more than 1 s after the last report
    assert intr() == "status"
    now[0] += 1.01
    assert intr() == "status"
    assert sent == ["status", "abort", "status", "status"]


def test_first_ctrl_c_reports_running_tasks_second_ends_them(embedded, tmp_path):
    nap = _nap()
    job = _Job(tmp_path, f"""
srun -n 4 sh -c 'echo $SLURM_PROCID > MARKS; exec {nap}' {_BACKGROUND}
srun -n 2 sh -c 'echo "after $SLURM_PROCID"'
""")
    pid = job.srun_pid(4)
    os.kill(pid, signal.SIGINT)
    err = job.stderr_until(b": running\n")
    assert b"srun: interrupt (one more within 1 sec to abort)\n" in err
    running = next(ln for ln in err.decode().splitlines() if ln.endswith(": running"))
    assert running == "srun: step 0: tasks 0 (ccn01), 1 (ccn02), 2 (ccn03), 3 (ccn04): running"
    os.kill(pid, signal.SIGINT)  # within a second of the report: end every task
    rc, out, err = job.finish()
    assert rc == 0, err
    assert "srun: sending Ctrl-C to the tasks" in err
    assert "rc=130\n" in out  # 128+SIGINT, as srun gives when its tasks die of Ctrl-C
    assert "after 0\n" in out and "after 1\n" in out  # the job goes on
    _nothing_left(nap)


def test_ctrl_c_that_the_tasks_ignore_is_followed_by_sigterm(embedded, tmp_path):
    """SIGINT, then SIGTERM after the grace: a task that traps SIGINT still ends."""
    nap = _nap()
    job = _Job(tmp_path, f"""
srun -n 2 sh -c 'trap "" INT; echo $SLURM_PROCID > MARKS; {nap}; exit 3' {_BACKGROUND}
""", nodes="ccn[01-02]")
    pid = job.srun_pid(2)
    os.kill(pid, signal.SIGINT)
    job.stderr_until(b": running\n")
    os.kill(pid, signal.SIGINT)
    rc, out, err = job.finish()
    assert rc == 0 and "rc=130\n" in out, (out, err)
    _nothing_left(nap)


# a task or a rank lost mid-command --------------------------------------------------------
def test_task_killed_mid_command_is_named_and_the_rest_ended(embedded, tmp_path):
    nap = _nap()
    job = _Job(tmp_path, f"""
srun -n 4 sh -c 'echo $SLURM_PROCID > MARKS; [ $SLURM_PROCID = 2 ] && kill -9 $$; exec {nap}'
echo "rc=$?"
srun -n 2 sh -c 'exit $((136 + SLURM_PROCID))'
echo "rc=$?"
srun -n 1 echo after
""")
    job.marked(4)
    rc, out, err = job.finish()
    assert rc == 0, err
    assert "srun: ccn03: task 2: killed by SIGKILL; ending the other tasks" in err
    assert "rc=137\n" in out and "after\n" in out  # the job goes on: its ranks live
    # a status above 128 from exit() is no signal: nothing lost, nothing ended
    assert "rc=137\nrc=137\n" in out and "killed by" not in err.split("task 2: killed")[1]
    _nothing_left(nap)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except OSError:
            return False
    return False


def _rank_pid(rank: int, job: subprocess.Popen) -> int:
    """The pid of rank ``rank`` of ``job`` (the embedded cluster's ranks are all local;
    only this job's: other shell jobs may run on the machine)."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or not _descends_from(int(name), job.pid):
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if b"mpitools.shell.ranks" in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(name)
    raise AssertionError(f"no rank {rank} running")


def test_rank_killed_mid_command_ends_the_job_naming_its_host(embedded, tmp_path):
    nap = _nap()
    job = _Job(tmp_path, f"""
srun -n 4 sh -c 'echo $SLURM_PROCID > MARKS; exec {nap}'
echo "rc=$?"
""")
    job.marked(4)
    os.kill(_rank_pid(2, job.p), signal.SIGKILL)  # ccn03's rank, outright
    rc, out, err = job.finish()
    assert rc == 1, err
    assert err.startswith("chiba-admin: error: ccn03: the shell job did not complete: "
                          "rank(s) died: ccn03 (process killed by signal 9"), err
    assert len(err.strip().splitlines()) == 1, err
    _nothing_left(nap)  # the dead rank's task went with it


# refusals, each one line ------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["--input=bogus", "x"], "--input 'bogus': give all, none or a task number"),
    (["-n", "0", "x"], "-n 0: must be at least 1"),
    (["--ntasks=1.5", "x"], "--ntasks '1.5': not a whole number"),
])
def test_wrapper_names_the_option_as_written(args, words):
    with pytest.raises(UsageError) as e:
        parse("srun", args, {})
    assert str(e.value) == words


@pytest.mark.parametrize("line,words", [
    ("#SBATCH -N 0", "job.sh:2: #SBATCH -N 0: must be at least 1"),
    ("#SBATCH --ntasks=1.5", "job.sh:2: #SBATCH --ntasks 1.5: not a whole number"),
    ("#SBATCH -n 1_5", "job.sh:2: #SBATCH -n 1_5: not a whole number"),
])
def test_sbatch_counts_named_as_written(line, words):
    with pytest.raises(DirectiveError) as e:
        parse_slurm(f"#!/bin/sh\n{line}\n", "job.sh")
    assert str(e.value) == words


def test_fractional_ntasks_directive_is_refused_one_line_exit_2(embedded, tmp_path):
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/sh\n#SBATCH --ntasks=1.5\ntrue\n")
    r = subprocess.run([str(BIN / "chiba-admin"), "shell", "--slurm", "--nodes", "ccn01",
                        str(path)], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 2 and f"{path}:2: #SBATCH --ntasks 1.5" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_short_walltime_warns_one_second_left_then_ends(embedded, tmp_path):
    nap = _nap()
    path = tmp_path / "job.sh"
    path.write_text(f"srun -n 2 {nap}\n")
    r = subprocess.run([str(BIN / "chiba-admin"), "shell", "--nodes", "ccn[01-02]",
                        "--walltime", "3", str(path)], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 124
    assert "walltime: 1 s left" in r.stderr and "0 s left" not in r.stderr, r.stderr
    _nothing_left(nap)


def test_request_with_a_fractional_count_is_refused(embedded, tmp_path):
    """A request on the socket says ntasks 1.5 (not the wrappers' doing): refused."""
    path = tmp_path / "job.sh"
    ask = ("import json, os, socket; s = socket.socket(socket.AF_UNIX); "
           "s.connect(os.environ['CHIBA_SHELL_SOCKET']); "
           "s.sendall(json.dumps({'argv': ['true'], 'ntasks': 1.5}).encode() + b'\\n'); "
           "print(s.makefile().readline().strip())")
    path.write_text(f"{sys.executable} -c \"{ask}\"\n")
    r = subprocess.run([str(BIN / "chiba-admin"), "shell", "--nodes", "ccn01", str(path)],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert "must be a whole number, not 1.5" in r.stdout, (r.stdout, r.stderr)


def test_pmi_protocol_error_makes_the_command_fail(embedded, tmp_path):
    """A task that sends a malformed PMI line and then exits 0: the srun's status is 1."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os, socket\n"
                   "s = socket.socket(fileno=int(os.environ['PMI_FD']))\n"
                   "s.sendall(b'\\xde\\xad\\n')\n"
                   "s.recv(10)\n")  # the shell cuts it off: end of file
    path = tmp_path / "job.sh"
    path.write_text(f"srun -n 2 {sys.executable} {bad}\necho \"rc=$?\"\n")
    r = subprocess.run([str(BIN / "chiba-admin"), "shell", "--nodes", "ccn[01-02]",
                        str(path)], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rc=1\n" in r.stdout, (r.stdout, r.stderr)
    assert "ccn01: task 0: PMI protocol error" in r.stderr


def test_ctrl_c_to_the_shell_itself_still_ends_the_job(embedded, tmp_path):
    """SIGINT to `chiba-admin shell` (a terminal's Ctrl-C) ends the whole job at once, as
    before: the wrappers' two-step rule is for the commands inside the job."""
    nap = _nap()
    job = _Job(tmp_path, f"srun -n 4 sh -c 'echo $SLURM_PROCID > MARKS; exec {nap}'\n"
                         "echo never\n")
    job.marked(4)
    job.p.send_signal(signal.SIGINT)
    rc, out, err = job.finish()
    assert rc == 130 and "never" not in out, (rc, out, err)  # the CLI's Ctrl-C status
    assert "one more within 1 sec" not in err
    _nothing_left(nap)


@pytest.mark.perf
def test_a_lost_task_ends_its_command_within_two_seconds(embedded, tmp_path):
    """The bound of _StepControl: a task's end is seen within a loop turn (1 ms) and two
    message hops, the others get SIGTERM at once (measured 0.37-0.48 s from the task's
    SIGKILL to the srun's return, 4 tasks on 4 nodes of the embedded cluster)."""
    nap = _nap()
    job = _Job(tmp_path, f"""
srun -n 4 sh -c '[ $SLURM_PROCID = 2 ] && {{ date +%s.%N > MARKS; kill -9 $$; }}; exec {nap}'
date +%s.%N > MARKS
""")
    t0, t1 = (float(x) for x in job.marked(2))
    rc, out, err = job.finish()
    assert rc == 0 and t1 - t0 < 2.0, (t1 - t0, err)
    _nothing_left(nap)
