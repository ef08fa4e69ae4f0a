"""Read TOML recipes into the typed schema, apply overrides, write them back.

Two kinds of override apply on top of a recipe, in this order:

* ``--set`` strings (``section.key=value``), whose value is read as a TOML literal when it is one;
* typed values (``{"knn.k": 20}``), Python values that a program or a command-line option already
  parsed; they are never read as TOML text, so ``"10%"`` or a path with quotes stays the string it is.
  Wrap one in :class:`FromOption` to name the option that gave it in errors.

Both go through the same schema checks (type, range, did-you-mean). Errors are
:class:`~simclr_cli.errors.RecipeError` (exit 2) with one line that names the file, the ``--set``
or the option, the key, and what to do.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin, get_type_hints

from simclr_cli.errors import RecipeError
from simclr_cli.recipe.schema import MOVED_KEYS, OBJECTIVE_SECTIONS, RANGES, Recipe

_REPO_RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def bundled_recipes_dir() -> Path:
    """The folder of recipes shipped with the package (repo ``recipes/`` in a source checkout)."""
    packaged = Path(str(resources.files("simclr_cli"))) / "recipes"
    if packaged.is_dir():
        return packaged
    return _REPO_RECIPES


def bundled_recipe_names() -> list[str]:
    """Names (file stems) of the bundled recipes, sorted."""
    folder = bundled_recipes_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def resolve_recipe_path(arg: str | Path) -> Path:
    """Turn a recipe argument into a file: an existing path, or a bundled recipe name."""
    path = Path(arg)
    if path.is_file():
        return path
    names = bundled_recipe_names()
    stem = path.stem if path.suffix == ".toml" else str(arg)
    if stem in names and (path.suffix != ".toml" or len(path.parts) == 1 or path.parent.name == "recipes"):
        return bundled_recipes_dir() / f"{stem}.toml"
    hint = _did_you_mean(stem, names)
    if path.suffix == ".toml" or len(path.parts) > 1:
        raise RecipeError(f"{arg}: no such recipe file{hint}; bundled recipes: {', '.join(names)}")
    raise RecipeError(f"'{arg}' is neither a recipe file nor a bundled recipe{hint}; bundled recipes: {', '.join(names)}")


@dataclass(frozen=True)
class FromOption:
    """A typed override's value and the command-line option it came from, which errors name.

    ``{"knn.k": FromOption("--k", 0)}`` fails as ``--k: 'knn.k' must be an integer >= 1, got 0``.
    """

    option: str
    value: Any


TypedOverrides = Mapping[str, Any]
"""Dotted key -> Python value (or :class:`FromOption`), e.g. ``{"knn.k": 20, "finetune.labels": "1%"}``."""


def load_recipe(arg: str | Path, overrides: typing.Sequence[str] = (), values: TypedOverrides | None = None) -> Recipe:
    """Load a recipe file or bundled name, apply overrides, validate.

    Args:
        arg: a path to a TOML file or the name of a bundled recipe (``cifar10``).
        overrides: ``--set`` strings such as ``pretrain.epochs=2``.
        values: typed overrides applied after ``overrides``: dotted key -> Python value, or
            :class:`FromOption` to name the command-line option that gave it.
    """
    path = resolve_recipe_path(arg)
    raw = read_toml(path)
    return recipe_from_dict(raw, source=str(path), overrides=overrides, values=values)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is accepted and dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                          "TOML recipes must be UTF-8: save the file as UTF-8") from None
    return parse_toml(text, source=str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line L, column C)".
        raise RecipeError(f"{source}: invalid TOML: {e}") from None


def parse_saved_toml(text: str, source: str) -> dict[str, Any]:
    """A recipe that simclr-cli itself wrote (a checkpoint's stored recipe, a run's ``recipe.toml``), parsed,
    with the keys that moved since (:data:`~simclr_cli.recipe.schema.MOVED_KEYS`) put in their new place, so
    that checkpoints and runs of earlier versions stay readable. A user's recipe gets no such help: there an
    old key is an error naming its new place."""
    raw = parse_toml(text, source)
    pretrain = raw.get("pretrain")
    if isinstance(pretrain, dict) and any(k.split(".")[1] in pretrain for k in MOVED_KEYS):
        objective = pretrain.get("objective", "simclr")
        old = {k.split(".")[1]: pretrain.pop(k.split(".")[1]) for k in MOVED_KEYS if k.split(".")[1] in pretrain}
        options = registered_objective_sections().get(objective)
        if options is not None:  # each objective keeps the old keys it has (supcon: temperature)
            names = {f.name for f in fields(options)}
            section = pretrain.setdefault(objective, {})
            for key, value in old.items():
                if key in names:
                    section.setdefault(key, value)
    return raw


def recipe_from_dict(
    raw: dict[str, Any], source: str = "<recipe>", overrides: typing.Sequence[str] = (),
    values: TypedOverrides | None = None,
) -> Recipe:
    """Validate a parsed TOML mapping (plus overrides) into a :class:`Recipe`.

    ``overrides`` (``--set`` strings) apply first, then ``values`` (typed; see :func:`load_recipe`).
    """
    merged = _deep_copy(raw)
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(merged, key, value, f"--set {text}", source)
        origins[key] = f"--set {text}"
    for key, given in (values or {}).items():
        value, where = (given.value, given.option) if isinstance(given, FromOption) else (given, f"{key}={given!r}")
        _apply_override(merged, key, value, where, source)
        origins[key] = where
    return _build(Recipe, merged, prefix="", source=source, origins=origins)


def check_overrides(overrides: typing.Sequence[str]) -> None:
    """Check ``--set`` strings' syntax and key names against the schema, without a recipe: what a command can
    refuse (with its "did you mean") before importing torch. Values are checked later, with the recipe."""
    scratch: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(scratch, key, value, f"--set {text}", "<--set>")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is a TOML literal when it parses as one, else a string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. pretrain.epochs=2")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {text!r}: missing key before '='")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def _apply_override(merged: dict, key: str, value: Any, where: str, source: str) -> None:
    """Put ``value`` at dotted ``key``; ``where`` (``--set TEXT``, an option) is what errors blame."""
    parts = key.split(".")
    node = merged
    cls: Any = Recipe
    for i, part in enumerate(parts):
        names = {f.name: f for f in _keys(cls)}
        dotted = ".".join(parts[: i + 1])
        # an objective's section is a table, so only a part followed by more can name one: a misspelt key
        # (`pretrain.epoch`) is told without importing the objectives (and torch with them)
        section_part = i < len(parts) - 1 and part not in names and _has_objective_section(cls)
        if section_part and part in (sections := registered_objective_sections()):
            hint = sections[part]  # [pretrain.<objective>]: checked against the objective when built
        elif part not in names:
            if dotted in MOVED_KEYS:
                raise RecipeError(f"{where}: '{dotted}' moved to '{MOVED_KEYS[dotted]}' (the objective's own section); "
                                  f"use --set {MOVED_KEYS[dotted]}=... or [{MOVED_KEYS[dotted].rsplit('.', 1)[0]}] "
                                  "in the recipe")
            valid = [".".join([*parts[:i], n]) for n in names]
            if section_part:
                valid += [".".join([*parts[:i], n]) for n in registered_objective_sections()]
            elif i == len(parts) - 1 and _has_objective_section(cls):
                _refuse_objective_key(part, parts[:i], names, where)
            raise RecipeError(f"{where}: unknown key '{dotted}'{_did_you_mean(dotted, valid)}")
        else:
            hint = get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if is_dataclass(hint):
                raise RecipeError(f"{where}: '{key}' is a section; set one of its keys, e.g. {key}.{fields(hint)[0].name}=...")
            node[part] = value
            return
        if not is_dataclass(hint):
            raise RecipeError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{source}: '{'.'.join(parts[: i + 1])}' must be a table")
        cls = hint


def _build(cls: type, raw: Any, prefix: str, source: str, origins: dict[str, str]) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: [{where}] must be a table, got {_type_name(raw)}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in _keys(cls)}
    sections = registered_objective_sections() if _has_objective_section(cls) else {}
    for key in raw:
        if key not in known and key not in sections:
            if prefix + key in MOVED_KEYS:
                new = MOVED_KEYS[prefix + key]
                raise RecipeError(f"{origins.get(prefix + key, source)}: '{prefix}{key}' moved to '{new}' (the "
                                  f"objective's own section): write it as {key} = ... under [{new.rsplit('.', 1)[0]}]")
            if sections:
                _refuse_objective_key(key, prefix.rstrip(".").split("."), known, source)
            valid = [prefix + n for n in [*known, *sections]]
            extra = ""
            if not known:
                extra = f" ([{where}] is reserved for a stage that has no settings yet)"
            raise RecipeError(f"{source}: unknown key '{prefix}{key}'{_did_you_mean(prefix + key, valid)}{extra}")
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            continue
        hint = hints[name]
        if is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.", source, origins)
        else:
            key = f"{prefix}{name}"
            value = _coerce(raw[name], hint, key, origins.get(key, source))
            check = RANGES.get(key) or f.metadata.get("check")
            if check is not None and not check[1](value):
                raise RecipeError(f"{origins.get(key, source)}: '{key}' must be {check[0]}, got {value!r}")
            kwargs[name] = value
    if sections:
        kwargs["options"] = _build_objective_section(raw, kwargs, cls, sections, prefix, source, origins)
    return cls(**kwargs)


def _refuse_objective_key(key: str, section: list[str], plain: typing.Iterable[str], where: str) -> None:
    """An unknown ``key`` of a section that holds objective sections (``[pretrain]``): if it names an objective's
    section or one of an objective's options, say so. A near-identical plain key (``epoch`` for ``epochs``)
    is left to the plain did-you-mean, so that a typo is told before torch is imported (the objectives'
    option classes live next to their torch code); otherwise returns and the caller reports the key."""
    if difflib.get_close_matches(key, list(plain), n=1, cutoff=0.85):
        return
    prefix = ".".join(section)
    sections = registered_objective_sections()
    if key in sections:
        example = fields(sections[key])[0].name if fields(sections[key]) else "KEY"
        raise RecipeError(f"{where}: '{prefix}.{key}' is the objective {key}'s section, not a key; set one of its "
                          f"options, e.g. --set {prefix}.{key}.{example}=... (or [{prefix}.{key}] in the recipe)")
    owners = [name for name, options in sections.items() if key in {f.name for f in fields(options)}]
    if owners:
        places = " or ".join(f"'{prefix}.{o}.{key}'" for o in owners)
        raise RecipeError(f"{where}: unknown key '{prefix}.{key}': '{key}' is an option of the objective "
                          f"{' and '.join(owners)}; did you mean {places}? (each objective's options live in its "
                          f"own section [{prefix}.<objective>])")


def _keys(cls: type) -> list:
    """The fields of a section that are TOML keys (an objective's options field is a sub-section instead)."""
    return [f for f in fields(cls) if not f.metadata.get("objective_section")]


def _has_objective_section(cls: type) -> bool:
    return any(f.metadata.get("objective_section") for f in fields(cls))


def registered_objective_sections() -> dict[str, type]:
    """Objective name -> options dataclass. Objectives register their sections when imported; importing the
    package here (late, like a plugin entry point) makes the built-in ones known to every recipe load."""
    import simclr_cli.objectives  # noqa: F401

    return OBJECTIVE_SECTIONS


def _build_objective_section(raw: dict, kwargs: dict, cls: type, sections: dict[str, type], prefix: str,
                             source: str, origins: dict[str, str]) -> Any:
    """The selected objective's options from ``[<prefix><objective>]`` (its defaults when absent); a section of
    an objective that is not selected is an error."""
    chosen = kwargs.get("objective", next(f.default for f in fields(cls) if f.name == "objective"))
    from simclr_cli.objectives import OBJECTIVES

    if chosen not in OBJECTIVES and chosen not in sections:  # a typo first: it explains any section "not selected"
        known = sorted({*OBJECTIVES, *sections})
        raise RecipeError(f"{origins.get(f'{prefix}objective', source)}: '{prefix}objective': '{chosen}' is not an "
                          f"objective{_did_you_mean(chosen, known)}; choose one of {', '.join(known)}")
    for name in sections:
        _refuse_parent_keys_in_section(raw.get(name), cls, sections[name], f"{prefix}{name}", source)
    for name in sections:
        if name in raw and name != chosen and not _replaced_on_command_line(raw, name, prefix, origins):
            where = next((o for k, o in origins.items() if k.startswith(f"{prefix}{name}.")), source)
            raise RecipeError(f"{where}: [{prefix}{name}] holds options of the objective '{name}', but "
                              f"{prefix}objective is '{chosen}'; remove the section or set {prefix}objective='{name}'")
    options_cls = sections.get(chosen)
    if options_cls is None:
        if chosen in raw:
            raise RecipeError(f"{source}: [{prefix}{chosen}]: the objective '{chosen}' takes no options")
        return None
    return _build(options_cls, raw.get(chosen, {}), f"{prefix}{chosen}.", source, origins)


def _refuse_parent_keys_in_section(section: Any, parent: type, options: type, name: str, source: str) -> None:
    """A key of the parent section (``objective``, ``epochs``) inside ``[pretrain.<objective>]``: in TOML every
    line after a table header belongs to that table until the next one, so ``objective = ...`` written below
    ``[pretrain.byol]`` is not ``pretrain.objective``. Say that rather than what follows from it."""
    if not isinstance(section, dict):
        return
    parent_keys = {f.name for f in _keys(parent)} - {f.name for f in fields(options)}  # its own options stay
    misplaced = [k for k in section if k in parent_keys]
    if misplaced:
        lines = ", ".join(f"{k} = ..." for k in misplaced)
        raise RecipeError(f"{source}: [{name}] holds {lines}, a key of [{name.rsplit('.', 1)[0]}]: in TOML every "
                          f"key after the [{name}] header belongs to that section; move the line above [{name}] "
                          f"(keep [{name}] last in [{name.rsplit('.', 1)[0]}])")


def _replaced_on_command_line(raw: dict, name: str, prefix: str, origins: dict[str, str]) -> bool:
    """True when the objective was chosen on the command line (``--set pretrain.objective=supcon``) and the
    section of the objective it replaced came from the recipe file, not from the command line either: the
    file's options for the replaced objective do not apply, so the section is dropped (the run's saved
    recipe holds only the chosen objective's options). Sections given on the command line stay an error."""
    if f"{prefix}objective" not in origins:
        return False
    return not any(k.startswith(f"{prefix}{name}.") for k in origins)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]: the first type the value fits
        arms = get_args(hint)
        for arm in arms:
            try:
                return _coerce(value, arm, key, source)
            except RecipeError:
                continue
        raise RecipeError(f"{source}: '{key}' must be {' or '.join(_hint_name(a) for a in arms)}, "
                          f"got {_type_name(value)} {value!r}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            shown = " | ".join(repr(c) for c in choices)
            hint_text = _did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise RecipeError(f"{source}: '{key}' must be one of {shown}, got {value!r}{hint_text}")
        return value
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{source}: '{key}' must be an array of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: '{key}' must be a boolean (true/false), got {_type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: '{key}' must be an integer, got {_type_name(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{source}: '{key}' must be a number, got {_type_name(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{source}: '{key}' must be a string, got {_type_name(value)} {value!r}")
        return value
    raise TypeError(f"unsupported schema type {hint!r} for {key}")  # a bug in the schema, not the user's


def _hint_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " | ".join(repr(c) for c in get_args(hint))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


# ----------------------------------------------------------------------------- writing


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """A plain nested dict of the recipe (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in fields(recipe):
        value = getattr(recipe, f.name)
        if f.metadata.get("objective_section"):  # written as the [section.<objective>] sub-section
            if value is not None and fields(value):
                out[recipe.objective] = recipe_to_dict(value)
            continue
        if is_dataclass(value):
            out[f.name] = recipe_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML text; ``load`` of it gives back an equal recipe."""
    data = recipe_to_dict(recipe)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append("")
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict))
            for sub, sub_values in values.items():  # an objective's own section, e.g. [pretrain.simclr]
                if isinstance(sub_values, dict):
                    lines += ["", f"[{section}.{sub}]", *(f"{k} = {_toml_value(v)}" for k, v in sub_values.items())]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    da, db = _flatten(recipe_to_dict(a)), _flatten(recipe_to_dict(b))
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out

