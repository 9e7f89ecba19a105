"""The PMI-1 server of MPISH: wire protocol, hostile clients, and real MPICH wiring up."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from mpitools.shell.pmi import (MAX_LINE, PMIServer, ProtocolError, format_response,
                                parse_request, process_mapping)

REPO = Path(__file__).resolve().parent.parent
MPICH_PY = REPO / ".venv-mpich" / "bin" / "python"


def test_parse_and_format():
    assert parse_request(b"cmd=put  kvsname=k key=a value=b=c\n") == \
        {"cmd": "put", "kvsname": "k", "key": "a", "value": "b=c"}
    assert parse_request(b"cmd=put kvsname=k key=a value=\n")["value"] == ""
    assert format_response("get_result", rc=0, value="x") == b"cmd=get_result rc=0 value=x\n"
    assert process_mapping(16, 2) == "(vector,(0,16,2))"


@pytest.mark.parametrize("line,why", [
    (b"key=a\n", "without cmd"),
    (b"cmd=get key=a key=b\n", "duplicate key"),
    (b"cmd=get garbage\n", "malformed"),
    (b"cmd=get key=\xff\n", "not ASCII"),
    (b"cmd=get key=a\x01\n", "control character"),
    (b"cmd=put value=" + b"x" * MAX_LINE + b"\n", r"bytes \(limit"),
])
def test_parse_refuses(line, why):
    with pytest.raises(ProtocolError, match=why):
        parse_request(line)


def _ask(sock: socket.socket, srv: PMIServer, line: bytes) -> bytes:
    sock.sendall(line)
    srv.serve(1.0)
    sock.settimeout(5)
    return sock.recv(4096)


def test_protocol_exchange_over_pmi_fd():
    srv = PMIServer(2, "kvs_7", preload={"PMI_process_mapping": process_mapping(1, 2)})
    a, b = srv.add_task(0), srv.add_task(1)
    try:
        assert _ask(a, srv, b"cmd=init pmi_version=1 pmi_subversion=1\n") == \
            b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n"
        assert b"kvsname_max=256" in _ask(a, srv, b"cmd=get_maxes\n")
        assert _ask(a, srv, b"cmd=get_my_kvsname\n") == b"cmd=my_kvsname rc=0 kvsname=kvs_7\n"
        assert b"size=2" in _ask(a, srv, b"cmd=get_universe_size\n")
        assert b"value=(vector,(0,1,2))" in _ask(b, srv, b"cmd=get kvsname=kvs_7 "
                                                          b"key=PMI_process_mapping\n")
        assert b"rc=0" in _ask(a, srv, b"cmd=put kvsname=kvs_7 key=addr0 value=tcp://x\n")
        assert b"rc=1" in _ask(b, srv, b"cmd=get kvsname=kvs_7 key=nope\n")
        # the barrier releases nobody until every local task has entered it
        a.sendall(b"cmd=barrier_in\n")
        srv.serve(0.2)
        a.settimeout(0.2)
        with pytest.raises(socket.timeout):
            a.recv(100)
        assert _ask(b, srv, b"cmd=barrier_in\n") == b"cmd=barrier_out rc=0\n"
        a.settimeout(5)
        assert a.recv(100) == b"cmd=barrier_out rc=0\n"
        assert b"value=tcp://x" in _ask(b, srv, b"cmd=get kvsname=kvs_7 key=addr0\n")
        assert _ask(a, srv, b"cmd=finalize\n") == b"cmd=finalize_ack rc=0\n"
    finally:
        a.close(), b.close(), srv.close()


@pytest.mark.parametrize("line,why", [
    (b"cmd=bogus\n", "unknown command"),
    (b"\xde\xad\xbe\xef\n", "not ASCII"),
    (b"A" * (MAX_LINE + 10), "without newline"),
    (b"cmd=put kvsname=k key=" + b"k" * 100 + b" value=v\n", "bad put"),
])
def test_hostile_client_is_cut_off_and_named(line, why):
    errors = []
    srv = PMIServer(1, "k", on_error=lambda rank, w: errors.append((rank, w)))
    c = srv.add_task(0)
    try:
        c.sendall(line)
        srv.serve(1.0)
        assert errors and errors[0][0] == 0 and why in errors[0][1]
        c.settimeout(5)
        assert c.recv(10) == b""  # closed by the server
    finally:
        c.close(), srv.close()


def test_initack_over_tcp_and_abort():
    aborts = []
    srv = PMIServer(2, "k", on_abort=lambda r, code, msg: aborts.append((r, code, msg)))
    lst = socket.create_server(("127.0.0.1", 0))
    try:
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
        srv.add_connection(s)
        c.sendall(b"cmd=initack pmiid=1\n")
        srv.serve(1.0)
        c.settimeout(5)
        got = b""
        while got.count(b"\n") < 4:
            got += c.recv(200)
        assert got == (b"cmd=initack rc=0\ncmd=set size=2\ncmd=set rank=1\n"
                       b"cmd=set debug=0\n")
        c.sendall(b"cmd=abort exitcode=7\n")
        srv.serve(1.0)
        assert aborts == [(1, 7, "")]
    finally:
        lst.close(), srv.close()


def _mpich_unavailable() -> str | None:
    if not MPICH_PY.exists():
        return "MPICH's own venv .venv-mpich is missing (make creates it)"
    return None


PROG = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(c.rank, c.size, c.allreduce(c.rank + 1), flush=True)")


def _run_tasks(servers: list[tuple[PMIServer, list[int]]]) -> list[str]:
    """Start each server's tasks as real MPICH processes; serve until all exit."""
    procs = []
    for srv, ranks in servers:
        for r in ranks:
            child = srv.add_task(r)
            env = dict(os.environ, **srv.environment(r, child))
            env.pop("PMIX_RANK", None)
            procs.append(subprocess.Popen([str(MPICH_PY), "-c", PROG], env=env,
                                          pass_fds=[child.fileno()], stdout=subprocess.PIPE,
                                          text=True))
            child.close()
    stop = threading.Event()

    def loop(srv):
        while not stop.is_set():
            srv.serve(0.02)

    threads = [threading.Thread(target=loop, args=(srv,), daemon=True) for srv, _ in servers]
    for t in threads:
        t.start()
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in threads:
            t.join()
    assert [p.returncode for p in procs] == [0] * len(procs)
    return sorted(o.strip() for o in outs)


def test_real_mpich_wires_up_through_one_server():
    why = _mpich_unavailable()
    if why:
        pytest.skip(why)
    srv = PMIServer(4, "kvs_1", preload={"PMI_process_mapping": process_mapping(1, 4)})
    try:
        assert _run_tasks([(srv, [0, 1, 2, 3])]) == [f"{r} 4 10" for r in range(4)]
        assert srv.barriers >= 1
    finally:
        srv.close()


def test_real_mpich_across_two_servers_exchanging_keys_at_barriers():
    """Two 'hosts', each serving its own tasks; keys meet only through ``exchange``."""
    why = _mpich_unavailable()
    if why:
        pytest.skip(why)
    meet = threading.Barrier(2)
    slots: list[dict] = [{}, {}]

    def exchange_for(i):
        def exchange(new):  # an allgather of the new keys, as the shell's ranks do with MPI
            slots[i] = new
            meet.wait(30)
            merged = {**slots[0], **slots[1]}
            meet.wait(30)
            return merged
        return exchange

    mapping = {"PMI_process_mapping": process_mapping(2, 2)}
    a = PMIServer(4, "kvs_2", preload=mapping, exchange=exchange_for(0))
    b = PMIServer(4, "kvs_2", preload=mapping, exchange=exchange_for(1))
    try:
        assert _run_tasks([(a, [0, 1]), (b, [2, 3])]) == [f"{r} 4 10" for r in range(4)]
        assert a.barriers == b.barriers >= 1
    finally:
        a.close(), b.close()
