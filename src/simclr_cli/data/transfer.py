"""Transfer datasets ([v1] App. B.8): the 12 built-in ones through torchvision, and image folders
in three layouts. Each gives train / val / test sources, the class names and the paper's metric.

Validation: a dataset's own val split where it has one, else a stratified, seeded
``val_fraction`` of train. Test is only ever read for the final number.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from simclr_cli.data.folders import align_classes
from simclr_cli.data.loaders import SubsetSource
from simclr_cli.data.sources import IMAGE_EXTENSIONS, ImageSource, read_image, torchvision_source, warn_class_layout
from simclr_cli.errors import DataError, UsageError
from simclr_cli.utils import mix_seed

# The paper's metric per dataset: mean per-class accuracy for these, 11-point mAP for VOC2007, else top-1.
MEAN_PER_CLASS = {"fgvc_aircraft", "oxford_pets", "caltech101", "flowers102"}
BUILTIN = ("cifar10", "cifar100", "stl10", "food101", "flowers102", "oxford_pets", "stanford_cars", "fgvc_aircraft",
           "dtd", "sun397", "caltech101", "voc2007")
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


class FileListSource:
    """Images given as a list of files with integer labels (or rows of a multi-hot ``targets`` matrix)."""

    def __init__(self, files: list[str], labels: list[int], classes: list[str], name: str,
                 targets: torch.Tensor | None = None) -> None:
        self.files = [str(f) for f in files]
        self.labels = list(labels)
        self.classes = classes
        self.name = name
        self.targets = targets  # multi-label: (N, C) 0/1; labels[i] is then the row index i

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        return read_image(self.files[index])

    def describe(self, index: int) -> str:
        return self.files[index]


class ConcatSource:
    """Two sources one after the other (train + val for the final fit)."""

    def __init__(self, a: ImageSource, b: ImageSource) -> None:
        self.parts = (a, b)
        self.name = f"{a.name}+{b.name}"
        self.classes = a.classes
        self.labels = list(a.labels) + list(b.labels)

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def _where(self, index: int) -> tuple[ImageSource, int]:
        n = len(self.parts[0])
        return (self.parts[0], index) if index < n else (self.parts[1], index - n)

    def load(self, index: int) -> torch.Tensor:
        src, i = self._where(index)
        return src.load(i)

    def describe(self, index: int) -> str:
        src, i = self._where(index)
        return src.describe(i)


def label_targets(source: ImageSource, labels: torch.Tensor) -> torch.Tensor:
    """Labels as the metric needs them: class indices, or the multi-hot rows for a multi-label source."""
    root = source
    while getattr(root, "targets", None) is None and hasattr(root, "source"):
        root = root.source
    targets = getattr(root, "targets", None)
    return targets[labels] if targets is not None else labels


@dataclass
class TransferData:
    """One transfer dataset, split three ways."""

    name: str
    train: ImageSource
    val: ImageSource
    test: ImageSource
    classes: list[str]
    metric: str  # "top1" | "mean_per_class" | "map11"
    val_note: str  # where val came from

    @property
    def multilabel(self) -> bool:
        return self.metric == "map11"


def metric_for(name: str) -> str:
    if name == "voc2007":
        return "map11"
    return "mean_per_class" if name in MEAN_PER_CLASS else "top1"


def load_transfer(name: str, root: str, *, download: bool = False, val_fraction: float = 0.2, split: str = "30-per-class",
                  seed: int = 0) -> TransferData:
    """Build ``name`` (a built-in dataset or ``imagefolder:PATH``)."""
    if name.startswith("imagefolder:"):
        folder = name.split(":", 1)[1].strip()
        if not folder:  # Path("") is the current directory: never use it by accident
            raise UsageError(f"transfer dataset '{name}' has no path; write imagefolder:PATH, "
                             "e.g. --dataset imagefolder:/data/caltech101")
        train, val, test, note = _imagefolder(Path(folder).expanduser(), split, seed)
        metric = "top1"
    elif name in BUILTIN:
        train, val, test, note = _builtin(name, Path(root).expanduser(), download, seed)
        metric = metric_for(name)
    else:
        raise UsageError(f"unknown transfer dataset '{name}'; built in: {', '.join(BUILTIN)}, or imagefolder:PATH")
    if val is None:
        train, val = stratified_split(train, val_fraction, seed)
        note = f"{val_fraction:g} of train, stratified"
    _align(train, val)
    _align(train, test)
    return TransferData(name, train, val, test, list(train.classes), metric, note)


def _align(reference: ImageSource, other: ImageSource) -> None:
    if getattr(other, "targets", None) is not None:
        return
    align_classes(reference, other)


def stratified_split(source: ImageSource, fraction: float, seed: int) -> tuple[SubsetSource, SubsetSource]:
    """(train, held-out) with ``fraction`` of every class held out (at least one where a class has two)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(source.labels):
        by_class[y].append(i)
    rest, held = [], []
    for c, members in sorted(by_class.items()):
        g = torch.Generator().manual_seed(mix_seed(seed, "val", c))
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        k = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held += order[:k]
        rest += order[k:]
    if not held or not rest:
        raise UsageError(f"{source.name}: too few images to hold out a validation split")
    return SubsetSource(source, sorted(rest)), SubsetSource(source, sorted(held))


def per_class_split(source: ImageSource, spec: str, seed: int) -> tuple[SubsetSource, SubsetSource]:
    """Train/test for a folder with no split: 'N-per-class' train (the rest test) or a train fraction."""
    spec = spec.strip()
    if spec.endswith("-per-class") and spec.split("-")[0].isdigit():
        n = int(spec.split("-")[0])
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(source.labels):
            by_class[y].append(i)
        train, test = [], []
        for c, members in sorted(by_class.items()):
            g = torch.Generator().manual_seed(mix_seed(seed, "split", c))
            order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            take = min(n, len(members) - 1)  # always keep at least one test image per class
            train += order[:take]
            test += order[take:]
        return SubsetSource(source, sorted(train)), SubsetSource(source, sorted(test))
    try:
        frac = float(spec)
    except ValueError:
        raise UsageError(f"transfer.split '{spec}': expected 'N-per-class' or a train fraction such as 0.8") from None
    if not 0 < frac < 1:
        raise UsageError(f"transfer.split '{spec}': a train fraction must be in (0, 1)")
    test, train = stratified_split(source, 1 - frac, seed)[::-1]
    return train, test


# ----------------------------------------------------------------------------- image folders


def is_image_file(path: Path) -> bool:
    """Common extensions are trusted; other files (odd or no extension) are sniffed with PIL."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if path.suffix.lower() in (".txt", ".csv", ".json", ".md", ".xml", ".mat", ".py", ".tar", ".gz", ".zip"):
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - not an image
        return False


def _scan_classes(folder: Path) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for ci, cls in enumerate(classes):
        for p in sorted((folder / cls).rglob("*")):
            if is_image_file(p):
                files.append(str(p))
                labels.append(ci)
    if files:
        warn_class_layout(folder, classes, labels)
    return files, labels, classes


def _imagefolder(root: Path, split: str, seed: int):
    """Layouts: (1) train/ + test/ (or val/) folders of class folders; (2) class folders plus
    train.txt / test.txt of relative paths; (3) class folders only (split by ``split``)."""
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: no such folder", missing=True)
    name = f"imagefolder:{root}"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        parts = []
        for d in (root / "train", test_dir):
            files, labels, classes = _scan_classes(d)
            if not files:
                raise DataError(f"{name}: no images under {d}/<class>/", missing=True)
            parts.append(FileListSource(files, labels, classes, f"{name}/{d.name}"))
        val = None
        if test_dir.name == "test" and (root / "val").is_dir():
            files, labels, classes = _scan_classes(root / "val")
            val = FileListSource(files, labels, classes, f"{name}/val")
        return parts[0], val, parts[1], "val/ folder" if val is not None else ""
    files, labels, classes = _scan_classes(root)
    if not files:
        raise DataError(f"{name}: no images; expected train/ and test/ folders, or class folders "
                        f"({root}/<class>/<image>)", missing=True)
    everything = FileListSource(files, labels, classes, name)
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():
        index = {str(Path(f).relative_to(root)): i for i, f in enumerate(files)}
        picked = []
        for list_name in ("train.txt", "test.txt"):
            wanted = [ln.strip() for ln in (root / list_name).read_text().splitlines() if ln.strip()]
            missing = [w for w in wanted if w not in index]
            if missing:
                raise DataError(f"{root / list_name}: {len(missing)} listed files are not images under {root}, "
                                f"e.g. '{missing[0]}' (paths are relative to {root})", missing=True)
            picked.append(SubsetSource(everything, sorted(index[w] for w in wanted)))
        val = None
        if (root / "val.txt").is_file():
            wanted = [ln.strip() for ln in (root / "val.txt").read_text().splitlines() if ln.strip()]
            val = SubsetSource(everything, sorted(index[w] for w in wanted if w in index))
        return picked[0], val, picked[1], "val.txt" if val is not None else ""
    train, test = per_class_split(everything, split, seed)
    return train, None, test, ""


# ----------------------------------------------------------------------------- torchvision datasets

_HOW = {
    "food101": "food-101/", "flowers102": "flowers-102/", "oxford_pets": "oxford-iiit-pet/",
    "stanford_cars": "stanford_cars/ (no longer downloadable: get it from Kaggle)", "fgvc_aircraft": "fgvc-aircraft-2013b/",
    "dtd": "dtd/", "sun397": "SUN397/", "caltech101": "caltech101/", "voc2007": "VOCdevkit/VOC2007/",
    "cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "stl10": "stl10_binary/",
}


def _missing(name: str, root: Path, download: bool, err: Exception) -> DataError:
    how = "check the download; it failed" if download else "pass --download (needs internet) or put it there"
    return DataError(f"{name}: not found under {root} (expected {_HOW[name]}); {how}, "
                     "or point --root at the folder that holds it", missing=True)


def _builtin(name: str, root: Path, download: bool, seed: int):
    if name in ("cifar10", "cifar100", "stl10"):
        try:
            return (torchvision_source(name, str(root), "train", download), None,
                    torchvision_source(name, str(root), "test", download), "")
        except DataError as e:  # its hint names the recipe keys (data.download); transfer has --download/--root
            raise _missing(name, root, download, e) from None
    from torchvision import datasets

    try:
        if name == "voc2007":
            return _voc(root, download) + ("",)
        if name in ("flowers102", "fgvc_aircraft", "dtd"):
            cls = {"flowers102": datasets.Flowers102, "fgvc_aircraft": datasets.FGVCAircraft, "dtd": datasets.DTD}[name]
            train, val, test = (_wrap(name, cls(str(root), split=s, download=download), s) for s in ("train", "val", "test"))
            return train, val, test, "the dataset's val split"
        if name == "oxford_pets":
            ds = [datasets.OxfordIIITPet(str(root), split=s, download=download) for s in ("trainval", "test")]
            return _wrap(name, ds[0], "trainval"), None, _wrap(name, ds[1], "test"), ""
        if name in ("food101", "stanford_cars"):
            cls = datasets.Food101 if name == "food101" else datasets.StanfordCars
            return (_wrap(name, cls(str(root), split="train", download=download), "train"), None,
                    _wrap(name, cls(str(root), split="test", download=download), "test"), "")
        if name == "sun397":
            everything = _wrap(name, datasets.SUN397(str(root), download=download), "all")
            train, test = per_class_split(everything, "0.5", seed)
            return train, None, test, ""
        if name == "caltech101":
            ds = datasets.Caltech101(str(root), target_type="category", download=download)
            base = Path(ds.root) / "101_ObjectCategories"
            files = [str(base / ds.categories[y] / f"image_{i:04d}.jpg") for y, i in zip(ds.y, ds.index)]
            everything = FileListSource(files, list(ds.y), list(ds.categories), "caltech101")
            train, test = per_class_split(everything, "30-per-class", seed)
            return train, None, test, ""
    except (RuntimeError, OSError, FileNotFoundError) as e:
        raise _missing(name, root, download, e) from None
    raise UsageError(f"unknown transfer dataset '{name}'")


def _wrap(name: str, ds, split: str) -> FileListSource:
    """A torchvision dataset's file list and labels, without decoding any image."""
    if hasattr(ds, "_samples"):  # StanfordCars
        files = [p for p, _ in ds._samples]
        labels = [int(y) for _, y in ds._samples]
    else:
        files = list(getattr(ds, "_image_files", None) or getattr(ds, "_images"))
        labels = [int(y) for y in getattr(ds, "_labels")]
    classes = list(getattr(ds, "classes", None) or [str(i) for i in range(max(labels) + 1)])
    return FileListSource(files, labels, classes, f"{name}:{split}")


VOC_IGNORE = -1  # a target entry that counts neither as positive nor as negative


def voc_targets(annotations: list[str] | list[Path]) -> torch.Tensor:
    """(N, 20) targets from VOC annotation XML files, as the devkit reads them.

    1: the image has a non-difficult object of the class; -1 (:data:`VOC_IGNORE`): its only objects
    of the class are marked ``<difficult>1</difficult>`` (the devkit leaves such an image out of that
    class's AP; the linear fit leaves the entry out of its loss); 0: no object of the class.
    """
    targets = torch.zeros(len(annotations), len(VOC_CLASSES))
    for i, xml in enumerate(annotations):
        for obj in ET.parse(xml).getroot().iter("object"):
            c = VOC_CLASSES.index(obj.findtext("name").strip())
            if (obj.findtext("difficult") or "0").strip() == "1":
                if targets[i, c] == 0:
                    targets[i, c] = VOC_IGNORE
            else:
                targets[i, c] = 1
    return targets


def _voc(root: Path, download: bool):
    """VOC2007 classification: trainval / test, multi-label from the object annotations (see :func:`voc_targets`:
    classes present only as difficult objects are ignored, as in the devkit)."""
    from torchvision import datasets

    parts = []
    for image_set in ("trainval", "test"):
        ds = datasets.VOCDetection(str(root), year="2007", image_set=image_set, download=download)
        targets = voc_targets(ds.annotations)
        parts.append(FileListSource(list(ds.images), list(range(len(ds.images))), list(VOC_CLASSES),
                                    f"voc2007:{image_set}", targets=targets))
    trainval, test = parts
    # Hold out val by image (no stratification for multi-label).
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(trainval), generator=g).tolist()
    k = len(perm) // 5
    return SubsetSource(trainval, sorted(perm[k:])), SubsetSource(trainval, sorted(perm[:k])), test
