"""Batched SimCLR augmentation: whole uint8 batches on the model's device, per-sample parameters.

``augment.backend = "batched"``. The parameters of every view are drawn on the CPU by the same
code as the per-image reference (:meth:`SimCLRAugment.sample`, seeded by (seed, epoch, index)),
so both backends draw identical parameters; only the pixel work moves to batched tensor ops:

* crop boxes: ``roi_align`` (bilinear, with adaptive sampling that averages when shrinking);
  or, for images of different sizes, the crop is done per image in the loader and only the
  rest is batched;
* flips; brightness, contrast, saturation and hue with per-sample factors in a per-sample
  order; grayscale; separable Gaussian blur with a per-sample sigma; normalization.

A view's parameters travel as one row of :data:`PARAM_FIELDS` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from simclr_cli.data.pipeline.augment import SimCLRAugment, ViewParams

PARAM_FIELDS = ("top", "left", "h", "w", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
                "order0", "order1", "order2", "order3", "gray", "sigma")
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def pack(p: ViewParams) -> torch.Tensor:
    """One view's parameters as a float row (sigma 0: no blur)."""
    jit = p.jitter or (1.0, 1.0, 1.0, 0.0)
    return torch.tensor([*p.crop, float(p.flip), float(p.jitter is not None), *jit, *p.jitter_order,
                         float(p.grayscale), p.blur_sigma or 0.0], dtype=torch.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luma with torchvision's weights."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f a + (1 - f) b, clamped to [0, 1] (torchvision's _blend); ``b`` broadcasts."""
    return (a * f).add_(b * (1 - f)).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, s, v), each (n, 1, H, W), as torchvision computes them (h in [0, 1))."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    s = delta / maxc.clamp(min=1e-12)  # 0 where maxc is 0 (delta is 0 there too)
    inv = 1.0 / delta.clamp(min=1e-12)  # grey pixels: every difference below is 0, so h = 0
    h = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
    return (h / 6.0) % 1.0, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Closed form: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6."""
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    k = (n + h * 6.0) % 6.0
    return v - v * s * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift.view(-1, 1, 1, 1)) % 1.0, s, v).clamp_(0, 1)


def _color_op(j: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Operation ``j`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factors ``f`` (n,)."""
    if j == 0:
        return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)
    if j == 1:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean, f.view(-1, 1, 1, 1))
    if j == 2:
        return _blend(x, _gray(x), f.view(-1, 1, 1, 1))
    return _adjust_hue(x, f)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Separable blur with a per-sample sigma and reflect padding, as torchvision's ``gaussian_blur``."""
    n, c, h, w = x.shape
    half = (k - 1) * 0.5
    t = torch.linspace(-half, half, k, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kern = kern / kern.sum(1, keepdim=True)  # (n, k)
    kern = kern.repeat_interleave(c, 0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


class BatchedAugment:
    """Apply packed view parameters to a batch; see the module docstring.

    Args:
        reference: the per-image augmenter whose ``sample`` draws the parameters (and whose
            settings, output size, blur kernel and normalization are used here).
    """

    def __init__(self, reference: SimCLRAugment) -> None:
        self.ref = reference
        self.size = reference.size

    def __call__(self, images: torch.Tensor, params: torch.Tensor, cropped: bool) -> torch.Tensor:
        """``images``: uint8 (n, 3, H, W), already cropped to the output size when ``cropped``;
        ``params``: (n, len(PARAM_FIELDS)). Returns normalized float (n, 3, size, size)."""
        n = images.shape[0]
        dev = images.device
        p = params.to(dev, torch.float32)
        if cropped:
            x = images.float().div_(255)
        else:
            top, left, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
            boxes = torch.stack([torch.arange(n, device=dev, dtype=torch.float32), left, top, left + w, top + h], 1)
            x = roi_align(images.float(), boxes, output_size=(self.size, self.size), spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True).div_(255).clamp_(0, 1)
        flip = p[:, 4] > 0.5
        if flip.any():
            x[flip] = x[flip].flip(-1)
        jit = p[:, 5] > 0.5
        if jit.any():
            factors, order = p[:, 6:10], p[:, 10:14].long()
            for pos in range(4):
                for j in range(4):
                    m = jit & (order[:, pos] == j)
                    if m.any():
                        x[m] = _color_op(j, x[m], factors[m, j])
        gray = p[:, 14] > 0.5
        if gray.any():
            x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
        sigma = p[:, 15]
        blur = sigma > 0
        if blur.any():
            x[blur] = _gaussian_blur(x[blur], sigma[blur], self.ref.blur_kernel)
        mean, std = self.ref.mean.to(dev), self.ref.std.to(dev)
        return (x - mean) / std
