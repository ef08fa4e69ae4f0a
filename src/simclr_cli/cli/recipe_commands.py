"""Commands on recipes and their data: recipes list, show, validate; data check."""

from __future__ import annotations

from typing import Annotated

import typer

from simclr_cli.cli import render
from simclr_cli.cli._app import DebugOpt, RecipeArg, SetOpt, data_app, handle_errors, recipes_app


@recipes_app.command("list")
def recipes_list() -> None:
    """List the bundled recipes."""
    with handle_errors():
        from simclr_cli.recipe import bundled_recipe_names, load_recipe

        render.show_recipes((name, load_recipe(name)) for name in bundled_recipe_names())


@recipes_app.command("show")
def recipes_show(
    name: RecipeArg,
    resolved: Annotated[bool, typer.Option("--resolved", help="Show every key, defaults included.")] = False,
    set_: SetOpt = None,
) -> None:
    """Print a recipe's TOML (as written, or fully resolved)."""
    with handle_errors():
        from simclr_cli.recipe import load_recipe, recipe_to_toml, resolve_recipe_path

        if resolved or set_:
            print(recipe_to_toml(load_recipe(name, set_ or [])), end="")
        else:
            load_recipe(name)  # validate before showing
            print(resolve_recipe_path(name).read_text(encoding="utf-8-sig"), end="")


@recipes_app.command("validate")
def recipes_validate(file: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe file (and overrides) against the schema; exit 2 with the first problem."""
    with handle_errors():
        from simclr_cli.validate import validate_recipe

        path, r = validate_recipe(file, set_ or [])
        print(f"ok: {path} (name={r.name}, dataset={r.data.dataset}, backbone={r.model.backbone})")


@data_app.command("check")
def data_check(recipe: RecipeArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Decode every image of the recipe's splits; report unreadable files, class counts and sizes.

    Exits 1 when training would stop on unreadable images (more than data.max_bad_fraction).
    """
    with handle_errors(debug):
        from simclr_cli.data.check import check_recipe_data
        from simclr_cli.errors import DataError
        from simclr_cli.recipe import load_recipe

        r = load_recipe(recipe, set_ or [])
        aborting = render.show_data_check(check_recipe_data(r), r.data.max_bad_fraction)
        if aborting:
            raise DataError(f"{', '.join(aborting)}: more than data.max_bad_fraction={r.data.max_bad_fraction} "
                            "of the images are unreadable; training would stop (they are listed above)")
