"""The dataset registry: every entry is complete, and pretraining (data.dataset) and transfer (--dataset)
accept exactly the registry's names; the one class-folder scanner behind the three folder readers."""

from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from simclr_cli.data.listing.folders import scan_class_folders
from simclr_cli.data.pipeline.loaders import build_source
from simclr_cli.data.sources.builders import TransferSplits, folder_source
from simclr_cli.data.sources.images import ImageFolderSource, TensorSource
from simclr_cli.data.sources.registry import DATASETS, Dataset, pretraining_names, transfer_names
from simclr_cli.data.sources.transfer import load_transfer
from simclr_cli.errors import DataError, RecipeError, UsageError
from simclr_cli.recipe import DataConfig, recipe_from_dict
from simclr_cli.recipe.schema import TransferConfig


def test_every_entry_has_a_builder_a_metric_and_a_hint():
    assert DATASETS
    for name, d in DATASETS.items():
        assert d.name == name
        assert d.source is not None or d.transfer is not None, name
        assert d.metric in ("top1", "mean_per_class", "map11"), name
        assert isinstance(d.hint, str) and d.hint.strip(), name
        assert isinstance(d.splits, tuple) and all(isinstance(s, str) for s in d.splits), name
        assert not d.path_in_name or d.transfer is not None, name


def test_the_papers_metrics_and_roles():
    # [v1] App. B.8: mean per-class accuracy for Aircraft, Pets, Caltech-101, Flowers; 11-point mAP for VOC2007
    assert {n for n, d in DATASETS.items() if d.metric == "mean_per_class"} == {
        "fgvc_aircraft", "oxford_pets", "caltech101", "flowers102"}
    assert [n for n, d in DATASETS.items() if d.metric == "map11"] == ["voc2007"]
    assert pretraining_names() == ["synthetic", "cifar10", "cifar100", "stl10", "imagefolder", "folder", "filelist", "shards"]
    assert transfer_names() == ["cifar10", "cifar100", "stl10", "imagefolder:PATH", "food101", "flowers102",
                                "oxford_pets", "stanford_cars", "fgvc_aircraft", "dtd", "sun397", "caltech101",
                                "voc2007"]


def test_the_schema_help_names_every_registered_dataset():
    # The recipe reference (docs/recipes.md) is generated from these help texts: they must not drift.
    help_of = {f.name: f.metadata["help"] for f in fields(DataConfig)}
    assert all(n in help_of["dataset"] for n in pretraining_names())
    transfer_help = {f.name: f.metadata["help"] for f in fields(TransferConfig)}["datasets"]
    assert all(n in transfer_help for n in transfer_names())


def test_the_transfer_commands_dataset_help_names_every_transfer_dataset():
    # `simclr transfer --dataset`'s help is a fixed text (the CLI does not import the registry, to start fast)
    import typer

    from simclr_cli.cli import app

    command = typer.main.get_command(app).commands["transfer"]
    help_text = next(p.help for p in command.params if p.name == "dataset")
    assert [n for n in transfer_names() if n not in help_text] == []


def _tiny_split(name, hint, cfg, split, seed):
    import torch

    images = torch.full((4, 3, 8, 8), 7 if split == "train" else 9, dtype=torch.uint8)
    return TensorSource(images, [0, 1, 0, 1], ["a", "b"], f"{name}:{split}")


def _tiny_transfer(name, hint, root, *, download, split, seed):
    return TransferSplits(_tiny_split(name, hint, None, "train", seed), None, _tiny_split(name, hint, None, "test", seed),
                          "")


def test_a_new_entry_is_accepted_by_pretraining_and_transfer(monkeypatch, tmp_path):
    monkeypatch.setitem(DATASETS, "tiny", Dataset("tiny", "mean_per_class", "tiny/", ("train", "test"),
                                                  source=_tiny_split, transfer=_tiny_transfer))
    assert "tiny" in pretraining_names() and "tiny" in transfer_names()
    recipe = recipe_from_dict({"data": {"dataset": "tiny"}})
    src = build_source(recipe.data, "train", 0)
    assert src.name == "tiny:train" and len(src) == 4
    with pytest.raises(DataError, match="tiny: unknown split 'val'; valid splits: train, test"):
        build_source(recipe.data, "val", 0)
    data = load_transfer("tiny", str(tmp_path))
    assert data.metric == "mean_per_class" and data.classes == ["a", "b"] and len(data.test) == 4
    with pytest.raises(UsageError) as e:
        load_transfer("nope", "")
    assert "tiny" in str(e.value)


def test_unknown_names_are_refused_by_both_with_the_registrys_names(tmp_path):
    with pytest.raises(RecipeError) as e:
        build_source(DataConfig(dataset="cifar"), "train", 0)
    assert e.value.exit_code == 2
    assert "data.dataset: 'cifar' is not a dataset (did you mean 'cifar10'?)" in str(e.value)
    assert " | ".join(pretraining_names()) in str(e.value)
    with pytest.raises(RecipeError, match="'food101' is a transfer dataset only"):
        build_source(DataConfig(dataset="food101"), "train", 0)
    with pytest.raises(UsageError) as e:
        load_transfer("cifar", str(tmp_path))
    plain = [n for n in transfer_names() if ":" not in n]
    assert str(e.value) == (f"unknown transfer dataset 'cifar' (did you mean 'cifar10'?); built in: {', '.join(plain)}, "
                            "or imagefolder:PATH")
    # pretraining only; a path where none is taken, or none given: each names the transfer spelling nearest to it
    for name, near in (("synthetic", None), ("imagefolder", "imagefolder:PATH"), ("cifar10:x", "cifar10"),
                       ("imagefoldr:/data", "imagefolder:PATH")):
        with pytest.raises(UsageError, match="unknown transfer dataset") as e:
            load_transfer(name, str(tmp_path))
        assert (f"(did you mean '{near}'?)" in str(e.value)) if near else ("did you mean" not in str(e.value))


def test_torchvision_splits_come_from_the_registry(tmp_path):
    with pytest.raises(DataError, match="cifar10: unknown split 'val'; valid splits: train, test"):
        build_source(DataConfig(dataset="cifar10", root=str(tmp_path)), "val", 0)
    with pytest.raises(DataError, match="stl10: unknown split 'x'; valid splits: train, test, unlabeled, train\\+unlabeled"):
        build_source(DataConfig(dataset="stl10", root=str(tmp_path)), "x", 0)


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), 50, np.uint8)).save(path, format="PNG")


def test_one_scanner_behind_the_three_folder_readers(tmp_path):
    root = tmp_path / "train"
    for rel in ("b/1.png", "a/x/2.PNG", "a/1.png", "loose.png"):
        _img(root / rel)
    _img(root / "a" / "no_extension")  # an image only a sniffing scan accepts
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _img(root / ".hidden" / "h.png")

    by_ext = scan_class_folders(root, sniff=False)
    assert by_ext.classes == ["a", "b"]
    assert [f.removeprefix(str(root) + "/") for f in by_ext.files] == ["a/1.png", "a/x/2.PNG", "b/1.png"]
    assert by_ext.labels == [0, 0, 1]
    sniffed = scan_class_folders(root)
    assert [f.removeprefix(str(root) + "/") for f in sniffed.files] == ["a/1.png", "a/no_extension", "a/x/2.PNG",
                                                                          "b/1.png"]
    loose = scan_class_folders(root, loose=True)
    assert loose.files[-1].endswith("loose.png") and loose.labels[-1] == -1

    # pretraining / evaluation: by extension; embed --data FOLDER: sniffed, loose images unlabeled
    assert ImageFolderSource(tmp_path, "train").files == by_ext.files
    embed = folder_source(root)
    assert (embed.files, embed.labels, embed.classes) == tuple(loose)
    # transfer image folders: sniffed, classes aligned to train's order
    for rel in ("a/1.png", "b/1.png"):
        _img(tmp_path / "test" / rel)
    data = load_transfer(f"imagefolder:{tmp_path}", "")
    assert sorted(data.train.source.files) == sorted(sniffed.files) and data.classes == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images \\(looked in class folders and the folder itself\\)"):
        folder_source(tmp_path / "empty")
