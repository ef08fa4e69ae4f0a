"""Take an encoder out of the toolkit: a timm-loadable folder, and ways to load it back.

``export_timm(checkpoint, out_dir)`` writes ``model.safetensors`` (backbone only, plain timm keys)
and ``config.json`` in timm's Hugging Face layout (``architecture``, ``num_features``,
``pretrained_cfg`` with input size, mean/std, crop) plus a ``simclr`` block (CIFAR stem, stage,
source). Plain backbones then load with timm alone::

    timm.create_model(name, pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file=f"{out_dir}/model.safetensors"))

Backbones trained with the CIFAR stem have a different first layer than timm builds; load those
with :func:`load_timm` (or create the model, apply ``simclr_cli.models.apply_cifar_stem``, then
``load_state_dict``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from simclr_cli.checkpoints import MODEL_FILE, load_weights, save_weights, sub_state
from simclr_cli.errors import UsageError
from simclr_cli.recipe import parse_toml, recipe_from_dict
from simclr_cli.utils import atomic_write_text


def export_timm(checkpoint: Path, out_dir: Path, *, overwrite: bool = False) -> dict:
    """Write the timm folder for ``checkpoint``'s backbone; returns the config written."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if (out_dir / MODEL_FILE).exists() and not overwrite:
        raise UsageError(f"{out_dir / MODEL_FILE} exists; pass --overwrite to replace it")
    tensors, meta = load_weights(checkpoint)
    backbone = sub_state(tensors, "backbone")
    if not backbone or "simclr.backbone" not in meta:
        raise UsageError(f"{checkpoint}: not a simclr-cli checkpoint with a backbone")
    recipe = recipe_from_dict(parse_toml(meta["simclr.recipe"], str(checkpoint)), str(checkpoint))
    size = recipe.data.image_size
    name = meta["simclr.backbone"]
    cifar = meta.get("simclr.cifar_stem") == "true"
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": int(meta["simclr.feature_dim"]),
        "pretrained_cfg": {
            "architecture": name,
            "input_size": [3, size, size],
            "fixed_input_size": False,
            "interpolation": "bilinear",
            "crop_pct": 1.0 if size <= 64 else 0.875,
            "crop_mode": "center",
            "mean": list(recipe.data.mean),
            "std": list(recipe.data.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "conv1" if cifar else None,
            "classifier": None,
            "license": "as the training data",
            "tag": f"simclr_{meta.get('simclr.stage', 'pretrain')}",
        },
        "simclr": {
            "cifar_stem": cifar,
            "stage": meta.get("simclr.stage"),
            "source": str(checkpoint),
            "version": meta.get("simclr.version"),
            "note": ("CIFAR stem: load with simclr_cli.export.load_timm(DIR), or timm.create_model(..., num_classes=0) "
                     "+ simclr_cli.models.apply_cifar_stem(model) + load_state_dict") if cifar else "",
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(out_dir / MODEL_FILE, backbone, {"format": "pt", "simclr.backbone": name,
                                                  "simclr.cifar_stem": "true" if cifar else "false"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return config


def load_timm(folder: str | Path) -> nn.Module:
    """The exported encoder as a timm model (CIFAR stem applied when it was trained with one), strict load."""
    import timm

    from simclr_cli.models import apply_cifar_stem

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], num_classes=0)
    if config.get("simclr", {}).get("cifar_stem"):
        apply_cifar_stem(model, config["architecture"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / MODEL_FILE), strict=True)
    return model.eval()


__all__ = ["export_timm", "load_timm"]
