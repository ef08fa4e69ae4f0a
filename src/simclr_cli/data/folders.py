"""Class folders: the one scanner of ``folder/<class>/<image>`` trees, and class alignment across splits.

Every reader of image folders goes through :func:`scan_class_folders`: pretraining and evaluation
(:class:`~simclr_cli.data.sources.ImageFolderSource`), the transfer image-folder layouts
(:mod:`simclr_cli.data.builders`) and ``simclr embed --data FOLDER``. Class indices are the sorted
class-folder names, so each split of an image folder numbers its own classes; :func:`align_classes`
renumbers one split to another's class order.

This module sits at the bottom of ``data/``: it imports nothing else from the package but the errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from simclr_cli.errors import DataError

if TYPE_CHECKING:
    from simclr_cli.data.sources import ImageSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# Never images, so never opened to find out.
_NOT_IMAGES = (".txt", ".csv", ".json", ".md", ".xml", ".mat", ".py", ".tar", ".gz", ".zip")


def has_image_extension(path: Path) -> bool:
    """A file with a common image extension, in any case; nothing is opened (fast on large folders)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def is_image_file(path: Path) -> bool:
    """Common extensions are trusted; other files (odd or no extension) are sniffed with PIL. Hidden files are not images."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if path.suffix.lower() in _NOT_IMAGES:
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - not an image
        return False


class ClassFolders(NamedTuple):
    """What :func:`scan_class_folders` found: image paths, their labels (index into ``classes``, -1 for an
    image outside any class folder) and the class names (sorted class-folder names)."""

    files: list[str]
    labels: list[int]
    classes: list[str]


def scan_class_folders(folder: Path, *, sniff: bool = True, loose: bool = False, warn: bool = True) -> ClassFolders:
    """Scan ``folder/<class>/**/<image>``.

    Class folders are the non-hidden sub-folders of ``folder``, sorted by name; the images of each are
    found recursively and sorted by path, so the order is a pure function of the tree.

    Args:
        folder: an existing folder.
        sniff: accept a file when :func:`is_image_file` does (files with an odd or no extension are opened
            with PIL; hidden files are skipped); ``False``: by extension only (:func:`has_image_extension`).
        loose: also take the images directly in ``folder``, unlabeled (-1), after those of the class folders.
        warn: when images were found, warn about a single class folder or class folders without images
            (:func:`warn_class_layout`).
    """
    accept = is_image_file if sniff else has_image_extension
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    for ci, cls in enumerate(classes):
        for p in sorted((folder / cls).rglob("*")):
            if accept(p):
                files.append(str(p))
                labels.append(ci)
    if warn and files:
        warn_class_layout(folder, classes, labels)
    if loose:
        for p in sorted(folder.iterdir()):
            if accept(p):
                files.append(str(p))
                labels.append(-1)
    return ClassFolders(files, labels, classes)


def scan_images(folder: Path, *, sniff: bool = True) -> list[str]:
    """Every image under ``folder``, at any depth, sorted by path (so the order is a pure function of the tree).

    Hidden files and hidden folders (names starting with '.') are skipped, and so are files that are not
    images (see ``sniff``). Symbolic links, to files or to folders, are followed; a folder reached twice
    (a link cycle, or two links to one folder) is read once.

    Args:
        folder: an existing folder.
        sniff: as in :func:`scan_class_folders`: files with an odd or no extension are opened with PIL;
            ``False``: by extension only.
    """
    accept = is_image_file if sniff else has_image_extension
    files: list[str] = []
    seen: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a cycle, or a second link to a folder already read
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [str(Path(top) / n) for n in names if not n.startswith(".") and accept(Path(top) / n)]
    return sorted(files)


_LAYOUT_WARNED: set[str] = set()


def warn_class_layout(folder: Path, classes: list[str], labels: list[int]) -> None:
    """Warn (stderr, once per folder and process group) about a split with a single class folder, and about
    class folders without images: labels then mean little (kNN, linear eval) or a class is silently empty."""
    counts = [0] * len(classes)
    for y in labels:
        counts[y] += 1
    lines = []
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        lines.append(f"warning: {folder}: {len(empty)} class folder(s) with no images ({shown}); "
                     "they are still counted as classes")
    if len(classes) == 1:
        lines.append(f"warning: {folder}: a single class folder ('{classes[0]}'), so its labels carry no information; "
                     "pretraining ignores them, but kNN, linear eval and fine-tuning need two or more classes")
    for line in lines:
        if line not in _LAYOUT_WARNED and int(os.environ.get("RANK", "0")) == 0:
            _LAYOUT_WARNED.add(line)
            print(line, file=sys.stderr, flush=True)


def align_classes(reference: ImageSource, other: ImageSource) -> None:
    """Renumber ``other``'s labels to ``reference``'s class order (image folders number their own class
    folders per split); raise when ``other`` has classes the reference lacks."""
    if other.classes == reference.classes:
        return
    index = {name: i for i, name in enumerate(reference.classes)}
    unknown = sorted(set(other.classes) - set(index))
    if unknown:
        raise DataError(f"{other.name}: classes {unknown[:5]} are not among the classes of {reference.name}; "
                        "the splits need the same class names", missing=True)
    other.labels = [index[other.classes[y]] if y >= 0 else y for y in other.labels]
    other.classes = list(reference.classes)
