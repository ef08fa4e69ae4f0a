"""Pretraining objectives, chosen by ``pretrain.objective`` from a registry (name -> class).

An objective owns what makes a method a method: its loss on the projections of the two views,
its projection head, and its health metrics and warnings. Everything else (data, views, the
encoder, the optimizer, the loop, checkpoints) is shared. Adding one is one new module that
subclasses :class:`Objective` and is decorated with :func:`register`, plus its import below;
``docs/extending.md`` walks through it.
"""

from __future__ import annotations

from simclr_cli.objectives.base import OBJECTIVES, Objective, build_objective, register

# Importing a module registers its objectives.
from simclr_cli.objectives import simclr as _simclr  # noqa: E402,F401
from simclr_cli.objectives import supcon as _supcon  # noqa: E402,F401

__all__ = ["OBJECTIVES", "Objective", "build_objective", "register"]
