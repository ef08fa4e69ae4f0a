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
import time
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
from simclr_cli.models.classifier import Classifier
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, guarded

STAGE = "finetune"
RESUMABLE_CHANGES = frozenset({"data.num_workers", "data.root", "data.download", "finetune.log_every"})


def default_epochs(fraction: float) -> int:
    """The paper's budget: 60 epochs for subsets up to 1% of the labels, 30 above."""
    return 60 if fraction <= 0.01 + 1e-9 else 30


@guarded()
def run(
    recipe: Recipe,
    src: common.Source | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    resume: bool = False,
    auto_resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    show_progress: bool = True,
    interrupt_after: int | None = None,
    guard: StageRun,
) -> dict[str, Any]:
    """Fine-tune on the ``finetune.labels`` subset and test; returns the summary.

    Args:
        recipe: the resolved recipe; ``[finetune]`` applies.
        src: the pretrain checkpoint (ignored with ``init='random'``: supervised from scratch).
        out_dir: run directory to write ``finetune/`` into.
        resume: continue from ``OUT/finetune/state`` (the CLI takes the recipe from ``OUT/finetune/recipe.toml``).
        guard: given by ``@guarded``: the stage scaffold (signals, output folder, the previous run kept until the
            new one is durable).
    """
    cfg, data = recipe.finetune, recipe.data
    out = Path(out_dir)
    spec = parse_label_spec(cfg.labels)  # a bad --labels is reported before anything else
    # The resume takes its recipe from OUT/finetune/recipe.toml: no --labels or --set needed.
    source = f"{shlex.quote(str(src.checkpoint))} " if init != "random" and src is not None and src.checkpoint else ""
    resume_cmd = (f"simclr finetune {source}{'--init random ' if init == 'random' else ''}--out {shlex.quote(str(out))} "
                  "--resume")
    accelerator = guard.open(recipe, out, STAGE, precision=(cfg.mixed_precision, "finetune.mixed_precision"),
                             resume_cmd=resume_cmd, show_progress=show_progress)
    resume = guard.check(overwrite=overwrite, resume=resume, force=force, resumable_changes=RESUMABLE_CHANGES,
                         auto_resume=auto_resume)

    # The labeled subset.
    splits = common.labeled_splits(recipe)
    chosen = select_labeled(splits.train, spec, recipe.seed)
    fraction = len(chosen) / len(splits.train_indices)
    epochs = cfg.epochs or default_epochs(spec.fraction if spec.fraction is not None else fraction)

    # Model: encoder + kept head layers + new classifier.
    encoder = common.load_encoder(src, recipe, init)
    layers = common.head_layers(encoder)
    if cfg.from_head_layer > len(layers):
        raise UsageError(f"finetune.from_head_layer={cfg.from_head_layer}, but the projection head has "
                         f"{len(layers)} layer(s) (model.proj_layers={recipe.model.proj_layers})")
    torch.manual_seed(recipe.seed)
    model = Classifier(encoder.backbone, layers[: cfg.from_head_layer], splits.num_classes)
    model, bn_mode = convert_sync_bn(model, accelerator, cfg.sync_bn)

    train = SubsetSource(splits.train, chosen)
    augment = crop_flip_augment(recipe.augment, cfg.crop_scale, data.image_size, data.mean, data.std)
    views = LabeledViews(train, augment, recipe.seed)
    guard.start(overwrite=overwrite, resume=resume,
                files={"labels.txt": lambda path: write_label_list(path, splits.train, chosen)})
    guard.say(f"finetune {common.source_label(src, init)} on {len(chosen)} labeled images ({cfg.labels}, "
              f"{100 * fraction:.2f}% of {len(splits.train_indices)}), {splits.num_classes} classes, {epochs} epochs, "
              f"head layers kept {cfg.from_head_layer}, BN {bn_mode} -> {guard.stage_dir}")
    spec = FitSpec(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay, seed=recipe.seed, num_workers=data.num_workers,
                   log_every=cfg.log_every, save_every=cfg.save_every, keep_states=cfg.keep_states,
                   max_bad_fraction=data.max_bad_fraction)
    evaluate, every = common.test_top1_during(splits, recipe, accelerator, epochs)
    task, result, batch = fit(accelerator, ClassificationTask(model), views, spec, evaluate=evaluate,
                              evaluate_every=every, **guard.training(resume=resume, interrupt_after=interrupt_after))
    trained: Classifier = task.model
    with guard.stop.immediately():  # the final state is saved: a resume runs only this test
        test = common.test_topk(trained, splits, recipe, accelerator)
    if test is None:
        return guard.finish({})
    acc, test_images = test
    common.log_final(guard.stage_dir / "metrics.jsonl", guard.main,
                     {"step": result.step, "epoch": result.epoch, "test_top1": round(acc[1], 4)})
    summary = guard.summary(
        init=init,
        source=common.source_label(src, init),
        **common.source_identity(src, init),
        backbone=recipe.model.backbone,
        labels=cfg.labels,
        label_fraction=round(fraction, 6),
        labeled_images=len(chosen),
        from_head_layer=cfg.from_head_layer,
        epochs=epochs,
        steps=result.step,
        global_batch=batch,
        top1=round(acc[1], 4),
        top5=round(acc[5], 4),
        test_images=test_images,
        num_classes=splits.num_classes,
        final_loss=result.last.get("loss"),
        images_per_sec=round(result.images_per_sec, 2),
        train_seconds=round(result.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - guard.t_start + result.wall_before, 2),
    )
    metadata = {**checkpoint_metadata(recipe, encoder, STAGE),
                **classifier_metadata(splits.classes, splits.num_classes, cfg.from_head_layer, init),
                "simclr.labels": cfg.labels}
    tensors = {**prefixed_state("backbone", trained.backbone), **prefixed_state("head", trained.head)}
    return guard.finish(summary, tensors=tensors, metadata=metadata)
