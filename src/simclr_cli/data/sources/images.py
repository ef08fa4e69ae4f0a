"""Image sources: indexable collections of (uint8 CHW image, label) with names for errors.

A source knows how to load one image and what to call it in a message. Small
datasets (CIFAR, STL-10, synthetic) live in memory as uint8 tensors; image
folders are read from disk on demand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Protocol, Sequence

import numpy as np
import torch

from simclr_cli.data.listing.folders import IMAGE_EXTENSIONS, scan_class_folders
from simclr_cli.data.listing.index import Ints, as_ints, as_strings
from simclr_cli.data.listing.lists import FileList
from simclr_cli.errors import DataError


class ImageSource(Protocol):
    """What the datasets and loaders need from a collection of images."""

    name: str
    classes: list[str]
    labels: list[int]  # -1 where a sample has no label

    def __len__(self) -> int: ...

    def load(self, index: int) -> torch.Tensor:
        """The image as a uint8 tensor (3, H, W); raises on an unreadable file."""
        ...

    def describe(self, index: int) -> str:
        """A name for the sample in messages: the file path, or ``name[index]``."""
        ...


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
    other.labels = as_ints([index[other.classes[y]] if y >= 0 else y for y in other.labels])
    other.classes = list(reference.classes)


class TensorSource:
    """Images held in memory as one uint8 tensor (N, 3, H, W); ``files``, when given, name them in messages
    and outputs (an image folder decoded into memory)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], classes: list[str], name: str,
                 files: Sequence[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = as_ints(labels)
        self.classes = classes
        self.name = name
        self.files = as_strings(files) if files is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def describe(self, index: int) -> str:
        return self.files[index] if self.files is not None else f"{self.name}[{index}]"


_IN_MEMORY_FILE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def unreadable_reason(e: BaseException, name: str) -> str:
    """Why an image is unreadable, in words, naming ``name`` (the file, or the shard member) where the decoder
    named the in-memory copy it was given (PIL: ``cannot identify image file <_io.BytesIO object at 0x...>``)."""
    return _IN_MEMORY_FILE.sub(lambda _: str(name), str(e))


def read_image(src: str | Path | BinaryIO, *, min_side: int | None = None) -> torch.Tensor:
    """Decode any PIL-readable image to uint8 RGB (3, H, W), upright; grayscale, palette, CMYK and alpha become RGB.

    This is the one decoder every source uses. An EXIF orientation tag (phone photos) is applied, so the
    image is stored the way it is shown. High-bit-depth grayscale is scaled, not clipped
    (PIL's own ``convert`` clips it to 255, turning a 16-bit image almost white): see :func:`to_8bit`.

    Args:
        src: a path or a binary file object (e.g. ``io.BytesIO`` of a shard member).
        min_side: when given, a JPEG at least twice as large is decoded smaller with libjpeg's DCT scaling
            (PIL's draft mode: 1/2, 1/4 or 1/8), the largest reduction whose shorter side stays
            >= ``min_side``; other formats and smaller JPEGs are decoded at full size. ``None``: full size.
    """
    return read_image_scaled(src, min_side=min_side)[0]


def read_image_scaled(src: str | Path | BinaryIO, *, min_side: int | None = None) -> tuple[torch.Tensor, int]:
    """:func:`read_image`, also returning the reduction actually applied (1, 2, 4 or 8): decoded pixel
    ``(y, x)`` covers the full-size pixels ``[y*s, (y+1)*s) x [x*s, (x+1)*s)`` (upright coordinates)."""
    from PIL import Image

    with Image.open(src) as img:
        return decode_opened(img, min_side=min_side)


def decode_opened(img, *, min_side: int | None = None, channels_last: bool = False) -> tuple[torch.Tensor, int]:
    """The work of :func:`read_image_scaled` on an image PIL has opened (header read, pixels not yet).

    ``channels_last``: a plain RGB image (no EXIF rotation) is returned as a (3, H, W) view of PIL's
    (H, W, 3) pixels instead of a contiguous copy: the same values, one copy less, and torchvision's uint8
    crop-and-resize runs faster on that layout.
    """
    from PIL import ImageOps

    size = (img.width, img.height)
    factor = draft_factor(min(size), min_side) if img.format == "JPEG" else 1
    if factor > 1:  # PIL picks the largest 1/s with W // s >= requested width: ask for exactly 1/factor
        size = (img.width // factor, img.height // factor)
    full_width = img.width
    drafted = img.draft("RGB", size)  # also lets JPEG decode straight to RGB
    scale = _draft_scale(drafted, full_width)
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # checked first: exif_transpose copies even upright images
        img = ImageOps.exif_transpose(img)
    elif channels_last and img.mode == "RGB":
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), scale
    if img.mode in _WIDE_MODES:
        gray = to_8bit(np.asarray(img), img.mode)
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), scale


def draft_factor(short_side: int, min_side: float | None) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that keeps ``short_side / s >= min_side``."""
    if not min_side or min_side <= 0:
        return 1
    for s in (8, 4, 2):
        if short_side / s >= min_side:
            return s
    return 1


def _draft_scale(drafted: tuple | None, width: int) -> int:
    """The reduction PIL's ``draft`` chose, from the box it returns: (0, 0, W / s, H / s) in original pixels."""
    if not drafted or not drafted[1] or not drafted[1][2]:
        return 1
    return int(round(width / drafted[1][2]))


EXIF_ORIENTATION = 0x0112  # the EXIF orientation tag
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """A high-bit-depth grayscale array (PIL modes I;16*, I, F) as uint8, scaled rather than clipped.

    * 16-bit (I;16, I;16B, ...) and 32-bit integer 'I' whose values fit 0..65535 (how PIL opens most
      16-bit PNG/TIFF files): ``round(v / 257)``, so 0 -> 0 and 65535 -> 255 (the full 16-bit scale;
      a dark image stays dark).
    * 'I' with values outside 0..65535, and float 'F' outside [0, 1]: scaled linearly from the image's
      own min..max to 0..255 (no fixed scale is known). 'F' within [0, 1]: ``round(v * 255)``.
    """
    a = arr.astype(np.float64)
    if a.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if mode == "F" and 0.0 <= lo and hi <= 1.0:
        a = a * 255.0
    elif mode != "F" and 0.0 <= lo and hi <= 65535.0:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


class FileListSource:
    """Images given as a list of files with integer labels (or rows of a multi-hot ``targets`` matrix).

    ``files`` and ``labels`` are kept as compact read-only sequences (:class:`~simclr_cli.data.listing.index.Strings`,
    :class:`~simclr_cli.data.listing.index.Ints`: a few numpy arrays, no per-file Python object), so DataLoader
    workers do not copy a million strings through reference counting; they index and iterate like lists.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: list[str], name: str,
                 targets: torch.Tensor | None = None) -> None:
        self.files = as_strings(files)
        self.labels = as_ints(labels)
        self.classes = classes
        self.name = name
        self.targets = targets  # multi-label: (N, C) 0/1; labels[i] is then the row index i

    @classmethod
    def of(cls, listed: FileList) -> FileListSource:
        """The images a list file names (:func:`~simclr_cli.data.listing.lists.read_file_list`)."""
        return cls(listed.files, listed.labels, listed.classes, listed.name)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        return read_image(self.files[index])

    def raw(self, index: int) -> bytes:
        """The file's encoded bytes (reduced-size and GPU decoding, :mod:`simclr_cli.data.pipeline.decode`)."""
        with open(self.files[index], "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        return self.files[index]


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` has an image file (by extension) directly inside it; stops at the first one."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".") for e in entries)
    except OSError:
        return False


class ImageFolderSource(FileListSource):
    """``root/<split>/<class>/<image>``: class folders sorted by name, any common extension in any case."""

    def __init__(self, root: Path, split: str, *, cache: str = "auto") -> None:
        """``cache``: ``data.listing_cache`` (see :mod:`simclr_cli.data.listing.index`)."""
        root = Path(root).expanduser()
        folder = root / split
        if not folder.is_dir():
            unlabeled = (f". {root} holds images itself: to pretrain on them unlabeled (any depth), "
                         f"--set data.dataset=folder --set data.root={root}" if _holds_images(root) else "")
            raise DataError(
                f"imagefolder: {folder} does not exist; expected images as {folder}/<class>/<image>. "
                f"Point data.root at the dataset (e.g. --set data.root=/path/to/data) or fix data.{_split_key(split)}"
                + unlabeled,
                missing=True,
            )
        files, labels, classes = scan_class_folders(folder, sniff=False, cache=cache)
        if not classes:
            raise DataError(f"imagefolder: {folder} has no class folders; expected {folder}/<class>/<image>. "
                            f"For unlabeled images (flat or nested), use data.dataset=folder with data.root={folder}",
                            missing=True)
        if not len(files):
            raise DataError(
                f"imagefolder: no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} in any case)", missing=True
            )
        super().__init__(files, labels, classes, f"imagefolder:{folder}")


def _split_key(split: str) -> str:
    return "train_split" if split.startswith("train") else "val_split"


def torchvision_source(dataset: str, root: str, split: str, download: bool, *, expected: str) -> TensorSource:
    """CIFAR-10/100 (splits train, test) and STL-10 (train, test, unlabeled, train+unlabeled) in memory.

    ``expected`` is what ``root`` must hold (the registry's hint, e.g. ``cifar-10-batches-py/``); the
    registry checks ``split`` first.
    """
    from torchvision import datasets

    root = str(Path(root).expanduser())
    try:
        if dataset == "stl10":
            ds = datasets.STL10(root, split=split, download=download)
            images = torch.from_numpy(ds.data)
            labels = [int(v) for v in ds.labels]
            classes = list(ds.classes)
        else:
            cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = [int(v) for v in ds.targets]
            classes = list(ds.classes)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        where = Path(root) / expected.rstrip("/")
        how = "set data.download=true (needs internet)" if not download else "check the download; it failed"
        raise DataError(
            f"{dataset}: no usable data at {where} ({str(e).splitlines()[0]}); {how}, "
            f"or point data.root at a folder that holds {expected}",
            missing=True,
        ) from None
    except OSError as e:  # download without network, unreadable root, ...
        raise DataError(f"{dataset}: cannot read or download into {root}: {e}", missing=True) from None
    return TensorSource(images, labels, classes, name=f"{dataset}:{split}")


class SubsetSource:
    """A view of some items of a source (e.g. the labeled subset); unreadable items fall back
    to the next item of the subset, never to an item outside it."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = as_ints(indices)  # compact, like FileListSource's lists
        self.name = source.name
        self.classes = source.classes
        labels = source.labels
        self.labels = as_ints(np.asarray(labels)[np.asarray(self.indices)] if isinstance(labels, Ints)
                              else [labels[i] for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> torch.Tensor:
        return self.source.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])


class MemorySource:
    """An image folder decoded once into memory (uint8 tensors of any size); unreadable files keep
    their error and raise it on ``load``, so they are skipped and named like on disk."""

    def __init__(self, folder: FileListSource, images: list[torch.Tensor | None], errors: dict[int, str]) -> None:
        self.files = folder.files
        self.labels = folder.labels
        self.classes = folder.classes
        self.name = folder.name
        self.images = images
        self.errors = errors

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> torch.Tensor:
        img = self.images[index]
        if img is None:
            raise OSError(self.errors[index])
        return img

    def describe(self, index: int) -> str:
        return self.files[index]


def decode_threads() -> int:
    """Threads for :func:`decode_in_memory`: the process's thread budget (:mod:`simclr_cli.threads`: its CPU
    affinity and cgroup quota, shared among the processes of this machine), at least 1."""
    from simclr_cli import threads

    return threads.current().decode_threads()


def decode_in_memory(folder: FileListSource, mode: str, limit_gb: float, say=print, *, threads: int | None = None):
    """``folder`` (an image folder or list of files) decoded into memory when ``mode`` is 'always', or 'auto' and the estimate fits ``limit_gb``.

    Same-size images become one :class:`TensorSource` (the batched backend then crops on the
    device); others a :class:`MemorySource`. Returns ``folder`` itself when it stays on disk.
    Decoding runs on ``threads`` threads (default :func:`decode_threads`), in chunks of consecutive
    files; the result (images, order, the errors of unreadable files) is the same as decoding one by one.
    """
    if mode == "never" or not folder.files:
        return folder
    first = None
    for path in folder.files[:16]:  # an unreadable first file (sorted first, e.g. a stray "_broken.jpg") gives
        try:  # no size: the estimate comes from the first readable one
            first = read_image(path)
            break
        except Exception:  # noqa: BLE001 - any decoder error means "unreadable"
            continue
    if first is None:  # no estimate: stay on disk
        return folder
    estimate = first.numel() * len(folder.files)
    if mode == "auto" and estimate > limit_gb * 1024**3:
        return folder
    n = len(folder.files)
    threads = max(1, min(threads or decode_threads(), n))
    say(f"{folder.name}: decoding {n} images into memory (about {estimate / 1024**2:.0f} MB, {threads} threads)")
    images: list[torch.Tensor | None] = [None] * n
    errors: dict[int, str] = {}

    def decode(start: int, stop: int) -> None:  # each index is written by one task only
        for i in range(start, stop):
            try:
                images[i] = read_image(folder.files[i])
            except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
                errors[i] = f"{type(e).__name__}: {e}"

    # PIL decodes with the GIL released, so threads use the cores. Chunks of consecutive files keep the
    # number of futures small (a million files); several chunks per thread balance slow and fast files.
    chunk = max(1, min(256, -(-n // (threads * 8))))
    if threads == 1:
        decode(0, n)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="simclr-decode") as pool:
            for f in [pool.submit(decode, a, min(a + chunk, n)) for a in range(0, n, chunk)]:
                f.result()
    errors = dict(sorted(errors.items()))
    shapes = {tuple(img.shape) for img in images if img is not None}
    if not errors and len(shapes) == 1:
        return TensorSource(torch.stack(images), folder.labels, folder.classes, folder.name,  # type: ignore[arg-type]
                            files=folder.files)
    return MemorySource(folder, images, errors)
