"""The ``finetune`` stage: semi-supervised fine-tuning on a labeled subset (SIMCLR.md section 3, [v1] App. B.5).

The whole network (encoder, the first ``from_head_layer`` projection-head layers, and a
new linear classifier) trains on a class-balanced, seeded subset (``--labels 1%``,
``10-per-class`` or a list file) with Nesterov SGD, lr 0.05 x B/256, no warmup, no
weight decay, crop+flip only, through the shared loop (resumable). Writes
``OUT/finetune/`` with ``model.safetensors`` (``backbone.*`` + classifier under ``head.``),
``labels.txt`` (the chosen images, in the list-file format), ``summary.json``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch

from simclr_cli.checkpoints import prefixed_state
from simclr_cli.checkpoints.metadata import checkpoint_metadata, classifier_metadata
from simclr_cli.data.pipeline.augment import crop_flip_augment
from simclr_cli.data.pipeline.loaders import LabeledViews, SubsetSource
from simclr_cli.data.sources.subsets import parse_label_spec, select_labeled, write_label_list
from simclr_cli.engine.setup import convert_sync_bn
from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.tasks import ClassificationTask
from simclr_cli.errors import UsageError
from simclr_cli.models import SimCLRModel
from simclr_cli.models.classifier import Classifier
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, with_stage_run

STAGE = "finetune"
RESUMABLE_CHANGES = frozenset({"data.num_workers", "data.root", "data.download", "finetune.log_every"})


def default_epochs(fraction: float) -> int:
    """The paper's budget: 60 epochs for subsets up to 1% of the labels, 30 above."""
    return 60 if fraction <= 0.01 + 1e-9 else 30


@with_stage_run()
def run(
    recipe: Recipe,
    src: common.CheckpointRef | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    resume: bool = False,
    auto_resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    show_progress: bool = True,
    interrupt_after: int | None = None,
    stage_run: StageRun,
) -> dict[str, Any]:
    """Fine-tune on the ``finetune.labels`` subset and test; returns the summary.

    Args:
        recipe: the resolved recipe; ``[finetune]`` applies.
        src: the pretrain checkpoint (ignored with ``init='random'``: supervised from scratch).
        out_dir: run directory to write ``finetune/`` into.
        resume: continue from ``OUT/finetune/state`` (the CLI takes the recipe from ``OUT/finetune/recipe.toml``).
        stage_run: given by ``@with_stage_run``: the stage scaffold (signals, output folder, the previous run kept until the
            new one is durable).
    """
    cfg, data = recipe.finetune, recipe.data
    out = Path(out_dir)
    spec = parse_label_spec(cfg.labels)  # a bad --labels is reported before anything else
    # The resume takes its recipe from OUT/finetune/recipe.toml: no --labels or --set needed.
    source = f"{shlex.quote(str(src.checkpoint))} " if init != "random" and src is not None and src.checkpoint else ""
    resume_cmd = (f"simclr finetune {source}{'--init random ' if init == 'random' else ''}--out {shlex.quote(str(out))} "
                  "--resume")
    accelerator = stage_run.open(recipe, out, STAGE, precision=(cfg.mixed_precision, "finetune.mixed_precision"),
                                 resume_cmd=resume_cmd, show_progress=show_progress)
    resume = stage_run.check(overwrite=overwrite, resume=resume, force=force, resumable_changes=RESUMABLE_CHANGES,
                             auto_resume=auto_resume)

    # The labeled subset.
    splits = common.labeled_splits(recipe)
    chosen = select_labeled(splits.train, spec, recipe.seed)
    fraction = len(chosen) / len(splits.train_indices)
    epochs = cfg.epochs or default_epochs(spec.fraction if spec.fraction is not None else fraction)

    encoder, model = _build_classifier(recipe, src, init, splits.num_classes)
    model, bn_mode = convert_sync_bn(model, accelerator, cfg.sync_bn)
    train = SubsetSource(splits.train, chosen)
    augment = crop_flip_augment(recipe.augment, cfg.crop_scale, data.image_size, data.mean, data.std)
    views = LabeledViews(train, augment, recipe.seed)
    stage_run.start(overwrite=overwrite, resume=resume,
                    files={"labels.txt": lambda path: write_label_list(path, splits.train, chosen)})
    stage_run.say(f"finetune {common.source_label(src, init)} on {len(chosen)} labeled images ({cfg.labels}, "
                  f"{100 * fraction:.2f}% of {len(splits.train_indices)}), {splits.num_classes} classes, {epochs} "
                  f"epochs, head layers kept {cfg.from_head_layer}, BN {bn_mode} -> {stage_run.stage_dir}")
    fit_spec = FitSpec.from_section(cfg, data=data, seed=recipe.seed, epochs=epochs)
    evaluate, every = common.test_top1_during(splits, recipe, accelerator, epochs)
    task, result, batch = fit(accelerator, ClassificationTask(model), views, fit_spec, evaluate=evaluate,
                              evaluate_every=every, **stage_run.training(resume=resume, interrupt_after=interrupt_after))
    return _report(stage_run, recipe, src, init, encoder, task.model, splits, result, batch, labeled_images=len(chosen),
                   fraction=fraction, epochs=epochs)


def _report(stage_run: StageRun, recipe: Recipe, src: common.CheckpointRef | None, init: str, encoder: SimCLRModel,
            trained: Classifier, splits: common.LabeledSplits, result, batch: int, *, labeled_images: int,
            fraction: float, epochs: int) -> dict[str, Any]:
    """The classifier on the test split, the summary, and the classifier written as ``model.safetensors``."""
    cfg, accelerator = recipe.finetune, stage_run.accelerator
    with stage_run.stop.immediately():  # the final state is saved: a resume runs only this test
        test = common.test_topk(trained, splits, recipe, accelerator)
    if test is None:
        return stage_run.finish({})
    acc, test_images = test
    common.log_final(stage_run.stage_dir / "metrics.jsonl", stage_run.main,
                     {"step": result.step, "epoch": result.epoch, "test_top1": round(acc[1], 4)})
    summary = stage_run.summary(
        init=init, source=common.source_label(src, init), **common.source_identity(src, init),
        backbone=recipe.model.backbone, labels=cfg.labels, label_fraction=round(fraction, 6),
        labeled_images=labeled_images, from_head_layer=cfg.from_head_layer, epochs=epochs, steps=result.step,
        global_batch=batch, top1=round(acc[1], 4), top5=round(acc[5], 4), test_images=test_images,
        num_classes=splits.num_classes, **common.training_numbers(result, stage_run.t_start),
    )
    metadata = {**checkpoint_metadata(recipe, encoder, STAGE),
                **classifier_metadata(splits.classes, splits.num_classes, cfg.from_head_layer, init),
                "simclr.labels": cfg.labels}
    tensors = {**prefixed_state("backbone", trained.backbone), **prefixed_state("head", trained.head)}
    return stage_run.finish(summary, tensors=tensors, metadata=metadata)


def _build_classifier(recipe: Recipe, src: common.CheckpointRef | None, init: str,
                      num_classes: int) -> tuple[SimCLRModel, Classifier]:
    """The encoder read from ``src`` (or random), and the classifier on it: its backbone, the first
    ``finetune.from_head_layer`` projection-head layers and a new linear layer."""
    cfg = recipe.finetune
    encoder = common.load_encoder(src, recipe, init)
    layers = common.head_layers(encoder)
    if cfg.from_head_layer > len(layers):
        raise UsageError(f"finetune.from_head_layer={cfg.from_head_layer}, but the projection head has "
                         f"{len(layers)} layer(s) (model.proj_layers={recipe.model.proj_layers})")
    torch.manual_seed(recipe.seed)
    return encoder, Classifier(encoder.backbone, layers[: cfg.from_head_layer], num_classes)
