"""Transfer metrics against hand-computed examples; L2 selection and the logistic fit."""

import pytest
import torch

from simclr_cli.evaluation.logistic import fit_logistic, l2_grid, select_l2
from simclr_cli.evaluation.metrics import average_precision_11point, map_11point, mean_per_class_accuracy, top1


def test_mean_per_class_accuracy_by_hand():
    # class 0: 4 examples, 3 right; class 1: 1 example, wrong; class 2: 1 example, right
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 0, 2])
    scores = torch.nn.functional.one_hot(pred, 3).float()
    assert top1(scores, labels) == pytest.approx(100 * 4 / 6)
    assert mean_per_class_accuracy(scores, labels) == pytest.approx(100 * (0.75 + 0.0 + 1.0) / 3)


def test_11_point_ap_by_hand():
    # ranked: +, -, +, -  (2 positives). precision/recall along the ranking:
    # 1: p=1, r=.5   2: p=.5, r=.5   3: p=2/3, r=1   4: p=.5, r=1
    # recall thresholds 0..0.5 (6 of them): max precision 1; 0.6..1.0 (5): max precision 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    positives = torch.tensor([True, False, True, False])
    assert average_precision_11point(scores, positives) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # a perfect ranking is 1; the class without positives is left out of the mean
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    s = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.5], [0.6, 0.9, 0.5]])
    expected = ((6 + 5 * 2 / 3) / 11 + 1.0) / 2
    assert map_11point(s, targets) == pytest.approx(100 * expected)


def test_l2_grids():
    coarse, paper = l2_grid("coarse"), l2_grid("paper")
    assert len(coarse) == 12 and len(paper) == 45
    assert coarse[0] == pytest.approx(1e-6) and paper[-1] == pytest.approx(1e5)


def test_logistic_fit_and_selection_prefers_what_val_says():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    z = torch.randn(300, generator=g) * 5  # a nuisance only a weakly regularized model can cancel
    x = torch.stack([y.float() + z, z, torch.randn(300, generator=g)], 1)
    model = fit_logistic(x[:200], y[:200], 3, 1e-4)
    assert top1(model.scores(x[200:]), y[200:]) > 95
    best, scores = select_l2((x[:200], y[:200]), (x[200:], y[200:]), 3, [1e-4, 1e2, 1e5], top1)
    assert [s[0] for s in scores] == [1e5, 1e2, 1e-4]  # strongest first (warm starts)
    assert best == 1e-4 and scores[-1][1] > scores[0][1] + 20


def test_multilabel_logistic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g)
    targets = torch.stack([(x[:, 0] > 0), (x[:, 1] > 0)], 1).long()
    model = fit_logistic(x, targets, 2, 1e-4, multilabel=True)
    assert map_11point(model.scores(x), targets) > 95


def test_map_and_multilabel_fit_ignore_minus_one_targets():
    # issue 11 item 7 (VOC "difficult"): -1 is neither positive nor negative
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    assert map_11point(scores, torch.tensor([[-1], [1], [1], [0]])) == pytest.approx(100.0)
    assert map_11point(scores, torch.tensor([[0], [1], [1], [0]])) < 100.0
    # the fit leaves -1 entries out of its loss: the kept rows twice, once with every target -1, fit like the
    # kept rows alone (same mean; the loss is divided by 2N instead of N, so l2 doubles for the same minimizer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 3, generator=g)
    y = (x[:, :1] + 0.5 * torch.randn(100, 1, generator=g) > 0).long()
    a = fit_logistic(torch.cat([x, x]), torch.cat([y, torch.full_like(y, -1)]), 1, 1e-2, multilabel=True)
    b = fit_logistic(x, y, 1, 2e-2, multilabel=True)
    assert torch.isfinite(a.weight).all()
    torch.testing.assert_close(a.scores(x), b.scores(x), atol=0.05, rtol=0.02)  # std differs by (N-1)/N only
