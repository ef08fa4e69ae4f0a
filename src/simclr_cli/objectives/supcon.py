"""Supervised contrastive learning (SupCon; Khosla et al., NeurIPS 2020, eq. 2, "L_out").

SimCLR's loss with the positives of an anchor widened from its other view to every view of its
class: for each of the 2N views i, with P(i) the other views of i's class (its own other view
included) and A(i) every view but i,

    l_i = -1/|P(i)| sum_{p in P(i)} log[ exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) ],

and the loss is the mean over all 2N anchors. With every label distinct it is NT-Xent. Labels
are gathered from every process like the projections, so 1 or K processes give the same loss.
It needs labeled training data: ``pretrain.objective = "supcon"`` on an image folder with class
folders (or CIFAR/STL-10's labeled splits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simclr_cli.dist import gather
from simclr_cli.errors import DataError
from simclr_cli.losses.contrastive import full_precision, similarities
from simclr_cli.objectives.base import Objective, register
from simclr_cli.recipe.schema import PretrainConfig, option


@full_precision
def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon on (n, d) projections of two views of this process's n images with (n,) labels.

    Returns this process's share: the mean over its 2n anchors (averaged over processes, the global loss).
    """
    sim, self_col, _ = similarities(z1, z2)
    rows = torch.arange(sim.shape[0], device=sim.device)
    all_labels = gather(labels)
    row_labels = torch.cat([labels, labels])
    col_labels = torch.cat([all_labels, all_labels])
    logits = sim / temperature
    logits[rows, self_col] = float("-inf")
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = row_labels[:, None] == col_labels[None, :]
    positive[rows, self_col] = False
    # every anchor has at least its own other view as a positive
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


@dataclass(frozen=True)
class SupConOptions:
    """``[pretrain.supcon]``: the SupCon objective's options (read when ``pretrain.objective = "supcon"``)."""

    temperature: float = option(0.1, "temperature tau of the SupCon loss",
                                check=("a number > 0", lambda v: 0 < v < float("inf")))


@register
class SupCon(Objective):
    name = "supcon"
    needs_labels = True
    Options = SupConOptions
    supports_grad_cache = True

    def __init__(self, options: SupConOptions | None = None, pretrain: PretrainConfig | None = None) -> None:
        options = options if options is not None else SupConOptions()
        super().__init__(options, pretrain)
        self.temperature = options.temperature

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None or bool((labels < 0).any()):
            raise DataError("pretrain.objective='supcon' needs a label for every training image; this batch has "
                            "unlabeled images. Use labeled data (class folders) or pretrain.objective='simclr'",
                            missing=True)
        return supcon_loss(z1, z2, labels, self.temperature)
