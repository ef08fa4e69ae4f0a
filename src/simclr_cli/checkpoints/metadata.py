"""The ``simclr.*`` string metadata every checkpoint carries, and what a classifier checkpoint adds.

Later stages rebuild a model from it (``simclr.recipe``, ``simclr.head_layers``, ...), ``simclr info``
shows it, and ``simclr export`` reads the architecture from it.
"""

from __future__ import annotations

import json

from torch import nn

import simclr_cli
from simclr_cli.recipe import Recipe, recipe_to_toml


def checkpoint_metadata(recipe: Recipe, model: nn.Module, stage: str) -> dict[str, str]:
    """Stage, architecture, image size, version and the full recipe; ``model.backbone.num_features`` is h's width."""
    return {
        "simclr.stage": stage,
        "simclr.backbone": recipe.model.backbone,
        "simclr.cifar_stem": "true" if recipe.model.cifar_stem else "false",
        "simclr.feature_dim": str(model.backbone.num_features),
        "simclr.proj_layers": str(recipe.model.proj_layers),
        "simclr.image_size": str(recipe.data.image_size),
        "simclr.version": simclr_cli.__version__,
        "simclr.recipe": recipe_to_toml(recipe),
    }


def classifier_metadata(classes: list[str], num_classes: int, head_layers: int, init: str) -> dict[str, str]:
    """What a checkpoint with a classifier under ``head.`` adds: its classes, the projection-head layers
    kept below the linear layer, and how the encoder was initialized."""
    return {
        "simclr.num_classes": str(num_classes),
        "simclr.classes": json.dumps(list(classes)),
        "simclr.head_layers": str(head_layers),
        "simclr.classifier": "head",
        "simclr.init": init,
    }
