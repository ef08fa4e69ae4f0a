"""The one training loop, on HF Accelerate, for every stage.

A stage hands it a prepared task (a :class:`~simclr_cli.engine.tasks.Task`: ``forward(batch) -> {"loss": ...}``
and hooks the loop calls by name), an
optimizer, a deterministic sampler and loader, and a schedule; the loop does
the rest: lr per iteration, backward, logging, epoch hooks (kNN, ...),
resumable state, and a clean stop on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from accelerate import Accelerator

from simclr_cli import threads
from simclr_cli.checkpoints import read_trainer, save_state
from simclr_cli.engine.reporting import MetricsLog, ProgressDisplay
from simclr_cli.engine.signals import StopRequest
from simclr_cli.errors import DataError, Interrupted, SimclrError
from simclr_cli.utils import mix_seed

if TYPE_CHECKING:
    from simclr_cli.engine.tasks import Task


@dataclass
class LoopSpec:
    """Plain numbers for one run of the loop."""

    total_steps: int
    steps_per_epoch: int
    global_batch: int
    peak_lrs: list[float]  # one per optimizer param group
    schedule: Callable[[int], float]  # step -> lr multiplier
    seed: int
    log_every: int = 10
    save_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps; 0: only every save_every epochs
    keep_states: int = 2
    dataset_size: int = 0
    data_fingerprint: str = ""  # of the training images' names, saved in the state (resume checks it)
    max_bad_fraction: float = 0.01
    stage: str = "train"
    resume_hint: str = ""
    interrupt_after: int | None = None  # tests: behave as if SIGTERM arrived after this step
    on_nonfinite: str = "stop"  # or "skip"
    max_nonfinite_skips: int = 10  # consecutive


@dataclass
class LoopResult:
    step: int
    epoch: int
    last: dict[str, float] = field(default_factory=dict)
    # The three numbers every summary.json reports, one definition for all stages (a resumed run included):
    # train_seconds, the time spent in training steps over every invocation of the run (hooks such as the kNN
    # monitor, setup and evaluation excluded); images_per_sec, the images of every step trained / train_seconds;
    # wall_before, the loop's wall time in the invocations before this one (a stage adds its own wall time).
    train_seconds: float = 0.0
    images_per_sec: float = 0.0
    bad_images: int = 0
    wall_before: float = 0.0


EpochHook = Callable[[int, int], dict[str, float]]  # (epoch finished, step) -> metrics to log


def run_loop(
    accelerator: Accelerator,
    task: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Any,
    loader: torch.utils.data.DataLoader,
    spec: LoopSpec,
    *,
    state_dir: Path | None,
    metrics: MetricsLog,
    progress: ProgressDisplay,
    start_step: int = 0,
    epoch_hook: EpochHook | None = None,
    hook_every: int = 0,
    start_time_offset: float = 0.0,
    stop: StopRequest | None = None,
    on_save: Callable[[], None] | None = None,
) -> LoopResult:
    """Train from ``start_step`` to ``spec.total_steps``; see the module docstring.

    ``task``: a :class:`~simclr_cli.engine.tasks.Task` (possibly wrapped by Accelerate), whose hooks the loop
    calls explicitly.
    ``stop``: a :class:`StopRequest` the caller already holds (so a signal that arrives
    while the stage is still setting up stops the loop before its first step).
    ``on_save``: called on every process after each saved state (the first one makes the run durable).
    """
    loop = _Loop(accelerator, task, optimizer, spec, state_dir=state_dir, metrics=metrics, progress=progress,
                 start_step=start_step, start_time_offset=start_time_offset, on_save=on_save)
    with stop if stop is not None else StopRequest() as stop:
        loop.stop_if_requested_early(stop)
        while loop.step < spec.total_steps:
            sampler.set_epoch(loop.epoch, loop.step - loop.epoch * spec.steps_per_epoch)
            for batch in loader:
                if loop.train_step(batch, stop):
                    break
            loop.end_epoch(epoch_hook, hook_every)
        loop.save(loop.step)
    return loop.finish()


class _Loop:
    """One call of :func:`run_loop`: the counters kept between steps (step, epoch, the timing window, the
    unreadable images, non-finite skips) and one method per part of a step."""

    def __init__(self, accelerator: Accelerator, task: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 spec: LoopSpec, *, state_dir: Path | None, metrics: MetricsLog, progress: ProgressDisplay,
                 start_step: int, start_time_offset: float, on_save: Callable[[], None] | None) -> None:
        self.accelerator, self.task, self.optimizer, self.spec = accelerator, task, optimizer, spec
        self.inner: Task = accelerator.unwrap_model(task)
        self.state_dir, self.metrics, self.progress, self.on_save = state_dir, metrics, progress, on_save
        self.device, self.world = accelerator.device, accelerator.num_processes
        self.start_step, self.start_time_offset = start_step, start_time_offset
        self.step = start_step
        self.epoch = start_step // spec.steps_per_epoch
        self.t0 = time.perf_counter() - start_time_offset
        self.train_seconds = 0.0
        self.window_start, self.window_steps = time.perf_counter(), 0
        # Unreadable samples: ``bad`` is what every process knows (restored on resume), ``new_bad`` what this
        # process saw since the last sync; each distinct index counts once, however it was met.
        # The saved counters of the state a resume starts from (read once): unreadable indices, training time.
        prior = (read_trainer(state_dir, start_step) or {}) if state_dir is not None and start_step else {}
        self.bad: set[int] = {int(i) for i in prior.get("bad_indices", [])}
        self.new_bad: set[int] = set()
        self.result = LoopResult(step=self.step, epoch=self.epoch, bad_images=len(self.bad))
        self.loss_sum = torch.zeros((), device=self.device)
        self.skipped = 0
        # Training time (kNN and other hooks excluded) of the steps before start_step, kept in the state so that
        # the throughput of a resumed run counts them ("elapsed", wall time, for states saved before it was kept).
        self.prior_seconds = float(prior.get("train_seconds", prior.get("elapsed", 0.0)))

    # -- one step ----------------------------------------------------------------------------------------------

    def train_step(self, batch: dict, stop: StopRequest) -> bool:
        """Train on one loaded batch: update (or skip a non-finite step), log, save, stop when asked.
        Returns True when the run's last step is done (the caller leaves the epoch)."""
        spec = self.spec
        out, flags = self.forward_backward(batch, stop)
        update = flags[0].item() == 0
        if update:
            self.apply_update()
        else:
            self.skip_nonfinite(out)
        self.step += 1
        if update:  # skipped steps stay out of the logged mean loss, keeping it finite
            self.window_steps += 1
            self.loss_sum += out["loss"].detach().float()
        end_of_epoch = self.step % spec.steps_per_epoch == 0
        if self.step % spec.log_every == 0 or self.step == spec.total_steps or end_of_epoch:
            self.log_window(out)
        if flags[1].item() > 0 or self.step == spec.interrupt_after:
            self.stop_now(stop)
        if self.step >= spec.total_steps:
            return True
        if spec.checkpoint_every and self.step % spec.checkpoint_every == 0:
            self.save(self.step)
        return False

    def forward_backward(self, batch: dict, stop: StopRequest) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The step's seed and learning rate, the task's loss and gradients on ``batch``, and the flags every
        process agrees on: (non-finite loss or gradients, stop requested)."""
        spec, accelerator, inner = self.spec, self.accelerator, self.inner
        torch.manual_seed(mix_seed(spec.seed, "step", self.step, accelerator.process_index))
        mult = spec.schedule(self.step)
        for group, peak in zip(self.optimizer.param_groups, spec.peak_lrs):
            group["lr"] = peak * mult
        batch = inner.prepare_batch(batch)  # e.g. JPEG batches decoded on the device (data.decode='gpu')
        self.new_bad.update(_bad_indices(batch, spec.dataset_size))
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if inner.owns_backward:
            # Tasks that run their own backward (gradient cache) sync gradients themselves.
            with accelerator.no_sync(self.task):
                out = inner.forward_backward(batch, accelerator)
        else:
            with accelerator.autocast():
                out = self.task(batch)
            accelerator.backward(out["loss"])
        flags = torch.tensor([0.0 if _finite(out["loss"], self.optimizer, accelerator) else 1.0,
                              1.0 if stop.requested else 0.0], device=self.device)
        if self.world > 1:  # every process takes the same decision
            flags = accelerator.reduce(flags, reduction="sum")
        return out, flags

    def apply_update(self) -> None:
        self.skipped = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner.after_step(self.step + 1)  # e.g. an EMA teacher or a queue of negatives

    def skip_nonfinite(self, out: dict[str, torch.Tensor]) -> None:
        """A non-finite loss or gradient: drop the update, then stop with an error (``on_nonfinite='stop'``, or
        too many skips in a row) or go on with a warning. The batch is consumed without an update, so data order
        and schedule stay aligned."""
        spec = self.spec
        where = _first_nonfinite(out["loss"], self.inner)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        saved = _saved_step(self.state_dir) if self.state_dir is not None else None
        last_good = f"{self.state_dir} (step {saved})" if saved is not None else "none yet"
        if spec.on_nonfinite == "stop" or self.skipped > spec.max_nonfinite_skips:
            why = "" if spec.on_nonfinite == "stop" else f" {self.skipped} steps in a row"
            raise SimclrError(
                f"non-finite loss or gradients at step {self.step + 1}{why} ({where}); the update was not applied. "
                f"Last saved state: {last_good}. Lower the learning rate, or use mixed_precision='no'"
                + ("" if spec.on_nonfinite == "skip" else ", or set on_nonfinite='skip'")
            )
        self.progress.message(f"warning: non-finite loss or gradients at step {self.step + 1} ({where}); update skipped")

    # -- logging, saving, stopping -----------------------------------------------------------------------------

    def log_window(self, out: dict[str, torch.Tensor]) -> None:
        """One metrics record for the steps since the last: their mean loss, the task's other scalars (this
        step's, as their mean over processes), lr, throughput; the task's warning; the unreadable images."""
        spec, step, world = self.spec, self.step, self.world
        extra = [k for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.dim() == 0]
        stats = torch.stack([self.loss_sum / max(self.window_steps, 1),
                             torch.tensor(float(len(self.new_bad)), device=self.device),
                             *(out[k].detach().float() for k in extra)])
        stats = self.accelerator.reduce(stats, reduction="sum") if world > 1 else stats
        elapsed = time.perf_counter() - self.window_start
        self.train_seconds += elapsed
        record = {
            "step": step,
            "epoch": round(step / spec.steps_per_epoch, 4),
            "loss": round(stats[0].item() / world, 6),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_sec": round(self.window_steps * spec.global_batch / max(elapsed, 1e-9), 2),
            **{k: round(v.item() / world, 6) for k, v in zip(extra, stats[2:])},
            "time": round(time.perf_counter() - self.t0, 3),
        }
        self.metrics.write(record)
        self.result.last = record
        self.progress.update(
            step,
            f"loss {record['loss']:.4f} lr {record['lr']:.3g} {record['images_per_sec']:.0f} img/s",
            f"{spec.stage} step {step}/{spec.total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
            f"lr {record['lr']:.4g} img/s {record['images_per_sec']:.1f}",
        )
        warning = self.inner.warning(record)
        if warning:  # the task's own health check (e.g. the objective's collapse warning)
            self.progress.message(f"warning: {warning}")
        self.sync_bad(stats[1].item())
        n_bad = len(self.bad)
        if spec.dataset_size and n_bad > spec.max_bad_fraction * spec.dataset_size:
            raise DataError(
                f"{n_bad} unreadable images, more than data.max_bad_fraction="
                f"{spec.max_bad_fraction} of {spec.dataset_size}; fix or remove them (each was named above)"
            )
        self.result.bad_images = n_bad
        self.loss_sum.zero_()
        self.window_start, self.window_steps = time.perf_counter(), 0

    def end_epoch(self, epoch_hook: EpochHook | None, hook_every: int) -> None:
        """After the loader's pass: at a whole epoch, the epoch hook (kNN, ...) and the epoch's saved state."""
        spec, step = self.spec, self.step
        self.epoch = step // spec.steps_per_epoch
        if step % spec.steps_per_epoch == 0:  # a whole epoch finished
            if epoch_hook is not None and hook_every and self.epoch % hook_every == 0 and step < spec.total_steps:
                _log_hook(epoch_hook, self.epoch, step, self.t0, self.metrics, self.progress, self.result)
            if spec.save_every and self.epoch % spec.save_every == 0 and step < spec.total_steps:
                self.save(step)
            self.window_start = time.perf_counter()

    def save(self, at_step: int, durable: bool = True) -> None:
        """The resume state at ``at_step``, with the trainer counters. ``durable=False``: the save a stop makes,
        which does not count as the run's first durable output (so a stopped ``--overwrite`` gives the previous
        run back rather than replacing it)."""
        if self.state_dir is None:  # stages that keep no resume state
            return
        self.sync_bad()  # every process saves here together, so the saved set is complete
        accelerator, spec = self.accelerator, self.spec
        if accelerator.is_main_process:
            # steps not yet in train_seconds
            window = time.perf_counter() - self.window_start if self.window_steps else 0.0
            save_state(self.state_dir, accelerator.unwrap_model(self.task), self.optimizer,
                       {"step": at_step, "epoch": at_step // spec.steps_per_epoch,
                        "elapsed": time.perf_counter() - self.t0,
                        "train_seconds": self.prior_seconds + self.train_seconds + window,
                        "world_size": self.world, "global_batch": spec.global_batch, **scaler_counters(accelerator),
                        "images": spec.dataset_size, "data_fingerprint": spec.data_fingerprint,
                        "bad_indices": sorted(self.bad), "threads": threads.current().base_threads},
                       keep=spec.keep_states)
        accelerator.wait_for_everyone()
        if self.on_save is not None and durable:
            self.on_save()

    def sync_bad(self, pending: float | None = None) -> None:
        """Merge every process's ``new_bad`` into ``bad`` (a collective when several processes run;
        ``pending``: the summed count of new ones, when already known to all, to skip an empty exchange)."""
        if self.world > 1 and (pending is None or pending > 0):
            from accelerate.utils import gather_object

            self.bad.update(int(i) for i in gather_object(sorted(self.new_bad)))
        else:
            self.bad.update(self.new_bad)
        self.new_bad.clear()

    def stop_if_requested_early(self, stop: StopRequest) -> None:
        """A signal that arrived while the stage was setting up: stop before the first step (all processes
        agree)."""
        early = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        if (self.accelerator.reduce(early, reduction="sum") if self.world > 1 else early).item() > 0:
            raise Interrupted(_stopped_early(stop.signal_name or "interrupt", self.state_dir, self.spec.resume_hint))

    def stop_now(self, stop: StopRequest) -> None:
        """Stop at this step boundary: save the state (not durable, see :meth:`save`), raise :class:`Interrupted`."""
        self.save(self.step, durable=False)
        why = stop.signal_name or "interrupt"
        if self.state_dir is None:
            raise Interrupted(f"stopped by {why} at step {self.step}; this stage keeps no state, run it again")
        raise Interrupted(f"stopped by {why} at step {self.step}; state saved in {self.state_dir}. "
                          f"{self.spec.resume_hint}")

    def finish(self) -> LoopResult:
        result = self.result
        result.step, result.epoch = self.step, self.epoch
        # Over every step trained, before an interruption too: a resume at the last step trains none itself.
        result.train_seconds = self.prior_seconds + self.train_seconds
        trained = self.step - self.start_step if not self.prior_seconds else self.step
        result.images_per_sec = images_per_sec(trained * self.spec.global_batch, result.train_seconds)
        result.wall_before = self.start_time_offset
        return result


def images_per_sec(images: int, train_seconds: float) -> float:
    """The throughput every summary reports: images trained / seconds spent training them."""
    return images / train_seconds if train_seconds > 0 else 0.0


def _stopped_early(why: str, state_dir: Path | None, resume_hint: str) -> str:
    """The message for a stop requested before the first step: nothing new was saved."""
    if state_dir is None:
        return f"stopped by {why} before the first step; this stage keeps no state, run it again"
    saved = _saved_step(state_dir)
    if saved is not None:
        return f"stopped by {why} before the first step; the state in {state_dir} (step {saved}) is unchanged. {resume_hint}"
    return f"stopped by {why} before the first step; no state was saved, run the command again"


def _log_hook(hook: EpochHook, epoch: int, step: int, t0: float, metrics: MetricsLog,
              progress: ProgressDisplay, result: LoopResult) -> dict[str, float]:
    values = hook(epoch, step)
    if values:
        record = {"step": step, "epoch": epoch, **values, "time": round(time.perf_counter() - t0, 3)}
        metrics.write(record)
        progress.message("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        result.last.update(values)
    return values


def _bad_indices(batch: dict, n: int) -> list[int]:
    """Every unreadable index a batch met: ``bad`` is the first of ``bad_run`` consecutive ones (mod ``n``)."""
    firsts = batch.get("bad", ())
    runs = batch.get("bad_run")
    out = []
    for k, first in enumerate(firsts):
        first = int(first)
        if first >= 0:
            run = max(int(runs[k]), 1) if runs is not None else 1
            out += [(first + j) % n if n else first + j for j in range(run)]
    return out


def _finite(loss: torch.Tensor, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> bool:
    """Loss and gradients are finite. With fp16 loss scaling, the scaler already skips inf gradients."""
    if not torch.isfinite(loss.detach()).all():
        return False
    if getattr(accelerator, "scaler", None) is not None:
        return True
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))


def scaler_counters(accelerator: Accelerator) -> dict[str, Any]:
    """fp16 loss scaling: the GradScaler's state, for the trainer counters of a saved state (empty without one)."""
    scaler = getattr(accelerator, "scaler", None)
    return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}


def restore_scaler(accelerator: Accelerator, counters: dict[str, Any]) -> None:
    """Give a resumed fp16 run the loss scale it had, instead of restarting from 65536 (and skipping steps)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and counters.get("grad_scaler"):
        scaler.load_state_dict(counters["grad_scaler"])


def _first_nonfinite(loss: torch.Tensor, task: torch.nn.Module) -> str:
    """Where a non-finite step first shows: the loss, or the first parameter (in forward order) whose
    gradient is not finite; on this process ("another process" when only a peer saw it)."""
    if not torch.isfinite(loss.detach()).all():
        return f"the loss is {loss.detach().float().item()}"
    for name, p in task.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"first non-finite gradient: {name}"
    return "on another process"


def _saved_step(state_dir: Path) -> int | None:
    trainer = read_trainer(state_dir)
    return int(trainer["step"]) if trainer else None
