"""The SimCLRv2 distillation loss ([v2] eq. 2-3, SIMCLR.md section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-sum_y P_T(y|x; tau) log P_S(y|x; tau), averaged over the batch, with P = softmax(logits / tau).

    As in [v2] (no tau^2 factor). Computed in at least fp32; the teacher gets no gradient.
    """
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    return -(F.softmax(t, dim=1) * F.log_softmax(s, dim=1)).sum(dim=1).mean()


def confident_pseudo_labels(teacher_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels for the teacher/student variant: (indices kept, their labels), keeping
    examples whose teacher softmax probability (tau = 1) reaches ``threshold``."""
    probs = F.softmax(teacher_logits.float(), dim=1)
    conf, labels = probs.max(dim=1)
    keep = (conf >= threshold).nonzero(as_tuple=True)[0]
    return keep, labels[keep]
