"""The ``knn`` stage: weighted kNN on L2-normalized h of a frozen encoder (InstDisc protocol,
SIMCLR.md section 3), with the labeled train split as memory bank. The same code as the
pretrain monitor (``evaluation.knn``). Writes ``OUT/knn/summary.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from simclr_cli.engine.reporting import MetricsLog
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.evaluation.knn import extract_features, knn_scores, topk_accuracy
from simclr_cli.recipe import Recipe, recipe_to_toml
from simclr_cli.stages import common
from simclr_cli.utils import atomic_write_text

STAGE = "knn"


@common.guarded(immediate=True)
def run(
    recipe: Recipe,
    src: common.Source | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    overwrite: bool = False,
    show_progress: bool = True,
    guard: common.StageRun,
) -> dict[str, Any]:
    """kNN top-1/top-5 of ``src``'s encoder (or a random one); returns the summary."""
    t_start = time.perf_counter()
    k, t = recipe.knn.k, recipe.knn.temperature
    stage_dir = Path(out_dir) / STAGE
    guard.configure(stage_dir, STAGE, keeps_state=False)
    common.check_output(stage_dir, STAGE, overwrite=overwrite)
    accelerator = make_accelerator("no")
    main = accelerator.is_main_process
    splits = common.labeled_splits(recipe)
    encoder = common.load_encoder(src, recipe, init)
    summary: dict[str, Any] = {}
    guard.begin(overwrite=overwrite, accelerator=accelerator)  # the previous run is kept until this one finishes
    if main:
        atomic_write_text(stage_dir / "recipe.toml", recipe_to_toml(recipe))
        if show_progress:
            print(f"knn (k={k}, t={t:g}) of {common.source_label(src, init)}: {len(splits.train_indices)} bank / "
                  f"{len(splits.test)} query images -> {stage_dir}")
        device = accelerator.device
        backbone = encoder.backbone.to(device)
        bank = common.eval_loader(splits.train, splits.train_indices, recipe, accelerator)
        query = common.eval_loader(splits.test, None, recipe, accelerator)
        bank_f, bank_y = extract_features(backbone, bank, device, accelerator.autocast)
        q_f, q_y = extract_features(backbone, query, device, accelerator.autocast)
        acc = topk_accuracy(knn_scores(bank_f, bank_y, q_f, splits.num_classes, k, t), q_y, (1, 5))
        summary = {
            "stage": STAGE,
            "name": recipe.name,
            "init": init,
            "source": common.source_label(src, init),
            "backbone": recipe.model.backbone,
            "k": k,
            "temperature": t,
            "knn_top1": round(acc[1], 4),
            "knn_top5": round(acc[5], 4),
            "train_images": len(bank_y),
            "test_images": len(q_y),
            "num_classes": splits.num_classes,
            "wall_seconds": round(time.perf_counter() - t_start, 2),
        }
        MetricsLog(stage_dir / "metrics.jsonl", enabled=True).write(
            {"step": 0, "knn_top1": summary["knn_top1"], "knn_top5": summary["knn_top5"]})
        common.write_json(stage_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
