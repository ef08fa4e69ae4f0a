"""Weighted kNN classification on L2-normalized features (InstDisc protocol, SIMCLR.md section 3)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], ContextManager] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` in eval mode over ``batches`` (dicts with ``image`` and ``label``).

    Returns:
        (features (N, d) float32 on CPU, L2-normalized; labels (N,) int64). The
        encoder's train/eval mode is restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for batch in batches:
            with autocast():
                h = encoder(batch["image"].to(device, non_blocking=True))
            feats.append(F.normalize(h.float(), dim=1).cpu())
            labels.append(torch.as_tensor(batch["label"]))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (M, C): for each test feature, sum over its k nearest train features
    (cosine similarity) of exp(sim / temperature), per class. Features must be L2-normalized."""
    k = min(k, train_features.shape[0])
    out = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start : start + chunk] @ train_features.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        one_hot = F.one_hot(train_labels[top_idx], num_classes).float()  # (m, k, C)
        out.append((weights.unsqueeze(-1) * one_hot).sum(1))
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k larger than the number of classes counts as all)."""
    result = {}
    order = scores.argsort(dim=1, descending=True)
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (order[:, :k_eff] == labels.unsqueeze(1)).any(1)
        result[k] = 100.0 * hit.float().mean().item()
    return result


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.1) -> float:
    """Weighted kNN top-1 accuracy in percent."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels, (1,))[1]
