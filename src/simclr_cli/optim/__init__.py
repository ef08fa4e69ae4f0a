"""Optimizers: LARS, parameter groups, lr scaling and warmup+cosine schedules."""

from __future__ import annotations

import torch
from torch import nn

from simclr_cli.optim.lars import LARS
from simclr_cli.optim.schedule import scaled_lr, warmup_cosine


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups chosen by shape: weights (ndim >= 2) get weight decay and LARS adaptation;
    biases and norm parameters (ndim <= 1) get neither (SIMCLR.md section 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    trust_coefficient: float = 1e-3,
) -> torch.optim.Optimizer:
    """``lars`` | ``sgd`` | ``adamw`` over :func:`param_groups`. ``lr`` is the peak (already scaled) rate."""
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient, nesterov=nesterov)
    for g in groups:
        g.pop("lars")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


__all__ = ["LARS", "build_optimizer", "param_groups", "scaled_lr", "warmup_cosine"]
