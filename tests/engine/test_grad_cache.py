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
