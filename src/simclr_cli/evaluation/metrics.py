"""Transfer metrics as in the paper: top-1, mean per-class accuracy, and VOC2007 11-point mAP."""

from __future__ import annotations

import torch


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def mean_per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present in ``labels`` of each class's top-1 accuracy, in percent."""
    pred = scores.argmax(1)
    accs = [(pred[labels == c] == c).float().mean().item() for c in labels.unique().tolist()]
    return 100.0 * sum(accs) / len(accs)


def average_precision_11point(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """PASCAL VOC2007 AP of one class: the mean over recall thresholds 0, 0.1, ..., 1 of the highest
    precision reached at a recall at least that high (0 where none is)."""
    order = scores.argsort(descending=True)
    hits = positives[order].float()
    tp = hits.cumsum(0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float32)
    recall = tp / max(hits.sum().item(), 1.0)
    total = 0.0
    for t in torch.linspace(0, 1, 11).tolist():
        reached = precision[recall >= t - 1e-12]
        total += reached.max().item() if len(reached) else 0.0
    return total / 11


def map_11point(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes with at least one positive of the 11-point AP, in percent.

    ``targets``: (N, C) with 1 positive, 0 negative and any negative value (-1) "ignore": as in the
    VOC devkit, an image whose only objects of class c are difficult is left out of c's AP.
    """
    aps = []
    for c in range(targets.shape[1]):
        keep = targets[:, c] >= 0
        positives = targets[keep, c] > 0
        if positives.any():
            aps.append(average_precision_11point(scores[keep, c], positives))
    return 100.0 * sum(aps) / len(aps)


def score(metric: str, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """``metric`` is 'top1', 'mean_per_class' or 'map11' (labels are then the (N, C) targets: 1, 0, or -1 to ignore)."""
    if metric == "top1":
        return top1(scores, labels)
    if metric == "mean_per_class":
        return mean_per_class_accuracy(scores, labels)
    if metric == "map11":
        return map_11point(scores, labels)
    raise ValueError(f"unknown metric {metric!r}")
