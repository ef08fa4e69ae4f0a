"""The run-folder layout and the one list of stages, shared by the stages, the CLI, ``simclr launch``, plots and
run inspection.

A run is ``runs/NAME/``; each stage writes ``RUN/<stage>/`` (``model.safetensors``, ``summary.json``,
``recipe.toml``, ``metrics.jsonl``, ``state/``); ``--init random`` baselines go to
``RUN/random_init/<stage>/``.

:data:`STAGES` is the stage registry: one entry per stage says its command, its run folder, whether
``simclr launch`` runs it, its help and the number ``simclr runs`` shows for it. Everything that lists the stages
reads it (:data:`STAGE_FOLDERS`, :data:`KEY_METRICS`, :data:`LAUNCHABLE`, the commands' names and help,
``simclr launch``'s list). This module imports nothing heavy: the CLI reads it before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RUNS_ROOT = Path("runs")
RANDOM_INIT_DIR = "random_init"  # default --out for --init random: RUN/random_init/<stage>/


@dataclass(frozen=True)
class Stage:
    """One entry of the stage registry."""

    name: str  # the command as typed: `simclr linear-eval`
    folder: Optional[str]  # RUN/<folder>/ with its checkpoint or summary (also stages/<folder>.py); None: none
    launchable: bool  # `simclr launch` runs it (its work is split over processes)
    help: str  # the command's help (its first line is the line in `simclr --help`)
    metric: Optional[str] = None  # the summary.json key `simclr runs` shows for it; None: none


# In the order of `simclr --help` and of `simclr launch`'s list.
STAGES: tuple[Stage, ...] = (
    Stage("pretrain", folder="pretrain", launchable=True, metric="knn_top1",
          help="Contrastive pretraining on unlabeled images; writes OUT/pretrain/model.safetensors."),
    Stage("linear-eval", folder="linear_eval", launchable=True, metric="top1",
          help="Linear probe on the frozen encoder; writes OUT/linear_eval/ with top-1 and top-5."),
    Stage("knn", folder="knn", launchable=True, metric="knn_top1",
          help="Weighted kNN on L2-normalized h of the frozen encoder; writes OUT/knn/summary.json."),
    Stage("finetune", folder="finetune", launchable=True, metric="top1",
          help="Semi-supervised fine-tuning on a labeled subset; writes OUT/finetune/model.safetensors."),
    Stage("distill", folder="distill", launchable=True, metric="student_top1",
          help="Teacher -> student self-training on unlabeled images; writes OUT/distill/model.safetensors."),
    Stage("transfer", folder="transfer", launchable=True,
          help="Transfer to other datasets (linear or fine-tuned); writes OUT/transfer/summary.json."),
    # Features of a finished run (RUN/embed/<data>.npy), no stage folder; listed with the run commands.
    Stage("embed", folder=None, launchable=True,
          help="Export h (the encoder's features) for a dataset to .npy, with a CSV of file paths and labels.\n"
               "Without RUN: the newest run's pretrain encoder."),
)

STAGE_FOLDERS: tuple[str, ...] = tuple(s.folder for s in STAGES if s.folder is not None)  # RUN/<folder>/
KEY_METRICS: dict[str, str] = {s.folder: s.metric for s in STAGES if s.folder and s.metric}  # folder -> key
LAUNCHABLE: tuple[str, ...] = tuple(s.name for s in STAGES if s.launchable)  # what `simclr launch STAGE` accepts


def stage(name: str) -> Stage:
    """The registry entry of the command ``name`` (``"linear-eval"``).

    Raises:
        KeyError: no stage has that name.
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)
