"""The Typer apps, the options the commands share, and what every command does around its one call:
errors to exit codes (:func:`_handled`) and, for the stages after pretrain, their inputs (:func:`_chain_inputs`)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

import simclr_cli
from simclr_cli.errors import NothingToDo, SimclrError
from simclr_cli.utils import check_out_folder

class _OneLineErrors(typer.core.TyperGroup):
    """A bad command line (an option value of the wrong type or out of range, an unknown option or command) is the
    project's one-line ``error: ...`` on stderr with exit 2, not Typer's multi-line boxed panel."""

    # click's UsageError, wherever this Typer takes click from (recent Typers bundle their own copy)
    _usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    _no_args = getattr(sys.modules[_usage_error.__module__], "NoArgsIsHelpError", ())

    def _one_line(self, e) -> typer.Exit:
        where = e.ctx.command_path if e.ctx is not None else "simclr"
        _say_error(f"{' '.join(e.format_message().splitlines())} (see `{where} --help`)")
        return typer.Exit(e.exit_code)

    def make_context(self, *args, **kwargs):  # the options of `simclr` itself (`simclr --bogus`)
        try:
            return super().make_context(*args, **kwargs)
        except self._usage_error as e:
            if isinstance(e, self._no_args):
                raise  # `simclr` alone: the help, as no_args_is_help asks
            raise self._one_line(e) from None

    def invoke(self, ctx):  # a command's arguments and options, and the command name
        try:
            return super().invoke(ctx)
        except self._usage_error as e:
            if isinstance(e, self._no_args):
                raise  # `simclr data` alone: the help, as no_args_is_help asks
            raise self._one_line(e) from None


def _hide_flag_types() -> None:
    """``--help`` shows a value type (``<int>``, ``<path>``) only for options that take a value: recent Typer
    versions print ``<bool>`` after flags such as ``--resume``, which reads as if the flag wanted a value."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_simclr_flags_hidden", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._simclr_flags_hidden = True
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()

app = typer.Typer(
    cls=_OneLineErrors,
    name="simclr",
    help="SimCLR end to end: contrastive pretraining, evaluation, semi-supervised fine-tuning, distillation, transfer.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes", rich_help_panel="Recipes")
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data", rich_help_panel="Recipes")

STAGES_PANEL = "Stages"
RUNS_PANEL = "Runs"
_debug = {"on": False}

RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or the name of a bundled recipe (see `simclr recipes list`).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE",
                 help="Override a recipe key; repeatable. VALUE is a TOML literal or a plain string."),
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<recipe name>).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
SourceArg = Annotated[
    Optional[str],
    typer.Argument(help="Run directory (runs/NAME), run name, or checkpoint (.../model.safetensors); "
                        "default: the newest run under ./runs that has the checkpoint this stage needs."),
]
RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe file or bundled name whose keys apply on top of the checkpoint's recipe."),
]
InitOpt = Annotated[str, typer.Option("--init", help="pretrained: the checkpoint's weights | random: the same "
                                                     "protocol on an untrained encoder (the baseline).")]
StageOutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Run directory to write into (default: the run read from; RUN/random_init with --init random).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace this stage's existing results in OUT.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def _version(value: bool) -> None:
    if value:
        print(f"simclr-cli {simclr_cli.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: DebugOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print the fully resolved recipe a stage runs with.")] = False,
) -> None:
    _debug["on"] = debug
    _debug["verbose"] = verbose


def _show_recipe(r) -> None:
    """With --verbose: the resolved recipe, as the stage will record it."""
    if _debug.get("verbose") and _is_main_process():
        import torch

        from simclr_cli import threads
        from simclr_cli.recipe import recipe_to_toml

        print("# resolved recipe\n" + recipe_to_toml(r), end="")
        print("# " + threads.current().describe(r.data.num_workers, gpu=torch.cuda.is_available()))


@contextmanager
def _handled(debug: bool = False) -> Iterator[None]:
    """Turn errors into one stderr line and an exit code; re-raise with ``--debug``.

    Ctrl-C and SIGTERM stop the command at once with exit 130 (never the silent 143 of SIGTERM); a stage
    catches them itself while it runs, stops at a step boundary and says what it kept.
    """
    from simclr_cli.engine.signals import StopRequest

    debug = debug or _debug["on"]
    stop = StopRequest(immediate=True)
    try:
        with stop:
            yield
    except typer.Exit:
        raise
    except NothingToDo as e:
        if _is_main_process():
            sys.stderr.write(f"note: {e}\n")
            sys.stderr.flush()
        raise typer.Exit(0) from None
    except SimclrError as e:
        if debug:
            raise
        _say_error(_one_line(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # outside a stage (they report their own stops, with what was kept)
        _say_error(f"stopped by {stop.signal_name or 'SIGINT'}")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence for the user
        if debug:
            raise
        from simclr_cli.errors import from_os_error

        known = from_os_error(e) if isinstance(e, OSError) else None  # disk full, read-only, a file in the way
        if known is not None:
            _say_error(_one_line(known))
            raise typer.Exit(known.exit_code) from None
        _say_error(f"{type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


def _say_error(message: str) -> None:
    """``error: MESSAGE`` and its newline in one write: the processes of a launch share stderr, and a line
    written in two pieces (as ``print`` does) gets another process's line glued into it."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _one_line(e: BaseException) -> str:
    """The message without the worker traceback that DataLoader bakes into re-raised errors."""
    text = str(e).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.splitlines())


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _check_out(folder: Path) -> None:
    """Refuse an output folder that cannot be one before any work (exit 2); see
    :func:`simclr_cli.utils.check_out_folder`, which ``embed`` shares."""
    check_out_folder(folder)


def _precheck(recipe: str | None, set_: list[str] | None) -> None:
    """Refuse a misspelt recipe name or ``--set`` key (exit 2, with its "did you mean") before a command
    imports torch, timm or accelerate: seconds, not the half-minute those imports take on a busy machine."""
    from simclr_cli.recipe import check_overrides, resolve_recipe_path

    if recipe:
        resolve_recipe_path(recipe)
    check_overrides(set_ or [])


def _typed(*options: tuple[str, str, Any]) -> dict[str, Any]:
    """The typed recipe overrides of a command's own options, from (option, recipe key, value) triples:
    ``_typed(("--k", "knn.k", k))`` gives ``{"knn.k": FromOption("--k", k)}``, which the recipe loader checks
    like any value and blames on ``--k``. Options not given (None) are left out; a value given is always
    checked, never silently dropped (``--labels ""`` and ``--temperature 0`` are errors)."""
    from simclr_cli.recipe import FromOption

    return {key: FromOption(option, value) for option, key, value in options if value is not None}


def _chain_inputs(source, recipe, set_, init, wants, out, quiet, resume_stage=None, values=None):
    """Resolve a stage's checkpoint, recipe and output directory (the chaining rules). ``resume_stage``
    (with --resume): the recipe is the one that stage saved in OUT/STAGE/recipe.toml, ``--set`` on top.
    ``values``: the typed overrides of the command's own options, applied after ``--set``."""
    from simclr_cli.stages import common

    say = (lambda *a: None) if quiet or not _is_main_process() else print
    r = (common.resume_recipe(Path(out) / resume_stage, recipe, set_, values)
         if resume_stage and out is not None else None)
    src = common.find_checkpoint(source, wants, say=say,
                             required=init != "random" or (source is not None) or not (recipe or r))
    if resume_stage and r is None and out is None and src is not None:
        r = common.resume_recipe(common.output_dir(src, None, None, init) / resume_stage, recipe, set_, values)
    r = r or common.inherit_recipe(src, recipe, set_, values)
    _show_recipe(r)
    out_dir = common.output_dir(src, r, out, init)
    _check_out(out_dir)
    return src, r, out_dir
