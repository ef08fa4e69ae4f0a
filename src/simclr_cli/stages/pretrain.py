"""The ``pretrain`` stage: contrastive pretraining on unlabeled images (SIMCLR.md section 2).

``run(recipe, out_dir)`` builds data, model, optimizer and task from the recipe,
runs the shared loop, and writes ``OUT/pretrain/``: ``model.safetensors``,
``recipe.toml``, ``metrics.jsonl``, ``summary.json`` and ``state/``.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any

import torch

import simclr_cli
from simclr_cli.checkpoints import prefixed_state
from simclr_cli.checkpoints.metadata import checkpoint_metadata
from simclr_cli.data.pipeline.augment import SimCLRAugment
from simclr_cli.data.pipeline.batched import BatchedAugment
from simclr_cli.data.pipeline.decode import DeviceDecoder, choose_decode
from simclr_cli.data.pipeline.loaders import (
    ContrastiveViews,
    build_source,
    check_known_unreadable,
    require_labels,
)
from simclr_cli.data.sources.images import ImageSource
from simclr_cli.engine.fit import FitSpec, Trainer
from simclr_cli.engine.loop import LoopResult
from simclr_cli.engine.setup import convert_sync_bn
from simclr_cli.engine.tasks import ContrastiveTask, contrastive_task, grad_cache_chunk
from simclr_cli.errors import DataError
from simclr_cli.evaluation.monitor import KnnMonitor
from simclr_cli.models import SimCLRModel, build_simclr_model
from simclr_cli.objectives import Objective, build_objective
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, with_stage_run

STAGE = "pretrain"
COMPILE_BACKEND = "inductor"  # torch.compile backend for pretrain.compile (tests use "eager")
# Keys that may change between an interrupted run and its resume.
RESUMABLE_CHANGES = frozenset({"data.num_workers", "data.root", "data.download", "data.labeled", "pretrain.log_every"})


@with_stage_run()
def run(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    auto_resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    show_progress: bool = True,
    interrupt_after: int | None = None,
    stage_run: StageRun,
) -> dict[str, Any]:
    """Pretrain and return the summary (also written to ``OUT/pretrain/summary.json``).

    Args:
        recipe: the resolved recipe.
        out_dir: run directory; default ``runs/<recipe.name>``.
        resume: continue from ``OUT/pretrain/state``.
        overwrite: replace a finished or interrupted run in the same place.
        force: resume even if the recipe or the number of processes changed.
        show_progress: progress bar / log lines on the main process.
        interrupt_after: for tests, stop as if SIGTERM arrived after this step.
        stage_run: given by ``@with_stage_run``: signals, and the previous run kept until the new one is durable.
    """
    out = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    stage_dir = out / STAGE
    resume_cmd = f"simclr pretrain {shlex.quote(str(stage_dir / 'recipe.toml'))} --out {shlex.quote(str(out))} --resume"
    pcfg = recipe.pretrain
    accelerator = stage_run.open(recipe, out, STAGE, precision=(pcfg.mixed_precision, "pretrain.mixed_precision"),
                                 resume_cmd=resume_cmd, show_progress=show_progress)
    resume = stage_run.check(overwrite=overwrite, resume=resume, force=force, resumable_changes=RESUMABLE_CHANGES,
                             auto_resume=auto_resume)
    torch.manual_seed(recipe.seed)

    objective = build_objective(pcfg)
    chunk = grad_cache_chunk(objective, pcfg.micro_batch_size, pcfg.batch_size, accelerator.num_processes)
    # Data. A data.labeled folder (the kNN monitor's) is checked first: its errors must not wait for the training
    # images to be decoded into memory.
    labeled = _knn_splits(recipe) if pcfg.knn_every and recipe.data.labeled else None
    views = _training_views(recipe, objective, accelerator)
    task, bn_mode = _build_task(recipe, objective, views, accelerator, chunk)

    # Only now, with data and model built, is an old run set aside (restored if this one fails).
    stage_run.start(overwrite=overwrite, resume=resume)
    spec = FitSpec.from_section(pcfg, data=recipe.data, seed=recipe.seed, full_batches=True, check_world_size=True)
    trainer = Trainer(accelerator, task, views, spec,
                      **stage_run.training(resume=resume, force=force, interrupt_after=interrupt_after))
    knn, knn_off = _knn_monitor(recipe, accelerator, views.source, splits=labeled) if pcfg.knn_every else (None, "")
    _announce(trainer, recipe, len(views), bn_mode, chunk, stage_dir, resume, knn_off)
    result, init_knn, final_knn = _train(trainer, knn, pcfg.knn_every, resume=resume, stage_run=stage_run)
    return _finish(stage_run, recipe, trainer, result, len(views), final_knn=final_knn, init_knn=init_knn)


def _training_views(recipe: Recipe, objective: Objective, accelerator) -> ContrastiveViews:
    """The training split as pairs of views: its images checked (labels when the objective needs them; too many
    unreadable ones stop the run before step 1), the augmentation, and where JPEGs are decoded."""
    cfg = recipe.data
    train_source = build_source(cfg, cfg.train_split, recipe.seed)
    if objective.needs_labels:
        require_labels(train_source, f"pretrain.objective='{recipe.pretrain.objective}'")
    # Decoded into memory: every unreadable file is known now, so too many stop the run before step 1.
    check_known_unreadable(train_source, cfg.max_bad_fraction)
    augment = SimCLRAugment(recipe.augment, cfg.image_size, cfg.mean, cfg.std)
    batched = recipe.augment.backend == "batched"
    decode = choose_decode(cfg.decode, batched, accelerator.device, train_source, progress=accelerator.is_main_process)
    return ContrastiveViews(train_source, augment, recipe.seed, batched=batched, labels=objective.needs_labels,
                            decode_draft=cfg.decode_draft, decode=decode)


def _build_task(recipe: Recipe, objective: Objective, views: ContrastiveViews, accelerator,
                chunk: int) -> tuple[ContrastiveTask, str]:
    """The model (f and g, global BN when several processes run), the objective built on it, and the task around
    both (the gradient cache in chunks of ``chunk`` images when > 0); returns the task and the BN mode."""
    pcfg = recipe.pretrain
    model = build_simclr_model(recipe.model, head=objective.head, image_size=recipe.data.image_size)
    model, bn_mode = convert_sync_bn(model, accelerator, pcfg.sync_bn)
    objective.build(model)  # before channels_last, compile, the optimizer and resume: its state goes with the task's
    objective.check_built(model)
    convert_sync_bn(objective, accelerator, pcfg.sync_bn)  # BN layers of its own (a predictor's) global too
    task = contrastive_task(model, objective, chunk, batched=BatchedAugment(views.augment) if views.batched else None)
    if views.device_decode:  # JPEG batches decoded on the device before the batched augmentation
        task.decoder = DeviceDecoder(views, accelerator.device)
    if pcfg.channels_last:
        model.to(memory_format=torch.channels_last)
        objective.to(memory_format=torch.channels_last)
        task.channels_last = True
    if pcfg.compile:
        model.backbone.compile(backend=COMPILE_BACKEND)  # in place: state_dict keys stay the same
    return task, bn_mode


def _announce(trainer: Trainer, recipe: Recipe, images: int, bn_mode: str, chunk: int, stage_dir: Path, resume: bool,
              knn_off: str) -> None:
    """The run's banner, why the kNN monitor is off (when it is), and a warmup that covers the whole run."""
    plan, progress, pcfg, accelerator = trainer.plan, trainer.progress, recipe.pretrain, trainer.accelerator
    progress.message(
        f"pretrain {recipe.name}: {images} images, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
        f"global batch {pcfg.batch_size} on {accelerator.num_processes} process(es) ({accelerator.device.type}), "
        f"{recipe.model.backbone}, lr {plan.peak_lr:.4g}, BN {bn_mode}"
        + (f", gradient cache in chunks of {chunk}" if chunk else "")
        + f" -> {stage_dir}"
        + (f" (resuming at step {plan.start_step})" if resume else "")
    )
    if knn_off:
        progress.message(knn_off)
    if plan.warmup_steps >= plan.total_steps:
        progress.message(f"warning: pretrain.warmup_epochs={pcfg.warmup_epochs:g} covers the whole run "
                         f"({pcfg.epochs} epochs); the learning rate never reaches its peak. Lower warmup_epochs.")


def _train(trainer: Trainer, knn: KnnMonitor | None, knn_every: int, *, resume: bool,
           stage_run: StageRun) -> tuple[LoopResult, float | None, float | None]:
    """The loop, with the kNN monitor (when on) before the first step of a new run, every ``knn_every`` epochs and
    after the last step; returns the loop result and the kNN top-1 at init and at the end.

    Ctrl-C / SIGTERM (caught since the stage started, also during the first kNN pass) stop at a step boundary
    with state saved; once the loop has saved the final state, they stop the final kNN pass at once."""
    metrics, progress, spe = trainer.metrics, trainer.progress, trainer.plan.steps_per_epoch
    hook = None
    if knn is not None:
        hook = lambda epoch, step: {"knn_top1": knn(trainer.model.model.backbone)}  # noqa: E731
    with trainer:
        init_knn = None
        if knn is not None and not resume:
            init_knn = knn(trainer.model.model.backbone)
            metrics.write({"step": 0, "epoch": 0, "knn_top1": init_knn, "time": 0.0})
            progress.message(f"knn_top1 at init (random encoder): {init_knn}")
        elif resume:
            init_knn = _first_knn(stage_run.stage_dir / "metrics.jsonl")
        result = trainer.run(epoch_hook=hook, hook_every=knn_every)
        final_knn = None
        if knn is not None:
            with trainer.stop.immediately():  # a resume at the final step runs only this pass and writes the outputs
                final_knn = knn(trainer.model.model.backbone)
            metrics.write({"step": result.step, "epoch": round(result.step / spe, 4), "knn_top1": final_knn,
                           "time": round(result.wall_before + time.perf_counter() - stage_run.t_start, 3)})
    return result, init_knn, final_knn


def _finish(stage_run: StageRun, recipe: Recipe, trainer: Trainer, result: LoopResult, images: int, *,
            final_knn: float | None, init_knn: float | None) -> dict[str, Any]:
    """The summary, and f and g written as ``model.safetensors``."""
    accelerator = trainer.accelerator
    unwrapped: SimCLRModel = trainer.model.model
    summary = stage_run.summary(
        backbone=recipe.model.backbone,
        steps=result.step,
        epochs=round(result.step / trainer.plan.steps_per_epoch, 4),
        images=images,
        global_batch=recipe.pretrain.batch_size,
        processes=accelerator.num_processes,
        device=accelerator.device.type,
        final_loss=result.last.get("loss"),
        images_per_sec=round(result.images_per_sec, 2),
        train_seconds=round(result.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - stage_run.t_start + trainer.plan.elapsed, 2),
        bad_images=result.bad_images,
        knn_top1=final_knn,
        knn_top1_init=init_knn,
        version=simclr_cli.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
    )
    tensors = {**prefixed_state("backbone", unwrapped.backbone), **prefixed_state("head", unwrapped.head)}
    return stage_run.finish(summary, tensors=tensors, metadata=checkpoint_metadata(recipe, unwrapped, STAGE))


def _first_knn(path: Path) -> float | None:
    """The kNN top-1 logged at step 0 (the random-init encoder) by an earlier, interrupted invocation."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == 0 and "knn_top1" in record:
            return record["knn_top1"]
    return None


def _knn_splits(recipe: Recipe, train_source: ImageSource | None = None) -> common.LabeledSplits | None:
    """:func:`common.labeled_splits` for the kNN monitor (None: no labeled val split), its errors saying so."""
    try:
        return common.labeled_splits(recipe, train_source=train_source, required=False)
    except DataError as e:  # e.g. an image folder without the val/ the recipe names
        raise DataError(f"{e} (the kNN monitor reads it: pretrain.knn_every=0 pretrains without the monitor)",
                        missing=True) from None


def _knn_monitor(recipe: Recipe, accelerator, train_source: ImageSource | None = None,
                 splits: common.LabeledSplits | None = None) -> tuple[KnnMonitor | None, str]:
    """The kNN monitor on the labeled splits as the evaluation stages build them (``data.labeled``, or the
    dataset's own splits with ``train_source`` reused as the bank when it is the same split; ``splits``: already
    built), and ''; or (None, the one line that says why it is off) when there is no labeled val split."""
    if splits is None:
        splits = _knn_splits(recipe, train_source)
    if splits is None:
        cfg = recipe.data
        why = "data.val_split is empty" if not cfg.val_split else f"data.dataset={cfg.dataset} has no labeled val split"
        return None, (f"kNN monitor off: {why}; set data.labeled=PATH (a labeled image folder) to turn it "
                      "on, or pretrain.knn_every=0 to silence this line")
    bs = max(64, min(512, recipe.pretrain.batch_size))
    bank_loader = common.eval_loader(splits.train, splits.train_indices, recipe, accelerator, batch_size=bs)
    query_loader = common.eval_loader(splits.test, None, recipe, accelerator, batch_size=bs)
    return KnnMonitor(accelerator, bank_loader, query_loader, splits.num_classes, recipe.pretrain.knn_k,
                      recipe.pretrain.knn_temperature), ""
