"""Every typed option of every command: a bad value gets one line, exit 2, nothing touched.

Table-driven from click's own command tree, so a new option is covered the day it lands.
"""

from __future__ import annotations

import os

import click
import pytest

from chiba_admin.cli import cli as root


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def _bad_value(opt: click.Option) -> str | None:
    t = opt.type
    if isinstance(t, click.IntRange):
        return str((t.min - 1) if t.min is not None else (t.max + 1))
    if isinstance(t, click.FloatRange):
        return str((t.min - 1) if t.min is not None else (t.max + 1))
    if isinstance(t, click.Choice):
        return "no-such-choice"
    if t in (click.INT, click.FLOAT) or isinstance(t, (click.types.IntParamType,
                                                        click.types.FloatParamType)):
        return "not-a-number"
    return None


def _cases():
    for path, cmd in _commands(root):
        args = [p for p in cmd.params if isinstance(p, click.Argument) and p.required]
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag or p.count:
                continue
            bad = _bad_value(p)
            if bad is None:
                continue
            positional = ["x"] * sum(max(a.nargs, 1) for a in args)
            yield pytest.param(list(path), p.opts[0], bad, positional,
                               id=f"{' '.join(path)} {p.opts[0]}")


CASES = list(_cases())


def test_the_table_is_not_empty():
    assert len(CASES) >= 10  # every command has typed options; a broken walk finds none


@pytest.mark.parametrize("path,option,bad,positional", CASES)
def test_bad_option_value_one_line_exit_2(cli, tmp_path, path, option, bad, positional):
    state = tmp_path / "state"
    r = cli("--state", state, *path, option, bad, *positional)
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("chiba-admin: error: ") and option in lines[0], lines[0]
    assert bad in lines[0] or "not-a-number" not in bad, lines[0]
    assert not state.exists() or not any(os.scandir(state))  # nothing created


# options whose values the commands parse themselves (sizes, durations, names)
PARSED = [
    (["stage", "x", "--nodes", "@nodes", "--chunk", "abc"], "--chunk"),
    (["collect", "x", "--nodes", "@nodes", "--dest", "d", "--chunk", "12"], "--chunk"),
    (["sync-mayors", "x", "--chunk", "lots"], "--chunk"),
    (["shell", "--nodes", "ccn01", "--walltime", "soon", "x"], "--walltime"),
    (["bench", "stage", "--where", "embedded", "--sizes", "big"], "--sizes"),
    (["bench", "sync", "--where", "embedded", "--targets", "many"], "--targets"),
    (["bench", "stage", "--where", "embedded", "--shape", "2by4"], "--shape"),
    (["predict", "stage", "--sizes", "huge"], "--sizes"),
]


@pytest.mark.parametrize("args,option", PARSED, ids=[" ".join(a[:1] + [o]) for a, o in PARSED])
def test_parsed_option_value_one_line_exit_2(cli, tmp_path, embedded, args, option):
    src = tmp_path / "x"
    src.mkdir()
    (src / "f").write_text("f")
    args = [str(src) if a == "x" else a for a in args]
    before = sorted(p for p in os.listdir(tmp_path))
    r = cli(*args)
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chiba-admin: error: "), r.err
    assert option in lines[0] or option.lstrip("-") in lines[0], lines[0]
    assert sorted(p for p in os.listdir(tmp_path)) == before  # nothing created
