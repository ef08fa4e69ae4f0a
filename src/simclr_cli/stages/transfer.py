"""The ``transfer`` stage: the encoder on other datasets ([v1] App. B.8, SIMCLR.md section 3).

* ``linear``: L2-regularized logistic regression (L-BFGS) on frozen features, no augmentation;
  the strength is chosen on a validation split held out from train, then the model is refit on
  train+val and scored on test.
* ``finetune``: the whole network with Nesterov SGD and crop+flip; lr x weight decay chosen on
  validation, then retrained on train+val and scored on test.

Metrics per dataset as in the paper (top-1; mean per-class accuracy for aircraft, pets,
caltech101, flowers; 11-point mAP for VOC2007). ``OUT/transfer/summary.json`` accumulates
every number (``results[mode][dataset]``); the screen gets a markdown table in the form of
paper Table 8.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from simclr_cli.data.pipeline.augment import crop_flip_augment
from simclr_cli.data.pipeline.loaders import LabeledViews
from simclr_cli.data.sources.transfer import ConcatSource, TransferData, label_targets, load_transfer
from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.tasks import ClassificationTask
from simclr_cli.errors import UsageError
from simclr_cli.evaluation.linear import predict
from simclr_cli.evaluation.logistic import fit_logistic, l2_grid, select_l2
from simclr_cli.evaluation.metrics import score
from simclr_cli.models.classifier import Classifier, FeatureEncoder
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, with_stage_run

STAGE = "transfer"
SHORT = {"food101": "Food", "cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10", "sun397": "SUN397",
         "stanford_cars": "Cars", "fgvc_aircraft": "Aircraft", "voc2007": "VOC2007", "dtd": "DTD",
         "oxford_pets": "Pets", "caltech101": "Caltech-101", "flowers102": "Flowers"}


def finetune_grid(kind: str) -> list[tuple[float, float]]:
    """(lr, weight decay) pairs: the paper's 7 lr in [1e-4, 0.1] x (7 wd in [1e-6, 1e-3] plus 0), or 2 x 2."""
    if kind == "paper":
        lrs = torch.logspace(-4, -1, 7, dtype=torch.float64).tolist()
        wds = [0.0, *torch.logspace(-6, -3, 7, dtype=torch.float64).tolist()]
    else:
        lrs, wds = [0.01, 0.1], [0.0, 1e-5]
    return [(lr, wd) for lr in lrs for wd in wds]


@with_stage_run(immediate=True)
def run(
    recipe: Recipe,
    src: common.CheckpointRef | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    overwrite: bool = False,
    show_progress: bool = True,
    stage_run: StageRun,
) -> dict[str, Any]:
    """Transfer to every dataset in ``transfer.datasets``; returns the summary with all results so far.

    Results accumulate in ``OUT/transfer/summary.json``, written after every dataset; ``--overwrite`` only
    allows running a dataset and mode again (its result is replaced once the new one is finished).
    """
    cfg = recipe.transfer
    names = [d.strip() for d in cfg.datasets.split(",") if d.strip()]
    if not names:
        raise UsageError("no transfer dataset given; use --dataset NAME or --datasets a,b,c")
    summary_path = Path(out_dir) / STAGE / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    done = [n for n in names if n in previous.get("results", {}).get(cfg.mode, {})]
    if done and not overwrite:
        raise UsageError(f"{summary_path} already has {cfg.mode} results for {', '.join(done)}; pass --overwrite to "
                         "run them again, or --out DIR to write elsewhere")
    accelerator = stage_run.open(recipe, out_dir, STAGE, precision=(cfg.mixed_precision, "transfer.mixed_precision"),
                             keeps_state=False, show_progress=show_progress)
    main, say, stage_dir = stage_run.main, stage_run.say, stage_run.stage_dir
    size = cfg.image_size or recipe.data.image_size
    common.load_encoder(src, recipe, init)  # fail early on a bad checkpoint, before any data is read
    stage_run.start(overwrite=False)  # results accumulate: nothing is set aside

    summary = stage_run.summary(
        init=init,
        source=common.source_label(src, init),
        backbone=recipe.model.backbone,
        image_size=size,
        results=previous.get("results", {}),
    )
    del summary["wall_seconds"]  # per dataset, in its result
    for name in names:
        t0 = time.perf_counter()
        data = load_transfer(name, cfg.root, download=cfg.download, val_fraction=cfg.val_fraction, split=cfg.split,
                             seed=recipe.seed)
        say(f"transfer ({cfg.mode}) to {name}: {len(data.train)} train / {len(data.val)} val ({data.val_note}) / "
            f"{len(data.test)} test images, {len(data.classes)} classes, metric {data.metric}")
        if cfg.mode == "linear":
            result = _linear(src, init, data, recipe, accelerator, size, say)
        else:
            result = _finetune(src, init, data, recipe, accelerator, size, stage_dir, say)
        result.update({"metric": data.metric, "train_images": len(data.train), "val_images": len(data.val),
                       "test_images": len(data.test), "num_classes": len(data.classes), "val_from": data.val_note,
                       "wall_seconds": round(time.perf_counter() - t0, 2)})
        summary["results"].setdefault(cfg.mode, {})[name] = result
        if main:  # after every dataset: nothing finished is lost if a later one fails
            common.write_json(summary_path, summary)
        say(f"{name}: {data.metric} {result['value']:.2f} (test)")
    if main and show_progress:
        print(results_table(summary, init))
    return summary


def results_table(summary: dict, init: str) -> str:
    """Markdown in the form of paper Table 8: one row per mode, one column per dataset."""
    results = summary["results"]
    seen = list(dict.fromkeys(n for per_mode in results.values() for n in per_mode))  # first-run order
    order = list(SHORT)  # the paper's column order for the built-in datasets, then the others as run
    names = sorted(seen, key=lambda n: order.index(n) if n in SHORT else len(SHORT) + seen.index(n))
    head = "| | " + " | ".join(SHORT.get(n, n) for n in names) + " |"
    rule = "|---|" + "---|" * len(names)
    rows = []
    for mode, per in results.items():
        cells = [f"{per[n]['value']:.1f}" if n in per else "" for n in names]
        rows.append(f"| {mode} ({init}) | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _features(encoder: FeatureEncoder, source, recipe: Recipe, accelerator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = common.eval_loader(source, None, recipe, accelerator, size=size)
    x, rows = predict(encoder, loader, accelerator.device, accelerator.autocast)
    return x, label_targets(source, rows)


def _linear(src, init: str, data: TransferData, recipe: Recipe, accelerator, size: int, say) -> dict[str, Any]:
    """Frozen features; L2 strength chosen on val only; refit on train+val; test once."""
    cfg = recipe.transfer
    model = common.load_encoder(src, recipe, init)
    encoder = FeatureEncoder(model.backbone).to(accelerator.device)
    train = _features(encoder, data.train, recipe, accelerator, size)
    val = _features(encoder, data.val, recipe, accelerator, size)
    grid = l2_grid(cfg.l2_grid)
    metric = lambda s, y: score(data.metric, s, y)  # noqa: E731
    k = len(data.classes)
    best, val_scores = select_l2(train, val, k, grid, metric, multilabel=data.multilabel, max_iter=cfg.max_iter)
    say(f"  l2 chosen on val: {best:.3g} (val {data.metric} {max(s for _, s in val_scores):.2f} over {len(grid)} values)")
    final = fit_logistic(torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]), k, best,
                         multilabel=data.multilabel, max_iter=cfg.max_iter)
    test = _features(encoder, data.test, recipe, accelerator, size)  # read only now
    return {
        "mode": "linear",
        "value": round(score(data.metric, final.scores(test[0]), test[1]), 4),
        "l2": best,
        "val_scores": [[l2, round(v, 4)] for l2, v in val_scores],
        "feature_dim": train[0].shape[1],
    }


def _finetune(src, init: str, data: TransferData, recipe: Recipe, accelerator, size: int, stage_dir: Path,
              say) -> dict[str, Any]:
    """Whole network, crop+flip; (lr, wd) chosen on val; retrained on train+val; test once."""
    cfg = recipe.transfer
    if data.multilabel:
        raise UsageError(f"{data.name}: fine-tuning on a multi-label dataset is not supported yet; use --mode linear")
    k = len(data.classes)
    augment = crop_flip_augment(recipe.augment, cfg.crop_scale, size, recipe.data.mean, recipe.data.std)
    logs = stage_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    safe = data.name.replace(":", "_").replace("/", "_")

    def train_one(source, lr: float, wd: float, tag: str) -> Classifier:
        torch.manual_seed(recipe.seed)
        model = common.load_encoder(src, recipe, init)
        clf = Classifier(model.backbone, [], k)
        batch = min(cfg.batch_size, len(source))
        # the grid's lr is the step size itself: divided here by the B/256 the trainer's linear scaling applies
        spec = FitSpec.from_section(cfg, data=recipe.data, seed=recipe.seed, lr=lr * 256 / batch, weight_decay=wd,
                                    epochs=math.ceil(cfg.finetune_steps * batch / len(source)) + 1,
                                    log_every=max(1, cfg.finetune_steps // 10), max_steps=cfg.finetune_steps)
        task, _, _ = fit(accelerator, ClassificationTask(clf), LabeledViews(source, augment, recipe.seed), spec,
                         stage=STAGE, metrics_path=logs / f"{safe}-{tag}.jsonl", show_progress=False, state_dir=None)
        return task.model

    def evaluate(model: Classifier, source) -> float:
        loader = common.eval_loader(source, None, recipe, accelerator, size=size)
        scores, labels = predict(model, loader, accelerator.device, accelerator.autocast)
        return score(data.metric, scores, labels)

    val_scores = []
    for lr, wd in finetune_grid(cfg.finetune_grid):
        value = evaluate(train_one(data.train, lr, wd, f"lr{lr:g}-wd{wd:g}"), data.val)
        val_scores.append((lr, wd, value))
        say(f"  lr {lr:g} wd {wd:g}: val {data.metric} {value:.2f}")
    lr, wd, _ = max(val_scores, key=lambda s: s[2])
    final = train_one(ConcatSource(data.train, data.val), lr, wd, "final")
    return {
        "mode": "finetune",
        "value": round(evaluate(final, data.test), 4),
        "lr": lr,
        "weight_decay": wd,
        "steps": cfg.finetune_steps,
        "val_scores": [[a, b, round(v, 4)] for a, b, v in val_scores],
    }
