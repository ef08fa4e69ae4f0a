"""The ``linear-eval`` stage: a linear classifier on a frozen encoder (SIMCLR.md section 3).

``mode = "cached"`` extracts features once (no augmentation) and fits the classifier
on them; ``mode = "paper"`` trains it through the shared loop on crop+flip views,
90 epochs of Nesterov SGD. Either way the encoder is frozen (no gradient, BN in
eval mode) and checked bit-identical afterwards. Writes ``OUT/linear_eval/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from simclr_cli.checkpoints import prefixed_state
from simclr_cli.checkpoints.metadata import checkpoint_metadata, classifier_metadata
from simclr_cli.data.pipeline.augment import crop_flip_augment
from simclr_cli.data.pipeline.loaders import LabeledViews, SubsetSource
from simclr_cli.engine.reporting import MetricsLog
from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.tasks import ClassificationTask
from simclr_cli.evaluation.linear import fit_linear, predict
from simclr_cli.models.classifier import Classifier
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, with_stage_run

STAGE = "linear_eval"


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
    """Train and test a linear probe; return the summary (also ``OUT/linear_eval/summary.json``).

    Args:
        recipe: the resolved recipe (usually inherited from the checkpoint); ``[linear_eval]`` applies.
        src: the checkpoint to read the encoder from (ignored with ``init='random'``).
        out_dir: run directory to write ``linear_eval/`` into.
        init: ``pretrained`` or ``random`` (the same protocol on an untrained encoder).
    """
    cfg = recipe.linear_eval
    accelerator = stage_run.open(recipe, out_dir, STAGE, precision=(cfg.mixed_precision, "linear_eval.mixed_precision"),
                                 keeps_state=False, show_progress=show_progress)
    splits = common.labeled_splits(recipe)
    encoder = common.load_encoder(src, recipe, init)
    k = common.parse_on(cfg.on, encoder)
    model = Classifier(encoder.backbone, common.head_layers(encoder)[:k], splits.num_classes)
    stage_run.check(overwrite=overwrite)
    frozen = model.encoder()
    snapshot = common.frozen_snapshot(frozen)
    stage_run.start(overwrite=overwrite)  # the previous run is kept until this one finishes
    metrics = MetricsLog(stage_run.stage_dir / "metrics.jsonl", enabled=stage_run.main)
    stage_run.say(f"linear-eval ({cfg.mode}) of {common.source_label(src, init)} on {cfg.on} "
                  f"({model.num_features} features): {len(splits.train_indices)} train / {len(splits.test)} test "
                  f"images, {splits.num_classes} classes -> {stage_run.stage_dir}")

    last_step = None
    if cfg.mode == "cached":
        _fit_cached(model, splits, recipe, accelerator, metrics, stage_run.say)
    else:
        last_step = _fit_paper(model, splits, recipe, accelerator, stage_run)
    common.assert_unchanged(frozen, snapshot, "encoder")

    test = common.test_topk(model, splits, recipe, accelerator)
    if test is None:
        return stage_run.finish({})
    acc, test_images = test
    if last_step is not None:  # paper mode: the last point of the test top-1 curve (cached logs every epoch)
        common.log_final(stage_run.stage_dir / "metrics.jsonl", stage_run.main,
                         {"step": last_step, "epoch": cfg.epochs, "test_top1": round(acc[1], 4)})
    summary = stage_run.summary(
        mode=cfg.mode, on=cfg.on, init=init, source=common.source_label(src, init),
        **common.source_identity(src, init), backbone=recipe.model.backbone,
        top1=round(acc[1], 4), top5=round(acc[5], 4), train_images=len(splits.train_indices),
        test_images=test_images, num_classes=splits.num_classes,
    )
    metadata = {**checkpoint_metadata(recipe, encoder, STAGE),
                **classifier_metadata(splits.classes, splits.num_classes, k, init)}
    tensors = {**prefixed_state("backbone", model.backbone), **prefixed_state("head", model.head)}
    return stage_run.finish(summary, tensors=tensors, metadata=metadata)


def _fit_cached(model: Classifier, splits: common.LabeledSplits, recipe: Recipe, accelerator, metrics: MetricsLog,
                say) -> None:
    """Extract features once (every process its share), fit the linear layer on them (main process; the others
    wait), and give every process the fitted layer."""
    cfg = recipe.linear_eval
    device = accelerator.device
    frozen = model.encoder().to(device)
    loader = common.eval_loader(splits.train, splits.train_indices, recipe, accelerator)
    t0 = time.perf_counter()
    train = predict(frozen, loader, device, accelerator.autocast, everywhere=False)
    # the test split's features too (once), for the test top-1 curve of the fit
    test = predict(frozen, common.eval_loader(splits.test, None, recipe, accelerator), device, accelerator.autocast,
                   everywhere=False)
    if accelerator.is_main_process:
        feats, labels = train
        say(f"features: {tuple(feats.shape)} in {time.perf_counter() - t0:.1f} s; fitting {cfg.epochs} epochs")

        def log(epoch: int, loss: float, lr: float, top1: float) -> None:
            metrics.write({"epoch": epoch, "step": epoch, "loss": round(loss, 6), "lr": lr,
                           "test_top1": round(top1, 4)})

        linear = fit_linear(feats, labels, splits.num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=recipe.seed,
                            on_epoch=log, test=test)
        model.linear.load_state_dict(linear.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:  # every process returns the same classifier
        from accelerate.utils import broadcast

        for p in model.linear.parameters():
            p.data = broadcast(p.data.to(accelerator.device)).cpu()


def _fit_paper(model: Classifier, splits: common.LabeledSplits, recipe: Recipe, accelerator, stage_run: StageRun) -> int:
    """App. B.6: crop+flip views every epoch through the shared loop, Nesterov SGD, lr 0.1 x B/256, cosine.
    A probe is cheap to rerun: no resume state is kept. Returns the steps trained."""
    cfg, data = recipe.linear_eval, recipe.data
    train = SubsetSource(splits.train, splits.train_indices)
    augment = crop_flip_augment(recipe.augment, cfg.crop_scale, data.image_size, data.mean, data.std)
    spec = FitSpec.from_section(cfg, data=data, seed=recipe.seed)
    # its own stop request: a signal stops the probe at a step boundary (the stage's stops at once)
    evaluate, every = common.test_top1_during(splits, recipe, accelerator, cfg.epochs)
    _, result, _ = fit(accelerator, ClassificationTask(model, frozen=True), LabeledViews(train, augment, recipe.seed),
                       spec, evaluate=evaluate, evaluate_every=every, **{**stage_run.training(), "stop": None})
    return result.step

