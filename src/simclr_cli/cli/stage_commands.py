"""The stage commands: each parses its options, resolves its inputs, calls ``stages.<stage>.run`` and prints
the result. A stage's own options (``--k``, ``--labels``, ...) are typed recipe overrides (:func:`_typed`),
applied after ``--set``; the stage sees only the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli.cli import render
from simclr_cli.cli._app import (
    STAGES_PANEL,
    DebugOpt,
    InitOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RecipeArg,
    RecipeOpt,
    SetOpt,
    SourceArg,
    StageOutOpt,
    _chain_inputs,
    _check_out,
    _handled,
    _is_main_process,
    _precheck,
    _show_recipe,
    _typed,
    app,
)


AutoResumeOpt = Annotated[bool, typer.Option(
    "--auto-resume", help="Continue OUT/STAGE/state when it holds an unfinished run with this recipe, else start "
                          "fresh. Implied under an elastic restart (torchrun --max-restarts) for the run that launch "
                          "started.")]


def _auto_resume(explicit: bool, overwrite: bool) -> None:
    """``--auto-resume`` with ``--overwrite`` is contradictory. The rule itself (stages.scaffold.auto_resume, also
    under an elastic restart) is applied by the stage's main process once the processes have met, and its decision
    holds for all of them (StageRun.check)."""
    from simclr_cli.errors import UsageError

    if explicit and overwrite:
        raise UsageError("--auto-resume continues the run in the stage folder, --overwrite replaces it: choose one")


@app.command(rich_help_panel=STAGES_PANEL)
def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/pretrain/state.")] = False,
    auto_resume: AutoResumeOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing pretrain run in OUT.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe or process count.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Contrastive pretraining on unlabeled images; writes OUT/pretrain/model.safetensors."""
    with _handled(debug):
        from simclr_cli.recipe import load_recipe

        r = load_recipe(recipe, set_ or [])  # a misspelt name or key fails here, before torch is imported
        from simclr_cli.stages import pretrain as stage

        _show_recipe(r)
        _check_out(out if out is not None else Path("runs") / r.name)
        _auto_resume(auto_resume, overwrite)
        summary = stage.run(r, out, resume=resume, auto_resume=auto_resume, overwrite=overwrite, force=force,
                            show_progress=not quiet)
        if not quiet and summary is not None and _is_main_process():
            print(render.pretrain_done(summary))


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
        _precheck(recipe, set_)
        from simclr_cli.stages import linear_eval as stage

        values = _typed(("--mode", "linear_eval.mode", mode), ("--on", "linear_eval.on", on))
        src, r, out_dir = _chain_inputs(source, recipe, set_ or [], init, ("pretrain",), out, quiet, values=values)
        summary = stage.run(r, src, out_dir, init=init, overwrite=overwrite, show_progress=not quiet)
        render.show_result(f"linear-eval ({summary.get('mode')}, {summary.get('on')}, {init})",
                           render.pick(summary, "top1", "top5", "train_images", "test_images"),
                           not quiet and _is_main_process())


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
        _precheck(recipe, set_)
        from simclr_cli.stages import knn as stage

        values = _typed(("--k", "knn.k", k), ("--temperature", "knn.temperature", temperature))
        src, r, out_dir = _chain_inputs(source, recipe, set_ or [], init, ("pretrain",), out, quiet, values=values)
        summary = stage.run(r, src, out_dir, init=init, overwrite=overwrite, show_progress=not quiet)
        render.show_result(f"knn (k={summary.get('k')}, t={summary.get('temperature')}, {init})",
                           render.pick(summary, "knn_top1", "knn_top5", "train_images", "test_images"),
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
    auto_resume: AutoResumeOpt = False,
    overwrite: OverwriteOpt = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Semi-supervised fine-tuning on a labeled subset; writes OUT/finetune/model.safetensors."""
    with _handled(debug):
        _precheck(recipe, set_)
        from simclr_cli.stages import finetune as stage

        values = _typed(("--labels", "finetune.labels", labels),
                        ("--from-head-layer", "finetune.from_head_layer", from_head_layer))
        src, r, out_dir = _chain_inputs(source, recipe, set_ or [], init, ("pretrain",), out, quiet,
                                        resume_stage=stage.STAGE if resume else None, values=values)
        _auto_resume(auto_resume, overwrite)
        summary = stage.run(r, src, out_dir, init=init, resume=resume, auto_resume=auto_resume, overwrite=overwrite,
                            force=force, show_progress=not quiet)
        render.show_result(f"finetune ({summary.get('labels')}, {init})",
                           render.pick(summary, "top1", "top5", "labeled_images", "test_images"),
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
    auto_resume: AutoResumeOpt = False,
    overwrite: OverwriteOpt = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Teacher -> student self-training on unlabeled images; writes OUT/distill/model.safetensors."""
    with _handled(debug):
        _precheck(recipe, set_)
        from simclr_cli.stages import distill as stage

        values = _typed(
            ("--student", "distill.student", student),
            ("--student-init", "distill.student_init", student_init),
            ("--hard" if hard else "--soft", "distill.hard", hard),
            ("--threshold", "distill.threshold", threshold),
            ("--noisy" if noisy else "--no-noisy", "distill.noisy", noisy),
            ("--alpha", "distill.alpha", alpha),
            ("--temperature", "distill.temperature", temperature),
        )
        src, r, out_dir = _chain_inputs(source, recipe, set_ or [], "pretrained", ("finetune",), out, quiet,
                                        resume_stage=stage.STAGE if resume else None, values=values)
        _auto_resume(auto_resume, overwrite)
        summary = stage.run(r, src, out_dir, resume=resume, auto_resume=auto_resume, overwrite=overwrite, force=force,
                            show_progress=not quiet)
        render.show_result(f"distill ({summary.get('loss')})",
                           render.pick(summary, "teacher_top1", "student_top1", "teacher_top5", "student_top5",
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
        _precheck(recipe, set_)
        from simclr_cli.errors import UsageError
        from simclr_cli.stages import transfer as stage

        if dataset and datasets:
            raise UsageError("pass --dataset NAME or --datasets a,b,c, not both")
        names = dataset or datasets
        values = _typed(
            ("--dataset" if dataset else "--datasets", "transfer.datasets", names or None),
            ("--mode", "transfer.mode", mode),
            ("--root", "transfer.root", root),
            ("--download", "transfer.download", True if download else None),  # a flag: never sets false
            ("--full-grid", "transfer.l2_grid", "paper" if full_grid else None),
            ("--full-grid", "transfer.finetune_grid", "paper" if full_grid else None),
        )
        src, r, out_dir = _chain_inputs(source, recipe, set_ or [], init, ("pretrain",), out, quiet, values=values)
        stage.run(r, src, out_dir, init=init, overwrite=overwrite, show_progress=not quiet)
        if quiet is False and _is_main_process():
            print(f"all numbers: {out_dir / 'transfer' / 'summary.json'}")
