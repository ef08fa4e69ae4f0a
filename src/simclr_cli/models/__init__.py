"""Models: timm backbones (with the CIFAR stem), projection heads, and the SimCLR encoder."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from simclr_cli.models.backbone import apply_cifar_stem, create_backbone
from simclr_cli.models.heads import projection_head
from simclr_cli.recipe.schema import ModelConfig


class SimCLRModel(nn.Module):
    """f and g together: ``forward(x)`` returns ``(h, z)`` with h (B, d) and z (B, proj_dim)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.head(h)


def build_simclr_model(cfg: ModelConfig, head: Callable[[int, ModelConfig], nn.Module] | None = None, *,
                       image_size: int | None = None) -> SimCLRModel:
    """The encoder the ``[model]`` section describes, with the projection head ``head(h width, cfg)``
    builds (an objective's :meth:`~simclr_cli.objectives.Objective.head`; default: ``model.proj_*``).
    ``image_size`` (``data.image_size``): a fixed-input-size backbone is built for it, or refused (exit 2)
    (:func:`~simclr_cli.models.backbone.create_backbone`)."""
    backbone = create_backbone(cfg.backbone, cifar_stem=cfg.cifar_stem, pretrained=cfg.pretrained,
                               image_size=image_size)
    if cfg.proj_layers not in (0, 1, 2, 3):
        from simclr_cli.errors import UsageError

        raise UsageError(f"model.proj_layers must be 0, 1, 2 or 3, got {cfg.proj_layers}")
    if head is None:
        return SimCLRModel(backbone, projection_head(backbone.num_features, cfg.proj_layers, cfg.proj_hidden_dim,
                                                     cfg.proj_dim))
    return SimCLRModel(backbone, head(backbone.num_features, cfg))


__all__ = ["SimCLRModel", "apply_cifar_stem", "build_simclr_model", "create_backbone", "projection_head"]
