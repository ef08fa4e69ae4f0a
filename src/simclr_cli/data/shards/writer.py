"""Writing a pack folder: ``simclr data pack`` (:func:`pack`: a dataset re-encoded once into WebDataset tars) and
``simclr data index`` (:func:`write_index`: the index that gives random access by sample index). The layout is in
:mod:`simclr_cli.data.shards.format`; :class:`~simclr_cli.data.shards.reader.ShardSource` reads it.

Images are decoded with :func:`~simclr_cli.data.sources.images.read_image` (EXIF orientation applied), scaled so that the
shorter side is ``shorter_side`` (never upscaled; aspect kept) and re-encoded as JPEG at ``quality``. Shard ``k``
holds source images ``k * shard_size ...`` (unreadable ones are skipped and named), so each shard is a pure
function of the source and the settings: an interrupted pack keeps its completed shards (written to a temp name,
then renamed) and a re-run writes only the rest.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import signal
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import numpy as np
import torch

from simclr_cli.data.listing.folders import is_image_file, scan_class_folders, scan_images
from simclr_cli.data.listing.lists import read_file_list
from simclr_cli.data.shards.format import (
    FORMAT,
    INDEX,
    MANIFEST,
    SHARD_RE,
    key_of,
    read_index,
    repair_advice,
    shard_name,
    unfinished_error,
)
from simclr_cli.data.sources.images import FileListSource, read_image
from simclr_cli.errors import DataError, Interrupted, UsageError
from simclr_cli.utils import atomic_write_text

Labels = Literal["auto", "folders", "none"]


@dataclass(frozen=True)
class PackSettings:
    """How images are re-encoded and grouped.

    Attributes:
        shorter_side: the shorter side in pixels after packing; larger images are scaled down to it, smaller
            ones are kept as they are (never upscaled).
        quality: JPEG quality (1-95).
        shard_size: images per shard (the last shard holds the rest).
    """

    shorter_side: int = 256
    quality: int = 90
    shard_size: int = 1000

    def check(self) -> None:
        if self.shorter_side < 8:
            raise UsageError(f"--shorter-side must be at least 8 pixels, got {self.shorter_side}")
        if not 1 <= self.quality <= 95:
            raise UsageError(f"--quality must be between 1 and 95 (JPEG), got {self.quality}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1 image, got {self.shard_size}")


# ----------------------------------------------------------------------------- the source to pack


def list_source(src: Path, labels: Labels = "auto", *, allow_missing: bool = False,
                say: Callable[[str], None] = print) -> FileListSource:
    """The images of ``src``: a folder (any depth; class folders give labels, see ``labels``) or a list file
    (``.txt``/``.csv``, see :mod:`simclr_cli.data.listing.lists`).

    ``labels`` (folders only): "auto": labels from the class folders when ``src`` holds two or more sub-folders
    and no image directly, unlabeled otherwise; "folders": ``src/<class>/**/<image>`` (images directly in ``src``
    unlabeled); "none": every image unlabeled.
    """
    src = Path(src).expanduser().absolute()
    if src.is_file():
        return FileListSource.of(read_file_list(src, allow_missing=allow_missing, warn=say,
                                                allow_missing_option="pass --allow-missing"))
    if not src.is_dir():
        raise DataError(f"{src}: no such folder or list file; SRC is a folder of images or a .txt/.csv list of "
                        "image paths", missing=True)
    subdirs = [p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if labels == "folders" and not subdirs:
        raise DataError(f"--labels folders: {src} has no class folders (expected {src}/<class>/<image>); pack it "
                        "unlabeled with --labels none (or auto)", missing=True)
    if labels == "auto":
        loose = any(is_image_file(p) for p in src.iterdir())
        labels = "folders" if len(subdirs) >= 2 and not loose else "none"
    if labels == "folders":
        files, ys, classes = scan_class_folders(src, loose=True)
        split_names = {"train", "val", "test", "valid", "validation"}
        if classes and set(classes) <= split_names:
            say(f"warning: {src}: the class folders are {', '.join(classes)}, which look like splits; pack each "
                f"split on its own (simclr data pack {src / classes[0]} OUT/{classes[0]}), or pass --labels none")
        if len(files) and classes:
            say(f"{src}: labels from {len(classes)} class folders (--labels none packs them unlabeled)")
    else:
        files = scan_images(src)
        ys, classes = [-1] * len(files), []
    if not len(files):  # the scanners may give numpy arrays
        raise DataError(f"{src}: no images at any depth", missing=True)
    return FileListSource(files, ys, classes, str(src))


def source_hash(source: FileListSource, settings: PackSettings) -> str:
    """A hash of what a pack depends on: the file list (path, label, size, modification time), the class names
    and the settings. A re-run resumes only when it is the same."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([asdict(settings), list(source.classes)]).encode())
    for f, y in zip(source.files, source.labels):
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\0{f}\0{int(y)}\0{stamp}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------- encoding one image

_MIN_SIDE = "min_side" in inspect.signature(read_image).parameters  # reduced-size JPEG decoding, where available


def resize_shorter(img: torch.Tensor, shorter_side: int):
    """uint8 (3, H, W) -> PIL image whose shorter side is ``shorter_side`` (aspect kept, bicubic with
    antialiasing); an image already that small or smaller is kept as it is (never upscaled)."""
    from PIL import Image

    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    h, w = img.shape[-2:]
    if min(h, w) <= shorter_side:
        return pil
    if h <= w:
        size = (max(1, int(w * shorter_side / h + 0.5)), shorter_side)
    else:
        size = (shorter_side, max(1, int(h * shorter_side / w + 0.5)))
    return pil.resize(size, Image.Resampling.BICUBIC)


def encode_image(path: str, shorter_side: int, quality: int) -> bytes:
    """The packed JPEG bytes of one source image: decoded upright, scaled, re-encoded."""
    img = read_image(path, min_side=shorter_side) if _MIN_SIDE else read_image(path)
    buf = io.BytesIO()
    resize_shorter(img, shorter_side).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encode_job(job: tuple[int, str, int, int]) -> tuple[int, bytes | None, str]:
    position, path, shorter_side, quality = job
    try:
        return position, encode_image(path, shorter_side, quality), ""
    except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
        return position, None, f"{type(e).__name__}: {e}"


def _worker_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler inherited by the fork: terminate() ends it


# ----------------------------------------------------------------------------- writing


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    return info, io.BytesIO(data)


class _ShardWriter:
    """One shard, written to ``.shard-K.tar.tmp`` and renamed when complete (a crash leaves no partial shard)."""

    def __init__(self, out: Path, k: int) -> None:
        self.final = out / shard_name(k)
        self.tmp = out / f".{shard_name(k)}.tmp"
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, jpeg: bytes, label: int, path: str, classes: list[str]) -> None:
        meta = {"path": path, "class": classes[label] if 0 <= label < len(classes) else None}
        if label >= 0:
            self.tar.addfile(*_member(f"{key}.cls", str(label).encode()))
        self.tar.addfile(*_member(f"{key}.jpg", jpeg))
        self.tar.addfile(*_member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8", "surrogateescape")))

    def commit(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        try:
            self.tar.close()
        except Exception:  # noqa: BLE001 - the temp file goes anyway
            pass
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class PackResult:
    """What :func:`pack` did."""

    out: Path
    images: int  # packed
    skipped: int  # unreadable source images left out
    shards: int
    reused: int  # completed shards kept from an earlier, interrupted run
    already: bool = False  # the pack was complete: nothing was written


def _our_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if SHARD_RE.match(p.name) or p.name in (INDEX, MANIFEST)
            or (p.name.startswith(".shard-") and p.name.endswith(".tar.tmp"))]


LOCK = ".pack.lock"


def _lock_pack(out: Path) -> int | None:
    """An exclusive ``flock`` on ``out/.pack.lock`` (``out`` made when missing): a second pack into the same OUT is
    refused (exit 2) instead of writing the same shards. None where there is no lock to take (``out`` is a file,
    which :func:`_prepare_out` reports, or a file system without locks)."""
    import errno
    import fcntl

    if out.exists() and not out.is_dir():
        return None
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(f"{out} is being packed by another `simclr data pack`; wait for it to finish "
                             "(then run this command again to check the pack), or choose another OUT") from None
        return None
    return fd


def _prepare_out(out: Path, manifest: dict, overwrite: bool) -> bool:
    """Make ``out`` ready for ``manifest``; True when it already holds a pack of the same source and settings
    (completed shards are kept)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; OUT must be a folder (new, empty, or an earlier pack)")
    out.mkdir(parents=True, exist_ok=True)
    mine = _our_files(out)
    others = [p for p in out.iterdir() if p not in mine and p.name != LOCK]
    old = out / MANIFEST
    if old.is_file():
        try:
            previous = json.loads(old.read_text())
        except ValueError:
            previous = {}
        same = all(previous.get(k) == manifest[k] for k in ("format", "source", "source_hash", "settings"))
        if same and not overwrite:
            return True
        if not overwrite:
            if previous.get("settings") != manifest["settings"]:
                raise UsageError(
                    f"{out} holds a pack with other settings (source {previous.get('source')}, settings "
                    f"{previous.get('settings')}; now {manifest['source']}, {manifest['settings']}): pass --overwrite "
                    "to replace it, or choose another OUT")
            if previous.get("source") != manifest["source"]:
                raise UsageError(f"{out} holds a pack of another source ({previous.get('source')}; now "
                                 f"{manifest['source']}): pass --overwrite to replace it, or choose another OUT")
            then, now = previous.get("images"), manifest["images"]
            how = (f"{then} images when packed, {now} now" if then != now else
                   f"{now} images then and now: files were modified, renamed or replaced")
            raise UsageError(f"{out} holds a pack of {manifest['source']} whose files changed since it was packed ({how}; "
                             "its list of files, their sizes and modification times differ): pass --overwrite to pack "
                             "it again, or choose another OUT")
    elif mine and not overwrite:
        raise UsageError(f"{out} holds shards but no {MANIFEST}, so they cannot be checked against this source: "
                         "pass --overwrite to pack again, or `simclr data index OUT` to index them as they are")
    elif others and not mine:
        raise UsageError(f"{out} is not empty and is not a shard pack ({others[0].name}, ...); choose a new or "
                         "empty folder")
    for p in mine:  # --overwrite, or a fresh pack: only the files a pack writes are removed
        p.unlink()
    return False


def _complete_shard(path: Path, keys: list[str], record: dict | None = None) -> bool:
    """A shard from an earlier run is kept when it reads as a tar to its end whose .jpg members are a subset of
    ``keys`` in order (unreadable images are missing from it), and matches ``record`` (its size and member count
    as the finished pack recorded them in ``pack.json``) where there is one."""
    if shard_problem(path, record):
        return False
    try:
        got = [e.key for e in scan_shard(path) if e.jpg is not None]
    except (OSError, tarfile.TarError, ValueError):
        return False
    it = iter(keys)
    return all(k in it for k in got)


def count_members(path: Path) -> int:
    """The members of a tar, read to its end: a damaged header, or data that runs past the end of the file, raises
    :class:`tarfile.ReadError` (tarfile itself stops silently at a damaged header after the first member, as if the
    archive ended there; here what follows must be the zero blocks that end a tar)."""
    end = path.stat().st_size
    members = 0
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.offset_data + m.size > end:
                raise tarfile.ReadError(f"member {m.name} runs past the end of the file")
            members += 1
        stop = tar.offset
    with open(path, "rb") as f:
        f.seek(stop)
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                raise tarfile.ReadError(f"a damaged tar header at byte {stop}: {members} members read before it")
    return members


def shard_problem(path: Path, record: dict | None = None) -> str:
    """What is wrong with one shard: '' when it reads as a tar to its end and, given ``record`` (``{"bytes",
    "members"}`` from ``pack.json``), has that size and that many members; otherwise a short description."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if record is not None and size != record.get("bytes"):
        return f"has {size} bytes, the pack wrote {record.get('bytes')}"
    try:
        members = count_members(path)
    except (OSError, tarfile.TarError, ValueError) as e:
        return f"does not read as a tar ({e})"
    if record is not None and members != record.get("members"):
        return f"holds {members} tar members, the pack wrote {record.get('members')}"
    return ""


def _shard_records(manifest: dict) -> dict[str, dict]:
    """``pack.json``'s record of each shard of the finished pack: name -> {"bytes", "members", "images"}."""
    records = manifest.get("shard_files")
    return {r["name"]: r for r in records if isinstance(r, dict) and "name" in r} if isinstance(records, list) else {}


def _record_shards(out: Path, manifest: dict, index: dict) -> None:
    """Write into ``pack.json`` the size, tar member count and image count of each shard of a finished pack, so that
    a shard damaged later (truncated, a header overwritten) is told apart from one the pack wrote
    (:func:`shard_problem`)."""
    images = np.bincount(np.asarray(index["samples"]["shard"], dtype=np.int64), minlength=len(index["shards"]))
    manifest = dict(manifest)
    manifest["shard_files"] = [{"name": sh["name"], "bytes": sh["bytes"], "members": count_members(out / sh["name"]),
                                "images": int(images[k])} for k, sh in enumerate(index["shards"])]
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def pack(src: Path, out: Path, settings: PackSettings = PackSettings(), *, labels: Labels = "auto",
         overwrite: bool = False, workers: int = 0, allow_missing: bool = False,
         say: Callable[[str], None] = print, progress: Optional[Callable[[int, int], None]] = None) -> PackResult:
    """Pack the images of ``src`` into WebDataset shards under ``out`` with an index (see the module docstring).

    Args:
        src: a folder of images or a list file (:func:`list_source`).
        out: the pack folder: new, empty, or an earlier pack of the same source and settings (resumed: its
            completed shards are kept); another pack is replaced only with ``overwrite``.
        workers: processes that decode and encode (0: this process).
        say: where lines and warnings go (warnings start with "warning:").
        progress: called with (images done, total) as images are packed.

    Raises:
        Interrupted: Ctrl-C or SIGTERM (exit 130); the completed shards are kept and the same command resumes.
    """
    settings.check()
    out = Path(out).expanduser().absolute()
    source = list_source(src, labels, allow_missing=allow_missing, say=say)
    n = len(source)
    manifest = {"format": FORMAT, "source": str(Path(src).expanduser().absolute()),
                "source_hash": source_hash(source, settings), "settings": asdict(settings),
                "classes": list(source.classes), "images": n, "shards": -(-n // settings.shard_size)}
    existed = out.exists()
    lock = _lock_pack(out)  # one pack command at a time per OUT: they would write the same shard files
    try:
        resuming = _prepare_out(out, manifest, overwrite)
        index = _finished_pack(out, manifest) if resuming else None
        if index is not None:
            done = len(index["samples"]["key"])
            _require_some(done, n, src, out)
            return PackResult(out, done, n - done, len(index["shards"]), len(index["shards"]), already=True)
        if not resuming:
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        (out / INDEX).unlink(missing_ok=True)
        keys = [key_of(i) for i in range(n)]
        todo = _shards_to_write(out, manifest, keys, settings.shard_size, resuming, say)
        reused = manifest["shards"] - len(todo)
        if reused:
            say(f"{out}: resuming: {reused} of {manifest['shards']} shards are complete and kept")
        _write_shards(out, source, settings, keys, todo, workers=workers, planned=manifest["shards"], say=say,
                      progress=progress)
        index = write_index(out, say=say)
        _record_shards(out, manifest, index)
        packed = len(index["samples"]["key"])
        _require_some(packed, n, src, out)
        return PackResult(out, packed, n - packed, len(index["shards"]), reused)
    finally:
        if lock is not None:  # removed while held, once this command writes nothing more
            (out / LOCK).unlink(missing_ok=True)
            if not existed and not any(out.iterdir()):  # refused before packing: leave no empty folder behind
                out.rmdir()
            os.close(lock)


def _finished_pack(out: Path, manifest: dict) -> dict | None:
    """The index of ``out`` when it is a finished pack of ``manifest`` (nothing to write), else None."""
    if not (out / INDEX).is_file():
        return None
    try:
        index = read_index(out)
    except DataError:
        return None
    # every shard of the manifest, not only those the index names: `simclr data index` run on an interrupted
    # pack indexes the shards it finds, and that index must not pass for a finished pack
    # and every shard checked against pack.json's record of it: its size, its member count, and that it reads
    # as a tar to its end (an index rebuilt from a damaged shard matches the damage, not the pack)
    records = _shard_records(previous_manifest(out))
    intact = ([sh["name"] for sh in index["shards"]] == [shard_name(k) for k in range(manifest["shards"])]
              and all((out / sh["name"]).is_file() and (out / sh["name"]).stat().st_size == sh["bytes"]
                      for sh in index["shards"])
              and all(not shard_problem(out / sh["name"], records.get(sh["name"])) for sh in index["shards"]))
    return index if intact and index.get("source_hash") == manifest["source_hash"] else None


def _shards_to_write(out: Path, manifest: dict, keys: list[str], size: int, resuming: bool,
                     say: Callable[[str], None]) -> list[int]:
    """The shards that are not complete (all of them unless ``resuming``); a damaged one is named."""
    records = _shard_records(previous_manifest(out)) if resuming else {}
    todo = []
    for k in range(manifest["shards"]):
        path = out / shard_name(k)
        if resuming and path.is_file() and _complete_shard(path, keys[k * size:(k + 1) * size],
                                                           records.get(shard_name(k))):
            continue
        if resuming and path.is_file():
            say(f"{path} {shard_problem(path, records.get(shard_name(k))) or 'does not hold the expected images'}; "
                "writing it again")
        todo.append(k)
    return todo


def _write_shards(out: Path, source: FileListSource, settings: PackSettings, keys: list[str], todo: list[int], *,
                  workers: int, planned: int, say: Callable[[str], None],
                  progress: Optional[Callable[[int, int], None]]) -> None:
    """Encode the images of the shards ``todo`` (in ``workers`` processes, 0: this one) and write each shard
    as it completes; ``planned``: the pack's number of shards. Ctrl-C or SIGTERM: :class:`Interrupted`, the
    completed shards kept and the shard being written removed."""
    n, size = len(source), settings.shard_size
    positions = [range(k * size, min(n, (k + 1) * size)) for k in todo]
    remaining = sum(len(r) for r in positions)
    jobs = ((i, str(source.files[i]), settings.shorter_side, settings.quality) for r in positions for i in r)
    done = n - remaining
    if progress:
        progress(done, n)
    writer: _ShardWriter | None = None
    pool = None
    try:
        if workers > 0 and remaining > 1:
            import multiprocessing

            pool = multiprocessing.get_context().Pool(workers, initializer=_worker_signals)
            results: Iterator = pool.imap(_encode_job, jobs, chunksize=8)
        else:
            results = map(_encode_job, jobs)
        current = -1
        for position, jpeg, err in results:
            k = position // size
            if k != current:
                if writer is not None:
                    _write_shard(writer)
                writer, current = _ShardWriter(out, k), k
            if jpeg is None:
                say(f"warning: skipping unreadable image {source.files[position]}: {err}")
            else:
                writer.add(keys[position], jpeg, int(source.labels[position]), source.files[position], source.classes)
            done += 1
            if progress:
                progress(done, n)
        if writer is not None:
            _write_shard(writer)
            writer = None
    except KeyboardInterrupt:
        complete = sum(1 for k in range(planned) if (out / shard_name(k)).is_file())
        raise Interrupted(f"packing stopped: {complete} of {planned} shards are complete and kept in {out}; "
                          "run the same command again to resume") from None
    finally:
        if writer is not None:
            writer.discard()
        if pool is not None:
            pool.terminate()
            pool.join()


def previous_manifest(out: Path) -> dict:
    """``out/pack.json`` as it is on disk ({} when missing or unreadable)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _require_some(packed: int, total: int, src: Path, out: Path) -> None:
    """A pack of no image is no dataset: an error (exit 2), not a success that training then refuses."""
    if packed == 0:
        raise DataError(f"{src}: none of its {total} images could be read (each is named in a warning above), so the "
                        f"pack in {out} holds no image; fix the images, then run the command again with --overwrite")


def _write_shard(writer: _ShardWriter) -> None:
    """Complete one shard (a function of its own, so a test can stop a pack between shards)."""
    writer.commit()


# ----------------------------------------------------------------------------- the index


@dataclass
class ShardEntry:
    """One sample of a shard, as its members say."""

    key: str
    jpg: tuple[int, int] | None = None  # (data offset, size)
    label: int = -1
    path: str = ""
    cls: str | None = None


def scan_shard(path: Path, warn: Callable[[str], None] | None = None) -> list[ShardEntry]:
    """The samples of one tar, in order, from its headers and its small members (.cls, .json).

    A damaged tar yields the samples before the damage (a member whose data runs past the end of the file is
    left out), with a warning through ``warn``; without ``warn`` the damage raises.
    """
    entries: dict[str, ShardEntry] = {}
    end = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                folder, _, base = m.name.rpartition("/")
                if not m.isfile() or "." not in base:
                    continue
                stem, ext = base.split(".", 1)  # WebDataset: the key ends at the first dot of the file name
                key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
                if m.offset_data + m.size > end:
                    raise tarfile.ReadError(f"member {m.name} runs past the end of the file")
                e = entries.setdefault(key, ShardEntry(key))
                if ext in ("jpg", "jpeg"):
                    e.jpg = (m.offset_data, m.size)
                elif ext == "cls":
                    e.label = int(tar.extractfile(m).read().decode().strip())
                elif ext == "json":
                    meta = json.loads(tar.extractfile(m).read().decode("utf-8", "surrogateescape"))
                    e.path, e.cls = str(meta.get("path", "")), meta.get("class")
    except (tarfile.TarError, OSError, ValueError) as e:
        if warn is None:
            raise
        warn(f"warning: {path} is damaged ({e}); only the {len(entries)} samples before the damage are indexed")
    return list(entries.values())


def write_index(out: Path, say: Callable[[str], None] = print, *, partial: bool = False) -> dict:
    """Build ``out/index.json`` from the shards themselves (and ``pack.json`` where present) and write it
    atomically; returns it. This is what ``simclr data index OUT`` runs.

    A pack with fewer shards than its ``pack.json`` plans (interrupted, or shards deleted) is a :class:`DataError`
    naming the command that finishes it, unless ``partial`` (``--partial``): then the shards found are indexed.
    So is a damaged shard (one that does not read as a tar to its end, or whose size or member count differs from
    what the pack recorded in ``pack.json``): the index never holds fewer images than the pack without
    ``partial``, and with it a warning names each shard and the images lost."""
    out = Path(out).expanduser().absolute()
    shards = sorted(p for p in out.iterdir() if SHARD_RE.match(p.name)) if out.is_dir() else []
    if not shards:
        raise DataError(f"{out}: no shard-NNNNNN.tar files to index; pack a dataset with `simclr data pack SRC {out}`",
                        missing=True)
    manifest = {}
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
    unfinished = unfinished_error(out, manifest, len(shards))
    if unfinished and not partial:
        raise DataError(unfinished, missing=True)
    records = _shard_records(manifest)
    damaged = {p.name: problem for p in shards if (problem := shard_problem(p, records.get(p.name)))}
    if damaged and not partial:
        first = next(iter(damaged))
        more = f" (and {len(damaged) - 1} more damaged shards)" if len(damaged) > 1 else ""
        raise DataError(f"{out / first} {damaged[first]}{more}: indexing it would leave images out of the pack; "
                        f"{repair_advice(out)}", missing=True)
    if partial and unfinished:
        say(f"warning: --partial: {unfinished.split(': finish it', 1)[0]}; the missing shards' images are not indexed")
    cols, names_by_label = _index_columns(shards, damaged, records, say)
    if partial and (unfinished or damaged):  # what the pack loses, in one number
        total = (sum(int(r.get("images", 0)) for r in records.values()) if records else manifest.get("images"))
        if isinstance(total, int) and total > len(cols["key"]):
            what = "the pack held" if records else "its source listed"
            say(f"warning: --partial: {out} now holds {len(cols['key'])} of the {total} images {what}: "
                f"{total - len(cols['key'])} image(s) left out of the index")
    classes = manifest.get("classes")
    if classes is None:
        top = max(cols["label"], default=-1)
        classes = [names_by_label.get(i, str(i)) for i in range(top + 1)]
    index = {"format": FORMAT, "source": manifest.get("source"), "source_hash": manifest.get("source_hash"),
             "settings": manifest.get("settings"), "classes": classes,
             "shards": [{"name": p.name, "bytes": p.stat().st_size} for p in shards], "samples": cols}
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (a lone surrogate): \u escapes keep the file UTF-8
        text = json.dumps(index, separators=(",", ":"))
    atomic_write_text(out / INDEX, text + "\n")
    return index


def _index_columns(shards: list[Path], damaged: dict[str, str], records: dict[str, dict],
                   say: Callable[[str], None]) -> tuple[dict[str, list], dict[int, str]]:
    """The index's per-sample columns (shard, offset, size, label, key, path) read from ``shards``, and the class
    names their members give; each ``damaged`` shard (name -> its problem) is read up to the damage and the
    images it loses are named."""
    cols: dict[str, list] = {"shard": [], "offset": [], "size": [], "label": [], "key": [], "path": []}
    names_by_label: dict[int, str] = {}
    for k, path in enumerate(shards):
        quiet = path.name in damaged  # said below, with what is lost
        entries = [e for e in scan_shard(path, warn=(lambda text: None) if quiet else say) if e.jpg is not None]
        if path.name in damaged:
            expected = records.get(path.name, {}).get("images")
            lost = (f"{expected - len(entries)} of its {expected} images are lost" if isinstance(expected, int)
                    else "the images after the damage are lost")
            last = f", those after {entries[-1].key}" if entries else ", all of them"
            say(f"warning: --partial: {path} {damaged[path.name]}: {lost}{last if isinstance(expected, int) else ''}; "
                f"{len(entries)} indexed")
        for e in entries:
            cols["shard"].append(k)
            cols["offset"].append(e.jpg[0])
            cols["size"].append(e.jpg[1])
            cols["label"].append(e.label)
            cols["key"].append(e.key)
            cols["path"].append(e.path)
            if e.label >= 0 and e.cls is not None:
                names_by_label[e.label] = e.cls
    return cols, names_by_label
