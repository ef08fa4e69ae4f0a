"""Review of issue 15: a folder where the run lock goes is a usage error (exit 2, one line), and the resume hint of a
stage started by `simclr launch` resumes it under the same launch."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from simclr_cli.checkpoints.lock import RunLock, RunLocked, lock_path
from simclr_cli.cli import app


def test_a_folder_where_the_lock_goes_is_refused_with_exit_2(tmp_path):
    lock_path(tmp_path / "pretrain").mkdir()
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path / "pretrain").acquire()
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert str(lock_path(tmp_path / "pretrain")) in msg and "delete it" in msg


def test_a_folder_where_the_lock_goes_exits_2_from_the_command(tiny_recipe_file, tmp_path):
    lock_path(tmp_path / "out" / "pretrain").mkdir(parents=True)
    result = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(tmp_path / "out"), "-q",
                                      "--set", "pretrain.epochs=1"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "IsADirectoryError" not in result.output


def test_resume_hint_under_simclr_launch_runs_the_same_launch(tmp_path, monkeypatch):
    import sys

    from simclr_cli import launch as lib
    from simclr_cli.stages.scaffold import StageRun

    opts = lib.LaunchOptions(processes=2, max_restarts=1)
    assert lib.relaunch_prefix(opts) == "simclr launch --processes 2 --max-restarts 1"
    assert lib.relaunch_prefix(lib.LaunchOptions()) == "simclr launch"

    # simclr launch hands the prefix to the stages (not shown in the printed command)
    seen = {}
    monkeypatch.setattr(lib, "run_plan", lambda plan, say=None, extra_env=None: seen.update(extra_env or {}) or 0)
    result = CliRunner().invoke(app, ["launch", "--processes", "2", "pretrain", "quickstart"])
    assert result.exit_code == 0, result.output
    assert seen == {lib.RELAUNCH_ENV: "simclr launch --processes 2"}
    monkeypatch.undo()
    check = f"import os, sys; sys.exit(os.environ.get({lib.RELAUNCH_ENV!r}) != 'simclr launch --processes 2')"
    assert lib.run_plan(lib.LaunchPlan([sys.executable, "-c", check]),
                        extra_env={lib.RELAUNCH_ENV: "simclr launch --processes 2"}) == 0

    # a stage started that way prints a resume command that launches as many processes
    cmd = "simclr pretrain runs/x/pretrain/recipe.toml --out runs/x --resume"
    stage_run = StageRun()
    stage_run.configure(tmp_path / "pretrain", "pretrain", resume_cmd=cmd)
    assert stage_run.resume_cmd == cmd  # a plain command stays plain
    monkeypatch.setenv(lib.RELAUNCH_ENV, "simclr launch --processes 2")
    stage_run.configure(tmp_path / "pretrain", "pretrain", resume_cmd=cmd)
    assert stage_run.resume_cmd == "simclr launch --processes 2 pretrain runs/x/pretrain/recipe.toml --out runs/x --resume"


def test_an_error_line_is_written_in_one_piece(monkeypatch):
    """The processes of a launch share stderr: `error: ...` and its newline go out in one write, so two ranks'
    lines cannot be glued into one."""
    import typer

    from simclr_cli.cli._app import handle_errors
    from simclr_cli.errors import UsageError

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return len(text)

        def flush(self):
            pass

    for raised in (UsageError("bad thing"), RuntimeError("boom"), KeyboardInterrupt()):
        rec = Recorder()
        monkeypatch.setattr("sys.stderr", rec)
        with pytest.raises(typer.Exit):
            with handle_errors(False):
                raise raised
        monkeypatch.undo()
        assert len(rec.writes) == 1 and rec.writes[0].startswith("error: ") and rec.writes[0].endswith("\n"), rec.writes
