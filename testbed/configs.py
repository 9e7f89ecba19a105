"""Text of every file a testbed writes: sshd and ssh configs, known_hosts, /etc/hosts, testbed.toml."""

from __future__ import annotations

import os
import pwd
import shlex
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from .plan import HostPlan, TestbedPlan

__all__ = ["Layout", "sshd_config", "ssh_config", "known_hosts", "etc_hosts",
           "testbed_toml", "holder_script", "generate_ed25519", "mpi_recipe", "PRTE_IF",
           "BASHRC", "login_bashrc"]


@dataclass(frozen=True)
class Layout:
    """Where things live under a testbed's state directory."""

    state: Path

    @property
    def state_file(self) -> Path:
        return self.state / "state.json"

    @property
    def topology_file(self) -> Path:
        return self.state / "testbed.toml"

    @property
    def ssh_dir(self) -> Path:
        return self.state / "ssh"

    @property
    def identity(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "ssh_config"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    @property
    def etc_hosts(self) -> Path:
        return self.state / "etc" / "hosts"

    @property
    def bashrc(self) -> Path:
        return self.state / "etc" / "bashrc"

    def host_dir(self, host: str) -> Path:
        return self.state / "hosts" / host

    def host_key(self, host: str) -> Path:
        return self.host_dir(host) / "ssh_host_ed25519_key"

    def sshd_config(self, host: str) -> Path:
        return self.host_dir(host) / "sshd_config"

    def sshd_pid(self, host: str) -> Path:
        return self.host_dir(host) / "sshd.pid"

    def sshd_log(self, host: str) -> Path:
        return self.host_dir(host) / "sshd.log"

    def holder_log(self, host: str) -> Path:
        return self.host_dir(host) / "holder.log"


def generate_ed25519(comment: str) -> tuple[str, str]:
    """A fresh ed25519 key pair as (OpenSSH private key text, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    return priv, f"{pub} {comment}"


def sshd_config(h: HostPlan, lay: Layout) -> str:
    """The sshd_config of one host: listens only on its testbed address, root by key."""
    return "\n".join([
        f"# testbed sshd for {h.name}",
        f"ListenAddress {h.address}",
        "Port 22",
        f"HostKey {lay.host_key(h.name)}",
        f"PidFile {lay.sshd_pid(h.name)}",
        f"AuthorizedKeysFile {lay.authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # no PAM, DNS or strict modes: none of them exist sensibly inside a namespace
        "UsePAM no",
        "UseDNS no",
        "StrictModes no",
        # mpiexec and fan-outs open many connections at once
        "MaxStartups 1000",
        "MaxSessions 100",
        "Subsystem sftp internal-sftp",
        "AcceptEnv CHIBA_*",
        "PermitUserEnvironment no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "LogLevel ERROR",
        "",
    ])


def ssh_config(plan: TestbedPlan, lay: Layout) -> str:
    """An ssh_config so `ssh -F FILE ccn01` works by name (PRRTE passes names)."""
    out = [f"# testbed {plan.id}: use with ssh -F {lay.ssh_config}"]
    for h in plan.hosts:
        out += [f"Host {h.name}", f"    HostName {h.address}", ""]
    out += ["Host *",
            "    User root",
            f"    IdentityFile {lay.identity}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {lay.known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
            "    ConnectTimeout 10",
            # OpenSSH 9's default sntrup761 key exchange costs 0.09 s of CPU a connection
            # (measured), the price of 9 mpiexec daemons on 2 cores; paramiko uses
            # curve25519 too, so OpenSSH and paramiko tools pay the same here
            "    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
            "    LogLevel ERROR",
            "    SendEnv CHIBA_*",
            ""]
    return "\n".join(out)


def known_hosts(plan: TestbedPlan, host_pubkeys: dict[str, str]) -> str:
    """known_hosts lines naming each host by name and by address."""
    lines = []
    for h in plan.hosts:
        keytype, b64 = host_pubkeys[h.name].split()[:2]
        lines.append(f"{h.name},{h.address} {keytype} {b64}")
    return "\n".join(lines) + "\n"


def etc_hosts(plan: TestbedPlan) -> str:
    """The /etc/hosts every testbed host sees: every host's name at its testbed address."""
    lines = ["127.0.0.1\tlocalhost", f"# testbed {plan.id} ({plan.subnet})"]
    for h in plan.hosts:
        lines.append(f"{h.address}\t{h.name}")
        for nic in h.nics[1:]:
            lines.append(f"{nic.address}\t{h.name}-{nic.network}")
    return "\n".join(lines) + "\n"


def holder_script(h: HostPlan, lay: Layout) -> str:
    """Shell run in a fresh UTS+mount namespace: hostname, private mounts, then sleep.

    The sleeping process anchors the host's namespaces, so sshd can be killed and
    restarted (fault injection) without losing the host's mounts.
    """
    q = shlex.quote
    cmds = ["set -e", f"hostname {q(h.name)}"]
    for target, src in h.mounts:
        cmds.append(f"mount --bind {q(src)} {q(target)}")
    cmds.append(f"mount --bind {q(str(lay.etc_hosts))} /etc/hosts")
    # sshd's bash sources the login user's ~/.bashrc even for `ssh host cmd`; this
    # machine's (shared by every emulated host) may run costly set-up (pyenv init
    # forked 90 processes, 0.25 s a session): hosts get a node's plain one instead
    rc = login_bashrc()
    if rc is not None:
        cmds.append(f"mount --bind {q(str(lay.bashrc))} {q(rc)}")
    cmds.append("echo ready $$")
    cmds.append("exec sleep infinity </dev/null >/dev/null 2>&1")
    return "\n".join(cmds)


BASHRC = "# testbed host: a compute node's plain shell start-up\n"


def login_bashrc() -> str | None:
    """The ~/.bashrc of the user sshd logs in (this user), if there is one."""
    rc = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".bashrc")
    return rc if os.path.isfile(rc) else None


PRTE_IF = "eth0"


def mpi_recipe(plan: TestbedPlan, lay: Layout) -> dict:
    """The [mpi] table: Open MPI restricted to the testbed subnet, ssh through our config."""
    return {
        "btl_tcp_if_include": plan.subnet,
        # PRRTE's daemons crash now and then (prted segfault in libprrte) on a host with
        # two NICs inside the include range, i.e. on a mayor; every testbed host's
        # primary NIC is eth0, so naming it keeps out-of-band traffic in the testbed too
        "prte_if_include": PRTE_IF,
        "plm_ssh_args": f"-F {lay.ssh_config}",
        # no testbed host has a UCX device (veth only: pml ob1 over TCP), and UCX's memory
        # hooks, loaded with libmpi, cost every rank 20 ms of CPU at start (docs/design.md)
        "env": {"UCX_MEM_EVENTS": "no"},
    }


def _fold(names: list[str]) -> str:
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(names))


def _town_table(plan: TestbedPlan, topo, town: str, hosts: dict) -> dict:
    """A town's table. The loader pairs the i-th name of ``nodes`` with the i-th of
    ``addresses``, both in nodeset order, which is not the topology's order for every name
    (``ccn03.lab`` folds after ``ccn04``): when the two folded lists do not pair up, each
    node's address goes into its ``[hosts.NAME]`` table instead."""
    from ClusterShell.NodeSet import NodeSet

    nodes = _fold(topo.town_nodes(town))
    addrs = [plan.host(n).address for n in NodeSet(nodes)]
    table = {"mayor": topo.towns[town], "nodes": nodes}
    folded = _fold(addrs)
    if list(NodeSet(folded)) == addrs:
        table["addresses"] = folded
    else:
        for n, a in zip(NodeSet(nodes), addrs):
            hosts.setdefault(n, {})["address"] = a
    table["bandwidth"] = plan.town_bps[town]
    table["uplink"] = plan.uplink_bps.get(town, plan.town_bps[town])
    return table


def testbed_toml(plan: TestbedPlan, topo, lay: Layout) -> str:
    """A kind = "ssh" topology file (TOML text) with the testbed's real addresses and SSH
    settings; rates in bits/s as the plan shaped them."""
    pres = topo.president
    paths = pres.paths
    cluster = {"name": topo.name, "kind": "ssh",
               "description": f"namespace testbed {plan.id} on {plan.subnet}"}
    if topo.home:
        cluster["home"] = topo.home
    towns = topo.town_names()
    doc = {
        "cluster": cluster,
        "defaults": {"scratch": paths.scratch, "spool": paths.spool,
                     "repository": paths.repository,
                     "ssh": {"user": "root", "identity_file": str(lay.identity),
                             "known_hosts": str(lay.known_hosts),
                             "config_file": str(lay.ssh_config),
                             "host_key_policy": "strict"}},
        "links": {"core": {"bandwidth": plan.core_bps},
                  "town": {"bandwidth": plan.town_bps[towns[0]]}},
        "president": {"name": pres.name, "address": plan.host(pres.name).address},
        "mayors": {m.name: {"address": plan.host(m.name).address} for m in topo.mayors},
    }
    # per-host path overrides survive; the testbed binds exactly these paths
    hosts: dict[str, dict] = {}
    for h in topo.hosts():
        diff = {k: h.paths.get(k) for k in ("scratch", "spool", "repository")
                if h.paths.get(k) != paths.get(k)}
        if diff:
            hosts[h.name] = diff
    doc["towns"] = {t: _town_table(plan, topo, t, hosts) for t in towns}
    if hosts:
        doc["hosts"] = hosts
    doc["mpi"] = mpi_recipe(plan, lay)
    return "# Generated by `chiba-admin testbed up`; use with --cluster.\n" + tomli_w.dumps(doc)
