"""The recipe schema: frozen, typed dataclasses, one per TOML section.

Every field has a type, a default and a one-line meaning (the ``help`` metadata);
the recipe reference in the docs is generated from these, so keep them true.
Each stage reads only its own section plus the shared ones
(``[data]``, ``[augment]``, ``[model]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best in the schema
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def option(default, help: str, check: tuple[str, Callable[[Any], bool]] | None = None):  # noqa: A002
    """A field of an objective's options dataclass (``[pretrain.<objective>]``): default, one-line meaning, and
    optionally ``check = (what it must be, test)``, which the loader applies like :data:`RANGES`."""
    meta = {"help": help, **({"check": check} if check is not None else {})}
    return field(default=default, metadata=meta)


OBJECTIVE_SECTIONS: dict[str, type] = {}
"""Objective name -> its options dataclass, read from ``[pretrain.<name>]``. Filled by
:func:`simclr_cli.objectives.register`; an objective with no options registers none."""

MOVED_KEYS = {
    "pretrain.temperature": "pretrain.simclr.temperature",
    "pretrain.loss": "pretrain.simclr.loss",
    "pretrain.margin": "pretrain.simclr.margin",
}
"""Keys that moved to an objective's own section: using the old place is an error naming the new one."""


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where images come from and how they are fed."""

    dataset: str = _f("synthetic", "a pretraining dataset of the registry (data/sources/registry.py): synthetic | cifar10 | "
                                   "cifar100 | stl10 | imagefolder (labeled class folders) | folder (any folder of "
                                   "images, any depth, no labels) | filelist (a .txt or .csv list of image paths) | "
                                   "shards (a pack folder written by `simclr data pack`); see docs/extending.md to add one")
    root: str = _f("data", "dataset root; imagefolder: the folder holding the split folders; folder: the image "
                           "folder itself; filelist: the list file (paths relative to its folder, or absolute; a `.csv` is "
                           "`path[,label]` rows, or any columns under a header naming a `path` column and a `class` or "
                           "`label` column, like the CSV `simclr embed` writes; quoted paths may hold commas and "
                           "newlines; a path listed twice is warned about); shards: the pack folder (local or mounted)")
    train_split: str = _f("train", "split used for training (stl10: 'train+unlabeled' for pretraining)")
    val_split: str = _f("val", "labeled split for the kNN monitor and evaluation; '' for none")
    image_size: int = _f(32, "training resolution in pixels (square)")
    num_workers: int | Literal["auto"] = _f("auto", "DataLoader worker processes per training process; auto: from the "
                                                    "process's thread budget (the CPUs it may use: none on 1 CPU, "
                                                    "half of them on a CPU run, all but one with a GPU; docs/performance.md)")
    labeled: str = _f("", "a labeled image folder elsewhere for the kNN monitor and the stages that need labels "
                          "(linear-eval, finetune, knn, distill), used instead of train_split/val_split: "
                          "PATH/train/ and PATH/val/ (or test/) of class folders, or PATH/<class>/<image> (half of "
                          "each class held out, seeded); '' for the dataset's own splits")
    allow_missing: bool = _f(False, "filelist: train on the files that exist when the list names missing ones "
                                    "(with a warning giving the count); false: a list naming missing files is an error")
    listing_cache: str = _f("auto", "folder, imagefolder: where the listing of a folder is cached, so that a large "
                                    "tree is listed once (reused until a folder in it changes): auto ($SIMCLR_CACHE_DIR/"
                                    "index, else $XDG_CACHE_HOME or ~/.cache /simclr-cli/index; SIMCLR_CACHE_DIR=off "
                                    "turns it off) | off (list on every run) | a folder; see docs/data.md")
    download: bool = _f(False, "let torchvision download cifar10/cifar100/stl10 into root")
    max_bad_fraction: float = _f(0.01, "stop once more than this fraction of images are unreadable")
    in_memory: Literal["auto", "always", "never"] = _f(
        "auto", "imagefolder: decode every image once and keep it in memory as uint8 (auto: when it fits memory_limit_gb)")
    memory_limit_gb: float = _f(4.0, "in_memory='auto': the largest decoded dataset kept in memory")
    decode_draft: bool = _f(True, "decode a JPEG much larger than needed at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling): "
                                  "evaluation, embed, and training crops at least 2x the output side after the "
                                  "reduction (views within resampling noise of a full decode; docs/performance.md)")
    decode: Literal["cpu", "gpu"] = _f(
        "cpu", "pretraining: where JPEGs are decoded; gpu: whole batches with torchvision's nvJPEG on the CUDA "
               "device (needs augment.backend='batched'; falls back to cpu, with one line, without CUDA), an image "
               "it rejects is decoded on the CPU")
    synthetic_train_size: int = _f(4096, "synthetic: number of training images")
    synthetic_val_size: int = _f(1024, "synthetic: number of validation images")
    synthetic_classes: int = _f(10, "synthetic: number of classes (at most 10)")
    mean: tuple[float, float, float] = _f((0.485, 0.456, 0.406), "per-channel normalization mean")
    std: tuple[float, float, float] = _f((0.229, 0.224, 0.225), "per-channel normalization std")


@dataclass(frozen=True)
class AugmentConfig:
    """``[augment]``: the SimCLR view pipeline, SIMCLR.md section 2."""

    crop_scale: tuple[float, float] = _f((0.08, 1.0), "random resized crop: area range, fraction of the image")
    crop_ratio: tuple[float, float] = _f((0.75, 4 / 3), "random resized crop: aspect ratio range")
    flip_p: float = _f(0.5, "horizontal flip probability")
    strength: float = _f(1.0, "color distortion strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)")
    jitter_p: float = _f(0.8, "probability of applying color jitter")
    grayscale_p: float = _f(0.2, "probability of converting to grayscale")
    blur: bool = _f(True, "Gaussian blur on/off (off for 32 px CIFAR)")
    blur_p: float = _f(0.5, "blur probability when blur is on")
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "blur sigma range, uniform")
    blur_kernel_frac: float = _f(0.1, "blur kernel size as a fraction of the image side")
    backend: Literal["torchvision", "batched"] = _f(
        "batched", "batched: whole uint8 batches on the model's device, per-sample parameters (faster, the "
                   "default by measurement) | torchvision: per image in the loader (the reference)")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: encoder f (any timm model) and projection head g."""

    backbone: str = _f("resnet50", "timm model name; created with num_classes=0 (a fixed-input-size model such as "
                                   "a ViT is built for `data.image_size`, or refused with exit 2 when it cannot take "
                                   "that size)")
    cifar_stem: bool = _f(False, "ResNets: 3x3 stride-1 first conv and no max-pool (App. B.9)")
    pretrained: bool = _f(False, "start from timm's pretrained weights (downloads; off by default)")
    proj_layers: int = _f(2, "projection head: 0 identity, 1 linear, 2 MLP (v1), 3 MLP with BN (v2)")
    proj_hidden_dim: int = _f(0, "hidden width of the head; 0 means the encoder's feature dim")
    proj_dim: int = _f(128, "output dim of the head (z)")


OptimizerName = Literal["lars", "sgd", "adamw"]
LrScaling = Literal["linear", "sqrt", "none"]
LossName = Literal["nt_xent", "nt_logistic", "margin_triplet"]
Precision = Literal["no", "fp16", "bf16"]


@dataclass(frozen=True)
class PretrainConfig:
    """``[pretrain]``: contrastive pretraining, SIMCLR.md section 2."""

    epochs: int = _f(100, "training epochs")
    max_steps: int = _f(0, "cap on optimizer steps (0: no cap); warmup and cosine are fitted to the capped run")
    batch_size: int = _f(4096, "global batch size (images; each gives two views)")
    optimizer: OptimizerName = _f("lars", "lars | sgd | adamw")
    lr: float = _f(0.3, "base learning rate before lr_scaling")
    lr_scaling: LrScaling = _f("linear", "linear: lr*B/256 | sqrt: lr*sqrt(B) | none: lr")
    weight_decay: float = _f(1e-6, "weight decay (not applied to biases and BN)")
    momentum: float = _f(0.9, "momentum for lars and sgd")
    nesterov: bool = _f(False, "Nesterov momentum for sgd")
    trust_coefficient: float = _f(1e-3, "LARS trust coefficient eta")
    warmup_epochs: float = _f(10.0, "linear warmup length, then cosine decay to 0")
    objective: str = _f("simclr", "a registered objective (simclr_cli.objectives): simclr (the paper's contrastive "
                                  "loss) | supcon (supervised contrastive; needs labeled data) | any added one "
                                  "(docs/extending.md); its options are in its own section [pretrain.<objective>]")
    micro_batch_size: int = _f(0, "gradient cache: embed in chunks of this many images (full-batch loss, less memory; exact gradients without BN, per-chunk BN statistics with it); 0 off")
    sync_bn: bool = _f(True, "global BatchNorm across processes when there is more than one")
    mixed_precision: Precision = _f("no", "no | fp16 | bf16")
    channels_last: bool = _f(False, "channels_last memory format for model and inputs (faster convolutions on GPUs)")
    compile: bool = _f(False, "torch.compile the backbone (needs a C++ compiler; the first steps are slow)")
    knn_every: int = _f(10, "run the kNN monitor every this many epochs; 0 turns it off")
    knn_k: int = _f(200, "kNN monitor: neighbours")
    knn_temperature: float = _f(0.1, "kNN monitor: weights exp(sim / t)")
    log_every: int = _f(10, "write a metrics line every this many steps")
    on_nonfinite: Literal["stop", "skip"] = _f("stop", "non-finite loss/gradients: stop with an error, or skip the step")
    max_nonfinite_skips: int = _f(10, "with on_nonfinite='skip': stop after this many skipped steps in a row")
    collapse_warn: float = _f(0.1, "warn when the std of normalized z falls below this x 1/sqrt(d)")
    save_every: int = _f(1, "save resumable state every this many epochs")
    checkpoint_every: int = _f(0, "also save resumable state every this many steps; 0 off")
    keep_states: int = _f(2, "keep the newest this many saved states (at least 1)")
    options: Any = field(default=None, metadata={
        "help": "the selected objective's own options, the [pretrain.<objective>] section (e.g. [pretrain.simclr]); "
                "None: its defaults", "objective_section": True})

    def objective_summary(self) -> str:
        """The objective and its own options, e.g. ``simclr, loss nt_xent, temperature 0.5, ...`` (model card,
        ``simclr info``)."""
        if self.options is None or not fields(self.options):
            return self.objective
        return self.objective + ", " + ", ".join(f"{f.name} {getattr(self.options, f.name)}" for f in fields(self.options))


@dataclass(frozen=True)
class TrainingSection:
    """The training keys that the supervised stages' sections share (finetune, distill, linear-eval);
    :meth:`simclr_cli.engine.fit.FitSpec.from_section` turns a section into the loop's numbers.

    A section redeclares a key only where its default or meaning differs (it keeps its place). Field order is the
    order of docs/recipes.md and of a saved recipe.toml: a section lists its own keys first by naming their
    dataclass as its last base (dataclass fields follow the reversed MRO).
    """

    epochs: int = _f(30, "training epochs")
    batch_size: int = _f(256, "global batch size")
    lr: float = _f(0.1, "base learning rate, scaled by batch_size/256; cosine decay, Nesterov SGD")
    momentum: float = _f(0.9, "SGD momentum (Nesterov)")
    weight_decay: float = _f(0.0, "weight decay (not applied to biases and BN)")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "random resized crop area range")
    mixed_precision: Precision = _f("no", "no | fp16 | bf16")


@dataclass(frozen=True)
class ResumableTrainingSection(TrainingSection):
    """:class:`TrainingSection` for a stage that trains the encoder and keeps resume state (finetune, distill)."""

    sync_bn: bool = _f(True, "global BatchNorm across processes when there is more than one")
    log_every: int = _f(10, "write a metrics line every this many steps")
    save_every: int = _f(1, "save resumable state every this many epochs")
    keep_states: int = _f(2, "keep the newest this many saved states (at least 1)")


@dataclass(frozen=True)
class _LinearEvalKeys:
    mode: Literal["cached", "paper"] = _f(
        "cached", "cached: fit on features extracted once (minutes on CPU) | paper: crop+flip every epoch (App. B.6)")
    on: str = _f("h", "features to probe: 'h' (encoder output) or 'head:K' (after the first K projection-head layers)")


@dataclass(frozen=True)
class LinearEvalConfig(TrainingSection, _LinearEvalKeys):
    """``[linear_eval]``: a linear classifier on the frozen encoder, SIMCLR.md section 3."""

    epochs: int = _f(90, "training epochs over the train split")
    weight_decay: float = _f(0.0, "weight decay of the classifier")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "paper mode: random resized crop area range for training")
    mixed_precision: Precision = _f("no", "no | fp16 | bf16 (feature extraction and paper-mode training)")
    log_every: int = _f(50, "paper mode: write a metrics line every this many steps")


@dataclass(frozen=True)
class KnnConfig:
    """``[knn]``: weighted kNN evaluation of the frozen encoder on L2-normalized h."""

    k: int = _f(200, "neighbours")
    temperature: float = _f(0.1, "weights exp(sim / temperature); 0.1 for CIFAR, 0.07 for ImageNet")


@dataclass(frozen=True)
class _FinetuneKeys:
    labels: str = _f("10%", "labeled subset: 'P%' (class-balanced), 'N-per-class', or a file listing image names")
    from_head_layer: int = _f(0, "keep the first K projection-head layers under the classifier (SimCLRv2: 1)")


@dataclass(frozen=True)
class FinetuneConfig(ResumableTrainingSection, _FinetuneKeys):
    """``[finetune]``: semi-supervised fine-tuning on a labeled subset, SIMCLR.md section 3."""

    epochs: int = _f(0, "training epochs; 0: 60 for subsets up to 1%, 30 above (the paper)")
    batch_size: int = _f(256, "global batch size; lowered to the subset size when the subset is smaller")
    lr: float = _f(0.05, "base learning rate, scaled by batch_size/256; no warmup, cosine decay, Nesterov SGD")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "random resized crop area range (augmentation: crop and flip only)")


@dataclass(frozen=True)
class _DistillKeys:
    student: str = _f("", "timm backbone of the student; '' means the teacher's (self-distillation)")
    student_init: Literal["auto", "pretrained", "random"] = _f(
        "auto", "pretrained: the run's pretrain encoder (same architecture only) | random | auto: pretrained when it fits")
    temperature: float = _f(1.0, "distillation temperature tau: softmax(logits / tau) for teacher and student")
    alpha: float = _f(1.0, "weight of the distillation loss; (1 - alpha) x cross-entropy on the finetune labeled subset")
    hard: bool = _f(False, "hard pseudo-labels from the teacher, kept only where its confidence reaches threshold")
    threshold: float = _f(0.9, "hard: minimum teacher softmax probability to keep an example")
    noisy: bool = _f(False, "noise the student: color distortion ([augment] settings) and dropout (Noisy Student)")
    dropout: float = _f(0.5, "noisy: dropout on the student's features before the classifier")
    cache_teacher: bool = _f(True, "compute teacher logits once on clean images (half the cost); false: every step")


@dataclass(frozen=True)
class DistillConfig(ResumableTrainingSection, _DistillKeys):
    """``[distill]``: teacher -> student self-training on unlabeled images ([v2] eq. 2-3)."""

    epochs: int = _f(30, "training epochs over the unlabeled split")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "student random resized crop area range")


@dataclass(frozen=True)
class TransferConfig:
    """``[transfer]``: the 12-dataset transfer protocol ([v1] App. B.8, SIMCLR.md section 3)."""

    datasets: str = _f("cifar10", "comma-separated: cifar10, cifar100, stl10, food101, flowers102, oxford_pets, "
                                  "stanford_cars, fgvc_aircraft, dtd, sun397, caltech101, voc2007, imagefolder:PATH")
    root: str = _f("data", "folder holding the torchvision datasets")
    download: bool = _f(False, "let torchvision download the datasets into root")
    mode: Literal["linear", "finetune"] = _f("linear", "linear: logistic regression on frozen features | finetune")
    image_size: int = _f(0, "input side in pixels; 0 means data.image_size (the pretraining resolution)")
    val_fraction: float = _f(0.2, "validation split held out from train (stratified) where a dataset has none")
    split: str = _f("30-per-class", "imagefolder without split: 'N-per-class' for train (Caltech-101 protocol) "
                                    "or a train fraction such as '0.8'")
    l2_grid: Literal["coarse", "paper"] = _f("coarse", "linear: 12 (coarse) or the paper's 45 L2 strengths in [1e-6, 1e5]")
    max_iter: int = _f(500, "linear: L-BFGS iterations per fit")
    finetune_steps: int = _f(20000, "finetune: optimizer steps per fit (paper: 20k at batch 256)")
    batch_size: int = _f(256, "finetune: global batch size")
    finetune_grid: Literal["small", "paper"] = _f(
        "small", "finetune: lr x weight decay grid, small (2 x 2) or the paper's 7 lr x 8 wd")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "finetune: random resized crop area range")
    mixed_precision: Precision = _f("no", "no | fp16 | bf16")


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: top-level keys plus one dataclass per section."""

    name: str = _f("run", "run name; the default output folder is runs/<name>")
    seed: int = _f(0, "seed for initialization, augmentation and data order")
    trackers: str = _f("", "experiment trackers, comma-separated: tensorboard (events in <stage>/tensorboard), "
                           "mlflow (MLFLOW_TRACKING_URI, else <run>/mlruns), wandb (honours WANDB_MODE); each needs "
                           "its extra, e.g. pip install 'simclr-cli[mlflow]'. metrics.jsonl is always written")
    tracker_project: str = _f("simclr", "the trackers' project: MLflow experiment, W&B project (runs are named "
                                        "<name>/<stage>)")
    tensorboard: bool = _f(False, "same as adding tensorboard to trackers (kept for older recipes)")
    data: DataConfig = _f(DataConfig(), "data section")
    augment: AugmentConfig = _f(AugmentConfig(), "augmentation section")
    model: ModelConfig = _f(ModelConfig(), "model section")
    pretrain: PretrainConfig = _f(PretrainConfig(), "pretrain stage section")
    linear_eval: LinearEvalConfig = _f(LinearEvalConfig(), "linear-eval stage section")
    knn: KnnConfig = _f(KnnConfig(), "knn stage section")
    finetune: FinetuneConfig = _f(FinetuneConfig(), "finetune stage section")
    distill: DistillConfig = _f(DistillConfig(), "distill stage section")
    transfer: TransferConfig = _f(TransferConfig(), "transfer stage section")


def _prob(v) -> bool:
    return 0.0 <= v <= 1.0


def _range_pair(lo_min: float, hi_max: float | None):
    return lambda v: lo_min < v[0] <= v[1] and (hi_max is None or v[1] <= hi_max)


def _training_ranges(section: str, cls: type[TrainingSection]) -> dict:
    """The checks of the keys every :class:`TrainingSection` shares (batch, lr, momentum, weight decay, crop,
    logging; saving for a :class:`ResumableTrainingSection`)."""
    checks = {
        "batch_size": ("an integer >= 1", lambda v: v >= 1),
        "lr": ("a finite number > 0", lambda v: 0 < v < float("inf")),
        "momentum": ("a number in [0, 1)", lambda v: 0 <= v < 1),
        "weight_decay": ("a number >= 0", lambda v: 0 <= v < float("inf")),
        "crop_scale": ("[lo, hi] with 0 < lo <= hi <= 1", _range_pair(0.0, 1.0)),
        "log_every": ("an integer >= 1", lambda v: v >= 1),
    }
    if issubclass(cls, ResumableTrainingSection):
        checks["save_every"] = ("an integer >= 0", lambda v: v >= 0)
        checks["keep_states"] = ("an integer >= 1", lambda v: v >= 1)
    return {f"{section}.{k}": v for k, v in checks.items()}


def _folder_name(v: str) -> bool:
    """One plain path component: the run folder is runs/<name>, so no separators, no '.' or '..'."""
    return bool(v.strip()) and v not in (".", "..") and not any(c in v for c in "/\\\0")


# Value checks applied after types: dotted key -> (what it must be, predicate).
RANGES = {
    "name": ("a folder name (not empty, no '/' or '\\', not '.' or '..'), since runs go to runs/<name>",
             _folder_name),
    "seed": ("an integer from -2**63 to 2**63 - 1 (64-bit)", lambda v: -(2**63) <= v < 2**63),
    "trackers": ("a comma-separated list of tensorboard, mlflow, wandb (or empty)",
                 lambda v: all(t.strip().lower() in ("tensorboard", "mlflow", "wandb") for t in v.split(",") if t.strip())),
    "tracker_project": ("a non-empty name", lambda v: bool(v.strip())),
    "data.image_size": ("an integer >= 8", lambda v: v >= 8),
    "data.num_workers": ("an integer >= 0 or 'auto'", lambda v: v == "auto" or v >= 0),
    "data.max_bad_fraction": ("a number in [0, 1]", _prob),
    "data.memory_limit_gb": ("a number >= 0", lambda v: v >= 0),
    "data.synthetic_train_size": ("an integer >= 1", lambda v: v >= 1),
    "data.synthetic_val_size": ("an integer >= 1", lambda v: v >= 1),
    "data.synthetic_classes": ("an integer from 1 to 10", lambda v: 1 <= v <= 10),
    "data.std": ("three numbers > 0", lambda v: all(x > 0 for x in v)),
    "augment.crop_scale": ("[lo, hi] with 0 < lo <= hi <= 1", _range_pair(0.0, 1.0)),
    "augment.crop_ratio": ("[lo, hi] with 0 < lo <= hi", _range_pair(0.0, None)),
    "augment.flip_p": ("a probability in [0, 1]", _prob),
    "augment.strength": ("a number >= 0", lambda v: v >= 0),
    "augment.jitter_p": ("a probability in [0, 1]", _prob),
    "augment.grayscale_p": ("a probability in [0, 1]", _prob),
    "augment.blur_p": ("a probability in [0, 1]", _prob),
    "augment.blur_sigma": ("[lo, hi] with 0 < lo <= hi", _range_pair(0.0, None)),
    "augment.blur_kernel_frac": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "model.proj_layers": ("0, 1, 2 or 3", lambda v: v in (0, 1, 2, 3)),
    "model.proj_hidden_dim": ("an integer >= 0", lambda v: v >= 0),
    "model.proj_dim": ("an integer >= 1", lambda v: v >= 1),
    "pretrain.epochs": ("an integer >= 1", lambda v: v >= 1),
    "pretrain.max_steps": ("an integer >= 0", lambda v: v >= 0),
    "pretrain.batch_size": ("an integer >= 2", lambda v: v >= 2),
    "pretrain.micro_batch_size": ("an integer >= 0", lambda v: v >= 0),
    "pretrain.lr": ("a finite number > 0", lambda v: 0 < v < float("inf")),
    "pretrain.weight_decay": ("a number >= 0", lambda v: 0 <= v < float("inf")),
    "pretrain.momentum": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "pretrain.trust_coefficient": ("a number > 0", lambda v: v > 0),
    "pretrain.warmup_epochs": ("a number >= 0", lambda v: v >= 0),
    "pretrain.knn_every": ("an integer >= 0", lambda v: v >= 0),
    "pretrain.knn_k": ("an integer >= 1", lambda v: v >= 1),
    "pretrain.knn_temperature": ("a number > 0", lambda v: v > 0),
    "pretrain.log_every": ("an integer >= 1", lambda v: v >= 1),
    "pretrain.save_every": ("an integer >= 0", lambda v: v >= 0),
    "pretrain.checkpoint_every": ("an integer >= 0", lambda v: v >= 0),
    "pretrain.keep_states": ("an integer >= 1", lambda v: v >= 1),
    "pretrain.max_nonfinite_skips": ("an integer >= 0", lambda v: v >= 0),
    "pretrain.collapse_warn": ("a number >= 0", lambda v: v >= 0),
    "linear_eval.epochs": ("an integer >= 1", lambda v: v >= 1),
    **_training_ranges("linear_eval", LinearEvalConfig),
    "knn.k": ("an integer >= 1", lambda v: v >= 1),
    "knn.temperature": ("a number > 0", lambda v: 0 < v < float("inf")),
    "finetune.from_head_layer": ("an integer from 0 to 3", lambda v: 0 <= v <= 3),
    "finetune.epochs": ("an integer >= 0", lambda v: v >= 0),
    **_training_ranges("finetune", FinetuneConfig),
    "distill.temperature": ("a number > 0", lambda v: 0 < v < float("inf")),
    "distill.alpha": ("a number in [0, 1]", _prob),
    "distill.threshold": ("a probability in [0, 1]", _prob),
    "distill.dropout": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "distill.epochs": ("an integer >= 1", lambda v: v >= 1),
    **_training_ranges("distill", DistillConfig),
    "transfer.image_size": ("0 or an integer >= 8", lambda v: v == 0 or v >= 8),
    "transfer.val_fraction": ("a number in (0, 1)", lambda v: 0 < v < 1),
    "transfer.max_iter": ("an integer >= 1", lambda v: v >= 1),
    "transfer.finetune_steps": ("an integer >= 1", lambda v: v >= 1),
    "transfer.batch_size": ("an integer >= 1", lambda v: v >= 1),
    "transfer.crop_scale": ("[lo, hi] with 0 < lo <= hi <= 1", _range_pair(0.0, 1.0)),
}
