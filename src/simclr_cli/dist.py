"""Autograd-aware collectives: all_gather for negatives from every process (SIMCLR.md section 2), and all_reduce for global BN.

Backward sums the gradient each process computed for the gathered tensor and
returns this process's slice. With the per-rank losses averaged by DDP's
gradient all-reduce, that gives exactly the single-process gradient. Uses
all_reduce (not reduce_scatter) so it also works on gloo/CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank = rank()
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) from all processes in rank order -> (n * world, ...), keeping gradients.

    Every process must pass the same n. With one process it returns ``x``.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes; the gradient of each copy is the sum of all processes' gradients."""
    if world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) from all processes in rank order, without gradients (labels, indices)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
