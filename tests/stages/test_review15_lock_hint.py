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
