"""The shared rank runtime: rank hosts, the event sink, the one wait, fault injection, and the
one pipelined chain (through real mpiexec)."""

from __future__ import annotations

import json
import os
import queue
import textwrap
import threading

import pytest

from chiba_admin.errors import InvalidRequest
from mpitools.common import runtime
from mpitools.common.faults import NONE, Faults, from_environ


def test_rank_hosts_prefers_the_job_then_the_launcher_then_the_job_hosts(monkeypatch):
    monkeypatch.setenv("CHIBA_RANK_HOSTS", "a,b")
    assert runtime.rank_hosts({"rank_hosts": ["c"], "hosts": ["d"]}) == ["c"]
    assert runtime.rank_hosts({"hosts": ["d"]}) == ["a", "b"]
    monkeypatch.delenv("CHIBA_RANK_HOSTS")
    assert runtime.rank_hosts({"hosts": ["d"]}) == ["d"]


def test_events_go_to_the_emitter_set_and_back_to_stdout(capsys):
    got: list[dict] = []
    sink = got.append
    previous = runtime.set_emitter(sink)
    try:
        runtime.emit("progress", done=1)
    finally:
        assert runtime.set_emitter(previous) is sink
    assert got == [{"event": "progress", "done": 1}]
    assert capsys.readouterr().out == ""
    runtime.emit("result", ok=True)
    assert capsys.readouterr().out == runtime.EVENT_PREFIX + '{"event": "result", "ok": true}\n'


class _Req:
    """A request that completes at its ``n``-th test (a unit test of the waiting logic)."""

    def __init__(self, n: int, value=None):
        self.n, self.value, self.tests = n, value, 0

    def test(self, status=None):
        self.tests += 1
        return self.tests >= self.n, self.value if self.tests >= self.n else None


def test_wait_tests_idles_and_returns_what_arrived(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    idle = []
    assert runtime.wait(_Req(4, "msg"), lambda: idle.append(1)) == "msg"
    assert idle == [1, 1, 1] and slept == [runtime.SLEEP] * 3  # data paths: a steady 1 ms
    slept.clear()
    runtime.wait(_Req(8), cap=runtime.IDLE_CAP)  # an idle wait backs off, up to the cap
    assert slept == [0.001, 0.002, 0.004, 0.008, 0.016, 0.02, 0.02]
    assert runtime.wait(None) is None


def test_queue_helpers_run_idle_while_they_wait():
    q: queue.Queue = queue.Queue(maxsize=1)
    calls = []
    t = threading.Timer(0.05, q.put, ("x",))  # the producer thread, not a test sleep
    t.start()
    assert runtime.queue_get(q, lambda: calls.append(1)) == "x"
    assert calls
    q.put("full")
    calls.clear()
    threading.Timer(0.05, q.get).start()
    runtime.queue_put(q, "y", lambda: calls.append(1))
    assert calls and q.get() == "y"


def test_faults_come_from_the_cli_environment_only():
    assert from_environ({}) == {}
    rule = {"point": "stage.chunk", "rank": 3, "do": "exit", "after": 2}
    assert from_environ({"CHIBA_FAULTS": json.dumps(rule)}) == {"faults": [rule]}
    for bad in ("{", "[1]", '{"point": "x", "do": "explode"}', '"x"'):
        with pytest.raises(InvalidRequest):
            from_environ({"CHIBA_FAULTS": bad})


def test_faults_are_inert_unless_the_job_targets_this_rank(tmp_path):
    assert Faults.of({}, 0) is NONE and not NONE
    NONE.checkpoint("stage.chunk", 10**9)  # a no-op
    job = {"faults": [{"point": "collect.archive", "rank": 2, "do": "replace", "file": "F"},
                      {"point": "stage.locked", "do": "barrier", "dir": str(tmp_path)}]}
    assert Faults.of(job, 1).rule("collect.archive") is None
    assert Faults.of(job, 2).rule("collect.archive")["file"] == "F"
    os.mkfifo(tmp_path / "ready")
    os.mkfifo(tmp_path / "go")
    t = threading.Thread(target=Faults.of(job, 5).checkpoint, args=("stage.locked",))
    t.start()
    with open(tmp_path / "ready") as f:
        assert f.read() == "ready\n"
    with open(tmp_path / "go", "w") as f:
        f.write("go\n")
    t.join(10)
    assert not t.is_alive()


def test_a_fault_barrier_nobody_answers_times_out(tmp_path):
    """A rank held at a barrier whose test died (nobody reads "ready", or nobody writes
    "go") gives up after the rule's ``timeout``, so that it never holds its whole job
    for good (before: it waited on the FIFO forever)."""
    import time

    os.mkfifo(tmp_path / "ready")
    os.mkfifo(tmp_path / "go")
    rule = {"point": "p", "do": "barrier", "dir": str(tmp_path), "timeout": 1}
    got: list = []

    def hold() -> None:
        try:
            Faults([rule], 0).checkpoint("p")
        except TimeoutError as e:
            got.append(str(e))

    for answer in (False, True):  # nobody reads "ready"; "ready" read, no "go" written
        t = threading.Thread(target=hold, daemon=True)
        start = time.monotonic()
        t.start()
        if answer:
            with open(tmp_path / "ready") as f:
                assert f.read() == "ready\n"
        t.join(10)
        if t.is_alive():  # the thread (a daemon) stays blocked: fail
            pytest.fail("the barrier did not time out")
        assert time.monotonic() - start < 5
        assert got.pop() == (f"fault barrier in {tmp_path}: the test did not answer in "
                             "time")


def test_a_fatal_fault_ends_the_process_hard_once_its_count_is_reached():
    import subprocess
    import sys

    code = ("from mpitools.common.faults import Faults\n"
            "f = Faults([{'point': 'p', 'rank': 0, 'do': 'exit', 'after': 2}], 0)\n"
            "for i in range(5):\n    print(i, flush=True)\n    f.checkpoint('p', i)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9 and r.stdout.split() == ["0", "1", "2"]



# -- the chain through real mpiexec ---------------------------------------------------------
_CHAINS = '''
"""Two chains at once on two sub-communicators, each carrying streams back to back."""
import hashlib
import random

from mpitools.common.chain import Chain
from mpitools.common.runtime import emit, rank_main, wait


def stream(sub, depth, seed, max_frame, known):
    rnd = random.Random(seed)
    frames = [rnd.randbytes(rnd.choice([0, 1, max_frame // 3, max_frame]))
              for _ in range(rnd.randrange(40, 90))]
    chain = Chain(sub, max_frame=max_frame, depth=depth)
    h = hashlib.sha256()
    n = 0
    if sub.rank == 0:
        for f in frames:
            chain.send(f, chain.progress)
            h.update(f)
            n += 1
        chain.end()
    else:
        for f in chain.frames(count=len(frames) if known else None):
            h.update(f)
            n += 1
    want = hashlib.sha256(b"".join(frames)).hexdigest()
    return h.hexdigest() == want and n == len(frames)


def main(comm, job):
    color = comm.rank % 2
    sub = comm.Split(color, key=-comm.rank)  # reversed: sub rank 0 is the highest
    ok = [stream(sub, depth, color + 10 * depth + known, 4096, known)
          for depth in (1, 2, 3) for known in (False, True)]
    sub.Free()
    wait(comm.Ibarrier())
    got = comm.gather(all(ok), root=0)
    if comm.rank == 0:
        emit("result", ok=all(got), ranks=len(got))
    return 0


if __name__ == "__main__":
    rank_main(main)
'''


@pytest.mark.mpi
def test_two_chains_on_sub_communicators_deliver_every_frame_in_order(embedded, tmp_path,
                                                                       monkeypatch):
    """Frames of 0 bytes to the buffer's size, depths 1 to 3, with and without the frame
    count, each stream right after the previous on the same communicator (a receive
    posted past a stream's end would swallow the next stream's first frame)."""
    from mpitools.common.launch import launch
    from mpitools.common.runtime import encode_job

    (tmp_path / "chain_ranks.py").write_text(textwrap.dedent(_CHAINS))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    res = launch(embedded, "chain_ranks", [encode_job({})], [f"ccn0{i}" for i in range(1, 8)],
                 timeout=120)
    assert res.ok, res.describe()
    assert res.result["ok"] and res.result["ranks"] == 7


class _CountedReq:
    """A send request complete at its ``n``-th test, by either spelling (mpi4py's ``test``
    and ``Test``), counting every test: each runs Open MPI's progress engine."""

    def __init__(self, n: int, log: list):
        self.n, self.log = n, log

    def test(self, status=None):
        self.log.append(self)
        return len([r for r in self.log if r is self]) >= self.n, None

    def Test(self):
        return self.test()[0]


class _FakeComm:
    rank, size = 0, 2

    def __init__(self):
        self.log: list = []
        self.sent: list = []

    def Isend(self, buf, dest, tag):
        self.sent.append(_CountedReq(3, self.log))
        return self.sent[-1]


def test_rank_0_waiting_for_room_tests_its_send_once_a_wake(monkeypatch):
    """Rank 0's wait for room (Chain.send as mpitools/stage/ranks.py calls it) tests the
    send it waits for once a wake, not a second time through the chain's progress."""
    from mpitools.common.chain import Chain

    comm = _FakeComm()
    monkeypatch.setattr(runtime.time, "sleep", lambda s: comm.log.append("sleep"))
    ch = Chain(comm, max_frame=16, depth=1)
    ch.send(b"a")
    ch.send(b"b")  # waits for the first send: complete at its 3rd test
    wakes = "".join("s" if x == "sleep" else "t" for x in comm.log)
    assert wakes.startswith("tsts")  # one test per wake (it was "ttstt...")


def test_a_stage_rank_loads_no_packing_or_dataclass_modules():
    """Every rank pays for its imports on every node of every job: the unpacking side
    loads neither tarfile (packing only) nor dataclasses (which imports inspect, ast and
    dis): 16 ms of CPU a rank start together (docs/design.md, "Per-node CPU")."""
    import subprocess
    import sys

    code = ("import sys, mpitools.stage.ranks\n"
            "print(' '.join(m for m in ('tarfile', 'dataclasses', 'inspect') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == []
