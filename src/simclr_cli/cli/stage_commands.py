"""The stage commands: pretrain, and one declaration per stage after it (:func:`~simclr_cli.cli.stage_base.
chained_stage_command` adds the options they share and runs ``stages.<stage>.run``). A stage's own options (``--k``,
``--labels``, ...) are typed recipe overrides, applied after ``--set``; the stage sees only the recipe. Names and
help come from the stage registry, :data:`simclr_cli.layout.STAGES`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from simclr_cli.cli import render
from simclr_cli.cli._app import (
    DebugOpt,
    OutOpt,
    QuietOpt,
    RecipeArg,
    SetOpt,
    handle_errors,
    is_main_process,
    show_resolved_recipe,
    stage_command,
)
from simclr_cli.cli.stage_base import (
    AutoResumeOpt,
    OwnOptions,
    chained_stage_command,
    check_auto_resume,
    result_table,
)
from simclr_cli.utils import check_out_folder


@stage_command("pretrain")
def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/pretrain/state.")] = False,
    auto_resume: AutoResumeOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing pretrain run in OUT.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept a changed recipe or process count.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The first stage: a recipe in, RUN/pretrain/ out (no checkpoint to chain from)."""
    with handle_errors(debug):
        from simclr_cli.recipe import load_recipe

        r = load_recipe(recipe, set_ or [])  # a misspelt name or key fails here, before torch is imported
        from simclr_cli.stages import pretrain as stage

        show_resolved_recipe(r)
        check_out_folder(out if out is not None else Path("runs") / r.name)
        check_auto_resume(auto_resume, overwrite)
        summary = stage.run(r, out, resume=resume, auto_resume=auto_resume, overwrite=overwrite, force=force,
                            show_progress=not quiet)
        if not quiet and summary is not None and is_main_process():
            print(render.pretrain_done(summary))


@chained_stage_command("linear-eval", report=result_table("linear-eval ({mode}, {on}, {init})",
                                                          "top1", "top5", "train_images", "test_images"))
def linear_eval(
    mode: Annotated[Optional[str], typer.Option("--mode", help="cached (default): fit on features extracted once | "
                                                              "paper: crop+flip every epoch, 90 epochs")] = None,
    on: Annotated[Optional[str], typer.Option("--on", help="Probe h (default) or head:K, the output of the first "
                                                          "K projection-head layers.")] = None,
) -> OwnOptions:
    return (("--mode", "linear_eval.mode", mode), ("--on", "linear_eval.on", on))


@chained_stage_command("knn", report=result_table("knn (k={k}, t={temperature}, {init})",
                                                  "knn_top1", "knn_top5", "train_images", "test_images"))
def knn(
    k: Annotated[Optional[int], typer.Option("--k", help="Neighbours (default: knn.k, 200).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="Weights exp(sim/t) "
                                                                                   "(default: knn.temperature, 0.1).")] = None,
) -> OwnOptions:
    return (("--k", "knn.k", k), ("--temperature", "knn.temperature", temperature))


@chained_stage_command("finetune", resumable=True, report=result_table(
    "finetune ({labels}, {init})", "top1", "top5", "labeled_images", "test_images"))
def finetune(
    labels: Annotated[Optional[str], typer.Option(
        "--labels", "-l", help="Labeled subset: 1%, 10%, any percentage, N-per-class, or a file with one image "
                               "name per line (default: finetune.labels, 10%).")] = None,
    from_head_layer: Annotated[Optional[int], typer.Option(
        "--from-head-layer", help="Keep the first K projection-head layers under the classifier (SimCLRv2: 1).")] = None,
) -> OwnOptions:
    return (("--labels", "finetune.labels", labels), ("--from-head-layer", "finetune.from_head_layer", from_head_layer))


TeacherArg = Annotated[Optional[str], typer.Argument(
    help="Teacher: a run directory, run name or checkpoint with a classifier; default: the newest "
         "finetune checkpoint under ./runs.")]


@chained_stage_command("distill", source=TeacherArg, wants=("finetune",), init=False, resumable=True,
                       report=result_table("distill ({loss})", "teacher_top1", "student_top1", "teacher_top5",
                                           "student_top5", "teacher_params", "student_params", "kept_images"))
def distill(
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
) -> OwnOptions:
    return (
        ("--student", "distill.student", student),
        ("--student-init", "distill.student_init", student_init),
        ("--hard" if hard else "--soft", "distill.hard", hard),
        ("--threshold", "distill.threshold", threshold),
        ("--noisy" if noisy else "--no-noisy", "distill.noisy", noisy),
        ("--alpha", "distill.alpha", alpha),
        ("--temperature", "distill.temperature", temperature),
    )


def _transfer_report(summary: Any, init: str, out_dir: Path) -> None:
    print(f"all numbers: {out_dir / 'transfer' / 'summary.json'}")


@chained_stage_command("transfer", report=_transfer_report)
def transfer(
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
) -> OwnOptions:
    from simclr_cli.errors import UsageError

    if dataset and datasets:
        raise UsageError("pass --dataset NAME or --datasets a,b,c, not both")
    return (
        ("--dataset" if dataset else "--datasets", "transfer.datasets", (dataset or datasets) or None),
        ("--mode", "transfer.mode", mode),
        ("--root", "transfer.root", root),
        ("--download", "transfer.download", True if download else None),  # a flag: never sets false
        ("--full-grid", "transfer.l2_grid", "paper" if full_grid else None),
        ("--full-grid", "transfer.finetune_grid", "paper" if full_grid else None),
    )
