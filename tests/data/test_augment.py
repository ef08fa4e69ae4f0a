"""Augmentation follows SIMCLR.md section 2, per image and per view, and is a pure function of its seed."""


import torch

from simclr_cli.data.pipeline.augment import EvalTransform, SimCLRAugment, sample_crop
from simclr_cli.data.pipeline.loaders import ContrastiveViews, GlobalBatchSampler, make_loader
from simclr_cli.data.sources.synthetic import synthetic_source
from simclr_cli.recipe.schema import AugmentConfig

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _params(cfg, n=2000, size=64):
    aug = SimCLRAugment(cfg, 32, MEAN, STD)
    g = torch.Generator().manual_seed(0)
    return [aug.sample(g, size, size) for _ in range(n)]


def test_crop_area_and_ratio_in_range():
    g = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(3000):
        top, left, h, w = sample_crop(g, 100, 100, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 100
        areas.append(h * w / 10000)
        ratios.append(w / h)
    assert min(areas) >= 0.07 and max(areas) <= 1.0
    # Same distribution as torchvision's RandomResizedCrop (which rejects boxes that do not fit).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = [h * w / 10000 for _, _, h, w in
           (RandomResizedCrop.get_params(torch.zeros(1, 100, 100), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000))]
    assert abs(sum(areas) / len(areas) - sum(ref) / len(ref)) < 0.02
    assert min(ratios) > 0.7 and max(ratios) < 1.4


def test_blur_fires_half_the_time_and_sigma_in_range():
    params = _params(AugmentConfig(blur=True))
    sigmas = [p.blur_sigma for p in params if p.blur_sigma is not None]
    assert abs(len(sigmas) / len(params) - 0.5) < 0.04
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0
    assert all(p.blur_sigma is None for p in _params(AugmentConfig(blur=False), n=200))


def test_jitter_grayscale_flip_probabilities_and_strength():
    s = 0.5
    params = _params(AugmentConfig(strength=s))
    n = len(params)
    jittered = [p.jitter for p in params if p.jitter is not None]
    assert abs(len(jittered) / n - 0.8) < 0.04
    assert abs(sum(p.grayscale for p in params) / n - 0.2) < 0.04
    assert abs(sum(p.flip for p in params) / n - 0.5) < 0.04
    b = [j[0] for j in jittered]
    h = [j[3] for j in jittered]
    assert min(b) >= 1 - 0.8 * s and max(b) <= 1 + 0.8 * s
    assert min(h) >= -0.2 * s and max(h) <= 0.2 * s
    orders = {p.jitter_order for p in params if p.jitter is not None}
    assert len(orders) > 12  # the order of the four ops is shuffled per image


def test_blur_kernel_is_ten_percent_of_side_and_odd():
    assert SimCLRAugment(AugmentConfig(), 224, MEAN, STD).blur_kernel == 23
    assert SimCLRAugment(AugmentConfig(), 96, MEAN, STD).blur_kernel == 9


def test_two_views_differ_and_are_deterministic_per_seed_epoch_index():
    src = synthetic_source("train", 16, 32, 10, seed=0)
    aug = SimCLRAugment(AugmentConfig(), 32, MEAN, STD)
    ds = ContrastiveViews(src, aug, seed=3)
    a = ds[(0, 5)]
    b = ds[(0, 5)]
    assert a["view1"].shape == (3, 32, 32)
    torch.testing.assert_close(a["view1"], b["view1"])
    torch.testing.assert_close(a["view2"], b["view2"])
    differ = sum(not torch.equal(ds[(0, i)]["view1"], ds[(0, i)]["view2"]) for i in range(16))
    assert differ == 16
    assert not torch.equal(ds[(1, 5)]["view1"], a["view1"])  # a new epoch gives new views


def test_views_do_not_depend_on_num_workers():
    src = synthetic_source("train", 32, 16, 10, seed=0)
    ds = ContrastiveViews(src, SimCLRAugment(AugmentConfig(blur=True), 16, MEAN, STD), seed=1)

    def epoch_batches(workers):
        sampler = GlobalBatchSampler(32, 8, seed=1)
        sampler.set_epoch(2)
        return [b["view1"] for b in make_loader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=False)]

    for x, y in zip(epoch_batches(0), epoch_batches(2)):
        torch.testing.assert_close(x, y)


def test_global_sampler_slices_the_same_global_batches():
    one = GlobalBatchSampler(20, 8, seed=0)
    one.set_epoch(1)
    parts = [GlobalBatchSampler(20, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    for p in parts:
        p.set_epoch(1)
    full = list(one)
    assert len(full) == 2  # last partial global batch dropped
    for b, batch in enumerate(full):
        assert list(parts[0])[b] + list(parts[1])[b] == batch
    one.set_epoch(1, start_batch=1)
    assert list(one) == full[1:]


def test_eval_transform_keeps_small_images_and_center_crops_large():
    t = EvalTransform(32, MEAN, STD)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(t(img), (img.float() / 255 - 0.5) / 0.25)
    assert EvalTransform(224, MEAN, STD)(torch.zeros(3, 300, 400, dtype=torch.uint8)).shape == (3, 224, 224)


def test_synthetic_is_deterministic_labeled_and_split_disjoint():
    a = synthetic_source("train", 20, 32, 10, seed=0)
    b = synthetic_source("train", 20, 32, 10, seed=0)
    v = synthetic_source("val", 20, 32, 10, seed=0)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, v.images)
    assert a.labels == [i % 10 for i in range(20)] and len(a.classes) == 10


def test_eval_transform_resizes_to_size_over_0875_even_when_the_short_side_is_size():
    # issue 11 item 7: a 224-short-side image skipped the resize to 256 and was cropped at 224 directly
    from torchvision.transforms.v2 import functional as TF

    img = torch.randint(0, 256, (3, 224, 300), dtype=torch.uint8)
    expected = TF.center_crop(TF.resize(img, [256], antialias=True), [224, 224])
    torch.testing.assert_close(EvalTransform(224, MEAN, STD)(img), (expected.float() / 255 - 0.5) / 0.25)
    # an image already at 256 is only center cropped
    big = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
    torch.testing.assert_close(EvalTransform(224, MEAN, STD)(big), (TF.center_crop(big, [224, 224]).float() / 255 - 0.5) / 0.25)
    # CIFAR-style sizes (<= 64) use the whole image: raw at its size, otherwise short side resized to size
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(EvalTransform(32, MEAN, STD)(small), (small.float() / 255 - 0.5) / 0.25)
    stl = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    torch.testing.assert_close(EvalTransform(32, MEAN, STD)(stl),
                               (TF.resize(stl, [32], antialias=True).float() / 255 - 0.5) / 0.25)
    from simclr_cli.data.pipeline.augment import eval_crop_pct

    assert eval_crop_pct(32) == eval_crop_pct(64) == 1.0 and eval_crop_pct(96) == eval_crop_pct(224) == 0.875


def test_supervised_sampler_sees_every_image_every_epoch_in_full_batches():
    # issue 11 item 7: finetune dropped floor(n/B) remainders (38% of a 410-image subset unused per epoch)
    from simclr_cli.data.pipeline.loaders import batches_per_epoch

    n, B = 410, 256
    one = GlobalBatchSampler(n, B, seed=3, drop_last=False)
    parts = [GlobalBatchSampler(n, B, seed=3, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert len(one) == batches_per_epoch(n, B, False) == 2
    for epoch in range(3):
        for s in (one, *parts):
            s.set_epoch(epoch)
        full = list(one)
        assert all(len(b) == B for b in full) and all(e == epoch for b in full for e, _ in b)
        assert {i for b in full for _, i in b} == set(range(n))  # every index, every epoch
        for b, batch in enumerate(full):  # each process gets its equal share of the same global batch
            assert list(parts[0])[b] + list(parts[1])[b] == batch and len(list(parts[0])[b]) == B // 2
        one.set_epoch(epoch, start_batch=1)  # resume inside the epoch
        assert list(one) == full[1:]
    # pretraining keeps full contrastive batches and drops the remainder
    assert len(GlobalBatchSampler(n, B, seed=3)) == 1
