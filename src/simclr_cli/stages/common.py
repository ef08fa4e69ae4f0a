"""What every stage after ``pretrain`` shares: finding its input, inheriting the recipe,
guarding its output folder, the labeled splits, and the encoder it starts from.

Chaining rules: a stage takes a run directory (``runs/NAME``), a stage folder, or a
checkpoint file. With none, it takes the newest run under ``./runs`` that holds the
checkpoint it needs. It inherits the recipe stored in that checkpoint; an optional
recipe file (or bundled name) and ``--set`` overrides apply on top.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from simclr_cli.checkpoints import MODEL_FILE, has_state, load_weights, read_metadata, sub_state
from simclr_cli.data.pipeline.loaders import build_source
from simclr_cli.data.sources.builders import folder_layouts
from simclr_cli.data.sources.images import ImageSource, align_classes
from simclr_cli.data.sources.registry import pretraining_dataset
from simclr_cli.layout import RANDOM_INIT_DIR, RUNS_ROOT, STAGE_FOLDERS
from simclr_cli.errors import DataError, UsageError
from simclr_cli.models import SimCLRModel, build_simclr_model
from simclr_cli.objectives import build_objective
from simclr_cli.recipe import Recipe, TypedOverrides, parse_saved_toml, recipe_diff, recipe_from_dict
from simclr_cli.recipe.loader import read_toml, resolve_recipe_path
from simclr_cli.utils import atomic_write_text

if TYPE_CHECKING:
    from simclr_cli.engine.loop import LoopResult


@dataclass
class CheckpointRef:
    """A stage's input: a checkpoint file (``checkpoint``, None when the run has none yet), its run folder and
    its safetensors metadata (the recipe it was trained with, its stage)."""

    run_dir: Path
    checkpoint: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.metadata.get("simclr.stage", "")


def find_checkpoint(source: str | Path | None, wants: Sequence[str], *, runs_root: Path = RUNS_ROOT,
                    required: bool = True, say=print) -> CheckpointRef | None:
    """Resolve a stage's input to a checkpoint.

    Args:
        source: a run directory, a stage folder, a ``model.safetensors`` path, a run name
            under ``./runs``, or None for the newest run that has one of ``wants``.
        wants: stage folders whose checkpoint is acceptable, most preferred first.
        required: raise when nothing is found (else return None).
        say: where to report the run picked automatically.
    """
    need = " or ".join(f"{w}/{MODEL_FILE}" for w in wants)
    if source is None:
        found = [p for w in wants for p in runs_root.glob(f"*/{w}/{MODEL_FILE}")]
        if not found:
            if not required:
                return None
            step = {"finetune": "`simclr finetune --labels 10%` (after `simclr pretrain RECIPE`)"}.get(
                wants[0], "`simclr pretrain RECIPE`")
            raise UsageError(f"no run under ./{runs_root} has {need}; run {step} first, "
                             "or pass a run directory or checkpoint")
        ckpt = max(found, key=lambda p: p.stat().st_mtime)
        say(f"using {ckpt} (the newest under ./{runs_root})")
        return _checkpoint_ref(ckpt)
    path = Path(source).expanduser()
    if not path.exists() and len(path.parts) == 1 and (runs_root / path).is_dir():
        path = runs_root / path
    if path.is_file():
        return _checkpoint_ref(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file() and path.name in STAGE_FOLDERS:
            return _checkpoint_ref(path / MODEL_FILE)
        for w in wants:
            if (path / w / MODEL_FILE).is_file():
                return _checkpoint_ref(path / w / MODEL_FILE)
        present = [d.name for d in sorted(path.iterdir()) if d.is_dir()]
        if not required:
            return CheckpointRef(run_dir=path)
        raise UsageError(f"{path} has no {need} (it holds: {', '.join(present) or 'nothing'}); "
                         "finish that stage first or pass another run")
    raise UsageError(f"{source}: no such run directory or checkpoint")


def _checkpoint_ref(path: Path) -> CheckpointRef:
    try:
        meta = read_metadata(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UsageError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "simclr.recipe" not in meta:
        raise UsageError(f"{path}: not a simclr-cli checkpoint (no simclr.recipe metadata)")
    run_dir = path.parent.parent if path.parent.name in STAGE_FOLDERS else path.parent
    return CheckpointRef(run_dir=run_dir, checkpoint=path, metadata=meta)


def inherit_recipe(src: CheckpointRef | None, recipe_arg: str | None, overrides: Sequence[str],
                   values: TypedOverrides | None = None) -> Recipe:
    """The checkpoint's recipe, then the optional recipe file's keys on top, then ``--set``, then the typed
    ``values`` (command-line options; see :func:`~simclr_cli.recipe.load_recipe`)."""
    raw: dict = {}
    origin = "<defaults>"
    if src is not None and src.checkpoint is not None:
        origin = f"{src.checkpoint} (stored recipe)"
        raw = parse_saved_toml(src.metadata["simclr.recipe"], origin)
    if recipe_arg:
        path = resolve_recipe_path(recipe_arg)
        raw = _deep_merge(raw, read_toml(path))
        origin = str(path)
    elif src is None or src.checkpoint is None:
        raise UsageError("no checkpoint to inherit a recipe from; pass a run directory, or --recipe FILE")
    return recipe_from_dict(raw, source=origin, overrides=overrides, values=values)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def output_dir(src: CheckpointRef | None, recipe: Recipe, out: str | Path | None, init: str) -> Path:
    """``--out`` if given; else the run read from (``RUN/random_init`` for ``--init random``)."""
    if out is not None:
        return Path(out)
    run = src.run_dir if src is not None else RUNS_ROOT / recipe.name
    return run / RANDOM_INIT_DIR if init == "random" else run


def check_output(stage_dir: Path, stage: str, *, overwrite: bool, resume: bool = False, recipe: Recipe | None = None,
                 force: bool = False, resume_cmd: str = "", resumable_changes: frozenset[str] = frozenset()) -> None:
    """Never replace finished or interrupted work by accident; on resume, check the recipe still matches."""
    state_dir = stage_dir / "state"
    finished = (stage_dir / MODEL_FILE).exists() or (stage_dir / "summary.json").exists()
    interrupted = has_state(state_dir) and not finished
    if resume:
        if finished:
            raise UsageError(f"nothing to resume: {stage_dir} holds a finished run; use --overwrite to run it again")
        if not has_state(state_dir):
            raise UsageError(f"nothing to resume: {state_dir} has no saved state; start without --resume")
        saved_path = stage_dir / "recipe.toml"
        if recipe is None:
            return
        if not saved_path.is_file():
            if not force:
                raise UsageError(f"{saved_path} is missing, so the resumed recipe cannot be checked; "
                                 "pass --force to resume anyway")
            return
        saved = recipe_from_dict(parse_saved_toml(saved_path.read_text(), str(saved_path)), str(saved_path))
        changed = [k for k in recipe_diff(saved, recipe) if k not in resumable_changes]
        if changed and not force:
            raise UsageError(f"--resume with a different recipe than {saved_path} ({', '.join(changed)}); "
                             f"resume with that recipe: {resume_cmd} (or pass --force to resume with the new values)")
        return
    if (finished or interrupted) and not overwrite:
        what = "a finished" if finished else "an interrupted"
        todo = "" if finished or not resume_cmd else "--resume to continue it, "
        raise UsageError(f"{stage_dir} already holds {what} {stage} run; pass {todo}--overwrite to replace it, "
                         "or --out DIR to write elsewhere")


def resume_recipe(stage_dir: Path, recipe_arg: str | None, overrides: Sequence[str],
                  values: TypedOverrides | None = None) -> Recipe | None:
    """On ``--resume``: the recipe the interrupted run saved in ``STAGE_DIR/recipe.toml`` when it started,
    with an optional recipe file, ``--set`` and typed ``values`` on top (which :func:`check_output` then
    compares with it).
    None when there is no saved recipe (``check_output`` says what is missing)."""
    saved = Path(stage_dir) / "recipe.toml"
    if not saved.is_file():
        return None
    raw = parse_saved_toml(saved.read_text(), str(saved))
    if recipe_arg:
        raw = _deep_merge(raw, read_toml(resolve_recipe_path(recipe_arg)))
    return recipe_from_dict(raw, source=str(saved), overrides=overrides, values=values)


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class LabeledSplits:
    """The labeled train split (the labeled part of e.g. stl10 'train+unlabeled') and the test split,
    with class indices aligned by name."""

    train: ImageSource
    test: ImageSource
    train_indices: list[int]  # labeled items of ``train``
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), max(self.train.labels) + 1)


def labeled_splits(recipe: Recipe, *, test: bool = True, train_source: ImageSource | None = None,
                   required: bool = True) -> LabeledSplits | None:
    """Build the labeled splits the evaluation stages and the kNN monitor use: ``data.train_split`` (its
    labeled part) for training, ``data.val_split`` for testing.

    With ``data.labeled`` set, both come from that labeled image folder instead (:func:`labeled_elsewhere`).

    Args:
        test: also build the test split.
        train_source: ``data.train_split`` already built, reused when it is the same split (an in-memory
            image folder is then decoded once, not twice).
        required: raise when a labeled split is missing; with False return None instead (the monitor is off).
    """
    cfg = recipe.data
    if cfg.labeled:
        return labeled_elsewhere(cfg.labeled, recipe.seed)
    one_set = pretraining_dataset(cfg.dataset).one_set
    train_split = cfg.train_split.split("+")[0]  # stl10 "train+unlabeled": the labeled part
    same = train_source is not None and train_split == cfg.train_split
    if not required and test and not cfg.val_split:
        return None
    train = train_source if same else build_source(cfg, train_split, recipe.seed)
    labeled = [i for i, y in enumerate(train.labels) if y >= 0]
    if not labeled:
        if not required:
            return None
        raise DataError(f"{train.name} has no labels; {NEEDS_LABELS}", missing=True)
    if not test:
        return LabeledSplits(train, train, labeled, list(train.classes))
    if one_set:  # its "val split" would be the training images again
        if not required:
            return None
        raise DataError(f"{train.name} is one set of images with no held-out split; {NEEDS_LABELS}", missing=True)
    if not cfg.val_split:
        raise UsageError("data.val_split is empty; evaluation needs a labeled test split (e.g. --set data.val_split=test)")
    query = build_source(cfg, cfg.val_split, recipe.seed)
    align_classes(train, query)
    if not any(y >= 0 for y in query.labels):
        if not required:
            return None
        raise DataError(f"{query.name} has no labels; set data.val_split to a labeled split", missing=True)
    return LabeledSplits(train, query, labeled, list(train.classes))


NEEDS_LABELS = ("this stage needs labeled images, a train and a test set: point data.labeled at a labeled image "
                "folder (--set data.labeled=PATH, holding PATH/train/ and PATH/val/ of class folders, or "
                "PATH/<class>/<image>), or use a labeled dataset (e.g. --set data.dataset=imagefolder "
                "--set data.root=PATH with PATH/train/<class>/ and PATH/val/<class>/)")


def labeled_elsewhere(path: str, seed: int) -> LabeledSplits:
    """The labeled train and test splits of the image folder ``data.labeled`` names, in any of the layouts of
    ``imagefolder:PATH`` (:func:`simclr_cli.data.sources.builders.folder_layouts`); class folders alone are split
    half and half per class, seeded."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.labeled: {folder} is not a folder; point it at a labeled image folder "
                        "(PATH/train/ and PATH/val/ of class folders, or PATH/<class>/<image>)", missing=True)
    try:
        parts = folder_layouts("imagefolder", "", folder, download=False, split="0.5", seed=seed)
    except DataError as e:  # name the key the user set, not the transfer dataset syntax
        raise DataError(f"data.labeled: {e}", missing=True) from None
    align_classes(parts.train, parts.test)
    labeled = [i for i, y in enumerate(parts.train.labels) if y >= 0]
    if len(parts.train.classes) < 2 or not labeled or not any(y >= 0 for y in parts.test.labels):
        raise DataError(f"data.labeled: {folder} needs two or more class folders with images "
                        "(PATH/<class>/<image>, or PATH/train/<class>/ and PATH/val/<class>/)", missing=True)
    return LabeledSplits(parts.train, parts.test, labeled, list(parts.train.classes))


def load_encoder(src: CheckpointRef | None, recipe: Recipe, init: str) -> SimCLRModel:
    """f and g as the recipe describes them, with the source checkpoint's weights (``init='pretrained'``)
    or freshly initialized from the recipe seed (``init='random'``).

    The projection head is loaded only from pretrain checkpoints (later stages replace it).
    ``model.pretrained`` (timm's ImageNet weights) only ever applied to the start of pretraining: the
    random baseline never loads them, and the pretrained path takes every weight from the checkpoint.
    """
    if init not in ("pretrained", "random"):
        raise UsageError(f"--init must be 'pretrained' or 'random', got '{init}'")
    torch.manual_seed(recipe.seed)
    model = build_simclr_model(replace(recipe.model, pretrained=False), head=build_objective(recipe.pretrain).head,
                               image_size=recipe.data.image_size)
    if init == "random":
        return model
    if src is None or src.checkpoint is None:
        raise UsageError("--init pretrained needs a checkpoint; pass a run directory or use --init random")
    tensors, meta = load_weights(src.checkpoint)
    _load_strict(model.backbone, sub_state(tensors, "backbone"), src.checkpoint, "backbone")
    if meta.get("simclr.stage") == "pretrain":
        _load_strict(model.head, sub_state(tensors, "head"), src.checkpoint, "head")
    else:
        model.head = None  # type: ignore[assignment] - no projection head past pretraining
    return model


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, part: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UsageError(f"{path}: its {part} does not match the recipe's model ({first}); "
                         "do not override model.* keys when reading a checkpoint") from None


def parse_on(on: str, model: SimCLRModel) -> int:
    """``h`` -> 0, ``head:K`` -> K (the number of projection-head layers kept)."""
    if on == "h":
        return 0
    if on.startswith("head:") and on[5:].isdigit():
        k = int(on[5:])
        layers = head_layers(model)
        if model.head is None:
            raise UsageError(f"--on {on}: the checkpoint has no projection head (only pretrain checkpoints do)")
        if not 1 <= k <= len(layers):
            raise UsageError(f"--on {on}: the projection head has {len(layers)} layer(s); use head:1 to head:{len(layers)}")
        return k
    raise UsageError(f"--on {on}: expected 'h' or 'head:K', e.g. head:1")


def head_layers(model: SimCLRModel) -> list[nn.Module]:
    """The projection head's layers, as ``--from-head-layer`` and ``--on head:K`` count them."""
    head = model.head
    if head is None or isinstance(head, nn.Identity):
        return []
    return list(head.children())


def eval_loader(source: ImageSource, indices: list[int] | None, recipe: Recipe, accelerator, batch_size: int = 256,
                size: int | None = None, mark_unreadable: bool = False):
    """Un-augmented, labeled batches (resize + center crop for large images) of ``source`` or its ``indices``,
    at ``size`` (default ``data.image_size``): this process's share of them (:class:`ShardedBatches`), which
    ``evaluation.knn.extract_features`` and ``evaluation.linear.predict`` run on every process and gather.
    ``mark_unreadable``: see :class:`~simclr_cli.data.pipeline.loaders.EvalImages`."""
    from torch.utils.data import Subset

    from simclr_cli.data.pipeline.augment import EvalTransform
    from simclr_cli.data.pipeline.loaders import EvalImages, make_loader
    from simclr_cli.evaluation.sharded import ShardedBatches

    cfg = recipe.data
    ds = EvalImages(source, EvalTransform(size or cfg.image_size, cfg.mean, cfg.std), decode_draft=cfg.decode_draft,
                    mark_unreadable=mark_unreadable)
    if indices is not None and len(indices) < len(source):
        ds = Subset(ds, indices)
    shard = ShardedBatches(len(ds), batch_size, accelerator.process_index, accelerator.num_processes)
    return make_loader(ds, batch_sampler=shard, num_workers=cfg.num_workers,
                       pin_memory=accelerator.device.type == "cuda")


def test_topk(model: nn.Module, splits: LabeledSplits, recipe: Recipe, accelerator) -> tuple[dict[int, float], int] | None:
    """Top-1/top-5 of a classifier on the test split: every process predicts its share; the main process gets
    ``({1: top1, 5: top5}, test images)``, the others None."""
    from simclr_cli.evaluation.knn import topk_accuracy
    from simclr_cli.evaluation.linear import predict

    loader = eval_loader(splits.test, None, recipe, accelerator)
    out = predict(model.to(accelerator.device), loader, accelerator.device, accelerator.autocast, everywhere=False)
    if out is None:
        return None
    logits, labels = out
    return topk_accuracy(logits, labels, (1, 5)), len(labels)


def test_top1_during(splits: LabeledSplits, recipe: Recipe, accelerator, epochs: int, pick=lambda task: task.model,
                     points: int = 10):
    """``(evaluate, every)`` for :func:`~simclr_cli.engine.fit.fit`: the test top-1 of the classifier
    (``pick(task)``) about ``points`` times over ``epochs``, logged as ``test_top1`` for the curves."""
    def evaluate(task: nn.Module) -> dict[str, float]:
        was_training = task.training
        try:
            out = test_topk(pick(task), splits, recipe, accelerator)
        finally:  # the task's own train(): a frozen probe's encoder (and a teacher) stay in eval mode
            task.train(was_training)
        return {"test_top1": round(out[0][1], 4)} if out is not None else {}

    return evaluate, max(1, -(-epochs // points))


def training_numbers(result: LoopResult, t_start: float) -> dict[str, Any]:
    """The summary's numbers of a stage that trained through the loop: final loss, throughput, training seconds
    and wall seconds (``t_start``: when this invocation started; a resumed run's earlier time included)."""
    return {"final_loss": result.last.get("loss"), "images_per_sec": round(result.images_per_sec, 2),
            "train_seconds": round(result.train_seconds, 2),
            "wall_seconds": round(time.perf_counter() - t_start + result.wall_before, 2)}


def log_final(path: Path, main: bool, record: dict) -> None:
    """Append the stage's final numbers (e.g. the test top-1 after the last step) to its metrics.jsonl."""
    if main:
        with Path(path).open("a") as f:
            f.write(json.dumps(record) + "\n")


def frozen_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to prove afterwards that a frozen module did not change."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor], what: str) -> None:
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, snapshot[k])]
    if changed:
        raise RuntimeError(f"bug: the frozen {what} changed during training ({len(changed)} tensors, e.g. {changed[0]})")


def source_identity(src: CheckpointRef | None, init: str) -> dict[str, str]:
    """What a summary records of the checkpoint it measured: its resolved path and SHA-256 (``source_path``,
    ``source_sha256``); empty for ``--init random``. The model card matches summaries to a checkpoint by both."""
    if init == "random" or src is None or src.checkpoint is None:
        return {}
    from simclr_cli.utils import file_sha256

    return {"source_path": str(Path(src.checkpoint).resolve()), "source_sha256": file_sha256(src.checkpoint)}


def source_label(src: CheckpointRef | None, init: str) -> str:
    if init == "random":
        return "random init"
    return str(src.checkpoint) if src is not None and src.checkpoint is not None else "?"


def load_classifier(src: CheckpointRef, recipe: Recipe):
    """The classifier stored in a finetune (or linear-eval, distill) checkpoint, with its class names."""
    from simclr_cli.models.classifier import Classifier

    meta = src.metadata
    if meta.get("simclr.classifier") != "head":
        raise UsageError(f"{src.checkpoint}: a {src.stage or 'non-simclr'} checkpoint has no classifier; "
                         "use a finetune checkpoint (runs/NAME/finetune/model.safetensors)")
    num_classes, k = int(meta["simclr.num_classes"]), int(meta["simclr.head_layers"])
    classes = json.loads(meta.get("simclr.classes", "[]"))
    torch.manual_seed(recipe.seed)
    encoder = build_simclr_model(replace(recipe.model, pretrained=False),  # every weight comes from the checkpoint
                                 head=build_objective(recipe.pretrain).head, image_size=recipe.data.image_size)
    model = Classifier(encoder.backbone, head_layers(encoder)[:k], num_classes)
    tensors, _ = load_weights(src.checkpoint)
    _load_strict(model.backbone, sub_state(tensors, "backbone"), src.checkpoint, "backbone")
    _load_strict(model.head, sub_state(tensors, "head"), src.checkpoint, "classifier head")
    return model, classes


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
