"""Weighted kNN classification on L2-normalized features (InstDisc protocol, SIMCLR.md section 3)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from simclr_cli.evaluation.sharded import run_model


def extract_features(
    encoder: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], ContextManager] = nullcontext,
    *,
    everywhere: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Run ``encoder`` in eval mode over ``batches`` (dicts with ``image`` and ``label``), split across
    processes when ``batches`` is sharded (:func:`simclr_cli.evaluation.sharded.run_model`, which says how).

    Returns:
        (features (N, d) float32 on CPU, L2-normalized; labels (N,) int64), in dataset order; None on
        processes other than rank 0 when ``everywhere`` is False. The encoder's train/eval mode is restored.
    """
    return run_model(encoder, batches, device, autocast, normalize=True, everywhere=everywhere)


# Similarities held at once: QUERY_CHUNK x BANK_CHUNK float32 (128 MiB), whatever the bank size.
QUERY_CHUNK = 1024
BANK_CHUNK = 32768


@torch.no_grad()
def knn_neighbors(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    query_chunk: int = QUERY_CHUNK,
    bank_chunk: int = BANK_CHUNK,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar train features of each test feature: (similarities (M, k), indices (M, k)), most
    similar first, equal similarities in bank order (lower index first, as a stable sort puts them).

    The bank is read ``bank_chunk`` rows at a time (each moved to ``device`` once; default: where the
    features are), against ``query_chunk`` queries at a time, keeping a running top-k per query: at most
    ``query_chunk x bank_chunk`` similarities exist at once (0: the whole bank, or all queries). The result
    does not depend on the chunk sizes, given the same similarities (BLAS may round a dot product
    differently for another matrix shape, ~1e-7). Returned on the features' device.
    """
    n, m = train_features.shape[0], test_features.shape[0]
    k = min(k, n)
    query_chunk, bank_chunk = query_chunk or max(m, 1), bank_chunk or max(n, 1)
    home = test_features.device
    queries = test_features.to(device or home)
    best = [(queries.new_empty(min(query_chunk, m - q0), 0), queries.new_empty(min(query_chunk, m - q0), 0,
                                                                               dtype=torch.long))
            for q0 in range(0, m, query_chunk)]
    for b0 in range(0, n, bank_chunk):
        bank = train_features[b0 : b0 + bank_chunk].to(queries.device)
        for c, q0 in enumerate(range(0, m, query_chunk)):
            sim = queries[q0 : q0 + query_chunk] @ bank.T  # (m, b)
            s, i = _top_stable(sim, min(k, sim.shape[1]))
            del sim  # before the next one is made
            # earlier chunks first: a stable sort keeps the lower bank index first among equal similarities
            best_s, best_i = best[c]
            s, order = torch.cat([best_s, s], 1).sort(dim=1, descending=True, stable=True)
            best[c] = s[:, :k], torch.cat([best_i, i + b0], 1).gather(1, order[:, :k])
    if not best:
        return test_features.new_empty(0, k), test_features.new_empty(0, k, dtype=torch.long)
    return torch.cat([s for s, _ in best]).to(home), torch.cat([i for _, i in best]).to(home)


def _top_stable(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sim.topk(k)`` with ties broken by index (lower first), sorted by (similarity desc, index asc).

    topk picks among equal values arbitrarily. It takes one value more here: where that one equals the
    k-th, a tie may cross the cut, and only those rows are redone by a stable sort."""
    s, i = sim.topk(min(k + 1, sim.shape[1]), dim=1)
    cut = (s[:, k] == s[:, k - 1]).nonzero().flatten() if s.shape[1] > k else s.new_empty(0, dtype=torch.long)
    s, i = s[:, :k], i[:, :k]
    i, by_index = i.sort(dim=1)
    s, order = s.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    i = i.gather(1, order)
    if len(cut):
        rs, ri = sim[cut].sort(dim=1, descending=True, stable=True)
        s[cut], i[cut] = rs[:, :k], ri[:, :k]
    return s, i


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    query_chunk: int = QUERY_CHUNK,
    bank_chunk: int = BANK_CHUNK,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class scores (M, C): for each test feature, sum over its k nearest train features
    (cosine similarity) of exp((sim - best) / temperature), per class, where ``best`` is the row's highest
    similarity. Features must be L2-normalized. Taking out the row's factor exp(best / temperature) changes
    no ranking and keeps every weight in (0, 1]: exp(sim / temperature) itself overflows float32 below
    temperature ~0.011, and ties of inf would vote for the lowest class.

    The search runs in chunks (:func:`knn_neighbors`, on ``device`` if given): a 1.28M x 2048 bank never
    needs an (M, N) matrix. Each score is summed over the neighbours in order, most similar first, so it is
    the same number for any chunk sizes.
    """
    sim, idx = knn_neighbors(train_features, test_features, k, query_chunk, bank_chunk, device)
    best = sim[:, :1] if sim.shape[1] else sim.new_zeros(sim.shape[0], 1)  # most similar first
    weights = ((sim - best) / temperature).exp()
    labels = train_labels.to(idx.device)[idx]
    scores = torch.zeros(len(test_features), num_classes, dtype=weights.dtype, device=weights.device)
    for j in range(idx.shape[1]):  # one add per row and step: the same order on every device and chunking
        scores.scatter_add_(1, labels[:, j : j + 1], weights[:, j : j + 1])
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k larger than the number of classes counts as all)."""
    result = {}
    order = scores.argsort(dim=1, descending=True)
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (order[:, :k_eff] == labels.unsqueeze(1)).any(1)
        result[k] = 100.0 * hit.float().mean().item()
    return result


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.1,
             query_chunk: int = QUERY_CHUNK, bank_chunk: int = BANK_CHUNK, device=None) -> float:
    """Weighted kNN top-1 accuracy in percent (the search in chunks, :func:`knn_scores`)."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature, query_chunk,
                        bank_chunk, device)
    return topk_accuracy(scores, test_labels, (1,))[1]
