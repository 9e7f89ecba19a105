"""/proc/PID/stat read in one place (chiba_admin/procfs.py), and the testbed's use of it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chiba_admin.procfs import parse_stat, proc_stat
from testbed.state import ProcRecord, proc_alive, proc_record

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def test_parse_stat_takes_fields_after_the_last_parenthesis():
    # a command name may hold spaces and ')' (prctl PR_SET_NAME takes any 15 bytes)
    rest = " ".join(str(i) for i in range(100, 149))
    st = parse_stat(f"4242 (a) b) (c d) S 7 8 9 {rest}\n")
    assert (st.pid, st.comm, st.state, st.ppid, st.pgrp, st.session) == (
        4242, "a) b) (c d", "S", 7, 8, 9)
    assert st.start_ticks == 100 + 22 - 7  # field 22; `rest` starts at field 7
    for bad in ("", "4242 no parenthesis S 1 2 3", "4242 (short) S 1 2 3"):
        with pytest.raises(ValueError):
            parse_stat(bad)


def test_proc_stat_of_this_process():
    st = proc_stat(os.getpid())
    assert st is not None and st.pid == os.getpid()
    assert (st.ppid, st.pgrp, st.session) == (os.getppid(), os.getpgrp(), os.getsid(0))
    assert st.state in "RS"


def test_a_later_process_starts_no_earlier_and_a_zombie_is_seen_then_gone():
    me = proc_stat(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    # wait until it has exited but leave it unreaped: a zombie, deterministically
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    st = proc_stat(child.pid)
    assert st is not None and st.state == "Z" and st.session == child.pid
    assert st.start_ticks >= me.start_ticks
    child.wait()
    assert proc_stat(child.pid) is None


def test_testbed_records_tell_live_processes_from_ended_and_reused_ones():
    me = proc_record(os.getpid())
    assert proc_alive(me) and me.start == proc_stat(os.getpid()).start_ticks
    assert not proc_alive(ProcRecord(me.pid, me.start + 1, me.cmdline))  # a reused PID
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    rec = ProcRecord(child.pid, proc_stat(child.pid).start_ticks, "")
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert not proc_alive(rec)  # a zombie has ended
    child.wait()
    assert not proc_alive(rec) and not proc_alive(None)
