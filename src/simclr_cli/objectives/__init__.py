"""Pretraining objectives, chosen by ``pretrain.objective`` from a registry (name -> class).

An objective is an ``nn.Module`` that owns what makes a method a method: its options (its own
``[pretrain.<name>]`` recipe section), its loss (it may run networks of its own on the views), its
projection head, any state it keeps (a momentum encoder, a queue: buffers, so in the resume state),
and its health metrics and warnings. Everything else (data, views, the encoder, the optimizer, the
loop, checkpoints) is shared. Adding one is one new module that subclasses :class:`Objective` and is
decorated with :func:`register`, plus its import below; ``docs/extending.md`` walks through it.
"""

from __future__ import annotations

from simclr_cli.objectives.base import OBJECTIVES, FitInfo, Objective, build_objective, register, unregister

# Importing a module registers its objectives.
from simclr_cli.objectives import simclr as _simclr  # noqa: E402,F401
from simclr_cli.objectives import supcon as _supcon  # noqa: E402,F401

__all__ = ["OBJECTIVES", "FitInfo", "Objective", "build_objective", "register", "unregister"]
