"""``srun --bcast`` / ``mpiexec --preload-binary`` in a `chiba-admin shell` job: the program
copied to each node's own scratch by the shell's ranks and run from there; bad input
refused before anything starts; the copies removed when the job ends."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpitools.shell.bcast import dest_of, source_path
from mpitools.shell.client import UsageError as WrapperUsage
from mpitools.shell.client import parse

from test_shell import shell

DIRS = {"root": "", "scratch": "/scratch", "dest_roots": ["/data"],
        "never": ["/var/spool/chiba", "/opt/chiba/repo"]}
# prints where it runs from: the path the kernel ran (the interpreter's $0) made real
WHOAMI = '#!/bin/sh\necho "$CHIBA_HOST $(realpath "$0") $(stat -c %a "$0")"\n'


def no_shell_left() -> None:
    """No rank of a shell started from this checkout runs (other checkouts may run theirs)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if "mpitools.shell.ranks" in ln
                and ln.startswith(sys.executable)]


def scratch_of(topo, host: str) -> Path:
    h = topo.host(host)
    return Path(h.local_path(h.scratch))


def bcast_leftovers(topo) -> list[str]:
    return [str(p) for h in ("ccn01", "ccn02", "ccn03", "ccn04")
            for p in scratch_of(topo, h).glob("slurm_bcast_*")]


# pure parts ----------------------------------------------------------------------------
def test_dest_follows_slurm_and_stays_in_scratch():
    name = "slurm_bcast_ab12.3_ccn01"
    assert dest_of(DIRS, None, name) == ("/scratch", name, f"/scratch/{name}")
    assert dest_of(DIRS, "bin/", name)[2] == f"/scratch/bin/{name}"
    assert dest_of(DIRS, "prog", name)[2] == "/scratch/prog"
    assert dest_of(DIRS, "/data/x/prog", name) == ("/data", "x/prog", "/data/x/prog")
    for bad in ("/tmp/prog", "/etc/cron.d/x", "../x", "/", "/scratch", "/data"):
        with pytest.raises(ValueError):
            dest_of(DIRS, bad, name)


def test_wrapper_options(tmp_path):
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    env = {"PATH": f"/nonexistent:{tmp_path}"}
    r = parse("srun", ["--bcast", "-n", "2", "prog", "x"], env)
    assert r["bcast"] == {"dest": None, "source": str(prog)} and r["argv"] == ["prog", "x"]
    assert parse("srun", ["--bcast=/scratch/p/", str(prog)], env)["bcast"]["dest"] == \
        "/scratch/p/"
    for opt in ("-s", "--preload-binary"):
        assert parse("mpiexec", [opt, "-n", "2", str(prog)], env)["bcast"]["source"] == \
            str(prog)
    assert parse("srun", ["--mpi=openmpi", "prog"], env)["mpi"] == "openmpi"
    assert parse("mpirun", ["--mpi", "pmix", "prog"], env)["mpi"] == "openmpi"
    with pytest.raises(WrapperUsage, match="offers pmi1"):
        parse("srun", ["--mpi=pmi2", "prog"], env)
    with pytest.raises(WrapperUsage, match="not supported"):
        parse("srun", ["--bcast", "--mpi=openmpi", "prog"], env)


@pytest.mark.parametrize("make,words", [
    (None, "no such file"),
    ("dir", "is a directory"),
    ("plain", "not executable"),
    ("fifo", "not a regular file"),
])
def test_bad_source_is_named(tmp_path, make, words):
    path = tmp_path / "prog"
    if make == "dir":
        path.mkdir()
    elif make == "plain":
        path.write_text("x")
    elif make == "fifo":
        os.mkfifo(path)
        path.chmod(0o755)
    with pytest.raises(ValueError, match=words):
        source_path("./prog", {}, str(tmp_path))
    with pytest.raises(ValueError, match="command not found"):
        source_path("no-such-prog-here", {"PATH": str(tmp_path)}, str(tmp_path))


# whole jobs ------------------------------------------------------------------------------
def test_each_node_runs_its_own_copy(embedded, tmp_path):
    """The tasks exec the copy in their own host's scratch, with the source's mode, a real
    ELF binary too; a named DEST may be run again by a later command; nothing stays."""
    prog = tmp_path / "whoami.sh"
    prog.write_text(WHOAMI)
    prog.chmod(0o750)
    cat = tmp_path / "mycat"
    shutil.copy2(shutil.which("cat"), cat)
    r = shell(embedded, tmp_path, """
srun --bcast -n 4 -l ./whoami.sh
echo "rc=$?"
mpiexec --preload-binary -n 2 ./mycat /proc/self/cmdline; echo
srun --bcast=me -N 2 -n 2 ./whoami.sh
srun -N 2 -n 2 sh -c 'test -x "$CHIBA_SCRATCH/me" && echo kept'
srun --bcast=me -N 2 -n 2 ./whoami.sh
echo "rc=$?"
""", "--nodes", "ccn[01-04]", "--slurm")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert out.count("rc=0") == 2, (out, err)
    for t, host in enumerate(["ccn01", "ccn02", "ccn03", "ccn04"]):
        m = [ln for ln in out.splitlines() if ln.startswith(f"{t}: {host} ")]
        assert len(m) == 1, out
        _, _, path, mode = m[0].split()
        assert Path(path).parent == scratch_of(embedded, host).resolve() and mode == "750"
        assert Path(path).name.startswith("slurm_bcast_") and path.endswith(f".0_{host}")
    for host in ("ccn01", "ccn02"):  # argv[0] of each cat: its own node's copy
        assert re.search(re.escape(f"{scratch_of(embedded, host)}/slurm_bcast_") +
                         rf"\w+\.1_{host}\0/proc/self/cmdline\0", out), out
    assert out.count("kept") == 2
    assert sum(f"{h} {scratch_of(embedded, h).resolve()}/me 750" in out
               for h in ("ccn01", "ccn02")) == 2 and out.count("/me 750") == 4
    assert bcast_leftovers(embedded) == [] and not any(
        (scratch_of(embedded, h) / "me").exists() for h in ("ccn01", "ccn02"))
    assert stat.S_IMODE(prog.stat().st_mode) == 0o750  # the source is untouched
    no_shell_left()


def test_bad_input_starts_nothing(embedded, tmp_path):
    """One line each, the right status, no task run anywhere, no copy left; a file at DEST
    that the job did not make is neither replaced nor removed."""
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho RAN\n")
    prog.chmod(0o755)
    (tmp_path / "adir").mkdir()
    theirs = scratch_of(embedded, "ccn03") / "taken"
    theirs.write_text("someone else's\n")
    (scratch_of(embedded, "ccn01") / "link").mkdir()
    (scratch_of(embedded, "ccn02") / "link").symlink_to("/etc")
    r = shell(embedded, tmp_path, """
srun --bcast -n 4 ./missing.sh; echo "rc=$?"
srun --bcast -n 4 ./adir; echo "rc=$?"
srun --bcast=/etc/prog -n 4 ./prog.sh; echo "rc=$?"
srun --bcast=taken -n 4 ./prog.sh; echo "rc=$?"
srun --bcast=link/prog -n 2 ./prog.sh; echo "rc=$?"
srun --bcast=taken -n 2 ./prog.sh; echo "rc=$?"
""", "--nodes", "ccn[01-04]")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert out.count("RAN") == 2  # only the last: ccn03 has no task of it
    assert out.splitlines()[:5] == ["rc=2", "rc=2", "rc=2", "rc=1", "rc=1"], out
    lines = err.splitlines()
    assert "srun: error: --bcast: ./missing.sh: no such file" in lines
    assert "srun: error: --bcast: ./adir: is a directory" in lines
    assert any("--bcast=/etc/prog: /etc/prog is outside the host's scratch" in ln
               for ln in lines)
    assert [ln for ln in lines if "taken" in ln] == [
        "srun: ccn03: --bcast: /scratch/taken exists and is not this job's copy "
        "(not replaced)"]
    assert [ln for ln in lines if "link" in ln] == [
        "srun: ccn02: --bcast: /scratch/link: is a symbolic link (not followed)"]
    assert len(lines) == 5, err
    assert theirs.read_text() == "someone else's\n"
    assert not (Path("/etc") / "prog").exists()
    assert bcast_leftovers(embedded) == []
    assert not any((scratch_of(embedded, h) / "taken").exists() for h in ("ccn01", "ccn02"))
    no_shell_left()


def _copies(tmp_path) -> tuple:
    from mpitools.shell.bcast import Copies

    root = tmp_path / "host"
    (root / "scratch").mkdir(parents=True)
    job = {"jobid": "ab12", "bcast_dirs": {"n1": {**DIRS, "root": str(root)}}}
    return Copies(job, "n1"), root / "scratch"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_where_a_copy_may_be_written(tmp_path):
    """The rank side's checks, without MPI: whose directory, who else may write in it, what
    is at the name already; what is removed at the end (only the same file)."""
    copies, scratch = _copies(tmp_path)
    d = scratch / "d"
    d.mkdir()
    for mode, uid, ok in ((0o777, 0, False), (0o1777, 0, True), (0o755, 65534, False)):
        d.chmod(mode)
        os.chown(d, uid, 0)
        if ok:
            made = copies._create({"dest": "d/p"}, 1)
            assert (d / "p").exists() and made[3] == str(d / "p")
            copies._discard(made)
            assert not (d / "p").exists() and not copies.made
        else:
            with pytest.raises(ValueError, match="writable by others|belongs to uid 65534"):
                copies._create({"dest": "d/p"}, 1)
    (scratch / "planted").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="exists and is not this job's copy"):
        copies._create({"dest": "planted"}, 1)
    made = copies._create({"dest": "mine"}, 1)
    os.close(made[2])
    again = copies._create({"dest": "mine"}, 2)  # the job's own copy: replaced
    os.close(again[2])
    assert len(copies.made) == 1
    (scratch / "mine").unlink()  # someone put another file there since: not ours to remove
    (scratch / "mine").write_text("theirs")
    made = copies._create({"dest": "kept"}, 3)
    os.close(made[2])
    copies.remove_all()
    assert (scratch / "mine").read_text() == "theirs" and not (scratch / "kept").exists()
    assert os.readlink(scratch / "planted") == "/etc/passwd"
