"""`chiba-admin testbed up|down|status|exec|counters|fault|heal`: the namespace testbed."""

from __future__ import annotations

import subprocess

import click

from ..cli import pass_ctx
from ..console import get_console, get_err_console, print_json, verbosity
from ..errors import UsageError

__all__ = ["register", "testbed_group", "usage_text"]

_state_opt = click.option("--state", "state_dir", metavar="DIR", envvar="CHIBA_TESTBED_STATE",
                          default=None,
                          help="Testbed state directory (default: $CHIBA_TESTBED_STATE or "
                               "~/.local/state/chiba-admin/testbed).")


def _mbit(v: float | None) -> float | None:
    return None if v is None else float(v) * 1e6


def usage_text(tb) -> str:
    """How to use a testbed that is up (printed by `up`)."""
    pres = tb.president
    node = tb.hosts_by_role("node")[0]
    st = f" --state {tb.state}"
    lines = [
        f"testbed {tb.id} is up: {len(tb.hosts)} hosts on {tb.subnet}, state in {tb.state}",
        f"  topology:   chiba-admin --cluster {tb.topology_file} topology show",
        f"  a shell:    chiba-admin testbed exec{st} {pres} -- bash",
        f"  ssh:        chiba-admin testbed exec{st} {pres} -- ssh -F {tb.ssh_config} {node} "
        "hostname",
        f"  commands:   chiba-admin testbed exec{st} {pres} -- chiba-admin --cluster "
        f"{tb.topology_file} ...   (run them on the president)",
        f"  counters:   chiba-admin testbed counters{st}",
    ]
    if tb.slurm_up():
        lines.append(f"  Slurm:      chiba-admin testbed exec{st} {pres} -- env SLURM_CONF="
                     f"{tb.slurm_conf} sinfo")
    lines += [
        f"  take down:  chiba-admin testbed down{st}",
    ]
    return "\n".join(lines)


@click.group("testbed")
def testbed_group():
    """An emulated cluster on network namespaces: real sshd, private disks, shaped links."""


@testbed_group.command("up")
@click.option("--towns", type=click.IntRange(1, 250), default=None,
              help="Generate a cluster of this many towns (default 2; ignores --cluster).")
@click.option("--nodes-per-town", type=click.IntRange(1, 253), default=None,
              help="Nodes in each generated town (default 4).")
@click.option("--node-mbit", type=click.FloatRange(min=0.1), default=None,
              help="Node link rate in Mbit/s (default 20, or the topology's town links "
                   "with --cluster).")
@click.option("--mayor-mbit", type=click.FloatRange(min=0.1), default=None,
              help="President and mayor link rate in Mbit/s (default 200, or the "
                   "topology's core links with --cluster).")
@click.option("--uplink-mbit", type=click.FloatRange(min=0.1), default=None,
              help="Each mayor's town-side link in Mbit/s, shared by its town's nodes "
                   "(default: the node rate, as on Chiba City; the --mayor-mbit value gives"
                   " the 'fat mayors' shape).")
@click.option("--disk", type=click.Choice(["tmpfs", "dir"]), default="tmpfs",
              show_default=True,
              help="Where each host's scratch, spool and repository live: its own tmpfs "
                   "(like a host's own disk), or directories on the state dir's "
                   "filesystem.")
@click.option("--disk-size", default="2G", show_default=True, metavar="SIZE",
              help="Capacity of each host's tmpfs (e.g. 512M, 4G, 10%).")
@click.option("--slurm", is_flag=True,
              help="Also start Slurm (Debian slurm-wlm): munged on every host, slurmctld "
                   "on the president, a slurmd per node; `down` removes it.")
@_state_opt
@click.pass_context
def up_cmd(click_ctx, towns, nodes_per_town, node_mbit, mayor_mbit, uplink_mbit, disk,
           disk_size, slurm, state_dir):
    """Bring a testbed up (the --cluster topology, or a generated one with --towns)."""
    import testbed
    from topology import load_topology

    ctx = click_ctx.obj
    # a cluster file given explicitly is used; otherwise a generated 2 x 4 Chiba City
    explicit = click_ctx.find_root().params.get("cluster_file")
    if explicit and towns is None and nodes_per_town is None:
        topo = load_topology(explicit)
        node_bps, mayor_bps = _mbit(node_mbit), _mbit(mayor_mbit)
    else:
        node_bps, mayor_bps = _mbit(node_mbit or 20), _mbit(mayor_mbit or 200)
        topo = testbed.generated_topology(towns or 2, nodes_per_town or 4, node_bps, mayor_bps,
                                          _mbit(uplink_mbit))
    err = get_err_console()
    log = (lambda m: err.print(f"testbed: {m}")) if verbosity() > 0 else None
    testbed.up(topo, state_dir, node_bps=node_bps, mayor_bps=mayor_bps,
               uplink_bps=_mbit(uplink_mbit), log=log, disk=disk, disk_size=disk_size,
               slurm=slurm)
    tb = testbed.Testbed(state_dir)
    if ctx.json:
        print_json(testbed.status(tb.state))
    else:
        get_console().print(usage_text(tb))
    return 0


@testbed_group.command("down")
@click.option("--keep-data", is_flag=True,
              help="Keep each host's scratch/spool/repository data under the state dir "
                   "(copied off its tmpfs first).")
@_state_opt
@pass_ctx
def down_cmd(ctx, keep_data, state_dir):
    """Remove everything `up` created (also after a crash or a half-finished up)."""
    import testbed

    res = testbed.down(state_dir, keep_data=keep_data)
    if ctx.json:
        print_json(res)
    else:
        get_console().print(f"testbed {res['id']} down: removed {res['namespaces']} "
                            f"namespaces, ended {res['processes']} processes")
    return 0


@testbed_group.command("status")
@_state_opt
@pass_ctx
def status_cmd(ctx, state_dir):
    """Show each host's namespace, sshd and faults; exit 1 unless all are healthy."""
    import testbed

    st = testbed.status(state_dir)
    if ctx.json:
        print_json(st)
        return 0 if st["healthy"] else 1
    con = get_console()
    con.print(f"testbed {st['id']} ({st['phase']}) on {st['subnet']}, state {st['state']}"
              + (", Slurm up" if st.get("slurm") else ""))
    for h in st["hosts"]:
        ok = h["namespace"] and h["holder"] and h["sshd"]
        flags = ", ".join(h["faults"]) or ("ok" if ok else
                                           "DOWN" if not h["namespace"] else "sshd dead")
        con.print(f"  {h['host']:<10} {h['role']:<9} {h['address']:<15} {flags}")
    return 0 if st["healthy"] else 1


@testbed_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@_state_opt
def exec_cmd(host, cmd, state_dir):
    """Run CMD in HOST's network, mount and UTS namespaces: testbed exec ccn01 -- CMD."""
    import testbed

    tb = testbed.open_testbed(state_dir)
    try:
        return subprocess.run(tb.exec_argv(host, list(cmd))).returncode
    except FileNotFoundError as e:
        raise UsageError(f"cannot run {cmd[0]}: {e}", where=host) from None


@testbed_group.command("counters")
@_state_opt
@pass_ctx
def counters_cmd(ctx, state_dir):
    """Bytes sent and received by every host's NICs (use --json for per-NIC detail)."""
    import testbed
    from topology import format_bytes

    c = testbed.counters(testbed.open_testbed(state_dir))
    if ctx.json:
        print_json(c)
        return 0
    con = get_console()
    con.print(f"{'host':<10} {'role':<9} {'tx':>12} {'rx':>12}")
    for host, v in c.items():
        con.print(f"{host:<10} {v['role']:<9} {format_bytes(v['tx_bytes']):>12} "
                  f"{format_bytes(v['rx_bytes']):>12}")
    return 0


@testbed_group.command("fault")
@click.argument("host")
@click.option("--link-down", "kind", flag_value="link-down", help="Pull the host's cables.")
@click.option("--kill-sshd", "kind", flag_value="kill-sshd", help="Kill the host's sshd.")
@click.option("--fill-disk", "kind", flag_value="fill-disk",
              help="Replace the host's scratch by a full 1 MiB tmpfs.")
@_state_opt
@pass_ctx
def fault_cmd(ctx, host, kind, state_dir):
    """Inject a fault on HOST (undo with `testbed heal HOST`)."""
    import testbed

    if kind is None:
        raise UsageError("say which fault", hint="--link-down, --kill-sshd or --fill-disk")
    msg = testbed.fault(state_dir or testbed.default_state_dir(), host, kind)
    print_json({"host": host, "fault": kind}) if ctx.json else get_console().print(msg)
    return 0


@testbed_group.command("heal")
@click.argument("host")
@_state_opt
@pass_ctx
def heal_cmd(ctx, host, state_dir):
    """Undo HOST's faults and restart its sshd if needed."""
    import testbed

    healed = testbed.heal(state_dir or testbed.default_state_dir(), host)
    if ctx.json:
        print_json({"host": host, "healed": healed})
    else:
        get_console().print(f"{host}: healed {', '.join(healed) or 'nothing (no faults)'}")
    return 0


def register(group: click.Group) -> None:
    group.add_command(testbed_group)
