"""The MPI service from the CLI side: start it as a daemon, ask its status, stop it, and
submit a tool's rank program to it (issue 19). Runs in the CLI process.

The service directory (:func:`service_dir`, mode 0700) holds ``state.json`` (mpiexec's
pid, which is also its session id, the hosts of the ranks, the owner), ``log`` (mpiexec's
output: the runtime's word on a dead rank), and while the ranks run the coordinator's
``sock`` and ``ready`` (mpitools/service/ranks.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable

from chiba_admin.errors import InvalidRequest, MPIToolError
from chiba_admin.procfs import proc_stat

from mpitools.common.diagnose import parse_runtime
from mpitools.common.launch import (FORWARD_PREFIXES, RANK_HOSTS_ENV, LaunchResult,
                                    build_command, child_env, session_pids)
from mpitools.common.runtime import load_job
from mpitools.service.ranks import READY, SOCKET

__all__ = ["service_dir", "default_hosts", "start", "status", "stop", "running", "submit",
           "Service", "START_TIMEOUT", "dead_hosts", "run_mpi", "ended",
           "add", "ShellJob", "shell_job", "SHELL_SOCKET_ENV"]

# 65 Python ranks over SSH took 10.6 s to start on the testbed (issue 19)
START_TIMEOUT = 120.0
_STOP_GRACE = 10.0
_SUN_PATH = 108  # bytes of sockaddr_un.sun_path on Linux, its NUL included


def service_dir(topo) -> Path:
    """Where the service keeps its socket and state: ``[mpi] service_dir`` when given, on
    the embedded cluster ``<state dir>/service``, else ``service`` in the home server's
    spool (the president serves the spool and runs the service)."""
    given = (topo.mpi or {}).get("service_dir")
    if given:
        where = getattr(topo, "source", None)
        if not os.path.isabs(str(given)):
            raise InvalidRequest(f"[mpi] service_dir {given!r} is not an absolute path",
                                 where=where)
        # a directory the tool makes and owns: never "/" or a path that climbs with ".."
        if ".." in Path(str(given)).parts or Path(str(given)) == Path("/"):
            raise InvalidRequest(f"[mpi] service_dir {given!r} names the root directory or "
                                 "has a '..' component", where=where,
                                 hint="name a directory of its own, e.g. /run/chiba-admin")
        return Path(str(given))
    if topo.kind == "embedded" and getattr(topo, "state_dir", None):
        return Path(topo.state_dir) / "service"
    home = topo.home_server
    return Path(home.local_path(home.spool)) / ".service"


def default_hosts(topo) -> list[str]:
    """The president, every mayor and every node: one rank each."""
    return [h.name for h in topo.hosts()]


def _private(d: Path, mask: int = 0o022) -> None:
    """Refuse (InvalidRequest) a service directory that is a symlink or not a directory,
    is not this user's, or has a mode bit of ``mask`` (default: another user may write
    there): root would otherwise trust a state file (a pid to kill) or open files someone
    else planted there. ``start`` asks for 0700 (mask 0o077): never /etc or the like."""
    st = os.lstat(d)
    me = os.geteuid()
    why = ("is a symbolic link (not followed)" if stat.S_ISLNK(st.st_mode) else
           "is not a directory" if not stat.S_ISDIR(st.st_mode) else
           f"belongs to uid {st.st_uid}, not to uid {me}" if st.st_uid != me else
           f"is not private (mode {stat.S_IMODE(st.st_mode):04o}, not 0700)"
           if st.st_mode & mask else None)
    if why:
        raise InvalidRequest(f"the service directory {why}", where=str(d),
                             hint="name a directory of its own in [mpi] service_dir, or "
                                  "run as its owner")


def _make_private(d: Path) -> None:
    """Create the service directory (mode 0700) under a parent that no other user may
    replace it in, or check the one that exists (:func:`_private`). Raises InvalidRequest."""
    try:
        parent = os.stat(d.parent) if d.parent.exists() else None
    except OSError as e:
        raise InvalidRequest(f"cannot use the service directory: {e.strerror}",
                             where=str(d.parent)) from None
    if parent is not None and (parent.st_uid not in (0, os.geteuid()) or (
            parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX)):
        raise InvalidRequest("the service directory's parent may be changed by another user "
                             f"(uid {parent.st_uid}, mode {stat.S_IMODE(parent.st_mode):04o})",
                             where=str(d.parent), hint="name a directory under one of yours")
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise InvalidRequest(f"cannot make the service directory: {e.strerror}",
                             where=str(d)) from None
    _private(d, 0o077)


def _open(d: Path, name: str, mode: str):
    """A file of the (private) service directory; a symlink there is never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if "w" in mode else 0)
    try:
        return os.fdopen(os.open(d / name, flags, 0o600), mode)
    except OSError as e:  # ELOOP: a symlink was planted there
        raise InvalidRequest(f"cannot open the service's {name}: {e.strerror}",
                             where=str(d / name)) from None


def _read_state(d: Path) -> dict | None:
    try:
        with open(os.open(d / "state.json", os.O_RDONLY | os.O_NOFOLLOW)) as f:
            st = json.load(f)
        ok = (isinstance(st, dict) and isinstance(st.get("pid"), int)
              and isinstance(st.get("hosts"), list))
        return st if ok else None
    except (OSError, ValueError):
        return None


def _state(d: Path) -> dict | None:
    """The state of the service in ``d`` (None: none was started), after :func:`_private`
    (InvalidRequest: a directory this user must not trust or cannot read)."""
    if not os.path.lexists(d):
        return None
    _private(d)
    return _read_state(d)


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when it is gone:
    with the pid, it names one process, whatever reuses the pid later."""
    st = proc_stat(pid)
    return None if st is None else st.start_ticks


def _ours(st: dict) -> bool:
    """Whether the state's mpiexec still runs (not another process that got its pid)."""
    pid = int(st.get("pid", 0))
    if pid <= 0 or not _alive(pid):
        return False
    return st.get("starttime") is None or _start_time(pid) == st["starttime"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not; reaped if it is our child, as
    mpiexec is of a process that started the service and lives on, a test's)."""
    st = proc_stat(pid)
    if st is None:
        return False
    if st.state != "Z":
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return False


class Service:
    """A running service as its state file describes it."""

    kind = "service"  # the ``launch`` of a result (mpitools/common/launch.py)

    def __init__(self, d: Path, state: dict):
        self.dir, self.state = d, state
        self.pid = int(state["pid"])
        self.hosts: list[str] = list(state["hosts"])  # world rank -> host (0: coordinator)

    @property
    def socket_path(self) -> str:
        return str(self.dir / SOCKET)

    def covers(self, hosts: list[str]) -> bool:
        return set(hosts) <= set(self.hosts[1:])

    def missing(self, hosts: list[str]) -> list[str]:
        return [h for h in hosts if h not in self.hosts[1:]]

    def connect(self, request: dict) -> socket.socket:
        """A connection with ``request`` sent; MPIToolError when the service is gone."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.socket_path)
            conn.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        except OSError as e:
            conn.close()
            raise MPIToolError(f"cannot reach the MPI service: {e}", where=self.socket_path,
                               hint="`chiba-admin service status` says whether it runs"
                               ) from None
        return conn


SHELL_SOCKET_ENV = "CHIBA_SHELL_SOCKET"
_NAMES = {"service": "the MPI service", "shell": "the shell job"}


class ShellJob:
    """The `chiba-admin shell` job this command runs in (its rank 0's socket): it takes the
    service's run requests over its own ranks (mpitools/shell/tools.py)."""

    kind = "shell"

    def __init__(self, path: str, hosts: list[str]):
        self.socket_path, self.hosts = path, hosts  # rank -> host, rank 0 runs the script

    def covers(self, hosts: list[str]) -> bool:
        return set(hosts) <= set(self.hosts)

    def missing(self, hosts: list[str]) -> list[str]:
        return [h for h in hosts if h not in self.hosts]

    def connect(self, request: dict) -> socket.socket:
        """A connection to the shell's rank 0 with ``request`` sent, once the peer is known
        to be a process of this user; MPIToolError otherwise (nothing sent)."""
        return _shell_connect(self.socket_path, request)


def _shell_connect(path: str, request: dict) -> socket.socket:
    from mpitools.common.unixsock import peer_uid

    st = os.lstat(path)  # OSError: no socket there (the job ended, or a stale variable)
    me = os.geteuid()
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != me:
        raise MPIToolError(f"${SHELL_SOCKET_ENV} is not a socket of uid {me} (it belongs "
                           f"to uid {st.st_uid}); not used", where=path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(30)
        conn.connect(path)
        uid = peer_uid(conn)  # the listening process, whoever made the file
        if uid != me:
            raise MPIToolError(f"the process behind ${SHELL_SOCKET_ENV} runs as uid {uid}, "
                               f"not {me}; not used", where=path)
        conn.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        conn.settimeout(None)
    except OSError as e:
        conn.close()
        raise MPIToolError(f"cannot reach the shell job: {e}", where=path) from None
    except MPIToolError:
        conn.close()
        raise
    return conn


def shell_job(environ=None) -> tuple[ShellJob | None, str | None]:
    """The shell job this command runs in: (job, None); (None, why) when
    ``$CHIBA_SHELL_SOCKET`` is set but cannot be used (another user's socket, the job
    gone); (None, None) outside a shell job."""
    from mpitools.shell.tools import hosts_reply

    path = (os.environ if environ is None else environ).get(SHELL_SOCKET_ENV)
    if not path:
        return None, None
    try:
        conn = _shell_connect(path, {"op": "hosts"})
    except OSError as e:
        return None, f"cannot use the shell job's socket {path}: {e.strerror or e}"
    except MPIToolError as e:
        return None, str(e)  # "PATH: why" already
    try:
        conn.settimeout(30)
        line = conn.makefile("rb").readline()
        return ShellJob(path, hosts_reply(line)), None
    except (OSError, ValueError) as e:
        return None, f"the shell job did not answer on {path}: {e}"
    finally:
        conn.close()


def running(topo) -> Service | None:
    """The service of this topology when its mpiexec lives and its socket is up."""
    d = service_dir(topo)
    try:
        st = _state(d)
    except InvalidRequest:
        return None  # not this user's service (`service status` says why)
    if st is None or not _ours(st) or not (d / READY).exists():
        return None
    return Service(d, st)


def ended(topo) -> str | None:
    """Why the service that was started for ``topo`` ended by itself (None: it runs, was
    stopped, or never started): the hosts the runtime named, else "mpiexec exited"."""
    d = service_dir(topo)
    try:
        st = _state(d)
    except InvalidRequest:
        return None
    if st is None or _ours(st):
        return None
    dead = dead_hosts(d, st)
    return "; ".join(f"{h}: {w}" for h, w in dead.items()) or "mpiexec exited"


def dead_hosts(d: Path, state: dict) -> dict[str, str]:
    """Host -> why for the ranks the runtime said died (from the service's log)."""
    try:
        text = (d / "log").read_text(errors="replace")
    except OSError:
        return {}
    hosts = state.get("hosts", [])
    report = parse_runtime(text)
    out = {}
    for r, why in report.ranks.items():
        if "aborted" in why:
            continue
        name = hosts[r] if 0 <= r < len(hosts) else f"rank {r}"
        out[name if r else f"{name} (coordinator)"] = why
    out.update(report.daemons)
    return out


def _world(topo, hosts: list[str]) -> list[str]:
    from topology import place_ranks

    president = topo.president.name
    workers = list(place_ranks(topo, list(dict.fromkeys([president, *hosts])), president).hosts)
    return [president, *workers]


def _argv(topo, world: list[str], job_arg: str) -> tuple[list[str], dict[str, str]]:
    fwd = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)
           and k != RANK_HOSTS_ENV}
    plan = build_command(topo, "mpitools.service.ranks", [job_arg], world,
                         as_root=os.geteuid() == 0, env=fwd)
    argv = list(plan.argv)
    if "--host" in argv:  # the coordinator shares the president with its worker
        i = argv.index("--host") + 1
        counts: dict[str, int] = {}
        for h in world:
            counts[h] = counts.get(h, 0) + 1
        argv[i] = ",".join(f"{h}:{n}" for h, n in counts.items())
    # Without ULFM a dead rank ends the job and the runtime names it; with it (measured
    # on this Open MPI 5.0 wheel) no peer is ever told: Get_failed stays empty, Shrink
    # hangs, so the service would wait forever on a dead member.
    for i in range(len(argv) - 1):
        if argv[i] == "--with-ft" and argv[i + 1] == "ulfm":
            del argv[i:i + 2]
            break
    return argv, plan.env


def start(topo, hosts: list[str] | None = None, *, idle_cap: float | None = None,
          deep_cap: float | None = None) -> dict:
    """Start the service as a daemon; ``{"pid", "hosts", "seconds", "dir"}`` once its
    socket is up. ``idle_cap``/``deep_cap``: seconds between an idle rank's tests, and
    after 30 s idle (mpitools/service/ranks.py). Raises MPIToolError when one already runs
    or it did not come up (the reason from its log), InvalidRequest for an unknown host."""
    from mpitools.common.runtime import encode_job

    hosts = default_hosts(topo) if not hosts else list(dict.fromkeys(hosts))
    for h in hosts:
        topo.host(h)
    d = service_dir(topo)
    if len(os.fsencode(d / SOCKET)) >= _SUN_PATH:
        raise InvalidRequest(f"the service directory's path is too long for a Unix socket "
                             f"(at most {_SUN_PATH - 1 - len(SOCKET) - 1} bytes)", where=str(d),
                             hint="set a shorter service_dir in the topology's [mpi] table")
    _make_private(d)
    with _open(d, "lock", "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        st = _read_state(d)
        if st is not None and _ours(st):
            raise MPIToolError(f"a service already runs for {topo.name} (mpiexec pid "
                               f"{st['pid']})", hint="`chiba-admin service stop` first")
        _clear(d, st)
        world = _world(topo, hosts)
        job = {"dir": str(d), "owner": os.getuid(), "hosts": world}
        for key, value in (("idle_cap", idle_cap), ("deep_cap", deep_cap)):
            if value is not None:
                job[key] = value
        argv, env = _argv(topo, world, encode_job(job))
        t0 = time.time()
        with _open(d, "log", "wb") as log:
            try:
                proc = subprocess.Popen(argv, env=child_env(env), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, start_new_session=True,
                                        cwd="/")
            except OSError as e:
                raise MPIToolError(f"cannot start mpiexec: {e}", where=argv[0]) from None
        state = {"pid": proc.pid, "hosts": world, "owner": os.getuid(), "started": t0,
                 "argv": argv, "starttime": _start_time(proc.pid)}
        _write_state(d, state)
        _wait_ready(d, proc, state)
        proc.returncode = 0  # reaped by init once we exit; no warning for it
    return {"pid": proc.pid, "hosts": world[1:], "seconds": time.time() - t0, "dir": str(d)}


def _wait_ready(d: Path, proc: subprocess.Popen, state: dict) -> None:
    deadline = time.time() + START_TIMEOUT
    while not (d / READY).exists():
        if proc.poll() is not None or time.time() > deadline:
            _kill_session(proc.pid)
            dead = dead_hosts(d, state)
            why = ("; ".join(f"{h}: {w}" for h, w in dead.items()) if dead else
                   "mpiexec exited" if proc.returncode is not None else "timed out")
            raise MPIToolError(f"the MPI service did not start: {why}", where=str(d / "log"))
        time.sleep(0.05)


def _kill_session(sid: int, grace: float = 3.0) -> None:
    """SIGTERM mpiexec's session (it ends its ranks), then SIGKILL whatever is left."""
    try:
        os.killpg(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace
    while (_alive(sid) or session_pids(sid)) and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(50):
        left = [p for p in [sid, *session_pids(sid)] if _alive(p)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _write_state(d: Path, state: dict) -> None:
    with _open(d, "state.json.tmp", "w") as f:
        json.dump(state, f)
    os.replace(d / "state.json.tmp", d / "state.json")


def _clear(d: Path, st: dict | None) -> None:
    """Remove what a service that ended left (its session's stragglers included). A pid
    that now names another process (same pid, another start time) is left alone: the
    kernel reuses no pid while a session of that id lives, so stragglers are ours."""
    if st is not None and st.get("pid") and (_ours(st) or not _alive(int(st["pid"]))):
        _kill_session(int(st["pid"]), grace=0.5)
    for name in ("state.json", SOCKET, READY):
        try:
            (d / name).unlink()
        except FileNotFoundError:
            pass


def status(topo) -> dict:
    """``{"running": bool, ...}``: with a live service its hosts, uptime (s), requests
    served and CPU seconds per host; with one that ended, the hosts the runtime named."""
    d = service_dir(topo)
    st = _state(d)
    if st is None:
        return {"running": False, "dir": str(d)}
    svc = running(topo)
    if svc is None:
        dead = dead_hosts(d, st)
        return {"running": False, "dir": str(d), "ended": True, "dead_hosts": dead,
                "hosts": st["hosts"][1:], "restart_needed": True}
    frame = _ask(svc, {"op": "status"})
    cpu = frame.get("cpu", {})
    out = {"running": True, "dir": str(d), "pid": svc.pid, "hosts": svc.hosts[1:],
           "uptime": frame["uptime"], "served": frame["served"], "dead_hosts": {},
           "cpu_seconds": round(sum(cpu.values()) + frame["coordinator_cpu"], 3),
           "cpu": cpu}
    # start-up and requests included; `service status --sample S` measures idle alone
    out["cpu_percent_since_start"] = 100.0 * out["cpu_seconds"] / max(out["uptime"], 1e-9)
    return out


def add(topo, host: str) -> dict:
    """Add a rank on ``host`` to the running service (MPI_Comm_spawn + intercommunicator
    merge); ``{"hosts", "seconds"}``. MPIToolError when no service runs or the spawn fails;
    InvalidRequest for an unknown host or one the service has."""
    topo.host(host)
    svc = running(topo)
    if svc is None:
        raise MPIToolError(f"no MPI service runs for {topo.name}",
                           hint="`chiba-admin service start`")
    if host in svc.hosts[1:]:
        raise InvalidRequest(f"the service already has a rank on {host}")
    # PRRTE spawns only on hosts of its allocation unless told to add one
    info = {} if topo.kind == "embedded" else {"add-host": host}
    frame = _ask(svc, {"op": "add", "host": host, "info": info}, timeout=START_TIMEOUT)
    _write_state(svc.dir, {**svc.state, "hosts": frame["hosts"]})
    return {"hosts": frame["hosts"][1:], "seconds": frame["seconds"]}


def _ask(svc: Service, request: dict, timeout: float = 30.0) -> dict:
    conn = svc.connect(request)
    try:
        conn.settimeout(timeout)
        f = conn.makefile("rb")
        line = f.readline()
    except OSError as e:
        raise MPIToolError(f"the MPI service did not answer: {e}",
                           where=svc.socket_path) from None
    finally:
        conn.close()
    if not line:
        raise MPIToolError("the MPI service closed the connection", where=svc.socket_path)
    frame = json.loads(line)
    if frame.get("k") == "e":
        raise MPIToolError(frame["msg"], where=svc.socket_path)
    return frame


def stop(topo) -> dict:
    """Stop the service and everything of its session; ``{"stopped": bool, "served"}``."""
    d = service_dir(topo)
    st = _state(d)
    if st is None:
        return {"stopped": False, "dir": str(d)}
    served = None
    svc = running(topo)
    if svc is not None:
        try:
            served = _ask(svc, {"op": "stop"}).get("served")
        except MPIToolError:
            pass
        deadline = time.time() + _STOP_GRACE
        while _alive(svc.pid) and time.time() < deadline:
            time.sleep(0.05)
    _clear(d, st)
    return {"stopped": True, "dir": str(d), "served": served}


def submit(svc: Service, module: str, args: list[str], ranks: list[str], *,
           env: dict[str, str] | None = None, timeout: float | None = None,
           on_event: Callable[[dict], None] | None = None) -> LaunchResult:
    """Run ``module``'s main on the service's ranks of ``ranks`` (in that order) with the
    job in ``args[0]``; the same LaunchResult a fresh mpiexec gives. Ctrl-C re-raises."""
    if not svc.covers(ranks):
        raise InvalidRequest(f"{_NAMES[svc.kind]} has no rank on "
                             + ", ".join(svc.missing(ranks)), hint="--launch mpiexec")
    res = LaunchResult([svc.kind, module], tuple(ranks), None, None, started=time.time(),
                       command=f"{svc.kind} {svc.socket_path}: {module}")
    conn = svc.connect({"op": "run", "module": module, "job": load_job(args[0]),
                        "hosts": list(ranks), "env": env or {}})
    deadline = None if timeout is None else res.started + timeout
    try:
        _read_frames(conn, res, on_event, deadline)
    except KeyboardInterrupt:
        res.interrupted = True
        raise
    finally:
        conn.close()
        res.seconds = time.time() - res.started
    if res.returncode is None and not res.timed_out:
        if svc.kind == "service":
            _blame_dead(svc, res)
        else:  # the shell job ended (its ranks with it): nothing to wait for
            res.returncode, res.stderr = 1, "the shell job ended during the request"
    return res


def _lines(conn: socket.socket, deadline: float | None):
    """The connection's lines as they come; stops at end of file or after ``deadline``
    (then yields None once)."""
    import select

    buf = b""
    while True:
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            yield line
        ready, _, _ = select.select([conn], [], [], 0.5)
        if not ready:
            if deadline is not None and time.time() > deadline:
                yield None
                return
            continue
        data = conn.recv(1 << 16)
        if not data:
            return
        buf += data


def _read_frames(conn: socket.socket, res: LaunchResult, on_event, deadline) -> None:
    for line in _lines(conn, deadline):
        if line is None:
            res.timed_out = True
            return
        frame = json.loads(line)
        k = frame.get("k")
        if k == "e":
            raise MPIToolError(frame["msg"], where=_NAMES[res.argv[0]])
        if k == "end":
            res.returncode = int(frame["rc"])
            return
        res.take(frame["ev"], on_event)


def _blame_dead(svc: Service, res: LaunchResult) -> None:
    """The service ended mid-request: wait for mpiexec to say which rank died."""
    deadline = time.time() + _STOP_GRACE
    while _alive(svc.pid) and time.time() < deadline:
        time.sleep(0.05)
    dead = dead_hosts(svc.dir, svc.state)
    res.returncode = 1
    res.explanation = ["the MPI service ended during the request; restart it with "
                       "`chiba-admin service start`"]
    for h, why in dead.items():
        if h in res.hosts:
            res.failed_ranks[res.hosts.index(h)] = why
        else:
            res.failed_daemons[h] = why
    if not dead:
        res.stderr = "the MPI service ended during the request"


def run_mpi(topo, names: list[str], cmd, *, timeout: float | None = None):
    """``run`` over MPI ranks (the service's, or a fresh mpiexec's, as launch() decides):
    a legacy_transit GroupResult in ``names`` order, as the transport's fan-out gives."""
    import base64

    from legacy_transit.fanout import GroupResult
    from legacy_transit.transport import RunResult

    from mpitools.common.launch import launch
    from mpitools.common.runtime import encode_job

    hosts = [topo.host(n) for n in names]
    job = {"cmd": cmd, "timeout": timeout,
           "env": {h.name: h.environment() for h in hosts},
           "cwd": {h.name: h.local_path("/") if getattr(h, "root", "") else None
                   for h in hosts}}
    res = launch(topo, "mpitools.service.runcmd", [encode_job(job)], names, names[0])
    if res.result is None:
        why = res.describe()
        return GroupResult({n: RunResult(n, 255, error=why) for n in names})
    out = {}
    for n in names:
        r = res.result["hosts"][n]
        out[n] = RunResult(n, int(r["rc"]), base64.b64decode(r["stdout"]),
                           base64.b64decode(r["stderr"]), r["error"], float(r["seconds"]))
    return GroupResult(out)
