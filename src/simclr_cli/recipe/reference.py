"""The recipe reference (docs/recipes.md), generated from the schema so it cannot drift.

Regenerate with ``python -m simclr_cli.recipe.reference > docs/recipes.md``; a test checks it.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

from simclr_cli.recipe.schema import Recipe


def _type_text(hint) -> str:
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_text(a) for a in get_args(hint))
    if get_origin(hint) is Literal:
        return "string: " + " \\| ".join(f"`{a}`" for a in get_args(hint))
    if get_origin(hint) is tuple:
        return f"array of {len(get_args(hint))} numbers"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}[hint]


def _default_text(f) -> str:
    value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(f"{v:g}" for v in value) + "]`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def recipe_reference() -> str:
    """Markdown: one table per section, every key with type, default and meaning."""
    out = [
        "# Recipe reference",
        "",
        "Generated from `src/simclr_cli/recipe/schema.py` by `python -m simclr_cli.recipe.reference`; do not edit.",
        "Override any key on the command line with `--set section.key=value`.",
        "",
        "## Top level",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    hints = get_type_hints(Recipe)
    sections = []
    for f in fields(Recipe):
        if is_dataclass(hints[f.name]):
            sections.append((f.name, hints[f.name]))
        else:
            out.append(f"| `{f.name}` | {_type_text(hints[f.name])} | {_default_text(f)} | {_md(f.metadata['help'])} |")
    for name, cls in sections:
        out += ["", f"## [{name}]", "", (cls.__doc__ or "").strip().split(": ", 1)[-1], ""]
        sub_hints = get_type_hints(cls)
        if not fields(cls):
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            if f.metadata.get("objective_section"):
                continue
            out.append(f"| `{name}.{f.name}` | {_type_text(sub_hints[f.name])} | {_default_text(f)} | {_md(f.metadata['help'])} |")
        if any(f.metadata.get("objective_section") for f in fields(cls)):
            out += _objective_sections(name)
    return "\n".join(out) + "\n"


def _objective_sections(parent: str) -> list[str]:
    """One table per objective with options: ``[pretrain.<objective>]``, read only when that objective is selected."""
    from simclr_cli.recipe.loader import registered_objective_sections as sections

    out = []
    for name, cls in sorted(sections().items()):
        out += ["", f"### [{parent}.{name}]", "", (cls.__doc__ or "").strip().split(": ", 1)[-1]
                + f" A key here with another `{parent}.objective` is an error.", ""]
        if not fields(cls):
            continue
        hints = get_type_hints(cls)
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            out.append(f"| `{parent}.{name}.{f.name}` | {_type_text(hints[f.name])} | {_default_text(f)} | "
                       f"{_md(f.metadata['help'])} |")
    return out


if __name__ == "__main__":
    print(recipe_reference(), end="")
