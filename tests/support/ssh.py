"""A real sshd on loopback and topologies whose hosts are all this machine (pytest plugin).

Registered in tests/conftest.py through ``pytest_plugins``, so the session-scoped
``sshd`` fixture is shared by every test file; helpers are imported from here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SSHD", "NODES", "HOSTS", "Sshd", "sshd", "sshd_unavailable", "free_port",
           "write_topology"]

SSHD = "/usr/sbin/sshd"
NODES = ["ccn01", "ccn02", "ccn03", "ccn04"]
HOSTS = ["pres", "mayor1", "mayor2", *NODES]


def sshd_unavailable() -> str | None:
    """Why a loopback sshd cannot run here (None when it can)."""
    if not (os.path.exists(SSHD) and shutil.which("ssh-keygen") and shutil.which("ssh")):
        return "needs openssh-server and openssh-client (scripts/install-system-deps.sh)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    dir: Path
    port: int
    key: str
    known_hosts: str
    host_pub: str


_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
UsePAM no
UseDNS no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
MaxStartups 200
MaxSessions 100
AcceptEnv CHIBA_*
Subsystem sftp internal-sftp
LogLevel INFO
"""


def _wait_listening(proc: subprocess.Popen, log: Path) -> str | None:
    """Read sshd's stderr until it says it listens (None) or ends (its last lines).

    sshd -D -e logs "Server listening on ..." once its socket is bound: an event to wait
    for, not a port to poll. The rest of its log is copied to ``log`` by a thread, so
    that a full pipe never blocks sshd.
    """
    seen = []
    for line in iter(proc.stderr.readline, b""):
        seen.append(line)
        if b"Server listening on" in line:
            break
    else:
        return b"".join(seen[-5:]).decode(errors="replace") or "sshd exited"

    def drain():
        with open(log, "ab") as f:
            f.writelines(seen)
            for rest in iter(proc.stderr.readline, b""):
                f.write(rest)

    threading.Thread(target=drain, daemon=True).start()
    return None


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1:<free port>, root key login, killed by PID at teardown.

    Skips the test (with the reason) when openssh is missing or sshd does not start.
    """
    reason = sshd_unavailable()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(_CONFIG.format(port=port, d=d))
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir sshd insists on
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        failed = _wait_listening(proc, d / "sshd.log")
        if failed:
            pytest.skip(f"sshd did not start: {failed[-500:]}")
        pub = (d / "host_key.pub").read_text().split()
        kh = d / "known_hosts"
        kh.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        yield Sshd(d, port, str(d / "client_key"), str(kh), f"{pub[0]} {pub[1]}")
    finally:
        proc.terminate()  # our own sshd, by its PID
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_topology(base: Path, s: Sshd, hosts: dict[str, dict] | None = None,
                   name: str = "loop", home: str | None = None) -> str:
    """An ssh topology whose hosts are all this machine, each with its own directories.

    ``base/HOST/{scratch,spool,repo}`` for each of ``HOSTS`` (created); ``hosts`` adds
    per-host ``[hosts.H.ssh]`` settings (say a dead port); ``home`` names the host that
    holds the operator's files. Returns the path of the topology file written in ``base``.
    """
    lines = [f'[cluster]\nname = "{name}"\nkind = "ssh"\n'
             + (f'home = "{home}"\n' if home else ""),
             f'[defaults.ssh]\nuser = "root"\nport = {s.port}\nidentity_file = "{s.key}"\n'
             f'known_hosts = "{s.known_hosts}"\nconnect_timeout = 5\n',
             '[links.core]\nbandwidth = "1Gbit"\n[links.town]\nbandwidth = "100Mbit"\n',
             '[president]\nname = "pres"\naddress = "127.0.0.1"\n'
             f'scratch = "{base}/pres/scratch"\nspool = "{base}/pres/spool"\n'
             f'repository = "{base}/pres/repo"\n',
             '[mayors.mayor1]\n[mayors.mayor2]\n',
             '[towns.town1]\nmayor = "mayor1"\nnodes = "ccn[01-02]"\n',
             '[towns.town2]\nmayor = "mayor2"\nnodes = "ccn[03-04]"\n']
    for h in HOSTS:
        for sub in ("scratch", "spool", "repo"):
            os.makedirs(base / h / sub, exist_ok=True)
        if h == "pres":
            continue
        lines.append(f'[hosts.{h}]\naddress = "127.0.0.1"\nscratch = "{base}/{h}/scratch"\n'
                     f'spool = "{base}/{h}/spool"\nrepository = "{base}/{h}/repo"\n')
        extra = (hosts or {}).get(h)
        if extra:
            lines.append(f"[hosts.{h}.ssh]\n" + "".join(
                f"{k} = {v!r}\n".replace("'", '"') for k, v in extra.items()))
    path = base / f"{name}.toml"
    path.write_text("\n".join(lines))
    return str(path)
