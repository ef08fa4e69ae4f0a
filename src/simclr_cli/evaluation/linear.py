"""Linear classifiers on cached features, and classifier evaluation."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from simclr_cli.evaluation.sharded import run_model
from simclr_cli.utils import mix_seed


def predict(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], ContextManager] = nullcontext,
    *,
    everywhere: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Outputs of ``model`` in eval mode over ``batches`` (dicts with ``image`` and ``label``), as
    float32 on CPU in dataset order, with the labels; split across processes when ``batches`` is sharded
    (:func:`simclr_cli.evaluation.sharded.run_model`). Unlike ``extract_features`` nothing is normalized.
    None on processes other than rank 0 when ``everywhere`` is False."""
    return run_model(model, batches, device, autocast, everywhere=everywhere)


def fit_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_epoch: Callable[..., None] | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Linear:
    """Fit a linear classifier on fixed features: Nesterov SGD, cosine decay per step, lr scaled by B/256.

    Features are standardized (train mean and std) for the fit, and the standardization
    is folded into the returned layer, so it applies to raw features.

    Args:
        on_epoch: called with (epoch, mean loss, lr) after each epoch, and the top-1 (%) on ``test`` as a
            fourth argument when ``test`` (features, labels) is given.
    """
    x = features.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    n, d = xs.shape
    layer = nn.Linear(d, num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    batch_size = min(batch_size, n)
    peak = lr * batch_size / 256
    opt = torch.optim.SGD(layer.parameters(), lr=peak, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    total = epochs * math.ceil(n / batch_size)
    g = torch.Generator().manual_seed(mix_seed(seed, "linear"))
    step = 0
    for epoch in range(epochs):
        loss_sum, step = _sgd_epoch(layer, opt, xs, labels, torch.randperm(n, generator=g), batch_size, peak, step,
                                    total)
        if on_epoch is not None and test is not None:
            with torch.no_grad():
                top1 = 100.0 * float((layer((test[0].float() - mean) / std).argmax(1) == test[1]).float().mean())
            on_epoch(epoch + 1, loss_sum / n, opt.param_groups[0]["lr"], top1)
        elif on_epoch is not None:
            on_epoch(epoch + 1, loss_sum / n, opt.param_groups[0]["lr"])
    return _fold_standardization(layer, mean, std)


def _sgd_epoch(layer: nn.Linear, opt: torch.optim.Optimizer, xs: torch.Tensor, labels: torch.Tensor,
               perm: torch.Tensor, batch_size: int, peak: float, step: int, total: int) -> tuple[float, int]:
    """One epoch over ``xs`` in the order ``perm``, the lr cosine-decayed per step from ``peak`` over ``total``
    steps; returns (the summed loss over its examples, the step after it)."""
    loss_sum = 0.0
    for start in range(0, len(xs), batch_size):
        idx = perm[start : start + batch_size]
        for group in opt.param_groups:
            group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(layer(xs[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        step += 1
    return loss_sum, step


def _fold_standardization(layer: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """``layer`` on standardized features ((x - mean) / std) as one layer on raw features x."""
    folded = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        folded.weight.copy_(layer.weight / std)
        folded.bias.copy_(layer.bias - (layer.weight / std) @ mean)
    return folded
