"""The stage registry (``layout.STAGES``) is the one list of stages: each entry has its command with the
registry's help, ``simclr launch`` accepts and lists exactly the launchable ones, and each stage folder is the
stage module's ``STAGE``."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import typer
from typer.testing import CliRunner

from simclr_cli import layout
from simclr_cli.cli import app
from simclr_cli.errors import UsageError
from simclr_cli.launch import LaunchOptions, build_plan

ENV = {"COLUMNS": "200", "TERM": "dumb"}


def test_every_stage_is_a_command_with_the_registry_help():
    commands = typer.main.get_command(app).commands
    for stage in layout.STAGES:
        assert stage.name in commands, stage
        assert commands[stage.name].help == stage.help
    listed = CliRunner().invoke(app, ["--help"], env=ENV).output
    first_lines = [s.help.splitlines()[0] for s in layout.STAGES]
    assert all(line in listed for line in first_lines)
    # the stages with a folder come in the registry's order in the Stages panel
    stage_panel = listed[listed.index("Stages"):]
    positions = [stage_panel.index(f" {s.name} ") for s in layout.STAGES if s.folder is not None]
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", layout.LAUNCHABLE)
def test_launch_accepts_each_launchable_stage(name):
    plan = build_plan(LaunchOptions(processes=1), [name], {"HF_HOME": "/nonexistent"}, cuda_count=lambda: 0)
    assert plan.argv[-3:] == ["-m", "simclr_cli", name]


def test_launch_refuses_other_commands_and_lists_the_launchable_ones():
    with pytest.raises(UsageError) as e:
        build_plan(LaunchOptions(processes=1), ["info"], {"HF_HOME": "/nonexistent"}, cuda_count=lambda: 0)
    assert str(e.value).endswith("one of: " + ", ".join(layout.LAUNCHABLE))
    shown = " ".join(CliRunner().invoke(app, ["launch", "--help"], env=ENV).output.split())
    assert re.search(", ".join(layout.LAUNCHABLE[:-1]) + r" or " + layout.LAUNCHABLE[-1], shown)


def test_stage_folders_are_the_stage_modules():
    assert layout.STAGE_FOLDERS == tuple(s.folder for s in layout.STAGES if s.folder)
    for folder in layout.STAGE_FOLDERS:
        assert importlib.import_module(f"simclr_cli.stages.{folder}").STAGE == folder


def test_runs_shows_each_stage_by_its_registry_metric(tmp_path):
    from simclr_cli.inspect_runs import list_runs

    judged = [s for s in layout.STAGES if s.metric]
    assert judged
    for i, s in enumerate(judged):
        (tmp_path / "run" / s.folder).mkdir(parents=True)
        (tmp_path / "run" / s.folder / "summary.json").write_text(json.dumps({s.metric: 10.0 + i, "other": -1.0}))
    [entry] = list_runs(tmp_path)
    assert entry["metrics"] == {s.folder: 10.0 + i for i, s in enumerate(judged)}
