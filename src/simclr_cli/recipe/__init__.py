"""Recipes: typed schema, TOML loading with ``--set`` overrides, validation."""

from simclr_cli.recipe.loader import (
    bundled_recipe_names,
    bundled_recipes_dir,
    load_recipe,
    parse_toml,
    recipe_diff,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_toml,
    resolve_recipe_path,
)
from simclr_cli.recipe.schema import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    Recipe,
)

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "Recipe",
    "bundled_recipe_names",
    "bundled_recipes_dir",
    "load_recipe",
    "parse_toml",
    "recipe_diff",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "resolve_recipe_path",
]
