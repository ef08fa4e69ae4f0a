"""The ``simclr`` command: thin Typer wrappers over the importable stage functions.

Exit codes: 0 ok, 1 runtime failure, 2 usage or recipe error, 130 interrupted
(state saved). Errors print one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

import simclr_cli
from simclr_cli.errors import SimclrError

app = typer.Typer(
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
_debug = {"on": False}

RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or the name of a bundled recipe (see `simclr recipes list`).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE",
                 help="Override a recipe key; repeatable. VALUE is a TOML literal or a plain string."),
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<recipe name>).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


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
        from simclr_cli.recipe import recipe_to_toml

        print("# resolved recipe\n" + recipe_to_toml(r), end="")


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
    except SimclrError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # outside a stage (they report their own stops, with what was kept)
        print(f"error: stopped by {stop.signal_name or 'SIGINT'}", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence for the user
        if debug:
            raise
        from simclr_cli.errors import from_os_error

        known = from_os_error(e) if isinstance(e, OSError) else None  # disk full, read-only, a file in the way
        if known is not None:
            print(f"error: {_one_line(known)}", file=sys.stderr)
            raise typer.Exit(known.exit_code) from None
        print(f"error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
        raise typer.Exit(1) from None


def _one_line(e: BaseException) -> str:
    """The message without the worker traceback that DataLoader bakes into re-raised errors."""
    text = str(e).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.splitlines())


@app.command(rich_help_panel=STAGES_PANEL)
def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/pretrain/state.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing pretrain run in OUT.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe or process count.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Contrastive pretraining on unlabeled images; writes OUT/pretrain/model.safetensors."""
    with _handled(debug):
        from simclr_cli.recipe import load_recipe
        from simclr_cli.stages import pretrain as stage

        r = load_recipe(recipe, set_ or [])
        _show_recipe(r)
        _check_out(out if out is not None else Path("runs") / r.name)
        summary = stage.run(r, out, resume=resume, overwrite=overwrite, force=force, show_progress=not quiet)
        if not quiet and summary is not None and _is_main_process():
            knn = summary.get("knn_top1")
            init = summary.get("knn_top1_init")
            extra = (f", kNN top-1 {knn:.2f}" + (f" (random init {init:.2f})" if init is not None else "")
                     if knn is not None else "")
            print(f"done: {summary['steps']} steps, {summary['images_per_sec']:.1f} img/s{extra}")


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _check_out(folder: Path) -> None:
    """Refuse an output folder that cannot be one before any work: a file in its place (or in the place of
    a parent), or a folder this user may not write into (exit 2)."""
    import os

    from simclr_cli.errors import UsageError

    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"output folder {folder}: {probe} is a file, not a folder; pass --out with a folder path, "
                         "or move the file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder}: {probe} is not writable; pass --out with a writable folder, "
                         "or fix its permissions")


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


def _str_set(key: str, value: str) -> str:
    """A ``--set`` string that keeps ``value`` a TOML string."""
    import json

    return f"{key}={json.dumps(value)}"


def _chain_inputs(source, recipe, set_, init, wants, out, quiet, resume_stage=None):
    """Resolve a stage's checkpoint, recipe and output directory (the chaining rules). ``resume_stage``
    (with --resume): the recipe is the one that stage saved in OUT/STAGE/recipe.toml, ``--set`` on top."""
    from simclr_cli.stages import common

    say = (lambda *a: None) if quiet or not _is_main_process() else print
    r = common.resume_recipe(Path(out) / resume_stage, recipe, set_) if resume_stage and out is not None else None
    src = common.find_source(source, wants, say=say,
                             required=init != "random" or (source is not None) or not (recipe or r))
    if resume_stage and r is None and out is None and src is not None:
        r = common.resume_recipe(common.output_dir(src, None, None, init) / resume_stage, recipe, set_)
    r = r or common.inherit_recipe(src, recipe, set_)
    _show_recipe(r)
    out_dir = common.output_dir(src, r, out, init)
    _check_out(out_dir)
    return src, r, out_dir


@app.command("linear-eval", rich_help_panel=STAGES_PANEL)
def linear_eval(
    source: SourceArg = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="cached (default): fit on features extracted once | "
                                                              "paper: crop+flip every epoch, 90 epochs")] = None,
    on: Annotated[Optional[str], typer.Option("--on", help="Probe h (default) or head:K, the output of the first "
                                                          "K projection-head layers.")] = None,
    init: InitOpt = "pretrained",
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: StageOutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Linear probe on the frozen encoder; writes OUT/linear_eval/ with top-1 and top-5."""
    with _handled(debug):
        from simclr_cli.stages import common
        from simclr_cli.stages import linear_eval as stage

        extra = ([_str_set("linear_eval.mode", mode)] if mode else []) + ([_str_set("linear_eval.on", on)] if on else [])
        src, r, out_dir = _chain_inputs(source, recipe, [*(set_ or []), *extra], init, ("pretrain",), out, quiet)
        summary = stage.run(r, src, out_dir, init=init, overwrite=overwrite, show_progress=not quiet)
        common.show_result(f"linear-eval ({summary.get('mode')}, {summary.get('on')}, {init})",
                           _pick(summary, "top1", "top5", "train_images", "test_images"), not quiet and _is_main_process())


@app.command("knn", rich_help_panel=STAGES_PANEL)
def knn(
    source: SourceArg = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Neighbours (default: knn.k, 200).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="Weights exp(sim/t) "
                                                                                   "(default: knn.temperature, 0.1).")] = None,
    init: InitOpt = "pretrained",
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: StageOutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Weighted kNN on L2-normalized h of the frozen encoder; writes OUT/knn/summary.json."""
    with _handled(debug):
        from simclr_cli.stages import common
        from simclr_cli.stages import knn as stage

        extra = ([f"knn.k={k}"] if k is not None else []) + ([f"knn.temperature={temperature!r}"] if temperature else [])
        src, r, out_dir = _chain_inputs(source, recipe, [*(set_ or []), *extra], init, ("pretrain",), out, quiet)
        summary = stage.run(r, src, out_dir, init=init, overwrite=overwrite, show_progress=not quiet)
        common.show_result(f"knn (k={summary.get('k')}, t={summary.get('temperature')}, {init})",
                           _pick(summary, "knn_top1", "knn_top5", "train_images", "test_images"),
                           not quiet and _is_main_process())


@app.command(rich_help_panel=STAGES_PANEL)
def finetune(
    source: SourceArg = None,
    labels: Annotated[Optional[str], typer.Option(
        "--labels", "-l", help="Labeled subset: 1%, 10%, any percentage, N-per-class, or a file with one image "
                               "name per line (default: finetune.labels, 10%).")] = None,
    from_head_layer: Annotated[Optional[int], typer.Option(
        "--from-head-layer", help="Keep the first K projection-head layers under the classifier (SimCLRv2: 1).")] = None,
    init: InitOpt = "pretrained",
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: StageOutOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/finetune/state, with the recipe it saved (no other options needed).")] = False,
    overwrite: OverwriteOpt = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Semi-supervised fine-tuning on a labeled subset; writes OUT/finetune/model.safetensors."""
    with _handled(debug):
        from simclr_cli.stages import common
        from simclr_cli.stages import finetune as stage

        extra = ([_str_set("finetune.labels", labels)] if labels else []) + (
            [f"finetune.from_head_layer={from_head_layer}"] if from_head_layer is not None else [])
        src, r, out_dir = _chain_inputs(source, recipe, [*(set_ or []), *extra], init, ("pretrain",), out, quiet,
                                        resume_stage=stage.STAGE if resume else None)
        summary = stage.run(r, src, out_dir, init=init, resume=resume, overwrite=overwrite, force=force,
                            show_progress=not quiet)
        common.show_result(f"finetune ({summary.get('labels')}, {init})",
                           _pick(summary, "top1", "top5", "labeled_images", "test_images"),
                           not quiet and _is_main_process())


@app.command(rich_help_panel=STAGES_PANEL)
def distill(
    source: Annotated[Optional[str], typer.Argument(
        help="Teacher: a run directory, run name or checkpoint with a classifier; default: the newest "
             "finetune checkpoint under ./runs.")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="timm backbone of the student "
                                                                     "(default: the teacher's, self-distillation).")] = None,
    student_init: Annotated[Optional[str], typer.Option(
        "--student-init", help="pretrained (the run's pretrain encoder, same architecture only) | random | auto.")] = None,
    hard: Annotated[Optional[bool], typer.Option("--hard/--soft", help="Hard pseudo-labels above --threshold, "
                                                                     "or the soft distillation loss (default).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="With --hard: minimum teacher "
                                                                           "confidence (default 0.9).")] = None,
    noisy: Annotated[Optional[bool], typer.Option("--noisy/--no-noisy", help="Color distortion and dropout "
                                                                          "on the student (Noisy Student).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Weight of distillation; 1 - alpha goes to "
                                                                   "cross-entropy on the finetune labeled subset.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="Distillation "
                                                                                   "temperature (default 1.0).")] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: StageOutOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/distill/state, with the recipe it saved (no other options needed).")] = False,
    overwrite: OverwriteOpt = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Teacher -> student self-training on unlabeled images; writes OUT/distill/model.safetensors."""
    with _handled(debug):
        from simclr_cli.stages import common
        from simclr_cli.stages import distill as stage

        extra = [s for s in (
            _str_set("distill.student", student) if student else None,
            _str_set("distill.student_init", student_init) if student_init else None,
            f"distill.hard={'true' if hard else 'false'}" if hard is not None else None,
            f"distill.threshold={threshold!r}" if threshold is not None else None,
            f"distill.noisy={'true' if noisy else 'false'}" if noisy is not None else None,
            f"distill.alpha={alpha!r}" if alpha is not None else None,
            f"distill.temperature={temperature!r}" if temperature is not None else None,
        ) if s]
        src, r, out_dir = _chain_inputs(source, recipe, [*(set_ or []), *extra], "pretrained", ("finetune",), out,
                                        quiet, resume_stage=stage.STAGE if resume else None)
        summary = stage.run(r, src, out_dir, resume=resume, overwrite=overwrite, force=force, show_progress=not quiet)
        common.show_result(f"distill ({summary.get('loss')})",
                           _pick(summary, "teacher_top1", "student_top1", "teacher_top5", "student_top5",
                                 "teacher_params", "student_params", "kept_images"),
                           not quiet and _is_main_process())


@app.command(rich_help_panel=STAGES_PANEL)
def transfer(
    source: SourceArg = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="One dataset: cifar10, cifar100, stl10, "
                                                   "food101, flowers102, oxford_pets, stanford_cars, fgvc_aircraft, "
                                                   "dtd, sun397, caltech101, voc2007, or imagefolder:PATH.")] = None,
    datasets: Annotated[Optional[str], typer.Option("--datasets", help="Several, comma-separated; one table "
                                                                       "side by side.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="linear (default): logistic regression on frozen "
                                                               "features | finetune: the whole network.")] = None,
    root: Annotated[Optional[str], typer.Option("--root", help="Folder holding the torchvision datasets "
                                                               "(default: transfer.root).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Let torchvision download missing datasets.")] = False,
    full_grid: Annotated[bool, typer.Option("--full-grid", help="The paper's grids: 45 L2 strengths, or "
                                                                "7 lr x 8 weight decays.")] = False,
    init: InitOpt = "pretrained",
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: StageOutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Transfer to other datasets (linear or fine-tuned); writes OUT/transfer/summary.json."""
    with _handled(debug):
        from simclr_cli.errors import UsageError
        from simclr_cli.stages import transfer as stage

        if dataset and datasets:
            raise UsageError("pass --dataset NAME or --datasets a,b,c, not both")
        names = dataset or datasets
        extra = [s for s in (
            _str_set("transfer.datasets", names) if names else None,
            _str_set("transfer.mode", mode) if mode else None,
            _str_set("transfer.root", root) if root else None,
            "transfer.download=true" if download else None,
            'transfer.l2_grid="paper"' if full_grid else None,
            'transfer.finetune_grid="paper"' if full_grid else None,
        ) if s]
        src, r, out_dir = _chain_inputs(source, recipe, [*(set_ or []), *extra], init, ("pretrain",), out, quiet)
        summary = stage.run(r, src, out_dir, init=init, overwrite=overwrite, show_progress=not quiet)
        if quiet is False and _is_main_process():
            print(f"all numbers: {out_dir / 'transfer' / 'summary.json'}")
        del summary


def _pick(summary: dict, *keys: str) -> dict:
    return {k: summary[k] for k in keys if k in summary}


RUNS_PANEL = "Runs"


@app.command(rich_help_panel=RUNS_PANEL)
def info(
    path: Annotated[Path, typer.Argument(help="A checkpoint (model.safetensors), a stage folder, or a run "
                                              "directory or name (its pretrain checkpoint, else its newest stage's).")],
    debug: DebugOpt = False,
) -> None:
    """Show a checkpoint's metadata, key recipe values and final metrics."""
    with _handled(debug):
        from rich.table import Table

        from simclr_cli.inspect_runs import checkpoint_info

        table = Table("field", "value", title=str(path), show_header=False)
        for k, v in checkpoint_info(path):
            table.add_row(k, v)
        _console().print(table)


@app.command(rich_help_panel=RUNS_PANEL)
def runs(
    root: Annotated[Path, typer.Option("--root", help="Folder holding the runs.")] = Path("runs"),
    debug: DebugOpt = False,
) -> None:
    """List the runs under ./runs: stages done, their key metrics, wall time."""
    with _handled(debug):
        from rich.table import Table

        from simclr_cli.inspect_runs import list_runs

        found = list_runs(root)
        if not found:
            print(f"no runs under {root}/ yet; start with: simclr pretrain quickstart")
            return
        table = Table("run", "stages done", "key metrics", "wall", title=f"runs under {root}/")
        for r in found:
            stages = ", ".join(r["stages"]) + (f" (interrupted: {', '.join(r['interrupted'])})" if r["interrupted"] else "")
            stages += f" (unreadable summary.json: {', '.join(r['unreadable'])})" if r.get("unreadable") else ""
            metrics = "  ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                                for k, v in r["metrics"].items() if v is not None)
            table.add_row(r["run"], stages, metrics, f"{r['wall_seconds']:.0f} s")
        _console().print(table)


@app.command(rich_help_panel=RUNS_PANEL)
def export(
    source: SourceArg = None,
    format_: Annotated[str, typer.Option("--format", help="Export format (timm).")] = "timm",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder to write (default RUN/export-timm).")] = None,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export the encoder as a timm folder: backbone-only model.safetensors + config.json."""
    with _handled(debug):
        from simclr_cli.errors import UsageError
        from simclr_cli.export import export_timm
        from simclr_cli.stages import common

        if format_ != "timm":
            raise UsageError(f"--format {format_}: only 'timm' is supported")
        # A run directory or nothing: its pretrain encoder; a stage folder or file: that checkpoint.
        src = common.find_source(source, ("pretrain",) if source is None else ("pretrain", "finetune", "distill"),
                                 say=print if _is_main_process() else (lambda *a: None))
        target = out or src.run_dir / "export-timm"
        _check_out(target)
        config = export_timm(src.checkpoint, target, overwrite=overwrite)
        print(f"wrote {target}/model.safetensors and config.json ({config['architecture']}, "
              f"{config['num_features']} features)")
        if config["simclr"]["cifar_stem"]:
            print(f"load with: simclr_cli.export.load_timm('{target}')  (CIFAR stem)")
        else:
            print(f"load with: timm.create_model('{config['architecture']}', pretrained=True, num_classes=0, "
                  f"pretrained_cfg_overlay=dict(file='{target}/model.safetensors'))")


@app.command(rich_help_panel=RUNS_PANEL)
def plot(
    source: SourceArg = None,
    embedding: Annotated[bool, typer.Option("--embedding", help="Also draw a 2-D map of h on the labeled val split, "
                                                                "coloured by label (paper Fig. B.4).")] = False,
    method: Annotated[str, typer.Option("--method", help="pca or tsne (for --embedding).")] = "pca",
    max_points: Annotated[int, typer.Option("--max-points", help="Points in the embedding map (a seeded sample).")] = 2000,
    debug: DebugOpt = False,
) -> None:
    """Write PNG figures into RUN/plots/: training curves, pretrained vs random init, and the embedding map."""
    with _handled(debug):
        from simclr_cli import plots
        from simclr_cli.stages import common

        src = common.find_source(source, ("pretrain",), say=print)
        written = plots.plot_curves(src.run_dir)
        cmp = plots.plot_comparison(src.run_dir)
        written += [cmp] if cmp else []
        if embedding:
            written.append(_embedding_plot(src, method, max_points))
        if not written:
            print(f"nothing to plot in {src.run_dir} yet")
        for p in written:
            print(f"wrote {p}")


def _embedding_plot(src, method: str, max_points: int):
    import torch

    from simclr_cli import plots
    from simclr_cli.engine.setup import make_accelerator
    from simclr_cli.evaluation.linear import predict
    from simclr_cli.stages import common

    recipe = common.inherit_recipe(src, None, [])
    splits = common.labeled_splits(recipe)
    g = torch.Generator().manual_seed(recipe.seed)
    idx = sorted(torch.randperm(len(splits.test), generator=g)[:max_points].tolist())
    accelerator = make_accelerator("no")
    encoder = common.load_encoder(src, recipe, "pretrained").backbone.to(accelerator.device)
    feats, labels = predict(encoder, common.eval_loader(splits.test, idx, recipe, accelerator), accelerator.device)
    coords = plots.project_2d(feats, method, recipe.seed)
    return plots.plot_embedding(coords, labels, splits.classes, src.run_dir / "plots" / f"embedding_{method}.png",
                                f"{src.run_dir.name}: h on {recipe.data.val_split} ({method}, {len(idx)} images)")


@app.command(rich_help_panel=RUNS_PANEL)
def embed(
    source: SourceArg = None,
    data: Annotated[str, typer.Option("--data", help="A split of the recipe's dataset (e.g. val, train), or a folder "
                                                     "of images (class folders or flat).")] = "val",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .npy, or a folder for <data>.npy "
                                                                    "(default RUN/embed/<data>.npy); a .csv with "
                                                                    "paths and labels goes beside it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output .npy and .csv.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Export h (the encoder's features) for a dataset to .npy, with a CSV of file paths and labels."""
    with _handled(debug):
        import csv

        import numpy as np

        from simclr_cli.data.loaders import build_source
        from simclr_cli.engine.setup import make_accelerator
        from simclr_cli.errors import DataError, UsageError
        from simclr_cli.evaluation.linear import predict
        from simclr_cli.stages import common

        src = common.find_source(source, ("pretrain", "finetune", "distill"), say=print)
        recipe = common.inherit_recipe(src, None, [])
        folder = Path(data).expanduser()
        if folder.is_dir():
            tag = folder.resolve().name or "root"
            build = lambda: _folder_source(folder)  # noqa: E731
        else:
            cfg = recipe.data
            splits = [s for s in dict.fromkeys(("train", cfg.train_split, "val", cfg.val_split)) if s]
            if _looks_like_path(data) or (cfg.dataset == "synthetic" and data not in splits):
                raise DataError(f"--data {data}: no such folder, and not a split of the run's {cfg.dataset} dataset; "
                                f"pass a split (e.g. {', '.join(splits)}) or an existing folder of images", missing=True)
            tag = data
            build = lambda: build_source(cfg, data, recipe.seed)  # noqa: E731
        target = _embed_target(out, src.run_dir, tag)
        table = target.with_suffix(".csv")
        existing = [p for p in (target, table) if p.exists()]
        if existing and not overwrite:
            raise UsageError(f"{existing[0]} exists; pass --overwrite to replace it, or --out to write elsewhere")
        _check_out(target.parent)
        source_images = build()
        accelerator = make_accelerator("no")
        encoder = common.load_encoder(src, recipe, "pretrained").backbone.to(accelerator.device)
        feats, labels = predict(encoder, common.eval_loader(source_images, None, recipe, accelerator),
                                accelerator.device)
        from simclr_cli.errors import from_os_error

        writing = target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, feats.numpy().astype(np.float32))
            writing = table
            # File names that are not valid UTF-8 are written back as the bytes they are (surrogateescape).
            with table.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                w = csv.writer(f)
                w.writerow(["row", "path", "label", "class"])
                for i, y in enumerate(labels.tolist()):
                    name = source_images.classes[y] if 0 <= y < len(source_images.classes) else ""
                    w.writerow([i, source_images.describe(i), y, name])
        except OSError as e:  # disk full, read-only: name the file
            err = from_os_error(e, writing)
            if err is None:
                raise
            raise err from e
        print(f"wrote {target} {tuple(feats.shape)} and {table}")


def _looks_like_path(text: str) -> bool:
    """A ``--data`` value meant as a folder rather than a split name (``./x``, ``~/x``, ``a/b``, ``/x``)."""
    import os

    return text.startswith((".", "~")) or "/" in text or os.sep in text or Path(text).is_absolute()


def _embed_target(out: Path | None, run_dir: Path, tag: str) -> Path:
    """Where ``embed`` writes: RUN/embed/<tag>.npy, inside ``--out`` when it is a folder, else ``--out``
    with ``.npy`` added when missing (what numpy would write anyway)."""
    if out is None:
        return run_dir / "embed" / f"{tag}.npy"
    target = Path(out).expanduser()
    if target.is_dir():
        return target / f"{tag}.npy"
    return target if target.suffix == ".npy" else target.with_name(target.name + ".npy")


def _folder_source(folder: Path):
    from simclr_cli.data.builders import folder_source

    return folder_source(folder)


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


@recipes_app.command("list")
def recipes_list() -> None:
    """List the bundled recipes."""
    with _handled():
        from rich import box
        from rich.console import Console
        from rich.table import Table

        from simclr_cli.recipe import bundled_recipe_names, load_recipe

        table = Table("name", "dataset", "backbone", "px", "batch", "epochs", "optimizer", "tau", box=box.SIMPLE)
        for name in bundled_recipe_names():
            r = load_recipe(name)
            p = r.pretrain
            table.add_row(name, r.data.dataset, r.model.backbone + (" (cifar stem)" if r.model.cifar_stem else ""),
                          str(r.data.image_size), str(p.batch_size), str(p.epochs),
                          f"{p.optimizer} {p.lr:g} ({p.lr_scaling})", f"{p.temperature:g}")
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # files and pipes: never truncate
        console.print(table)


@recipes_app.command("show")
def recipes_show(
    name: RecipeArg,
    resolved: Annotated[bool, typer.Option("--resolved", help="Show every key, defaults included.")] = False,
    set_: SetOpt = None,
) -> None:
    """Print a recipe's TOML (as written, or fully resolved)."""
    with _handled():
        from simclr_cli.recipe import load_recipe, recipe_to_toml, resolve_recipe_path

        if resolved or set_:
            print(recipe_to_toml(load_recipe(name, set_ or [])), end="")
        else:
            load_recipe(name)  # validate before showing
            print(resolve_recipe_path(name).read_text(encoding="utf-8-sig"), end="")


@recipes_app.command("validate")
def recipes_validate(file: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe file (and overrides) against the schema; exit 2 with the first problem."""
    with _handled():
        from simclr_cli.data.registry import pretraining_dataset
        from simclr_cli.models.backbone import check_backbone
        from simclr_cli.objectives import build_objective
        from simclr_cli.recipe import load_recipe, resolve_recipe_path
        from simclr_cli.recipe.loader import parse_override

        r = load_recipe(file, set_ or [])

        def origin(key: str) -> str:
            """Blame where a value came from: the last --set of it, else the file."""
            return next((f"--set {t}" for t in reversed(set_ or []) if parse_override(t)[0] == key),
                        str(resolve_recipe_path(file)))

        check_backbone(r.model.backbone, where=f"{origin('model.backbone')}: model.backbone")
        pretraining_dataset(r.data.dataset, where=f"{origin('data.dataset')}: data.dataset")
        build_objective(r.pretrain)
        print(f"ok: {resolve_recipe_path(file)} (name={r.name}, dataset={r.data.dataset}, backbone={r.model.backbone})")


@data_app.command("check")
def data_check(recipe: RecipeArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Decode every image of the recipe's splits; report unreadable files, class counts and sizes.

    Exits 1 when training would stop on unreadable images (more than data.max_bad_fraction).
    """
    with _handled(debug):
        from rich.console import Console
        from rich.table import Table

        from simclr_cli.data.check import check_recipe_data, would_abort
        from simclr_cli.errors import DataError
        from simclr_cli.recipe import load_recipe

        r = load_recipe(recipe, set_ or [])
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        aborting = []
        for rep in check_recipe_data(r):
            table = Table(title=f"{rep.split}: {rep.source}", show_header=True)
            table.add_column("class")
            table.add_column("images", justify="right")
            for name, n in rep.class_counts.items():
                table.add_row(name, str(n))
            if rep.unlabeled:
                table.add_row("(unlabeled)", str(rep.unlabeled))
            console.print(table)
            sizes = rep.size_stats()
            if sizes:
                hw = {k: f"{v[0]}x{v[1]}" for k, v in sizes.items() if k in ("smallest", "median", "largest")}
                console.print(f"sizes (h x w of real images, by area): smallest {hw['smallest']}, median {hw['median']}, "
                              f"largest {hw['largest']}; heights {sizes['height'][0]}..{sizes['height'][1]}, "
                              f"widths {sizes['width'][0]}..{sizes['width'][1]}")
            for name, err in rep.unreadable:
                console.print(f"unreadable: {name} ({err})", markup=False)
            bad = len(rep.unreadable)
            verdict = "training would stop" if would_abort(rep, r.data.max_bad_fraction) else "training would skip them"
            console.print(f"{rep.split}: {rep.images} images, {bad} unreadable"
                          + (f" ({100 * bad / max(rep.images, 1):.2f}%; {verdict})" if bad else ""))
            if would_abort(rep, r.data.max_bad_fraction):
                aborting.append(rep.split)
        if aborting:
            raise DataError(f"{', '.join(aborting)}: more than data.max_bad_fraction={r.data.max_bad_fraction} "
                            "of the images are unreadable; training would stop (they are listed above)")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="simclr")
