"""What the stage commands after pretrain share: their common options, their inputs (the chaining rules) and
their body, declared once in :func:`chained_stage_command`.

A stage command then declares only its own options and the recipe keys they set; the decorator adds the
options every such stage has (``SOURCE``, ``--init``, ``--recipe``, ``--set``, ``--out``, ``--resume``,
``--auto-resume``, ``--overwrite``, ``--force``, ``--quiet``, ``--debug``, as the stage needs them) and runs the
body: check the recipe arguments before torch is imported, resolve the checkpoint, recipe and output folder,
call ``stages.<folder>.run`` and print its result.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional, Sequence

import typer

from simclr_cli import layout
from simclr_cli.cli import render
from simclr_cli.cli._app import (
    DebugOpt,
    InitOpt,
    OverwriteOpt,
    QuietOpt,
    RecipeOpt,
    SetOpt,
    SourceArg,
    StageOutOpt,
    check_recipe_args,
    handle_errors,
    is_main_process,
    show_resolved_recipe,
    stage_command,
    typed_overrides,
)
from simclr_cli.utils import check_out_folder

if typing.TYPE_CHECKING:
    from simclr_cli.recipe import Recipe
    from simclr_cli.stages.common import CheckpointRef

AutoResumeOpt = Annotated[bool, typer.Option(
    "--auto-resume", help="Continue OUT/STAGE/state when it holds an unfinished run with this recipe, else start "
                          "fresh. Implied under an elastic restart (torchrun --max-restarts) for the run that launch "
                          "started.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe.")]
OwnOptions = Sequence[tuple[str, str, Any]]  # (option, recipe key, value) of a command's own options
Report = Callable[[dict, str, Path], None]  # (summary, --init, output run folder): prints the result


def resume_option(folder: str) -> Any:
    """``--resume`` of the stage that writes ``RUN/<folder>/``."""
    return Annotated[bool, typer.Option("--resume", help=f"Continue an interrupted run from OUT/{folder}/state, with "
                                                         "the recipe it saved (no other options needed).")]


def check_auto_resume(auto_resume: bool, overwrite: bool) -> None:
    """``--auto-resume`` with ``--overwrite`` is contradictory. The rule itself (stages.scaffold.auto_resume, also
    under an elastic restart) is applied by the stage's main process once the processes have met, and its decision
    holds for all of them (StageRun.check)."""
    from simclr_cli.errors import UsageError

    if auto_resume and overwrite:
        raise UsageError("--auto-resume continues the run in the stage folder, --overwrite replaces it: choose one")


@dataclass(frozen=True)
class StageInputs:
    """What a stage after pretrain reads and where it writes."""

    source: Optional[CheckpointRef]  # the checkpoint read (None: --init random without one)
    recipe: Recipe
    out_dir: Path  # the run folder the stage writes its RUN/<stage>/ into


def resolve_stage_inputs(*, source: str | None, recipe_arg: str | None, overrides: Sequence[str], init: str,
                         wants: tuple[str, ...], out: Path | None, quiet: bool, resume_stage: str | None = None,
                         values: Mapping[str, Any] | None = None) -> StageInputs:
    """Resolve a stage's checkpoint, recipe and output directory (the chaining rules of ``stages/common.py``).

    Args:
        source: SOURCE as typed (a run, a run name, a checkpoint); None: the newest run with one of ``wants``.
        recipe_arg: ``--recipe``, whose keys apply on top of the checkpoint's recipe.
        overrides: the ``--set`` strings.
        init: ``pretrained`` or ``random`` (``--init``).
        wants: the stage folders whose checkpoint the stage reads (``("pretrain",)``).
        out: ``--out``; None: the run read from (``RUN/random_init`` for ``--init random``).
        quiet: say nothing about the run picked.
        resume_stage: with ``--resume``, the stage folder: the recipe is the one it saved in
            ``OUT/STAGE/recipe.toml``, ``--set`` on top.
        values: the typed overrides of the command's own options, applied after ``--set``.

    Raises:
        UsageError, RecipeError: no checkpoint, a bad recipe, an output folder that cannot be written (exit 2).
    """
    from simclr_cli.stages import common

    say = (lambda *a: None) if quiet or not is_main_process() else print
    r = (common.resume_recipe(Path(out) / resume_stage, recipe_arg, overrides, values)
         if resume_stage and out is not None else None)
    src = common.find_checkpoint(source, wants, say=say,
                                 required=init != "random" or (source is not None) or not (recipe_arg or r))
    if resume_stage and r is None and out is None and src is not None:
        r = common.resume_recipe(common.output_dir(src, None, None, init) / resume_stage, recipe_arg, overrides,
                                 values)
    r = r or common.inherit_recipe(src, recipe_arg, overrides, values)
    show_resolved_recipe(r)
    out_dir = common.output_dir(src, r, out, init)
    check_out_folder(out_dir)
    return StageInputs(src, r, out_dir)


class _OrNone(dict):
    def __missing__(self, key: str) -> None:
        return None


def result_table(title: str, *columns: str) -> Report:
    """The usual report: a one-row table of the summary's ``columns`` under ``title``, which is formatted with
    the summary's keys and ``{init}`` (a key the summary lacks reads None)."""

    def report(summary: dict, init: str, out_dir: Path) -> None:
        render.show_result(title.format_map(_OrNone(summary, init=init)), render.pick(summary, *columns))

    return report


@dataclass(frozen=True)
class _Shared:
    """The common options as the command got them."""

    source: Optional[str]
    recipe: Optional[str]
    set_: Optional[list[str]]
    out: Optional[Path]
    overwrite: bool
    quiet: bool
    debug: bool
    init: str = "pretrained"
    resume: bool = False
    auto_resume: bool = False
    force: bool = False


def _parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


def _shared_parameters(entry: layout.Stage, source: Any, init: bool,
                       resumable: bool) -> tuple[inspect.Parameter, list[inspect.Parameter]]:
    """SOURCE, and the options after the stage's own, in the order of ``--help``."""
    after = [_parameter("init", InitOpt, "pretrained")] if init else []
    after += [_parameter("recipe", RecipeOpt, None), _parameter("set_", SetOpt, None),
              _parameter("out", StageOutOpt, None)]
    if resumable:
        after += [_parameter("resume", resume_option(entry.folder), False),
                  _parameter("auto_resume", AutoResumeOpt, False)]
    after.append(_parameter("overwrite", OverwriteOpt, False))
    if resumable:
        after.append(_parameter("force", ForceOpt, False))
    after += [_parameter("quiet", QuietOpt, False), _parameter("debug", DebugOpt, False)]
    return _parameter("source", source, None), after


def chained_stage_command(name: str, *, report: Report, wants: tuple[str, ...] = ("pretrain",),
                          source: Any = SourceArg, init: bool = True,
                          resumable: bool = False) -> Callable[[Callable[..., OwnOptions]], Callable[..., OwnOptions]]:
    """Register the command of the stage ``name`` (:data:`simclr_cli.layout.STAGES`: its name and help) from a
    function that declares the stage's own options and returns them as (option, recipe key, value) triples.

    The command also gets SOURCE (``source``: its ``Annotated`` type) and, after the stage's own options,
    ``--init`` (``init``), ``--recipe``, ``--set``, ``--out``, ``--resume`` and ``--auto-resume`` (``resumable``),
    ``--overwrite``, ``--force`` (``resumable``), ``--quiet`` and ``--debug``. It runs
    ``stages.<folder>.run(recipe, source, out_dir, overwrite=, show_progress=, [init=], [resume=, auto_resume=,
    force=])`` on the checkpoint of ``wants`` and prints ``report`` on the main process unless ``--quiet``.
    The decorated function runs inside the command's error handling: it may raise a ``UsageError``; it is
    returned unchanged (the registered command is built around it).
    """
    entry = layout.stage(name)
    if entry.folder is None:
        raise ValueError(f"{name} writes no stage folder: register it with stage_command")

    def register(own: Callable[..., OwnOptions]) -> Callable[..., OwnOptions]:
        hints = typing.get_type_hints(own, include_extras=True)
        own_params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(own).parameters.values()]
        first, after = _shared_parameters(entry, source, init, resumable)
        shared_names = {first.name, *(p.name for p in after)}
        clash = shared_names.intersection(p.name for p in own_params)
        if clash:
            raise ValueError(f"{own.__name__}: {', '.join(sorted(clash))} is a shared option of every stage command")

        def command(**kwargs: Any) -> None:
            shared = _Shared(**{k: kwargs.pop(k) for k in list(kwargs) if k in shared_names})
            _run_chained(entry, shared, lambda: own(**kwargs), report, wants, init, resumable)

        params = [first, *own_params, *after]
        command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__qualname__ = own.__name__, own.__qualname__
        command.__module__, command.__doc__ = own.__module__, own.__doc__
        stage_command(name)(command)
        return own

    return register


def _run_chained(entry: layout.Stage, shared: _Shared, own_options: Callable[[], OwnOptions], report: Report,
                 wants: tuple[str, ...], init: bool, resumable: bool) -> None:
    """The body of every stage command after pretrain (see :func:`chained_stage_command`)."""
    with handle_errors(shared.debug):
        check_recipe_args(shared.recipe, shared.set_)  # before torch is imported
        stage = importlib.import_module(f"simclr_cli.stages.{entry.folder}")
        values = typed_overrides(*own_options())
        inputs = resolve_stage_inputs(source=shared.source, recipe_arg=shared.recipe, overrides=shared.set_ or [],
                                      init=shared.init, wants=wants, out=shared.out, quiet=shared.quiet,
                                      resume_stage=entry.folder if shared.resume else None, values=values)
        extra: dict[str, Any] = {"init": shared.init} if init else {}
        if resumable:
            check_auto_resume(shared.auto_resume, shared.overwrite)
            extra.update(resume=shared.resume, auto_resume=shared.auto_resume, force=shared.force)
        summary = stage.run(inputs.recipe, inputs.source, inputs.out_dir, overwrite=shared.overwrite,
                            show_progress=not shared.quiet, **extra)
        if not shared.quiet and is_main_process():
            report(summary, shared.init, inputs.out_dir)
