"""LARS (You et al., 2017) as used by SimCLR ([ref] lars_optimizer.py).

For a parameter w with gradient g, in a group with ``lars=True``:

    g' = g + wd * w
    trust = eta * ||w|| / ||g'||   (1 if either norm is 0)
    v = momentum * v + lr * trust * g'
    w = w - v

Groups with ``lars=False`` (biases and BN, SIMCLR.md section 2) skip both the
trust ratio and weight decay: plain momentum SGD.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """LARS with momentum; per-group ``lars`` flag excludes a group from adaptation and weight decay.

    Args:
        params: parameters or groups (a group may set ``lars`` and ``weight_decay``).
        lr: learning rate.
        momentum: heavy-ball momentum (0.9 in the paper).
        weight_decay: L2 weight decay folded into the gradient before the trust ratio.
        trust_coefficient: eta (1e-3 in the paper).
        nesterov: Nesterov momentum.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        nesterov=nesterov, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars"]:
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad, alpha=group["lr"])
                if group["nesterov"]:
                    p.sub_(buf * group["momentum"] + grad * group["lr"])
                else:
                    p.sub_(buf)
        return loss
