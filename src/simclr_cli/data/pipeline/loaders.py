"""Datasets and loaders whose output is a pure function of (seed, epoch, sample index).

* :class:`GlobalBatchSampler` draws one global permutation per epoch from the seed
  and gives each process its slice of every global batch, so batch composition
  does not depend on the number of processes.
* :class:`ContrastiveViews` seeds each sample's augmentation from
  (seed, epoch, index), so views do not depend on ``num_workers`` either.
* Unreadable images are replaced by the next readable one (so batches keep
  their size), reported once by file name, and counted by the training loop: each item
  carries ``bad`` (the first unreadable index, or -1) and ``bad_run`` (how many consecutive
  indices from ``bad`` were unreadable), so every distinct unreadable file is counted.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


from simclr_cli.data.pipeline.augment import EvalTransform, SimCLRAugment
from simclr_cli.data.pipeline.batched import pack
from simclr_cli.data.pipeline.decode import DRAFT_MARGIN, crop_views, decode_bytes, decode_views, header_size
from simclr_cli.data.sources.images import ImageSource, MemorySource, SubsetSource, TensorSource, unreadable_reason
from simclr_cli.data.sources.registry import pretraining_dataset
from simclr_cli.errors import DataError, UsageError
from simclr_cli.recipe.schema import DataConfig
from simclr_cli.utils import mix_seed

_WARNED: set[str] = set()
_MAX_FALLBACK = 64


def build_source(cfg: DataConfig, split: str, seed: int) -> ImageSource:
    """The image source for ``split`` of the recipe's dataset (``data.dataset``, from the registry)."""
    if cfg.dataset != "synthetic" and not str(cfg.root).strip():
        # `--set data.root=$PHOTOS` with the variable unset: never train on whatever the current folder holds
        raise DataError(f"data.root is empty; point it at the {cfg.dataset} data (e.g. --set data.root=/path/to/images"
                        "; write data.root=. for the current folder)", missing=True)
    return pretraining_dataset(cfg.dataset).build_split(cfg, split, seed)


def load_with_fallback(source: ImageSource, index: int, load: Callable[[int], Any] | None = None
                       ) -> tuple[Any, int, int]:
    """Load ``index``; if unreadable, warn with its name and take the next readable sample.

    ``load(i)``: how to load sample ``i`` (default ``source.load``); any exception means unreadable.

    Returns:
        (image or what ``load`` returned, index actually used, index that failed or -1).
    """
    load = load or source.load
    bad = -1
    n = len(source)
    tries = min(_MAX_FALLBACK, n)
    for step in range(tries):
        i = (index + step) % n
        try:
            return load(i), i, bad
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
            name = source.describe(i)
            if bad < 0:
                bad = i
            if name not in _WARNED:
                _WARNED.add(name)
                print(f"warning: skipping unreadable image {name}: {unreadable_reason(e, name)}", file=sys.stderr,
                      flush=True)
    raise DataError(f"{source.name}: {tries} unreadable images in a row from {source.describe(index)}; check the dataset")


def bad_run(source: ImageSource, index: int, used: int, bad: int) -> int:
    """How many consecutive indices from ``bad`` (== ``index``) failed before ``used`` loaded: 0 when none did.

    :func:`load_with_fallback` tries ``index``, ``index + 1``, ... (mod n), so the unreadable ones are
    exactly ``bad, bad + 1, ..., used - 1`` (mod n); the training loop counts each of them.
    """
    return 0 if bad < 0 else (used - index) % len(source)


def known_unreadable(source: ImageSource | None) -> dict[int, str] | None:
    """Unreadable samples known before any training (index -> error): an image folder decoded into memory
    (``data.in_memory``) has tried every file. ``None`` when the source only finds out while loading."""
    if isinstance(source, MemorySource):
        return dict(source.errors)
    if isinstance(source, TensorSource):
        return {}
    if isinstance(source, SubsetSource):
        inner = known_unreadable(source.source)
        if inner is None:
            return None
        position = {j: k for k, j in enumerate(source.indices)}
        return {position[j]: err for j, err in inner.items() if j in position}
    return None


def check_known_unreadable(source: ImageSource | None, max_bad_fraction: float) -> None:
    """Abort before training when the failures already known (see :func:`known_unreadable`) pass the limit."""
    errors = known_unreadable(source)
    if not errors or len(errors) <= max_bad_fraction * len(source):
        return
    names = [source.describe(i) for i in sorted(errors)[:3]]
    raise DataError(
        f"{len(errors)} unreadable images, more than data.max_bad_fraction={max_bad_fraction} of {len(source)} "
        f"({source.name}, found while decoding into memory, before training): e.g. {', '.join(names)}. "
        "Fix or remove them (`simclr data check RECIPE` lists all), or raise data.max_bad_fraction"
    )


def data_fingerprint(source: ImageSource | None) -> str:
    """SHA-256 of the names of ``source``'s images in order (file paths, shard members, ``name[i]``): what a
    resume compares, since sample ``i`` must be the same image for the resumed run to be exact."""
    import hashlib

    if source is None:
        return ""
    h = hashlib.sha256(f"{len(source)}\0".encode())
    for i in range(len(source)):
        h.update(source.describe(i).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def require_labels(source: ImageSource, who: str) -> None:
    """Raise a DataError (exit 2) unless every image of ``source`` has a label; ``who`` names what needs them."""
    unlabeled = sum(1 for y in source.labels if y < 0)
    if unlabeled:
        raise DataError(f"{who} needs a label for every training image, but {unlabeled} of {len(source)} images of "
                        f"{source.name} have none; use labeled data (class folders, or a labeled split such as "
                        "data.train_split='train') or pretrain.objective='simclr'", missing=True)


class ContrastiveViews(Dataset):
    """Two independent SimCLR views per image; indexed by ``(epoch, index)``.

    Returns a dict with ``view1``, ``view2`` (float (3, S, S)), ``index`` and ``bad``
    (the index of an unreadable sample that was replaced, or -1); with ``labels=True`` also
    ``label``, the class of the image actually used (for objectives that need labels).

    ``decode_draft``: a source of encoded files (one with ``raw(i)``) decodes a large JPEG at a reduced
    size where both crop boxes allow it (:mod:`simclr_cli.data.pipeline.decode`); the parameter draws are the
    same as at full size. ``decode="gpu"`` (batched backend): items carry the encoded bytes (``jpeg``),
    the full-size ``size`` and the view parameters; :class:`~simclr_cli.data.pipeline.decode.DeviceDecoder`
    makes the views in the main process.
    """

    def __init__(self, source: ImageSource, augment: SimCLRAugment, seed: int, batched: bool = False,
                 labels: bool = False, decode_draft: bool = False, decode: str = "cpu",
                 draft_margin: float = DRAFT_MARGIN) -> None:
        self.source = source
        self.augment = augment
        self.seed = seed
        self.batched = batched
        self.labels = labels
        # Same-size in-memory images are cropped on the device; others are cropped here.
        self.crop_on_device = batched and isinstance(source, TensorSource)
        encoded = hasattr(source, "raw")
        self.decode_draft = decode_draft and encoded
        self.draft_margin = draft_margin
        self.device_decode = decode == "gpu" and batched and encoded and not self.crop_on_device

    def __len__(self) -> int:
        return len(self.source)

    def _generator(self, epoch: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, index = key
        if self.device_decode:
            return self._encoded(epoch, index)
        if self.batched:
            return self.cpu_item(epoch, index)
        if self.decode_draft:
            return self._drafted(epoch, index)
        img, used, bad = load_with_fallback(self.source, index)
        g = self._generator(epoch, index)
        return {"view1": self.augment(img, g), "view2": self.augment(img, g), "index": index, "bad": bad,
                "bad_run": bad_run(self.source, index, used, bad), **self._label(used)}

    def _label(self, used: int) -> dict[str, int]:
        return {"label": int(self.source.labels[used])} if self.labels else {}

    def cpu_item(self, epoch: int, index: int) -> dict[str, torch.Tensor | int]:
        """The batched backend's item as ``data.decode = "cpu"`` makes it: decoded at a reduced size where the
        crops allow with ``decode_draft`` (:meth:`_drafted`), else at full size (:meth:`cpu_views`). The device
        decoder's per-image fallback is this, so a fallback image gets exactly the CPU path's views."""
        return self._drafted(epoch, index) if self.decode_draft else self.cpu_views(epoch, index)

    def cpu_views(self, epoch: int, index: int) -> dict[str, torch.Tensor | int]:
        """The batched backend's item, decoded at full size on the CPU: the same parameter draws as the
        torchvision backend, the pixel work left to the device (``view1``/``view2`` uint8 crops, or the
        whole ``image`` for same-size in-memory images)."""
        img, used, bad = load_with_fallback(self.source, index)
        g = self._generator(epoch, index)
        h, w = img.shape[-2:]
        p1, p2 = self.augment.sample(g, h, w), self.augment.sample(g, h, w)
        item: dict[str, torch.Tensor | int] = {"params1": pack(p1), "params2": pack(p2), "index": index, "bad": bad,
                                               "bad_run": bad_run(self.source, index, used, bad), **self._label(used)}
        if self.crop_on_device:
            item["image"] = img
        else:
            item["view1"], item["view2"] = crop_views(img, [p1.crop, p2.crop], self.augment.size)
        return item

    def _drafted(self, epoch: int, index: int) -> dict[str, torch.Tensor | int]:
        """Crop boxes drawn on the header's full-size geometry, the JPEG decoded as small as they allow."""

        def draw(h: int, w: int):
            g = self._generator(epoch, index)  # fresh per attempt: the draws of the image used are today's
            return self.augment.sample(g, h, w), self.augment.sample(g, h, w)

        def attempt(i: int):
            raw = self.source.raw(i)  # type: ignore[attr-defined]
            return decode_views(raw, draw, lambda p: (p[0].crop, p[1].crop),
                                self.augment.size, self.draft_margin)

        ((p1, p2), (c1, c2)), used, bad = load_with_fallback(self.source, index, attempt)
        item: dict[str, torch.Tensor | int] = {"index": index, "bad": bad,
                                               "bad_run": bad_run(self.source, index, used, bad), **self._label(used)}
        if self.batched:
            item.update(params1=pack(p1), params2=pack(p2), view1=c1, view2=c2)
        else:  # the crops are done: the rest of the reference pipeline on the already cropped views
            whole = (0, 0, self.augment.size, self.augment.size)
            item.update(view1=self.augment.apply(c1, replace(p1, crop=whole)),
                        view2=self.augment.apply(c2, replace(p2, crop=whole)))
        return item

    def _encoded(self, epoch: int, index: int) -> dict[str, Any]:
        """Encoded bytes and view parameters drawn on the header's geometry, for the device decoder."""

        def attempt(i: int):
            raw = self.source.raw(i)  # type: ignore[attr-defined]
            return raw, header_size(raw)

        (raw, (h, w, orientation)), used, bad = load_with_fallback(self.source, index, attempt)
        g = self._generator(epoch, index)
        p1, p2 = self.augment.sample(g, h, w), self.augment.sample(g, h, w)
        return {"jpeg": raw, "size": torch.tensor([h, w, orientation]), "epoch": epoch, "params1": pack(p1),
                "params2": pack(p2), "index": index, "bad": bad, "bad_run": bad_run(self.source, index, used, bad),
                **self._label(used)}


UNREADABLE = -2  # EvalImages(mark_unreadable=True): the label of a row whose own image could not be read


class EvalImages(Dataset):
    """Un-augmented images with labels, for feature extraction.

    An unreadable image is replaced by the next readable one (with its label), which suits evaluation;
    ``mark_unreadable``: such a row's label is :data:`UNREADABLE` instead, for outputs that name every
    image (``simclr embed``), where another image's features under this one's name would be wrong."""

    def __init__(self, source: ImageSource, transform: EvalTransform, decode_draft: bool = False,
                 draft_margin: float = DRAFT_MARGIN, mark_unreadable: bool = False) -> None:
        self.source = source
        self.transform = transform
        self.mark_unreadable = mark_unreadable
        # A large JPEG is decoded with its shorter side still >= draft_margin x the resize target.
        self.min_side = int(draft_margin * transform.resize_to) if decode_draft and hasattr(source, "raw") else None

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> torch.Tensor:
        return decode_bytes(self.source.raw(i), min_side=self.min_side)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        img, used, bad = load_with_fallback(self.source, index, self._load if self.min_side else None)
        label = UNREADABLE if self.mark_unreadable and used != index else self.source.labels[used]
        return {"image": self.transform(img), "label": label, "index": index, "bad": bad,
                "bad_run": bad_run(self.source, index, used, bad)}


class LabeledViews(Dataset):
    """One augmented view with its label per sample; indexed by ``(epoch, index)`` like
    :class:`ContrastiveViews`, so views are a pure function of (seed, epoch, index)."""

    def __init__(self, source: ImageSource, augment: SimCLRAugment, seed: int) -> None:
        self.source = source
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, index = key
        img, used, bad = load_with_fallback(self.source, index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, "labeled", epoch, index))
        return {"image": self.augment(img, g), "label": self.source.labels[used], "index": index, "bad": bad,
                "bad_run": bad_run(self.source, index, used, bad)}


class DistillViews(Dataset):
    """Unlabeled images for distillation, indexed by ``(epoch, index)``.

    Each item has the student's ``image`` (an augmented view) and, where given, ``target`` (the
    cached teacher logits or hard pseudo-label of the image actually used), ``clean`` (the
    un-augmented image, for a teacher run every step), and a labeled pair ``limage``/``label``
    drawn from ``labeled`` by (seed, epoch, index). The unlabeled source's labels are never read.
    """

    def __init__(self, source: ImageSource, augment: SimCLRAugment, seed: int, *, targets: torch.Tensor | None = None,
                 clean: EvalTransform | None = None, labeled: ImageSource | None = None,
                 labeled_augment: SimCLRAugment | None = None) -> None:
        self.source = source
        self.augment = augment
        self.seed = seed
        self.targets = targets
        self.clean = clean
        self.labeled = labeled
        self.labeled_augment = labeled_augment or augment

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        epoch, index = key
        img, used, bad = load_with_fallback(self.source, index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, "distill", epoch, index))
        item: dict[str, torch.Tensor | int] = {"image": self.augment(img, g), "index": index, "bad": bad,
                                               "bad_run": bad_run(self.source, index, used, bad)}
        if self.targets is not None:
            item["target"] = self.targets[used]
        if self.clean is not None:
            item["clean"] = self.clean(img)
        if self.labeled is not None:
            j = int(torch.randint(len(self.labeled), (), generator=g))
            limg, lused, _ = load_with_fallback(self.labeled, j)
            item["limage"] = self.labeled_augment(limg, g)
            item["label"] = self.labeled.labels[lused]
        return item


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Slices of a seeded global permutation: batch ``b`` of process ``rank`` is
    ``perm[b*B + rank*B/K : b*B + (rank+1)*B/K]`` for global batch B and K processes.

    ``drop_last=True`` (pretraining: contrastive batches stay full): the last incomplete global batch
    is dropped, ``floor(n/B)`` batches. ``drop_last=False`` (the supervised stages): ``ceil(n/B)``
    batches, the last one filled up to B with the first images of the same epoch's permutation, so
    every image is seen every epoch, every batch has B images and each process still gets B/K of it
    (the order stays a pure function of seed, epoch and index, whatever the number of processes).
    ``set_epoch`` picks the permutation; ``start_batch`` skips batches already done (exact resume).
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        if global_batch % world_size:
            raise UsageError(
                f"batch_size={global_batch} does not divide evenly over {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        if num_samples < global_batch:
            raise UsageError(
                f"the dataset has {num_samples} images, fewer than one global batch of {global_batch}; "
                "lower batch_size"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_samples, self.global_batch, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, "order", self.epoch))
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        nb = self.batches_per_epoch
        perm += perm[: nb * self.global_batch - self.num_samples]  # drop_last=False: fill the last batch
        for b in range(self.start_batch, nb):
            lo = b * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, i) for i in perm[lo : lo + self.local_batch]]


def batches_per_epoch(num_samples: int, global_batch: int, drop_last: bool) -> int:
    """Steps per epoch of :class:`GlobalBatchSampler`: floor(n/B) with ``drop_last``, else ceil(n/B)."""
    return num_samples // global_batch if drop_last else -(-num_samples // global_batch)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: ignore SIGINT, and SIGTERM from anyone but the main process; die with it.

    Schedulers signal every process of a job (SLURM's ``scancel``, preemption and time limit, ``timeout``,
    ``docker stop``, ``kill -- -PGID``), DataLoader workers included. A worker that died of it would make the main
    process fail at its next batch (``DataLoader worker (pid N) is killed by signal: Terminated``) before it could
    save its state; ignoring the signal leaves the stop to the main process (state saved at the next step, exit
    130), which then shuts its workers down as usual. A worker whose main process is gone (SIGKILL, OOM) is killed
    by the kernel (Linux ``PR_SET_PDEATHSIG``), besides torch's own check of its parent.

    A SIGTERM that the main process itself sends still ends the worker: Python's exit (``multiprocessing``
    terminates daemonic children, then joins them) and DataLoader's own shutdown of a stuck worker use it, and a
    worker that ignored it would hang its main process at exit for good. The sender is told apart with
    ``sigwaitinfo`` on a thread that alone receives SIGTERM; where that is missing (not Linux), SIGTERM is
    left as it is.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        import os
        import threading

        main = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit it

        def from_whom() -> None:
            while True:
                info = signal.sigwaitinfo({signal.SIGTERM})
                if info.si_pid == main:
                    os._exit(0)  # the main process asked for it: not a failure its SIGCHLD handler should report

        threading.Thread(target=from_whom, name="sigterm-from-main", daemon=True).start()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def make_loader(
    dataset: Dataset,
    *,
    num_workers: int | str,
    pin_memory: bool,
    batch_sampler: Sampler | None = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader with the settings we want everywhere (persistent workers, prefetch, and workers that leave
    SIGINT and SIGTERM to the main process: :func:`worker_ignores_stop_signals`).

    ``num_workers``: a count, or ``"auto"`` for one from the process's thread budget
    (:mod:`simclr_cli.threads`); with workers, the main process's intra-op threads leave them their CPUs."""
    from simclr_cli import threads

    num_workers = threads.resolve_workers(num_workers, gpu=pin_memory)
    kwargs: dict = {}
    if num_workers > 0:
        threads.leave_room_for_workers(num_workers)
        kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=worker_ignores_stop_signals)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                          collate_fn=collate_fn, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, **kwargs)
