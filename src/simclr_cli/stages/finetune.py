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

from simclr_cli.checkpoints import MODEL_FILE, STATE_DIR, prefixed_state, save_weights
from simclr_cli.checkpoints.metadata import checkpoint_metadata, classifier_metadata
from simclr_cli.data.augment import crop_flip_augment
from simclr_cli.data.loaders import LabeledViews, SubsetSource
from simclr_cli.data.subsets import parse_label_spec, select_labeled, write_label_list
from simclr_cli.engine.reporting import require_tensorboard
from simclr_cli.engine.setup import convert_sync_bn, make_accelerator
from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.tasks import ClassificationTask
from simclr_cli.errors import UsageError
from simclr_cli.evaluation.knn import topk_accuracy
from simclr_cli.evaluation.linear import predict
from simclr_cli.models.classifier import Classifier
from simclr_cli.recipe import Recipe, recipe_to_toml
from simclr_cli.stages import common
from simclr_cli.utils import atomic_write_text

STAGE = "finetune"
RESUMABLE_CHANGES = frozenset({"data.num_workers", "data.root", "data.download", "finetune.log_every"})


def default_epochs(fraction: float) -> int:
    """The paper's budget: 60 epochs for subsets up to 1% of the labels, 30 above."""
    return 60 if fraction <= 0.01 + 1e-9 else 30


@common.guarded()
def run(
    recipe: Recipe,
    src: common.Source | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    show_progress: bool = True,
    interrupt_after: int | None = None,
    guard: common.StageRun,
) -> dict[str, Any]:
    """Fine-tune on the ``finetune.labels`` subset and test; returns the summary.

    Args:
        recipe: the resolved recipe; ``[finetune]`` applies.
        src: the pretrain checkpoint (ignored with ``init='random'``: supervised from scratch).
        out_dir: run directory to write ``finetune/`` into.
        resume: continue from ``OUT/finetune/state`` (the CLI takes the recipe from ``OUT/finetune/recipe.toml``).
        guard: given by ``@guarded``: signals, and the previous run kept until the new one is durable.
    """
    t_start = time.perf_counter()
    require_tensorboard(recipe.tensorboard)
    cfg, data = recipe.finetune, recipe.data
    out = Path(out_dir)
    stage_dir = out / STAGE
    state_dir = stage_dir / STATE_DIR
    spec = parse_label_spec(cfg.labels)  # a bad --labels is reported before anything else
    # The resume takes its recipe from OUT/finetune/recipe.toml: no --labels or --set needed.
    source = f"{shlex.quote(str(src.checkpoint))} " if init != "random" and src is not None and src.checkpoint else ""
    resume_cmd = (f"simclr finetune {source}{'--init random ' if init == 'random' else ''}--out {shlex.quote(str(out))} "
                  "--resume")
    guard.configure(stage_dir, STAGE, resume_cmd=resume_cmd)
    common.check_output(stage_dir, STAGE, overwrite=overwrite, resume=resume, recipe=recipe, force=force,
                        resume_cmd=resume_cmd, resumable_changes=RESUMABLE_CHANGES)
    accelerator = make_accelerator(cfg.mixed_precision, key="finetune.mixed_precision")
    main = accelerator.is_main_process

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
    guard.begin(overwrite=overwrite, resume=resume, accelerator=accelerator)
    if main:
        atomic_write_text(stage_dir / "recipe.toml", recipe_to_toml(recipe))
        write_label_list(stage_dir / "labels.txt", splits.train, chosen)
    accelerator.wait_for_everyone()
    if show_progress and main:
        print(f"finetune {common.source_label(src, init)} on {len(chosen)} labeled images ({cfg.labels}, "
              f"{100 * fraction:.2f}% of {len(splits.train_indices)}), {splits.num_classes} classes, {epochs} epochs, "
              f"head layers kept {cfg.from_head_layer}, BN {bn_mode} -> {stage_dir}")
    spec = FitSpec(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay, seed=recipe.seed, num_workers=data.num_workers,
                   log_every=cfg.log_every, save_every=cfg.save_every, keep_states=cfg.keep_states,
                   max_bad_fraction=data.max_bad_fraction)
    task, result, batch = fit(accelerator, ClassificationTask(model), views, spec, stage=STAGE,
                              metrics_path=stage_dir / "metrics.jsonl", show_progress=show_progress,
                              state_dir=state_dir, resume=resume, resume_hint=f"Resume with: {resume_cmd}",
                              interrupt_after=interrupt_after, description=recipe.name, tensorboard=recipe.tensorboard,
                              stop=guard.stop, on_save=guard.commit)
    trained: Classifier = task.model
    summary: dict[str, Any] = {}
    if main:
        test_loader = common.eval_loader(splits.test, None, recipe, accelerator)
        with guard.stop.immediately():  # the final state is saved: a resume runs only this test
            logits, labels = predict(trained, test_loader, accelerator.device, accelerator.autocast)
        acc = topk_accuracy(logits, labels, (1, 5))
        summary = {
            "stage": STAGE,
            "name": recipe.name,
            "init": init,
            "source": common.source_label(src, init),
            "backbone": recipe.model.backbone,
            "labels": cfg.labels,
            "label_fraction": round(fraction, 6),
            "labeled_images": len(chosen),
            "from_head_layer": cfg.from_head_layer,
            "epochs": epochs,
            "steps": result.step,
            "global_batch": batch,
            "top1": round(acc[1], 4),
            "top5": round(acc[5], 4),
            "test_images": len(labels),
            "num_classes": splits.num_classes,
            "final_loss": result.last.get("loss"),
            "images_per_sec": round(result.images_per_sec, 2),
            "wall_seconds": round(time.perf_counter() - t_start, 2),
        }
        metadata = checkpoint_metadata(recipe, encoder, STAGE)
        metadata.update(classifier_metadata(splits.classes, splits.num_classes, cfg.from_head_layer, init))
        metadata["simclr.labels"] = cfg.labels
        tensors = {**prefixed_state("backbone", trained.backbone), **prefixed_state("head", trained.head)}
        save_weights(stage_dir / MODEL_FILE, tensors, metadata)
        common.write_json(stage_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
