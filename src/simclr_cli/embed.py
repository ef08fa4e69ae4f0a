"""h, the encoder's features, out of a finished run: ``simclr embed`` (a dataset to ``.npy`` with a CSV of
file paths and labels) and the 2-D map of ``simclr plot --embedding`` (paper Fig. B.4).

Like a stage, this reads a checkpoint and the recipe stored in it (:mod:`simclr_cli.stages.common`); it
writes nothing a later stage reads.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch

from simclr_cli import plots
from simclr_cli.data.listing.lists import read_file_list
from simclr_cli.data.pipeline.loaders import UNREADABLE, build_source
from simclr_cli.data.shards.format import INDEX as SHARD_INDEX, MANIFEST as SHARD_MANIFEST
from simclr_cli.data.shards.reader import ShardSource
from simclr_cli.data.sources.builders import folder_source
from simclr_cli.data.sources.images import FileListSource
from simclr_cli.data.sources.registry import DATASETS
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.errors import DataError, UsageError, from_os_error
from simclr_cli.evaluation.linear import predict
from simclr_cli.stages import common
from simclr_cli.utils import check_out_folder

if TYPE_CHECKING:
    from simclr_cli.data.sources.images import ImageSource


class Embedding(NamedTuple):
    """What :func:`embed` wrote."""

    path: Path  # the .npy, float32 (N, D)
    table: Path  # the .csv beside it: row, path, label, class, unreadable (1: the row of h is NaN)
    shape: tuple[int, ...]  # (N, D)


def embed(source: str | Path | None, data: str | None = None, out: str | Path | None = None,
          overwrite: bool = False, *, say: Callable[..., None] = print) -> Embedding:
    """Write h of every image of ``data`` to a ``.npy`` (float32, N x D), and a ``.csv`` beside it.

    Args:
        source: a run directory or run name (its pretrain encoder), or a checkpoint (pretrain, finetune or
            distill); None: the newest run's pretrain encoder, like every command that reads an encoder.
        data: a split of the run's dataset (``val``, ``train``), a folder of images (class folders or flat), a
            ``.txt``/``.csv`` list of image paths, or a pack folder of ``simclr data pack``; None: the recipe's
            training split (the images the encoder learnt from), said through ``say``.
        out: the ``.npy`` to write, or a folder for ``<data>.npy``; default ``RUN/embed/<data>.npy``.
        overwrite: replace an existing ``.npy`` and ``.csv``.
        say: where to report the run picked when ``source`` is None.

    Raises:
        DataError: ``data`` is neither a folder nor a split of the run's dataset.
        UsageError: the output exists (without ``overwrite``) or cannot be written.
    """
    src = common.find_checkpoint(source, ("pretrain",) if source is None else ("pretrain", "finetune", "distill"),
                             say=say)
    recipe = common.inherit_recipe(src, None, [])
    if data is None:
        data = recipe.data.train_split
        say(f"embedding the '{data}' split (data.train_split, the images the encoder was trained on); "
            f"pass --data {recipe.data.val_split or 'val'} for the held-out split, or --data FOLDER for your own images")
    tag, build = _images_of(data, recipe)
    target = _embed_target(out, src.run_dir, tag)
    table = target.with_suffix(".csv")
    existing = [p for p in (target, table) if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite to replace it, or --out to write elsewhere")
    check_out_folder(target.parent)
    source_images = build()
    accelerator = make_accelerator("no")
    encoder = common.load_encoder(src, recipe, "pretrained").backbone.to(accelerator.device)
    # split across processes under torchrun / accelerate launch; every process gets h, the main one writes it
    feats, labels = predict(encoder, common.eval_loader(source_images, None, recipe, accelerator, mark_unreadable=True),
                            accelerator.device)
    if accelerator.is_main_process:
        _write_embedding(feats, labels == UNREADABLE, source_images, target, table)
    return Embedding(target, table, tuple(feats.shape))


def _images_of(data: str, recipe) -> tuple[str, Callable[[], ImageSource]]:
    """What ``--data`` names: its tag (the output's name) and how to build its images, not built yet (the output
    is checked first). A pack folder, a folder of images, a ``.txt``/``.csv`` list, else a split of the recipe's
    dataset.

    Raises:
        DataError: ``data`` is a path that does not exist, or not a split of a dataset with fixed splits.
    """
    folder = Path(data).expanduser()
    if folder.is_dir() and ((folder / SHARD_INDEX).is_file() or (folder / SHARD_MANIFEST).is_file()):
        return folder.resolve().name or "root", lambda: ShardSource(folder)
    if folder.is_dir():
        return folder.resolve().name or "root", lambda: folder_source(folder)
    if folder.is_file() and folder.suffix.lower() in (".txt", ".csv"):
        return folder.stem, lambda: FileListSource.of(read_file_list(folder))
    cfg = recipe.data
    entry = DATASETS.get(cfg.dataset)
    if entry is not None and entry.one_set:  # one set of images: only the training set itself is a split
        splits = [cfg.train_split]
    else:
        splits = [s for s in dict.fromkeys(("train", cfg.train_split, "val", cfg.val_split)) if s]
    fixed = cfg.dataset == "synthetic" or (entry is not None and (entry.one_set or bool(entry.splits)))
    if _looks_like_path(data) or (fixed and data not in splits):
        raise DataError(f"--data {data}: no such folder, and not a split of the run's {cfg.dataset} dataset; "
                        f"pass a split (e.g. {', '.join(splits)}), an existing folder of images, a .txt/.csv list of "
                        "image paths, or a pack folder (simclr data pack)", missing=True)
    return data, lambda: build_source(cfg, data, recipe.seed)


def _write_embedding(feats: torch.Tensor, unreadable: torch.Tensor, images: ImageSource, target: Path,
                     table: Path) -> None:
    """``target`` (h, float32 (N, D); NaN rows for ``unreadable`` images, with a warning) and the ``table`` CSV
    beside it (row, path, label, class, unreadable).

    Raises:
        SimclrError: the disk is full or read-only (:func:`~simclr_cli.errors.from_os_error`, naming the file).
    """
    feats[unreadable] = float("nan")  # never another image's h under this image's name
    if unreadable.any():
        first = images.describe(int(unreadable.nonzero()[0]))
        print(f"warning: {int(unreadable.sum())} unreadable image(s) (first: {first}): their rows are NaN in "
              f"{target.name} and marked unreadable in {table.name}", file=sys.stderr)
    writing = target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, feats.numpy().astype(np.float32))
        writing = table
        # File names that are not valid UTF-8 are written back as the bytes they are (surrogateescape).
        with table.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow(["row", "path", "label", "class", "unreadable"])
            for i, bad in enumerate(unreadable.tolist()):
                y = int(images.labels[i])
                name = images.classes[y] if 0 <= y < len(images.classes) else ""
                w.writerow([i, images.describe(i), y, name, int(bad)])
    except OSError as e:  # disk full, read-only: name the file
        err = from_os_error(e, writing)
        if err is None:
            raise
        raise err from e


def embedding_map(src: common.CheckpointRef, method: str = "auto", max_points: int = 2000) -> Path:
    """``RUN/plots/embedding_<method>.png``: h of a seeded sample of the labeled val split, projected to 2-D
    (:func:`simclr_cli.plots.projection`, with its axis labels) and coloured by label (paper Fig. B.4).

    Args:
        src: the run's pretrain checkpoint (:func:`simclr_cli.stages.common.find_checkpoint`).
        method: ``pca``, ``tsne``, or ``auto``: t-SNE up to ``plots.TSNE_AUTO_MAX`` images, PCA above.
        max_points: images in the sample (seeded by the recipe's seed).
    """
    recipe = common.inherit_recipe(src, None, [])
    splits = common.labeled_splits(recipe)
    g = torch.Generator().manual_seed(recipe.seed)
    idx = sorted(torch.randperm(len(splits.test), generator=g)[:max_points].tolist())
    if method == "auto":
        method = "tsne" if len(idx) <= plots.TSNE_AUTO_MAX else "pca"
    accelerator = make_accelerator("no")
    encoder = common.load_encoder(src, recipe, "pretrained").backbone.to(accelerator.device)
    feats, labels = predict(encoder, common.eval_loader(splits.test, idx, recipe, accelerator), accelerator.device)
    coords, axis_labels = plots.projection(feats, method, recipe.seed)
    return plots.plot_embedding(coords, labels, splits.classes, src.run_dir / "plots" / f"embedding_{method}.png",
                                f"{src.run_dir.name}: h on {recipe.data.val_split} ({method}, {len(idx)} images)",
                                axis_labels)


def _looks_like_path(text: str) -> bool:
    """A ``--data`` value meant as a folder rather than a split name (``./x``, ``~/x``, ``a/b``, ``/x``)."""
    return text.startswith((".", "~")) or "/" in text or os.sep in text or Path(text).is_absolute()


def _embed_target(out: str | Path | None, run_dir: Path, tag: str) -> Path:
    """Where ``embed`` writes: RUN/embed/<tag>.npy, inside ``out`` when it is a folder, else ``out``
    with ``.npy`` added when missing (what numpy would write anyway)."""
    if out is None:
        return run_dir / "embed" / f"{tag}.npy"
    target = Path(out).expanduser()
    if target.is_dir():
        return target / f"{tag}.npy"
    return target if target.suffix == ".npy" else target.with_name(target.name + ".npy")
