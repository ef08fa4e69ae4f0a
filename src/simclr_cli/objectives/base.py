"""The objective interface and its registry."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import torch.nn.functional as F

from simclr_cli.dist import world_size
from simclr_cli.errors import RecipeError
from simclr_cli.models.heads import projection_head
from simclr_cli.recipe.schema import OBJECTIVE_SECTIONS, ModelConfig, PretrainConfig

OBJECTIVES: dict[str, type["Objective"]] = {}


@torch.no_grad()
def global_z_std(z: torch.Tensor) -> torch.Tensor:
    """Std of L2-normalized z over the global batch (all processes), averaged over dimensions.

    Computed from all-reduced sums, so every process returns the same value: the global
    batch's, not a mean of per-process stds. About 1/sqrt(d) when healthy, 0 on collapse.
    """
    zn = F.normalize(z.detach().float(), dim=1)
    d = zn.shape[1]
    stats = torch.cat([zn.sum(0), (zn * zn).sum(0), zn.new_tensor([zn.shape[0]])])
    if world_size() > 1:
        torch.distributed.all_reduce(stats)
    s, s2, n = stats[:d], stats[d:2 * d], stats[-1]
    var = (s2 - s * s / n) / (n - 1).clamp_min(1)
    return var.clamp_min(0).sqrt().mean()


def register(cls: type["Objective"]) -> type["Objective"]:
    """Class decorator: make ``cls`` selectable as ``pretrain.objective = cls.name``, its ``Options`` dataclass
    (if any) read from ``[pretrain.<name>]`` by the recipe loader."""
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is empty or taken")
    OBJECTIVES[cls.name] = cls
    if cls.Options is not None:
        OBJECTIVE_SECTIONS[cls.name] = cls.Options
    return cls


def unregister(name: str) -> None:
    """Remove an objective and its recipe section (tests that register a throwaway one)."""
    OBJECTIVES.pop(name, None)
    OBJECTIVE_SECTIONS.pop(name, None)


def build_objective(cfg: PretrainConfig) -> "Objective":
    """The objective ``pretrain.objective`` names, built from its options (``[pretrain.<name>]``) and ``[pretrain]``.

    It is not usable until :meth:`Objective.build` has seen the model."""
    cls = OBJECTIVES.get(cfg.objective)
    if cls is None:
        close = difflib.get_close_matches(cfg.objective, OBJECTIVES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"pretrain.objective: '{cfg.objective}' is not an objective{hint}; "
                          f"choose one of {', '.join(sorted(OBJECTIVES))}")
    options = cfg.options if cfg.options is not None else (cls.Options() if cls.Options is not None else None)
    return cls(options, cfg)


@dataclass(frozen=True)
class FitInfo:
    """What an objective learns at :meth:`Objective.on_fit_start`: the run's schedule and process count."""

    total_steps: int
    steps_per_epoch: int
    world_size: int
    start_step: int = 0  # > 0 when resuming


class Objective(nn.Module):
    """A pretraining objective: an ``nn.Module`` owned by the task, so its parameters and buffers go to the
    optimizer (those that require grad), the device, ``channels_last`` and the resume state like the model's.

    Subclasses set ``name`` (and ``needs_labels`` when the loss uses class labels, ``Options`` to a frozen
    dataclass of their ``[pretrain.<name>]`` keys, ``supports_grad_cache`` when :meth:`loss` on projections is
    the whole objective) and implement :meth:`loss`, or :meth:`forward` when they run a network of their own.
    The task calls, in order: :meth:`head` (to build the model), :meth:`build` (once, with the model),
    :meth:`on_fit_start` (once per invocation, before the first step), then every step :meth:`forward` and,
    after each optimizer update, :meth:`after_step`; :meth:`warning` on each logged record.
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    Options: ClassVar[type | None] = None  # the dataclass of [pretrain.<name>], declared next to the objective
    supports_grad_cache: bool = False  # the gradient cache calls loss() on cached projections instead of forward()

    def __init__(self, options=None, pretrain: PretrainConfig | None = None) -> None:
        super().__init__()
        self.options = options
        self.collapse_warn = pretrain.collapse_warn if pretrain is not None else 0.1
        self._warned: set[str] = set()

    def head(self, in_dim: int, model: ModelConfig) -> nn.Module:
        """The projection head g on h (``in_dim`` wide): the recipe's ``model.proj_*`` head by default."""
        return projection_head(in_dim, model.proj_layers, model.proj_hidden_dim, model.proj_dim)

    def build(self, model: nn.Module) -> None:
        """Called once with the built model (a ``SimCLRModel``: ``backbone`` f, ``head`` g), before the optimizer
        and resume: create parameters and buffers here (a momentum copy of the encoder, a predictor sized to
        the head with :meth:`projection_dim`, a queue). BatchNorm layers created here are converted to global BN
        with the model's when several processes run with ``pretrain.sync_bn``. Do not keep ``model`` as an
        attribute: it would become a submodule (a second copy of its weights in the state, refused after
        ``build``); keep it in a list (``self._online = [model]``) or take it from :meth:`forward`."""

    def on_fit_start(self, info: FitInfo) -> None:
        """Called once per invocation before the first step (also on resume), after a resume's state has been
        restored (so do not initialise parameters or buffers here: that belongs in :meth:`build`): total
        steps, steps per epoch, process count and the step a resume starts from, e.g. for a momentum schedule."""

    def forward(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step's loss and metrics: ``{"loss": this process's share, **scalars to log}``; a scalar is a
        0-dim or one-element tensor or a Python number (anything else is an error naming the key).

        The default runs both views through ``model`` in one pass (BN sees all 2n) and applies :meth:`loss`.
        ``x1, x2``: the two views of this process's n images; ``batch``: the loaded batch (``label``, ...).
        """
        _, z = model(torch.cat([x1, x2], dim=0))
        z1, z2 = z.chunk(2, dim=0)
        return {"loss": self.loss(z1, z2, batch.get("label")), **self.metrics(z)}

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """This process's share of the loss on projections; averaged over processes it is the global loss.
        Called by the default :meth:`forward` and by the gradient cache; an objective that overrides
        :meth:`forward` and declares no ``supports_grad_cache`` need not implement it.

        Args:
            z1, z2: (n, d) projections of view 1 and view 2 of this process's n images.
            labels: (n,) class indices (-1 unlabeled), or None when the data has none.
        """
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each applied optimizer update (not after a skipped one), under ``torch.no_grad()``;
        ``step`` is the run's global optimizer step: 1 after the first update, and it goes on counting across
        ``--resume`` (the first step after resuming from step N is N + 1)."""

    def grad_cache_refusal(self) -> str:
        """Why the gradient cache cannot run this objective (when ``supports_grad_cache`` is false): one clause."""
        return (f"the objective '{self.name}' does not support the gradient cache (it runs networks of its own on "
                "the views, or needs the whole batch at once)")

    def check_built(self, model: nn.Module) -> None:
        """After :meth:`build`: refuse an objective that holds the trained model's parameters as its own (kept as
        an attribute, ``self.online = model``): they would be saved twice and could be optimized twice."""
        own = {id(p): n for n, p in self.named_parameters()}
        shared = [own[id(p)] for p in model.parameters() if id(p) in own]
        if shared:
            raise TypeError(f"objective '{self.name}': build() kept the trained model's parameters as its own "
                            f"({shared[0]}, {len(shared)} in all): keep the model out of the objective's attributes "
                            "(store it in a list, self._online = [model], or use the model forward() receives)")

    @staticmethod
    def projection_dim(model: nn.Module) -> int:
        """The width of the model's projections z (the last linear layer of the head; without a head, h's)."""
        linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else model.backbone.num_features

    def metrics(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Health scalars logged with the loss: ``z_std`` (std of normalized z over the global batch,
        about 1/sqrt(d) when healthy, 0 on collapse) and ``z_std_ratio`` (z_std x sqrt(d), near 1)."""
        z_std = global_z_std(z)
        return {"z_std": z_std, "z_std_ratio": z_std * z.shape[1] ** 0.5}

    def warning(self, record: dict[str, float]) -> str | None:
        """A warning for a logged metrics ``record``, given once per run: representational collapse."""
        ratio = record.get("z_std_ratio")
        if ratio is None or ratio >= self.collapse_warn or "collapse" in self._warned:
            return None
        self._warned.add("collapse")
        return (f"representations may be collapsing at step {record.get('step')}: std of normalized z is "
                f"{ratio:.3f} x 1/sqrt(d) (healthy is near 1). Check lr, temperature, augmentation")
