"""A backbone built for one input size (ViT) at another data.image_size (issue 19 item 16): built for that size
where timm can, a recipe error (exit 2) before any run folder is written where it cannot; never an AssertionError
at the first step with a half-written stage folder."""

from __future__ import annotations

from typer.testing import CliRunner

from simclr_cli.cli import app

VIT = "vit_tiny_patch16_224"


def _pretrain(recipe, out, size):
    return CliRunner().invoke(app, ["pretrain", str(recipe), "--set", f"model.backbone={VIT}",
                                    "--set", f"data.image_size={size}", "--set", "pretrain.max_steps=1",
                                    "--set", "pretrain.knn_every=0", "--out", str(out), "--quiet"])


def test_a_vit_pretrains_at_another_image_size(tiny_recipe_file, tmp_path):
    r = _pretrain(tiny_recipe_file, tmp_path / "run", 32)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").is_file()


def test_a_size_the_backbone_cannot_take_is_a_recipe_error_before_any_folder(tiny_recipe_file, tmp_path):
    r = _pretrain(tiny_recipe_file, tmp_path / "run", 8)  # smaller than one 16 px patch
    assert r.exit_code == 2, r.output
    assert f"model.backbone: '{VIT}' takes images of a fixed size and cannot take data.image_size=8" in r.output
    assert "Traceback" not in r.output and "AssertionError" not in r.output
    assert not (tmp_path / "run" / "pretrain").exists()


def test_recipes_validate_checks_the_size_too(tiny_recipe_file):
    r = CliRunner().invoke(app, ["recipes", "validate", str(tiny_recipe_file), "--set", f"model.backbone={VIT}",
                                 "--set", "data.image_size=8"])
    assert r.exit_code == 2, r.output
    assert "--set data.image_size=8: model.backbone" in r.output and "cannot take data.image_size=8" in r.output
    r = CliRunner().invoke(app, ["recipes", "validate", str(tiny_recipe_file), "--set", f"model.backbone={VIT}",
                                 "--set", "data.image_size=32"])
    assert r.exit_code == 0, r.output
