"""The printed resume command works verbatim (issue 11, item 10).

A resume takes its recipe from the stage folder's recipe.toml, so the hint needs no --labels or --set; paths
are shell-quoted. Each test interrupts a run started through the CLI with options and an --out with a space,
splits the printed command as a shell would, and runs it.
"""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, distill, finetune, pretrain


def _command_after(text: str, marker: str) -> list[str]:
    assert marker in text, text
    rest = text.split(marker, 1)[1]
    argv = shlex.split(rest[: rest.index("--resume") + len("--resume")])
    assert argv[0] == "simclr", argv
    return argv[1:]


def _interrupting(monkeypatch, module, after: int) -> None:
    run = module.run
    monkeypatch.setattr(module, "run", lambda *a, **k: run(*a, interrupt_after=after, **k))


@pytest.fixture
def pretrained(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"]), run,
                 show_progress=False)
    return run


def test_finetune_resume_hint_works_verbatim(pretrained, tmp_path, monkeypatch):
    out = tmp_path / "my out"
    runner = CliRunner()
    with monkeypatch.context() as m:
        _interrupting(m, finetune, 2)
        r = runner.invoke(app, ["finetune", str(pretrained), "--labels", "50%", "--from-head-layer", "1",
                                "--set", "finetune.epochs=2", "--set", "finetune.batch_size=8", "--out", str(out), "-q"])
    assert r.exit_code == 130, r.output
    hint = _command_after(r.stderr, "Resume with: ")
    # Another value on resume is still refused, and the command that refusal prints works as well.
    r = runner.invoke(app, [*hint, "--labels", "10%"])
    assert r.exit_code == 2 and "finetune.labels" in r.stderr, r.output
    assert _command_after(r.stderr, "resume with that recipe: ") == hint
    r = runner.invoke(app, hint)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "finetune" / "summary.json").read_text())
    assert summary["labels"] == "50%" and summary["from_head_layer"] == 1 and summary["epochs"] == 2


def test_finetune_random_init_resume_hint_works_verbatim(pretrained, tmp_path, monkeypatch):
    out = tmp_path / "random out"
    runner = CliRunner()
    with monkeypatch.context() as m:
        _interrupting(m, finetune, 2)
        r = runner.invoke(app, ["finetune", str(pretrained), "--init", "random", "--labels", "50%",
                                "--set", "finetune.epochs=1", "--set", "finetune.batch_size=8", "--out", str(out), "-q"])
    assert r.exit_code == 130, r.output
    r = runner.invoke(app, _command_after(r.stderr, "Resume with: "))
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "finetune" / "summary.json").read_text())
    assert summary["init"] == "random" and summary["labels"] == "50%"


def test_distill_resume_hint_works_verbatim(pretrained, tmp_path, monkeypatch):
    src = common.find_checkpoint(pretrained, ("pretrain",))
    recipe = common.inherit_recipe(src, None, ['finetune.labels="50%"', "finetune.epochs=1", "finetune.batch_size=8"])
    finetune.run(recipe, src, pretrained, show_progress=False)
    out = tmp_path / "student out"
    runner = CliRunner()
    with monkeypatch.context() as m:
        _interrupting(m, distill, 2)
        r = runner.invoke(app, ["distill", str(pretrained), "--hard", "--threshold", "0.0", "--set", "distill.epochs=2",
                                "--set", "distill.batch_size=16", "--out", str(out), "-q"])
    assert r.exit_code == 130, r.output
    r = runner.invoke(app, _command_after(r.stderr, "Resume with: "))
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["loss"] == "hard pseudo-labels" and summary["epochs"] == 2 and summary["steps"] > 0


def test_pretrain_resume_hint_works_verbatim_with_a_space_in_out(tiny_recipe_file, tmp_path, monkeypatch):
    out = tmp_path / "pre out"
    runner = CliRunner()
    with monkeypatch.context() as m:
        _interrupting(m, pretrain, 3)
        r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "pretrain.knn_every=0", "--out", str(out),
                                "-q"])
    assert r.exit_code == 130, r.output
    r = runner.invoke(app, _command_after(r.stderr, "Resume with: "))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "pretrain" / "summary.json").read_text())["steps"] == 8
