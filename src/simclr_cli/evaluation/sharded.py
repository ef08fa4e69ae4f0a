"""Evaluation split across processes: each process runs its share of the batches, and the outputs are
gathered back in dataset order, equal to one process running them all.

The dataset's positions are cut into the batches one process would run, ``[0, B), [B, 2B), ...``, and
batch ``i`` goes to process ``i % world`` (strided, so no process has more than one batch more than
another). A process with one batch fewer runs a copy of the last batch and drops its output, so every
process runs the same number of forward passes. Each batch holds the same images as in a one-process
run, so the outputs are bit-identical to it (eval-mode BN is per sample; CPU and GPU kernels can
round differently for a different batch size, which this avoids).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

# rows per process in one all_gather: bounds the device memory of the gather (NCCL gathers on the GPU)
GATHER_ROWS = 16384


class ShardedBatches(Sampler[list[int]]):
    """Batches of positions in ``range(n)`` for process ``rank`` of ``world``: global batch ``i`` of size
    ``batch_size`` goes to process ``i % world``; the processes that would run one batch fewer run a copy
    of the last batch (padding, dropped by :func:`run_model`). Use as a DataLoader's ``batch_sampler``."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad shard: batch_size={batch_size}, rank={rank}, world={world}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.num_batches = math.ceil(n / batch_size)  # as one process runs them
        self.slots = math.ceil(self.num_batches / world)  # batches every process runs, padding included
        self.real = len(range(rank, self.num_batches, world))  # this process's real batches (the first ones)

    def _batch(self, i: int) -> list[int]:
        return list(range(i * self.batch_size, min((i + 1) * self.batch_size, self.n)))

    def __iter__(self) -> Iterator[list[int]]:
        for j in range(self.slots):
            i = j * self.world + self.rank
            yield self._batch(i if i < self.num_batches else self.num_batches - 1)

    def __len__(self) -> int:
        return self.slots


@torch.no_grad()
def run_model(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], ContextManager] = nullcontext,
    *,
    normalize: bool = False,
    everywhere: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Outputs (N, d) of ``model`` in eval mode under no_grad over ``batches`` (dicts with ``image`` and
    ``label``), in dataset order, with the labels.

    When ``batches`` is a DataLoader whose ``batch_sampler`` is a :class:`ShardedBatches` of several
    processes (``stages.common.eval_loader`` builds one), every process must call this: each runs its
    share and the outputs are all-gathered (in chunks of :data:`GATHER_ROWS` rows, on ``device``, so
    gloo on CPU and NCCL on GPU both work) and put back in dataset order. Any other iterable is run
    whole, on this process alone.

    Args:
        normalize: L2-normalize each output row (kNN features).
        everywhere: every process gets the result; False: only rank 0 does (the others get None,
            and keep no copy of the gathered outputs).

    Returns:
        (outputs (N, d) float32 on CPU, labels (N,) int64), or None on a process other than rank 0
        when ``everywhere`` is False. The model's train/eval mode is restored afterwards.
    """
    shard = getattr(batches, "batch_sampler", None)
    shard = shard if isinstance(shard, ShardedBatches) else None
    was_training = model.training
    model.eval()
    outs, labels = [], []
    width = 0
    try:
        for j, batch in enumerate(batches):
            with autocast():
                y = model(batch["image"].to(device, non_blocking=True))
            width = y.shape[1]
            if shard is not None and j >= shard.real:
                continue  # padding: run so that every process makes the same calls, never gathered
            y = y.float()
            outs.append((F.normalize(y, dim=1) if normalize else y).cpu())
            labels.append(torch.as_tensor(batch["label"]).long())
    finally:
        model.train(was_training)
    if shard is None or shard.world == 1:
        return torch.cat(outs), torch.cat(labels)
    return _gather_in_order(outs, labels, width, shard, device, everywhere)


def _gather_in_order(outs: list[torch.Tensor], labels: list[torch.Tensor], d: int, shard: ShardedBatches,
                     device: torch.device, everywhere: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every process's batch outputs (width ``d``) -> (N, d) in dataset order: slot j of process r is global
    batch j * world + r, so gathering slot by slot and laying the processes side by side restores the order."""
    bs, world, slots = shard.batch_size, shard.world, shard.slots
    local = torch.zeros(slots * bs, d)
    local_y = torch.full((slots * bs,), -1, dtype=torch.long)
    for j, (o, y) in enumerate(zip(outs, labels)):  # every real batch but the dataset's last is full
        local[j * bs : j * bs + len(o)] = o
        local_y[j * bs : j * bs + len(y)] = y
    keep = everywhere or shard.rank == 0
    out = torch.empty(slots * world * bs, d) if keep else None
    out_y = torch.empty(slots * world * bs, dtype=torch.long) if keep else None
    step = max(1, GATHER_ROWS // bs)  # slots per all_gather
    for j0 in range(0, slots, step):
        j1 = min(slots, j0 + step)
        rows = slice(j0 * bs, j1 * bs)
        for src, dst in ((local, out), (local_y, out_y)):
            parts = [torch.empty_like(src[rows], device=device) for _ in range(world)]
            dist.all_gather(parts, src[rows].to(device))
            if dst is not None:  # (world, slots, bs) -> (slots, world, bs): global batch order
                stacked = torch.stack([p.cpu() for p in parts]).view(world, j1 - j0, bs, *src.shape[1:])
                dst[j0 * world * bs : j1 * world * bs] = stacked.transpose(0, 1).reshape(-1, *src.shape[1:])
    if not keep:
        return None
    return out[: shard.n], out_y[: shard.n]

