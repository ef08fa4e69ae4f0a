"""LARS against a hand-computed update, exclusions, lr scaling and the schedule."""

import math

import pytest
import torch
from torch import nn

from simclr_cli.optim import LARS, build_optimizer, param_groups, scaled_lr, warmup_cosine


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    b.grad = torch.tensor([0.5])
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1, "lars": True}, {"params": [b], "weight_decay": 0.0, "lars": False}],
        lr=2.0, momentum=0.9, trust_coefficient=1e-3,
    )
    opt.step()
    # weight: g' = g + 0.1 w = [0.9, 1.2], ||g'|| = 1.5; trust = 1e-3 * 5 / 1.5; v = lr * trust * g'
    trust = 1e-3 * 5 / 1.5
    expected_w = torch.tensor([[3.0, 4.0]]) - 2.0 * trust * torch.tensor([[0.9, 1.2]])
    torch.testing.assert_close(w.detach(), expected_w)
    # bias: excluded -> plain momentum SGD, no decay: 1 - 2 * 0.5
    torch.testing.assert_close(b.detach(), torch.tensor([0.0]))
    # second step: momentum accumulates
    v_prev = 2.0 * trust * torch.tensor([[0.9, 1.2]])
    w_now = w.detach().clone()
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5])
    opt.step()
    g2 = torch.tensor([[0.6, 0.8]]) + 0.1 * w_now
    trust2 = 1e-3 * w_now.norm() / g2.norm()
    torch.testing.assert_close(w.detach(), w_now - (0.9 * v_prev + 2.0 * trust2 * g2))
    torch.testing.assert_close(b.detach(), torch.tensor([0.0 - (0.9 * 1.0 + 1.0)]))


def test_lars_zero_norm_uses_trust_one():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


def test_param_groups_exclude_bias_and_bn_by_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-6)
    assert decay["lars"] and decay["weight_decay"] == 1e-6
    assert not no_decay["lars"] and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert len(no_decay["params"]) == 4  # conv bias, bn weight, bn bias, linear bias


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer(name):
    opt = build_optimizer(name, nn.Linear(3, 2), lr=0.5, weight_decay=1e-4, nesterov=True)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_lr_scaling():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)  # the two agree at B=4096
    assert scaled_lr(1.0, 512, "none") == 1.0


def test_warmup_then_cosine():
    total, warm = 100, 10
    values = [warmup_cosine(s, total, warm) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert warmup_cosine(total, total, warm) == pytest.approx(0.0)
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)


def test_warmup_is_step_plus_one_over_w_and_the_docstring_says_how_the_reference_differs():
    """Issue 11 item 7: the docstring claimed the reference uses (step + 1) / W; it uses step / W."""
    w = 4
    assert [warmup_cosine(s, 100, w) for s in range(w)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    doc = " ".join(warmup_cosine.__doc__.split())
    assert "(step + 1) / warmup_steps" in doc and "uses ``step / warmup_steps``" in doc
    assert "as in the reference" not in doc
