"""Load and validate a topology TOML file into a Topology; errors name file:line and the fix."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ClusterShell.NodeSet import NodeSet, NodeSetException

from chiba_admin.errors import TopologyError

from .confine import host_path_ok
from .model import MAYOR, NODE, PRESIDENT, Host, HostPaths, Link, SSHSettings, Topology
from .units import parse_bandwidth, parse_latency

__all__ = ["load_topology", "loads_topology", "KNOWN_KEYS"]

_PATH_KEYS = {"scratch", "spool", "repository"}
_SSH_KEYS = {"user", "port", "identity_file", "known_hosts", "host_key_policy",
             "connect_timeout", "config_file"}
_HOST_KEYS = {"address", "ssh", "town", "dest_roots"} | _PATH_KEYS
KNOWN_KEYS: dict[str, set[str]] = {
    "": {"cluster", "defaults", "links", "president", "mayors", "towns", "hosts", "mpi"},
    "cluster": {"name", "kind", "description", "home"},
    "defaults": _PATH_KEYS | {"ssh", "dest_roots"},
    "ssh": _SSH_KEYS,
    "links": {"core", "town"},
    "link": {"bandwidth", "latency", "uplink"},
    "president": {"name", "address", "ssh", "dest_roots"} | _PATH_KEYS,
    "mayor": {"address", "ssh", "dest_roots"} | _PATH_KEYS,
    "town": {"mayor", "nodes", "addresses", "bandwidth", "latency", "uplink"},
    "host": _HOST_KEYS,
    "mpi": {"mpiexec", "args", "env", "btl_tcp_if_include", "prte_if_include", "fault_tolerance",
            "plm_ssh_args", "python", "service_dir"},
}
_KINDS = ("embedded", "ssh")
# RFC 1123 labels plus '_' (seen in cluster names); no ',', '[', '@', ';', '/', spaces:
# those are nodeset syntax or shell/path metacharacters.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def load_topology(path: str | Path) -> Topology:
    """Read ``path`` and return its validated Topology."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError("topology file not found", where=str(p),
                            hint="pass --cluster FILE or see clusters/ for examples") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(f"cannot read topology file: {e}", where=str(p)) from None
    return loads_topology(text, source=str(p))


def loads_topology(text: str, source: str = "<topology>") -> Topology:
    """Parse TOML ``text``; ``source`` names the file in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        where = f"{source}:{m.group(1)}" if m else source
        raise TopologyError(f"TOML syntax error: {e}", where=where,
                            hint="fix the syntax at that line") from None
    return _Builder(doc, text, source).build()


class _Builder:
    def __init__(self, doc: dict, text: str, source: str):
        self.doc, self.text, self.source = doc, text, source
        self.lines = text.splitlines()

    # error helpers ------------------------------------------------------------
    def _where(self, table: str, key: str | None = None) -> str:
        line = _line_of(self.lines, table, key)
        return f"{self.source}:{line}" if line else self.source

    def fail(self, what: str, table: str, key: str | None = None, hint: str | None = None):
        raise TopologyError(what, where=self._where(table, key), hint=hint)

    def _check_keys(self, d, kind: str, table: str) -> dict:
        if not isinstance(d, dict):
            self.fail(f"[{table}] must be a table", table)
        unknown = sorted(set(d) - KNOWN_KEYS[kind])
        if unknown:
            allowed = ", ".join(sorted(KNOWN_KEYS[kind]))
            self.fail(f"unknown key {unknown[0]!r} in [{table}]" if table
                      else f"unknown top-level key {unknown[0]!r}",
                      table, unknown[0], hint=f"allowed: {allowed}")
        return d

    def _str(self, d: dict, key: str, table: str, required: bool = False) -> str | None:
        v = d.get(key)
        if v is None:
            if required:
                self.fail(f"missing {key!r} in [{table}]", table,
                          hint=f"add {key} = \"...\"")
            return None
        if not isinstance(v, str) or not v:
            self.fail(f"{key!r} in [{table}] must be a non-empty string", table, key)
        return v

    def _bandwidth(self, d: dict, table: str, default: float | None = None, *,
                   key: str = "bandwidth") -> float:
        if key not in d:
            if default is not None:
                return default
            self.fail(f"missing {key} in [{table}]", table,
                      hint=f'add {key} = "1Gbit" (bits per second)')
        try:
            return parse_bandwidth(d[key])
        except ValueError as e:
            self.fail(f"bad {key} in [{table}]: {e}", table, key,
                      hint='use a positive rate such as "100Mbit" or 1e8')

    def _latency(self, d: dict, table: str, default: float = 0.0) -> float:
        if "latency" not in d:
            return default
        try:
            return parse_latency(d["latency"])
        except ValueError as e:
            self.fail(f"bad latency in [{table}]: {e}", table, "latency",
                      hint='use a duration such as "0.1ms" or "50us"')

    def _ssh(self, d: dict | None, table: str, base: SSHSettings) -> SSHSettings:
        if d is None:
            return base
        self._check_keys(d, "ssh", table)
        kw = {k: getattr(base, k) for k in _SSH_KEYS}
        for k, v in d.items():
            if k in ("port",) and (not isinstance(v, int) or not 0 < v < 65536):
                self.fail(f"ssh port in [{table}] must be 1-65535", table, k)
            if k == "connect_timeout" and (not isinstance(v, (int, float)) or v <= 0):
                self.fail(f"connect_timeout in [{table}] must be positive", table, k)
            if k == "host_key_policy" and v not in ("strict", "accept-new"):
                self.fail(f"host_key_policy in [{table}] must be strict or accept-new",
                          table, k)
            kw[k] = v
        return SSHSettings(**kw)

    def _paths(self, d: dict, table: str, base: HostPaths) -> HostPaths:
        kw = {k: getattr(base, k) for k in _PATH_KEYS | {"dest_roots"}}
        for k in _PATH_KEYS & set(d):
            kw[k] = self._host_path(d[k], table, k)
        if "dest_roots" in d:
            v = d["dest_roots"]
            if not isinstance(v, list):
                self.fail(f"dest_roots in [{table}] must be a list of absolute paths", table,
                          "dest_roots", hint='write dest_roots = ["/data"]')
            kw["dest_roots"] = tuple(self._host_path(x, table, "dest_roots") for x in v)
        same = [k for k in sorted(_PATH_KEYS) for j in sorted(_PATH_KEYS)
                if k < j and kw[k] == kw[j]]
        if same:
            k = same[0]
            other = next(j for j in sorted(_PATH_KEYS) if j > k and kw[j] == kw[k])
            self.fail(f"{k} and {other} in [{table}] are the same directory {kw[k]!r}",
                      table, k, hint="give each its own directory: the spool is served "
                                     "over HTTP, scratch is every user's")
        return HostPaths(**kw)

    def _host_path(self, v, table: str, key: str) -> str:
        """A host directory: absolute, normalised, not ``/`` (else one line, exit 2)."""
        if not isinstance(v, str) or not host_path_ok(v):
            self.fail(f"{key} in [{table}] must be an absolute path, normalised and not /"
                      f" (got {v!r})", table, key,
                      hint="write it like /scratch, without .., // or a trailing /")
        return v

    # build ----------------------------------------------------------------------
    def build(self) -> Topology:
        doc = self._check_keys(self.doc, "", "")
        cluster = self._check_keys(doc.get("cluster", {}), "cluster", "cluster")
        kind = cluster.get("kind", "embedded")
        if kind not in _KINDS:
            self.fail(f"unknown cluster kind {kind!r}", "cluster", "kind",
                      hint="use embedded or ssh")
        name = cluster.get("name") or Path(self.source).stem
        mpi = self._check_keys(doc.get("mpi", {}), "mpi", "mpi")
        topo = Topology(name, kind, self.source, cluster.get("description", ""), mpi)

        defaults = self._check_keys(doc.get("defaults", {}), "defaults", "defaults")
        base_ssh = self._ssh(defaults.get("ssh"), "defaults.ssh", SSHSettings())
        base_paths = self._paths(defaults, "defaults", HostPaths())

        links = self._check_keys(doc.get("links", {}), "links", "links")
        for lk in ("core", "town"):
            if lk not in links:
                self.fail(f"missing [links.{lk}]", "links",
                          hint=f'add [links.{lk}] with bandwidth = "..."')
            self._check_keys(links[lk], "link", f"links.{lk}")
        core = Link(self._bandwidth(links["core"], "links.core"),
                    self._latency(links["core"], "links.core"), "core")
        town_default = Link(self._bandwidth(links["town"], "links.town"),
                            self._latency(links["town"], "links.town"), "town")

        overrides = self._check_keys_map(doc.get("hosts", {}), "host", "hosts")

        def host(name, role, table, d, town=None, address=None):
            self._name(name, "host", table)
            o = overrides.get(name, {})
            merged = {**d, **{k: v for k, v in o.items() if k != "ssh"}}
            ssh = self._ssh(d.get("ssh"), f"{table}.ssh", base_ssh)
            ssh = self._ssh(o.get("ssh"), f"hosts.{name}.ssh", ssh)
            return Host(
                name=name, role=role, town=town,
                address=merged.get("address", address),
                ssh=ssh, paths=self._paths(merged, table, base_paths),
            )

        if "president" not in doc:
            self.fail("no [president] table", "", hint='add [president] with name = "..."')
        pres = self._check_keys(doc["president"], "president", "president")
        pname = self._str(pres, "name", "president", required=True)
        topo.add_host(host(pname, PRESIDENT, "president", pres))

        mayors = self._check_keys_map(doc.get("mayors", {}), "mayor", "mayors")
        if not mayors:
            self.fail("no mayors defined", "", hint="add [mayors.NAME] tables")
        for mname, md in mayors.items():
            self._dup(topo, mname, f"mayors.{mname}")
            topo.add_host(host(mname, MAYOR, f"mayors.{mname}", md))
            topo.connect(pname, mname, core)

        towns = self._check_keys_map(doc.get("towns", {}), "town", "towns")
        if not towns:
            self.fail("no towns defined", "", hint="add [towns.NAME] with mayor and nodes")
        served = set()
        for tname, td in towns.items():
            table = f"towns.{tname}"
            self._name(tname, "town", table)
            mname = self._str(td, "mayor", table, required=True)
            if mname not in mayors:
                self.fail(f"town {tname} names unknown mayor {mname!r}", table, "mayor",
                          hint=f"define [mayors.{mname}] or fix the name")
            served.add(mname)
            link = Link(self._bandwidth(td, table, town_default.bandwidth),
                        self._latency(td, table, town_default.latency), "town")
            # The mayor's town-side NIC: its own rate, by default the town's node rate
            # (Chiba City: Fast Ethernet on both sides of the town switch).
            up = self._bandwidth(td, table, self._bandwidth(links["town"], "links.town",
                                                            link.bandwidth, key="uplink"),
                                 key="uplink")
            topo.add_town(tname, mname, Link(up, link.latency, "uplink"))
            names = self._nodeset(td.get("nodes", ""), table, "nodes")
            addrs = self._nodeset(td.get("addresses", ""), table, "addresses")
            if addrs and len(addrs) != len(names):
                self.fail(f"{len(addrs)} addresses for {len(names)} nodes in [{table}]",
                          table, "addresses", hint="give one address per node")
            for i, n in enumerate(names):
                self._dup(topo, n, table)
                topo.add_host(host(n, NODE, table, {}, town=tname,
                                   address=addrs[i] if addrs else None))
                topo.connect(mname, n, link)
        for mname in mayors:
            if mname not in served:
                self.fail(f"mayor {mname} serves no town", f"mayors.{mname}",
                          hint=f'add a [towns.NAME] table with mayor = "{mname}"')

        for hname, hd in overrides.items():
            if hname in topo:
                continue
            tname = hd.get("town")
            if not tname:
                self.fail(f"node {hname} has no town", f"hosts.{hname}",
                          hint='add town = "..." or list it in a town\'s nodes')
            if tname not in towns:
                self.fail(f"node {hname} names unknown town {tname!r}", f"hosts.{hname}",
                          "town")
            topo.add_host(host(hname, NODE, f"hosts.{hname}", {}, town=tname))
            td = towns[tname]
            topo.connect(topo.towns[tname], hname,
                         Link(self._bandwidth(td, f"towns.{tname}", town_default.bandwidth),
                              self._latency(td, f"towns.{tname}", town_default.latency),
                              "town"))
        for tname in towns:
            if not topo.town_nodes(tname):
                self.fail(f"town {tname} has no nodes", f"towns.{tname}",
                          hint='add nodes = "name[01-08]"')
        home = cluster.get("home")
        if home is not None and home not in topo:
            self.fail(f"home server {home!r} is not a host of this topology", "cluster",
                      "home")
        topo.home = home or pname
        return topo

    def _check_keys_map(self, d, kind: str, table: str) -> dict:
        if not isinstance(d, dict):
            self.fail(f"[{table}] must be a table of tables", table)
        for k, v in d.items():
            self._check_keys(v, kind, f"{table}.{k}")
        return d

    def _name(self, name, what: str, table: str) -> None:
        """Host and town names: what a hostname and a nodeset allow (else exit 2)."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            self.fail(f"bad {what} name {name!r} in [{table}]", table,
                      hint="use letters, digits, '-', '_' and '.', starting with a letter or"
                           " digit (it must be selectable in a nodeset)")

    def _dup(self, topo: Topology, name: str, table: str) -> None:
        if name in topo:
            self.fail(f"duplicate host {name!r}", table,
                      hint="each host name may appear once in the topology")

    def _nodeset(self, spec, table: str, key: str) -> list[str]:
        if spec == "":
            return []
        if not isinstance(spec, str):
            self.fail(f"{key} in [{table}] must be a nodeset string", table, key)
        try:
            return list(NodeSet(spec))
        except NodeSetException as e:
            self.fail(f"bad nodeset {spec!r} in [{table}]: {e}", table, key,
                      hint='write ranges like "ccn[001-032]"')


def _line_of(lines: list[str], table: str, key: str | None) -> int | None:
    """Best-effort 1-based line of ``key`` in ``[table]`` (or of the table header)."""
    start = 0
    if table:
        parts = table.split(".")
        pat = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(
            r'(?:"%s"|%s)' % (re.escape(p), re.escape(p)) for p in parts) + r"\s*\]")
        start = None
        for i, ln in enumerate(lines):
            if pat.match(ln):
                start = i
                break
        if start is None:
            # a table written inline (e.g. ssh = {...}) or a dotted key: find its last part
            for i, ln in enumerate(lines):
                if re.match(r"^\s*" + re.escape(parts[-1]) + r"\s*=", ln):
                    return i + 1
            return None
        if key is None:
            return start + 1
        start += 1
    if key is None:
        return None
    kpat = re.compile(r"^\s*\"?" + re.escape(key) + r"\"?\s*[=.]")
    for i in range(start, len(lines)):
        if i > start and lines[i].lstrip().startswith("[") and table:
            break
        if kpat.match(lines[i]) or re.search(r"[{,]\s*" + re.escape(key) + r"\s*=", lines[i]):
            return i + 1
    return start if table else None
