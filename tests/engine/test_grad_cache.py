"""Gradient cache: exact full-batch gradients in micro-batches (backbone without BatchNorm)."""

import pytest
import torch
from accelerate import Accelerator

from simclr_cli.engine.tasks import ContrastiveTask, GradCacheContrastiveTask
from simclr_cli.models import build_simclr_model
from simclr_cli.recipe import load_recipe
from simclr_cli.recipe.schema import ModelConfig
from simclr_cli.stages import pretrain


def _grads(task, batch, use_cache):
    task.zero_grad()
    if use_cache:
        out = task.forward_backward(batch, Accelerator(cpu=True))
    else:
        out = task(batch)
        out["loss"].backward()
    return out["loss"].item(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [1, 3, 4])
def test_grad_cache_equals_full_batch_without_bn(micro):
    torch.manual_seed(0)
    # LayerNorm, no BN; float64 so that only a real difference can exceed the tolerance
    model = build_simclr_model(ModelConfig(backbone="test_vit", proj_layers=2, proj_dim=16)).double()
    g = torch.Generator().manual_seed(1)
    size = model.backbone.default_cfg["input_size"][-1]
    batch = {k: torch.randn(8, 3, size, size, generator=g, dtype=torch.float64) for k in ("view1", "view2")}
    full = ContrastiveTask(model, "nt_xent", 0.2, 0.5)
    cached = GradCacheContrastiveTask(model, "nt_xent", 0.2, 0.5, micro_batch_size=micro)
    loss_a, grads_a = _grads(full, batch, use_cache=False)
    loss_b, grads_b = _grads(cached, batch, use_cache=True)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-12, msg=name)


def test_grad_cache_replays_rng_and_updates_bn_stats_once():
    """Dropout in the encoder: the second pass must see the same mask (RNG replayed)."""
    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone="test_resnet", proj_layers=2, proj_dim=8))
    model.head[0].append(torch.nn.Dropout(0.5))
    task = GradCacheContrastiveTask(model, "nt_xent", 0.5, 0.5, micro_batch_size=4)
    batch = {"view1": torch.randn(4, 3, 32, 32), "view2": torch.randn(4, 3, 32, 32)}
    bn = model.backbone.bn1 if hasattr(model.backbone, "bn1") else next(
        m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.num_batches_tracked.item()
    # one chunk: with the same dropout mask the gradient cache equals a plain full step
    torch.manual_seed(5)
    _, cached = _grads(task, batch, use_cache=True)
    assert bn.num_batches_tracked.item() == before + 1
    torch.manual_seed(5)
    _, plain = _grads(ContrastiveTask(model, "nt_xent", 0.5, 0.5), batch, use_cache=False)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pretrain_with_micro_batches_runs(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.micro_batch_size=4", "pretrain.epochs=1", "pretrain.knn_every=0"])
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert summary["steps"] == 4 and summary["final_loss"] == summary["final_loss"]


class _Recorder(torch.nn.Module):
    """(h, z) = (x, x) for flat 'images'; records what each forward call saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, x):
        self.seen.append(x[:, 0].tolist())
        z = torch.cat([x * self.w, torch.ones_like(x)], dim=1)
        return x, z


@pytest.mark.parametrize("n, micro", [(8, 4), (8, 3), (10, 2), (5, 1)])
def test_grad_cache_chunks_never_hold_both_views_of_an_image(n, micro):
    """Issue 11 item 4: a chunk holding both views of its images leaks BN statistics between positives."""
    model = _Recorder()
    task = GradCacheContrastiveTask(model, "nt_xent", 0.5, 0.5, micro_batch_size=micro)
    batch = {"view1": torch.arange(n, dtype=torch.float32)[:, None], "view2": 1000 + torch.arange(n, dtype=torch.float32)[:, None]}
    task.forward_backward(batch, Accelerator(cpu=True))
    assert len(model.seen) == 2 * -(-n // micro)  # both passes, one call per chunk
    for seen in model.seen:
        ids = [int(v) for v in seen]
        assert not set(i for i in ids if i < 1000) & set(i - 1000 for i in ids if i >= 1000), ids
    first = model.seen[: len(model.seen) // 2]
    assert sorted(int(v) for c in first for v in c) == [*range(n), *range(1000, 1000 + n)]  # every view once


def test_grad_cache_with_bn_equals_per_chunk_bn_in_float64():
    """With BN the gradient cache equals the full-batch loss whose BN statistics come from its chunks."""
    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone="test_resnet", proj_layers=3, proj_dim=16)).double()
    g = torch.Generator().manual_seed(1)
    n, micro = 9, 4
    x1, x2 = (torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    task = GradCacheContrastiveTask(model, "nt_xent", 0.2, 0.5, micro_batch_size=micro)
    _, cached = _grads(task, {"view1": x1, "view2": x2}, use_cache=True)
    # the reference: the same chunks, with gradients all the way, one loss over every embedding
    model.zero_grad()
    z1, z2 = [None] * 3, [None] * 3
    chunks = GradCacheContrastiveTask.chunks(n, micro)
    for k, ((a1, b1), (a2, b2)) in enumerate(chunks):
        _, z = model(torch.cat([x1[a1:b1], x2[a2:b2]]))
        z1[k], z2[(k + 1) % 3] = z[: b1 - a1], z[b1 - a1:]
    from simclr_cli.losses.contrastive import nt_xent

    nt_xent(torch.cat(z1), torch.cat(z2), 0.2).backward()
    ref = {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}
    assert ref.keys() == cached.keys() and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(cached[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_grad_cache_moves_bn_running_stats_once_per_step():
    """num_batches_tracked counts steps, and the running mean moves by momentum x the chunks' mean."""
    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone="test_resnet", proj_layers=2, proj_dim=8))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    task = GradCacheContrastiveTask(model, "nt_xent", 0.5, 0.5, micro_batch_size=2)
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    inputs = []
    hook = bn.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].detach().clone()))
    before_mean, before_count = bn.running_mean.clone(), bn.num_batches_tracked.item()
    task.forward_backward({"view1": x1, "view2": x2}, Accelerator(cpu=True))
    hook.remove()
    assert bn.num_batches_tracked.item() == before_count + 1
    second_pass = inputs[3:]  # 3 chunks, two passes
    chunk_means = torch.stack([x.mean(dim=(0, 2, 3)) for x in second_pass]).mean(0)
    expected = (1 - bn.momentum) * before_mean + bn.momentum * chunk_means
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)


def test_fp16_loss_scaling_with_micro_batches_trains_through_the_real_loop(tiny_recipe_file, tmp_path, monkeypatch):
    """Issue 19 item 12: fp16 + micro_batch_size crashed at step 1 (`Attempted step but _scale is None`): the cached
    gradients were scaled by hand and scaler.scale() was never called. A CPU GradScaler stands in for the fp16 one
    (same scale / unscale / step / update, on the real pretrain loop); a scale that is a power of two is undone
    exactly, so the weights equal bit for bit those of the same run without loss scaling."""
    from safetensors.torch import load_file

    from simclr_cli.stages import scaffold

    real = scaffold.make_accelerator
    scalers = []

    def with_scaler(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
        scalers.append(accelerator.scaler)
        return accelerator

    recipe = load_recipe(tiny_recipe_file, ["pretrain.micro_batch_size=4", "pretrain.epochs=1", "pretrain.knn_every=0"])
    plain = pretrain.run(recipe, tmp_path / "plain", show_progress=False)
    monkeypatch.setattr(scaffold, "make_accelerator", with_scaler)
    scaled = pretrain.run(recipe, tmp_path / "scaled", show_progress=False)
    assert scaled["steps"] == plain["steps"] == 4
    assert scalers and scalers[0].get_scale() == 2.0 ** 14  # it scaled, stepped and grew every 2 finite steps
    a = load_file(tmp_path / "plain" / "pretrain" / "model.safetensors")
    b = load_file(tmp_path / "scaled" / "pretrain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
