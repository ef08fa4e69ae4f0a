"""The distillation loss against its formula; hard pseudo-label filtering counts."""

import math

import pytest
import torch

from simclr_cli.losses.distill import confident_pseudo_labels, distillation_loss


def _reference(student, teacher, tau):
    """-1/N sum_x sum_y P_T(y|x;tau) log P_S(y|x;tau), written out with plain loops in float64."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zt = sum(math.exp(v / tau) for v in t_row)
        zs = sum(math.exp(v / tau) for v in s_row)
        for sv, tv in zip(s_row, t_row):
            total -= (math.exp(tv / tau) / zt) * math.log(math.exp(sv / tau) / zs)
    return total / len(student)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_distillation_loss_matches_the_formula(tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    student = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    assert distillation_loss(student, teacher, tau).item() == pytest.approx(_reference(student, teacher, tau), rel=1e-6)


def test_distillation_gradient_is_softmax_difference_and_teacher_gets_none():
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    tau = 2.0
    distillation_loss(student, teacher, tau).backward()
    expected = (torch.softmax(student / tau, 1) - torch.softmax(teacher / tau, 1)) / (tau * 4)
    torch.testing.assert_close(student.grad, expected.detach())
    assert teacher.grad is None


def test_distillation_equals_cross_entropy_for_one_hot_teacher():
    student = torch.randn(5, 4)
    labels = torch.tensor([0, 3, 1, 1, 2])
    teacher = torch.nn.functional.one_hot(labels, 4).float() * 1e4  # softmax is one-hot
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(ce.item(), rel=1e-5)


def test_hard_pseudo_labels_keep_only_confident_examples():
    logits = torch.log(torch.tensor([
        [0.95, 0.03, 0.02],  # kept, label 0
        [0.50, 0.45, 0.05],  # dropped
        [0.05, 0.05, 0.90],  # kept at exactly the threshold, label 2
        [0.10, 0.89, 0.01],  # dropped, just under
    ]))
    keep, labels = confident_pseudo_labels(logits, 0.9)
    assert keep.tolist() == [0, 2] and labels.tolist() == [0, 2]
    assert len(confident_pseudo_labels(logits, 0.0)[0]) == 4
    assert len(confident_pseudo_labels(logits, 0.99)[0]) == 0
