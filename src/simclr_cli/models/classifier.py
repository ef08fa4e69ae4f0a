"""Classifiers on top of the encoder: f, then the first K projection-head layers, then a linear layer.

Saved as ``backbone.*`` and ``head.*``, where ``head`` is ``nn.Sequential(*kept_layers, linear)``,
so every stage after pretraining writes checkpoints of the same shape.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def out_features(backbone: nn.Module, layers: Sequence[nn.Module]) -> int:
    """Width of ``layers(backbone(x))``: the last Linear's output, or the backbone's features."""
    dim = backbone.num_features
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                dim = m.out_features
    return dim


class FeatureEncoder(nn.Module):
    """x -> h, or x -> the output of the first K projection-head layers (shares the modules it is given)."""

    def __init__(self, backbone: nn.Module, layers: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = nn.Sequential(*layers)
        self.num_features = out_features(backbone, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.backbone(x))


class Classifier(nn.Module):
    """``head[-1](head[:-1](backbone(x)))``: logits over ``num_classes``.

    Args:
        backbone: the encoder f.
        layers: projection-head layers kept under the classifier (SimCLRv2 fine-tunes from the first).
        num_classes: width of the linear layer.
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[nn.Module], num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = out_features(backbone, layers)
        self.head = nn.Sequential(*layers, nn.Linear(dim, num_classes))
        self.num_features = dim
        self.num_classes = num_classes

    @property
    def linear(self) -> nn.Linear:
        return self.head[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the linear layer sees: h, then the kept head layers (no module is built per call)."""
        h = self.backbone(x)
        for layer in list(self.head)[:-1]:
            h = layer(h)
        return h

    def encoder(self) -> FeatureEncoder:
        """The part below the linear layer, sharing this model's modules."""
        return FeatureEncoder(self.backbone, list(self.head)[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
