"""The on-disk format of a pack folder, shared by the writer (:mod:`simclr_cli.data.shards.writer`, ``simclr data
pack`` and ``simclr data index``) and the reader (:class:`~simclr_cli.data.shards.reader.ShardSource`).

Layout of a pack folder ``OUT``::

    OUT/shard-000000.tar ...   WebDataset tars: KEY.cls (the label, when there is one), KEY.jpg, KEY.json
                               ({"path": the original file, "class": its class name or null}); KEY is the
                               image's position in the source list, 9 digits
    OUT/pack.json              what is packed: the source, a hash of its file list, the settings, the classes
                               (written first: a re-run resumes only when it matches)
    OUT/index.json             written last, atomically: per sample its shard, byte offset and size of its
                               .jpg member, label, key and original path, plus the shard sizes
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from simclr_cli.errors import DataError

FORMAT = "simclr-shards/1"
INDEX = "index.json"
MANIFEST = "pack.json"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
_KEY_DIGITS = 9


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def key_of(position: int) -> str:
    return f"{position:0{_KEY_DIGITS}d}"


def repair_advice(root: Path) -> str:
    """How to repair a damaged pack: pack it again while its source exists (only the damaged shards are written
    again, byte for byte the original ones), else ``simclr data index ROOT --partial``, which names the images lost."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    source = manifest.get("source") if isinstance(manifest, dict) else None
    partial = (f"`simclr data index {root} --partial` keeps the images that are left (the pack then holds fewer "
               "images; it names those lost)")
    if source and Path(source).exists():
        options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (manifest.get("settings") or {}).items())
        return (f"pack it again with `simclr data pack {source} {root}{options}` (the same source and options: it "
                f"writes only the damaged shards again, identical to the original ones)")
    gone = f"its source {source} is gone, so " if source else "no source is recorded (pack.json), so "
    return gone + partial


def unfinished_error(out: Path, manifest: dict, found: int) -> str:
    """The error for a pack with fewer shards than its ``pack.json`` plans (an interrupted ``simclr data pack``,
    or shards deleted since), with the command that finishes it; '' when none are missing."""
    expected = manifest.get("shards")
    if not isinstance(expected, int) or found >= expected:
        return ""
    options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (manifest.get("settings") or {}).items())
    return (f"{out}: the pack is incomplete ({found} of {expected} shards; an interrupted `simclr data pack`, "
            f"or shards deleted since): finish it with `simclr data pack {manifest.get('source') or 'SRC'} {out}"
            f"{options}` (the same source and options), or use only the shards that are there with "
            f"`simclr data index {out} --partial`")


def read_index(root: Path) -> dict:
    """``root/index.json``; a :class:`DataError` (exit 2) saying how to make or rebuild it otherwise."""
    root = Path(root).expanduser()
    path = root / INDEX
    if not root.is_dir():
        raise DataError(f"shards: {root} is not a folder; pack images into shards first "
                        f"(simclr data pack SRC {root}) and point data.root at that folder", missing=True)
    if not path.is_file():
        found = sum(1 for p in root.iterdir() if SHARD_RE.match(p.name))
        has_shards = found > 0
        try:
            unfinished = unfinished_error(root, json.loads((root / MANIFEST).read_text()), found)
        except (OSError, ValueError, AttributeError):
            unfinished = ""
        if unfinished:
            raise DataError(f"shards: {unfinished}", missing=True)
        how = (f"rebuild it from the shards with `simclr data index {root}`, or finish an interrupted pack by "
               f"running `simclr data pack SRC {root}` again" if has_shards else
               f"it holds no shards either: pack images with `simclr data pack SRC {root}`")
        raise DataError(f"shards: {path} is missing; {how}", missing=True)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
    except (ValueError, AttributeError) as e:
        raise DataError(f"shards: {path} is not a readable shard index ({e}); rebuild it with "
                        f"`simclr data index {root}`", missing=True) from None
    return index
