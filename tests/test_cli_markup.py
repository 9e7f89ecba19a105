"""Paths, --dest values, host names and hosts' error lines print as typed: the consoles read
no rich markup (nor emoji codes) in them (chiba_admin/console.py). Through the real CLI on
the embedded cluster, one case per command family: stage (both methods, dry run and real
run), collect and sync-mayors. Before, ``[dim]`` vanished from a title, ``[red]x[/red]``
showed as ``x``, and ``[/x]`` raised MarkupError (exit 1, "internal error") after the
stage had committed its tree on every node.
"""

from __future__ import annotations

import os

import pytest

from support.cluster import host_path, new_cluster, run_cli

pytestmark = pytest.mark.mpi


@pytest.fixture
def topo(tmp_path):
    return new_cluster(tmp_path / "state")


def _tree(root) -> str:
    os.makedirs(root)
    with open(os.path.join(root, "f"), "w") as f:
        f.write("data\n")
    return str(root)


def _no_crash(r) -> None:
    assert "internal error" not in r.err and "MarkupError" not in r.err, r


@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_stage_prints_markup_looking_source_and_dest_as_typed(topo, tmp_path, method):
    src = _tree(tmp_path / "[dim]odd :smile:")
    for dest in ("[/x]", "[red]x[/red]"):
        dry = run_cli(topo, "stage", src, "--nodes", "ccn01", "--method", method,
                      "--dest", dest, "--dry-run")
        _no_crash(dry)
        assert dry.code == 0, dry
        assert f"{src} -> /scratch/{dest}" in dry.out, dry
        real = run_cli(topo, "stage", src, "--nodes", "ccn01", "--method", method,
                       "--dest", dest)
        _no_crash(real)
        assert real.code == 0, real  # the tree is in place: the command says so
        assert f"{src} -> /scratch/{dest}" in real.out, real
        assert os.path.isfile(host_path(topo, "ccn01", "scratch", f"{dest}/f"))


def test_stage_failure_lines_from_the_nodes_print_as_typed(topo, tmp_path):
    """A node's refusal names the destination; in the table and on stderr it stays whole."""
    src = _tree(tmp_path / "src")
    dest = "[bold]taken[/bold]"
    os.makedirs(host_path(topo, "ccn01", "scratch", dest))
    r = run_cli(topo, "stage", src, "--nodes", "ccn01", "--dest", dest)
    _no_crash(r)
    assert r.code == 2, r
    assert f"chiba-admin stage: ccn01: /scratch/{dest} exists" in r.err, r
    assert f"{src} -> /scratch/{dest}" in r.out, r  # the title


@pytest.mark.parametrize("method", ["mpi", "transit"])
def test_collect_prints_markup_looking_path_and_dir_as_typed(topo, tmp_path, method):
    path = "[/x]"  # a directory "[" holding "x]"
    os.makedirs(host_path(topo, "ccn01", "scratch", path))
    with open(host_path(topo, "ccn01", "scratch", f"{path}/f"), "w") as f:
        f.write("out\n")
    out = tmp_path / "[red]back" / method
    r = run_cli(topo, "collect", path, "--nodes", "ccn01", "--method", method,
                "--dest", str(out))
    _no_crash(r)
    assert r.code == 0, r
    assert f"{path} -> {out}" in r.out, r
    assert (out / "ccn01" / "x]" / "f").read_text() == "out\n"


@pytest.mark.parametrize("method", ["mpi", "rsync"])
def test_sync_mayors_prints_markup_looking_source_and_dest_as_typed(topo, tmp_path, method):
    src = _tree(tmp_path / "[dim]repo")
    dest = "[/x]"
    r = run_cli(topo, "sync-mayors", src, "--method", method, "--dest", dest, "--dry-run")
    _no_crash(r)
    assert r.code == 0, r
    assert f"{src} -> /opt/chiba/repo/{dest} (dry run)" in r.out, r
    for mayor in ("mayor1", "mayor2"):  # each target's heading names its destination
        assert any(ln.startswith(f"{mayor} ") and f"repo/{dest}:" in ln
                   for ln in r.out.splitlines()), r


def test_consoles_read_no_markup_or_emoji(capsys):
    """Every command prints through these two consoles: a string is text, always."""
    from rich.table import Table

    from chiba_admin import console

    console.configure()
    t = Table(title="[/t] :smile:")
    t.add_column("[dim]c")
    t.add_row("[/cell]")
    console.get_console().print(t)
    console.get_console().print("[red]out[/red]")
    console.get_err_console().print("[/err] :smile:")
    cap = capsys.readouterr()
    for text in ("[/t] :smile:", "[dim]c", "[/cell]", "[red]out[/red]"):
        assert text in cap.out
    assert "[/err] :smile:" in cap.err
