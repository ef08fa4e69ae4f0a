"""Recipes: typed schema, TOML loading with ``--set`` and typed overrides, validation."""

from simclr_cli.recipe.loader import (
    FromOption,
    TypedOverrides,
    bundled_recipe_names,
    bundled_recipes_dir,
    check_overrides,
    load_recipe,
    parse_saved_toml,
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
    "FromOption",
    "ModelConfig",
    "PretrainConfig",
    "Recipe",
    "TypedOverrides",
    "bundled_recipe_names",
    "bundled_recipes_dir",
    "check_overrides",
    "load_recipe",
    "parse_saved_toml",
    "parse_toml",
    "recipe_diff",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "resolve_recipe_path",
]
