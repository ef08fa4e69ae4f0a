"""List files (``data.dataset = "filelist"``): a text file of image paths, one a line, or a CSV of path[,label] rows.

Paths are relative to the list's own folder, or absolute (``~`` expanded). In a text list, blank lines and
lines starting with ``#`` are skipped. In a CSV (a ``.csv`` file), the first column is the path and the optional
second column the label (a class name or number; empty: unlabeled); a first row that has a column name (``path``,
``file``, ``filename``, ``image``, ``filepath``, ``image_path``) is a header, and then that column holds the paths
and a ``class`` (or else ``label``) column the labels: the CSV that ``simclr embed`` writes reads back as a list.
A quoted cell may hold a newline (the file is read by the csv module, not line by line). Classes are the
distinct labels, sorted (numerically when every label is an integer). A path listed twice is used twice, with a
warning.

A list that names files that do not exist is refused (exit 2) with their count and the first few names, so that
nothing trains on a partial list by accident; ``data.allow_missing = true`` leaves them out with a warning.

A list is read into a :class:`FileList` (paths, labels, classes, name); the image source over it is
:class:`~simclr_cli.data.sources.images.FileListSource` (``FileListSource.of(read_file_list(path))``), so this
module, like the rest of :mod:`simclr_cli.data.listing`, imports neither torch nor the sources built on it.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable, NamedTuple

from simclr_cli.data.listing.index import Ints, Strings, as_ints, as_strings
from simclr_cli.errors import DataError

_HEADER_NAMES = frozenset({"path", "file", "filename", "image", "filepath", "image_path"})
SHOWN = 3  # missing files named in the message


class FileList(NamedTuple):
    """What a list file names: image paths and their labels (index into ``classes``, -1 for none) as compact
    sequences, the classes, and the list's name in messages (``filelist:PATH``)."""

    files: Strings
    labels: Ints
    classes: list[str]
    name: str


def _rows(path: Path) -> list[tuple[str, str]]:
    """(path text, label text or '') per entry of the list, in file order."""
    # utf-8-sig: a list saved by Excel or Notepad starts with a byte-order mark, which is not part of the first path
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    if path.suffix.lower() != ".csv":
        return [(ln.strip(), "") for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    # the csv module over the whole text: a quoted path may hold a newline (splitting lines first would cut it)
    rows = [[c.strip() for c in r] for r in csv.reader(io.StringIO(text, newline=""))
            if r and any(c.strip() for c in r)]
    at, label_at = 0, 1
    if rows:
        names = [c.lower() for c in rows[0]]
        if any(c in _HEADER_NAMES for c in names):
            at = next(i for i, c in enumerate(names) if c in _HEADER_NAMES)
            label_at = next((names.index(c) for c in ("class", "label") if c in names), 1 if at == 0 else -1)
            rows = rows[1:]
    return [(r[at], r[label_at] if 0 <= label_at < len(r) and label_at != at else "")
            for r in rows if len(r) > at and r[at]]


def _class_order(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def read_file_list(path: Path, *, allow_missing: bool = False, warn: Callable[[str], None] = print,
                   allow_missing_option: str = "set data.allow_missing=true") -> FileList:
    """The images a list file names, with their labels (-1 where a row has none).

    Args:
        path: the list file (``.csv``: ``path[,label]`` rows; anything else: one path a line).
        allow_missing: leave out the files that do not exist, saying how many through ``warn``; otherwise
            they are a :class:`DataError` (exit 2) with the count and the first few names.
        warn: where the allow-missing warning goes.
        allow_missing_option: how the error tells the user to allow missing files (``simclr data pack`` has its
            own option, ``--allow-missing``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        hint = (" (a folder: for a folder of images use data.dataset=folder)" if path.is_dir()
                else "" if path.exists() else " (it does not exist)")
        raise DataError(f"filelist: {path} is not a list file{hint}; point data.root at a .txt (one image path "
                        "a line) or .csv (path[,label]) file", missing=True)
    base = path.parent
    rows = _rows(path)
    if not rows:
        raise DataError(f"filelist: {path} names no images", missing=True)
    entries = [(os.path.join(base, os.path.expanduser(p)), y) for p, y in rows]  # join keeps absolute paths
    seen: set[str] = set()
    twice = []
    for (p, _), (f, _) in zip(rows, entries):
        key = os.path.normpath(f)
        if key in seen:
            twice.append((p, f))
        seen.add(key)
    if twice:
        more = f" and {len(twice) - 1} more" if len(twice) > 1 else ""
        warn(f"warning: {path}: {len(twice)} path(s) listed more than once ({twice[0][0]!r}{more}); each listing "
             "counts as an image of its own (delete the repeats to use each image once)")
    missing = [(p, f) for (p, _), (f, _) in zip(rows, entries) if not os.path.isfile(f)]
    if missing:
        more = len(missing) - SHOWN
        shown = ", ".join(p for p, _ in missing[:SHOWN]) + (f" and {more} more" if more > 0 else "")
        what = f"{path}: {len(missing)} of {len(rows)} listed files do not exist ({shown})"
        if not allow_missing:
            rest = (f", or {allow_missing_option} to use the {len(rows) - len(missing)} that exist"
                    if len(missing) < len(rows) else "")
            raise DataError(f"{what}; paths are relative to {base} unless absolute. Fix the list{rest}", missing=True)
        if len(missing) == len(rows):
            raise DataError(f"{what}: none is left to use", missing=True)
        warn(f"warning: {what}; left out ({allow_missing_option.split()[-1]})")
        gone = {f for _, f in missing}
        entries = [(f, y) for f, y in entries if f not in gone]
    classes = _class_order({y for _, y in entries if y})
    index = {c: i for i, c in enumerate(classes)}
    return FileList(as_strings(f for f, _ in entries), as_ints([index[y] if y else -1 for _, y in entries]), classes,
                    f"filelist:{path}")
