"""One Transport interface (run a command, put/get a file on a host): local for embedded, paramiko for SSH."""

from __future__ import annotations

import logging
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Callable, Sequence, Union

from chiba_admin.errors import TransportError

__all__ = [
    "RunResult",
    "Transport",
    "LocalTransport",
    "SSHTransport",
    "transport_for",
    "command_line",
    "env_prefixed",
    "UNREACHABLE",
    "RUN_TAG",
    "end_tagged_line",
    "STOPPED",
]

# ssh(1) exits 255 when it cannot reach a host; pdsh -S reports the same, so do we.
UNREACHABLE = 255
_CHUNK = 1 << 16
_GENERIC_TRAILERS = ("Exiting with failure status", "Error is not recoverable")
# Every command runs with RUN_TAG=<tag> in its environment, which its children inherit
# (also those that leave its process group or session), so a timeout can end all of them.
# A command run from inside another (the transit agent runs node commands) gets the outer
# tag with its own appended, "outer/inner", so ending the outer ends the inner too.
RUN_TAG = "CHIBA_RUN_TAG"
_TAG = re.compile(r"[0-9a-f]{16}(/[0-9a-f]{16})*")
_END_ROUNDS = 5  # kills of processes forked between one scan and the next
# a run's ``cancel`` is looked at this often (seconds)
_CANCEL_POLL = 0.1
# RunResult.error of a command ended because its caller set ``cancel``
STOPPED = "stopped before it ended: its caller stopped it"

Command = Union[str, Sequence[str]]
Sink = Callable[[bytes], None]
Stdin = Union[None, bytes, str, IO[bytes]]


@dataclass
class RunResult:
    """What one command on one host did; ``error`` is set when it could not run or timed out."""

    host: str
    rc: int
    stdout: bytes = b""
    stderr: bytes = b""
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.rc == 0

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def reason(self) -> str:
        """One line saying why it failed (empty when it did not)."""
        if self.error:
            return self.error
        if self.rc == 0:
            return ""
        lines = [ln.strip() for ln in self.err.splitlines() if ln.strip()]
        # the first complaint is the cause (tar then adds "Wrote only ..." lines and a
        # generic trailer, "tar: Exiting with failure status ...")
        useful = [ln for ln in lines if not any(g in ln for g in _GENERIC_TRAILERS)] or lines
        return f"exit {self.rc}" + (f": {useful[0][:300]}" if useful else "")


def command_line(cmd: Command) -> str:
    """The shell command line for ``cmd``: an argv is quoted with shlex.join, a string kept as is."""
    if isinstance(cmd, str):
        return cmd
    return shlex.join([str(a) for a in cmd])


def env_prefixed(cmd: Command, env: dict[str, str]) -> str:
    """``env K=V ... cmd``: sshd may refuse AcceptEnv, so the variables also ride in the line."""
    if not env:
        return command_line(cmd)
    assigns = [f"{k}={v}" for k, v in sorted(env.items())]
    if isinstance(cmd, str):
        # a shell string needs a shell after env; sh -c keeps it POSIX whatever the login shell
        return shlex.join(["env", *assigns, "sh", "-c", cmd])
    return shlex.join(["env", *assigns, *[str(a) for a in cmd]])


class Transport:
    """Run commands and move files on hosts; subclasses fill in the three I/O hooks."""

    def run(self, host, cmd: Command, timeout: float | None = None,
            env: dict[str, str] | None = None, stdin: Stdin = None,
            on_stdout: Sink | None = None, on_stderr: Sink | None = None,
            cancel: threading.Event | None = None) -> RunResult:
        """Run ``cmd`` on ``host``; never raises for host trouble (it is in ``error``).

        Output chunks go to ``on_stdout``/``on_stderr`` as they arrive (and are then not
        kept in the result); ``stdin`` may be bytes, text or a binary file streamed in.
        ``cancel`` set (from another thread) ends the command and every process it
        started, as ``timeout`` does, within a tenth of a second: ``error`` then says
        it was stopped (:data:`STOPPED`).
        """
        raise NotImplementedError

    def put(self, host, local: str, remote: str) -> int:
        """Copy local file ``local`` to host path ``remote``; returns bytes; raises TransportError."""
        raise NotImplementedError

    def get(self, host, remote: str, local: str) -> int:
        """Copy host path ``remote`` to local file ``local``; returns bytes; raises TransportError."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop every connection."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- shared stream plumbing ------------------------------------------------------------------
class _Collector:
    """Either forwards chunks to a sink or keeps them."""

    def __init__(self, sink: Sink | None):
        self.sink, self.parts = sink, []

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        if self.sink is not None:
            self.sink(data)
        else:
            self.parts.append(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


def _feed(write: Callable[[bytes], None], close: Callable[[], None], stdin: Stdin,
          errors: list) -> None:
    """Write ``stdin`` (bytes, text or a file) then close; a broken pipe just ends it."""
    try:
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if isinstance(stdin, (bytes, bytearray)):
            for i in range(0, len(stdin), _CHUNK):
                write(bytes(stdin[i:i + _CHUNK]))
        elif stdin is not None:
            while True:
                buf = stdin.read(_CHUNK)
                if not buf:
                    break
                write(buf)
    except (BrokenPipeError, OSError, EOFError) as e:  # the command stopped reading
        errors.append(e)
    finally:
        try:
            close()
        except (OSError, EOFError):
            pass


@contextmanager
def _file_errors(host, what: str, remote: str | None = None,
                 isdir: Callable[[str], bool] | None = None):
    """A failed file transfer as one TransportError: what, why, on which host.

    When ``remote`` lies under one of the host's directories (scratch, spool,
    repository) and ``isdir`` says that directory is missing, the message names it and
    `chiba-admin cluster init` as the fix.
    """
    try:
        yield
    except OSError as e:
        missing = _missing_host_dir(host, remote, isdir) if remote and isdir else None
        if missing:
            raise TransportError(f"{what}: {missing[0]} directory {missing[1]} is missing",
                                 where=host.name, hint="run `chiba-admin cluster init`"
                                 ) from None
        raise TransportError(f"{what}: {e.strerror or e}", where=host.name) from None


def _missing_host_dir(host, remote: str, isdir: Callable[[str], bool]):
    """(which, path) of the host directory holding ``remote`` if it does not exist."""
    paths = getattr(host, "paths", None)
    if paths is None:
        return None
    # the deepest directory holding remote (a spool may live inside scratch)
    for which in sorted(("scratch", "spool", "repository"), key=lambda w: -len(paths.get(w))):
        base = paths.get(which)
        if remote == base or remote.startswith(base.rstrip("/") + "/"):
            try:
                there = isdir(base)
            except Exception:  # cannot tell: keep the transfer's own reason
                return None
            return None if there else (which, base)
    return None


def _fmt_timeout(t: float) -> str:
    return f"{t:g}s"


def _new_tag() -> str:
    """A fresh run tag, under the tag of the command this process runs in, if any."""
    mine = secrets.token_hex(8)
    outer = os.environ.get(RUN_TAG, "")
    return f"{outer}/{mine}" if _TAG.fullmatch(outer) else mine


def end_tagged_line(tag: str) -> str:
    """A POSIX sh line that SIGKILLs every process tagged ``tag`` or under it (``tag/...``).

    Reads Linux ``/proc/PID/environ`` with ``grep -z`` (GNU and BusyBox). Exits 0 once no
    such process is left, 1 when they kept appearing, 2 without /proc, 3 when grep lacks
    -z. The line's own processes carry the tag only in their command line, not their
    environment; zombies have no environment.
    Raises ValueError for a malformed tag (it goes into a regular expression).
    """
    if not _TAG.fullmatch(tag):
        raise ValueError(f"not a run tag: {tag!r}")
    scan = (f"grep -lzxE -e '{RUN_TAG}={tag}(/[0-9a-f]+)*' /proc/[0-9]*/environ 2>/dev/null"
            " | sed -e 's,^/proc/,,' -e 's,/environ$,,'")
    # without /proc or grep -z the scan would find nothing and claim success: say so instead
    return ("[ -r /proc/self/environ ] || exit 2; printf 'x\\0' | grep -qzx x || exit 3; "
            f'n=0; while p=$({scan}); [ -n "$p" ]; do '
            f'[ "$n" -lt {_END_ROUNDS} ] || exit 1; kill -KILL $p 2>/dev/null; n=$((n+1)); '
            "done; exit 0")


def _end_status(rc: int) -> str | None:
    """What an end_tagged_line exit status says went wrong (None: all ended)."""
    return {0: None, 1: "processes kept appearing", 2: "no /proc/PID/environ to find them",
            3: "grep cannot read NUL-separated input (-z)"}.get(rc, f"exit {rc}")


def _timeout_error(timeout: float | None, not_ended: str | None,
                   cancel: threading.Event | None = None) -> str:
    stopped = cancel is not None and cancel.is_set()
    msg = STOPPED if stopped else f"command timed out after {_fmt_timeout(timeout)}"
    return msg + (f"; could not end its processes: {not_ended}" if not_ended else "")


def _slice(deadline: float | None, cancel: threading.Event | None) -> float | None:
    """How long to wait before looking again: until ``deadline``, and at most a tenth of
    a second while ``cancel`` may be set; 0.0 once either has come."""
    if cancel is not None and cancel.is_set():
        return 0.0
    left = _left(deadline)
    return left if cancel is None else min(_CANCEL_POLL, _CANCEL_POLL if left is None else left)


# --- local: the embedded cluster ---------------------------------------------------------
class LocalTransport(Transport):
    """Hosts are directories: a command is a local process in the host's root with its CHIBA_* env."""

    def run(self, host, cmd: Command, timeout: float | None = None,
            env: dict[str, str] | None = None, stdin: Stdin = None,
            on_stdout: Sink | None = None, on_stderr: Sink | None = None,
            cancel: threading.Event | None = None) -> RunResult:
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        tag = _new_tag()
        full_env = {**os.environ, **host.environment(), **(env or {}), RUN_TAG: tag}
        cwd = host.local_path("/") if getattr(host, "root", "") else None
        shell = isinstance(cmd, str)
        try:
            # its own session: one killpg ends the command and every child that stays
            p = subprocess.Popen(cmd if shell else [str(a) for a in cmd], shell=shell,
                                 cwd=cwd, env=full_env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
        except OSError as e:
            return RunResult(host.name, 127, error=f"cannot start {command_line(cmd)[:60]}: "
                             f"{e.strerror or e}", seconds=time.monotonic() - t0)
        out, err, feed_err = _Collector(on_stdout), _Collector(on_stderr), []
        feeder = threading.Thread(target=_feed, args=(p.stdin.write, p.stdin.close, stdin,
                                                      feed_err), daemon=True)
        feeder.start()
        reader = _PipeReader({p.stdout: out, p.stderr: err})
        rc = None
        # The leader is reaped only after its outputs closed: until then its pid, hence
        # its process group, cannot be reused, so the killpg below hits nobody else.
        if reader.read_until(deadline, cancel):
            while rc is None and (left := _slice(deadline, cancel)) != 0.0:
                try:
                    rc = p.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    pass  # it closed its outputs but kept running
        error = None
        if rc is None:  # -u reached (maybe only by a background child holding the
            # output), or cancelled
            error = _timeout_error(timeout, _end_local(p, tag), cancel)
            p.wait()
            reader.drain()
            rc = UNREACHABLE
        elif rc < 0:  # killed by a signal: report it the way a shell would
            rc = 128 - rc
        reader.close()
        # a child left running (daemonised, outputs redirected) may hold stdin unread;
        # the command is over, so the rest of the input is not waited for
        feeder.join(1.0)
        return RunResult(host.name, rc, out.value(), err.value(), error,
                         time.monotonic() - t0)

    def put(self, host, local: str, remote: str) -> int:
        dst = host.local_path(remote)
        with _file_errors(host, f"cannot put {local} to {remote}", remote,
                          lambda p: os.path.isdir(host.local_path(p))):
            shutil.copyfile(local, dst)
            return os.path.getsize(dst)

    def get(self, host, remote: str, local: str) -> int:
        with _file_errors(host, f"cannot get {remote}"):
            shutil.copyfile(host.local_path(remote), local)
            return os.path.getsize(local)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _PipeReader:
    """Reads a process's output pipes in the calling thread, so a deadline can stop it.

    A blocked read() cannot be abandoned; a background child that keeps a pipe open would
    hold a reader thread (and the caller joining it) for as long as it lives.
    """

    def __init__(self, pipes: dict):
        self._sel = selectors.DefaultSelector()
        self._files = list(pipes)
        for f, sink in pipes.items():
            os.set_blocking(f.fileno(), False)
            self._sel.register(f, selectors.EVENT_READ, sink)

    def read_until(self, deadline: float | None,
                   cancel: threading.Event | None = None) -> bool:
        """Forward chunks to the sinks until every pipe is at EOF (True), or the deadline
        or ``cancel`` came (False)."""
        while self._sel.get_map():
            wait = _slice(deadline, cancel)
            if wait == 0.0:
                return False
            for key, _ in self._sel.select(wait):
                self._read(key)
        return True

    def drain(self) -> None:
        """What is already buffered in the pipes, without waiting for more."""
        while self._sel.get_map():
            ready = self._sel.select(0)
            if not ready:
                return
            for key, _ in ready:
                self._read(key)

    def _read(self, key) -> None:
        try:
            buf = os.read(key.fd, _CHUNK)
        except BlockingIOError:
            return
        if buf:
            key.data(buf)
        else:
            self._sel.unregister(key.fileobj)

    def close(self) -> None:
        self._sel.close()
        for f in self._files:
            f.close()


def _end_local(p: subprocess.Popen, tag: str) -> str | None:
    """SIGKILL the command's process group, then any tagged process that left it; why not, or None."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()
    if not os.path.isdir("/proc/self"):
        return None  # no /proc to find escaped children by: the process group has to do
    try:
        r = subprocess.run(["sh", "-c", end_tagged_line(tag)], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return _end_status(r.returncode)


# --- SSH: real hosts, the testbed ------------------------------------------------------------
class SSHTransport(Transport):
    """paramiko with key authentication, host keys checked, one reused client per host."""

    def __init__(self, connect_timeout: float | None = None):
        self._connect_timeout = connect_timeout  # overrides each host's ssh.connect_timeout
        self._clients: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._kh_lock = threading.Lock()  # accept-new writes known_hosts from many threads

    # connection -----------------------------------------------------------------------
    def _lock_for(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def client(self, host):
        """The connected paramiko client for ``host`` (connects once); raises TransportError."""
        with self._lock_for(host.name):
            c = self._clients.get(host.name)
            if c is not None and c.get_transport() is not None and c.get_transport().is_active():
                return c
            c = self._connect(host)
            self._clients[host.name] = c
            return c

    def _settings(self, host) -> dict:
        s = host.ssh
        opts = {"hostname": host.connect_address, "port": s.port, "user": s.user,
                "identity": s.identity_file}
        if s.config_file:
            import paramiko

            cfg = paramiko.SSHConfig.from_path(os.path.expanduser(s.config_file))
            found = cfg.lookup(host.connect_address)
            opts["hostname"] = found.get("hostname", opts["hostname"])
            if "port" in found and s.port == 22:
                opts["port"] = int(found["port"])
            opts["user"] = opts["user"] or found.get("user")
            if not opts["identity"] and found.get("identityfile"):
                opts["identity"] = found["identityfile"][0]
        return opts

    def _connect(self, host):
        import paramiko

        s, o = host.ssh, self._settings(host)
        timeout = self._connect_timeout or s.connect_timeout
        kh = os.path.expanduser(s.known_hosts or "~/.ssh/known_hosts")
        # paramiko logs tracebacks for failures we report ourselves, one line per host
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        c = paramiko.SSHClient()
        if os.path.exists(kh):
            try:
                c.load_host_keys(kh)
            except (OSError, paramiko.SSHException) as e:
                raise TransportError(f"cannot read known_hosts {kh}: {e}",
                                     where=host.name) from None
        c.set_missing_host_key_policy(
            _AcceptNew(kh, self._kh_lock) if s.host_key_policy == "accept-new"
            else paramiko.RejectPolicy())
        where = f"{o['hostname']}:{o['port']}"
        key = os.path.expanduser(o["identity"]) if o["identity"] else None
        t0 = time.monotonic()
        try:
            c.connect(o["hostname"], port=o["port"], username=o["user"] or _local_user(),
                      key_filename=key, timeout=timeout, banner_timeout=timeout,
                      auth_timeout=timeout, allow_agent=key is None,
                      look_for_keys=key is None)
        except paramiko.BadHostKeyException as e:
            c.close()
            raise TransportError(
                f"host key for {where} ({e.key.get_name()}) does not match known_hosts {kh}",
                where=host.name, hint="possible man-in-the-middle; if the host was "
                f"reinstalled remove the old key with ssh-keygen -f {kh} -R '{where}'") from None
        except paramiko.AuthenticationException as e:
            c.close()
            raise TransportError(f"authentication failed at {where} as "
                                 f"{o['user'] or _local_user()}: {e}", where=host.name,
                                 hint=f"check identity_file {key}" if key else None) from None
        except paramiko.SSHException as e:
            c.close()
            msg = str(e)
            if "not found in known_hosts" in msg:
                raise TransportError(f"unknown host key for {where}, not in known_hosts {kh}",
                                     where=host.name, hint="add it (ssh-keyscan) or set "
                                     "host_key_policy = \"accept-new\"") from None
            # a peer that accepts TCP but never speaks SSH ends as "Error reading SSH
            # protocol banner" or, when the reader thread lost the race, "No existing session"
            if "banner" in msg.lower() or ("No existing session" in msg
                                           and time.monotonic() - t0 >= timeout * 0.9):
                msg = f"no SSH banner from {where} within {_fmt_timeout(timeout)}"
            raise TransportError(msg, where=host.name) from None
        except (socket.timeout, TimeoutError):
            c.close()
            raise TransportError(f"connection to {where} timed out after "
                                 f"{_fmt_timeout(timeout)}", where=host.name) from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            c.close()
            raise TransportError(f"connection refused by {where}", where=host.name) from None
        except OSError as e:
            c.close()
            raise TransportError(f"cannot connect to {where}: {e.strerror or e}",
                                 where=host.name) from None
        # keepalives notice a dead peer on long-running commands
        c.get_transport().set_keepalive(15)
        return c

    def close(self) -> None:
        with self._guard:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    # commands -------------------------------------------------------------------------
    def run(self, host, cmd: Command, timeout: float | None = None,
            env: dict[str, str] | None = None, stdin: Stdin = None,
            on_stdout: Sink | None = None, on_stderr: Sink | None = None,
            cancel: threading.Event | None = None) -> RunResult:
        t0 = time.monotonic()
        tag = _new_tag()
        full_env = {**host.environment(), **(env or {}), RUN_TAG: tag}
        try:
            chan = self._session(host)
        except TransportError as e:
            return RunResult(host.name, UNREACHABLE, error=e.what,
                             seconds=time.monotonic() - t0)
        try:
            try:
                chan.update_environment(full_env)  # refused silently when AcceptEnv says no
            except Exception:
                pass
            chan.exec_command(env_prefixed(cmd, full_env))
            out, err, feed_err = _Collector(on_stdout), _Collector(on_stderr), []
            threads = [threading.Thread(target=_chan_pump, args=(chan.recv, out), daemon=True),
                       threading.Thread(target=_chan_pump, args=(chan.recv_stderr, err),
                                        daemon=True),
                       threading.Thread(target=_feed, args=(chan.sendall, chan.shutdown_write,
                                                             stdin, feed_err), daemon=True)]
            for t in threads:
                t.start()
            # -u bounds the command; connecting was bounded by the connect timeout (-t)
            deadline = None if timeout is None else time.monotonic() + timeout
            # sshd closes the outputs only when every holder has closed them (a background
            # child keeps them open) and sends the exit status only when the command ended
            if not _ended(threads[:2], chan.status_event, deadline, cancel):
                not_ended = self._end_remote(host, tag)
                chan.close()
                return RunResult(host.name, UNREACHABLE, out.value(), err.value(),
                                 _timeout_error(timeout, not_ended, cancel),
                                 time.monotonic() - t0)
            rc = chan.recv_exit_status()
            threads[2].join(1.0)
            if rc == -1:  # the channel closed without an exit status: the link died
                return RunResult(host.name, UNREACHABLE, out.value(), err.value(),
                                 "connection lost before the command finished",
                                 time.monotonic() - t0)
            return RunResult(host.name, rc, out.value(), err.value(), None,
                             time.monotonic() - t0)
        except Exception as e:
            return RunResult(host.name, UNREACHABLE, error=f"SSH session failed: {e}",
                             seconds=time.monotonic() - t0)
        finally:
            chan.close()

    def _session(self, host):
        """A new session channel on ``host``'s connection; raises TransportError."""
        try:
            return self.client(host).get_transport().open_session(
                timeout=self._connect_timeout or host.ssh.connect_timeout)
        except TransportError:
            raise
        except Exception as e:  # paramiko raises SSHException/EOFError on a dying link
            raise TransportError(f"cannot open a session: {e}", where=host.name) from None

    def _end_remote(self, host, tag: str) -> str | None:
        """SIGKILL every process of a timed-out command on ``host``; why not, or None.

        Closing the channel is not enough: without a pty sshd signals nothing on hang-up,
        and the command or its background children would keep running.
        """
        limit = self._connect_timeout or host.ssh.connect_timeout
        try:
            k = self._session(host)
        except TransportError as e:
            return e.what
        try:
            k.settimeout(limit)
            k.exec_command(end_tagged_line(tag))
            k.shutdown_write()
            while k.recv(_CHUNK):  # the line prints nothing; EOF when it is done
                pass
            if not k.status_event.wait(limit):
                return f"no answer within {_fmt_timeout(limit)}"
            return _end_status(k.recv_exit_status())
        except Exception as e:  # socket.timeout or a dying link
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            k.close()

    @contextmanager
    def _sftp(self, host):
        """An SFTP session on ``host``'s reused connection, closed after the block."""
        try:
            sftp = self.client(host).open_sftp()
        except TransportError:
            raise
        except Exception as e:
            raise TransportError(f"cannot open SFTP: {e}", where=host.name) from None
        try:
            yield sftp
        finally:
            sftp.close()

    def put(self, host, local: str, remote: str) -> int:
        with self._sftp(host) as sftp, _file_errors(host, f"cannot put {local} to {remote}",
                                                    remote, lambda p: _sftp_isdir(sftp, p)):
            return sftp.put(local, remote).st_size

    def get(self, host, remote: str, local: str) -> int:
        with self._sftp(host) as sftp, _file_errors(host, f"cannot get {remote}"):
            sftp.get(remote, local)
            return os.path.getsize(local)


def _sftp_isdir(sftp, path: str) -> bool:
    import stat

    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode)
    except OSError:
        return False


def _ended(pumps: list[threading.Thread], status: threading.Event, deadline: float | None,
           cancel: threading.Event | None) -> bool:
    """Wait until the output ``pumps`` end and the exit ``status`` came (True), or the
    deadline or ``cancel`` comes first (False)."""
    for t in pumps:
        while t.is_alive() and (left := _slice(deadline, cancel)) != 0.0:
            t.join(left)
    while not status.is_set() and (left := _slice(deadline, cancel)) != 0.0:
        status.wait(left)
    return not any(t.is_alive() for t in pumps) and status.is_set()


def _chan_pump(recv: Callable[[int], bytes], sink: _Collector) -> None:
    while True:
        try:
            buf = recv(_CHUNK)
        except (OSError, EOFError):
            break
        if not buf:
            break
        sink(buf)


def _local_user() -> str:
    import getpass

    return getpass.getuser()


class _AcceptNew:
    """ssh's StrictHostKeyChecking=accept-new: learn unknown keys, still refuse changed ones."""

    def __init__(self, path: str, lock: threading.Lock):
        self.path, self.lock = path, lock

    def missing_host_key(self, client, hostname, key) -> None:
        with self.lock:
            client.get_host_keys().add(hostname, key.get_name(), key)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="ascii") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def transport_for(topo_or_kind, connect_timeout: float | None = None) -> Transport:
    """The transport a cluster needs: local processes for "embedded", paramiko for "ssh"."""
    kind = topo_or_kind if isinstance(topo_or_kind, str) else topo_or_kind.kind
    if kind == "embedded":
        return LocalTransport()
    if kind == "ssh":
        return SSHTransport(connect_timeout)
    raise TransportError(f"no transport for cluster kind {kind!r}",
                         hint="use kind = \"embedded\" or \"ssh\"")
