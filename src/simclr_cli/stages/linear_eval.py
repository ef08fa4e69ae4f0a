"""The ``linear-eval`` stage: a linear classifier on a frozen encoder (SIMCLR.md section 3).

``mode = "cached"`` extracts features once (no augmentation) and fits the classifier
on them; ``mode = "paper"`` trains it through the shared loop on crop+flip views,
90 epochs of Nesterov SGD. Either way the encoder is frozen (no gradient, BN in
eval mode) and checked bit-identical afterwards. Writes ``OUT/linear_eval/``.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from simclr_cli.checkpoints import MODEL_FILE, prefixed_state, save_weights
from simclr_cli.data.augment import crop_flip_augment
from simclr_cli.data.loaders import GlobalBatchSampler, LabeledViews, SubsetSource, make_loader
from simclr_cli.engine.loop import LoopSpec, run_loop
from simclr_cli.engine.reporting import MetricsLog, ProgressDisplay
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.engine.tasks import ClassificationTask
from simclr_cli.errors import UsageError
from simclr_cli.evaluation.knn import topk_accuracy
from simclr_cli.evaluation.linear import fit_linear, predict
from simclr_cli.models.classifier import Classifier
from simclr_cli.optim import build_optimizer, warmup_cosine
from simclr_cli.recipe import Recipe, recipe_to_toml
from simclr_cli.stages import common
from simclr_cli.stages.pretrain import checkpoint_metadata
from simclr_cli.utils import atomic_write_text

STAGE = "linear_eval"


def run(
    recipe: Recipe,
    src: common.Source | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train and test a linear probe; return the summary (also ``OUT/linear_eval/summary.json``).

    Args:
        recipe: the resolved recipe (usually inherited from the checkpoint); ``[linear_eval]`` applies.
        src: the checkpoint to read the encoder from (ignored with ``init='random'``).
        out_dir: run directory to write ``linear_eval/`` into.
        init: ``pretrained`` or ``random`` (the same protocol on an untrained encoder).
    """
    t_start = time.perf_counter()
    cfg = recipe.linear_eval
    stage_dir = Path(out_dir) / STAGE
    accelerator = make_accelerator(cfg.mixed_precision, key="linear_eval.mixed_precision")
    main = accelerator.is_main_process
    say = print if show_progress and main else (lambda *a, **k: None)

    splits = common.labeled_splits(recipe)
    encoder = common.load_encoder(src, recipe, init)
    k = common.parse_on(cfg.on, encoder)
    model = Classifier(encoder.backbone, common.head_layers(encoder)[:k], splits.num_classes)
    common.check_output(stage_dir, STAGE, overwrite=overwrite)
    frozen = model.encoder()
    snapshot = common.frozen_snapshot(frozen)
    if main:
        common.clear_stage_dir(stage_dir, overwrite)
        atomic_write_text(stage_dir / "recipe.toml", recipe_to_toml(recipe))
    accelerator.wait_for_everyone()
    metrics = MetricsLog(stage_dir / "metrics.jsonl", enabled=main)
    say(f"linear-eval ({cfg.mode}) of {common.source_label(src, init)} on {cfg.on} "
        f"({model.num_features} features): {len(splits.train_indices)} train / {len(splits.test)} test images, "
        f"{splits.num_classes} classes -> {stage_dir}")

    if cfg.mode == "cached":
        _fit_cached(model, splits, recipe, accelerator, metrics, say)
    else:
        _fit_paper(model, splits, recipe, accelerator, metrics, show_progress and main)
    common.assert_unchanged(frozen, snapshot, "encoder")

    summary: dict[str, Any] = {}
    if main:  # the test pass runs once; the other processes wait
        test_loader = common.eval_loader(splits.test, None, recipe, accelerator)
        model.to(accelerator.device)
        logits, labels = predict(model, test_loader, accelerator.device, accelerator.autocast)
        acc = topk_accuracy(logits, labels, (1, 5))
        summary = {
            "stage": STAGE,
            "name": recipe.name,
            "mode": cfg.mode,
            "on": cfg.on,
            "init": init,
            "source": common.source_label(src, init),
            "backbone": recipe.model.backbone,
            "top1": round(acc[1], 4),
            "top5": round(acc[5], 4),
            "train_images": len(splits.train_indices),
            "test_images": len(labels),
            "num_classes": splits.num_classes,
            "wall_seconds": round(time.perf_counter() - t_start, 2),
        }
        metadata = checkpoint_metadata(recipe, encoder, STAGE)
        metadata.update(classifier_metadata(splits.classes, splits.num_classes, k, init))
        tensors = {**prefixed_state("backbone", model.backbone), **prefixed_state("head", model.head)}
        save_weights(stage_dir / MODEL_FILE, tensors, metadata)
        common.write_json(stage_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


def classifier_metadata(classes: list[str], num_classes: int, head_layers: int, init: str) -> dict[str, str]:
    """The ``simclr.*`` metadata a checkpoint with a classifier under ``head.`` carries."""
    import json

    return {
        "simclr.num_classes": str(num_classes),
        "simclr.classes": json.dumps(list(classes)),
        "simclr.head_layers": str(head_layers),
        "simclr.classifier": "head",
        "simclr.init": init,
    }


def _fit_cached(model: Classifier, splits: common.LabeledSplits, recipe: Recipe, accelerator, metrics: MetricsLog,
                say) -> None:
    """Extract features once, fit the linear layer on them (main process; the others wait)."""
    cfg = recipe.linear_eval
    if accelerator.is_main_process:
        device = accelerator.device
        frozen = model.encoder().to(device)
        loader = common.eval_loader(splits.train, splits.train_indices, recipe, accelerator)
        t0 = time.perf_counter()
        feats, labels = predict(frozen, loader, device, accelerator.autocast)
        say(f"features: {tuple(feats.shape)} in {time.perf_counter() - t0:.1f} s; fitting {cfg.epochs} epochs")

        def log(epoch: int, loss: float, lr: float) -> None:
            metrics.write({"epoch": epoch, "step": epoch, "loss": round(loss, 6), "lr": lr})

        linear = fit_linear(feats, labels, splits.num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=recipe.seed,
                            on_epoch=log)
        model.linear.load_state_dict(linear.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:  # every process returns the same classifier
        from accelerate.utils import broadcast

        for p in model.linear.parameters():
            p.data = broadcast(p.data.to(accelerator.device)).cpu()


def _fit_paper(model: Classifier, splits: common.LabeledSplits, recipe: Recipe, accelerator, metrics: MetricsLog,
               show: bool) -> None:
    """App. B.6: crop+flip views every epoch through the shared loop, Nesterov SGD, lr 0.1 x B/256, cosine."""
    cfg, data = recipe.linear_eval, recipe.data
    train = SubsetSource(splits.train, splits.train_indices)
    augment = crop_flip_augment(recipe.augment, cfg.crop_scale, data.image_size, data.mean, data.std)
    views = LabeledViews(train, augment, recipe.seed)
    batch = min(cfg.batch_size, len(views) // accelerator.num_processes * accelerator.num_processes)
    if batch < accelerator.num_processes:
        raise UsageError(f"{len(views)} labeled training images are too few for {accelerator.num_processes} processes")
    sampler = GlobalBatchSampler(len(views), batch, recipe.seed, accelerator.process_index, accelerator.num_processes)
    loader = make_loader(views, batch_sampler=sampler, num_workers=data.num_workers,
                         pin_memory=accelerator.device.type == "cuda")
    spe = len(views) // batch
    total = cfg.epochs * spe
    task = ClassificationTask(model, frozen=True)
    peak = cfg.lr * batch / 256
    optimizer = build_optimizer("sgd", task, lr=peak, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                nesterov=True)
    task, optimizer = accelerator.prepare(task, optimizer)
    progress = ProgressDisplay(total, 0, enabled=show, description=f"linear-eval {recipe.name}")
    spec = LoopSpec(total_steps=total, steps_per_epoch=spe, global_batch=batch,
                    peak_lrs=[peak] * len(optimizer.param_groups),
                    schedule=partial(warmup_cosine, total_steps=total, warmup_steps=0), seed=recipe.seed,
                    log_every=cfg.log_every, save_every=0, dataset_size=len(views),
                    max_bad_fraction=data.max_bad_fraction, stage=STAGE)
    try:  # a probe is cheap to rerun: no resume state is kept
        run_loop(accelerator, task, optimizer, sampler, loader, spec, state_dir=None, metrics=metrics,
                 progress=progress)
    finally:
        progress.close()
