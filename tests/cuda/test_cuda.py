"""The CUDA path, checked on a real GPU (issue 14 section 1). Every test here is marked ``cuda``:
collected everywhere, skipped where ``torch.cuda.is_available()`` is False (tests/conftest.py),
run by ``pytest -m cuda`` on a GPU machine (``bash benchmarks/gpu_check.sh`` does that).

What each one proves, and what it cannot with one GPU, is in its docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from simclr_cli.data.pipeline.augment import SimCLRAugment
from simclr_cli.data.pipeline.batched import BatchedAugment, pack
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.engine.tasks import ContrastiveTask, GradCacheContrastiveTask
from simclr_cli.models import build_simclr_model
from simclr_cli.models.global_bn import GlobalBatchNorm
from simclr_cli.recipe import load_recipe
from simclr_cli.recipe.schema import AugmentConfig, ModelConfig
from simclr_cli.stages import pretrain

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g) * 255
    return torch.nn.functional.avg_pool2d(x, 5, 1, 2).to(torch.uint8)  # smooth, like photos


@pytest.mark.parametrize("cropped", [False, True])
def test_batched_augment_on_cuda_equals_cpu(cropped):
    """Same images, same packed parameters: the batched backend gives the same pixels on CUDA as on
    CPU, within one intensity level after normalization (roi_align, hue and blur in float32 may round
    differently on the GPU), and nearly everywhere far closer."""
    ref = SimCLRAugment(AugmentConfig(blur=True, strength=1.0), 32, MEAN, STD)
    n, h, w = 256, 40, 48
    imgs = _images(n, h, w)
    params = torch.stack([pack(ref.sample(torch.Generator().manual_seed(i), h, w)) for i in range(n)])
    if cropped:
        from torchvision.transforms.v2 import functional as TF

        imgs = torch.stack([TF.resized_crop(imgs[i], *[int(v) for v in params[i, :4]], [32, 32], antialias=True)
                            for i in range(n)])
    aug = BatchedAugment(ref)
    cpu = aug(imgs, params, cropped=cropped)
    gpu = aug(imgs.cuda(), params.cuda(), cropped=cropped)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (n, 3, 32, 32)
    diff = (gpu.cpu() - cpu).abs()
    level = 1 / 255 / min(STD)  # one uint8 step, normalized
    assert diff.max().item() <= level, f"max {diff.max().item():.3g} > one level {level:.3g}"
    assert diff.mean().item() < 1e-2 * level


def _train(tmp_path: Path, name: str, *overrides: str) -> list[float]:
    """A few logged pretrain steps on the GPU (the stage picks CUDA when one is visible)."""
    base = ["data.dataset='synthetic'", "data.synthetic_train_size=1024", "data.val_split=''", "data.num_workers=0",
            "data.image_size=32", "model.backbone='resnet18'", "model.cifar_stem=true", "augment.blur=false",
            "augment.strength=0.5", "pretrain.batch_size=256", "pretrain.epochs=2", "pretrain.knn_every=0",
            "pretrain.log_every=1", "pretrain.save_every=0", "pretrain.lr=0.3", "pretrain.warmup_epochs=0.5"]
    recipe = load_recipe("quickstart", [*base, *overrides])
    pretrain.run(recipe, tmp_path / name, show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / name / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_bf16_with_and_without_channels_last_train_the_same(tmp_path):
    """8 steps of resnet18 (CIFAR stem, B=256) in bf16 autocast, NCHW against channels_last: the
    losses agree closely (cuDNN picks other kernels for NHWC, so not bit for bit), and both stay near
    the fp32 run."""
    cl = _train(tmp_path, "cl", "pretrain.mixed_precision='bf16'", "pretrain.channels_last=true")
    plain = _train(tmp_path, "plain", "pretrain.mixed_precision='bf16'", "pretrain.channels_last=false")
    fp32 = _train(tmp_path, "fp32", "pretrain.mixed_precision='no'")
    assert len(cl) == len(plain) == len(fp32) == 8
    assert all(torch.isfinite(torch.tensor(cl + plain)))
    assert cl == pytest.approx(plain, rel=2e-2)
    assert cl == pytest.approx(fp32, rel=5e-2)
    assert cl[-1] < cl[0]  # it trains


def test_fp16_with_the_gradient_cache_trains(tmp_path):
    """Issue 19 item 12: fp16 with ``pretrain.micro_batch_size`` crashed at step 1 (``Attempted step but _scale is
    None``). 8 steps of resnet18 in fp16 with micro-batches of 64: finite losses, close to the same run in
    fp16 without the cache (BN sees chunks of 128 views instead of 512, so not equal), and it trains."""
    cached = _train(tmp_path, "cached", "pretrain.mixed_precision='fp16'", "pretrain.micro_batch_size=64")
    plain = _train(tmp_path, "plain", "pretrain.mixed_precision='fp16'")
    assert len(cached) == len(plain) == 8
    assert all(torch.isfinite(torch.tensor(cached)))
    assert cached == pytest.approx(plain, rel=0.1)
    assert cached[-1] < cached[0]


def test_sync_batchnorm_on_cuda_equals_global_bn_on_cpu(tmp_path):
    """torch's SyncBatchNorm (what a multi-GPU run uses) against our GlobalBatchNorm math on CPU.

    With one GPU there is one rank, and ``nn.SyncBatchNorm.forward`` then skips synchronization.
    So this calls SyncBN's autograd function directly in a one-rank NCCL group: the CUDA kernels of
    the synchronized path run (batch_norm_stats, the all-gather, batch_norm_gather_stats_with_counts,
    batch_norm_elemt, the backward reduce and its all-reduce), and forward, input gradient, weight
    and bias gradients and running statistics must equal GlobalBatchNorm's on CPU (which
    tests/engine proves equal to one big batch across 2 real processes). Then two ranks of unequal
    size are emulated through the combining kernel: their merged statistics must equal the whole
    batch's. What one GPU cannot prove: NCCL traffic between devices.
    """
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 16, 8, 8, generator=g) * 3 + 1
    grad_out = torch.randn(x.shape, generator=g)
    weight, bias = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)

    ref = GlobalBatchNorm(16, momentum=0.1).train()
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(grad_out)

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        xc = x.cuda().requires_grad_()
        wc, bc = weight.cuda().requires_grad_(), bias.cuda().requires_grad_()
        rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
        yc = SyncBNFunction.apply(xc, wc, bc, rm, rv, ref.eps, 0.1, group, 1)
        yc.backward(grad_out.cuda())
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yc.detach().cpu(), yr.detach(), **close)
    torch.testing.assert_close(xc.grad.cpu(), xr.grad, **close)
    torch.testing.assert_close(wc.grad.cpu(), ref.weight.grad, **close)
    torch.testing.assert_close(bc.grad.cpu(), ref.bias.grad, **close)
    torch.testing.assert_close(rm.cpu(), ref.running_mean, **close)
    torch.testing.assert_close(rv.cpu(), ref.running_var, **close)

    # Two ranks of 20 and 28 samples, merged by the kernel SyncBN uses across ranks.
    xg = x.cuda()
    parts = (xg[:20], xg[20:])
    stats = [torch.batch_norm_stats(p, ref.eps) for p in parts]
    mean, invstd = torch.batch_norm_gather_stats_with_counts(
        xg, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]), None, None, 0.1, ref.eps,
        torch.tensor([20.0 * 64, 28.0 * 64], device="cuda"))
    whole = x.double()
    m64 = whole.mean((0, 2, 3))
    v64 = whole.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.cpu().double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.cpu().double(), (v64 + ref.eps).rsqrt(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro", [64])
def test_grad_cache_lowers_peak_cuda_memory(micro):
    """One step of resnet18 (CIFAR stem) at B=512 (1024 views): the gradient cache's peak
    ``torch.cuda.max_memory_allocated`` is well below the plain step's, for the same loss."""
    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone="resnet18", cifar_stem=True, proj_layers=2)).cuda().train()
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.randn(512, 3, 32, 32, generator=g).cuda() for k in ("view1", "view2")}
    acc = make_accelerator("no")  # fp32 for both steps, whatever an earlier test left in Accelerate's state
    peaks, losses = {}, {}
    for use_cache in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if use_cache:
            out = GradCacheContrastiveTask(model, "nt_xent", 0.5, 0.5, micro).forward_backward(batch, acc)
        else:
            out = ContrastiveTask(model, "nt_xent", 0.5, 0.5)(batch)
            out["loss"].backward()
        torch.cuda.synchronize()
        peaks[use_cache] = torch.cuda.max_memory_allocated()
        losses[use_cache] = out["loss"].item()
    print(f"peak MiB: plain {peaks[False] / 2**20:.0f}, gradient cache (micro {micro}) {peaks[True] / 2**20:.0f}")
    assert peaks[True] < 0.6 * peaks[False]
    # BN sees chunks of 2 x micro views instead of the whole batch, so the losses differ a little
    assert losses[True] == pytest.approx(losses[False], rel=0.1)


_RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    from pathlib import Path
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    from safetensors.torch import load_file
    from simclr_cli.errors import Interrupted
    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    out = Path(sys.argv[1])
    recipe = load_recipe("quickstart", [
        "data.dataset='synthetic'", "data.synthetic_train_size=512", "data.val_split=''", "data.num_workers=0",
        "data.image_size=32", "model.backbone='resnet18'", "model.cifar_stem=true", "augment.blur=true",
        "pretrain.batch_size=128", "pretrain.epochs=3", "pretrain.knn_every=0", "pretrain.log_every=1",
        "pretrain.mixed_precision='bf16'", "pretrain.lr=0.3", "pretrain.warmup_epochs=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain.run(recipe, out / "full", show_progress=False)
        try:
            pretrain.run(recipe, out / "cut", show_progress=False, interrupt_after=6)  # mid-epoch 2
        except Interrupted:
            pass
        pretrain.run(recipe, out / "cut", show_progress=False, resume=True)
    nondeterministic = sorted({str(w.message).split(" does not")[0] for w in caught
                               if "deterministic" in str(w.message)})
    full = load_file(out / "full" / "pretrain" / "model.safetensors")
    cut = load_file(out / "cut" / "pretrain" / "model.safetensors")
    differ = [k for k in full if not torch.equal(full[k], cut[k])]
    print(json.dumps({"device": torch.cuda.get_device_name(), "tensors": len(full), "differ": differ,
                      "nondeterministic_ops": nondeterministic}))
""")


def test_resume_is_bit_exact_on_cuda_with_deterministic_algorithms(tmp_path):
    """12 steps of resnet18 (CIFAR stem, bf16, batched augmentation on the GPU) straight through,
    against 6 steps, a stop, and a resume: every weight equal bit for bit.

    Runs in a fresh process, so that ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set before cuBLAS starts.
    ``warn_only=True``: on CUDA, AdaptiveAvgPool2d's backward (timm's ResNet pooling) and the
    NLL loss inside cross-entropy have no deterministic kernel, and strict mode would refuse them;
    the ops that warned are printed. Bit-exactness is asserted all the same.
    """
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["tensors"] > 10
    assert result["differ"] == [], f"weights differ after resume: {result['differ'][:5]}"


def test_stages_pick_the_gpu():
    """Every stage builds its Accelerator here: with a GPU visible it must train there, in bf16 too."""
    assert make_accelerator("bf16").device.type == "cuda"
