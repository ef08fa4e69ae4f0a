"""The objective interface and its registry."""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch
from torch import nn

import torch.nn.functional as F

from simclr_cli.dist import world_size
from simclr_cli.errors import RecipeError
from simclr_cli.models.heads import projection_head
from simclr_cli.recipe.schema import ModelConfig, PretrainConfig

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
    """Class decorator: make ``cls`` selectable as ``pretrain.objective = cls.name``."""
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is empty or taken")
    OBJECTIVES[cls.name] = cls
    return cls


def build_objective(cfg: PretrainConfig) -> "Objective":
    """The objective ``pretrain.objective`` names, built from the recipe's ``[pretrain]`` section."""
    cls = OBJECTIVES.get(cfg.objective)
    if cls is None:
        close = difflib.get_close_matches(cfg.objective, OBJECTIVES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"pretrain.objective: '{cfg.objective}' is not an objective{hint}; "
                          f"choose one of {', '.join(sorted(OBJECTIVES))}")
    return cls.from_recipe(cfg)


class Objective:
    """A pretraining objective on (z1, z2), the projections of two views of the same n images.

    Subclasses set ``name`` (and ``needs_labels`` when the loss uses class labels), implement
    :meth:`from_recipe` (recipe section -> plain constructor arguments) and :meth:`loss`; they may
    override :meth:`head`, :meth:`metrics` and :meth:`warning`.
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False

    def __init__(self, *, collapse_warn: float = 0.1) -> None:
        self.collapse_warn = collapse_warn
        self._warned: set[str] = set()

    @classmethod
    def from_recipe(cls, cfg: PretrainConfig) -> "Objective":
        raise NotImplementedError

    def head(self, in_dim: int, model: ModelConfig) -> nn.Module:
        """The projection head g on h (``in_dim`` wide): the recipe's ``model.proj_*`` head by default."""
        return projection_head(in_dim, model.proj_layers, model.proj_hidden_dim, model.proj_dim)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """This process's share of the loss; averaged over processes it is the global loss.

        Args:
            z1, z2: (n, d) projections of view 1 and view 2 of this process's n images.
            labels: (n,) class indices (-1 unlabeled), or None when the data has none.
        """
        raise NotImplementedError

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
