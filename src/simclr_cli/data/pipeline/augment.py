"""SimCLR views, SIMCLR.md section 2, with every random draw from an explicit generator.

Each call samples its own parameters (crop box, flip, jitter factors and order,
grayscale, blur sigma) from the ``torch.Generator`` it is given. The loaders
seed that generator from (seed, epoch, sample index), so a view is a pure
function of those three and does not depend on workers or processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torchvision.transforms.v2 import functional as TF

from simclr_cli.recipe.schema import AugmentConfig


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=g).item() < p


def sample_crop(
    g: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Random resized crop box (top, left, h, w): area uniform in ``scale``, log-uniform aspect in ``ratio``.

    Same acceptance scheme as torchvision's ``RandomResizedCrop`` (10 tries, then
    a center crop clamped to the ratio range), but driven by ``g``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view (kept for tests and statistics)."""

    crop: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue factors
    jitter_order: tuple[int, ...]
    grayscale: bool
    blur_sigma: float | None


class SimCLRAugment:
    """One SimCLR view of a uint8 (3, H, W) image, as a normalized float (3, size, size) tensor.

    Args:
        cfg: the ``[augment]`` section.
        size: output side in pixels.
        mean, std: per-channel normalization applied last.
    """

    def __init__(self, cfg: AugmentConfig, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.cfg = cfg
        self.size = size
        s = cfg.strength
        self.jitter_strength = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        k = int(cfg.blur_kernel_frac * size)
        self.blur_kernel = max(3, k // 2 * 2 + 1)  # odd, at least 3
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def sample(self, g: torch.Generator, height: int, width: int) -> ViewParams:
        c = self.cfg
        crop = sample_crop(g, height, width, c.crop_scale, c.crop_ratio)
        flip = _coin(g, c.flip_p)
        jitter = None
        order: tuple[int, ...] = (0, 1, 2, 3)
        if _coin(g, c.jitter_p) and c.strength > 0:
            b, ct, sat, hue = self.jitter_strength
            jitter = (
                _uniform(g, max(0.0, 1 - b), 1 + b),
                _uniform(g, max(0.0, 1 - ct), 1 + ct),
                _uniform(g, max(0.0, 1 - sat), 1 + sat),
                _uniform(g, -min(hue, 0.5), min(hue, 0.5)),
            )
            order = tuple(torch.randperm(4, generator=g).tolist())
        gray = _coin(g, c.grayscale_p)
        sigma = _uniform(g, *c.blur_sigma) if c.blur and _coin(g, c.blur_p) else None
        return ViewParams(crop, flip, jitter, order, gray, sigma)

    def apply(self, img: torch.Tensor, p: ViewParams) -> torch.Tensor:
        top, left, h, w = p.crop
        x = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if p.flip:
            x = TF.horizontal_flip(x)
        if p.jitter is not None:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for i in p.jitter_order:
                x = ops[i](x, p.jitter[i])
        if p.grayscale:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur_sigma is not None:
            x = TF.gaussian_blur(x, [self.blur_kernel, self.blur_kernel], [p.blur_sigma, p.blur_sigma])
        return (x.float().div_(255) - self.mean) / self.std

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.apply(img, self.sample(g, img.shape[-2], img.shape[-1]))


# Evaluation crop fraction: the paper's "resize to 256, center crop 224" (0.875) for real-size images; small
# (CIFAR-style) image sizes use the whole image (SIMCLR.md: "CIFAR: the raw 32 px"). The exported timm
# config (export.py, crop_pct) follows the same rule, so timm's eval transform matches this one.
SMALL_EVAL_SIZE = 64  # image_size at or below this: crop_pct 1.0
EVAL_CROP_PCT = 0.875


def eval_crop_pct(size: int) -> float:
    """The fraction of the resized short side that the evaluation center crop keeps at ``size``."""
    return 1.0 if size <= SMALL_EVAL_SIZE else EVAL_CROP_PCT


class EvalTransform:
    """No augmentation: resize the shorter side to ``size / crop_pct``, center crop ``size``, normalize.

    The rule depends on the target ``size`` only, never on the image (see :func:`eval_crop_pct`):

    * ``size`` > 64 (ImageNet-style): the short side is always resized to ``round(size / 0.875)``
      (256 for 224) and the center ``size`` x ``size`` is kept, also when the short side already is ``size``.
    * ``size`` <= 64 (CIFAR/STL-style small images): the whole image, its short side resized to
      ``size`` when it differs, then center cropped; an image already at ``size`` passes through raw
      (the paper's CIFAR protocol).
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = size
        self.resize_to = int(round(size / eval_crop_pct(size)))
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if min(img.shape[-2:]) != self.resize_to:
            img = TF.resize(img, [self.resize_to], antialias=True)
        img = TF.center_crop(img, [self.size, self.size])
        return (img.float().div_(255) - self.mean) / self.std


def crop_flip_augment(cfg: AugmentConfig, crop_scale: tuple[float, float], size: int,
                      mean: tuple[float, ...], std: tuple[float, ...]) -> SimCLRAugment:
    """Random resized crop and flip only: the augmentation of the supervised stages (SIMCLR.md section 3)."""
    plain = replace(cfg, crop_scale=crop_scale, jitter_p=0.0, grayscale_p=0.0, blur=False)
    return SimCLRAugment(plain, size, mean, std)
