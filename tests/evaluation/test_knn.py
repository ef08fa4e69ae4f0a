"""The kNN search in chunks (issue 14): the same neighbours and scores as one (M, N) matrix, ties included."""

import pytest
import torch
import torch.nn.functional as F

from simclr_cli.evaluation.knn import knn_neighbors, knn_scores, knn_top1
from simclr_cli.evaluation.sharded import ShardedBatches


def _reference(bank, labels, queries, num_classes, k, t):
    """The whole (M, N) matrix, a stable sort (equal similarities: lower bank index first), a loop over neighbours;
    the weights relative to the row's best neighbour (exp((s - s_best) / t), issue 19 item 13)."""
    sim = queries @ bank.T
    s, i = sim.sort(dim=1, descending=True, stable=True)
    s, i = s[:, :k], i[:, :k]
    scores = torch.zeros(len(queries), num_classes)
    for row in range(len(queries)):
        for j in range(k):
            scores[row, labels[i[row, j]]] += torch.exp((s[row, j] - s[row, 0]) / t)
    return s, i, scores


CHUNKS = [(0, 0), (1, 0), (7, 13), (64, 5), (1000, 1), (3, 1000)]


@pytest.mark.parametrize("query_chunk,bank_chunk", CHUNKS)
def test_chunked_search_with_ties_equals_the_whole_matrix(query_chunk, bank_chunk):
    # small-integer features: every dot product is exact in float32 whatever the matrix shape, and most tie
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(-2, 3, (211, 6), generator=g).float() / 4
    bank[100:140] = bank[0]  # exact duplicates across bank chunks
    queries = torch.randint(-2, 3, (37, 6), generator=g).float() / 4
    labels = torch.randint(0, 5, (211,), generator=g)
    ref_s, ref_i, ref_scores = _reference(bank, labels, queries, 5, 20, 0.5)
    s, i = knn_neighbors(bank, queries, 20, query_chunk, bank_chunk)
    assert torch.equal(s, ref_s) and torch.equal(i, ref_i)
    scores = knn_scores(bank, labels, queries, 5, 20, 0.5, query_chunk, bank_chunk)
    assert torch.equal(scores, knn_scores(bank, labels, queries, 5, 20, 0.5, 0, 0))
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=0)


def test_chunked_search_on_random_features():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(3001, 32, generator=g), dim=1)
    queries = F.normalize(torch.randn(257, 32, generator=g), dim=1)
    labels = torch.randint(0, 10, (3001,), generator=g)
    whole = knn_scores(bank, labels, queries, 10, 50, 0.1, 0, 0)
    _, ref_i, ref_scores = _reference(bank, labels, queries, 10, 50, 0.1)
    torch.testing.assert_close(whole, ref_scores, rtol=1e-5, atol=0)
    for qc, bc in ((100, 512), (1, 3000), (64, 70)):
        # BLAS rounds a dot product differently for another matrix shape (~1e-7): close, same predictions
        torch.testing.assert_close(knn_scores(bank, labels, queries, 10, 50, 0.1, qc, bc), whole, rtol=1e-5, atol=0)
        assert torch.equal(knn_neighbors(bank, queries, 50, qc, bc)[1], ref_i)
    top1 = knn_top1(bank, labels, queries, labels[:257], 10, 50, 0.1)
    assert top1 == knn_top1(bank, labels, queries, labels[:257], 10, 50, 0.1, 13, 100)


def test_k_larger_than_the_bank_or_a_bank_chunk():
    bank = F.normalize(torch.randn(9, 4), dim=1)
    s, i = knn_neighbors(bank, bank, 200, 2, 4)
    assert s.shape == (9, 9) and torch.equal(i[:, 0], torch.arange(9))  # each row is its own nearest


@pytest.mark.parametrize("n,bs,world", [(23, 4, 2), (5, 4, 2), (3, 8, 2), (100, 7, 3), (64, 8, 4), (10, 3, 1)])
def test_sharded_batches_cover_the_dataset_once_in_whole_batches(n, bs, world):
    shards = [ShardedBatches(n, bs, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of batches on every process
    real = [b for s in shards for b in list(s)[: s.real]]
    one = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    assert sorted(real) == one  # each one-process batch exactly once, unchanged
    assert sum(s.real for s in shards) == len(one)


def test_small_temperature_does_not_overflow_and_the_nearest_class_wins():
    """Issue 19 item 13: exp(sim / T) overflowed float32 below T ~0.011; ties of inf voted for the lowest class."""
    t = 0.005
    near = F.normalize(torch.tensor([[1.0, 0.05, 0.0]]), dim=1)  # cos ~0.9988 to the query: class 1
    far = F.normalize(torch.tensor([[1.0, 0.3, 0.0]] * 5), dim=1)  # cos ~0.958: five votes for class 0
    bank = torch.cat([far, near])
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    query = torch.tensor([[1.0, 0.0, 0.0]])
    assert torch.exp(torch.tensor(0.9) / t).isinf()  # the old weights overflow here
    scores = knn_scores(bank, labels, query, 2, 6, t)
    assert torch.isfinite(scores).all()
    # each far neighbour weighs exp(-(0.9988 - 0.958) / 0.005) ~ 3e-4 of the nearest one
    assert scores[0, 1] > scores[0, 0] > 0
    assert knn_top1(bank, labels, query, torch.tensor([1]), 2, 6, t) == 100.0
