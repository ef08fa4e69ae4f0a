"""The run-folder layout, shared by the stages, the CLI, plots and run inspection.

A run is ``runs/NAME/``; each stage writes ``RUN/<stage>/`` (``model.safetensors``, ``summary.json``,
``recipe.toml``, ``metrics.jsonl``, ``state/``); ``--init random`` baselines go to
``RUN/random_init/<stage>/``.
"""

from __future__ import annotations

from pathlib import Path

STAGE_DIRS = ("pretrain", "linear_eval", "knn", "finetune", "distill", "transfer")
RUNS_ROOT = Path("runs")
RANDOM_INIT_DIR = "random_init"  # default --out for --init random: RUN/random_init/<stage>/
