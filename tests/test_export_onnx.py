"""simclr export --format onnx (dynamic batch, onnxruntime == PyTorch) and the timm folder's model card."""

from __future__ import annotations

import builtins
import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from simclr_cli.checkpoints import prefixed_state, save_weights
from simclr_cli.checkpoints.metadata import checkpoint_metadata
from simclr_cli.cli import app
from simclr_cli.models import build_simclr_model
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, pretrain


def _saved_checkpoint(run: Path, backbone: str, cifar_stem: bool, size: int):
    """A pretrain checkpoint written with the project's own save functions, BN statistics made non-trivial so
    that eval-mode BN matters."""
    recipe = load_recipe("quickstart", [f"model.backbone={backbone}", f"model.cifar_stem={str(cifar_stem).lower()}",
                                        f"data.image_size={size}"])
    torch.manual_seed(0)
    model = build_simclr_model(recipe.model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = run / "pretrain" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_weights(path, {**prefixed_state("backbone", model.backbone), **prefixed_state("head", model.head)},
                 checkpoint_metadata(recipe, model, "pretrain"))
    return recipe, path


@pytest.mark.parametrize("cifar_stem", [False, True], ids=["resnet18", "resnet18-cifar-stem"])
def test_onnx_export_matches_pytorch_at_two_batch_sizes(tmp_path, cifar_stem):
    import onnx
    import onnxruntime as ort

    recipe, ckpt = _saved_checkpoint(tmp_path / "run", "resnet18", cifar_stem, 32)
    r = CliRunner().invoke(app, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    assert "model.onnx" in r.output and "matches PyTorch" in r.output
    path = tmp_path / "onnx" / "model.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "model.onnx"]  # one file, no .data
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch dimension
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["cifar_stem"] is cifar_stem and config["num_features"] == 512

    encoder = common.load_encoder(common.find_checkpoint(tmp_path / "run", ("pretrain",)), recipe, "pretrained")
    encoder = encoder.backbone.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 5):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            expected = encoder(x).numpy()
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        assert got.shape == (n, 512)
        assert abs(got - expected).max() <= 1e-4

    again = CliRunner().invoke(app, ["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_onnx_extra_missing_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxscript"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--format", "onnx"])
    assert r.exit_code == 2 and "pip install 'simclr-cli[onnx]'" in r.output and "Traceback" not in r.output


def test_unknown_format_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(app, ["export", "--format", "tflite"])
    assert r.exit_code == 2 and "timm or onnx" in r.output


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_timm_folder_has_a_model_card_and_loads_offline(tiny_recipe_file, tmp_path, monkeypatch):
    import timm

    recipe = load_recipe(tiny_recipe_file, ["pretrain.epochs=1", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    runner = CliRunner()
    assert runner.invoke(app, ["knn", str(tmp_path / "run"), "-q"]).exit_code == 0
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output

    card = (tmp_path / "exp" / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "timm" and header["license"]
    assert {"image-feature-extraction", "simclr"} <= set(header["tags"])
    knn = json.loads((tmp_path / "run" / "knn" / "summary.json").read_text())
    pre = json.loads((tmp_path / "run" / "pretrain" / "summary.json").read_text())
    (result,) = [m for res in header["model-index"][0]["results"] for m in res["metrics"] if m["name"] == "kNN top-1 (%)"]
    assert result["value"] == pytest.approx(knn["knn_top1"])
    body = card.split("---\n", 2)[2]
    assert f"| kNN top-1 | {knn['knn_top1']:.2f} |" in body
    assert "| linear eval top-1 | not measured |" in body  # no linear-eval run
    assert f"| steps trained | {pre['steps']} |" in body and f"| training images | {pre['images']} |" in body
    for text in ("`synthetic`", "`test_resnet`", "temperature 0.5", "| global batch | 16 |", "local-dir:exp"):
        assert text in body

    _no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)  # the card's snippet uses the folder name
    model = timm.create_model("local-dir:exp", pretrained=True).eval()
    ours = common.load_encoder(common.find_checkpoint(tmp_path / "run", ("pretrain",)), recipe, "pretrained").backbone
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours.eval()(x))


def test_model_card_of_a_cifar_stem_run_without_evaluations(tmp_path):
    from simclr_cli.export import export_timm

    _, ckpt = _saved_checkpoint(tmp_path / "run", "test_resnet", True, 32)
    export_timm(ckpt, tmp_path / "exp")
    card = (tmp_path / "exp" / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert "model-index" not in header and "datasets" not in header  # nothing measured, synthetic data
    assert card.count("not measured") == 4 and "load_timm(\"exp\")" in card and "CIFAR stem" in card


def test_model_card_leaves_out_numbers_of_another_encoder(tiny_recipe_file, tmp_path):
    """Review: the card read RUN/knn/summary.json whatever encoder it measured: a kNN of the encoder that a
    `pretrain --overwrite` has since replaced, or the pretrain encoder's kNN on a distilled student's card."""
    import os

    from simclr_cli.export import run_summaries

    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.max_steps=1", "pretrain.knn_every=0"]), run,
                 show_progress=False)
    assert CliRunner().invoke(app, ["knn", str(run), "-q"]).exit_code == 0
    ckpt = run / "pretrain" / "model.safetensors"
    assert set(run_summaries(run, ckpt)) == {"pretrain", "knn"}
    # the pretrain checkpoint replaced after the kNN was measured (as `pretrain --overwrite` does): other bytes
    from safetensors.torch import load_file, save_file

    from simclr_cli.checkpoints import read_metadata

    tensors = load_file(ckpt)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(ckpt), metadata=read_metadata(ckpt))
    assert set(run_summaries(run, ckpt)) == set()  # neither the kNN nor the pretrain summary measured these bytes
    knn_time = (run / "knn" / "summary.json").stat().st_mtime
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    assert "| kNN top-1 | not measured |" in (tmp_path / "exp" / "README.md").read_text()
    # another stage's checkpoint (a distilled student): neither the pretrain nor its kNN numbers are its own
    other = run / "distill" / "model.safetensors"
    other.parent.mkdir()
    other.write_bytes(ckpt.read_bytes())
    os.utime(other, (knn_time - 5, knn_time - 5))
    assert run_summaries(run, other) == {}


def test_model_card_matches_summaries_by_checkpoint_identity_not_folder_name(tiny_recipe_file, tmp_path):
    """Issue 19 item 11: `simclr knn runs/A --out runs/B` wrote A's kNN into B/knn, and B's card showed it: summaries
    were matched by the parent folder's name. They are matched by the resolved path and a digest of the bytes."""
    from simclr_cli.export import run_summaries

    for name, seed in (("A", 0), ("B", 1)):
        pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.max_steps=1", "pretrain.knn_every=0", f"seed={seed}"]),
                     tmp_path / name, show_progress=False)
    r = CliRunner().invoke(app, ["knn", str(tmp_path / "A"), "--out", str(tmp_path / "B"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "B"), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "| kNN top-1 | not measured |" in card and "kNN top-1 (%)" not in card
    assert set(run_summaries(tmp_path / "B", tmp_path / "B" / "pretrain" / "model.safetensors")) == {"pretrain"}
    knn = json.loads((tmp_path / "B" / "knn" / "summary.json").read_text())
    assert knn["source_path"] == str((tmp_path / "A" / "pretrain" / "model.safetensors").resolve())
    # A's own card does show it: the summary is matched to A's checkpoint wherever it was written
    assert set(run_summaries(tmp_path / "B", tmp_path / "A" / "pretrain" / "model.safetensors")) == {"knn"}


def test_model_card_does_not_pass_a_probe_on_head_features_for_the_encoders(tiny_recipe_file, tmp_path):
    """Issue 19 item 10: after `linear-eval --on head:1` the card said "linear classifier on the frozen encoder" with
    that top-1, in the Hub model-index too, although the export holds the backbone only."""
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.max_steps=1", "pretrain.knn_every=0"]), run,
                 show_progress=False)
    r = CliRunner().invoke(app, ["linear-eval", str(run), "--on", "head:1", "-q", "--set", "linear_eval.epochs=1"])
    assert r.exit_code == 0, r.output
    lin = json.loads((run / "linear_eval" / "summary.json").read_text())
    assert lin["on"] == "head:1"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "exp" / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    names = [m["name"] for res in header.get("model-index", [{"results": []}])[0]["results"] for m in res["metrics"]]
    assert not any("linear" in n for n in names)
    assert "on the frozen encoder" not in card
    assert f"| linear eval top-1 on head:1 (projection head) | {lin['top1']:.2f} |" in card
    assert "| linear eval top-1 | " not in card
