"""`chiba-admin shell` attacked as a user and as another user would: what a review found
and fixed (each test failed before its fix).

- ``srun --bcast``: a directory on the way to DEST that another user may rename was
  accepted (only the last directory was checked), though the tasks run the copy by path.
- Ctrl-C while a task ignores SIGTERM left every node's copy behind (the ranks removed
  the copies only after waiting for the tasks, and mpiexec killed them first).
- A command whose environment has a name with ``=`` (``mpiexec -genv A=B x``) or a NUL
  aborted the whole shell job (every rank).
- Rank 0 read a request line with a 10 s timeout per ``recv``: a client trickling a byte
  every few seconds held rank 0 (every command, the script's output) for as long as it
  liked; now 10 s in all.
- ``srun -N 2 prog`` ran every slot of the job instead of one task per node (Slurm);
  ``-N2`` and ``-n4`` were refused as unknown options; ``srun --mpi=openmpi -N 2 -n 2``
  put both tasks on the first node (Open MPI fills a host's slots first).
- A ``$CHIBA_SHELL_SOCKET`` of another user was refused (nothing sent) but named three
  times in the one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from mpitools.common.unixsock import readline
from mpitools.shell.client import UsageError as WrapperUsage
from mpitools.shell.client import parse
from mpitools.shell.openmpi import handoff
from mpitools.shell.tasks import LocalTasks
from support.procs import default_sigint

from test_shell import BIN, shell
from test_shell_bcast import _copies, no_shell_left, scratch_of


# pure parts ----------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_bcast_refuses_a_directory_on_the_way_that_others_may_rename(tmp_path):
    copies, scratch = _copies(tmp_path)
    (scratch / "ww" / "sub").mkdir(parents=True)
    (scratch / "ww").chmod(0o777)  # anyone may rename ww/sub and put their own sub there
    with pytest.raises(ValueError, match=r"/scratch/ww is writable by others"):
        copies._create({"dest": "ww/sub/prog"}, 1)
    assert not (scratch / "ww" / "sub" / "prog").exists() and not copies.made
    (scratch / "ww").chmod(0o1777)  # sticky: only root may rename root's sub
    made = copies._create({"dest": "ww/sub/prog"}, 1)
    os.close(made[2])
    copies.remove_all()
    os.chown(scratch / "ww", 65534, 65534)  # another user's: they may rename inside it
    with pytest.raises(ValueError, match="/scratch/ww belongs to uid 65534"):
        copies._create({"dest": "ww/sub/prog"}, 1)


def test_a_trickled_request_line_has_one_deadline_in_all():
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b'{"argv": ')  # no newline, and more would keep coming
        with pytest.raises(TimeoutError, match="no whole request line in time"):
            readline(a, 1 << 20, time.monotonic() - 1)
        b.sendall(b'["true"]}\nrest')
        assert readline(a, 1 << 20, time.monotonic() + 60) == (b'{"argv": ["true"]}', b"rest")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another user needs root")
def test_another_users_shell_socket_is_named_once(tmp_path):
    from mpitools.service.driver import shell_job

    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        os.chown(path, 65534, 65534)
        job, why = shell_job({"CHIBA_SHELL_SOCKET": str(path)})
    assert job is None and why.count(str(path)) == 1
    assert "not a socket of uid 0 (it belongs to uid 65534); not used" in why


def test_srun_nodes_alone_runs_one_task_per_node():
    env = {"PATH": "/bin"}
    assert parse("srun", ["-N", "2", "hostname"], env)["ntasks"] == 2
    assert parse("srun", ["--nodes=3", "hostname"], env)["ntasks"] == 3
    r = parse("srun", ["-N2", "-n4", "hostname"], env)
    assert (r["nodes"], r["ntasks"], r["argv"]) == (2, 4, ["hostname"])
    assert parse("srun", ["-N", "2", "--ntasks-per-node=3", "x"], env)["ntasks"] == 6
    assert parse("mpiexec", ["-n4", "x"], env)["ntasks"] == 4
    assert parse("mpiexec", ["-np", "3", "x"], env)["ntasks"] == 3


def test_openmpi_handoff_spreads_over_the_nodes_asked():
    job = {"hosts": ["a", "b", "c"], "ppn": 4,
           "openmpi": {"argv": ["/v/mpiexec", "-n", "0", "--host", "x"], "env": {},
                       "embedded": True}}
    req = parse("srun", ["--mpi=openmpi", "-N", "2", "prog"], {"PATH": "/bin"})
    assert handoff(req, job)["argv"][:5] == ["/v/mpiexec", "-n", "2", "--host", "a:1,b:1"]
    req = parse("srun", ["--mpi=openmpi", "-n", "6", "prog"], {"PATH": "/bin"})
    assert handoff(req, job)["argv"][:5] == ["/v/mpiexec", "-n", "6", "--host",
                                             "a:4,b:4,c:4"]


def test_genv_name_with_equals_is_bad_input():
    with pytest.raises(WrapperUsage, match="without '='"):
        parse("mpiexec", ["-genv", "A=B", "c", "true"], {"PATH": "/bin"})


@pytest.mark.parametrize("argv,env,cwd,status,words", [
    (["true"], {"A=B": "c"}, None, 126, "illegal environment variable name"),
    (["true"], {"A": "c\0d"}, None, 126, "embedded null byte"),
    (["tr\0ue"], {}, None, 126, "embedded null byte"),
    (["true"], {}, "/no/such/dir/here", 127, "no working directory /no/such/dir/here"),
])
def test_a_task_that_cannot_start_is_that_task_s_error(argv, env, cwd, status, words):
    tasks = LocalTasks()
    tasks.start(0, argv, {"PATH": os.defpath, **env}, cwd)
    assert tasks.statuses() == {0: status} and words in tasks.errors()[0]


# whole jobs ----------------------------------------------------------------------------
BAD_ENV_CLIENT = r"""
import json, os, socket
c = socket.socket(socket.AF_UNIX)
c.connect(os.environ["CHIBA_SHELL_SOCKET"])
c.sendall(json.dumps({"argv": ["true"], "env": {"A=B": "c"}}).encode() + b"\n")
c.shutdown(socket.SHUT_WR)
print(c.makefile("rb").read().decode().strip().splitlines()[-1])
"""


def test_bad_env_ends_the_command_not_the_job(embedded, tmp_path):
    (tmp_path / "client.py").write_text(BAD_ENV_CLIENT)
    r = shell(embedded, tmp_path, f"""
{BIN}/python client.py
srun -N 2 sh -c 'echo "task $SLURM_PROCID on $CHIBA_HOST"'
echo "rc=$?"
""", "--nodes", "ccn[01-03]", "--ppn", "2")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert '"rc":126' in out and "illegal environment variable name" in out
    assert sorted(ln for ln in out.splitlines() if ln.startswith("task ")) == \
        ["task 0 on ccn01", "task 1 on ccn02"]
    assert "rc=0" in out
    no_shell_left()


STUBBORN = """#!/bin/sh
trap '' TERM INT
echo "started $CHIBA_HOST"
exec sleep 60
"""


def test_ctrl_c_while_tasks_ignore_sigterm_leaves_no_copy(embedded, tmp_path):
    prog = tmp_path / "stubborn"
    prog.write_text(STUBBORN)
    prog.chmod(0o755)
    job = tmp_path / "job.sh"
    job.write_text(f"srun --bcast=keep/ {prog}\n")
    copies = [scratch_of(embedded, h) / "keep" for h in ("ccn01", "ccn02")]
    for c in copies:
        c.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.Popen([str(BIN / "chiba-admin"), "shell", "--nodes", "ccn[01-02]",
                          str(job)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        started = [p.stdout.readline() for _ in range(2)]  # both tasks run their copy
        assert sorted(started) == [b"started ccn01\n", b"started ccn02\n"]
        assert all(len(list(c.iterdir())) == 1 for c in copies)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err.decode()
    assert [list(c.iterdir()) for c in copies] == [[], []]
    no_shell_left()
