"""SimCLR ([v1] section 2): NT-Xent between the two views, negatives from the whole global batch.

``pretrain.loss`` picks NT-Xent (the paper's) or the Table 4 alternatives, NT-Logistic and margin triplet.
"""

from __future__ import annotations

import torch

from simclr_cli.losses.contrastive import contrastive_loss
from simclr_cli.objectives.base import Objective, register
from simclr_cli.recipe.schema import PretrainConfig


@register
class SimCLR(Objective):
    name = "simclr"

    def __init__(self, loss: str = "nt_xent", temperature: float = 0.1, margin: float = 0.5,
                 collapse_warn: float = 0.1) -> None:
        super().__init__(collapse_warn=collapse_warn)
        self.loss_name, self.temperature, self.margin = loss, temperature, margin

    @classmethod
    def from_recipe(cls, cfg: PretrainConfig) -> "SimCLR":
        return cls(cfg.loss, cfg.temperature, cfg.margin, cfg.collapse_warn)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return contrastive_loss(self.loss_name, z1, z2, temperature=self.temperature, margin=self.margin)
