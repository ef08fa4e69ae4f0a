"""``simclr data check``: scan a recipe's dataset before hours are spent on it."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from simclr_cli import threads
from simclr_cli.data.pipeline.loaders import build_source
from simclr_cli.data.sources.images import ImageSource, unreadable_reason
from simclr_cli.data.sources.registry import pretraining_dataset
from simclr_cli.recipe.schema import Recipe


@dataclass
class SplitReport:
    """What a scan of one split found."""

    split: str
    source: str
    images: int
    class_counts: dict[str, int]
    unlabeled: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (name, error)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)

    def size_stats(self) -> dict[str, tuple[int, int]]:
        """Sizes of real images, as (h, w): the ``smallest``, ``median`` and ``largest`` by area (ties by h, w; the
        median is the lower middle one), plus the ranges of heights and widths on their own (``height``,
        ``width``: (min, max)), which may come from different images."""
        if not self.heights:
            return {}
        by_area = sorted(zip(self.heights, self.widths), key=lambda hw: (hw[0] * hw[1], hw))
        return {"smallest": by_area[0], "median": by_area[(len(by_area) - 1) // 2], "largest": by_area[-1],
                "height": (min(self.heights), max(self.heights)), "width": (min(self.widths), max(self.widths))}


def scan_split(source: ImageSource, split: str, workers: int = 0) -> SplitReport:
    """Decode every image of ``source`` (threads; PIL releases the GIL) and collect statistics."""
    names = source.classes
    counts = Counter(source.labels)
    report = SplitReport(
        split=split,
        source=source.name,
        images=len(source),
        class_counts={names[c] if 0 <= c < len(names) else str(c): n for c, n in sorted(counts.items()) if c >= 0},
        unlabeled=counts.get(-1, 0),
    )

    def load(i: int):
        try:
            img = source.load(i)
            return i, img.shape[-2], img.shape[-1], None
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
            return i, 0, 0, f"{type(e).__name__}: {unreadable_reason(e, source.describe(i))}"

    with ThreadPoolExecutor(max_workers=workers or threads.current().decode_threads()) as pool:
        for i, h, w, err in pool.map(load, range(len(source)), chunksize=64):
            if err is not None:
                report.unreadable.append((source.describe(i), err))
            else:
                report.heights.append(h)
                report.widths.append(w)
    return report


def check_recipe_data(recipe: Recipe) -> list[SplitReport]:
    """Scan the training split and, when set, the validation split of the recipe (a one-set dataset such as
    ``folder`` or ``filelist`` has only the one)."""
    cfg = recipe.data
    one_set = pretraining_dataset(cfg.dataset).one_set
    splits = [cfg.train_split] + ([cfg.val_split] if cfg.val_split and not one_set else [])
    return [scan_split(build_source(replace(cfg, in_memory="never"), split, recipe.seed), split, workers=threads.resolve_workers(cfg.num_workers)) for split in splits]


def would_abort(report: SplitReport, max_bad_fraction: float) -> bool:
    """True when training would stop on this split's unreadable images."""
    return len(report.unreadable) > max_bad_fraction * max(report.images, 1)
