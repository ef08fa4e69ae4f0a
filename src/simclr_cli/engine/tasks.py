"""Task modules: a :class:`Task` is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., ...}``.

The loop knows nothing else about a stage; a task holds the model and the loss (for pretraining, an
:class:`~simclr_cli.objectives.Objective` submodule, whose hooks the contrastive tasks call explicitly).
The hooks the trainer and the loop call on every task are declared on :class:`Task`, each a no-op by default.
:func:`contrastive_task` picks the pretraining task for a recipe.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from simclr_cli.errors import RecipeError
from simclr_cli.objectives import FitInfo, Objective
from simclr_cli.objectives.base import global_z_std  # noqa: F401 - re-exported for callers of the task module
from simclr_cli.objectives.simclr import SimCLR, SimCLROptions


class Task(nn.Module):
    """What the loop trains: ``forward(batch) -> {"loss": this process's loss, **scalars to log}``, and the
    hooks below, which the trainer and the loop call explicitly on every task (the defaults do nothing).

    In order: :meth:`on_fit_start` once per invocation, before the first step; every step
    :meth:`prepare_batch`, then ``forward`` (or :meth:`forward_backward` when :attr:`owns_backward`), then
    after an applied optimizer update :meth:`after_step`; :meth:`warning` on every logged metrics record.
    """

    owns_backward: ClassVar[bool] = False  # True: the loop calls forward_backward() instead of forward + backward

    def on_fit_start(self, info: FitInfo) -> None:
        """Called by the trainer once the run's plan is known (also on resume), before the first step."""

    def prepare_batch(self, batch: dict) -> dict:
        """Each batch as loaded, before the loop counts its unreadable images and moves it to the device."""
        return batch

    def forward_backward(self, batch: dict[str, torch.Tensor], accelerator) -> dict[str, torch.Tensor]:
        """With :attr:`owns_backward`: the loss and metrics of ``batch`` with the gradients already computed
        (and averaged over processes: the loop runs it without DDP's gradient sync)."""
        raise NotImplementedError(f"{type(self).__name__} sets owns_backward but has no forward_backward")

    def after_step(self, step: int) -> None:
        """Called after each applied optimizer update (not after a skipped one); ``step`` counts from 1."""

    def warning(self, record: dict[str, float]) -> str | None:
        """A one-line warning for a logged metrics ``record`` (the loop prints it), or None."""
        return None


class ContrastiveTask(Task):
    """Contrastive pretraining: the two views made, then the objective's ``forward`` (by default both views
    through f and g in one pass, BN seeing all 2n, and its loss; :mod:`simclr_cli.objectives`).

    ``forward`` returns ``loss`` and the objective's health metrics (``z_std``, ``z_std_ratio``, ...).
    ``objective`` may also be a loss name (``"nt_xent"``, ...), with ``temperature`` and ``margin``:
    the SimCLR objective with that loss. The objective is a submodule: its parameters and buffers are
    trained, moved and saved with the model. The stage calls ``objective.build(model)`` before.
    """

    def __init__(self, model: nn.Module, objective: Objective | str, temperature: float = 0.1, margin: float = 0.5,
                 batched=None) -> None:
        super().__init__()
        self.model = model
        if isinstance(objective, str):
            objective = SimCLR(SimCLROptions(loss=objective, temperature=temperature, margin=margin))
        self.objective = objective
        self.batched = batched  # a BatchedAugment for the batched backend, else None
        self.decoder = None  # a DeviceDecoder (data.decode='gpu'): encoded batches decoded on the device
        self.channels_last = False

    def prepare_batch(self, batch: dict) -> dict:
        """With a device decoder, the encoded JPEGs become uint8 views on the device (an image only the CPU
        decodes, or an unreadable one, is handled per image and counted in ``bad``)."""
        return self.decoder(batch) if self.decoder is not None else batch

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views: as loaded (torchvision backend), or made here from uint8 images (batched)."""
        if "params1" not in batch:
            return batch["view1"], batch["view2"]
        with torch.autocast(batch["params1"].device.type, enabled=False):
            if "image" in batch:  # same-size images: crop on the device
                return (self.batched(batch["image"], batch["params1"], cropped=False),
                        self.batched(batch["image"], batch["params2"], cropped=False))
            return (self.batched(batch["view1"], batch["params1"], cropped=True),
                    self.batched(batch["view2"], batch["params2"], cropped=True))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = self.views(batch)
        if self.channels_last:
            x1, x2 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x2))
        return objective_outputs(self.objective, self.objective(self.model, x1, x2, batch))

    def on_fit_start(self, info: FitInfo) -> None:
        self.objective.on_fit_start(info)

    def after_step(self, step: int) -> None:
        """The objective's update after each applied optimizer step (momentum encoders, queues)."""
        with torch.no_grad():
            self.objective.after_step(step)

    def warning(self, record: dict[str, float]) -> str | None:
        """The objective's warning (e.g. collapse)."""
        return self.objective.warning(record)


def objective_outputs(objective: Objective, out: Any) -> dict[str, torch.Tensor]:
    """An objective's ``forward`` result checked: a dict with ``loss``, every other value a scalar to log (a
    0-dim or one-element tensor, or a Python number), made a 0-dim tensor so that the loop logs it. Anything else
    is a mistake in the objective, told with its name and the key rather than dropped from the log."""
    where = f"objective '{objective.name}': forward()"
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError(f"{where} must return a dict with 'loss' (and scalars to log), got {type(out).__name__}"
                        + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))
    checked = {}
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value), device=out["loss"].device)
        elif not torch.is_tensor(value) or value.numel() != 1:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise TypeError(f"{where} returned {key!r} = {shape}: the loss and each logged value must be a 0-dim or "
                            "one-element tensor or a number (log a statistic of it, e.g. its mean)")
        checked[key] = value.reshape(())
    return checked


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


class GradCacheContrastiveTask(ContrastiveTask):
    """The same objective with the gradient-cache trick (SIMCLR.md section 5): the full-batch
    contrastive loss with the activation memory of one micro-batch.

    1. Embed the batch in chunks without grad (recording the RNG state of each).
    2. Take the loss over all embeddings, and its gradient with respect to them.
    3. Re-run each chunk with grad (same RNG state) and backpropagate its slice of the
       cached gradient.

    The images are split into blocks of ``micro_batch_size``; chunk k holds view 1 of block k
    and view 2 of block k+1 (cyclically), so no chunk ever holds both views of an image.

    What it equals:

    * without BatchNorm, the full-batch gradient exactly (tested in float64);
    * with BatchNorm, training whose BN statistics are computed per chunk of
      2 x ``micro_batch_size`` views (global over processes with ``sync_bn``) that never
      contains a positive pair, like per-device BN with the views shuffled across devices.
      It is not the full batch's BN: each chunk normalizes with its own statistics.

    BN running statistics move once per step, by the mean of the chunks' statistics with the
    layer's momentum, and ``num_batches_tracked`` counts steps, as in a plain step.
    """

    owns_backward: ClassVar[bool] = True

    def __init__(self, model: nn.Module, objective: Objective | str, temperature: float = 0.1, margin: float = 0.5,
                 micro_batch_size: int = 0, batched=None) -> None:
        super().__init__(model, objective, temperature, margin, batched)
        if not self.objective.supports_grad_cache:
            raise ValueError(f"the objective '{self.objective.name}' does not support the gradient cache")
        self.micro_batch_size = micro_batch_size

    @staticmethod
    def chunks(n: int, m: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per chunk: the (start, end) image range of its view 1 and of its view 2."""
        blocks = [(a, min(a + m, n)) for a in range(0, n, m)]
        return [(blocks[k], blocks[(k + 1) % len(blocks)]) for k in range(len(blocks))]

    def forward_backward(self, batch: dict[str, torch.Tensor], accelerator) -> dict[str, torch.Tensor]:
        """Loss and gradients for ``batch``; gradients are averaged over processes here, not by DDP."""
        with torch.no_grad():
            x1, x2 = self.views(batch)
            if self.channels_last:
                x1, x2 = (v.contiguous(memory_format=torch.channels_last) for v in (x1, x2))
        n = x1.shape[0]
        chunks = self.chunks(n, self.micro_batch_size)
        device = x1.device
        bns = _batchnorms(self.model)
        saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
                 for bn in bns]
        states = []
        z1 = [None] * len(chunks)
        z2 = [None] * len(chunks)
        with torch.no_grad():
            for k, ((a1, b1), (a2, b2)) in enumerate(chunks):
                states.append(_rng_state(device))
                with accelerator.autocast():
                    _, z = self.model(torch.cat([x1[a1:b1], x2[a2:b2]]))
                z = z.to(torch.promote_types(z.dtype, torch.float32))
                z1[k], z2[(k + 1) % len(chunks)] = z[: b1 - a1], z[b1 - a1:]
            for bn, (mean, var, count, _) in zip(bns, saved):  # the second pass updates them
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        z1 = torch.cat(z1).requires_grad_()
        z2 = torch.cat(z2).requires_grad_()
        loss = self.objective.loss(z1, z2, batch.get("label"))
        # fp16: the loss goes through the GradScaler like any loss (scaler.scale() also starts its scale, which
        # the optimizer step's unscale needs), so the cached gradients of z are already scaled
        scaler = getattr(accelerator, "scaler", None)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        try:
            for k, (((a1, b1), (a2, b2)), state) in enumerate(zip(chunks, states)):
                for bn in bns:  # running stats become the plain mean of the chunks' statistics
                    bn.momentum = 1.0 / (k + 1)
                _set_rng_state(state, device)
                with accelerator.autocast():
                    _, z = self.model(torch.cat([x1[a1:b1], x2[a2:b2]]))
                z = z.to(torch.promote_types(z.dtype, torch.float32))
                torch.autograd.backward([z[: b1 - a1], z[b1 - a1:]], [z1.grad[a1:b1], z2.grad[a2:b2]])
        finally:
            with torch.no_grad():
                for bn, (mean, var, count, momentum) in zip(bns, saved):
                    bn.momentum = momentum
                    m = momentum if momentum is not None else 1.0 / (count.item() + 1)
                    bn.running_mean.mul_(m).add_(mean, alpha=1 - m)
                    bn.running_var.mul_(m).add_(var, alpha=1 - m)
                    bn.num_batches_tracked.copy_(count + 1)
        world = accelerator.num_processes
        if world > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        return {"loss": loss.detach(), **self.objective.metrics(torch.cat([z1, z2]))}


def grad_cache_chunk(objective: Objective, micro_batch_size: int, batch_size: int, world: int) -> int:
    """The gradient cache's chunk for ``pretrain.micro_batch_size``: the size when it is below each process's share
    of the global ``batch_size`` (the cache then applies), else 0 (off). A RecipeError when it applies and the
    objective does not support it."""
    if not 0 < micro_batch_size < batch_size // world:
        return 0
    if not objective.supports_grad_cache:
        raise RecipeError(f"pretrain.micro_batch_size={micro_batch_size}: {objective.grad_cache_refusal()}; set "
                          f"pretrain.micro_batch_size=0 (or at least the batch per process, {batch_size // world})")
    return micro_batch_size


def contrastive_task(model: nn.Module, objective: Objective, micro_batch_size: int = 0,
                     batched=None) -> ContrastiveTask:
    """The pretraining task: with the gradient cache in chunks of ``micro_batch_size`` images when it is > 0
    (:func:`grad_cache_chunk`), else the plain one. ``batched``: the batched backend's augmentation, or None."""
    if micro_batch_size:
        return GradCacheContrastiveTask(model, objective, micro_batch_size=micro_batch_size, batched=batched)
    return ContrastiveTask(model, objective, batched=batched)


class ClassificationTask(Task):
    """Cross-entropy on ``batch["image"]`` / ``batch["label"]`` for a :class:`~simclr_cli.models.classifier.Classifier`.

    With ``frozen=True`` (the linear probe) only the last linear layer learns: everything
    below it runs without gradient and stays in eval mode (BN uses its running
    statistics and never updates them), whatever ``train()`` is called with.
    """

    def __init__(self, model: nn.Module, frozen: bool = False) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen
        if frozen:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.linear.parameters():
                p.requires_grad_(True)
            self.train(True)

    def train(self, mode: bool = True) -> "ClassificationTask":
        super().train(mode)
        if self.frozen:
            self.model.backbone.eval()
            for layer in list(self.model.head)[:-1]:
                layer.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        if self.frozen:
            with torch.no_grad():
                feats = self.model.features(x)
            logits = self.model.linear(feats)
        else:
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            acc = (logits.argmax(1) == y).float().mean() * 100
        return {"loss": loss, "train_top1": acc}


class DistillTask(Task):
    """Student training on teacher targets ([v2] eq. 2-3).

    * soft (default): the distillation loss against ``batch["target"]`` (cached teacher logits),
      or against the teacher run on ``batch["clean"]`` in eval mode when no cache is given;
    * hard: cross-entropy against ``batch["target"]`` pseudo-labels;
    * ``alpha < 1`` adds ``(1 - alpha)`` x cross-entropy on the labeled pair ``limage``/``label``.

    ``dropout`` (Noisy Student) applies to the student's features before its linear layer.
    """

    def __init__(self, student: nn.Module, *, temperature: float = 1.0, alpha: float = 1.0, hard: bool = False,
                 dropout: float = 0.0, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.alpha = alpha
        self.hard = hard
        self.dropout = dropout
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, never trained or saved
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.student.features(x)
        if self.dropout > 0:
            feats = F.dropout(feats, self.dropout, self.training)
        return self.student.linear(feats)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from simclr_cli.losses.distill import distillation_loss

        logits = self._logits(batch["image"])
        if "target" in batch:
            target = batch["target"]
        else:
            with torch.no_grad():
                target = self.teacher[0].to(batch["clean"].device)(batch["clean"])
        if self.hard:
            loss = F.cross_entropy(logits.float(), target)
            agree = (logits.argmax(1) == target).float().mean() * 100
        else:
            loss = distillation_loss(logits, target, self.temperature)
            agree = (logits.argmax(1) == target.argmax(1)).float().mean() * 100
        out = {"teacher_agreement": agree}
        if self.alpha < 1.0:
            ce = F.cross_entropy(self._logits(batch["limage"]).float(), batch["label"])
            out["labeled_ce"] = ce.detach()
            loss = self.alpha * loss + (1 - self.alpha) * ce
        out["loss"] = loss
        return out
