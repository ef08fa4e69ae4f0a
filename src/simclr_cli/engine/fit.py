"""Supervised-style training through the shared loop: the common part of finetune, the paper-mode
linear probe, distill and transfer fine-tuning.

A stage builds its task (an ``nn.Module`` returning ``{"loss": ...}``) and a dataset indexed by
``(epoch, index)``; :func:`fit` adds the deterministic sampler and loader, Nesterov SGD with
lr x B/256 and cosine decay (no warmup), optional resume, and runs :func:`run_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from simclr_cli.checkpoints import load_state
from simclr_cli.data.loaders import GlobalBatchSampler, check_known_unreadable, make_loader
from simclr_cli.engine.loop import LoopResult, LoopSpec, restore_scaler, run_loop
from simclr_cli.engine.reporting import MetricsLog, ProgressDisplay
from simclr_cli.engine.signals import StopRequest
from simclr_cli.errors import UsageError
from simclr_cli.optim import build_optimizer, warmup_cosine


@dataclass(frozen=True)
class FitSpec:
    """Plain numbers for :func:`fit`."""

    epochs: int
    batch_size: int  # global; lowered to the dataset size when larger
    lr: float  # base; scaled by batch/256
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 1  # epochs; 0 with state_dir=None keeps no state
    keep_states: int = 2
    max_bad_fraction: float = 0.01
    max_steps: int = 0  # cap (0: none)


def fit_batch(requested: int, n: int, world: int) -> int:
    """The global batch: ``requested``, lowered to the largest multiple of ``world`` that fits ``n``."""
    batch = min(requested, n // world * world)
    if batch < world:
        raise UsageError(f"{n} training images are too few for {world} processes")
    return batch


def fit(
    accelerator,
    task: nn.Module,
    dataset: Dataset,
    spec: FitSpec,
    *,
    stage: str,
    metrics_path: Path,
    show_progress: bool,
    state_dir: Path | None,
    resume: bool = False,
    resume_hint: str = "",
    interrupt_after: int | None = None,
    description: str = "",
    tensorboard: bool = False,
    stop: StopRequest | None = None,
    on_save=None,
) -> tuple[nn.Module, LoopResult, int]:
    """Train ``task`` on ``dataset``; returns (the unwrapped task, the loop result, the global batch).

    ``stop``, ``on_save``: as for :func:`run_loop` (the stage's stop request, held since it started).
    """
    # Images decoded into memory: too many unreadable ones stop the stage before training.
    check_known_unreadable(getattr(dataset, "source", None), spec.max_bad_fraction)
    world = accelerator.num_processes
    batch = fit_batch(spec.batch_size, len(dataset), world)
    # Every labeled image is seen every epoch: ceil(n/B) steps, the last batch filled from the epoch's start.
    sampler = GlobalBatchSampler(len(dataset), batch, spec.seed, accelerator.process_index, world, drop_last=False)
    loader = make_loader(dataset, batch_sampler=sampler, num_workers=spec.num_workers,
                         pin_memory=accelerator.device.type == "cuda")
    spe = sampler.batches_per_epoch
    total = spec.epochs * spe
    if spec.max_steps:
        total = min(total, spec.max_steps) if total else spec.max_steps
    peak = spec.lr * batch / 256
    optimizer = build_optimizer("sgd", task, lr=peak, weight_decay=spec.weight_decay, momentum=spec.momentum,
                                nesterov=True)
    task, optimizer = accelerator.prepare(task, optimizer)
    start_step, elapsed0 = 0, 0.0
    if resume and state_dir is not None:
        counters = load_state(state_dir, accelerator.unwrap_model(task), optimizer)
        restore_scaler(accelerator, counters)
        start_step, elapsed0 = int(counters["step"]), float(counters.get("elapsed", 0.0))
    # Resuming keeps the lines logged up to the saved step; a new run starts the file afresh.
    metrics_log = MetricsLog(metrics_path, enabled=accelerator.is_main_process,
                             keep_until_step=start_step if resume else None, tensorboard=tensorboard)
    progress = ProgressDisplay(total, start_step, enabled=show_progress and accelerator.is_main_process,
                               description=f"{stage} {description}".strip())
    progress.message(f"{stage}: {len(dataset)} images, {spe} steps/epoch, {total} steps, batch {batch}"
                     + (f" (lowered from {spec.batch_size})" if batch < spec.batch_size else "")
                     + f", lr {peak:.4g}" + (f", resuming at step {start_step}" if start_step else ""))
    loop_spec = LoopSpec(
        total_steps=total, steps_per_epoch=spe, global_batch=batch, peak_lrs=[peak] * len(optimizer.param_groups),
        schedule=partial(warmup_cosine, total_steps=total, warmup_steps=0), seed=spec.seed,
        log_every=spec.log_every, save_every=spec.save_every if state_dir is not None else 0,
        keep_states=spec.keep_states, dataset_size=len(dataset), max_bad_fraction=spec.max_bad_fraction, stage=stage,
        resume_hint=resume_hint, interrupt_after=interrupt_after,
    )
    stop = (stop or StopRequest()).__enter__()
    try:
        result = run_loop(accelerator, task, optimizer, sampler, loader, loop_spec, state_dir=state_dir,
                          metrics=metrics_log, progress=progress, start_step=start_step, start_time_offset=elapsed0,
                          stop=stop, on_save=on_save)
    finally:
        progress.close()
        stop.__exit__(None, None, None)
    result.train_seconds += elapsed0
    return accelerator.unwrap_model(task), result, batch
