"""Contrastive losses on two batches of projections, SIMCLR.md section 2 and paper Table 4.

All three take ``z1, z2`` of shape (n, d): the two views of this process's n
images, row i of each a positive pair. Negatives are gathered from every
process, so each process scores its own 2n rows against all 2N columns. The
self-similarity k = i is masked out (set to -inf), never subtracted.

The losses are computed in float32 (float64 stays float64) with autocast off,
whatever the caller's precision: a bf16 similarity matrix costs about 2% of
gradient accuracy at N=256, tau=0.1, and on CPUs with AMX the bf16 matmul with
an inner dimension that is not a multiple of 32 (d=16 in the test recipes) can
return non-finite values (oneDNN issue #5717). The plain and the gradient-cache
paths therefore compute exactly the same loss.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from simclr_cli.dist import gather_with_grad, rank


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """The loss is computed in float32 (float64 stays float64) whatever the autocast dtype."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def full_precision(loss_fn):
    """Run ``loss_fn(z1, z2, ...)`` with autocast disabled on the inputs' device type."""

    @functools.wraps(loss_fn)
    def wrapper(z1: torch.Tensor, z2: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(z1.device.type, enabled=False):
            return loss_fn(_at_least_fp32(z1), _at_least_fp32(z2), *args, **kwargs)

    return wrapper


def similarities(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities of local rows against all columns, with index helpers.

    Returns:
        sim: (2n, 2N) float32; row r < n is z1[r], row n + r is z2[r]; columns are
             [all z1; all z2] across processes.
        self_col: (2n,) column of each row's own view.
        pos_col: (2n,) column of each row's positive.
    """
    n = z1.shape[0]
    z1 = F.normalize(_at_least_fp32(z1), dim=1)
    z2 = F.normalize(_at_least_fp32(z2), dim=1)
    all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    big_n = all1.shape[0]
    rows = torch.cat([z1, z2], dim=0)
    cols = torch.cat([all1, all2], dim=0)
    sim = rows @ cols.T
    g = rank() * n + torch.arange(n, device=z1.device)  # global index of each local image
    self_col = torch.cat([g, g + big_n])
    pos_col = torch.cat([g + big_n, g])
    return sim, self_col, pos_col


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: mean over all 2N positive pairs (i, j) and (j, i) of
    -log[exp(s_ij / t) / sum_{k != i} exp(s_ik / t)].

    Returns this process's share: the mean over its 2n rows. Averaged over
    processes (as DDP does with gradients), it equals the global loss.
    """
    sim, self_col, pos_col = similarities(z1, z2)
    logits = sim / temperature
    logits[torch.arange(logits.shape[0], device=logits.device), self_col] = float("-inf")
    return F.cross_entropy(logits, pos_col)


@full_precision
def nt_logistic(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Logistic (Table 2): -log sigmoid(s_pos / t) - mean_neg log sigmoid(-s_neg / t), per row.

    Negatives are averaged so positive and negative terms carry equal weight.
    """
    sim, self_col, pos_col = similarities(z1, z2)
    r = torch.arange(sim.shape[0], device=sim.device)
    logits = sim / temperature
    pos = logits[r, pos_col]
    neg_mask = torch.ones_like(logits, dtype=torch.bool)
    neg_mask[r, self_col] = False
    neg_mask[r, pos_col] = False
    neg_term = (F.logsigmoid(-logits) * neg_mask).sum(1) / neg_mask.sum(1)
    return -(F.logsigmoid(pos) + neg_term).mean()


@full_precision
def margin_triplet(z1: torch.Tensor, z2: torch.Tensor, margin: float) -> torch.Tensor:
    """Margin triplet (Table 2): mean over negatives of max(s_neg - s_pos + m, 0), per row."""
    sim, self_col, pos_col = similarities(z1, z2)
    r = torch.arange(sim.shape[0], device=sim.device)
    pos = sim[r, pos_col].unsqueeze(1)
    neg_mask = torch.ones_like(sim, dtype=torch.bool)
    neg_mask[r, self_col] = False
    neg_mask[r, pos_col] = False
    hinge = (sim - pos + margin).clamp_min(0) * neg_mask
    return (hinge.sum(1) / neg_mask.sum(1)).mean()


def contrastive_loss(name: str, z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, margin: float) -> torch.Tensor:
    """Dispatch on the recipe's ``pretrain.simclr.loss``."""
    if name == "nt_xent":
        return nt_xent(z1, z2, temperature)
    if name == "nt_logistic":
        return nt_logistic(z1, z2, temperature)
    if name == "margin_triplet":
        return margin_triplet(z1, z2, margin)
    raise ValueError(f"unknown loss {name!r}")


@full_precision
def nt_xent_with_memory(z1: torch.Tensor, z2: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent with extra negatives from a memory ([v2] section 2, after MoCo): each of the 2N anchors is
    scored against the other 2N - 1 views of the global batch and the m rows of ``memory`` (unit-length,
    constant), -log[exp(s_ij / t) / (sum_{k != i} exp(s_ik / t) + sum_q exp(s_iq / t))].

    Returns this process's share, the mean over its 2n rows (averaged over processes, the global loss).
    With an empty memory it is :func:`nt_xent`.
    """
    sim, self_col, pos_col = similarities(z1, z2)
    rows = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    extra = rows @ memory.to(rows.dtype).T
    logits = torch.cat([sim, extra], dim=1) / temperature
    logits[torch.arange(logits.shape[0], device=logits.device), self_col] = float("-inf")
    return F.cross_entropy(logits, pos_col)
