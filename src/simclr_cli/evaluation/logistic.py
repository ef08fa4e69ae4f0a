"""L2-regularized logistic regression on frozen features, solved with L-BFGS ([v1] App. B.8).

The regularization strength is chosen on a validation split from a log-spaced grid; the
selection function is given train and validation data only, never test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def l2_grid(kind: str) -> list[float]:
    """The paper's 45 log-spaced values in [1e-6, 1e5] (``paper``), or 12 of them, one per decade (``coarse``)."""
    n = 45 if kind == "paper" else 12
    return torch.logspace(-6, 5, n, dtype=torch.float64).tolist()


@dataclass
class LogisticModel:
    """Weights on standardized features (mean/std of the data it was fit on)."""

    weight: torch.Tensor  # (C, d)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor
    std: torch.Tensor

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *, multilabel: bool = False,
                 max_iter: int = 500, init: LogisticModel | None = None) -> LogisticModel:
    """Minimize mean cross-entropy (softmax, or per-class sigmoid when ``multilabel``) + l2/2 ||W||^2.

    ``y``: class indices (N,), or (N, C) 0/1 targets when multilabel (-1: ignored). ``init`` warm-starts the solver.
    """
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    d = xs.shape[1]
    w = (init.weight.clone() if init is not None else torch.zeros(num_classes, d)).requires_grad_()
    b = (init.bias.clone() if init is not None else torch.zeros(num_classes)).requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    target = y.float() if multilabel else y

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xs @ w.T + b
        if multilabel:
            # Entries marked -1 (VOC "difficult only") are neither positive nor negative: left out.
            loss = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), weight=(target >= 0).float(),
                                                      reduction="sum") / len(xs)
        else:
            loss = F.cross_entropy(logits, target)
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(w.detach(), b.detach(), mean, std)


def select_l2(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    grid: list[float],
    metric: Callable[[torch.Tensor, torch.Tensor], float],
    *,
    multilabel: bool = False,
    max_iter: int = 500,
) -> tuple[float, list[tuple[float, float]]]:
    """Fit on ``train`` for each strength (strongest first, warm-started) and score on ``val``.

    Returns the best strength (ties go to the stronger regularization) and every (l2, val score).
    """
    scores: list[tuple[float, float]] = []
    model = None
    for l2 in sorted(grid, reverse=True):
        model = fit_logistic(*train, num_classes, l2, multilabel=multilabel, max_iter=max_iter, init=model)
        scores.append((l2, metric(model.scores(val[0]), val[1])))
    best = max(scores, key=lambda s: s[1])[0]  # max keeps the first maximum: the strongest l2
    return best, scores
