"""Learning-rate schedules as pure functions of the step, and lr scaling (SIMCLR.md section 2)."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """lr * B/256 (``linear``), lr * sqrt(B) (``sqrt``), or lr (``none``)."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown lr_scaling {scaling!r}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier at ``step`` (0-based): linear warmup to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``.

    Stepped per iteration. Warmup here is ``(step + 1) / warmup_steps``: the first update already
    has a non-zero lr and step ``warmup_steps - 1`` reaches the peak. The reference implementation
    (google-research/simclr, ``WarmUpAndCosineDecay``) uses ``step / warmup_steps``, whose first
    update has lr 0; the two differ by one step of warmup. Cosine decay then starts at
    ``warmup_steps`` in both.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
