"""Transfer datasets ([v1] App. B.8): any dataset of the registry (:mod:`simclr_cli.data.sources.registry`) with a
transfer builder, the 12 built-in ones and image folders in three layouts. Each gives train / val / test
sources, the class names and the paper's metric.

Validation: a dataset's own val split where it has one, else a stratified, seeded
``val_fraction`` of train. Test is only ever read for the final number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from simclr_cli.data.sources.images import ImageSource, align_classes
from simclr_cli.data.sources.registry import transfer_dataset
from simclr_cli.data.sources.splits import stratified_split


class ConcatSource:
    """Two sources one after the other (train + val for the final fit)."""

    def __init__(self, a: ImageSource, b: ImageSource) -> None:
        self.parts = (a, b)
        self.name = f"{a.name}+{b.name}"
        self.classes = a.classes
        self.labels = list(a.labels) + list(b.labels)

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def _where(self, index: int) -> tuple[ImageSource, int]:
        n = len(self.parts[0])
        return (self.parts[0], index) if index < n else (self.parts[1], index - n)

    def load(self, index: int) -> torch.Tensor:
        src, i = self._where(index)
        return src.load(i)

    def describe(self, index: int) -> str:
        src, i = self._where(index)
        return src.describe(i)


def label_targets(source: ImageSource, labels: torch.Tensor) -> torch.Tensor:
    """Labels as the metric needs them: class indices, or the multi-hot rows for a multi-label source."""
    root = source
    while getattr(root, "targets", None) is None and hasattr(root, "source"):
        root = root.source
    targets = getattr(root, "targets", None)
    return targets[labels] if targets is not None else labels


@dataclass
class TransferData:
    """One transfer dataset, split three ways."""

    name: str
    train: ImageSource
    val: ImageSource
    test: ImageSource
    classes: list[str]
    metric: str  # "top1" | "mean_per_class" | "map11"
    val_note: str  # where val came from

    @property
    def multilabel(self) -> bool:
        return self.metric == "map11"


def load_transfer(name: str, root: str, *, download: bool = False, val_fraction: float = 0.2, split: str = "30-per-class",
                  seed: int = 0) -> TransferData:
    """Build ``name`` (a dataset of the registry, or ``imagefolder:PATH``)."""
    entry, path = transfer_dataset(name)
    train, val, test, note = entry.build_transfer(Path(path if path is not None else root).expanduser(),
                                                  download=download, split=split, seed=seed)
    if val is None:
        train, val = stratified_split(train, val_fraction, seed)
        note = f"{val_fraction:g} of train, stratified"
    _align(train, val)
    _align(train, test)
    return TransferData(name, train, val, test, list(train.classes), entry.metric, note)


def _align(reference: ImageSource, other: ImageSource) -> None:
    if getattr(other, "targets", None) is not None:
        return
    align_classes(reference, other)
