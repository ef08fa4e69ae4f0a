"""The batched augmentation backend against the per-image torchvision reference.

Pixels: each batched op equals its torchvision op (per-sample factors), and whole views match
the reference within rounding. Statistics: the parameters the batched backend receives follow
SIMCLR.md section 2 and torchvision's own samplers (rates, ranges, crop areas, jitter order).
"""

import math
from collections import Counter

import pytest
import torch
from torchvision.transforms import ColorJitter, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from simclr_cli.data.pipeline.augment import SimCLRAugment
from simclr_cli.data.pipeline.batched import PARAM_FIELDS, BatchedAugment, _color_op, _gaussian_blur, pack
from simclr_cli.data.pipeline.loaders import ContrastiveViews
from simclr_cli.data.sources.images import TensorSource
from simclr_cli.recipe.schema import AugmentConfig

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
F = {name: i for i, name in enumerate(PARAM_FIELDS)}


def _images(n=16, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g) * 255
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2).to(torch.uint8)  # smooth, like photos


@pytest.mark.parametrize("j,op,lo,hi", [(0, TF.adjust_brightness, 0.2, 1.8), (1, TF.adjust_contrast, 0.2, 1.8),
                                        (2, TF.adjust_saturation, 0.2, 1.8), (3, TF.adjust_hue, -0.5, 0.5)])
def test_each_color_op_equals_torchvision_per_sample(j, op, lo, hi):
    x = _images(8).float() / 255
    factors = torch.linspace(lo, hi, 8)
    out = _color_op(j, x.clone(), factors)
    ref = torch.stack([op(x[i], factors[i].item()) for i in range(8)])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_blur_equals_torchvision_per_sample_sigma():
    x = _images(6).float() / 255
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    out = _gaussian_blur(x, sigmas, 5)
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [s.item(), s.item()]) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cropped", [True, False])
def test_whole_views_match_the_reference(cropped):
    ref = SimCLRAugment(AugmentConfig(blur=True), 32, MEAN, STD)
    imgs = _images(64)
    params = [ref.sample(torch.Generator().manual_seed(i), 40, 48) for i in range(64)]
    packed = torch.stack([pack(p) for p in params])
    expected = torch.stack([ref.apply(imgs[i], p) for i, p in enumerate(params)])
    if cropped:
        crops = torch.stack([TF.resized_crop(imgs[i], *p.crop, [32, 32], antialias=True) for i, p in enumerate(params)])
        out = BatchedAugment(ref)(crops, packed, cropped=True)
    else:
        out = BatchedAugment(ref)(imgs, packed, cropped=False)  # roi_align crop instead of an antialiased resize
    diff = (out - expected).abs() * STD[0]  # in [0, 1] pixel units
    assert diff.mean() < 0.01, diff.mean()
    assert diff.max() < (0.05 if cropped else 0.12), diff.max()


def _batched_params(cfg, n=3000, size=64):
    src = TensorSource(torch.zeros(n, 3, size, size, dtype=torch.uint8), [0] * n, ["x"], "zeros")
    views = ContrastiveViews(src, SimCLRAugment(cfg, 32, MEAN, STD), seed=0, batched=True)
    return torch.stack([views[(0, i)]["params1"] for i in range(n)])


def test_batched_parameters_follow_section_2():
    p = _batched_params(AugmentConfig(blur=True, strength=1.0))
    n = len(p)
    tol = 3 * math.sqrt(0.25 / n)
    assert abs(p[:, F["flip"]].mean() - 0.5) < tol
    assert abs(p[:, F["jitter"]].mean() - 0.8) < tol
    assert abs(p[:, F["gray"]].mean() - 0.2) < tol
    assert abs((p[:, F["sigma"]] > 0).float().mean() - 0.5) < tol
    sig = p[p[:, F["sigma"]] > 0, F["sigma"]]
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.05
    jit = p[p[:, F["jitter"]] > 0.5]
    for name, lo, hi in [("brightness", 0.2, 1.8), ("contrast", 0.2, 1.8), ("saturation", 0.2, 1.8), ("hue", -0.2, 0.2)]:
        v = jit[:, F[name]]
        assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.03 * (hi - lo), name
    # jitter order: all 24 permutations, about equally often (torchvision's ColorJitter shuffles the same way)
    orders = Counter(tuple(int(v) for v in row) for row in jit[:, F["order0"]:F["order3"] + 1])
    assert len(orders) == 24 and max(orders.values()) < 2 * len(jit) / 24
    # jitter factor ranges equal torchvision's ColorJitter(0.8, 0.8, 0.8, 0.2)
    cj = ColorJitter(0.8, 0.8, 0.8, 0.2)
    assert tuple(cj.brightness) == pytest.approx((0.2, 1.8)) and tuple(cj.hue) == pytest.approx((-0.2, 0.2))


def test_batched_crop_areas_match_torchvision_random_resized_crop():
    p = _batched_params(AugmentConfig(), n=3000, size=64)
    areas = (p[:, F["h"]] * p[:, F["w"]] / 64**2).sort().values
    torch.manual_seed(0)
    ref = torch.tensor(sorted(h * w / 64**2 for _, _, h, w in (
        RandomResizedCrop.get_params(torch.zeros(1, 64, 64), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000))))
    # two-sample Kolmogorov-Smirnov statistic; the 0.1% critical value for n = m = 3000 is about 0.05
    grid = torch.linspace(0, 1, 201)
    cdf = lambda s: torch.searchsorted(s.contiguous(), grid, right=True).float() / len(s)  # noqa: E731
    assert (cdf(areas) - cdf(ref)).abs().max() < 0.05


def test_batched_backend_draws_the_same_parameters_as_the_reference():
    src = TensorSource(_images(8, 32, 32), [0] * 8, ["x"], "imgs")
    ref = ContrastiveViews(src, SimCLRAugment(AugmentConfig(), 32, MEAN, STD), seed=5)
    bat = ContrastiveViews(src, SimCLRAugment(AugmentConfig(), 32, MEAN, STD), seed=5, batched=True)
    aug = BatchedAugment(bat.augment)
    for i in range(8):
        r, b = ref[(3, i)], bat[(3, i)]
        assert bat.crop_on_device and torch.equal(b["image"], src.images[i])
        v1 = aug(b["image"][None], b["params1"][None], cropped=False)[0]
        assert ((v1 - r["view1"]).abs() * STD[0]).mean() < 0.02


@pytest.mark.parametrize("extra", [[], ["pretrain.micro_batch_size=8"]])
def test_pretrain_with_the_batched_backend_trains_like_the_reference(tiny_recipe_file, tmp_path, extra):
    import json

    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    losses = {}
    for backend in ("torchvision", "batched"):
        recipe = load_recipe(tiny_recipe_file, [f'augment.backend="{backend}"', "pretrain.knn_every=0",
                                                "pretrain.log_every=1", "pretrain.epochs=1", *extra])
        pretrain.run(recipe, tmp_path / backend, show_progress=False)
        lines = (tmp_path / backend / "pretrain" / "metrics.jsonl").read_text().splitlines()
        losses[backend] = [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]
    # the same parameter draws, pixels equal up to rounding: the first loss agrees closely
    assert losses["batched"][0] == pytest.approx(losses["torchvision"][0], rel=0.02)
    assert len(losses["batched"]) == len(losses["torchvision"]) == 4
