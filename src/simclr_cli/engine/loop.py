"""The one training loop, on HF Accelerate, for every stage.

A stage hands it a prepared task (``forward(batch) -> {"loss": ...}``), an
optimizer, a deterministic sampler and loader, and a schedule; the loop does
the rest: lr per iteration, backward, logging, epoch hooks (kNN, ...),
resumable state, and a clean stop on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from simclr_cli import threads
from simclr_cli.checkpoints import read_trainer, save_state
from simclr_cli.engine.reporting import MetricsLog, ProgressDisplay
from simclr_cli.engine.signals import StopRequest
from simclr_cli.errors import DataError, Interrupted, SimclrError
from simclr_cli.utils import mix_seed


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

    ``stop``: a :class:`StopRequest` the caller already holds (so a signal that arrives
    while the stage is still setting up stops the loop before its first step).
    ``on_save``: called on every process after each saved state (the first one makes the run durable).
    """
    spe = spec.steps_per_epoch
    step = start_step
    epoch = step // spe
    device = accelerator.device
    world = accelerator.num_processes
    t0 = time.perf_counter() - start_time_offset
    train_seconds = 0.0
    window_start, window_steps = time.perf_counter(), 0
    # Unreadable samples: ``bad`` is what every process knows (restored on resume), ``new_bad`` what this
    # process saw since the last sync; each distinct index counts once, however it was met.
    # The saved counters of the state a resume starts from (read once): unreadable indices, training time.
    prior = (read_trainer(state_dir, start_step) or {}) if state_dir is not None and start_step else {}
    bad: set[int] = {int(i) for i in prior.get("bad_indices", [])}
    new_bad: set[int] = set()
    result = LoopResult(step=step, epoch=epoch, bad_images=len(bad))
    loss_sum = torch.zeros((), device=device)
    skipped = 0
    # Training time (kNN and other hooks excluded) of the steps before start_step, kept in the state so that
    # the throughput of a resumed run counts them ("elapsed", wall time, for states saved before it was kept).
    prior_seconds = float(prior.get("train_seconds", prior.get("elapsed", 0.0)))

    def save(at_step: int, durable: bool = True) -> None:
        """``durable=False``: the save a stop makes, which does not count as the run's first durable output
        (so a stopped ``--overwrite`` gives the previous run back rather than replacing it)."""
        if state_dir is None:  # stages that keep no resume state
            return
        sync_bad()  # every process saves here together, so the saved set is complete
        if accelerator.is_main_process:
            window = time.perf_counter() - window_start if window_steps else 0.0  # steps not yet in train_seconds
            save_state(state_dir, accelerator.unwrap_model(task), optimizer,
                       {"step": at_step, "epoch": at_step // spe, "elapsed": time.perf_counter() - t0,
                        "train_seconds": prior_seconds + train_seconds + window,
                        "world_size": world, "global_batch": spec.global_batch, **scaler_counters(accelerator),
                        "images": spec.dataset_size, "data_fingerprint": spec.data_fingerprint,
                        "bad_indices": sorted(bad), "threads": threads.current().base_threads},
                       keep=spec.keep_states)
        accelerator.wait_for_everyone()
        if on_save is not None and durable:
            on_save()

    def sync_bad(pending: float | None = None) -> None:
        """Merge every process's ``new_bad`` into ``bad`` (a collective when several processes run;
        ``pending``: the summed count of new ones, when already known to all, to skip an empty exchange)."""
        if world > 1 and (pending is None or pending > 0):
            from accelerate.utils import gather_object

            bad.update(int(i) for i in gather_object(sorted(new_bad)))
        else:
            bad.update(new_bad)
        new_bad.clear()

    inner = accelerator.unwrap_model(task)
    own_backward = hasattr(inner, "forward_backward")  # e.g. the gradient cache
    prepare = getattr(inner, "prepare_batch", None)
    with stop if stop is not None else StopRequest() as stop:
        # A signal that arrived while the stage was setting up: stop before the first step (all processes agree).
        early = torch.tensor([1.0 if stop.requested else 0.0], device=device)
        if (accelerator.reduce(early, reduction="sum") if world > 1 else early).item() > 0:
            raise Interrupted(_stopped_early(stop.signal_name or "interrupt", state_dir, spec.resume_hint))
        while step < spec.total_steps:
            sampler.set_epoch(epoch, step - epoch * spe)
            for batch in loader:
                torch.manual_seed(mix_seed(spec.seed, "step", step, accelerator.process_index))
                mult = spec.schedule(step)
                for group, peak in zip(optimizer.param_groups, spec.peak_lrs):
                    group["lr"] = peak * mult
                if prepare is not None:  # e.g. JPEG batches decoded on the device (data.decode='gpu')
                    batch = prepare(batch)
                new_bad.update(_bad_indices(batch, spec.dataset_size))
                batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                if own_backward:
                    # Tasks that run their own backward (gradient cache) sync gradients themselves.
                    with accelerator.no_sync(task):
                        out = inner.forward_backward(batch, accelerator)
                else:
                    with accelerator.autocast():
                        out = task(batch)
                    accelerator.backward(out["loss"])
                flags = torch.tensor([0.0 if _finite(out["loss"], optimizer, accelerator) else 1.0,
                                      1.0 if stop.requested else 0.0], device=device)
                if world > 1:  # every process takes the same decision
                    flags = accelerator.reduce(flags, reduction="sum")
                update = flags[0].item() == 0
                if not update:
                    where = _first_nonfinite(out["loss"], inner)
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    saved = _saved_step(state_dir) if state_dir is not None else None
                    last_good = f"{state_dir} (step {saved})" if saved is not None else "none yet"
                    if spec.on_nonfinite == "stop" or skipped > spec.max_nonfinite_skips:
                        why = "" if spec.on_nonfinite == "stop" else f" {skipped} steps in a row"
                        raise SimclrError(
                            f"non-finite loss or gradients at step {step + 1}{why} ({where}); the update was not applied. "
                            f"Last saved state: {last_good}. Lower the learning rate, or use mixed_precision='no'"
                            + ("" if spec.on_nonfinite == "skip" else ", or set on_nonfinite='skip'")
                        )
                    # The batch is consumed without an update, so data order and schedule stay aligned.
                    progress.message(f"warning: non-finite loss or gradients at step {step + 1} ({where}); update skipped")
                else:
                    skipped = 0
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if hasattr(inner, "after_step"):  # e.g. an EMA teacher or a queue of negatives
                        inner.after_step(step + 1)
                step += 1
                if update:  # skipped steps stay out of the logged mean loss, keeping it finite
                    window_steps += 1
                    loss_sum += out["loss"].detach().float()
                end_of_epoch = step % spe == 0
                if step % spec.log_every == 0 or step == spec.total_steps or end_of_epoch:
                    # Other scalars the task reports (z_std, accuracy, ...) are logged as their mean over processes.
                    extra = [k for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.dim() == 0]
                    stats = torch.stack([loss_sum / max(window_steps, 1), torch.tensor(float(len(new_bad)), device=device),
                                         *(out[k].detach().float() for k in extra)])
                    stats = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
                    elapsed = time.perf_counter() - window_start
                    train_seconds += elapsed
                    record = {
                        "step": step,
                        "epoch": round(step / spe, 4),
                        "loss": round(stats[0].item() / world, 6),
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_sec": round(window_steps * spec.global_batch / max(elapsed, 1e-9), 2),
                        **{k: round(v.item() / world, 6) for k, v in zip(extra, stats[2:])},
                        "time": round(time.perf_counter() - t0, 3),
                    }
                    metrics.write(record)
                    result.last = record
                    progress.update(
                        step,
                        f"loss {record['loss']:.4f} lr {record['lr']:.3g} {record['images_per_sec']:.0f} img/s",
                        f"{spec.stage} step {step}/{spec.total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                        f"lr {record['lr']:.4g} img/s {record['images_per_sec']:.1f}",
                    )
                    warning = inner.warning(record) if hasattr(inner, "warning") else None
                    if warning:  # the task's own health check (e.g. the objective's collapse warning)
                        progress.message(f"warning: {warning}")
                    sync_bad(stats[1].item())
                    n_bad = len(bad)
                    if spec.dataset_size and n_bad > spec.max_bad_fraction * spec.dataset_size:
                        raise DataError(
                            f"{n_bad} unreadable images, more than data.max_bad_fraction="
                            f"{spec.max_bad_fraction} of {spec.dataset_size}; fix or remove them (each was named above)"
                        )
                    result.bad_images = n_bad
                    loss_sum.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                if flags[1].item() > 0 or step == spec.interrupt_after:
                    save(step, durable=False)
                    why = stop.signal_name or "interrupt"
                    if state_dir is None:
                        raise Interrupted(f"stopped by {why} at step {step}; this stage keeps no state, run it again")
                    raise Interrupted(f"stopped by {why} at step {step}; state saved in {state_dir}. {spec.resume_hint}")
                if step >= spec.total_steps:
                    break
                if spec.checkpoint_every and step % spec.checkpoint_every == 0:
                    save(step)
            if step % spe == 0:  # a whole epoch finished
                epoch = step // spe
                if epoch_hook is not None and hook_every and epoch % hook_every == 0 and step < spec.total_steps:
                    _log_hook(epoch_hook, epoch, step, t0, metrics, progress, result)
                if spec.save_every and epoch % spec.save_every == 0 and step < spec.total_steps:
                    save(step)
                window_start = time.perf_counter()
            else:
                epoch = step // spe
        save(step)
    result.step, result.epoch = step, epoch
    # Over every step trained, before an interruption too: a resume at the last step trains none itself.
    result.train_seconds = prior_seconds + train_seconds
    trained = step - start_step if not prior_seconds else step
    result.images_per_sec = images_per_sec(trained * spec.global_batch, result.train_seconds)
    result.wall_before = start_time_offset
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
