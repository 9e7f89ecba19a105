"""Inside a `chiba-admin shell` job, `stage`, `collect`, `sync-mayors` and `run` go over the
job's live ranks (no new mpiexec) when the job has a rank on each of their hosts; else they
start their ranks anew and say why. Whole jobs through the real mpiexec on the embedded
cluster; a socket of another user is never used, a request for hosts outside the job is
refused."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpitools.service.driver import shell_job

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPICH_PY = REPO / ".venv-mpich" / "bin" / "python"
NODES = ["ccn01", "ccn02", "ccn03", "ccn04"]


def shell(tmp_path, script: str, *opts: str, timeout: float = 300):
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "chiba-admin"), *os.environ.get("SHCOMP_V", "").split(), "shell", *opts, str(path)],
                          capture_output=True, env=env, timeout=timeout, cwd=tmp_path)


def no_shell_left() -> None:
    """No process of this test's cluster is left (other work on the machine may run the
    same programs): none has its CHIBA_STATE in its environment."""
    mark = f"CHIBA_STATE={os.environ['CHIBA_STATE']}".encode()
    left = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if mark in env and cmd:
            left.append(cmd.decode(errors="replace"))
    assert left == []


def make_input(root: Path) -> Path:
    src = root / "input"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "b.txt").write_text("hello\n" * 1000)
    (src / "empty").write_bytes(b"")
    return src


def same_tree(a: Path, b: Path) -> None:
    """Byte for byte, every file and directory name."""
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.funny_files), (a, b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    for d in cmp.common_dirs:
        same_tree(a / d, b / d)


def results(out: str) -> dict[str, dict]:
    """The --json results the script printed, one per line prefixed ``NAME=``."""
    got = {}
    for line in out.splitlines():
        name, eq, rest = line.partition("=")
        if eq and rest.startswith("{"):
            got[name] = json.loads(rest)
    return got


_STEPS = """set -e
chiba-admin stage input --nodes 'ccn[01-04]' --dest job/in --json > stage.json
echo "stage=$(tr -d '\\n' < stage.json)"
chiba-admin collect job/in --nodes 'ccn[01-04]' --dest back --json > collect.json
echo "collect=$(tr -d '\\n' < collect.json)"
chiba-admin --json run -w 'pres,ccn[01-04]' -- sh -c 'echo "$CHIBA_HOST"' > run.json
echo "run=$(tr -d '\\n' < run.json)"
chiba-admin stage input --nodes 'ccn[01-02]' --dest job/txt > stage.txt
grep -c '^via shell$' stage.txt
"""


def test_stage_collect_run_go_over_the_shells_ranks(embedded, tmp_path):
    src = make_input(tmp_path)
    r = shell(tmp_path, _STEPS, "--nodes", "pres,ccn[01-04]")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, (out, err)
    got = results(out)
    assert {k: v.get("launch") for k, v in got.items()} == \
        {"stage": "shell", "collect": "shell", "run": "shell"}, err
    assert got["stage"]["ok"] and got["collect"]["ok"] and got["run"]["rc"] == 0
    assert sorted(got["stage"]["hosts"]) == NODES and got["stage"]["nodes"] == NODES
    assert {h: (v["rc"], v["stdout"]) for h, v in got["run"]["hosts"].items()} == \
        {h: (0, f"{h}\n") for h in ["pres", *NODES]}
    assert out.endswith("\n1\n")  # grep -c: the text output of the last stage says "via shell"
    assert "not over the shell job's ranks" not in err and "starting the ranks anew" not in err
    for n in NODES:  # staged onto each node, and collected back, byte for byte
        h = embedded.host(n)
        same_tree(src, Path(h.local_path(h.scratch)) / "job" / "in")
        same_tree(src, tmp_path / "back" / n / "in")
    no_shell_left()


def test_sync_mayors_goes_over_the_shells_ranks(embedded, tmp_path):
    src = make_input(tmp_path)
    r = shell(tmp_path, """set -e
echo "sync=$(chiba-admin --json sync-mayors input --delete | tr -d '\\n')"
""", "--nodes", "pres,mayor[1-2],ccn01")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, (out, err)
    got = results(out)["sync"]
    assert got["launch"] == "shell" and got["ok"], err
    for m in ("mayor1", "mayor2"):
        h = embedded.host(m)
        same_tree(src, Path(h.local_path(h.repository)))
    no_shell_left()


def test_hosts_outside_the_job_start_their_ranks_anew_and_say_why(embedded, tmp_path):
    make_input(tmp_path)
    r = shell(tmp_path, """set -e
echo "collect=$(chiba-admin collect job --nodes 'ccn[01-02]' --dest back --json | tr -d '\\n')"
echo "stage=$(chiba-admin stage input --nodes 'ccn[01-03]' --json | tr -d '\\n')"
echo "run=$(chiba-admin --json run -w ccn03 true | tr -d '\\n')"
chiba-admin --json run -w ccn01 --launch shell true > /dev/null || echo "forced=$?"
chiba-admin run -w ccn03 --launch shell true || echo "forced=$?"
""", "--nodes", "ccn[01-02]")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, (out, err)
    got = results(out)
    assert got["stage"]["launch"] == "mpiexec" and got["stage"]["ok"]
    # collect's receiver runs on the home server: not a rank of this job
    assert got["collect"]["launch"] == "mpiexec"
    assert "launch" not in got["run"] and got["run"]["rc"] == 0  # the transport, as before
    lines = [ln for ln in err.splitlines() if "not over the shell job's ranks" in ln]
    assert lines == [
        "not over the shell job's ranks: the shell job has no rank on pres (ranks of this "
        "command: pres, ccn01, ccn02); starting the ranks anew",
        "not over the shell job's ranks: the shell job has no rank on ccn03 (ranks of this "
        "command: ccn01, ccn02, ccn03); starting the ranks anew",
        "not over the shell job's ranks: the shell job has no rank on ccn03; using the "
        "transport"], err
    # --launch shell: the shell's ranks or a one-line error (exit 1)
    assert out.count("forced=") == 1 and "forced=1" in out
    assert "the shell job has no rank on ccn03" in err
    no_shell_left()


def test_a_request_for_hosts_outside_the_job_is_refused(embedded, tmp_path):
    probe = tmp_path / "ask.py"
    probe.write_text("""import json, os, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(os.environ["CHIBA_SHELL_SOCKET"])
s.sendall(json.dumps(json.loads(sys.argv[1])).encode() + b"\\n")
print(s.makefile().readline().strip())
""")
    run = {"op": "run", "module": "mpitools.service.runcmd",
           "job": {"cmd": "touch /tmp/should-not-exist", "env": {}, "cwd": {}},
           "hosts": ["ccn01", "ccn07"], "env": {}}
    bad = [run, {**run, "hosts": ["ccn01", "ccn01"]}, {**run, "module": "os"},
           {"op": "stop"}, {"op": "hosts"}]
    r = shell(tmp_path, "\n".join(f"{sys.executable} {probe} '{json.dumps(b)}'" for b in bad),
              "--nodes", "ccn[01-02]")
    out = r.stdout.decode().splitlines()
    assert r.returncode == 0, r.stderr.decode()
    assert [json.loads(ln) for ln in out] == [
        {"k": "e", "msg": "bad request: the shell job has no rank on ccn07"},
        {"k": "e", "msg": "bad request: a request names each of its hosts once"},
        {"k": "e", "msg": "bad request: module 'os' is not a tool of the service "
                          "(mpitools.stage.ranks, mpitools.sync.ranks, "
                          "mpitools.collect.ranks, mpitools.service.runcmd, "
                          "mpitools.collect)"},
        {"k": "e", "msg": "bad request: a tool's request has op hosts or run"},
        {"k": "hosts", "hosts": ["ccn01", "ccn02"]}]
    assert not os.path.exists("/tmp/should-not-exist")
    no_shell_left()


_LISTEN = """import os, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4)
open(sys.argv[1] + ".up", "w").close()
c, _ = s.accept(); c.sendall(b'{"k": "hosts", "hosts": ["ccn01"]}\\n'); time.sleep(5)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("chown", [False, True], ids=["their-socket", "their-process"])
def test_another_users_socket_is_not_used(embedded, tmp_path, monkeypatch, chown):
    """A socket another user made (or that root owns but another user listens on) is
    never trusted with a job: the launch is a fresh one, and says why."""
    d = Path(f"/tmp/chiba-other-{os.getpid()}")
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    probe = d / "listen.py"
    probe.write_text(_LISTEN)
    path = d / "sock"
    proc = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534",
                             "--clear-groups", "/usr/bin/python3", str(probe), str(path)])
    try:
        while not (d / "sock.up").exists():
            assert proc.poll() is None
            time.sleep(0.01)
        if chown:
            os.chown(path, 0, 0)
        job, why = shell_job({"CHIBA_SHELL_SOCKET": str(path)})
        assert job is None
        assert (("the process behind $CHIBA_SHELL_SOCKET runs as uid 65534, not 0" in why)
                if chown else ("is not a socket of uid 0 (it belongs to uid 65534)" in why))
        env = {**os.environ, "CHIBA_SHELL_SOCKET": str(path)}
        r = subprocess.run([str(BIN / "chiba-admin"), "--json", "run", "-w", "ccn01",
                            "true"], capture_output=True, env=env, timeout=120)
        assert r.returncode == 0 and "launch" not in json.loads(r.stdout)
        assert "not over the shell job's ranks: " in r.stderr.decode()
    finally:
        proc.kill()
        proc.wait()
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def _timed(steps: list[str]) -> str:
    """The steps, each followed by a line ``T <seconds since the script began>``."""
    out = ["set -e", "t0=$(date +%s.%N)"]
    for st in steps:
        out += [st, 'echo "T $(echo "$(date +%s.%N) - $t0" | bc)"']
    return "\n".join(out) + "\n"


def _marks(out: str) -> list[float]:
    t = [float(ln.split()[1]) for ln in out.splitlines() if ln.startswith("T ")]
    return [b - a for a, b in zip([0.0, *t], t)]


@pytest.mark.perf
@pytest.mark.skipif(not MPICH_PY.exists(), reason="needs .venv-mpich (make creates it)")
def test_launches_saved_by_one_shell_job(embedded, tmp_path):
    """Stage-in, an MPICH program, stage-out: in one shell job, and as three separate
    commands (the program under MPICH's own mpiexec, hydra, on the same hosts). Prints
    each step's seconds and the whole: the shell's own launch and exit against the
    launches of the steps (medians of 3, interleaved)."""
    make_input(tmp_path)
    prog = f"{MPICH_PY} {REPO / 'examples' / 'allreduce.py'}"
    stage = "chiba-admin -q stage input --nodes 'ccn[01-04]' --dest j/in --replace"
    collect = "chiba-admin -q collect j/in --nodes 'ccn[01-04]' --dest back --replace"
    inside = _timed([stage, f"mpiexec -n 4 {prog} > /dev/null", collect])
    apart = _timed([stage, f"{MPICH_PY.parent / 'mpiexec'} -n 4 {prog} > /dev/null",
                    collect])
    (tmp_path / "apart.sh").write_text(apart)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    rows = {"shell": [], "apart": []}
    for _ in range(3):
        t0 = time.monotonic()
        r = shell(tmp_path, inside, "--nodes", "pres,ccn[01-04]")
        assert r.returncode == 0, r.stderr.decode()
        rows["shell"].append([time.monotonic() - t0, *_marks(r.stdout.decode())])
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(tmp_path / "apart.sh")], capture_output=True,
                           env=env, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr.decode()
        rows["apart"].append([time.monotonic() - t0, *_marks(r.stdout.decode())])
    for k, v in rows.items():
        med = [sorted(col)[1] for col in zip(*v)]
        print(f"\n{k}: whole {med[0]:.2f} s; stage {med[1]:.2f}, program {med[2]:.2f}, "
              f"collect {med[3]:.2f}; runs {[[round(x, 2) for x in r] for r in v]}")
