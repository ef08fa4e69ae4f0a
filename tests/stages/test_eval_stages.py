"""linear-eval, knn and finetune on tiny data: frozen stays frozen, outputs, chaining, resume, baselines."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from simclr_cli.checkpoints import read_metadata, sub_state
from simclr_cli.cli import app
from simclr_cli.engine.tasks import ClassificationTask
from simclr_cli.errors import Interrupted, UsageError
from simclr_cli.models.classifier import Classifier
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, finetune, knn, linear_eval, pretrain


@pytest.fixture
def run_dir(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=1", "model.proj_layers=3"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    return tmp_path / "run"


def _inputs(run_dir, *overrides):
    src = common.find_checkpoint(run_dir, ("pretrain",))
    return src, common.inherit_recipe(src, None, list(overrides))


@pytest.mark.parametrize("mode", ["cached", "paper"])
def test_linear_eval_keeps_the_encoder_bit_identical(run_dir, mode):
    src, recipe = _inputs(run_dir, f'linear_eval.mode="{mode}"', "linear_eval.epochs=2", "linear_eval.batch_size=16")
    summary = linear_eval.run(recipe, src, run_dir, show_progress=False)
    before = load_file(run_dir / "pretrain" / "model.safetensors")
    after = load_file(run_dir / "linear_eval" / "model.safetensors")
    backbone = sub_state(before, "backbone")
    assert backbone.keys() == sub_state(after, "backbone").keys()
    for k, v in sub_state(after, "backbone").items():  # weights and BN buffers, num_batches_tracked included
        assert torch.equal(v, backbone[k]), k
    assert set(sub_state(after, "head")) == {"0.weight", "0.bias"}  # the linear layer on h
    assert {"top1", "top5", "train_images", "test_images"} <= set(summary)
    assert summary["train_images"] == 64 and summary["test_images"] == 32
    assert 0 <= summary["top1"] <= summary["top5"] <= 100
    on_disk = json.loads((run_dir / "linear_eval" / "summary.json").read_text())
    assert on_disk["top1"] == summary["top1"] and on_disk["mode"] == mode
    assert (run_dir / "linear_eval" / "metrics.jsonl").read_text().strip()


def test_frozen_task_keeps_bn_in_eval_mode_and_only_trains_the_linear_layer():
    import timm

    backbone = timm.create_model("test_resnet", num_classes=0)
    model = Classifier(backbone, [], 3)
    task = ClassificationTask(model, frozen=True).train()
    assert not backbone.training and model.linear.training
    assert [n for n, p in task.named_parameters() if p.requires_grad] == ["model.head.0.weight", "model.head.0.bias"]
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        out = task({"image": torch.randn(8, 3, 16, 16), "label": torch.randint(0, 3, (8,))})
        out["loss"].backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_linear_eval_on_head_layers(run_dir):
    src, recipe = _inputs(run_dir, 'linear_eval.on="head:2"', "linear_eval.epochs=2")
    linear_eval.run(recipe, src, run_dir, show_progress=False)
    head = sub_state(load_file(run_dir / "linear_eval" / "model.safetensors"), "head")
    assert "2.weight" in head and "0.0.weight" in head  # two head layers kept, then the linear layer
    src, recipe = _inputs(run_dir, 'linear_eval.on="head:4"')
    with pytest.raises(UsageError, match="has 3 layer"):
        linear_eval.run(recipe, src, run_dir, overwrite=True, show_progress=False)


def test_knn_stage_matches_the_pretrain_monitor(run_dir):
    src, recipe = _inputs(run_dir, "knn.k=5")  # the tiny recipe's monitor uses k=5, t=0.1
    summary = knn.run(recipe, src, run_dir, show_progress=False)
    monitor = json.loads((run_dir / "pretrain" / "summary.json").read_text())["knn_top1"]
    assert summary["knn_top1"] == pytest.approx(monitor, abs=1e-3)
    assert summary["knn_top5"] >= summary["knn_top1"]
    with pytest.raises(UsageError, match="already holds a finished knn"):
        knn.run(recipe, src, run_dir, show_progress=False)


def test_finetune_outputs_and_checkpoint(run_dir):
    src, recipe = _inputs(run_dir, 'finetune.labels="50%"', "finetune.epochs=2", "finetune.batch_size=8",
                          "finetune.from_head_layer=1")
    summary = finetune.run(recipe, src, run_dir, show_progress=False)
    d = run_dir / "finetune"
    assert {p.name for p in d.iterdir()} >= {"model.safetensors", "labels.txt", "summary.json", "recipe.toml",
                                             "metrics.jsonl"}
    assert len((d / "labels.txt").read_text().splitlines()) == summary["labeled_images"]
    assert summary["labels"] == "50%" and summary["steps"] == 2 * -(-summary["labeled_images"] // 8)
    assert 0 <= summary["top1"] <= summary["top5"] <= 100 and summary["test_images"] == 32
    tensors = load_file(d / "model.safetensors")
    meta = read_metadata(d / "model.safetensors")
    assert meta["simclr.stage"] == "finetune" and meta["simclr.head_layers"] == "1"
    assert int(meta["simclr.num_classes"]) == len(json.loads(meta["simclr.classes"])) == 10
    head = sub_state(tensors, "head")
    assert head["1.weight"].shape[0] == 10  # the classifier after the kept head layer
    # the backbone was trained (not frozen)
    before = sub_state(load_file(run_dir / "pretrain" / "model.safetensors"), "backbone")
    assert any(not torch.equal(v, before[k]) for k, v in sub_state(tensors, "backbone").items())


def test_finetune_resume_matches_uninterrupted(run_dir, tmp_path):
    src, recipe = _inputs(run_dir, 'finetune.labels="50%"', "finetune.epochs=3", "finetune.batch_size=8")
    finetune.run(recipe, src, tmp_path / "full", show_progress=False)
    with pytest.raises(Interrupted, match="--resume"):
        finetune.run(recipe, src, tmp_path / "cut", show_progress=False, interrupt_after=5)
    finetune.run(recipe, src, tmp_path / "cut", resume=True, show_progress=False)
    a = load_file(tmp_path / "full" / "finetune" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "finetune" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_chains_with_no_arguments_and_random_baseline(tiny_recipe_file):
    runner = CliRunner()
    r = runner.invoke(app, ["linear-eval"])
    assert r.exit_code == 2 and "no run under ./runs" in r.output
    assert runner.invoke(app, ["pretrain", str(tiny_recipe_file), "-q", "--set", "pretrain.knn_every=0"]).exit_code == 0
    r = runner.invoke(app, ["linear-eval", "--set", "linear_eval.epochs=2"])
    assert r.exit_code == 0, r.output
    assert "using runs/tiny/pretrain/model.safetensors" in r.output and "top1" in r.output
    r = runner.invoke(app, ["linear-eval", "--init", "random", "--set", "linear_eval.epochs=2"])
    assert r.exit_code == 0, r.output
    rnd = json.loads(open("runs/tiny/random_init/linear_eval/summary.json").read())
    assert rnd["init"] == "random" and rnd["source"] == "random init"
    r = runner.invoke(app, ["finetune", "--labels", "20-per-class", "--set", "finetune.epochs=1"])
    assert r.exit_code == 2 and "use a smaller number per class" in r.output  # 64 images, 10 classes
    r = runner.invoke(app, ["finetune", "runs/tiny", "--labels", "50%", "--set", "finetune.epochs=1"])
    assert r.exit_code == 0, r.output
    assert json.loads(open("runs/tiny/finetune/summary.json").read())["labels"] == "50%"
    r = runner.invoke(app, ["knn", "tiny", "--k", "5"])  # a run name under ./runs
    assert r.exit_code == 0, r.output
    assert json.loads(open("runs/tiny/knn/summary.json").read())["k"] == 5
    r = runner.invoke(app, ["linear-eval", "--on", "head:x"])
    assert r.exit_code == 2 and "expected 'h' or 'head:K'" in r.output


def test_option_errors_come_before_output_errors_and_missing_stages_name_the_next_step(run_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", str(run_dir), "--labels", "50%", "--set", "finetune.epochs=1", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", str(run_dir), "--labels", "150%"])  # finetune/ exists: still the real problem
    assert r.exit_code == 2 and "the percentage must be in (0, 100]" in r.output
    r = runner.invoke(app, ["distill"])  # no finetune checkpoint under ./runs
    assert r.exit_code == 2 and "simclr finetune --labels" in r.output


def test_random_init_never_loads_timm_pretrained_weights(tiny_recipe_file, monkeypatch):
    """Issue 11 item 1: with model.pretrained = true in the run's recipe, --init random rebuilt the encoder
    with timm's ImageNet weights while calling it random."""
    import timm

    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import common

    calls = []
    real = timm.create_model

    def create_model(*args, **kwargs):
        calls.append(kwargs.get("pretrained", False))
        return real(*args, **{**kwargs, "pretrained": False})  # no download in tests either way

    monkeypatch.setattr(timm, "create_model", create_model)
    recipe = load_recipe(tiny_recipe_file, ["model.pretrained=true"])
    common.load_encoder(None, recipe, "random")
    assert calls == [False]
