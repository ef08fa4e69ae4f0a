"""Task modules: an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., ...}``.

The loop knows nothing else about a stage; a task holds the model and the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclr_cli.losses.contrastive import contrastive_loss


class ContrastiveTask(nn.Module):
    """SimCLR pretraining: both views through f and g in one pass (BN sees all 2n), then the contrastive loss.

    ``forward`` returns ``loss`` and ``z_std`` (the std of normalized z across the
    batch, averaged over dims: about 1/sqrt(d) when healthy, 0 on collapse).
    """

    def __init__(self, model: nn.Module, loss: str, temperature: float, margin: float) -> None:
        super().__init__()
        self.model = model
        self.loss_name = loss
        self.temperature = temperature
        self.margin = margin

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["view1"], batch["view2"]], dim=0)
        _, z = self.model(x)
        z1, z2 = z.chunk(2, dim=0)
        loss = contrastive_loss(self.loss_name, z1, z2, temperature=self.temperature, margin=self.margin)
        with torch.no_grad():
            z_std = F.normalize(z.float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}
