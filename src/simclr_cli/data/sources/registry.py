"""The dataset registry: one entry per dataset name, read by pretraining and evaluation (``data.dataset``,
through :func:`simclr_cli.data.pipeline.loaders.build_source`) and by transfer (``transfer.datasets`` /
``simclr transfer --dataset``, through :func:`simclr_cli.data.sources.transfer.load_transfer`).

An entry names its builders (:mod:`simclr_cli.data.sources.builders`), the paper's metric for it ([v1] App. B.8:
mean per-class accuracy for Aircraft, Pets, Caltech-101 and Flowers, 11-point mAP for VOC2007, top-1
otherwise), the hint shown when its data is missing, and the splits a recipe may name. Adding a dataset is
one builder and one entry here; ``docs/extending.md`` walks through it.

``data.dataset`` is a plain string in the recipe schema (``recipe/`` sits below ``data/``, so it cannot
import this table); a name that is not a pretraining dataset here is a :class:`RecipeError` (exit 2)
when the data is built, as ``pretrain.objective`` is checked against its registry.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from simclr_cli.data.sources import builders
from simclr_cli.data.sources.builders import TransferSplits
from simclr_cli.data.sources.images import ImageSource
from simclr_cli.errors import DataError, RecipeError, UsageError
from simclr_cli.recipe.schema import DataConfig

Metric = Literal["top1", "mean_per_class", "map11"]
SplitBuilder = Callable[[str, str, DataConfig, str, int], ImageSource]


@dataclass(frozen=True)
class Dataset:
    """One registered dataset.

    Attributes:
        name: what ``data.dataset`` and ``--dataset`` say.
        metric: what the transfer stage reports for it: "top1" | "mean_per_class" | "map11".
        hint: what the data root must hold, named when the data is missing (e.g. ``cifar-10-batches-py/``).
        splits: the split names ``source`` accepts (``data.train_split``, ``data.val_split``); empty means
            any name (synthetic draws a fresh set per name; an image folder reads the sub-folder).
        source: split builder ``(name, hint, cfg, split, seed)``; set when it can be ``data.dataset``
            (pretraining and the evaluation stages).
        transfer: transfer builder ``(name, hint, root, *, download, split, seed)``; set when it can be a
            transfer dataset.
        path_in_name: transfer names it ``NAME:PATH`` (the data's own folder) instead of reading ``--root``.
        one_set: one set of images with no splits (every split name gives all of it), so no held-out split for
            evaluation: the kNN monitor and the evaluation stages take their labeled images from ``data.labeled``.
    """

    name: str
    metric: Metric
    hint: str
    splits: tuple[str, ...] = ()
    source: Optional[SplitBuilder] = None
    transfer: Optional[Callable[..., TransferSplits]] = None
    path_in_name: bool = False
    one_set: bool = False

    def build_split(self, cfg: DataConfig, split: str, seed: int) -> ImageSource:
        """Split ``split`` of this dataset as the recipe's ``[data]`` section describes it."""
        if self.splits and split not in self.splits:
            raise DataError(f"{self.name}: unknown split '{split}'; valid splits: {', '.join(self.splits)}", missing=True)
        return self.source(self.name, self.hint, cfg, split, seed)

    def build_transfer(self, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
        """Train / val (or None) / test of this dataset under ``root``."""
        return self.transfer(self.name, self.hint, root, download=download, split=split, seed=seed)


_CIFAR_SPLITS = ("train", "test")
_official = builders.official_splits  # a torchvision dataset with its own splits

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("synthetic", "top1", "nothing: the images are drawn in memory", source=builders.synthetic_split),
    Dataset("cifar10", "top1", "cifar-10-batches-py/", _CIFAR_SPLITS, builders.torchvision_split,
            builders.train_test_in_memory),
    Dataset("cifar100", "top1", "cifar-100-python/", _CIFAR_SPLITS, builders.torchvision_split,
            builders.train_test_in_memory),
    Dataset("stl10", "top1", "stl10_binary/", ("train", "test", "unlabeled", "train+unlabeled"),
            builders.torchvision_split, builders.train_test_in_memory),
    Dataset("imagefolder", "top1", "<split>/<class>/<image> folders", source=builders.imagefolder_split,
            transfer=builders.folder_layouts, path_in_name=True),
    Dataset("folder", "top1", "images at any depth under data.root (unlabeled)", source=builders.folder_split,
            one_set=True),
    Dataset("filelist", "top1", "a .txt (one image path a line) or .csv (path[,label]) list file as data.root",
            source=builders.filelist_split, one_set=True),
    Dataset("shards", "top1", "a pack folder made by `simclr data pack SRC OUT` (index.json, shard-*.tar) as data.root",
            source=builders.shards_split, one_set=True),
    Dataset("food101", "top1", "food-101/", transfer=_official("Food101", ("train", "test"))),
    Dataset("flowers102", "mean_per_class", "flowers-102/", transfer=_official("Flowers102", ("train", "val", "test"))),
    Dataset("oxford_pets", "mean_per_class", "oxford-iiit-pet/", transfer=_official("OxfordIIITPet", ("trainval", "test"))),
    Dataset("stanford_cars", "top1", "stanford_cars/ (no longer downloadable: get it from Kaggle)",
            transfer=_official("StanfordCars", ("train", "test"))),
    Dataset("fgvc_aircraft", "mean_per_class", "fgvc-aircraft-2013b/",
            transfer=_official("FGVCAircraft", ("train", "val", "test"))),
    Dataset("dtd", "top1", "dtd/", transfer=_official("DTD", ("train", "val", "test"))),
    Dataset("sun397", "top1", "SUN397/", transfer=builders.sun397),
    Dataset("caltech101", "mean_per_class", "caltech101/", transfer=builders.caltech101),
    Dataset("voc2007", "map11", "VOCdevkit/VOC2007/", transfer=builders.voc2007),
)}


def pretraining_names() -> list[str]:
    """The names ``data.dataset`` accepts, in registry order."""
    return [d.name for d in DATASETS.values() if d.source is not None]


def transfer_names() -> list[str]:
    """The names transfer accepts, as written: ``cifar10``, ..., ``imagefolder:PATH``."""
    return [f"{d.name}:PATH" if d.path_in_name else d.name for d in DATASETS.values() if d.transfer is not None]


def pretraining_dataset(name: str, where: str = "data.dataset") -> Dataset:
    """The entry for ``data.dataset``; a :class:`RecipeError` (exit 2) with a did-you-mean otherwise.

    ``where`` starts the message: a command that knows where the value came from (a file, a ``--set``) can
    say so, e.g. ``recipes validate`` with ``f"{origin}: data.dataset"``.
    """
    entry = DATASETS.get(name)
    if entry is not None and entry.source is not None:
        return entry
    names = pretraining_names()
    if entry is not None:  # a transfer-only dataset
        why = f"'{name}' is a transfer dataset only (simclr transfer --dataset {name})"
    else:
        close = difflib.get_close_matches(str(name), names, n=1)
        why = f"'{name}' is not a dataset" + (f" (did you mean '{close[0]}'?)" if close else "")
    raise RecipeError(f"{where}: {why}; choose one of {' | '.join(names)}")


def transfer_dataset(name: str) -> tuple[Dataset, Optional[str]]:
    """The entry for a transfer name and, for ``NAME:PATH``, its path; a :class:`UsageError` otherwise."""
    base, colon, path = name.partition(":")
    entry = DATASETS.get(base)
    if entry is not None and entry.transfer is not None and entry.path_in_name == bool(colon):
        if not colon:
            return entry, None
        if path.strip():
            return entry, path.strip()
        # Path("") is the current directory: never use it by accident
        raise UsageError(f"transfer dataset '{name}' has no path; write {base}:PATH, e.g. --dataset {base}:/data/caltech101")
    plain = [n for n in transfer_names() if not n.endswith(":PATH")]
    with_path = [n for n in transfer_names() if n.endswith(":PATH")]
    close = difflib.get_close_matches(base if colon else name, [n.removesuffix(":PATH") for n in transfer_names()], n=1)
    near = f" (did you mean '{close[0]}{':PATH' if DATASETS[close[0]].path_in_name else ''}'?)" if close else ""
    raise UsageError(f"unknown transfer dataset '{name}'{near}; built in: {', '.join(plain)}, "
                     f"or {' or '.join(with_path)}")
