"""Take an encoder out of the toolkit: a timm-loadable folder, and ways to load it back.

``export_timm(checkpoint, out_dir)`` writes ``model.safetensors`` (backbone only, plain timm keys)
and ``config.json`` in timm's Hugging Face layout (``architecture``, ``num_features``,
``pretrained_cfg`` with input size, mean/std, crop) plus a ``simclr`` block (CIFAR stem, stage,
source). Plain backbones then load with timm alone::

    timm.create_model(name, pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file=f"{out_dir}/model.safetensors"))

Backbones trained with the CIFAR stem have a different first layer than timm builds; load those
with :func:`load_timm` (or create the model, apply ``simclr_cli.models.apply_cifar_stem``, then
``load_state_dict``). The folder also gets a model card, ``README.md``, with the Hugging Face Hub
metadata header and what a reader needs to trust the encoder (:func:`model_card`).

``export_onnx(checkpoint, out_dir)`` writes ``model.onnx``: the encoder (eval mode) from normalized
``pixel_values`` ``(N, 3, S, S)`` to features ``(N, num_features)``, the batch dimension dynamic, via
torch's ``torch.export``-based ONNX exporter (the ``onnx`` extra), checked against PyTorch with
onnxruntime before it is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclr_cli.checkpoints import MODEL_FILE, load_weights, save_weights, sub_state
from simclr_cli.errors import SimclrError, UsageError
from simclr_cli.recipe import parse_saved_toml, recipe_from_dict
from simclr_cli.utils import atomic_write_text


def _read_checkpoint(checkpoint: Path):
    """(backbone tensors, metadata, recipe) of a simclr-cli checkpoint with a backbone."""
    tensors, meta = load_weights(checkpoint)
    backbone = sub_state(tensors, "backbone")
    if not backbone or "simclr.backbone" not in meta:
        raise UsageError(f"{checkpoint}: not a simclr-cli checkpoint with a backbone")
    recipe = recipe_from_dict(parse_saved_toml(meta["simclr.recipe"], str(checkpoint)), str(checkpoint))
    return backbone, meta, recipe


def export_timm(checkpoint: Path, out_dir: Path, *, overwrite: bool = False, run_dir: Path | None = None) -> dict:
    """Write the timm folder for ``checkpoint``'s backbone (``model.safetensors``, ``config.json`` and the
    model card ``README.md``, whose numbers come from ``run_dir``'s summaries: by default the run holding
    ``checkpoint``, ``RUN/STAGE/model.safetensors``); returns the config written."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if (out_dir / MODEL_FILE).exists() and not overwrite:
        raise UsageError(f"{out_dir / MODEL_FILE} exists; pass --overwrite to replace it")
    backbone, meta, recipe = _read_checkpoint(checkpoint)
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
    run = Path(run_dir) if run_dir is not None else checkpoint.resolve().parent.parent
    atomic_write_text(out_dir / "README.md", model_card(recipe, meta, config, run_summaries(run, checkpoint), out_dir))
    return config


# --------------------------------------------------------------------------------------------- model card

_LR_SCALING = {"linear": " x B/256", "sqrt": " x sqrt(B)", "none": " (not scaled with the batch)"}
_HUB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10"}  # known Hub names


def run_summaries(run_dir: Path, checkpoint: Path | None = None) -> dict[str, dict]:
    """The ``summary.json`` of each stage of ``run_dir`` that measured the pretrained encoder (``--init random``
    baselines are left out); missing or unreadable ones are absent.

    With ``checkpoint`` (the file being exported), only numbers of that very checkpoint count, matched by its
    identity: its resolved path and the SHA-256 of its bytes. The pretrain summary counts when it is the summary
    of ``checkpoint`` itself (``RUN/pretrain/model.safetensors``, ``model_sha256``); a later stage's when it
    measured ``checkpoint`` (``source_path`` and ``source_sha256``). So neither a kNN of the encoder that a
    ``pretrain --overwrite`` has since replaced, nor a ``simclr knn runs/A --out runs/B`` in B's card, nor the
    teacher's numbers on a distilled student's card. A summary that records no digest is left out."""
    out: dict[str, dict] = {}
    if checkpoint is not None:
        from simclr_cli.utils import file_sha256

        path, digest = str(Path(checkpoint).resolve()), file_sha256(checkpoint)
    for stage in ("pretrain", "knn", "linear_eval", "finetune"):
        folder = Path(run_dir) / stage
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict) or summary.get("init", "pretrained") != "pretrained":
            continue
        if checkpoint is not None:
            if stage == "pretrain":
                own = (str((folder / MODEL_FILE).resolve()) == path and summary.get("model_sha256") == digest)
            else:
                own = summary.get("source_path") == path and summary.get("source_sha256") == digest
            if not own:
                continue
        out[stage] = summary
    return out


def _measures(summaries: dict[str, dict]) -> list[tuple[str, Any, str, bool]]:
    """(name, value or None, how it was measured, whether it measures the exported backbone's own features) for
    the card's evaluation table; only the last kind goes into the Hub model-index. A linear probe on projection-head
    features (``linear-eval --on head:K``) is named for what it is: the export holds the backbone only."""
    knn, lin, ft, pre = (summaries.get(k, {}) for k in ("knn", "linear_eval", "finetune", "pretrain"))
    on = str(lin.get("on", "h"))
    probe = (("linear eval top-1", "linear classifier on the frozen encoder's features h") if on == "h" else
             (f"linear eval top-1 on {on} (projection head)",
              f"linear classifier on the features after the first {on.partition(':')[2]} projection-head layer(s), "
              "which this export does not hold: not a number of the exported encoder's own features"))
    return [
        ("kNN top-1", knn.get("knn_top1"), f"weighted kNN on L2-normalized h, k={knn.get('k', '?')}, "
                                            f"T={knn.get('temperature', '?')}, {knn.get('test_images', '?')} test "
                                            "images (`simclr knn`)", True),
        (probe[0], lin.get("top1"), f"{probe[1]}, {lin.get('mode', '?')} mode, "
                                    f"{lin.get('test_images', '?')} test images (`simclr linear-eval`)", on == "h"),
        ("fine-tune top-1", ft.get("top1"), f"the encoder fine-tuned with a classifier on {ft.get('labels', '?')} of "
                                            f"the labels (`simclr finetune`), {ft.get('test_images', '?')} test images: "
                                            "a number of the fine-tuned model, not of this export's features", False),
        ("kNN top-1, pretrain monitor (end)", pre.get("knn_top1"), "the monitor at the end of pretraining", True),
    ]


def model_card(recipe, meta: dict[str, str], config: dict, summaries: dict[str, dict], out_dir: Path) -> str:
    """``README.md`` for the exported folder: the Hugging Face Hub metadata header (YAML front matter), then the
    data, the recipe, the steps trained, the evaluation numbers from the run's summaries ("not measured" when
    a stage was not run), and how to load the folder with timm without network."""
    import yaml

    import simclr_cli

    d, m = recipe.data, recipe.model
    cifar = bool(config["simclr"]["cifar_stem"])
    stage = meta.get("simclr.stage", "pretrain")
    measures = _measures(summaries)
    lines = [
        "---", yaml.safe_dump(_hub_header(recipe, measures), sort_keys=False).strip(), "---", "",
        f"# {recipe.name}: a SimCLR `{m.backbone}` image encoder",
        "",
        f"A `{m.backbone}`{' (CIFAR stem: 3x3 first convolution, no max-pool)' if cifar else ''} encoder trained "
        f"with SimCLR (contrastive learning on unlabeled images, Chen et al. 2020) by simclr-cli "
        f"{meta.get('simclr.version', simclr_cli.__version__)}. It maps a normalized "
        f"{d.image_size}x{d.image_size} RGB image to a {config['num_features']}-dimensional feature vector h "
        f"(no classifier). Exported from the `{stage}` checkpoint.",
        "",
        *_card_data(d, summaries.get("pretrain", {})),
        *_card_recipe(recipe, summaries.get("pretrain", {}), cifar),
        "## Evaluation",
        "",
        "| measure | top-1 (%) | how |", "|---|---|---|",
        *[f"| {name} | {f'{value:.2f}' if isinstance(value, (int, float)) else 'not measured'} | "
          f"{how if isinstance(value, (int, float)) else '-'} |" for name, value, how, _ in measures],
        "",
        f"Numbers read from the run's `summary.json` files (top-1 in percent, on the labeled split "
        f"`{d.val_split or '-'}`).",
        "",
        *_card_loading(d, m.backbone, Path(out_dir).name, cifar, config["num_features"]),
    ]
    return "\n".join(lines)


def _hub_header(recipe, measures: list[tuple[str, Any, str, bool]]) -> dict[str, Any]:
    """The Hub metadata of the card: library, tags, the dataset, and a model-index of the numbers measured on
    the exported encoder's own features."""
    d = recipe.data
    header: dict[str, Any] = {
        "library_name": "timm",
        "license": "unknown",
        "pipeline_tag": "image-feature-extraction",
        "tags": ["image-feature-extraction", "timm", "simclr", "self-supervised", "contrastive-learning"],
    }
    if d.dataset in _HUB_DATASETS:
        header["datasets"] = [_HUB_DATASETS[d.dataset]]
    measured = [(n, v) for n, v, _, own in measures if own and isinstance(v, (int, float))]
    if measured:
        dataset = {"name": d.dataset, "type": _HUB_DATASETS.get(d.dataset, d.dataset)}
        header["model-index"] = [{"name": recipe.name, "results": [
            {"task": {"type": "image-classification"}, "dataset": dataset,
             "metrics": [{"type": "accuracy", "name": f"{name} (%)", "value": float(value)}]}
            for name, value in measured]}]
    return header


def _row(name: str, value: Any) -> str:
    return f"| {name} | {value} |"


def _card_data(d, pre: dict) -> list[str]:
    """The card's "Data" section (``d``: the recipe's data section, ``pre``: the pretrain summary)."""
    images = pre.get("images")
    return [
        "## Data",
        "",
        "| | |", "|---|---|",
        _row("dataset", f"`{d.dataset}`"),
        _row("data root", f"`{Path(d.root).name or d.root}`" if d.dataset != "synthetic" else "(generated, no files)"),
        _row("training split", f"`{d.train_split}`"),
        _row("training images", images if images is not None else "not recorded"),
        _row("image size", f"{d.image_size} px"),
        _row("labeled split for evaluation", f"`{d.val_split}`" if d.val_split else "none"),
        "",
    ]


def _card_recipe(recipe, pre: dict, cifar: bool) -> list[str]:
    """The card's "Training recipe" section (``pre``: the pretrain summary)."""
    m, p = recipe.model, recipe.pretrain
    steps = pre.get("steps")
    return [
        "## Training recipe",
        "",
        "| | |", "|---|---|",
        _row("backbone", f"`{m.backbone}`" + (" (CIFAR stem)" if cifar else "")),
        _row("projection head", f"{m.proj_layers} layers, output {m.proj_dim}"),
        _row("objective", p.objective_summary()),
        _row("global batch", pre.get("global_batch", p.batch_size)),
        _row("epochs", f"{p.epochs}" + (f" (capped at {p.max_steps} steps)" if p.max_steps else "")),
        _row("steps trained", steps if steps is not None else "not recorded"),
        _row("optimizer", f"{p.optimizer}, lr {p.lr:g}{_LR_SCALING[p.lr_scaling]}, weight decay {p.weight_decay:g}, "
                          f"warmup {p.warmup_epochs:g} epoch(s), then cosine decay"),
        _row("augmentation", f"colour strength {recipe.augment.strength:g}, blur "
                             f"{'on' if recipe.augment.blur else 'off'}"),
        _row("precision", p.mixed_precision),
        _row("seed", recipe.seed),
        "",
        "The full recipe is stored in the checkpoint (`simclr info`).",
        "",
    ]


def _card_loading(d, backbone: str, out_name: str, cifar: bool, num_features: int) -> list[str]:
    """The card's "How to load it" section: timm (``load_timm`` for a CIFAR stem) and the preprocessing."""
    lines = ["## How to load it (no network needed)", "", "```python"]
    if cifar:
        lines += ["from simclr_cli.export import load_timm  # the CIFAR stem is not a timm architecture option",
                  "", f'model = load_timm("{out_name}")  # strict load, eval mode']
    else:
        lines += ["import timm", "",
                  f'model = timm.create_model("local-dir:{out_name}", pretrained=True).eval()',
                  "# or: timm.create_model(\"" + backbone + "\", pretrained=True, num_classes=0,",
                  f'#         pretrained_cfg_overlay=dict(file="{out_name}/model.safetensors"))']
    return lines + [
        f"features = model(images)  # images: (N, 3, {d.image_size}, {d.image_size}), normalized -> "
        f"(N, {num_features})",
        "```",
        "",
        f"Preprocessing: resize and centre-crop to {d.image_size} px, scale to [0, 1], normalize with mean "
        f"{list(d.mean)} and std {list(d.std)} (also in `config.json`). With `HF_HUB_OFFLINE=1` nothing is downloaded.",
        "",
    ]


# --------------------------------------------------------------------------------------------------- ONNX

ONNX_FILE = "model.onnx"


def require_onnx() -> None:
    """The ``onnx`` extra (onnx, onnxscript for torch's exporter, onnxruntime for the check), or a clear error."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)  # through builtins.__import__, so a test can make it fail
        except ImportError as e:
            raise UsageError(f"--format onnx needs the onnx extra ({e}): pip install 'simclr-cli[onnx]'") from None


def build_encoder(backbone: dict[str, torch.Tensor], meta: dict[str, str]) -> nn.Module:
    """The backbone of a checkpoint as a timm model (CIFAR stem applied when trained with one), eval mode."""
    import timm

    from simclr_cli.models import apply_cifar_stem

    name = meta["simclr.backbone"]
    model = timm.create_model(name, num_classes=0, pretrained=False)
    if meta.get("simclr.cifar_stem") == "true":
        apply_cifar_stem(model, name)
    model.load_state_dict(backbone, strict=True)
    return model.eval()


def export_onnx(checkpoint: Path, out_dir: Path, *, overwrite: bool = False, opset: int = 18,
                check_batches: tuple[int, ...] = (1, 3), tolerance: float = 1e-4) -> dict:
    """Write ``out_dir/model.onnx`` (one self-contained file) and ``config.json`` (input size, mean/std) for
    ``checkpoint``'s encoder. Input ``pixel_values`` (N, 3, S, S), normalized; output ``features``
    (N, num_features); N is dynamic. Before the file is kept, onnxruntime runs it on random input at each of
    ``check_batches`` and must match PyTorch within ``tolerance`` (max abs); returns what was written and
    the largest difference seen."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    require_onnx()
    if (out_dir / ONNX_FILE).exists() and not overwrite:
        raise UsageError(f"{out_dir / ONNX_FILE} exists; pass --overwrite to replace it")
    backbone, meta, recipe = _read_checkpoint(checkpoint)
    model = build_encoder(backbone, meta)
    size = recipe.data.image_size
    example = torch.randn(2, 3, size, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{ONNX_FILE}.tmp-{os.getpid()}"
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset, external_data=False,
                              input_names=["pixel_values"], output_names=["features"],
                              dynamic_shapes=({0: batch},), verbose=False)
        diff = check_onnx(tmp, model, size, check_batches)
        if diff > tolerance:
            raise SimclrError(f"the ONNX export of {checkpoint} differs from PyTorch by {diff:.3g} (more than "
                              f"{tolerance:g}); nothing was written. Report it with the backbone name "
                              f"({meta['simclr.backbone']}) and torch/onnx versions")
        os.replace(tmp, out_dir / ONNX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    config = {
        "architecture": meta["simclr.backbone"],
        "format": "onnx",
        "opset": opset,
        "inputs": {"pixel_values": ["batch", 3, size, size]},
        "outputs": {"features": ["batch", int(meta["simclr.feature_dim"])]},
        "num_features": int(meta["simclr.feature_dim"]),
        "mean": list(recipe.data.mean),
        "std": list(recipe.data.std),
        "cifar_stem": meta.get("simclr.cifar_stem") == "true",
        "source": str(checkpoint),
        "max_abs_diff_vs_pytorch": diff,
    }
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return config


def check_onnx(path: Path, model: nn.Module, size: int, batches: tuple[int, ...] = (1, 3), seed: int = 0) -> float:
    """The largest absolute difference between onnxruntime (CPU) and ``model`` on seeded random input."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, 3, size, size, generator=gen)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(["features"], {"pixel_values": x.numpy()})
        if got.shape != expected.shape:
            raise SimclrError(f"{path}: ONNX output {got.shape} for batch {n}, PyTorch {expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
    return worst


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


__all__ = ["export_onnx", "export_timm", "load_timm", "model_card"]
