"""Class folders: the one scanner of ``folder/<class>/<image>`` trees.

Every reader of image folders goes through :func:`scan_class_folders`: pretraining and evaluation
(:class:`~simclr_cli.data.sources.images.ImageFolderSource`), the transfer image-folder layouts
(:mod:`simclr_cli.data.sources.builders`) and ``simclr embed --data FOLDER``. Class indices are the sorted
class-folder names, so each split of an image folder numbers its own classes;
:func:`~simclr_cli.data.sources.images.align_classes` renumbers one split to another's class order.

This module sits at the bottom of ``data/``: it imports nothing else from the package but the errors and
:mod:`simclr_cli.data.listing.index` (compact lists, the listing cache); in particular not the image sources,
which are built on it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from simclr_cli.data.listing.index import Ints, Strings, TreeRecord, cached_listing

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
    return _opens_as_image(str(path))


class ClassFolders(NamedTuple):
    """What :func:`scan_class_folders` found: image paths, their labels (index into ``classes``, -1 for an
    image outside any class folder) and the class names (sorted class-folder names). ``files`` and
    ``labels`` are compact read-only sequences (:class:`~simclr_cli.data.listing.index.Strings`, ``Ints``)."""

    files: Strings
    labels: Ints
    classes: list[str]


def _suffix(name: str) -> str:
    """``Path(name).suffix``, lower case."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def _walk(folder: str, sniff: bool, record: TreeRecord, start: str = "", descend: bool = True) -> list[str]:
    """Every image under ``folder/start`` at any depth (``descend=False``: directly in it), as names relative
    to ``folder`` ('/'-joined), in no particular order.

    Hidden files and folders are skipped; symbolic links, to files or to folders, are followed; a folder
    reached twice (a link cycle, or two links to one folder) is read once, through the first of its names in
    sorted order. Each folder is stat'ed before it is listed and given to ``record``, with the files that were
    opened to sniff them (so the cache sees a change to them).
    """
    files: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [start]
    while stack:
        rel = stack.pop()
        path = os.path.join(folder, rel) if rel else folder
        try:
            st = os.stat(path)
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            record.folder(rel, st, None)
            continue
        seen.add(ident)
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:  # unreadable folder: skipped, as os.walk does
            record.folder(rel, st, None)
            continue
        record.folder(rel, st, [e.name for e in entries])
        subdirs = []
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            try:
                if e.is_dir():  # follows links
                    subdirs.append(f"{rel}/{name}" if rel else name)
                    continue
                if not e.is_file():  # a dangling link, a socket, ...
                    continue
            except OSError:
                continue
            sub = f"{rel}/{name}" if rel else name
            suffix = _suffix(name)
            if suffix in IMAGE_EXTENSIONS:
                files.append(sub)
            elif sniff and suffix not in _NOT_IMAGES:
                try:
                    record.file(sub, os.stat(e.path))
                except OSError:
                    continue
                if _opens_as_image(e.path):
                    files.append(sub)
        if descend:
            stack.extend(sorted(subdirs, reverse=True))  # depth first, in sorted order
    return files


def _opens_as_image(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - not an image
        return False


def _parts(rel: str) -> list[str]:
    return rel.split("/")


def scan_class_folders(folder: Path, *, sniff: bool = True, loose: bool = False, warn: bool = True,
                       cache: str = "auto") -> ClassFolders:
    """Scan ``folder/<class>/**/<image>``.

    Class folders are the non-hidden sub-folders of ``folder``, sorted by name; the images of each are
    found at any depth (as :func:`scan_images` finds them: hidden files skipped, links followed) and sorted
    by path, so the order is a pure function of the tree. Each class folder is walked on its own, so a link
    from one class folder into another lists those images in both. The listing is cached (see
    :mod:`simclr_cli.data.listing.index`): a later call on an unchanged tree lists no folder.

    Args:
        folder: an existing folder.
        sniff: accept a file when :func:`is_image_file` does (files with an odd or no extension are opened
            with PIL); ``False``: by extension only (:func:`has_image_extension`).
        loose: also take the images directly in ``folder``, unlabeled (-1), after those of the class folders.
        warn: when images were found, warn about a single class folder or class folders without images
            (:func:`warn_class_layout`).
        cache: ``data.listing_cache``: 'auto', 'off' or the cache's folder.
    """
    root = str(folder)

    def scan(record: TreeRecord) -> tuple[list[str], list[int], list[str]]:
        found = _walk(root, sniff, record, descend=False)  # the loose images; records the folder itself
        classes = sorted(e.name for e in _subfolders(root))
        for c in classes:
            found += _walk(root, sniff, record, start=c)
        index = {c: i for i, c in enumerate(classes)}
        inside = sorted((r for r in found if "/" in r), key=lambda r: (index[r.split("/", 1)[0]], _parts(r)))
        rel = inside + (sorted(r for r in found if "/" not in r) if loose else [])
        labels = [index[r.split("/", 1)[0]] for r in inside] + [-1] * (len(rel) - len(inside))
        return rel, labels, classes

    files, labels, classes = cached_listing(root, "class-folders", {"sniff": sniff, "loose": loose}, scan,
                                            setting=cache, what=str(folder))
    if warn and len(files):
        warn_class_layout(folder, classes, labels)
    return ClassFolders(files, labels, classes)


def _subfolders(folder: str) -> list[os.DirEntry]:
    """The non-hidden folders (links followed) directly in ``folder``: the class folders, empty ones too."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                if not e.name.startswith(".") and e.is_dir():
                    out.append(e)
            except OSError:
                pass
    return out


def scan_images(folder: Path, *, sniff: bool = True, cache: str = "auto") -> Strings:
    """Every image under ``folder``, at any depth, sorted by path (so the order is a pure function of the tree).

    Hidden files and hidden folders (names starting with '.') are skipped, and so are files that are not
    images (see ``sniff``). Symbolic links, to files or to folders, are followed; a folder reached twice
    (a link cycle, or two links to one folder) is read once. The listing is cached (see
    :mod:`simclr_cli.data.listing.index`): a later call on an unchanged tree lists no folder.

    Args:
        folder: an existing folder.
        sniff: as in :func:`scan_class_folders`: files with an odd or no extension are opened with PIL;
            ``False``: by extension only.
        cache: ``data.listing_cache``: 'auto', 'off' or the cache's folder.
    """
    root = str(folder)

    def scan(record: TreeRecord) -> tuple[list[str], list[int], list[str]]:
        rel = sorted(_walk(root, sniff, record))
        return rel, [-1] * len(rel), []

    return cached_listing(root, "images", {"sniff": sniff}, scan, setting=cache, what=f"folder:{folder}").files


_LAYOUT_WARNED: set[str] = set()


def warn_class_layout(folder: Path, classes: list[str], labels: list[int]) -> None:
    """Warn (stderr, once per folder and process group) about a split with a single class folder, and about
    class folders without images: labels then mean little (kNN, linear eval) or a class is silently empty."""
    ys = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(ys[ys >= 0], minlength=len(classes)).tolist()  # loose images (-1) are no class
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
