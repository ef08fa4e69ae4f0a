"""Pretraining on unlabeled data (issue 13, section 1): the kNN monitor off with one line or pointed at a
labeled folder elsewhere (data.labeled), the stages that need labels saying how to give them, mixed formats and
tiny images through pretraining, and folder -> pretrain -> embed -> export from the command line."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import DataError
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, knn, linear_eval, pretrain

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def _unlabeled(folder, n=16, size=(12, 10)):
    """A flat folder of ``n`` noisy single-colour PNGs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = list(COLOURS.values())[i % 3]
        arr = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")
    return folder


def _labeled(folder, n=4):
    """``folder/<colour>/<image>``: three classes that colour alone separates."""
    rng = np.random.default_rng(1)
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / name / f"{i}.png")
    return folder


def _folder_args(root, *more):
    return ["data.dataset='folder'", f"data.root='{root}'", "pretrain.epochs=1", "pretrain.batch_size=8", *more]


def test_monitor_is_off_with_one_line_on_unlabeled_data(tiny_recipe_file, tmp_path, capsys):
    recipe = load_recipe(tiny_recipe_file, _folder_args(_unlabeled(tmp_path / "photos")))
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=True)
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "kNN monitor off" in ln]
    assert lines == ["kNN monitor off: data.dataset=folder has no labeled val split; set data.labeled=PATH "
                     "(a labeled image folder) to turn it on, or pretrain.knn_every=0 to silence this line"]
    assert summary["knn_top1"] is None and summary["steps"] == 2
    assert (tmp_path / "r" / "pretrain" / "model.safetensors").is_file()


def test_monitor_reads_a_labeled_folder_elsewhere(tiny_recipe_file, tmp_path):
    labeled = _labeled(tmp_path / "small_labeled")  # class folders only: half of each class is the bank
    recipe = load_recipe(tiny_recipe_file, _folder_args(
        _unlabeled(tmp_path / "photos"), f"data.labeled='{labeled}'", "pretrain.knn_k=2", "pretrain.lr=1e-6"))
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert summary["knn_top1_init"] == 100.0 and summary["knn_top1"] is not None  # colour separates the classes
    splits = common.labeled_splits(recipe)
    assert splits.classes == ["blue", "green", "red"] and len(splits.train_indices) == len(splits.test) == 6


def test_labeled_folder_with_train_and_val_and_bad_paths(tiny_recipe_file, tmp_path):
    root = tmp_path / "lab"
    _labeled(root / "train")
    _labeled(root / "val", n=2)
    recipe = load_recipe(tiny_recipe_file, ["data.dataset='folder'", f"data.labeled='{root}'"])
    splits = common.labeled_splits(recipe)
    assert len(splits.train_indices) == 12 and len(splits.test) == 6
    with pytest.raises(DataError, match="data.labeled: .*nope is not a folder") as e:
        common.labeled_splits(load_recipe(tiny_recipe_file, [f"data.labeled='{tmp_path / 'nope'}'"]))
    assert e.value.exit_code == 2


@pytest.mark.parametrize("stage", ["linear_eval", "knn"])
def test_a_stage_that_needs_labels_says_which_and_how(tiny_recipe_file, tmp_path, stage):
    recipe = load_recipe(tiny_recipe_file, _folder_args(_unlabeled(tmp_path / "photos"), "pretrain.knn_every=0"))
    pretrain.run(recipe, tmp_path / "r", show_progress=False)
    src = common.find_checkpoint(tmp_path / "r", ("pretrain",))
    run = {"linear_eval": linear_eval.run, "knn": knn.run}[stage]
    with pytest.raises(DataError) as e:
        run(common.inherit_recipe(src, None, []), src, tmp_path / "r", show_progress=False)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "has no labels" in msg and "--set data.labeled=PATH" in msg
    assert "train and a test set" in msg
    # given a labeled folder, the same stage runs
    labeled = _labeled(tmp_path / "lab")
    summary = run(common.inherit_recipe(src, None, [f"data.labeled='{labeled}'"]), src, tmp_path / "r",
                  show_progress=False)
    assert summary is not None


def test_a_labeled_list_is_one_set_so_evaluation_needs_data_labeled(tiny_recipe_file, tmp_path):
    photos = _unlabeled(tmp_path / "photos", n=8)
    (photos / "l.csv").write_text("".join(f"img_{i:03d}.png,{i % 2}\n" for i in range(8)))
    recipe = load_recipe(tiny_recipe_file, ["data.dataset='filelist'", f"data.root='{photos / 'l.csv'}'"])
    assert common.labeled_splits(recipe, required=False) is None  # its val split would be its own images
    with pytest.raises(DataError, match="one set of images with no held-out split.*data.labeled"):
        common.labeled_splits(recipe)
    assert common.labeled_splits(recipe, test=False).train_indices == list(range(8))


@pytest.mark.parametrize("backend", ["torchvision", "batched"])
def test_mixed_formats_and_tiny_images_through_pretrain(tiny_recipe_file, tmp_path, backend):
    root = _unlabeled(tmp_path / "photos", n=6, size=(7, 5))  # smaller than the 16 px crop: upscaled
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "one_pixel.png")
    Image.new("CMYK", (20, 13), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("L", (11, 30), 77).save(root / "nested_gray.png")
    Image.fromarray(np.full((9, 9), 40000, dtype=np.uint16)).save(root / "wide16.png")
    phone = Image.new("RGB", (40, 20), (200, 100, 0))
    exif = phone.getexif()
    exif[0x0112] = 6
    phone.save(root / "phone.jpg", exif=exif)
    recipe = load_recipe(tiny_recipe_file, _folder_args(root, "pretrain.knn_every=0", f"augment.backend='{backend}'",
                                                        "data.in_memory='always'"))
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert summary["images"] == 11 and summary["bad_images"] == 0 and np.isfinite(summary["final_loss"])


def test_cli_pretrain_on_a_flat_unlabeled_folder_then_embed_and_export(tiny_recipe_file, tmp_path):
    photos = _unlabeled(tmp_path / "photos")
    runner = CliRunner()
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "data.dataset=folder", "--set",
                            f"data.root={photos}", "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=8",
                            "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["embed", str(tmp_path / "run"), "--data", "train"])
    assert r.exit_code == 0, r.output
    feats = np.load(tmp_path / "run" / "embed" / "train.npy")
    rows = (tmp_path / "run" / "embed" / "train.csv").read_text().splitlines()
    assert feats.shape[0] == 16 and len(rows) == 17 and rows[1].endswith("img_000.png,-1,,0")
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["architecture"] == "test_resnet"
    assert (tmp_path / "exp" / "model.safetensors").is_file()
