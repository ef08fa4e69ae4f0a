"""The ``knn`` stage: weighted kNN on L2-normalized h of a frozen encoder (InstDisc protocol,
SIMCLR.md section 3), with the labeled train split as memory bank. The same code as the
pretrain monitor (``evaluation.knn``). Writes ``OUT/knn/summary.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simclr_cli.engine.reporting import MetricsLog
from simclr_cli.evaluation.knn import extract_features, knn_scores, topk_accuracy
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, with_stage_run

STAGE = "knn"


@with_stage_run(immediate=True)
def run(
    recipe: Recipe,
    src: common.CheckpointRef | None,
    out_dir: str | Path,
    *,
    init: str = "pretrained",
    overwrite: bool = False,
    show_progress: bool = True,
    stage_run: StageRun,
) -> dict[str, Any]:
    """kNN top-1/top-5 of ``src``'s encoder (or a random one); returns the summary."""
    k, t = recipe.knn.k, recipe.knn.temperature
    accelerator = stage_run.open(recipe, out_dir, STAGE, keeps_state=False, show_progress=show_progress)
    stage_run.check(overwrite=overwrite)
    splits = common.labeled_splits(recipe)
    encoder = common.load_encoder(src, recipe, init)
    stage_run.start(overwrite=overwrite)  # the previous run is kept until this one finishes
    stage_run.say(f"knn (k={k}, t={t:g}) of {common.source_label(src, init)}: {len(splits.train_indices)} bank / "
              f"{len(splits.test)} query images -> {stage_run.stage_dir}")
    device = accelerator.device
    backbone = encoder.backbone.to(device)
    # every process extracts its share of both splits; the main one gathers them and scores
    bank = extract_features(backbone, common.eval_loader(splits.train, splits.train_indices, recipe, accelerator),
                            device, accelerator.autocast, everywhere=False)
    query = extract_features(backbone, common.eval_loader(splits.test, None, recipe, accelerator), device,
                             accelerator.autocast, everywhere=False)
    if not stage_run.main:
        return stage_run.finish({})
    (bank_f, bank_y), (q_f, q_y) = bank, query
    acc = topk_accuracy(knn_scores(bank_f, bank_y, q_f, splits.num_classes, k, t, device=device), q_y, (1, 5))
    summary = stage_run.summary(
        init=init,
        source=common.source_label(src, init),
        **common.source_identity(src, init),
        backbone=recipe.model.backbone,
        k=k,
        temperature=t,
        knn_top1=round(acc[1], 4),
        knn_top5=round(acc[5], 4),
        train_images=len(bank_y),
        test_images=len(q_y),
        num_classes=splits.num_classes,
    )
    MetricsLog(stage_run.stage_dir / "metrics.jsonl", enabled=True).write(
        {"step": 0, "knn_top1": summary["knn_top1"], "knn_top5": summary["knn_top5"]})
    return stage_run.finish(summary)
