"""SimCLR ([v1] section 2): NT-Xent between the two views, negatives from the whole global batch.

Options, ``[pretrain.simclr]``: ``loss`` picks NT-Xent (the paper's) or the Table 4 alternatives,
NT-Logistic and margin triplet; ``memory_size`` > 0 adds SimCLRv2's memory ([v2] section 2, after
MoCo, He et al. 2020): a momentum copy of encoder and projection head, updated after every optimizer
step, whose projections of past batches are kept in a queue of ``memory_size`` and used as extra
negatives. The queue is filled with the momentum projections of the whole global batch (gathered
from every process, in process order), so 1 and K processes see the same queue; queue, pointer and
momentum weights are buffers of the objective, so they are in the resume state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simclr_cli.dist import gather
from simclr_cli.errors import RecipeError
from simclr_cli.losses.contrastive import contrastive_loss, nt_xent_with_memory
from simclr_cli.objectives.base import Objective, register
from simclr_cli.recipe.schema import LossName, PretrainConfig, option


@dataclass(frozen=True)
class SimCLROptions:
    """``[pretrain.simclr]``: the SimCLR objective's options (read when ``pretrain.objective = "simclr"``)."""

    loss: LossName = option("nt_xent", "nt_xent | nt_logistic | margin_triplet (paper Table 4)")
    temperature: float = option(0.1, "temperature tau of the contrastive loss",
                                check=("a number > 0", lambda v: 0 < v < float("inf")))
    margin: float = option(0.5, "margin for margin_triplet", check=("a number >= 0", lambda v: v >= 0))
    memory_size: int = option(0, "SimCLRv2 memory ([v2] section 2): keep the momentum encoder's projections of "
                                 "this many past views as extra negatives (the paper: 65536 on ImageNet); 0 off. "
                                 "Needs loss='nt_xent'; not with the gradient cache",
                              check=("an integer >= 0", lambda v: v >= 0))
    memory_momentum: float = option(0.999, "with memory_size > 0: the momentum encoder's weights become "
                                           "m x theirs + (1 - m) x the encoder's after every step (MoCo's m)",
                                    check=("a number in [0, 1]", lambda v: 0 <= v <= 1))


@register
class SimCLR(Objective):
    name = "simclr"
    Options = SimCLROptions

    def __init__(self, options: SimCLROptions | None = None, pretrain: PretrainConfig | None = None) -> None:
        options = options if options is not None else SimCLROptions()
        super().__init__(options, pretrain)
        self.loss_name, self.temperature, self.margin = options.loss, options.temperature, options.margin
        self.memory_size, self.memory_momentum = options.memory_size, options.memory_momentum
        if self.memory_size and self.loss_name != "nt_xent":
            raise RecipeError(f"pretrain.simclr.memory_size={self.memory_size} needs pretrain.simclr.loss='nt_xent' "
                              f"(got '{self.loss_name}'); set memory_size=0 or loss='nt_xent'")
        self.momentum_model: nn.Module | None = None
        self._online: list[nn.Module] = []  # the trained model, not a submodule (the task owns it)
        self._pending: torch.Tensor | None = None  # this step's momentum projections, queued by after_step

    @property
    def supports_grad_cache(self) -> bool:  # the memory runs the momentum encoder on the views itself
        return self.memory_size == 0

    def grad_cache_refusal(self) -> str:
        return (f"pretrain.simclr.memory_size={self.memory_size}: the memory runs the momentum encoder on the views "
                "itself, which the gradient cache does not support")

    def build(self, model: nn.Module) -> None:
        if not self.memory_size:
            return
        self._online = [model]
        self.momentum_model = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("queue", torch.zeros(self.memory_size, self.projection_dim(model)))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the next row to write
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # projections queued so far

    def memory(self) -> torch.Tensor:
        """The queued momentum projections, oldest first (at most ``memory_size`` rows)."""
        if self.queue_count.item() < self.memory_size:
            return self.queue[: self.queue_count.item()]
        return torch.roll(self.queue, -int(self.queue_ptr.item()), dims=0)

    def forward(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.memory_size:
            return super().forward(model, x1, x2, batch)
        x = torch.cat([x1, x2], dim=0)
        _, z = model(x)
        z1, z2 = z.chunk(2, dim=0)
        with torch.no_grad():
            _, k = self.momentum_model(x)
            k1, k2 = F.normalize(k.float(), dim=1).chunk(2, dim=0)
            self._pending = torch.cat([gather(k1), gather(k2)])
        filled = min(int(self.queue_count.item()), self.memory_size)
        loss = nt_xent_with_memory(z1, z2, self.queue[:filled], self.temperature)  # order does not matter
        return {"loss": loss, **self.metrics(z)}

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return contrastive_loss(self.loss_name, z1, z2, temperature=self.temperature, margin=self.margin)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The momentum update of encoder and head, then this step's momentum projections into the queue."""
        if not self.memory_size:
            return
        m = self.memory_momentum
        for mp, p in zip(self.momentum_model.parameters(), self._online[0].parameters()):
            mp.mul_(m).add_(p.detach(), alpha=1 - m)
        keys, self._pending = self._pending, None
        if keys is None:
            return
        keys = keys[-self.memory_size:]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.memory_size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.memory_size)
        self.queue_count.add_(keys.shape[0])
