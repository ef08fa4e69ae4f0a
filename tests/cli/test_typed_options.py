"""A command's own options reach the recipe as typed values (never TOML text), checked by the schema and
blamed on the option."""

import shutil
import tomllib

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.recipe import load_recipe, recipe_from_dict, recipe_to_toml
from simclr_cli.stages import distill, finetune, pretrain, transfer

ODD = 'a "quoted" \\back\\slash [not toml] = 1'


@pytest.fixture
def run_dir(tiny_recipe_file, tmp_path):
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"]), tmp_path / "run",
                 show_progress=False)
    return tmp_path / "run"


def _one_error(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


def _capture(monkeypatch, module, summary: dict) -> list:
    """Replace ``module.run`` by one that records the recipe it gets."""
    seen = []
    monkeypatch.setattr(module, "run", lambda r, *a, **k: seen.append(r) or summary)
    return seen


def test_knn_options_reach_the_stage_recipe_with_their_types(run_dir):
    r = CliRunner().invoke(app, ["knn", str(run_dir), "--k", "5", "--temperature", "0.07", "-q",
                                 "--set", "knn.k=3", "--set", "knn.temperature=0.5"])
    assert r.exit_code == 0, r.output
    saved = tomllib.loads((run_dir / "knn" / "recipe.toml").read_text())["knn"]
    assert saved == {"k": 5, "temperature": 0.07}  # the options, applied after --set
    assert type(saved["k"]) is int and type(saved["temperature"]) is float


def test_string_options_are_never_read_as_toml(run_dir, monkeypatch):
    seen = _capture(monkeypatch, finetune, {"labels": "10%"})
    r = CliRunner().invoke(app, ["finetune", str(run_dir), "--labels", "10%", "--from-head-layer", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert seen[0].finetune.labels == "10%" and seen[0].finetune.from_head_layer == 1
    # quotes, backslashes, brackets and '=' stay what they are, also through the stage's recipe.toml
    seen = _capture(monkeypatch, transfer, {})
    r = CliRunner().invoke(app, ["transfer", str(run_dir), "--datasets", "cifar10,dtd", "--root", ODD,
                                 "--mode", "finetune", "--download", "--full-grid", "-q"])
    assert r.exit_code == 0, r.output
    t = seen[0].transfer
    assert (t.datasets, t.root, t.mode, t.download, t.l2_grid, t.finetune_grid) == (
        "cifar10,dtd", ODD, "finetune", True, "paper", "paper")
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(seen[0]))) == seen[0]


@pytest.mark.parametrize("args, message", [
    (["knn", "--k", "0"], "error: --k: 'knn.k' must be an integer >= 1, got 0"),
    (["knn", "--temperature", "-1"], "error: --temperature: 'knn.temperature' must be a number > 0, got -1.0"),
    (["linear-eval", "--mode", "papr"],
     "error: --mode: 'linear_eval.mode' must be one of 'cached' | 'paper', got 'papr' (did you mean 'paper'?)"),
    (["finetune", "--from-head-layer", "5"],
     "error: --from-head-layer: 'finetune.from_head_layer' must be an integer from 0 to 3, got 5"),
    (["transfer", "--mode", "linaer"], "error: --mode: 'transfer.mode' must be one of 'linear' | 'finetune', "
                                       "got 'linaer' (did you mean 'linear'?)"),
])
def test_a_bad_option_value_is_the_schema_message_naming_the_option_exit_2(run_dir, args, message):
    r = CliRunner().invoke(app, [args[0], str(run_dir), *args[1:], "-q"])
    assert r.exit_code == 2 and _one_error(r) == message, r.output


def test_distill_options_are_typed_and_named(run_dir, monkeypatch):
    shutil.copytree(run_dir / "pretrain", run_dir / "finetune")  # a checkpoint where distill looks for its teacher
    r = CliRunner().invoke(app, ["distill", str(run_dir), "--alpha", "1.5", "-q"])
    assert r.exit_code == 2 and _one_error(r) == "error: --alpha: 'distill.alpha' must be a number in [0, 1], got 1.5"
    seen = _capture(monkeypatch, distill, {})
    r = CliRunner().invoke(app, ["distill", str(run_dir), "--student", ODD, "--student-init", "random", "--hard",
                                 "--threshold", "0.5", "--no-noisy", "--alpha", "0.25", "-t", "2", "-q"])
    assert r.exit_code == 0, r.output
    d = seen[0].distill
    assert (d.student, d.student_init, d.hard, d.threshold, d.noisy, d.alpha, d.temperature) == (
        ODD, "random", True, 0.5, False, 0.25, 2.0)
    assert type(d.temperature) is float


def test_an_option_given_is_never_silently_dropped(run_dir):
    """`knn --temperature 0` and `finetune --labels ""` used to fall back to the recipe's value."""
    r = CliRunner().invoke(app, ["knn", str(run_dir), "--temperature", "0", "-q"])
    assert r.exit_code == 2 and "--temperature: 'knn.temperature' must be a number > 0" in _one_error(r)
    r = CliRunner().invoke(app, ["finetune", str(run_dir), "--labels", "", "-q"])
    assert r.exit_code == 2 and "--labels" in _one_error(r)
