"""The one training path: pretraining and every supervised stage (finetune, the paper-mode linear
probe, distill, transfer fine-tuning) train through :class:`Trainer`.

A stage builds its task (a :class:`~simclr_cli.engine.tasks.Task` returning ``{"loss": ...}``) and a dataset indexed by
``(epoch, index)``; the trainer adds the deterministic sampler and loader, the optimizer with its
lr scaling, the warmup + cosine schedule, optional resume, the metrics log and the progress
display, and runs :func:`~simclr_cli.engine.loop.run_loop`. :class:`FitSpec` holds the plain numbers;
its defaults are the supervised protocol (Nesterov SGD, lr x B/256, no warmup, every image every
epoch). :func:`fit` is the whole thing in one call, for stages with nothing to do around the loop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from simclr_cli import threads
from simclr_cli.checkpoints import load_state, read_trainer
from simclr_cli.data.pipeline.loaders import GlobalBatchSampler, check_known_unreadable, data_fingerprint, make_loader
from simclr_cli.engine.loop import EpochHook, LoopResult, LoopSpec, restore_scaler, run_loop
from simclr_cli.engine.reporting import MetricsLog, ProgressDisplay
from simclr_cli.engine.signals import StopRequest
from simclr_cli.engine.tasks import Task
from simclr_cli.errors import UsageError
from simclr_cli.objectives import FitInfo
from simclr_cli.optim import build_optimizer, scaled_lr, warmup_cosine


@dataclass(frozen=True)
class FitSpec:
    """Plain numbers for :class:`Trainer`; the defaults are the supervised stages' protocol."""

    epochs: int
    batch_size: int  # global; lowered to the dataset size when larger (unless full_batches)
    lr: float  # base, before lr_scaling
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int | str = 0  # or "auto": from the thread budget (simclr_cli.threads)
    log_every: int = 10
    save_every: int = 1  # epochs; 0 with state_dir=None keeps no state
    keep_states: int = 2
    max_bad_fraction: float = 0.01
    max_steps: int = 0  # cap (0: none); a capped run keeps the warmup fraction
    optimizer: str = "sgd"  # sgd | lars | adamw
    nesterov: bool = True
    trust_coefficient: float = 1e-3  # LARS
    lr_scaling: str = "linear"  # linear: lr x B/256 | sqrt | none
    warmup_epochs: float = 0.0  # linear warmup, then cosine decay to 0
    full_batches: bool = False  # pretraining: every step a full global batch (the remainder dropped)
    checkpoint_every: int = 0  # also save state every this many steps
    on_nonfinite: str = "stop"  # or "skip"
    max_nonfinite_skips: int = 10
    check_world_size: bool = False  # resume refuses another process count unless forced

    @classmethod
    def from_section(cls, section: Any, *, data: Any, seed: int, **changes: Any) -> "FitSpec":
        """The spec of a recipe's training section (``[pretrain]``, or a
        :class:`~simclr_cli.recipe.schema.TrainingSection` such as ``[finetune]``): every key the section has
        under a field's name (epochs, batch_size, lr, ..., keep_states), the data loading of ``[data]``
        (``num_workers``, ``max_bad_fraction``), the recipe's ``seed``, then ``changes`` on top (e.g. epochs
        worked out by the stage). A field the section has no key for keeps the supervised default."""
        keys = {f.name for f in fields(section)}
        shared = {f.name: getattr(section, f.name) for f in fields(cls) if f.name in keys}
        return cls(**{**shared, "seed": seed, "num_workers": data.num_workers,
                      "max_bad_fraction": data.max_bad_fraction, **changes})


@dataclass(frozen=True)
class FitPlan:
    """What the trainer worked out, for the stage's banner and summary."""

    images: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    batch: int
    requested_batch: int
    peak_lr: float
    start_step: int
    elapsed: float  # seconds of the run before this invocation (resume)


def fit_batch(requested: int, n: int, world: int) -> int:
    """The global batch: ``requested``, lowered to the largest multiple of ``world`` that fits ``n``."""
    batch = min(requested, n // world * world)
    if batch < world:
        raise UsageError(f"{n} training images are too few for {world} processes")
    return batch


def schedule_steps(spec: FitSpec, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warmup steps): ``epochs`` x steps per epoch, or ``max_steps`` when it is smaller
    (or there are no epochs), with warmup the same fraction of a capped run as of the full one."""
    total = spec.epochs * steps_per_epoch
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    if spec.max_steps and (total == 0 or spec.max_steps < total):
        warmup = round(spec.max_steps * spec.warmup_epochs / max(spec.epochs, 1e-9)) if spec.warmup_epochs else 0
        total = spec.max_steps
    return total, warmup


class Trainer:
    """Everything around the loop for one stage's training; use as a context manager around :meth:`run`.

    Building it checks the data, makes the sampler, loader and optimizer, prepares them with
    Accelerate, restores the newest state on ``resume``, and opens the metrics log and the progress
    display. The stage may then print its banner (:attr:`plan`, :attr:`progress`), run hooks, and call
    :meth:`run`. Leaving the context closes the display and the stop request.

    Args:
        accelerator: the stage's Accelerator.
        task: the :class:`~simclr_cli.engine.tasks.Task` (``forward(batch) -> {"loss": ...}``), not yet prepared;
            its ``on_fit_start`` is called once the plan is known (after a resume's restore).
        dataset: indexed by ``(epoch, index)``.
        spec: the numbers.
        stage: its name, for messages.
        metrics_path: the ``metrics.jsonl`` to write (kept up to the saved step on resume).
        state_dir: where resume states go (None: the stage keeps none).
        resume, force: continue from ``state_dir``; ``force`` accepts another process count.
        track: gives each metrics record's numbers to the experiment trackers (``StageRun.track``).
        stop, on_save, resume_hint, interrupt_after: as for :func:`run_loop`.
        resume_step: the state to resume from, as the main process decided for every process (default: the
            newest complete state this process sees).
    """

    def __init__(self, accelerator, task: Task, dataset: Dataset, spec: FitSpec, *, stage: str,
                 metrics_path: Path, show_progress: bool, state_dir: Path | None, resume: bool = False,
                 force: bool = False, resume_hint: str = "", interrupt_after: int | None = None,
                 description: str = "", track: Callable[[dict, int], None] | None = None,
                 stop: StopRequest | None = None,
                 on_save: Callable[[], None] | None = None, resume_step: int | None = None) -> None:
        # Images decoded into memory: too many unreadable ones stop the stage before training.
        check_known_unreadable(getattr(dataset, "source", None), spec.max_bad_fraction)
        self.accelerator, self.spec, self.stage = accelerator, spec, stage
        batch = self._make_loader(dataset)
        spe = self.sampler.batches_per_epoch
        total, warmup = schedule_steps(spec, spe)
        if total <= 0:
            raise UsageError(f"{stage}.epochs and {stage}.max_steps give no training steps; set {stage}.epochs >= 1")
        peak = scaled_lr(spec.lr, batch, spec.lr_scaling)
        optimizer = build_optimizer(spec.optimizer, task, lr=peak, weight_decay=spec.weight_decay,
                                    momentum=spec.momentum, nesterov=spec.nesterov,
                                    trust_coefficient=spec.trust_coefficient)
        self.task, self.optimizer = accelerator.prepare(task, optimizer)
        start_step, elapsed0 = 0, 0.0
        fingerprint = data_fingerprint(getattr(dataset, "source", None)) if state_dir is not None else ""
        if resume and state_dir is not None:
            start_step, elapsed0 = self._resume(state_dir, len(dataset), fingerprint, force, resume_step)
        self.plan = FitPlan(images=len(dataset), steps_per_epoch=spe, total_steps=total, warmup_steps=warmup,
                            batch=batch, requested_batch=spec.batch_size, peak_lr=peak, start_step=start_step,
                            elapsed=elapsed0)
        # Resuming keeps the lines logged up to the saved step; a new run starts the file afresh.
        self.metrics = MetricsLog(metrics_path, enabled=accelerator.is_main_process,
                                  keep_until_step=start_step if resume else None, track=track)
        self.progress = ProgressDisplay(total, start_step, enabled=show_progress and accelerator.is_main_process,
                                        description=f"{stage} {description}".strip())
        self.state_dir, self.on_save = state_dir, on_save
        self.loop_spec = LoopSpec(
            total_steps=total, steps_per_epoch=spe, global_batch=batch, peak_lrs=[peak] * len(optimizer.param_groups),
            schedule=partial(warmup_cosine, total_steps=total, warmup_steps=warmup), seed=spec.seed,
            log_every=spec.log_every, save_every=spec.save_every if state_dir is not None else 0,
            checkpoint_every=spec.checkpoint_every, keep_states=spec.keep_states, dataset_size=len(dataset),
            data_fingerprint=fingerprint,
            max_bad_fraction=spec.max_bad_fraction, stage=stage, resume_hint=resume_hint,
            interrupt_after=interrupt_after, on_nonfinite=spec.on_nonfinite,
            max_nonfinite_skips=spec.max_nonfinite_skips,
        )
        self.stop = stop or StopRequest()
        self.model.on_fit_start(FitInfo(total_steps=total, steps_per_epoch=spe, world_size=accelerator.num_processes,
                                        start_step=start_step))

    def _make_loader(self, dataset: Dataset) -> int:
        """The deterministic sampler and the loader (:attr:`sampler`, :attr:`loader`); returns the global batch."""
        spec, accelerator = self.spec, self.accelerator
        world = accelerator.num_processes
        batch = spec.batch_size if spec.full_batches else fit_batch(spec.batch_size, len(dataset), world)
        # Supervised: every image every epoch, ceil(n/B) steps with the last batch filled from the epoch's start.
        self.sampler = GlobalBatchSampler(len(dataset), batch, spec.seed, accelerator.process_index, world,
                                          drop_last=spec.full_batches)
        self.loader = make_loader(dataset, batch_sampler=self.sampler, num_workers=spec.num_workers,
                                  pin_memory=accelerator.device.type == "cuda")
        return batch

    def _resume(self, state_dir: Path, images: int, fingerprint: str, force: bool,
                resume_step: int | None) -> tuple[int, float]:
        """Check that the saved state fits this launch (process count, the training images; ``force`` accepts
        either), restore it into the prepared task and optimizer; returns (its step, its elapsed seconds)."""
        spec, accelerator = self.spec, self.accelerator
        world = accelerator.num_processes
        saved = read_trainer(state_dir, resume_step) or {}
        saved_world = saved.get("world_size", world)
        if spec.check_world_size and saved_world != world and not force:
            raise UsageError(
                f"{state_dir} was saved by {saved_world} process(es), this launch has {world}. "
                "Data order and views do not depend on it, but check the launch; pass --force to resume anyway"
            )
        if saved.get("data_fingerprint") and saved["data_fingerprint"] != fingerprint and not force:
            then = saved.get("images", "?")
            what = (f"{then} images then, {images} now" if then != images else
                    f"the same {then} images count, other names or order")
            raise UsageError(
                f"the training images changed since {state_dir} was saved ({what}): an exact resume needs the "
                "same images, since sample i must be the same image. Restore them, start again with "
                "--overwrite, or pass --force to resume anyway (the samples then map to other images)")
        note = threads.resume_with(saved.get("threads"), threads.resolve_workers(
            spec.num_workers, gpu=accelerator.device.type == "cuda"))
        if note and accelerator.is_main_process:
            print(f"note: {note}", file=sys.stderr, flush=True)
        counters = load_state(state_dir, self.model, self.optimizer, resume_step)
        restore_scaler(accelerator, counters)
        return int(counters["step"]), float(counters.get("elapsed", 0.0))

    @property
    def model(self) -> Task:
        """The task, unwrapped from DDP."""
        return self.accelerator.unwrap_model(self.task)

    def banner(self) -> str:
        """The supervised stages' one-line description of the run."""
        p = self.plan
        return (f"{self.stage}: {p.images} images, {p.steps_per_epoch} steps/epoch, {p.total_steps} steps, batch {p.batch}"
                + (f" (lowered from {p.requested_batch})" if p.batch < p.requested_batch else "")
                + f", lr {p.peak_lr:.4g}" + (f", resuming at step {p.start_step}" if p.start_step else ""))

    def run(self, epoch_hook: EpochHook | None = None, hook_every: int = 0) -> LoopResult:
        """Train to the last step (from the restored one); ``epoch_hook`` every ``hook_every`` epochs."""
        return run_loop(self.accelerator, self.task, self.optimizer, self.sampler, self.loader, self.loop_spec,
                        state_dir=self.state_dir, metrics=self.metrics, progress=self.progress,
                        start_step=self.plan.start_step, epoch_hook=epoch_hook, hook_every=hook_every,
                        start_time_offset=self.plan.elapsed, stop=self.stop, on_save=self.on_save)

    def __enter__(self) -> "Trainer":
        self.stop.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.progress.close()
        finally:
            self.stop.__exit__(None, None, None)


def fit(accelerator, task: Task, dataset: Dataset, spec: FitSpec, *,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None, evaluate_every: int = 0,
        **kwargs) -> tuple[Task, LoopResult, int]:
    """Train ``task`` on ``dataset`` through a :class:`Trainer` (keyword arguments as there), printing the
    standard banner; returns (the unwrapped task, the loop result, the global batch). ``evaluate``: called on
    every process with the unwrapped task every ``evaluate_every`` epochs (not after the last one, which the
    stage evaluates itself); the metrics it returns are logged (e.g. ``test_top1``, for the curves)."""
    with Trainer(accelerator, task, dataset, spec, **kwargs) as trainer:
        trainer.progress.message(trainer.banner())
        hook = (lambda epoch, step: evaluate(trainer.model)) if evaluate is not None else None  # noqa: E731
        result = trainer.run(epoch_hook=hook, hook_every=evaluate_every if hook is not None else 0)
    return trainer.model, result, trainer.plan.batch
