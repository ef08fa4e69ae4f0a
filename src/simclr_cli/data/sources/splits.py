"""Class-stratified, seeded splits of one source: a held-out validation fraction, or train/test for an image
folder that comes without a split ('N-per-class', the Caltech-101 protocol, or a train fraction)."""

from __future__ import annotations

from collections import defaultdict

import torch

from simclr_cli.data.sources.images import ImageSource, SubsetSource
from simclr_cli.errors import UsageError
from simclr_cli.utils import mix_seed


def stratified_split(source: ImageSource, fraction: float, seed: int) -> tuple[SubsetSource, SubsetSource]:
    """(train, held-out) with ``fraction`` of every class held out (at least one where a class has two)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(source.labels):
        by_class[y].append(i)
    rest, held = [], []
    for c, members in sorted(by_class.items()):
        g = torch.Generator().manual_seed(mix_seed(seed, "val", c))
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        k = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held += order[:k]
        rest += order[k:]
    if not held or not rest:
        raise UsageError(f"{source.name}: too few images to hold out a validation split")
    return SubsetSource(source, sorted(rest)), SubsetSource(source, sorted(held))


def per_class_split(source: ImageSource, spec: str, seed: int) -> tuple[SubsetSource, SubsetSource]:
    """Train/test for a folder with no split: 'N-per-class' train (the rest test) or a train fraction."""
    spec = spec.strip()
    if spec.endswith("-per-class") and spec.split("-")[0].isdigit():
        n = int(spec.split("-")[0])
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(source.labels):
            by_class[y].append(i)
        train, test = [], []
        for c, members in sorted(by_class.items()):
            g = torch.Generator().manual_seed(mix_seed(seed, "split", c))
            order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            take = min(n, len(members) - 1)  # always keep at least one test image per class
            train += order[:take]
            test += order[take:]
        return SubsetSource(source, sorted(train)), SubsetSource(source, sorted(test))
    try:
        frac = float(spec)
    except ValueError:
        raise UsageError(f"transfer.split '{spec}': expected 'N-per-class' or a train fraction such as 0.8") from None
    if not 0 < frac < 1:
        raise UsageError(f"transfer.split '{spec}': a train fraction must be in (0, 1)")
    test, train = stratified_split(source, 1 - frac, seed)[::-1]
    return train, test
