"""Unit tests of the fan-out, grouping, quoting, and pure planning, with a fake transport."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chiba_admin.errors import TransportError, InvalidRequest
from legacy_transit.fanout import (GroupResult, LineSplitter, compact_rc, group_outputs,
                                   run_on, window)
from legacy_transit.rsync import parse_stats, rsync_argv, ssh_command
from topology.confine import HostDest
from legacy_transit.transit import plan_transit
from legacy_transit.transit_agent import tar_x_argv
from legacy_transit.transport import (RunResult, UNREACHABLE, command_line,
                                      env_prefixed, transport_for)
from support.cluster import DEMO
from support.fakes import FakeTransport
from support.procs import still_running
from topology import Host, SSHSettings, load_topology


def hosts(n):
    return [Host(f"n{i:02d}", "node", "t1") for i in range(1, n + 1)]


def test_window_is_bounded_and_ordered():
    t = FakeTransport(rendezvous=4)  # four calls must be in flight at once to pass
    res = run_on(t, hosts(20), "x", fanout=4)
    assert t.peak == 4
    assert list(res.results) == [f"n{i:02d}" for i in range(1, 21)]
    assert res.ok and res.rc == 0


def test_failures_never_stop_others_and_rc_like_pdsh_S():
    script = {"n02": ("", "boom\n", 3), "n03": RuntimeError("bug"), "n04": "unreachable"}
    res = run_on(FakeTransport(script), hosts(6), ["true"], fanout=2)
    assert set(res.succeeded) == {"n01", "n05", "n06"}
    assert set(res.failed) == {"n02", "n03", "n04"}
    assert res.rc == UNREACHABLE
    assert res.failures["n02"] == "exit 3: boom"
    assert "RuntimeError: bug" in res.failures["n03"]
    assert res.failures["n04"] == "connection refused"
    res = run_on(FakeTransport({"n02": ("", "", 3), "n05": ("", "", 1)}), hosts(6), "x")
    assert res.rc == 3
    assert compact_rc([]) == 0


def test_lines_labelled_as_they_arrive_and_grouped():
    lines = []
    script = {"n03": ("other\n", "", 0), "n04": ("no newline", "warn\n", 0)}
    res = run_on(FakeTransport(script), hosts(5), "x",
                 on_line=lambda h, s, ln: lines.append((h, s, ln)))
    assert ("n01", "stdout", "out") in lines and ("n04", "stdout", "no newline") in lines
    assert ("n04", "stderr", "warn") in lines
    assert res.results["n01"].out == "out\n"  # kept for grouping even when streamed
    groups = group_outputs(res)
    assert [g.nodeset for g in groups] == ["n[01-02,05]", "n03", "n04"]
    assert groups[0].output == "out\n" and len(groups[0].hosts) == 3
    assert groups[2].output == "no newline"  # stderr is grouped apart
    errs = group_outputs(res, stream="stderr")
    assert [(g.nodeset, g.output) for g in errs] == [("n04", "warn\n")]


def test_grouping_separates_exit_codes_and_leaves_errors_to_stderr():
    script = {"n02": ("out\n", "", 1), "n03": "unreachable", "n04": "unreachable"}
    res = run_on(FakeTransport(script), hosts(4), "x")
    by = {g.nodeset: g for g in group_outputs(res)}
    assert set(by) == {"n01", "n02"}  # n03, n04 printed nothing: their error is a stderr line
    assert by["n02"].rc == 1 and by["n01"].rc == 0
    partial = GroupResult({"a": RunResult("a", UNREACHABLE, b"started\n", error="timed out")})
    [g] = group_outputs(partial)
    assert g.output == "started\n" and g.rc == UNREACHABLE
    with pytest.raises(ValueError):
        group_outputs(res, stream="both")


def test_grouping_compares_bytes_not_text():
    """caf\\xe9 and caf\\xe8 both decode to 'caf\\ufffd', yet they are two outputs."""
    res = GroupResult({"n01": RunResult("n01", 0, b"caf\xe9", b"x\xff"),
                       "n02": RunResult("n02", 0, b"caf\xe8", b"x\xfe"),
                       "n03": RunResult("n03", 0, b"caf\xe9", b"x\xff")})
    out = group_outputs(res)
    assert [(g.nodeset, g.data) for g in out] == [("n[01,03]", b"caf\xe9"),
                                                  ("n02", b"caf\xe8")]
    assert out[0].output == out[1].output == "caf\ufffd"
    assert [g.data for g in group_outputs(res, stream="stderr")] == [b"x\xff", b"x\xfe"]


def test_window_exceptions_and_empty():
    assert window([], lambda h: 1) == {}
    got = window(hosts(3), lambda h: 1 / 0 if h.name == "n02" else h.name, fanout=8)
    assert got["n01"].ok and got["n01"].value == "n01" and got["n01"].error is None
    assert not got["n02"].ok and got["n02"].value is None
    assert isinstance(got["n02"].exc, ZeroDivisionError)
    assert got["n02"].error.startswith("ZeroDivisionError: ")


def test_stdin_file_read_once_for_all_hosts(tmp_path):
    f = tmp_path / "in"
    f.write_bytes(b"data")
    t = FakeTransport()
    with open(f, "rb") as fh:
        run_on(t, hosts(3), "cat", stdin=fh)
    assert [c[2] for c in t.calls] == [b"data"] * 3


def test_line_splitter_partial_lines():
    got = []
    s = LineSplitter("h", "stdout", lambda h, st_, ln: got.append(ln))
    for chunk in (b"ab", b"c\nde", b"f\n\nlast"):
        s(chunk)
    s.flush()
    assert got == ["abc", "def", "", "last"]


NASTY = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=20)


@settings(max_examples=60, deadline=None)
@given(st.lists(NASTY, min_size=1, max_size=4), NASTY)
def test_quoting_survives_a_real_shell(args, value):
    """What we build is what the remote program receives, whatever the names."""
    line = env_prefixed(["sh", "-c", 'printf "%s\\0" "$CHIBA_X" "$@"', "sh", *args],
                        {"CHIBA_X": value})
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
    got = out.decode("utf-8", "surrogateescape").split("\0")[:-1]
    assert got == [value, *args]


def test_command_line_forms():
    assert command_line(["printf", "%s", "a b"]) == "printf %s 'a b'"
    assert command_line("ls | wc -l") == "ls | wc -l"
    assert env_prefixed("echo $X", {"X": "1"}) == "env X=1 sh -c 'echo $X'"
    # the node's tar -x reads stdin in a directory opened by descriptor: no path, no -C
    assert tar_x_argv()[:5] == ["tar", "-x", "-f", "-", "-p"] and "-C" not in tar_x_argv()
    assert "--no-same-owner" not in tar_x_argv()
    assert type(transport_for("embedded")).__name__ == "LocalTransport"
    assert type(transport_for("ssh")).__name__ == "SSHTransport"


def test_plan_transit_routes_and_dest_rule(tmp_path):
    (tmp_path / "d").mkdir()
    topo = load_topology(DEMO)
    p = plan_transit(topo, str(tmp_path / "d"), ["ccn07", "ccn01", "ccn02"])
    assert [(leg.mayor.name, [n.name for n in leg.nodes]) for leg in p.legs] == \
        [("mayor1", ["ccn01", "ccn02"]), ("mayor2", ["ccn07"])]
    assert p.dests["ccn01"] == "/scratch/d" and p.same_host
    assert p.legs[0].tar.startswith("/var/spool/chiba/transit-d-")
    assert plan_transit(topo, str(tmp_path / "d"), ["ccn01"], "/scratch/abs").dests["ccn01"] \
        == "/scratch/abs"
    with pytest.raises(InvalidRequest, match="outside the host's scratch"):
        plan_transit(topo, str(tmp_path / "d"), ["ccn01"], "/abs")
    assert plan_transit(topo, str(tmp_path / "d"), ["ccn01"], "r/x").dests["ccn01"] == \
        "/scratch/r/x"


def test_rsync_argv_and_stats():
    h = Host("m1", "mayor", address="10.0.0.2",
             ssh=SSHSettings(user="root", port=2222, identity_file="/k/id x",
                             known_hosts="/k/kh"))
    argv = rsync_argv("/src", h, HostDest("/opt", "repo dir"), kind="ssh", delete=True,
                      excludes=("*.o",), checksum=True, python="/usr/bin/python3")
    assert argv[:3] == ("rsync", "-a", "--stats") and "--delete" in argv
    assert argv[-2:] == ("/src/", "10.0.0.2:/opt/repo dir/")
    e = argv[argv.index("-e") + 1]
    assert "-p 2222" in e and "'/k/id x'" in e and "UserKnownHostsFile=/k/kh" in e
    assert "StrictHostKeyChecking=yes" in ssh_command(h)
    # the target-side guard walks the destination without following symlinks and locks it
    assert argv[argv.index("--rsync-path") + 1].endswith(
        "/usr/bin/python3 -m legacy_transit.rsync_guard /opt 'repo dir' run -- rsync")
    emb = Host("m1", "mayor", root="/state/m1")
    e = rsync_argv("/src/", emb, HostDest("/opt", "r"), kind="embedded", dry_run=True)
    assert e[-1] == "/state/m1/opt/r/" and e[2:7] == ("legacy_transit.rsync_guard",
                                                        "/state/m1/opt", "r", "dry", "--")
    s = parse_stats("Number of files: 1,234 (reg: 1,000)\n"
                    "Number of regular files transferred: 12\nTotal file size: 9,876,543 "
                    "bytes\nTotal bytes sent: 1,024\nTotal bytes received: 35\n")
    assert (s.files_total, s.files_transferred, s.total_size, s.bytes_sent,
            s.bytes_received) == (1234, 12, 9876543, 1024, 35)


def test_group_result_to_dict_is_json():
    import json

    g = GroupResult({"a": RunResult("a", 0, b"x\n"), "b": RunResult("b", 2, b"", b"e\n")})
    d = json.loads(json.dumps(g.to_dict()))
    assert d["rc"] == 2 and d["failures"] == {"b": "exit 2: e"}


def test_local_transport_timeout_kills_the_group(tmp_path):
    t = transport_for("embedded")
    h = Host("x", "node", root=str(tmp_path))
    # both sleeps outlive the timeout by far: they end only if the group is killed
    r = t.run(h, "sleep 600 & echo $!; sleep 600; wait", timeout=0.3)
    assert r.rc == UNREACHABLE and "timed out" in r.error
    assert still_running([int(r.out.split()[0])]) == []
    r = t.run(h, ["sh", "-c", 'pwd; echo "$CHIBA_SCRATCH"'])
    assert r.out.splitlines() == [str(tmp_path), str(Path(tmp_path, "scratch"))]


def test_local_transport_put_get_errors_name_file_and_host(tmp_path):
    t = transport_for("embedded")
    h = Host("x", "node", root=str(tmp_path))
    with pytest.raises(TransportError, match=r"cannot put /nonexistent/a to /s/b: .*No such"
                       ) as e:
        t.put(h, "/nonexistent/a", "/s/b")
    assert e.value.where == "x"
    with pytest.raises(TransportError, match=r"cannot get /s/missing: .*No such"):
        t.get(h, "/s/missing", str(tmp_path / "back"))


def test_end_tagged_line_ends_its_tree_and_nothing_else(monkeypatch, tmp_path):
    """The timeout kill is as narrow as it is thorough: real processes, real /proc."""
    import secrets

    from legacy_transit.transport import RUN_TAG, _new_tag, end_tagged_line

    outer, mine, other = (secrets.token_hex(8) for _ in range(3))
    tag = f"{outer}/{mine}"
    ended = {"it": tag, "its child": f"{tag}/{other}"}
    kept = {"its parent": outer, "a sibling": f"{outer}/{other}", "unrelated": other,
            "a longer name": f"{tag}ab", "no tag": None}
    procs = {}
    for name, val in {**ended, **kept}.items():
        env = {k: v for k, v in os.environ.items() if k != RUN_TAG}
        if val is not None:
            env[RUN_TAG] = val
        procs[name] = subprocess.Popen(["sleep", "60"], env=env)
    try:
        r = subprocess.run(["sh", "-c", end_tagged_line(tag)], capture_output=True)
        assert r.returncode == 0, r.stderr
        for name in ended:
            assert procs[name].wait(timeout=20) == -9, name
        assert [n for n in kept if procs[n].poll() is not None] == []
    finally:
        for p in procs.values():  # ours, by PID
            p.kill()
            p.wait()
    with pytest.raises(ValueError):
        end_tagged_line("x'; reboot; '")
    # a grep without -z would find nothing: the line says so rather than "all ended"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "grep").write_text("#!/bin/sh\nexit 2\n")
    (fake / "grep").chmod(0o755)
    r = subprocess.run(["sh", "-c", end_tagged_line(tag)],
                       env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert r.returncode == 3
    monkeypatch.setenv(RUN_TAG, tag)
    assert re.fullmatch(rf"{tag}/[0-9a-f]{{16}}", _new_tag())
    monkeypatch.setenv(RUN_TAG, "not-a-tag")
    assert re.fullmatch(r"[0-9a-f]{16}", _new_tag())
