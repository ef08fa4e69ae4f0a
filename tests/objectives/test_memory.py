"""SimCLRv2's memory (``pretrain.simclr.memory_size``): the loss against a naive float64 formula, the queue's
contents, resume and SIGTERM + --resume bit-identical, 1 vs 2 processes equal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from simclr_cli.engine.tasks import ContrastiveTask
from simclr_cli.errors import Interrupted, RecipeError
from simclr_cli.losses.contrastive import nt_xent, nt_xent_with_memory
from simclr_cli.models import build_simclr_model
from simclr_cli.objectives import build_objective
from simclr_cli.recipe import load_recipe
from simclr_cli.recipe.schema import ModelConfig
from simclr_cli.stages import pretrain
from tests.conftest import sigterm_once_logged

MEMORY = ["pretrain.simclr.memory_size=40", "pretrain.simclr.memory_momentum=0.9"]


def naive_memory_loss(z1, z2, memory, tau):
    """Loop formula in float64: anchor i against its positive, every other view and every memory row."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    q = F.normalize(memory.double(), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        denom = denom + sum(torch.exp(z[i] @ q[m] / tau) for m in range(q.shape[0]))
        total = total - torch.log(torch.exp(z[i] @ z[j] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("m", [0, 1, 7])
def test_loss_with_memory_matches_a_naive_formula(m):
    g = torch.Generator().manual_seed(m)
    z1, z2 = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    memory = F.normalize(torch.randn(m, 8, generator=g, dtype=torch.float64), dim=1)
    got = nt_xent_with_memory(z1, z2, memory, 0.3)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(naive_memory_loss(z1, z2, memory, 0.3).item(), rel=1e-12)
    if m == 0:
        assert got.item() == pytest.approx(nt_xent(z1, z2, 0.3).item(), rel=1e-12)


def _objective_and_model(tiny_recipe_file, sets):
    recipe = load_recipe(tiny_recipe_file, sets)
    objective = build_objective(recipe.pretrain)
    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone="test_resnet", proj_layers=2, proj_dim=16), head=objective.head,
                               image_size=16)
    objective.build(model)
    return objective, model


def test_queue_holds_exactly_the_last_memory_size_momentum_projections(tiny_recipe_file):
    """After N steps the queue is the newest memory_size momentum projections (oldest first), made by a momentum
    copy updated as m x its weights + (1 - m) x the encoder's after every step, kept here by hand."""
    objective, model = _objective_and_model(tiny_recipe_file, ["pretrain.simclr.memory_size=10",
                                                               "pretrain.simclr.memory_momentum=0.8"])
    task = ContrastiveTask(model, objective).train()
    reference = copy.deepcopy(model)  # the momentum encoder as the paper defines it, updated by hand
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    keys = []
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):  # 4 steps of 8 views each: the 10-row queue wraps around
        x1, x2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
        out = task({"view1": x1, "view2": x2})
        with torch.no_grad():
            keys.append(F.normalize(reference(torch.cat([x1, x2]))[1], dim=1))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.after_step(step)
        with torch.no_grad():
            for r, p in zip(reference.parameters(), model.parameters()):
                r.copy_(0.8 * r + 0.2 * p)
    assert int(objective.queue_count) == 32
    torch.testing.assert_close(objective.memory(), torch.cat(keys)[-10:], rtol=1e-5, atol=1e-6)
    for r, mp in zip(reference.parameters(), objective.momentum_model.parameters()):
        torch.testing.assert_close(mp, r, rtol=1e-5, atol=1e-7)
    # the next loss uses the queue as extra negatives
    x1, x2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    z1, z2 = model(torch.cat([x1, x2]))[1].chunk(2)
    expected = nt_xent_with_memory(z1, z2, objective.memory(), 0.5)
    assert task({"view1": x1, "view2": x2})["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_memory_needs_nt_xent_and_no_gradient_cache(tiny_recipe_file):
    with pytest.raises(RecipeError, match="needs pretrain.simclr.loss='nt_xent'"):
        build_objective(load_recipe(tiny_recipe_file, [*MEMORY, "pretrain.simclr.loss=nt_logistic"]).pretrain)
    sets = [*MEMORY, "pretrain.micro_batch_size=4", "pretrain.knn_every=0"]
    why = (r"pretrain.micro_batch_size=4: pretrain.simclr.memory_size=40: the memory runs the momentum encoder on "
           r"the views itself, which the gradient cache does not support; set pretrain.micro_batch_size=0")
    with pytest.raises(RecipeError, match=why):
        pretrain.run(load_recipe(tiny_recipe_file, sets), Path("r"), show_progress=False)
    # `simclr recipes validate` says so too, blaming the --set that asked for the gradient cache
    from simclr_cli.validate import validate_recipe

    with pytest.raises(RecipeError, match=r"^--set pretrain.micro_batch_size=4: " + why):
        validate_recipe(tiny_recipe_file, [f"{s}" for s in sets])


def _state(run: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run / "pretrain" / "state").glob("step-*"))[-1]
    return load_file(newest / "model.safetensors")


def _losses(run: Path) -> list:
    lines = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def test_resume_with_memory_is_bit_identical(tiny_recipe_file, tmp_path):
    """Interrupted after step 3 and resumed: the same losses, weights, momentum weights, queue and pointer."""
    recipe = load_recipe(tiny_recipe_file, [*MEMORY, "pretrain.knn_every=0", "pretrain.log_every=1"])
    pretrain.run(recipe, tmp_path / "ref", show_progress=False)
    with pytest.raises(Interrupted, match="at step 3"):
        pretrain.run(recipe, tmp_path / "run", show_progress=False, interrupt_after=3)
    pretrain.run(recipe, tmp_path / "run", show_progress=False, resume=True)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    a, b = _state(tmp_path / "run"), _state(tmp_path / "ref")
    assert {"model.objective.queue", "model.objective.queue_ptr"} <= a.keys()
    assert any(k.startswith("model.objective.momentum_model.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["model.objective.queue_count"]) == 8 * 32  # 8 steps of 2 x 16 views


def test_sigterm_then_resume_with_memory_equals_an_uninterrupted_run(tiny_recipe_file, tmp_path):
    args = ["pretrain", str(tiny_recipe_file), *(x for s in MEMORY for x in ("--set", s)), "--set", "pretrain.epochs=200",
            "--set", "pretrain.max_steps=40", "--set", "pretrain.knn_every=0", "--set", "pretrain.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "simclr_cli", *args, "--out", str(tmp_path / "ref")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "simclr_cli", *args, "--out", str(out)]
    returncode, err = sigterm_once_logged(cmd, out / "pretrain" / "metrics.jsonl", env=env)
    assert returncode == 130, err
    from simclr_cli.checkpoints import read_trainer

    assert 2 <= read_trainer(out / "pretrain" / "state")["step"] < 40, "the run finished before the signal"
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert _losses(out) == _losses(tmp_path / "ref")
    a, b = _state(out), _state(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
def test_memory_two_processes_equal_one(tmp_path):
    """The queue holds the momentum projections of the whole global batch on every process: 2 processes (gloo)
    give the losses, weights and queue of 1."""
    from tests.engine.test_multiprocess import RECIPE, _torchrun

    recipe = tmp_path / "mp.toml"
    # 6 steps of 32 views: the 40-row queue is used from step 2 and wraps from step 3. (Later steps of this tiny
    # LARS run amplify float rounding, with or without the memory; see docs/performance.md for 24 steps.)
    recipe.write_text(RECIPE.replace("[pretrain.simclr]\n", "[pretrain.simclr]\nmemory_size = 40\nmemory_momentum = 0.9\n")
                      .replace("knn_every = 1\n", "knn_every = 0\n"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", str(recipe), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun("-m", "simclr_cli", "pretrain", str(recipe), "--out", str(tmp_path / "two"))
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == 6 and [s for s, _ in l1] == [s for s, _ in l2]
    assert [x for _, x in l2] == pytest.approx([x for _, x in l1], rel=1e-5)
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert int(a["model.objective.queue_count"]) == int(b["model.objective.queue_count"]) == 6 * 32
    torch.testing.assert_close(b["model.objective.queue"], a["model.objective.queue"], rtol=1e-3, atol=5e-5)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=5e-5, msg=k)


@pytest.mark.multiprocess
def test_quickstart_with_memory_on_two_processes_follows_one_over_24_steps(tmp_path):
    """The issue's check, as a user types it: the bundled quickstart with a 256-row memory, 24 steps, 1 process
    against 2 (torchrun, gloo): every logged loss within rel 5e-3 (float rounding grows over the steps of this
    tiny run, with or without the memory), the queue full and equal in count."""
    from tests.engine.test_multiprocess import _torchrun

    sets = ["--set", "pretrain.simclr.memory_size=256", "--set", "pretrain.max_steps=24",
            "--set", "pretrain.knn_every=0", "--set", "pretrain.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", "quickstart", *sets,
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun("-m", "simclr_cli", "pretrain", "quickstart", *sets, "--out", str(tmp_path / "two"), timeout=600)
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 25))
    assert [x for _, x in l2] == pytest.approx([x for _, x in l1], rel=5e-3)
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert int(a["model.objective.queue_count"]) == int(b["model.objective.queue_count"]) == 24 * 64


@pytest.mark.slow
def test_quickstart_with_memory_sigterm_then_the_printed_resume_is_bit_identical(tmp_path):
    """The issue's check as a user meets it (slow: three quickstart runs): the bundled quickstart with a 256-row
    memory, SIGTERM mid-run, then the printed resume command run verbatim: losses, weights, queue and momentum
    encoder equal an uninterrupted run bit for bit."""
    from tests.stages.test_preemption import _resume

    args = ["pretrain", "quickstart", "--set", "pretrain.simclr.memory_size=256", "--set", "pretrain.max_steps=24",
            "--set", "pretrain.knn_every=0", "--set", "pretrain.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "simclr_cli", *args, "--out", str(tmp_path / "ref")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    returncode, err = sigterm_once_logged([sys.executable, "-m", "simclr_cli", *args, "--out", str(out)],
                                          out / "pretrain" / "metrics.jsonl", lines=6, env=env)
    assert returncode == 130, err[-3000:]
    from simclr_cli.checkpoints import read_trainer

    assert 6 <= read_trainer(out / "pretrain" / "state")["step"] < 24, "the run finished before the signal"
    resumed = _resume(err)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(tmp_path / "ref") and len(_losses(out)) == 24
    a, b = _state(out), _state(tmp_path / "ref")
    assert int(a["model.objective.queue_count"]) == 24 * 64
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
