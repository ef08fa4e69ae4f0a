"""The transfer stage on tiny image folders: selection never sees test, results accumulate, CLI table."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import UsageError
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, pretrain, transfer

COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def _folder(root, split, per_class, seed, shuffle_labels=False):
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    for ci, c in enumerate(names):
        for i in range(per_class):
            color = COLORS[names[(ci + 1) % 3]] if shuffle_labels and i % 2 else COLORS[c]
            arr = (np.array(color) + rng.integers(-40, 40, (16, 16, 3))).clip(0, 255).astype(np.uint8)
            path = root / split / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)


@pytest.fixture
def run_dir(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    return tmp_path / "run"


def test_linear_selection_never_sees_test(run_dir, tmp_path):
    _folder(tmp_path / "a", "train", 12, seed=0)
    _folder(tmp_path / "a", "test", 6, seed=1)
    _folder(tmp_path / "b", "train", 12, seed=0)  # the same train split ...
    _folder(tmp_path / "b", "test", 6, seed=7, shuffle_labels=True)  # ... and a different test split
    src = common.find_checkpoint(run_dir, ("pretrain",))
    results = {}
    for name in ("a", "b"):
        recipe = common.inherit_recipe(src, None, [f'transfer.datasets="imagefolder:{tmp_path / name}"'])
        results[name] = transfer.run(recipe, src, tmp_path / f"out_{name}", show_progress=False)["results"]["linear"]
    a, b = (results[n][f"imagefolder:{tmp_path / n}"] for n in ("a", "b"))
    assert a["val_scores"] == b["val_scores"] and a["l2"] == b["l2"]  # chosen without looking at test
    assert a["value"] != b["value"]  # ... which did differ
    assert a["metric"] == "top1" and a["train_images"] + a["val_images"] == 36 and a["test_images"] == 18


def test_results_accumulate_and_are_not_replaced_silently(run_dir, tmp_path):
    _folder(tmp_path / "d", "train", 6, seed=0)
    _folder(tmp_path / "d", "test", 2, seed=1)
    src = common.find_checkpoint(run_dir, ("pretrain",))
    name = f"imagefolder:{tmp_path / 'd'}"
    recipe = common.inherit_recipe(src, None, [f'transfer.datasets="{name}"'])
    transfer.run(recipe, src, run_dir, show_progress=False)
    with pytest.raises(UsageError, match="already has linear results"):
        transfer.run(recipe, src, run_dir, show_progress=False)
    ft = common.inherit_recipe(src, None, [f'transfer.datasets="{name}"', 'transfer.mode="finetune"',
                                           "transfer.finetune_steps=2", "transfer.batch_size=8"])
    summary = transfer.run(ft, src, run_dir, show_progress=False)
    assert set(summary["results"]) == {"linear", "finetune"}  # the linear result was kept
    res = summary["results"]["finetune"][name]
    assert len(res["val_scores"]) == 4 and res["steps"] == 2
    on_disk = json.loads((run_dir / "transfer" / "summary.json").read_text())
    assert on_disk["results"] == summary["results"]
    table = transfer.results_table(summary, "pretrained")
    assert table.splitlines()[0].startswith("| |") and "| linear (pretrained) |" in table


def test_cli_datasets_table_and_random_init(run_dir, tmp_path):
    for n in ("x", "y"):
        _folder(tmp_path / n, "train", 6, seed=0)
        _folder(tmp_path / n, "test", 2, seed=1)
    names = f"imagefolder:{tmp_path / 'x'},imagefolder:{tmp_path / 'y'}"
    r = CliRunner().invoke(app, ["transfer", str(run_dir), "--datasets", names, "--init", "random"])
    assert r.exit_code == 0, r.output
    assert f"| | imagefolder:{tmp_path / 'x'} | imagefolder:{tmp_path / 'y'} |" in r.output
    summary = json.loads((run_dir / "random_init" / "transfer" / "summary.json").read_text())
    assert summary["init"] == "random" and len(summary["results"]["linear"]) == 2
    r = CliRunner().invoke(app, ["transfer", str(run_dir), "--dataset", "flowers102", "--root", str(tmp_path)])
    assert r.exit_code == 2 and "flowers102: not found" in r.output
