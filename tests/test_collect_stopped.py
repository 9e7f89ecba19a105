"""A collect stopped part-way (``--timeout``, SIGTERM) says what the home server holds.

Rank 0 moves each host's verified copy into ``DIR/<host>/<name>`` as its stream ends
(mpitools/collect/ranks.py). When the job is stopped after some of those moves, the
command must say which hosts' copies are in place, and not that every host failed; it
must leave no lock file, temporary directory or empty per-host directory of its own
behind; a stop in the middle of one host's move finishes it (the host's previous copy is
never lost). Fault points (mpitools/common/faults.py) hold rank 0 at the moment wanted,
and each test compares the wording with what is on disk. City Transit's collect, stopped
by SIGTERM, commits no host after the stop, ends the nodes' packs under way at once, and
says which hosts' copies are in place.
Whatever a test started is killed when it ends, its mpiexec job included
(``support.cluster.end_job``): a rank held at a fault point must not outlive the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from support.cluster import cli_process, end_job, fault_gate, wait_ready
from support.fakes import node_tar
from support.trees import assert_same_tree, make_tree

pytestmark = pytest.mark.mpi

TOWN1 = ["ccn01", "ccn02", "ccn03", "ccn04"]
# long enough for rank 0 to reach the held point on a loaded 2-core machine (a start and
# four tiny streams take 1-2 s unloaded; 8 s was once too short with other tests running)
TIMEOUT = "15"


def scratch(topo, host: str) -> str:
    h = topo.host(host)
    return h.local_path(h.scratch)


def _trees(topo, seed: int = 1) -> dict[str, str]:
    out = {}
    for i, n in enumerate(TOWN1):
        out[n] = os.path.join(scratch(topo, n), "res")
        make_tree(out[n], big=20_000, seed=seed * 10 + i)
    return out


def _hold(point: str) -> str:
    # rank 0 (the home server) sleeps there until the job is stopped
    return json.dumps({"point": point, "rank": 0, "do": "sleep", "seconds": 120})


def _in_place(out) -> list[str]:
    """Hosts whose copy is in DIR; every per-host directory holds only the copy and its
    mark (no lock file, temporary directory or old copy of a stopped job)."""
    if not out.exists():
        return []
    hosts = sorted(os.listdir(out))
    for h in hosts:
        assert sorted(os.listdir(out / h)) == [".res.chiba-staged", "res"], h
    return hosts


def _rank_processes(topo) -> list[int]:
    """collect ranks of this test's cluster still alive (none may outlive a command)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if b"mpitools.collect.ranks" in argv and topo.state_dir.encode() in argv:
                out.append(int(d))
    return out


def test_stopped_after_one_host_says_which_copy_is_in_place(embedded, cli, tmp_path,
                                                            monkeypatch):
    """Rank 0 is held once the first host's copy is in; --timeout stops the job. That host
    is ok and named as collected; the others failed and their slots are as they were
    (before the fix: every host "timed out", "0/4 hosts ok", and a lock file and an empty
    per-host directory were left unreported)."""
    trees = _trees(embedded)
    out = tmp_path / "back"
    monkeypatch.setenv("CHIBA_FAULTS", _hold("collect.committed"))
    r = cli("collect", "res", "--nodes", "@town1", "--dest", str(out), "--timeout",
            TIMEOUT, "--json")
    assert r.code == 1, r.err
    got = _in_place(out)
    assert len(got) == 1, got
    first, rest = got[0], [n for n in TOWN1 if n != got[0]]
    assert_same_tree(trees[first], out / first / "res")
    j = r.json()
    assert j["outcome"] == (f"collected before the job was stopped, into {out}/<host>/res: "
                            f"{first} (1 of 4); not collected: {_fold(rest)} (their slots "
                            "are as they were)")
    assert j["hosts"][first]["ok"] and j["hosts"][first]["stage"] == "done"
    assert j["hosts"][first]["bytes"] > 0 and j["files"] > 0
    assert sorted(j["failures"]) == rest
    assert all(j["hosts"][n]["stage"] == "aborted" for n in rest)
    assert _rank_processes(embedded) == []


def _fold(hosts: list[str]) -> str:
    from topology import fold

    return fold(hosts)


def test_stopped_after_every_host_says_every_copy_is_kept(embedded, cli, tmp_path,
                                                          monkeypatch):
    """Held after the last host's copy is in, before the result: every copy is in place,
    and the command says so (it still fails: the job did not end)."""
    trees = _trees(embedded)
    out = tmp_path / "back"
    monkeypatch.setenv("CHIBA_FAULTS", _hold("collect.done"))
    r = cli("collect", "res", "--nodes", "@town1", "--dest", str(out), "--timeout", TIMEOUT)
    assert r.code == 1, r.err
    assert _in_place(out) == TOWN1
    for n in TOWN1:
        assert_same_tree(trees[n], out / n / "res")
    assert r.err.splitlines()[-2:] == [
        "chiba-admin collect: timed out; mpiexec and its ranks were stopped",
        f"chiba-admin collect: failed; every host's copy was collected into {out}/<host>/res"
        " before the job was stopped, and is kept"], r.err
    assert "4/4 hosts ok" in r.out and "failed for" not in r.err


def test_stopped_before_any_move_says_every_host_failed_and_leaves_nothing(
        embedded, cli, tmp_path, monkeypatch):
    """Held before the first host's copy is moved in: nothing of the run is in DIR (the
    DIR it made is gone, the host's previous copy is untouched), and "failed for" all
    four hosts is then the truth."""
    _trees(embedded)
    out = tmp_path / "back"
    monkeypatch.setenv("CHIBA_FAULTS", _hold("collect.commit"))
    r = cli("collect", "res", "--nodes", "@town1", "--dest", str(out), "--timeout", TIMEOUT)
    assert r.code == 1, r.err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert r.err.splitlines()[-1] == "chiba-admin collect: failed for ccn[01-04]", r.err
    assert "collected before" not in r.err
    # with earlier copies there: each is left exactly as it was
    monkeypatch.delenv("CHIBA_FAULTS")
    assert cli("collect", "res", "--nodes", "@town1", "--dest", str(out)).code == 0
    before = {n: os.lstat(out / n / "res").st_ino for n in TOWN1}
    monkeypatch.setenv("CHIBA_FAULTS", _hold("collect.commit"))
    r = cli("collect", "res", "--nodes", "@town1", "--dest", str(out), "--timeout", TIMEOUT,
            "--json")
    assert r.code == 1 and "outcome" not in r.json()
    assert _in_place(out) == TOWN1
    assert {n: os.lstat(out / n / "res").st_ino for n in TOWN1} == before


def test_stopped_while_a_copy_is_moved_in_finishes_that_move(embedded, cli, tmp_path):
    """Stopped (SIGTERM) after a host's previous copy was moved aside and before the new one
    went in: rank 0 finishes the move before it ends. That host holds its new copy, marked;
    the others keep their previous copies; no old copy is left aside. (Rank 0 waits at the
    point on a FIFO handshake, so the stop lands there every time.)"""
    old = _trees(embedded, seed=1)
    out = tmp_path / "back"
    assert cli("collect", "res", "--nodes", "@town1", "--dest", str(out)).code == 0
    kept = {n: str(make_tree(tmp_path / "kept" / n, big=20_000, seed=10 + i))
            for i, n in enumerate(TOWN1)}  # what that collect brought (_trees, seed 1)
    new = {n: str(make_tree(tmp_path / "new" / n, big=30_000, seed=50 + i))
           for i, n in enumerate(TOWN1)}
    for n in TOWN1:
        shutil.rmtree(old[n])
        shutil.copytree(new[n], old[n], symlinks=True)
    gate, fault = fault_gate(tmp_path, "collect.aside")
    p = cli_process(embedded, "collect", "res", "--nodes", "@town1", "--dest", str(out),
                    env={"CHIBA_FAULTS": json.dumps(fault)})
    try:
        wait_ready(gate / "ready", p)  # rank 0 has moved one previous copy aside
        aside = [n for n in TOWN1 if not (out / n / "res").exists()]
        assert len(aside) == 1, aside
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        end_job(p, embedded)
    assert p.returncode == 143, err
    assert _in_place(out) == TOWN1  # nothing left aside, every slot holds a copy
    assert_same_tree(new[aside[0]], out / aside[0] / "res")
    for n in TOWN1:
        if n != aside[0]:
            assert_same_tree(kept[n], out / n / "res")
    assert (f"chiba-admin collect: stopped; collected before the job was stopped, into "
            f"{out}/<host>/res: {aside[0]} (1 of 4); not collected: ") in err.decode()
    assert _rank_processes(embedded) == []


def _wait_for(pred, seconds: float = 60) -> None:
    end = time.time() + seconds
    while not pred():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.1)


def test_mpi_collect_terminated_says_what_is_in_place(embedded, tmp_path):
    """SIGTERM to chiba-admin once one host's copy is in: exit 143, and before
    "terminated" one line says which copy is in place; nothing else of the run is left."""
    _trees(embedded)
    out = tmp_path / "back"
    p = cli_process(embedded, "collect", "res", "--nodes", "@town1", "--dest", str(out),
                    env={"CHIBA_FAULTS": _hold("collect.committed")})
    try:
        _wait_for(lambda: out.exists() and any(
            (out / n / ".res.chiba-staged").exists() for n in os.listdir(out)))
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        end_job(p, embedded)
    assert p.returncode == 143, err
    got = _in_place(out)
    assert len(got) == 1
    lines = err.decode().splitlines()
    assert lines[-1] == "chiba-admin: terminated"
    assert (f"chiba-admin collect: stopped; collected before the job was stopped, into "
            f"{out}/<host>/res: {got[0]} (1 of 4); not collected: ") in err.decode()
    assert _rank_processes(embedded) == []


def test_a_result_then_an_overrun_says_every_copy_was_collected():
    """Every host's copy came in (the result), then mpiexec outlived --timeout: reported
    as the time budget's failure, never as the hosts' (pure: the driver's reading)."""
    from chiba_admin.outcome import TransferRun
    from mpitools.collect.driver import _collect_hosts
    from mpitools.common.launch import LaunchResult

    reports = [{"host": h, "ok": True, "bytes": 10, "seconds": 1.0, "stage": "done",
                "error": None, "maxrss": 1} for h in TOWN1[:2]]
    res = LaunchResult(argv=[], hosts=("pres", *TOWN1[:2]), returncode=-15, timed_out=True,
                       result={"event": "result", "ok": True, "reports": reports,
                               "phases": {}}, started=1.0, seconds=3.0, result_at=2.0)
    out = TransferRun(method="mpi", nodes=list(TOWN1[:2]), phases={})
    assert _collect_hosts(out, res, "pres")
    assert not out.ok and out.hosts_ok == 2 and out.failures == {}
    assert out.outcome == ("every host's copy was collected; then the job overran "
                           "--timeout while exiting")
    assert out.error == "timed out; mpiexec and its ranks were stopped"


def test_a_previous_copy_of_a_file_is_put_back_when_rank_0_dies_while_it_is_aside(
        embedded, cli, tmp_path, monkeypatch):
    """PATH is a file; a second collect's rank 0 dies (fault ``collect.aside``, exit)
    after moving the previous copy aside as ``.res.txt.chiba-collect-JOB.old``, before the
    new one is in. The previous copy is put back (the same file, its content), nothing of
    the run is left, and the command does not say the slot "changed" (before: clean_stale
    took only directories for its own, res.txt stayed missing, the file stayed aside, and
    the line said res.txt "changed but has no mark of this run")."""
    src = os.path.join(scratch(embedded, "ccn01"), "res.txt")
    with open(src, "w") as f:
        f.write("first\n")
    out = tmp_path / "back"
    assert cli("collect", "res.txt", "--nodes", "ccn01", "--dest", str(out)).code == 0
    slot = out / "ccn01"
    kept = os.lstat(slot / "res.txt").st_ino
    with open(src, "w") as f:
        f.write("second\n")
    monkeypatch.setenv("CHIBA_FAULTS", json.dumps(
        {"point": "collect.aside", "rank": 0, "do": "exit"}))
    r = cli("collect", "res.txt", "--nodes", "ccn01", "--dest", str(out))
    assert r.code == 1, r.err
    assert sorted(os.listdir(slot)) == [".res.txt.chiba-staged", "res.txt"]
    assert os.lstat(slot / "res.txt").st_ino == kept
    assert (slot / "res.txt").read_text() == "first\n"
    assert "changed" not in r.err and "missing" not in r.err
    assert r.err.splitlines()[-1] == "chiba-admin collect: failed for pres", r.err
    assert _rank_processes(embedded) == []


def test_a_file_only_named_like_a_copy_aside_is_left_alone(embedded, cli, tmp_path):
    """A non-directory named as a copy aside, with no temporary directory of its job beside
    it (a user's file, or one planted): not put in place of the missing copy, not
    removed."""
    make_tree(os.path.join(scratch(embedded, "ccn01"), "res"), big=1000)
    out = tmp_path / "back"
    (out / "ccn01").mkdir(parents=True)
    planted = out / "ccn01" / ".res.chiba-collect-0123456789ab.old"
    planted.write_text("not ours\n")
    r = cli("collect", "res", "--nodes", "ccn01", "--dest", str(out))
    assert r.code == 0, r.err
    assert planted.read_text() == "not ours\n"
    assert (out / "ccn01" / "res").is_dir()


def _state_processes(topo) -> list[int]:
    """Processes whose environment names this test's cluster (every command the
    transport ran on its hosts, a node's tar and its children included)."""
    mark, out = f"CHIBA_STATE={topo.state_dir}".encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                continue
    return out


@pytest.mark.parametrize("signals", [1, 2])
def test_transit_collect_stopped_ends_the_nodes_packs_and_says_what_is_in_place(
        embedded, tmp_path, signals):
    """City Transit: SIGTERM (once, or twice in a row) while ccn02's node packs for a
    minute. ccn02 is not committed after the stop; the command ends within seconds (before: it waited for every node's tar -c to
    read to its end, 15 s for a 3 GiB sparse file, days for 50 TB); ccn02's pack and its
    children are gone; the outcome line is said; no empty DIR/ccn02 is left (before, a
    second SIGTERM cut the line and left it)."""
    trees = _trees(embedded)
    out = tmp_path / "back"
    p = cli_process(embedded, "collect", "res", "--nodes", "@town1", "--dest", str(out),
                    "--method", "transit",
                    env={"PATH": node_tar(tmp_path / "bin", "ccn02", "sleep 60")})
    others = [n for n in TOWN1 if n != "ccn02"]
    try:
        _wait_for(lambda: all((out / n / ".res.chiba-staged").exists() for n in others))
        t = time.monotonic()
        for _ in range(signals):
            p.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        _, err = p.communicate(timeout=90)
        took = time.monotonic() - t
    finally:
        end_job(p, embedded)
    assert p.returncode == 143, err
    assert took < 15, took
    assert _in_place(out) == others
    for n in others:
        assert_same_tree(trees[n], out / n / "res")
    lines = err.decode().splitlines()
    assert lines[-1] == "chiba-admin: terminated"
    assert ("chiba-admin collect: stopped; complete tree on ccn[01,03-04] (3); no tree "
            "from this run on ccn02 (1)") in lines
    _wait_for(lambda: _state_processes(embedded) == [], seconds=10)
