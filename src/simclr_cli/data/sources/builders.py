"""How each dataset of the registry (:mod:`simclr_cli.data.sources.registry`) is built.

Two kinds of builder, each a plain function that the registry's entries name:

* a **split builder** ``(name, hint, cfg, split, seed) -> ImageSource`` gives one split of a
  pretraining dataset (``data.dataset``): the recipe's ``[data]`` section in, plain arguments out;
* a **transfer builder** ``(name, hint, root, *, download, split, seed) -> TransferSplits`` gives the
  train / val / test sources of a transfer dataset ([v1] App. B.8); ``val`` is None where the dataset
  has no validation split (the caller then holds out a stratified fraction of train).

``name`` and ``hint`` come from the registry entry: ``hint`` is what ``root`` must hold, named when
the data is missing.
"""

from __future__ import annotations

import functools
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from simclr_cli.data.listing.folders import IMAGE_EXTENSIONS, scan_class_folders, scan_images
from simclr_cli.data.listing.lists import read_file_list
from simclr_cli.data.sources.images import (
    FileListSource,
    ImageFolderSource,
    ImageSource,
    SubsetSource,
    decode_in_memory,
    torchvision_source,
)
from simclr_cli.data.sources.splits import per_class_split
from simclr_cli.data.sources.synthetic import synthetic_source
from simclr_cli.errors import DataError
from simclr_cli.recipe.schema import DataConfig


class TransferSplits(NamedTuple):
    """A transfer dataset's sources; ``note`` says where ``val`` came from ('' when ``val`` is None)."""

    train: ImageSource
    val: Optional[ImageSource]
    test: ImageSource
    note: str


def _say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)


def _warn(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- split builders (data.dataset)


def synthetic_split(name: str, hint: str, cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """The built-in shapes: ``synthetic_train_size`` images for 'train', ``synthetic_val_size`` for any other split."""
    n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_val_size
    return synthetic_source(split, n, cfg.image_size, cfg.synthetic_classes, seed)


def imagefolder_split(name: str, hint: str, cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """``data.root/<split>/<class>/<image>``, decoded into memory as ``data.in_memory`` says."""
    return decode_in_memory(ImageFolderSource(cfg.root, split, cache=cfg.listing_cache), cfg.in_memory,
                            cfg.memory_limit_gb, say=_say)


def folder_split(name: str, hint: str, cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """Every image under ``data.root``, flat or nested to any depth, unlabeled; one set (``split`` is not used)."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        also = " (a file: for a list of image paths use data.dataset=filelist)" if root.is_file() else ""
        raise DataError(f"folder: {root} is not a folder{also}; point data.root at the folder that holds your "
                        "images (e.g. --set data.root=/path/to/images)", missing=True)
    files = scan_images(root, cache=cfg.listing_cache)
    if not len(files):
        raise DataError(f"folder: no images under {root} at any depth (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "in any case, and opened files with other extensions)", missing=True)
    source = FileListSource(files, [-1] * len(files), [], f"folder:{root}")
    return decode_in_memory(source, cfg.in_memory, cfg.memory_limit_gb, say=_say)


def filelist_split(name: str, hint: str, cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """The images a list file names (``data.root``: .txt or .csv, see :mod:`simclr_cli.data.listing.lists`); one set."""
    source = FileListSource.of(read_file_list(Path(cfg.root), allow_missing=cfg.allow_missing, warn=_warn))
    return decode_in_memory(source, cfg.in_memory, cfg.memory_limit_gb, say=_say)


def shards_split(name: str, hint: str, cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """A pack folder written by ``simclr data pack`` (``data.root``: index.json + shard-*.tar, local or mounted),
    read by sample index (:class:`~simclr_cli.data.shards.reader.ShardSource`); one set (``split`` is not used)."""
    from simclr_cli.data.shards.reader import ShardSource

    return ShardSource(Path(cfg.root))


def torchvision_split(name: str, hint: str, cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """CIFAR-10/100 or STL-10 from ``data.root`` (downloaded there with ``data.download``)."""
    return torchvision_source(name, cfg.root, split, cfg.download, expected=hint)


# ----------------------------------------------------------------------------- transfer builders


def folder_layouts(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
    """An image folder (``imagefolder:PATH``) in one of three layouts: (1) train/ + test/ (or val/) folders of
    class folders; (2) class folders plus train.txt / test.txt of relative paths; (3) class folders only
    (split by ``split``)."""
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: no such folder", missing=True)
    name = f"imagefolder:{root}"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        parts = []
        for d in (root / "train", test_dir):
            files, labels, classes = scan_class_folders(d)
            if not files:
                raise DataError(f"{name}: no images under {d}/<class>/", missing=True)
            parts.append(FileListSource(files, labels, classes, f"{name}/{d.name}"))
        val = None
        if test_dir.name == "test" and (root / "val").is_dir():
            files, labels, classes = scan_class_folders(root / "val")
            val = FileListSource(files, labels, classes, f"{name}/val")
        return TransferSplits(parts[0], val, parts[1], "val/ folder" if val is not None else "")
    files, labels, classes = scan_class_folders(root)
    if not files:
        raise DataError(f"{name}: no images in class folders; expected train/ and test/ folders, or class folders "
                        f"({root}/<class>/<image>)", missing=True)
    everything = FileListSource(files, labels, classes, name)
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():
        index = {str(Path(f).relative_to(root)): i for i, f in enumerate(files)}
        picked = []
        for list_name in ("train.txt", "test.txt"):
            wanted = [ln.strip() for ln in (root / list_name).read_text().splitlines() if ln.strip()]
            missing = [w for w in wanted if w not in index]
            if missing:
                raise DataError(f"{root / list_name}: {len(missing)} listed files are not images under {root}, "
                                f"e.g. '{missing[0]}' (paths are relative to {root})", missing=True)
            picked.append(SubsetSource(everything, sorted(index[w] for w in wanted)))
        val = None
        if (root / "val.txt").is_file():
            wanted = [ln.strip() for ln in (root / "val.txt").read_text().splitlines() if ln.strip()]
            val = SubsetSource(everything, sorted(index[w] for w in wanted if w in index))
        return TransferSplits(picked[0], val, picked[1], "val.txt" if val is not None else "")
    train, test = per_class_split(everything, split, seed)
    return TransferSplits(train, None, test, "")


def folder_source(folder: Path) -> FileListSource:
    """Every image under ``folder`` at any depth (``simclr embed --data FOLDER``), found as the ``folder``
    dataset finds them (hidden files skipped, links followed): those under a top-level folder labeled by it
    (its class), those directly in ``folder`` unlabeled (-1)."""
    files, labels, classes = scan_class_folders(folder, loose=True, warn=False)
    if not len(files):
        raise DataError(f"{folder}: no images (looked in class folders and the folder itself)", missing=True)
    return FileListSource(files, labels, classes, str(folder))


TransferBuilder = Callable[..., TransferSplits]


def _hinted(build: TransferBuilder) -> TransferBuilder:
    """Turn a torchvision dataset that is not there (or failed to download) into a DataError naming the
    registry's hint and the transfer options (``--download``, ``--root``)."""

    @functools.wraps(build)
    def wrapper(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
        try:
            return build(name, hint, root, download=download, split=split, seed=seed)
        except (DataError, RuntimeError, OSError):  # DataError: torchvision_source's hint names data.download
            how = "check the download; it failed" if download else "pass --download (needs internet) or put it there"
            raise DataError(f"{name}: not found under {root} (expected {hint}); {how}, "
                            "or point --root at the folder that holds it", missing=True) from None

    return wrapper


@_hinted
def train_test_in_memory(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
    """CIFAR-10/100, STL-10: their train and test splits, in memory."""
    return TransferSplits(torchvision_source(name, str(root), "train", download, expected=hint), None,
                          torchvision_source(name, str(root), "test", download, expected=hint), "")


def _torchvision(cls_name: str):
    from torchvision import datasets

    return getattr(datasets, cls_name)


def _wrap(name: str, ds, split: str) -> FileListSource:
    """A torchvision dataset's file list and labels, without decoding any image."""
    if hasattr(ds, "_samples"):  # StanfordCars
        files = [p for p, _ in ds._samples]
        labels = [int(y) for _, y in ds._samples]
    else:
        files = list(getattr(ds, "_image_files", None) or getattr(ds, "_images"))
        labels = [int(y) for y in getattr(ds, "_labels")]
    classes = list(getattr(ds, "classes", None) or [str(i) for i in range(max(labels) + 1)])
    return FileListSource(files, labels, classes, f"{name}:{split}")


def official_splits(cls_name: str, splits: tuple[str, ...]) -> TransferBuilder:
    """A torchvision dataset ``cls_name`` with its own ``splits``: (train, test) or (train, val, test)."""

    @_hinted
    def build(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
        cls = _torchvision(cls_name)
        parts = [_wrap(name, cls(str(root), split=s, download=download), s) for s in splits]
        if len(parts) == 3:
            return TransferSplits(parts[0], parts[1], parts[2], "the dataset's val split")
        return TransferSplits(parts[0], None, parts[1], "")

    return build


@_hinted
def sun397(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
    """SUN397: no official split here; half of each class for train, seeded."""
    everything = _wrap(name, _torchvision("SUN397")(str(root), download=download), "all")
    train, test = per_class_split(everything, "0.5", seed)
    return TransferSplits(train, None, test, "")


@_hinted
def caltech101(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
    """Caltech-101: 30 images per class for train, the rest test (the usual protocol), seeded."""
    ds = _torchvision("Caltech101")(str(root), target_type="category", download=download)
    base = Path(ds.root) / "101_ObjectCategories"
    files = [str(base / ds.categories[y] / f"image_{i:04d}.jpg") for y, i in zip(ds.y, ds.index)]
    everything = FileListSource(files, list(ds.y), list(ds.categories), name)
    train, test = per_class_split(everything, "30-per-class", seed)
    return TransferSplits(train, None, test, "")


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
VOC_IGNORE = -1  # a target entry that counts neither as positive nor as negative


def voc_targets(annotations: list[str] | list[Path]) -> torch.Tensor:
    """(N, 20) targets from VOC annotation XML files, as the devkit reads them.

    1: the image has a non-difficult object of the class; -1 (:data:`VOC_IGNORE`): its only objects
    of the class are marked ``<difficult>1</difficult>`` (the devkit leaves such an image out of that
    class's AP; the linear fit leaves the entry out of its loss); 0: no object of the class.
    """
    targets = torch.zeros(len(annotations), len(VOC_CLASSES))
    for i, xml in enumerate(annotations):
        for obj in ET.parse(xml).getroot().iter("object"):
            c = VOC_CLASSES.index(obj.findtext("name").strip())
            if (obj.findtext("difficult") or "0").strip() == "1":
                if targets[i, c] == 0:
                    targets[i, c] = VOC_IGNORE
            else:
                targets[i, c] = 1
    return targets


@_hinted
def voc2007(name: str, hint: str, root: Path, *, download: bool, split: str, seed: int) -> TransferSplits:
    """VOC2007 classification: trainval / test, multi-label from the object annotations (see :func:`voc_targets`:
    classes present only as difficult objects are ignored, as in the devkit); val is a fixed fifth of trainval."""
    parts = []
    for image_set in ("trainval", "test"):
        ds = _torchvision("VOCDetection")(str(root), year="2007", image_set=image_set, download=download)
        targets = voc_targets(ds.annotations)
        parts.append(FileListSource(list(ds.images), list(range(len(ds.images))), list(VOC_CLASSES),
                                    f"voc2007:{image_set}", targets=targets))
    trainval, test = parts
    # Hold out val by image (no stratification for multi-label).
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(trainval), generator=g).tolist()
    k = len(perm) // 5
    return TransferSplits(SubsetSource(trainval, sorted(perm[k:])), SubsetSource(trainval, sorted(perm[:k])), test, "")
