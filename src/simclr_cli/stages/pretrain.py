"""The ``pretrain`` stage: contrastive pretraining on unlabeled images (SIMCLR.md section 2).

``run(recipe, out_dir)`` builds data, model, optimizer and task from the recipe,
runs the shared loop, and writes ``OUT/pretrain/``: ``model.safetensors``,
``recipe.toml``, ``metrics.jsonl``, ``summary.json`` and ``state/``.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import simclr_cli
from simclr_cli.checkpoints import prefixed_state
from simclr_cli.checkpoints.metadata import checkpoint_metadata
from simclr_cli.data.pipeline.augment import SimCLRAugment
from simclr_cli.data.pipeline.batched import BatchedAugment
from simclr_cli.data.pipeline.decode import DeviceDecoder
from simclr_cli.data.pipeline.loaders import (
    ContrastiveViews,
    build_source,
    check_known_unreadable,
    require_labels,
)
from simclr_cli.engine.fit import FitSpec, Trainer
from simclr_cli.engine.setup import convert_sync_bn
from simclr_cli.engine.tasks import ContrastiveTask, GradCacheContrastiveTask
from simclr_cli.evaluation.knn import extract_features, knn_top1
from simclr_cli.models import SimCLRModel, build_simclr_model
from simclr_cli.errors import DataError, RecipeError
from simclr_cli.objectives import FitInfo, build_objective
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, guarded

STAGE = "pretrain"
COMPILE_BACKEND = "inductor"  # torch.compile backend for pretrain.compile (tests use "eager")
# Keys that may change between an interrupted run and its resume.
RESUMABLE_CHANGES = frozenset({"data.num_workers", "data.root", "data.download", "data.labeled", "pretrain.log_every"})


@guarded()
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
    guard: StageRun,
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
        guard: given by ``@guarded``: signals, and the previous run kept until the new one is durable.
    """
    out = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    stage_dir = out / STAGE
    resume_cmd = f"simclr pretrain {shlex.quote(str(stage_dir / 'recipe.toml'))} --out {shlex.quote(str(out))} --resume"
    cfg, pcfg = recipe.data, recipe.pretrain
    accelerator = guard.open(recipe, out, STAGE, precision=(pcfg.mixed_precision, "pretrain.mixed_precision"),
                             resume_cmd=resume_cmd, show_progress=show_progress)
    resume = guard.check(overwrite=overwrite, resume=resume, force=force, resumable_changes=RESUMABLE_CHANGES,
                         auto_resume=auto_resume)
    torch.manual_seed(recipe.seed)

    objective = build_objective(pcfg)
    grad_cache = 0 < pcfg.micro_batch_size < pcfg.batch_size // accelerator.num_processes
    if grad_cache and not objective.supports_grad_cache:
        raise RecipeError(f"pretrain.micro_batch_size={pcfg.micro_batch_size}: the objective '{pcfg.objective}' with "
                          "these options does not support the gradient cache (e.g. pretrain.simclr.memory_size > 0); "
                          "set pretrain.micro_batch_size=0")

    # Data. A data.labeled folder (the kNN monitor's) is checked first: its errors must not wait for the training
    # images to be decoded into memory.
    labeled = _KnnMonitor.splits(recipe) if pcfg.knn_every and cfg.labeled else None
    train_source = build_source(cfg, cfg.train_split, recipe.seed)
    if objective.needs_labels:
        require_labels(train_source, f"pretrain.objective='{pcfg.objective}'")
    # Decoded into memory: every unreadable file is known now, so too many stop the run before step 1.
    check_known_unreadable(train_source, cfg.max_bad_fraction)
    augment = SimCLRAugment(recipe.augment, cfg.image_size, cfg.mean, cfg.std)
    batched = recipe.augment.backend == "batched"
    decode = _decode_where(cfg.decode, batched, accelerator.device, train_source, progress=accelerator.is_main_process)
    views = ContrastiveViews(train_source, augment, recipe.seed, batched=batched, labels=objective.needs_labels,
                             decode_draft=cfg.decode_draft, decode=decode)

    # Model and task.
    model = build_simclr_model(recipe.model, head=objective.head, image_size=cfg.image_size)
    model, bn_mode = convert_sync_bn(model, accelerator, pcfg.sync_bn)
    objective.build(model)  # before channels_last, compile, the optimizer and resume: its state goes with the task's
    on_device = BatchedAugment(augment) if batched else None
    if grad_cache:
        task = GradCacheContrastiveTask(model, objective, micro_batch_size=pcfg.micro_batch_size, batched=on_device)
    else:
        task = ContrastiveTask(model, objective, batched=on_device)
    if views.device_decode:  # JPEG batches decoded on the device before the batched augmentation
        task.decoder = DeviceDecoder(views, accelerator.device)
    if pcfg.channels_last:
        model.to(memory_format=torch.channels_last)
        objective.to(memory_format=torch.channels_last)
        task.channels_last = True
    if pcfg.compile:
        model.backbone.compile(backend=COMPILE_BACKEND)  # in place: state_dict keys stay the same

    # Only now, with data and model built, is an old run set aside (restored if this one fails).
    guard.start(overwrite=overwrite, resume=resume)
    spec = FitSpec(
        epochs=pcfg.epochs, max_steps=pcfg.max_steps, batch_size=pcfg.batch_size, full_batches=True,
        optimizer=pcfg.optimizer, lr=pcfg.lr, lr_scaling=pcfg.lr_scaling, warmup_epochs=pcfg.warmup_epochs,
        weight_decay=pcfg.weight_decay, momentum=pcfg.momentum, nesterov=pcfg.nesterov,
        trust_coefficient=pcfg.trust_coefficient, seed=recipe.seed, num_workers=cfg.num_workers,
        log_every=pcfg.log_every, save_every=pcfg.save_every, checkpoint_every=pcfg.checkpoint_every,
        keep_states=pcfg.keep_states, max_bad_fraction=cfg.max_bad_fraction, on_nonfinite=pcfg.on_nonfinite,
        max_nonfinite_skips=pcfg.max_nonfinite_skips, check_world_size=True,
    )
    trainer = Trainer(accelerator, task, views, spec,
                      **guard.training(resume=resume, force=force, interrupt_after=interrupt_after))
    plan, metrics, progress = trainer.plan, trainer.metrics, trainer.progress
    spe, total, start_step, elapsed0 = plan.steps_per_epoch, plan.total_steps, plan.start_step, plan.elapsed
    trainer.model.on_fit_start(FitInfo(total_steps=total, steps_per_epoch=spe, world_size=accelerator.num_processes,
                                       start_step=start_step))

    # kNN monitor on h against the labeled val split.
    knn = _KnnMonitor.build(recipe, accelerator, train_source, splits=labeled) if pcfg.knn_every else None
    progress.message(
        f"pretrain {recipe.name}: {len(views)} images, {spe} steps/epoch, {total} steps, global batch "
        f"{pcfg.batch_size} on {accelerator.num_processes} process(es) ({accelerator.device.type}), "
        f"{recipe.model.backbone}, lr {plan.peak_lr:.4g}, BN {bn_mode}"
        + (f", gradient cache in chunks of {pcfg.micro_batch_size}" if grad_cache else "")
        + f" -> {stage_dir}"
        + (f" (resuming at step {start_step})" if resume else "")
    )
    if knn is not None and not knn.enabled:
        progress.message(knn.off_reason)
    if plan.warmup_steps >= total:
        progress.message(f"warning: pretrain.warmup_epochs={pcfg.warmup_epochs:g} covers the whole run "
                         f"({pcfg.epochs} epochs); the learning rate never reaches its peak. Lower warmup_epochs.")
    hook = None
    if knn is not None and knn.enabled:
        hook = lambda epoch, step: {"knn_top1": knn(trainer.model.model)}  # noqa: E731
    # Ctrl-C / SIGTERM (caught since the stage started, also during the first kNN pass) stop at a step boundary
    # with state saved; once the loop has saved the final state, they stop the final kNN pass at once.
    with trainer:
        init_knn = None
        if knn is not None and knn.enabled and not resume:
            init_knn = knn(trainer.model.model)
            metrics.write({"step": 0, "epoch": 0, "knn_top1": init_knn, "time": 0.0})
            progress.message(f"knn_top1 at init (random encoder): {init_knn}")
        elif resume:
            init_knn = _first_knn(stage_dir / "metrics.jsonl")
        result = trainer.run(epoch_hook=hook, hook_every=pcfg.knn_every)
        final_knn = None
        if knn is not None and knn.enabled:
            with trainer.stop.immediately():  # a resume at the final step runs only this pass and writes the outputs
                final_knn = knn(trainer.model.model)
            metrics.write({"step": result.step, "epoch": round(result.step / spe, 4), "knn_top1": final_knn,
                           "time": round(result.wall_before + time.perf_counter() - guard.t_start, 3)})

    unwrapped: SimCLRModel = trainer.model.model
    summary = guard.summary(
        backbone=recipe.model.backbone,
        steps=result.step,
        epochs=round(result.step / spe, 4),
        images=len(views),
        global_batch=pcfg.batch_size,
        processes=accelerator.num_processes,
        device=accelerator.device.type,
        final_loss=result.last.get("loss"),
        images_per_sec=round(result.images_per_sec, 2),
        train_seconds=round(result.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - guard.t_start + elapsed0, 2),
        bad_images=result.bad_images,
        knn_top1=final_knn,
        knn_top1_init=init_knn,
        version=simclr_cli.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
    )
    tensors = {**prefixed_state("backbone", unwrapped.backbone), **prefixed_state("head", unwrapped.head)}
    return guard.finish(summary, tensors=tensors, metadata=checkpoint_metadata(recipe, unwrapped, STAGE))


def _first_knn(path: Path) -> float | None:
    """The kNN top-1 logged at step 0 (the random-init encoder) by an earlier, interrupted invocation."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == 0 and "knn_top1" in record:
            return record["knn_top1"]
    return None


class _KnnMonitor:
    """kNN top-1 of h on the labeled val split, with the labeled train split as memory bank.

    Every process extracts its share of both splits (one pass over them, split K ways); the main process
    scores, on the gathered features.
    """

    def __init__(self, accelerator, bank_loader, query_loader, num_classes: int, k: int, t: float, enabled: bool,
                 off_reason: str = ""):
        self.accelerator = accelerator
        self.off_reason = off_reason  # the one line said when the monitor is off
        self.bank_loader = bank_loader
        self.query_loader = query_loader
        self.num_classes = num_classes
        self.k, self.t = k, t
        self.enabled = enabled

    @staticmethod
    def splits(recipe: Recipe, train_source=None):
        """:func:`common.labeled_splits` for the monitor (None: no labeled val split), its errors saying so."""
        try:
            return common.labeled_splits(recipe, train_source=train_source, required=False)
        except DataError as e:  # e.g. an image folder without the val/ the recipe names
            raise DataError(f"{e} (the kNN monitor reads it: pretrain.knn_every=0 pretrains without the monitor)",
                            missing=True) from None

    @classmethod
    def build(cls, recipe: Recipe, accelerator, train_source=None, splits=None) -> "_KnnMonitor":
        """The labeled splits as the evaluation stages build them (``data.labeled``, or the dataset's own
        splits with ``train_source`` reused as the bank when it is the same split; ``splits``: already built);
        off, with ``off_reason``, when there is no labeled val split."""
        if splits is None:
            splits = cls.splits(recipe, train_source)
        if splits is None:
            cfg = recipe.data
            why = "data.val_split is empty" if not cfg.val_split else f"data.dataset={cfg.dataset} has no labeled val split"
            return cls(accelerator, None, None, 0, 0, 0, enabled=False,
                       off_reason=f"kNN monitor off: {why}; set data.labeled=PATH (a labeled image folder) to turn it "
                                  "on, or pretrain.knn_every=0 to silence this line")
        bs = max(64, min(512, recipe.pretrain.batch_size))
        bank_loader = common.eval_loader(splits.train, splits.train_indices, recipe, accelerator, batch_size=bs)
        query_loader = common.eval_loader(splits.test, None, recipe, accelerator, batch_size=bs)
        return cls(accelerator, bank_loader, query_loader, splits.num_classes, recipe.pretrain.knn_k,
                   recipe.pretrain.knn_temperature, enabled=True)

    def __call__(self, model: SimCLRModel) -> float | None:
        """kNN top-1 on the main process (None on the others). Every process extracts its share of both splits;
        the main one gathers them and scores on its device, in chunks."""
        device, autocast = self.accelerator.device, self.accelerator.autocast
        bank = extract_features(model.backbone, self.bank_loader, device, autocast, everywhere=False)
        query = extract_features(model.backbone, self.query_loader, device, autocast, everywhere=False)
        acc = None
        if self.accelerator.is_main_process:
            acc = round(knn_top1(*bank, *query, self.num_classes, self.k, self.t, device=device), 4)
        self.accelerator.wait_for_everyone()
        return acc


def _decode_where(decode: str, batched: bool, device: torch.device, source, progress: bool = True) -> str:
    """``data.decode`` as it will run: 'gpu' needs the batched backend (a RecipeError otherwise), a CUDA
    device and encoded files; without CUDA or files it falls back to 'cpu' with one line saying why."""
    if decode != "gpu":
        return decode
    if not batched:
        raise RecipeError("data.decode='gpu' needs augment.backend='batched' (the views are made on the device); "
                          "set augment.backend=batched or data.decode=cpu")
    why = ("no CUDA device" if device.type != "cuda" else
           "the images are not encoded files (in memory or a built-in dataset)" if not hasattr(source, "raw") else "")
    if why:
        if progress:
            print(f"data.decode='gpu': {why}; decoding on the CPU instead", file=sys.stderr, flush=True)
        return "cpu"
    return "gpu"

