"""The ``distill`` stage: SimCLRv2 self-training ([v2] eq. 2-3, SIMCLR.md section 3).

The teacher (a finetune checkpoint) labels the whole unlabeled training split once, on clean
images in eval mode; its logits are cached in ``OUT/distill/teacher_logits.safetensors``. A
student (the teacher's architecture, or any timm backbone with ``--student``) with a new linear
classifier learns from them with the distillation loss at temperature tau, optionally mixed
with cross-entropy on the finetune stage's labeled subset (``alpha``). ``--hard`` keeps only the
examples the teacher labels with confidence >= threshold, as hard pseudo-labels. ``--noisy`` adds
color distortion and dropout to the student (Noisy Student). Writes ``OUT/distill/``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from simclr_cli.checkpoints import (
    MODEL_FILE,
    load_weights,
    prefixed_state,
    read_metadata,
    save_weights,
    sub_state,
)
from simclr_cli.checkpoints.metadata import checkpoint_metadata, classifier_metadata
from simclr_cli.data.pipeline.augment import EvalTransform, SimCLRAugment, crop_flip_augment
from simclr_cli.data.pipeline.loaders import DistillViews, SubsetSource, build_source
from simclr_cli.data.sources.subsets import parse_label_spec, select_labeled
from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.setup import convert_sync_bn
from simclr_cli.engine.tasks import DistillTask
from simclr_cli.errors import UsageError
from simclr_cli.evaluation.linear import predict
from simclr_cli.losses.distill import confident_pseudo_labels
from simclr_cli.models import create_backbone
from simclr_cli.models.classifier import Classifier
from simclr_cli.recipe import Recipe
from simclr_cli.stages import common
from simclr_cli.stages.scaffold import StageRun, with_stage_run
from simclr_cli.utils import atomic_write_text, file_sha256

STAGE = "distill"
LOGITS_FILE = "teacher_logits.safetensors"
TEACHER_FILE = "teacher.json"  # the teacher checkpoint a run started with: its path and sha256
RESUMABLE_CHANGES = frozenset({"data.num_workers", "data.root", "data.download", "distill.log_every"})


@with_stage_run()
def run(
    recipe: Recipe,
    src: common.CheckpointRef,
    out_dir: str | Path,
    *,
    resume: bool = False,
    auto_resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    show_progress: bool = True,
    interrupt_after: int | None = None,
    stage_run: StageRun,
) -> dict[str, Any]:
    """Distill ``src``'s classifier into a student; returns the summary (also ``OUT/distill/summary.json``)."""
    cfg, data = recipe.distill, recipe.data
    out = Path(out_dir)
    import timm

    if cfg.student and not timm.is_model(cfg.student):
        raise UsageError(f"--student {cfg.student}: not a timm model name; see timm.list_models()")
    # The resume takes its recipe from OUT/distill/recipe.toml: no options or --set needed.
    resume_cmd = f"simclr distill {shlex.quote(str(src.checkpoint))} --out {shlex.quote(str(out))} --resume"
    accelerator = stage_run.open(recipe, out, STAGE, precision=(cfg.mixed_precision, "distill.mixed_precision"),
                                 resume_cmd=resume_cmd, show_progress=show_progress)
    resume = stage_run.check(overwrite=overwrite, resume=resume, force=force, resumable_changes=RESUMABLE_CHANGES,
                             auto_resume=auto_resume)
    if cfg.hard and not cfg.cache_teacher:
        raise UsageError("distill.hard needs the cached teacher logits (distill.cache_teacher=true) to pick examples")
    say, stage_dir = stage_run.say, stage_run.stage_dir
    teacher_record = {"checkpoint": str(Path(src.checkpoint).resolve()), "sha256": file_sha256(src.checkpoint)}
    if resume:
        _check_same_teacher(stage_dir, teacher_record, force=force, say=say)

    teacher, classes = common.load_classifier(src, recipe)
    student = _build_student(recipe, src, len(classes) or teacher.num_classes)
    splits = common.labeled_splits(recipe)

    # The unlabeled split: the whole training split, its labels hidden.
    train_all = build_source(data, data.train_split, recipe.seed)
    unlabeled = SubsetSource(train_all, list(range(len(train_all))))
    unlabeled.labels = [-1] * len(unlabeled)
    record_text = json.dumps(teacher_record, indent=1) + "\n"
    stage_run.start(overwrite=overwrite, resume=resume,
                    files={TEACHER_FILE: lambda path: atomic_write_text(path, record_text)})
    say(f"distill {src.checkpoint} ({recipe.model.backbone}, {common.count_parameters(teacher):,} params) -> "
        f"student {student.recipe.model.backbone} ({common.count_parameters(student.model):,} params, "
        f"{student.init}) on {len(unlabeled)} unlabeled images of {train_all.name} -> {stage_dir}")

    views, kept = _student_views(recipe, src, teacher, unlabeled, splits, accelerator, stage_dir, say)
    model, _ = convert_sync_bn(student.model, accelerator, cfg.sync_bn)
    task = DistillTask(model, temperature=cfg.temperature, alpha=cfg.alpha, hard=cfg.hard,
                       dropout=cfg.dropout if cfg.noisy else 0.0, teacher=None if cfg.cache_teacher else teacher)
    spec = FitSpec.from_section(cfg, data=data, seed=recipe.seed)
    evaluate, every = common.test_top1_during(splits, recipe, accelerator, cfg.epochs, pick=lambda t: t.student)
    task, result, batch = fit(accelerator, task, views, spec, evaluate=evaluate, evaluate_every=every,
                              **stage_run.training(resume=resume, interrupt_after=interrupt_after))
    return _report(stage_run, recipe, src, teacher, classes, student, task.student, splits, result, batch,
                   unlabeled_images=len(train_all), kept=kept)


class _Student(NamedTuple):
    model: Classifier
    recipe: Recipe  # the recipe that describes it
    init: str  # how it was initialized, in words


def _report(stage_run: StageRun, recipe: Recipe, src: common.CheckpointRef, teacher: Classifier, classes: list[str],
            student: _Student, trained: Classifier, splits: common.LabeledSplits, result, batch: int, *,
            unlabeled_images: int, kept: int | None) -> dict[str, Any]:
    """Teacher and student on the test split, the summary, and the student written as ``model.safetensors``."""
    cfg, accelerator = recipe.distill, stage_run.accelerator
    with stage_run.stop.immediately():  # the final state is saved: a resume runs only this test
        t_test = common.test_topk(teacher, splits, recipe, accelerator)
        s_test = common.test_topk(trained, splits, recipe, accelerator)
    if not stage_run.main:
        return stage_run.finish({})
    (t_acc, test_images), (s_acc, _) = t_test, s_test
    common.log_final(stage_run.stage_dir / "metrics.jsonl", stage_run.main,
                     {"step": result.step, "epoch": result.epoch, "test_top1": round(s_acc[1], 4)})
    summary = stage_run.summary(
        teacher=str(src.checkpoint), teacher_backbone=recipe.model.backbone,
        student_backbone=student.recipe.model.backbone, student_init=student.init,
        teacher_top1=round(t_acc[1], 4), teacher_top5=round(t_acc[5], 4),
        student_top1=round(s_acc[1], 4), student_top5=round(s_acc[5], 4),
        teacher_params=common.count_parameters(teacher), student_params=common.count_parameters(trained),
        loss="hard pseudo-labels" if cfg.hard else f"distillation (tau {cfg.temperature:g})",
        alpha=cfg.alpha, noisy=cfg.noisy, unlabeled_images=unlabeled_images,
        kept_images=kept if cfg.hard else unlabeled_images, epochs=cfg.epochs, steps=result.step,
        global_batch=batch, test_images=test_images, **common.training_numbers(result, stage_run.t_start),
    )
    metadata = {**checkpoint_metadata(student.recipe, trained, STAGE),
                **classifier_metadata(classes, trained.num_classes, 0, student.init)}
    tensors = {**prefixed_state("backbone", trained.backbone), **prefixed_state("head", trained.head)}
    return stage_run.finish(summary, tensors=tensors, metadata=metadata)


def _student_views(recipe: Recipe, src: common.CheckpointRef, teacher: Classifier, unlabeled: SubsetSource,
                   splits: common.LabeledSplits, accelerator, stage_dir: Path, say) -> tuple[DistillViews, int | None]:
    """The student's training views of ``unlabeled`` with their targets: the cached teacher logits (``hard``: the
    confident examples only, with their pseudo-labels), or clean images for the teacher to run on every step;
    the finetune stage's labeled subset mixed in when ``alpha < 1``. Returns the views and, with ``hard``, the
    number of examples kept."""
    cfg, data = recipe.distill, recipe.data
    targets = clean = None
    kept = None
    if cfg.cache_teacher:
        logits = _teacher_logits(teacher, src.checkpoint, unlabeled, recipe, accelerator, stage_dir, say)
        if cfg.hard:
            keep, labels = confident_pseudo_labels(logits, cfg.threshold)
            kept = len(keep)
            say(f"hard pseudo-labels: {kept} of {len(unlabeled)} examples ({100 * kept / len(unlabeled):.1f}%) have "
                f"teacher confidence >= {cfg.threshold}")
            if kept == 0:
                raise UsageError(f"no example reaches the teacher confidence threshold {cfg.threshold}; "
                                 "lower --threshold")
            unlabeled = SubsetSource(unlabeled, keep.tolist())
            targets = labels
        else:
            targets = logits
    else:
        clean = EvalTransform(data.image_size, data.mean, data.std)

    labeled = None
    if cfg.alpha < 1.0:
        labeled = _labeled_subset(src, splits)
        say(f"mixing in cross-entropy on {len(labeled)} labeled images (alpha {cfg.alpha})")
    if cfg.noisy:
        augment = SimCLRAugment(replace(recipe.augment, crop_scale=cfg.crop_scale), data.image_size, data.mean, data.std)
    else:
        augment = crop_flip_augment(recipe.augment, cfg.crop_scale, data.image_size, data.mean, data.std)
    plain = crop_flip_augment(recipe.augment, cfg.crop_scale, data.image_size, data.mean, data.std)
    views = DistillViews(unlabeled, augment, recipe.seed, targets=targets, clean=clean, labeled=labeled,
                         labeled_augment=plain)
    return views, kept


def _build_student(recipe: Recipe, src: common.CheckpointRef, num_classes: int) -> _Student:
    """The student classifier, the recipe that describes it, and how it was initialized."""
    cfg = recipe.distill
    name = cfg.student or recipe.model.backbone
    same = name == recipe.model.backbone
    pretrain_ckpt = src.run_dir / "pretrain" / MODEL_FILE
    if cfg.student_init == "pretrained":
        if not same:
            raise UsageError(f"--student-init pretrained: the pretrain encoder is a {recipe.model.backbone}, the student "
                             f"a {name}; use --student-init random for a different architecture")
        if not pretrain_ckpt.is_file():
            raise UsageError(f"--student-init pretrained: {pretrain_ckpt} does not exist")
    use_pretrained = same and pretrain_ckpt.is_file() and cfg.student_init in ("auto", "pretrained")
    torch.manual_seed(recipe.seed + 1)
    try:
        backbone = create_backbone(name, cifar_stem=recipe.model.cifar_stem, pretrained=False,
                                   image_size=recipe.data.image_size, where=f"--student {name}")
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError for unknown names
        raise UsageError(f"--student {name}: cannot create this timm model ({e})") from None
    note = "random"
    if use_pretrained:
        tensors, _ = load_weights(pretrain_ckpt)
        backbone.load_state_dict(sub_state(tensors, "backbone"), strict=True)
        note = f"pretrained ({pretrain_ckpt})"
    student_recipe = replace(recipe, model=replace(recipe.model, backbone=name, pretrained=False))
    return _Student(Classifier(backbone, [], num_classes), student_recipe, note)


def _teacher_logits(teacher: Classifier, teacher_path: Path, unlabeled, recipe: Recipe, accelerator, stage_dir: Path,
                    say) -> torch.Tensor:
    """Teacher logits on clean images of the whole unlabeled split, computed once (every process its share,
    gathered on the main process) and kept in the stage folder, so a resumed run reuses them.

    The cache records what made it (:func:`_logits_key`): the teacher checkpoint's content hash, the
    data and the transform. A cache made by anything else is recomputed, with a line saying why.
    """
    path = stage_dir / LOGITS_FILE
    key, compute = None, [False]
    if accelerator.is_main_process:
        key = _logits_key(teacher_path, unlabeled, recipe)
        stale = _stale_cache(path, key)
        if stale:
            say(f"{path} was made by {stale}; recomputing the teacher logits")
        compute = [bool(stale) or not path.is_file()]
    if accelerator.num_processes > 1:  # the main process decides; every process takes part in computing
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(compute)
    if compute[0]:
        t0 = time.perf_counter()
        loader = common.eval_loader(unlabeled, None, recipe, accelerator)
        out = predict(teacher.to(accelerator.device), loader, accelerator.device, accelerator.autocast,
                      everywhere=False)
        if accelerator.is_main_process:
            logits = out[0]
            save_weights(path, {"logits": logits}, {"simclr.kind": "teacher_logits",
                                                    **{f"simclr.{k}": v for k, v in key.items()}})
            say(f"teacher logits for {len(logits)} images in {time.perf_counter() - t0:.1f} s (cached in {path})")
    accelerator.wait_for_everyone()
    tensors, _ = load_weights(path)
    logits = tensors["logits"]
    if len(logits) != len(unlabeled):
        raise UsageError(f"{path} holds {len(logits)} teacher logits, the split has {len(unlabeled)} images; "
                         "run with --overwrite")
    return logits


def _check_same_teacher(stage_dir: Path, now: dict[str, str], *, force: bool, say) -> None:
    """A resume goes on with the teacher the run started with: another one (other bytes, wherever it lies) would
    mix two teachers' targets in one student, so it is refused (exit 2) unless ``force``. The record is
    ``STAGE_DIR/teacher.json``; a run from before it was written is checked against its cached logits' hash."""
    before = ""
    try:
        record = json.loads((stage_dir / TEACHER_FILE).read_text())
        if record.get("sha256") != now["sha256"]:
            before = f"{record.get('checkpoint')} (sha256 {str(record.get('sha256'))[:12]}...)"
    except (OSError, ValueError, AttributeError):
        try:
            old = read_metadata(stage_dir / LOGITS_FILE).get("simclr.teacher_sha256")
        except Exception:  # noqa: BLE001 - no cache either: nothing to compare with
            old = None
        if old and old != now["sha256"]:
            before = f"a teacher with sha256 {old[:12]}..."
    if not before:
        return
    what = (f"the teacher changed since {stage_dir} was started: it was {before}, now {now['checkpoint']} (sha256 "
            f"{now['sha256'][:12]}...)")
    if force:
        say(f"warning: {what}; --force: going on with the new teacher (its logits are computed again)")
        return
    raise UsageError(f"--resume: {what}. Resuming would train one student on two teachers' targets: resume with the "
                     "teacher checkpoint the run started with, start again with --overwrite, or pass --force to go on "
                     "with the new teacher")


def _logits_key(teacher_path: Path, unlabeled, recipe: Recipe) -> dict[str, str]:
    """What the cached logits depend on: the teacher's bytes, the images (in order) and the transform."""
    digest = file_sha256(teacher_path)
    names = hashlib.sha256("\n".join(unlabeled.describe(i) for i in range(len(unlabeled))).encode(
        "utf-8", "surrogateescape")).hexdigest()
    d = recipe.data
    data = {"dataset": d.dataset, "root": str(Path(d.root).expanduser().resolve()) if d.root else "",
            "split": d.train_split, "images": len(unlabeled), "names_sha256": names}
    transform = {"eval": "resize+center_crop", "image_size": d.image_size, "mean": list(d.mean), "std": list(d.std),
                 "mixed_precision": recipe.distill.mixed_precision}
    return {"teacher_sha256": digest, "data": json.dumps(data, sort_keys=True),
            "transform": json.dumps(transform, sort_keys=True)}


def _stale_cache(path: Path, key: dict[str, str]) -> str:
    """Empty when ``path`` is absent or was made with ``key``; else what made it, in words."""
    if not path.is_file():
        return ""
    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - a half-written or foreign file is simply recomputed
        return "an unreadable or foreign file"
    if meta.get("simclr.teacher_sha256") != key["teacher_sha256"]:
        old = meta.get("simclr.teacher_sha256")
        return f"another teacher (sha256 {old[:12]}...)" if old else "an unknown teacher (no hash recorded)"
    if meta.get("simclr.data") != key["data"]:
        return "the same teacher on other data"
    if meta.get("simclr.transform") != key["transform"]:
        return "the same teacher with another transform"
    return ""


def _labeled_subset(src: common.CheckpointRef, splits: common.LabeledSplits) -> SubsetSource:
    """The labeled images the finetune stage trained on, from its ``labels.txt``."""
    path = src.checkpoint.parent / "labels.txt"
    if not path.is_file():
        raise UsageError(f"distill.alpha < 1 mixes in the labeled subset, but {path} does not exist; "
                         "use a finetune checkpoint or distill.alpha=1")
    chosen = select_labeled(splits.train, parse_label_spec(str(path)), 0)
    return SubsetSource(splits.train, chosen)
