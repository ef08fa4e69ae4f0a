"""Top-k accuracy on hand-made logits; the cached linear fit."""

import pytest
import torch

from simclr_cli.evaluation.knn import topk_accuracy
from simclr_cli.evaluation.linear import fit_linear


def test_topk_on_hand_made_logits():
    scores = torch.tensor([
        [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # label 0: top-1 hit
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],         # label 1: rank 5 -> top-5 hit only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],         # label 0: rank 6 -> miss
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],         # label 2: top-1 hit
    ])
    labels = torch.tensor([0, 1, 0, 2])
    acc = topk_accuracy(scores, labels, (1, 5))
    assert acc[1] == pytest.approx(50.0)  # rows 0 and 3
    assert acc[5] == pytest.approx(75.0)  # rows 0, 1, 3
    # k above the number of classes counts everything
    assert topk_accuracy(scores[:, :3], torch.tensor([2, 1, 0, 1]), (5,))[5] == 100.0


def test_fit_linear_separates_and_folds_standardization():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g) + 50.0  # a large offset the folding must handle
    layer = fit_linear(x, y, 4, epochs=20, batch_size=64, lr=0.1, seed=0)
    acc = (layer(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    again = fit_linear(x, y, 4, epochs=20, batch_size=64, lr=0.1, seed=0)
    assert torch.equal(layer.weight, again.weight)  # deterministic from the seed
