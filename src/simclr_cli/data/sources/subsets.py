"""Labeled subsets for semi-supervised fine-tuning (SIMCLR.md section 3).

``--labels`` takes ``P%`` (class-balanced percentage), ``N-per-class``, or a path
to a list file with one image name per line (the format of the ImageNet subsets
``1percent.txt`` / ``10percent.txt``). Percentage and per-class subsets are drawn
per class from the seed, so the same recipe always gives the same subset.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from simclr_cli.data.sources.images import ImageSource
from simclr_cli.errors import UsageError
from simclr_cli.utils import mix_seed


@dataclass(frozen=True)
class LabelSpec:
    """A parsed ``--labels`` value: ``kind`` is 'percent', 'per_class' or 'file'."""

    kind: str
    value: float | int | Path
    text: str

    @property
    def fraction(self) -> float | None:
        """The requested fraction of labeled images, when the spec states one."""
        return float(self.value) / 100 if self.kind == "percent" else None


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_PER_CLASS = re.compile(r"^\s*(\d+)\s*-?\s*per-?class\s*$", re.IGNORECASE)
_FILE_LIKE = re.compile(r"[/\\~]|\.[A-Za-z]\w*\s*$")  # a folder part or a file extension: meant as a list file


def parse_label_spec(text: str) -> LabelSpec:
    """Parse ``1%``, ``12.5%``, ``10-per-class`` or a path to a list file."""
    if not text.strip():
        raise UsageError("--labels is empty; give a percentage (10%), N-per-class (10-per-class) or a file "
                         "listing one image name per line")
    m = _PERCENT.match(text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UsageError(f"--labels {text}: the percentage must be in (0, 100]")
        return LabelSpec("percent", pct, text)
    m = _PER_CLASS.match(text)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise UsageError(f"--labels {text}: need at least 1 image per class")
        return LabelSpec("per_class", n, text)
    path = Path(text).expanduser()
    if path.is_file():
        return LabelSpec("file", path, text)
    if path.is_dir():
        raise UsageError(f"--labels {text}: {path} is a folder; pass a file listing one image name per line")
    if _FILE_LIKE.search(text):
        raise UsageError(f"--labels {text}: {path} not found; pass an existing file listing one image name per "
                         "line, a percentage such as 10%, or N-per-class such as 4-per-class")
    raise UsageError(
        f"--labels {text}: expected a percentage such as 1% or 10%, 'N-per-class' such as 4-per-class, "
        "or an existing file listing one image name per line"
    )


def item_names(source: ImageSource) -> list[str]:
    """A stable name per item: the file name for image folders (the ImageNet list-file format),
    ``class/file`` where file names repeat across classes, ``dataset:split[i]`` for in-memory sets."""
    files = getattr(source, "files", None)
    if files is None:
        return [source.describe(i) for i in range(len(source))]
    base = [Path(f).name for f in files]
    if len(set(base)) == len(base):
        return base
    return [f"{Path(f).parent.name}/{Path(f).name}" for f in files]


def select_labeled(source: ImageSource, spec: LabelSpec, seed: int) -> list[int]:
    """Indices of the labeled subset, sorted. Raises :class:`UsageError` when it cannot be drawn."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(source.labels):
        if y >= 0:
            by_class[y].append(i)
    if not by_class:
        raise UsageError(f"{source.name} has no labels; finetune needs a labeled training split")
    if spec.kind == "file":
        return _from_list_file(source, Path(spec.value))
    classes = sorted(by_class)
    total = sum(len(v) for v in by_class.values())
    if spec.kind == "percent":
        frac = float(spec.value) / 100
        wanted = frac * total
        if wanted < len(classes):
            raise UsageError(
                f"--labels {spec.text} of {total} labeled images is {wanted:.4g} images, fewer than the "
                f"{len(classes)} classes it must cover; use a larger percentage or '1-per-class'"
            )
        quota = {c: max(1, round(frac * len(by_class[c]))) for c in classes}
    else:
        n = int(spec.value)
        short = [(source.classes[c] if c < len(source.classes) else str(c), len(by_class[c]))
                 for c in classes if len(by_class[c]) < n]
        if short:
            names = ", ".join(f"'{name}' has {k}" for name, k in short[:5])
            raise UsageError(f"--labels {spec.text}: {names} labeled image(s); use a smaller number per class")
        quota = dict.fromkeys(classes, n)
    chosen: list[int] = []
    for c in classes:
        g = torch.Generator().manual_seed(mix_seed(seed, "labels", c))
        members = by_class[c]
        order = torch.randperm(len(members), generator=g)[: quota[c]].tolist()
        chosen.extend(members[j] for j in order)
    return sorted(chosen)


def _from_list_file(source: ImageSource, path: Path) -> list[int]:
    try:
        # surrogateescape: names that are not valid UTF-8 match the file names as the OS gives them
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--labels {path}: cannot read the list file: {e}") from None
    wanted = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not wanted:
        raise UsageError(f"--labels {path}: the list file names no images")
    index: dict[str, int] = {}
    files = getattr(source, "files", None)
    for i, name in enumerate(item_names(source)):
        index[name] = i
        if files is not None:  # also accept class/file and the bare file name
            f = Path(files[i])
            index.setdefault(f.name, i)
            index.setdefault(f"{f.parent.name}/{f.name}", i)
    missing = [w for w in wanted if w not in index]
    if missing:
        example = next(iter(index), "")
        raise UsageError(
            f"--labels {path}: {len(missing)} of {len(wanted)} names are not in {source.name}, "
            f"e.g. '{missing[0]}' (names look like '{example}')"
        )
    chosen = sorted({index[w] for w in wanted})
    unlabeled = [i for i in chosen if source.labels[i] < 0]
    if unlabeled:
        raise UsageError(f"--labels {path}: {len(unlabeled)} listed images have no label, e.g. {source.describe(unlabeled[0])}")
    return chosen


def write_label_list(path: Path, source: ImageSource, indices: list[int]) -> None:
    """Write the chosen items in the list-file format, so ``--labels path`` reproduces the subset."""
    from simclr_cli.utils import atomic_write_bytes

    names = item_names(source)
    # File names that are not valid UTF-8 (surrogate-escaped by Python) are written back as their own bytes.
    atomic_write_bytes(path, "".join(names[i] + "\n" for i in indices).encode("utf-8", "surrogateescape"))
