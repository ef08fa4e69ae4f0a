"""Issue 22 item 6: --help shows no value type after flags that take no value (``--resume <bool>``)."""

import typer
from typer.testing import CliRunner

from simclr_cli.cli import app


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_shows_types_only_for_options_that_take_a_value():
    commands = list(_commands(typer.main.get_command(app)))
    assert ("pretrain",) in commands and ("data", "pack") in commands
    runner = CliRunner()
    typed = 0
    for words in commands:
        r = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
        assert r.exit_code == 0, (words, r.output)
        assert "<bool>" not in r.output, (words, r.output)
        typed += "<path>" in r.output or "<int>" in r.output or "<float>" in r.output
    assert typed  # value-taking options still show their type
