"""`cluster init` and `cluster check`: pure plans and scripts, run through the Transport."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from topology import format_bytes

from .errors import TransportError

__all__ = ["DIRS", "DEFAULT_MODES", "DirPlan", "plan_dirs", "init_script", "parse_init",
           "InitRow", "init_hosts", "Check", "probe_script", "parse_probe", "parse_ip_addr",
           "interface_matches", "if_settings", "check_hosts", "python_command",
           "mpi_check", "CHECK_NAMES"]

DIRS = ("scratch", "spool", "repository")
# The topology gives no modes: scratch and the repository are readable by everyone (jobs
# read what was staged, nodes serve the repository), the spool only by the tools (root).
DEFAULT_MODES = {"scratch": 0o755, "spool": 0o700, "repository": 0o755}
CHECK_NAMES = ("ssh", "dirs", "python", "interfaces", "if", "mpi")
# bytes written (then removed) to prove a directory takes data: a full disk still lets
# one create an empty file, so an empty probe would pass on a full scratch
_PROBE_BYTES = 4096
_OK, _WARN, _FAIL, _SKIP = "ok", "warn", "fail", "skip"


# --- plans (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DirPlan:
    """One host directory to create or check: ``path`` on the host, ``local`` from here."""

    host: str
    which: str
    path: str
    local: str
    mode: int


def plan_dirs(topo, hosts: Sequence[str]) -> dict[str, list[DirPlan]]:
    """Host -> its scratch, spool and repository directories with their modes."""
    out = {}
    for name in hosts:
        h = topo.host(name)
        out[name] = [DirPlan(name, w, h.paths.get(w), h.local_path(h.paths.get(w)),
                             DEFAULT_MODES[w]) for w in DIRS]
    return out


def init_script(dirs: Sequence[DirPlan], dry_run: bool = False) -> str:
    """POSIX sh that creates each missing directory (never touches an existing one).

    Prints one line per directory: ``which<TAB>state<TAB>mode owner<TAB>detail`` with state
    ``exists``, ``created``, ``would-create``, ``notdir`` or ``failed``. Existing
    directories keep their mode and owner: ``scratch = "/tmp"`` must not chmod /tmp.
    """
    lines = ["set -u", "one() {",
             '  if [ -d "$2" ]; then '
             'printf "%s\\texists\\t%s\\t\\n" "$1" "$(stat -c "%a %U" -- "$2")"',
             '  elif [ -e "$2" ] || [ -L "$2" ]; then printf "%s\\tnotdir\\t\\t%s\\n" "$1" '
             '"exists but is not a directory"',
             '  elif [ "$4" = dry ]; then printf "%s\\twould-create\\t%s\\t\\n" "$1" "$3"',
             '  elif err=$(mkdir -p -m "$3" -- "$2" 2>&1); then '
             'printf "%s\\tcreated\\t%s\\t\\n" "$1" "$(stat -c "%a %U" -- "$2")"',
             '  else printf "%s\\tfailed\\t\\t%s\\n" "$1" "$(printf %s "$err" | head -n 1)"; fi',
             "}"]
    for d in dirs:
        lines.append(shlex.join(["one", d.which, d.local, f"{d.mode:o}",
                                 "dry" if dry_run else "do"]))
    return "\n".join(lines) + "\n"


@dataclass
class InitRow:
    """What `cluster init` did to one directory of one host (or why it could not)."""

    host: str
    which: str
    path: str
    state: str          # exists | created | would-create | notdir | failed | unreachable
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("exists", "created", "would-create")


def parse_init(host: str, dirs: Sequence[DirPlan], out: str) -> list[InitRow]:
    """Rows from ``init_script``'s output; a directory it did not report is ``failed``."""
    got = {}
    for ln in out.splitlines():
        parts = ln.split("\t")
        if len(parts) >= 3 and parts[0] in DIRS:
            got[parts[0]] = parts
    rows = []
    for d in dirs:
        p = got.get(d.which)
        if p is None:
            rows.append(InitRow(host, d.which, d.path, "failed", "no answer from the host"))
            continue
        state, modes = p[1], p[2]
        detail = p[3] if len(p) > 3 and p[3] else (
            f"mode {modes.replace(' ', ', owner ')}" if state in ("exists", "created")
            else f"mode {modes}" if state == "would-create" else "")
        rows.append(InitRow(host, d.which, d.path, state, detail))
    return rows


def init_hosts(topo, hosts: Sequence[str], transport, *, dry_run: bool = False,
               fanout: int = 32, timeout: float | None = 30.0) -> list[InitRow]:
    """Create every host's directories over ``transport``, ``fanout`` hosts at once.

    Never raises for a host: an unreachable host gives ``unreachable`` rows.
    """
    from legacy_transit.fanout import window

    plans = plan_dirs(topo, hosts)
    if topo.kind == "embedded" and dry_run:
        # host roots may not exist yet: nothing to run a command in, and nothing to ask
        return [InitRow(n, d.which, d.path, "exists" if os.path.isdir(d.local)
                        else "would-create", "" if os.path.isdir(d.local)
                        else f"mode {d.mode:o}") for n in hosts for d in plans[n]]

    def one(h) -> list[InitRow]:
        r = transport.run(h, init_script(plans[h.name], dry_run), timeout=timeout)
        if r.error:
            return [InitRow(h.name, d.which, d.path, "unreachable", r.error)
                    for d in plans[h.name]]
        rows = parse_init(h.name, plans[h.name], r.out)
        if r.rc != 0 and all(x.state == "failed" for x in rows):
            for x in rows:
                x.detail = r.reason()
        return rows

    got = window([topo.host(n) for n in hosts], one, fanout)
    rows = []
    for name, r in got.items():
        rows += r.value if r.ok else [InitRow(name, d.which, d.path, "failed", r.error)
                                      for d in plans[name]]
    return rows


# --- checks (pure parts) ----------------------------------------------------------------------
@dataclass
class Check:
    """One line of `cluster check`: host, check name, status (ok|warn|fail|skip), detail."""

    host: str
    check: str
    status: str
    detail: str
    data: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != _FAIL

    def to_dict(self) -> dict:
        return {"host": self.host, "check": self.check, "status": self.status,
                "ok": self.ok, "detail": self.detail, **self.data}


def probe_script(dirs: Sequence[DirPlan]) -> str:
    """POSIX sh: for each directory ``which<TAB>state<TAB>avail_KiB<TAB>detail``.

    state is ``ok``, ``missing``, ``notdir`` or ``unwritable``; writability is proved by
    writing ``_PROBE_BYTES`` into a file made by mktemp (O_EXCL: never through a symlink
    someone planted) and removing it.
    """
    lines = ["set -u", "one() {",
             '  if [ ! -e "$2" ]; then printf "%s\\tmissing\\t\\t\\n" "$1"; return; fi',
             '  if [ ! -d "$2" ]; then printf "%s\\tnotdir\\t\\t\\n" "$1"; return; fi',
             '  avail=$(df -Pk -- "$2" 2>/dev/null | awk "NR==2 {print \\$4}")',
             '  if ! t=$(mktemp -p "$2" .chiba-check.XXXXXX 2>&1); then '
             'printf "%s\\tunwritable\\t%s\\t%s\\n" "$1" "$avail" "$t"; return; fi',
             f'  if err=$(head -c {_PROBE_BYTES} /dev/zero 2>&1 >"$t" && sync -- "$t" 2>&1); then '
             'rm -f -- "$t"; printf "%s\\tok\\t%s\\t\\n" "$1" "$avail"',
             '  else rm -f -- "$t"; printf "%s\\tunwritable\\t%s\\t%s\\n" "$1" "$avail" '
             '"$(printf %s "$err" | head -n 1)"; fi',
             "}"]
    for d in dirs:
        lines.append(shlex.join(["one", d.which, d.local]))
    return "\n".join(lines) + "\n"


def _os_reason(text: str) -> str:
    """'head: error writing 'standard output': No space left on device' -> the errno text."""
    text = text.strip()
    return text.rsplit(": ", 1)[-1] if ": " in text else text


def parse_probe(host: str, dirs: Sequence[DirPlan], out: str, min_free: int) -> list[Check]:
    """One ``dirs`` Check per directory from ``probe_script``'s output."""
    got = {p[0]: p for p in (ln.split("\t") for ln in out.splitlines()) if p and p[0] in DIRS}
    checks = []
    for d in dirs:
        p = got.get(d.which)
        name = f"dirs:{d.which}"
        if p is None or len(p) < 2:
            checks.append(Check(host, name, _FAIL, f"{d.path}: no answer from the host"))
            continue
        state = p[1]
        avail = int(p[2]) * 1024 if len(p) > 2 and p[2].isdigit() else None
        data = {"path": d.path, "free_bytes": avail}
        free = f", {format_bytes(avail)} free" if avail is not None else ""
        if state == "missing":
            checks.append(Check(host, name, _FAIL, f"{d.path} is missing (run "
                                "`chiba-admin cluster init`)", data))
        elif state == "notdir":
            checks.append(Check(host, name, _FAIL, f"{d.path} is not a directory", data))
        elif state == "unwritable":
            why = _os_reason(p[3] if len(p) > 3 else "")
            checks.append(Check(host, name, _FAIL, f"{d.path} is not writable: "
                                f"{why or 'write failed'}{free}", data))
        elif avail is not None and avail < min_free:
            checks.append(Check(host, name, _WARN, f"{d.path} writable, only "
                                f"{format_bytes(avail)} free (under {format_bytes(min_free)})",
                                data))
        else:
            checks.append(Check(host, name, _OK, f"{d.path} writable{free}", data))
    return checks


_IP_ADDR = re.compile(r"^\d+:\s+(\S+?)(?:@\S+)?\s+(inet6?)\s+(\S+)")


def parse_ip_addr(text: str) -> list[tuple[str, str]]:
    """``ip -o addr`` output -> [(interface, address/prefix)]."""
    out = []
    for ln in text.splitlines():
        m = _IP_ADDR.match(ln.strip())
        if m:
            out.append((m.group(1), m.group(3)))
    return out


def interface_matches(setting: str, addrs: list[tuple[str, str]]) -> list[str]:
    """Interfaces an Open MPI ``*_if_include`` value selects (names or CIDRs, comma-separated)."""
    names = []
    for part in (p.strip() for p in str(setting).split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False) if "/" in part else None
        except ValueError:
            net = None
        for ifname, cidr in addrs:
            if net is None:
                hit = ifname == part
            else:
                try:
                    addr = ipaddress.ip_interface(cidr).ip
                except ValueError:
                    continue
                hit = addr.version == net.version and addr in net
            if hit and ifname not in names:
                names.append(ifname)
    return names


def if_settings(topo) -> dict[str, str]:
    """The [mpi] interface settings that restrict Open MPI or PRRTE to some NICs."""
    mpi = topo.mpi or {}
    return {k: str(mpi[k]) for k in ("btl_tcp_if_include", "prte_if_include") if mpi.get(k)}


def python_command() -> str:
    """What proves a Python can run the ranks: mpi4py and the rank modules import."""
    return ("import sys, mpi4py, mpitools.common.runtime; "
            "print(sys.version.split()[0], mpi4py.__version__)")


# --- checks (execution) -----------------------------------------------------------------------
def _ssh_check(transport, h) -> Check:
    client = getattr(transport, "client", None)
    if client is None:
        return Check(h.name, "ssh", _OK, "local host directory (embedded): no SSH")
    t0 = time.monotonic()
    try:
        c = client(h)
    except TransportError as e:
        return Check(h.name, "ssh", _FAIL, e.what + (f" ({e.hint})" if e.hint else ""))
    key = c.get_transport().get_remote_server_key()
    import base64
    import hashlib

    fp = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    s = h.ssh
    return Check(h.name, "ssh", _OK, f"{h.connect_address}:{s.port}, host key "
                 f"{key.get_name()} SHA256:{fp} ({s.host_key_policy})",
                 {"seconds": round(time.monotonic() - t0, 3)})


def _run_check(transport, h, name: str, cmd, timeout: float, env=None):
    """Run ``cmd``; (RunResult, None) or (None, a failed Check) when it could not run."""
    r = transport.run(h, cmd, timeout=timeout, env=env)
    if r.error:
        return None, Check(h.name, name, _FAIL, r.error)
    return r, None


def _python_check(transport, h, python: str, env: dict, timeout: float) -> Check:
    r, bad = _run_check(transport, h, "python", [python, "-c", python_command()], timeout, env)
    if bad:
        return bad
    if r.rc == 0:
        ver = r.out.split()
        return Check(h.name, "python", _OK, f"{python}: Python {ver[0] if ver else '?'}, "
                     f"mpi4py {ver[1] if len(ver) > 1 else '?'}")
    err = [ln.strip() for ln in r.err.splitlines() if ln.strip()]
    if r.rc in (126, 127) and not any("Error" in ln for ln in err):
        return Check(h.name, "python", _FAIL, f"{python} not found (set [mpi] python to "
                     "the ranks' interpreter there)")
    last = err[-1] if err else f"exit {r.rc}"
    m = re.search(r"No module named '([^']+)'", last)
    if m:
        return Check(h.name, "python", _FAIL, f"{python} cannot import {m.group(1)} "
                     "(install it there or set [mpi] python)")
    return Check(h.name, "python", _FAIL, f"{python}: {last}")


def _iface_checks(transport, h, settings: dict[str, str], timeout: float) -> list[Check]:
    r, bad = _run_check(transport, h, "interfaces", ["ip", "-o", "addr", "show"], timeout)
    if bad:
        return [bad]
    if r.rc != 0:
        return [Check(h.name, "interfaces", _WARN, "cannot list interfaces (`ip -o addr`: "
                      f"{r.reason()})")]
    addrs = parse_ip_addr(r.out)
    out = []
    for key, value in settings.items():
        nics = interface_matches(value, addrs)
        name = f"if:{key}"
        data = {"setting": value, "interfaces": nics}
        if not nics:
            out.append(Check(h.name, name, _FAIL, f"{key} = {value!r} matches no interface",
                             data))
        elif len(nics) > 1:
            out.append(Check(h.name, name, _WARN, f"{key} = {value!r} matches {len(nics)} "
                             f"interfaces ({', '.join(nics)}): PRRTE's daemons "
                             "can crash at start-up; name one interface", data))
        else:
            out.append(Check(h.name, name, _OK, f"{key} = {value!r}: {nics[0]}", data))
    return out


def check_hosts(topo, hosts: Sequence[str], transport, *, fanout: int = 32,
                timeout: float = 10.0, min_free: int = 64 << 20,
                on_done: Callable[[str], None] | None = None) -> list[Check]:
    """SSH, directories, the ranks' Python and interface settings on every host, in parallel.

    Each host's checks run one after the other, each bounded by ``timeout`` seconds; a
    host whose SSH fails gets ``skip`` for the rest. Never raises for a host.
    """
    from legacy_transit.fanout import window
    from mpitools.common.launch import rank_env, rank_python

    plans = plan_dirs(topo, hosts)
    python, env = rank_python(topo), rank_env(topo)
    settings = if_settings(topo) if topo.kind != "embedded" else {}

    def one(h) -> list[Check]:
        ssh = _ssh_check(transport, h)
        out = [ssh]
        if not ssh.ok:
            out += [Check(h.name, n, _SKIP, "not checked: no SSH") for n in ("dirs", "python")]
            return out
        r, bad = _run_check(transport, h, "dirs", probe_script(plans[h.name]), timeout)
        out += [bad] if bad else parse_probe(h.name, plans[h.name], r.out, min_free)
        out.append(_python_check(transport, h, python, env, timeout))
        if settings:
            out += _iface_checks(transport, h, settings, timeout)
        if on_done is not None:
            on_done(h.name)
        return out

    got = window([topo.host(n) for n in hosts], one, fanout)
    checks = []
    for name, r in got.items():
        checks += r.value if r.ok else [Check(name, "ssh", _FAIL, r.error)]
    return checks


def mpi_check(topo, hosts: Sequence[str], *, timeout: float = 120.0,
              start_timeout: float = 60.0) -> tuple[list[Check], dict]:
    """One tiny MPI job (mpitools.ping.ranks) over ``hosts``: per-host rows and a summary dict.

    The summary has ``ok``, ``hosts``, ``launch_seconds`` (mpiexec until rank 0 started),
    ``seconds`` (the whole job), ``retried`` and ``error``. A failed job blames the hosts
    the runtime named; the others get ``skip``.
    """
    from chiba_admin.errors import MPIToolError
    from mpitools.common.launch import launch
    from mpitools.common.runtime import encode_job

    summary = {"ok": False, "hosts": list(hosts), "launch_seconds": None, "seconds": None,
               "retried": None, "error": None}
    if not hosts:
        summary["error"] = "no host passed the checks before it"
        return [], summary
    try:
        res = launch(topo, "mpitools.ping.ranks", [encode_job({})], list(hosts), None,
                     timeout=timeout, start_timeout=start_timeout)
    except MPIToolError as e:
        summary["error"] = str(e)
        return [Check(h, "mpi", _FAIL, str(e)) for h in hosts], summary
    launch_s = res.launch_seconds()
    summary.update(launch_seconds=None if launch_s is None else round(launch_s, 3),
                   seconds=round(res.seconds, 3), retried=res.retried,
                   command=res.command)
    r = res.result
    if res.ok and r and r.get("ok"):
        summary["ok"] = True
        n = r.get("size")
        ranks = {x.get("host"): x for x in r.get("ranks", [])}
        out = []
        for h in hosts:
            x = ranks.get(h)
            if x is None:
                out.append(Check(h, "mpi", _FAIL, "no rank reported from this host"))
                continue
            # rank and MPI_Init time go to --json only: equal details group in the table
            detail = (f"barrier and allreduce ok over {n} ranks; job launched in "
                      f"{launch_s or 0:.2f} s")
            if res.retried:
                detail += f" (after a retry: {res.retried})"
            out.append(Check(h, "mpi", _OK, detail, {"rank": x["rank"],
                                                     "init_seconds": x.get("init_seconds")}))
        return out, summary
    why = res.describe() if r is None else (
        f"allreduce gave {r.get('sum')}, expected {r.get('expected')}" if r.get("ok") is False
        else res.describe())
    summary["error"] = why
    blamed = res.failed_hosts()
    out = []
    for h in hosts:
        if h in blamed:
            out.append(Check(h, "mpi", _FAIL, blamed[h]))
        elif blamed:
            out.append(Check(h, "mpi", _SKIP, "job stopped by the failure on "
                             + ", ".join(blamed)))
        else:
            out.append(Check(h, "mpi", _FAIL, why))
    return out, summary
