"""A procedural, deterministic, labeled image set that needs no files.

Each class is a shape or texture (disk, square, triangle, ring, plus, diamond,
horizontal stripes, vertical stripes, checkerboard, X). Colours, background,
position and size are random per image, so an encoder that ignores colour and
learns shape does well: exactly what SimCLR's colour distortion teaches. A
random-init encoder mostly sees colour, so kNN on it stays low and the gap after
a short pretraining run is visible.
"""

from __future__ import annotations

import torch

from simclr_cli.data.sources.images import TensorSource
from simclr_cli.utils import mix_seed

SHAPES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "plus",
    "diamond",
    "hstripes",
    "vstripes",
    "checker",
    "cross",
)


PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (240, 240, 240),
    (30, 30, 30),
)


def render_synthetic(n: int, size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` images.

    Returns:
        images: uint8 tensor (n, 3, size, size); labels: int64 tensor (n,), class ``i % num_classes``.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"synthetic data has 1 to {len(SHAPES)} classes, got {num_classes}")
    g = torch.Generator().manual_seed(mix_seed(seed, n, size, num_classes))
    labels = torch.arange(n) % num_classes
    # Colours come from a small palette, so many images share them: colour alone cannot tell
    # instances apart, and the contrastive task has to look at shape.
    bg_idx = torch.randint(0, len(PALETTE), (n,), generator=g)
    fg_idx = (bg_idx + torch.randint(1, len(PALETTE), (n,), generator=g)) % len(PALETTE)
    palette = torch.tensor(PALETTE) / 255.0
    bg = palette[bg_idx].view(n, 3, 1, 1)
    fg = palette[fg_idx].view(n, 3, 1, 1)
    center = 0.38 + 0.24 * torch.rand(n, 2, generator=g)
    radius = 0.28 + 0.14 * torch.rand(n, 1, generator=g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y = coords.view(1, size, 1)
    x = coords.view(1, 1, size)
    u = (x - center[:, 0].view(n, 1, 1)) / radius.view(n, 1, 1)
    v = (y - center[:, 1].view(n, 1, 1)) / radius.view(n, 1, 1)
    r = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    masks = torch.stack(
        [
            r <= 1.0,
            box <= 0.8,
            (v <= 0.8) & (u.abs() <= (v + 0.9) * 0.55),
            (r <= 1.0) & (r >= 0.55),
            ((u.abs() <= 0.3) | (v.abs() <= 0.3)) & (box <= 1.0),
            (u.abs() + v.abs()) <= 1.0,
            (box <= 1.0) & (torch.sin(v * torch.pi * 2.5) > 0),
            (box <= 1.0) & (torch.sin(u * torch.pi * 2.5) > 0),
            (box <= 1.0) & ((torch.floor(u * 2) + torch.floor(v * 2)) % 2 == 0),
            (((u - v).abs() <= 0.35) | ((u + v).abs() <= 0.35)) & (box <= 1.0),
        ],
        dim=1,
    )  # (n, 10, size, size)
    mask = masks[torch.arange(n), labels].unsqueeze(1).float()
    img = bg * (1 - mask) + fg * mask
    img = img + 0.04 * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def synthetic_source(split: str, n: int, size: int, num_classes: int, seed: int) -> TensorSource:
    """The synthetic split ``split``; different splits use different seeds, never overlapping."""
    images, labels = render_synthetic(n, size, num_classes, mix_seed(seed, split))
    return TensorSource(images, labels.tolist(), [SHAPES[i] for i in range(num_classes)], name=f"synthetic:{split}")
