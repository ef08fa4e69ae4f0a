"""Reading a pack folder (``data.dataset = "shards"``): :class:`ShardSource`, random access by sample index.

:class:`ShardSource` reads a member with one positional read (``os.pread``) of its tar header and data and checks
the header names the member, so a sample costs one system call and no tar parsing; file descriptors are opened
lazily per process (safe after a DataLoader fork), at most :data:`MAX_OPEN` at a time. The per-sample index lives
in numpy arrays (keys and paths as :class:`~simclr_cli.data.listing.index.Strings`), not Python lists, so DataLoader
workers do not copy it page by page (copy-on-read).

Why not ``wids`` (webdataset's indexed reader, a separate ``wids`` package since webdataset 1.0): it re-scans a
whole tar on each shard it opens and keeps ~10 shards open (an LRU), so the one global random permutation per epoch
that keeps views and batch order a pure function of (seed, epoch, index) re-scans a shard on almost every sample
(see ``benchmarks/shard_throughput.py --wids``); it also copies shards into a cache folder and reads a damaged tar
as a whole-shard failure. The tars themselves stay plain WebDataset, readable by ``webdataset`` and ``wids``.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from simclr_cli.data.listing.index import Strings
from simclr_cli.data.shards.format import read_index, repair_advice
from simclr_cli.data.sources.images import read_image
from simclr_cli.errors import DataError


MAX_OPEN = 64  # file descriptors a ShardSource keeps open per process (the soft limit is often 1024)


def decode_packed(data: bytes) -> torch.Tensor:
    """A packed JPEG as uint8 (3, H, W): the pixels of :func:`~simclr_cli.data.sources.images.read_image`, faster.

    A packed image is plain RGB with no EXIF orientation, so PIL's pixels are used as they are, in PIL's
    (H, W, 3) memory: the tensor is a (3, H, W) view of it, not a contiguous copy. That saves the transposing
    copy, and torchvision's crop-and-resize of uint8 runs about twice as fast on that layout (measured in
    ``benchmarks/shard_throughput.py``; same pixels). Anything else (a tar packed by another tool) goes through
    ``read_image``.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG" and img.mode == "RGB" and "exif" not in img.info:
            img.draft("RGB", img.size)
            return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return read_image(io.BytesIO(data))


def _header_names(header: bytes, name: bytes) -> bool:
    """Whether a tar header names a member that starts with ``name`` (``KEY.``), its name read as tarfile reads
    it: a USTAR header splits a long path into ``prefix`` (offset 345) + "/" + ``name`` (offset 0). A ``name`` of
    100 bytes or more is not checked: it may be a pax or GNU long name, held in a header of its own before this one."""
    field = header[:100].split(b"\0", 1)[0]
    full = field
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            full = prefix + b"/" + field
    if full.startswith(name):
        return True
    return len(name) >= 100


class ShardSource:
    """A pack folder (``data.dataset = "shards"``, ``data.root`` = the folder) as an image source.

    ``load(i)`` reads sample ``i``'s JPEG with one positional read and decodes it with
    :func:`~simclr_cli.data.sources.images.read_image`; a damaged member (truncated, corrupt, or an index that no longer
    matches its shard) raises, so the loaders skip it and name it like an unreadable file. ``raw(i)`` gives the
    JPEG bytes (for decoders of their own, e.g. on a GPU).
    """

    def __init__(self, root: Path) -> None:
        root = Path(root).expanduser().absolute()
        index = read_index(root)
        self.root = root
        self.name = f"shards:{root}"
        self.classes = list(index["classes"])
        s = index["samples"]
        self._shard = np.asarray(s["shard"], dtype=np.int32)
        self._offset = np.asarray(s["offset"], dtype=np.int64)
        self._size = np.asarray(s["size"], dtype=np.int64)
        self._keys = Strings.of(s["key"])
        self.labels = np.asarray(s["label"], dtype=np.int64)  # -1: unlabeled
        self._paths = Strings.of(s["path"])
        self._shards = [sh["name"] for sh in index["shards"]]
        for sh in index["shards"]:
            p = root / sh["name"]
            size = p.stat().st_size if p.is_file() else None
            if size != sh["bytes"]:
                what = "is missing" if size is None else f"has {size} bytes, the index says {sh['bytes']}"
                raise DataError(f"shards: {p} {what}; the index does not match the shards: {repair_advice(root)}",
                                missing=True)
        if not len(self._keys):
            raise DataError(f"shards: {root} holds no images", missing=True)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> dict:  # pickled for spawned workers: no descriptors, no lock
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = -1

    def _after_fork(self) -> None:
        """A forked worker: its own descriptors and lock (one held at the fork stays held). Called before the lock
        is taken: taking the inherited one first would wait forever on a lock another thread held at the fork."""
        if self._pid != os.getpid():
            self._fds, self._pid, self._lock = OrderedDict(), os.getpid(), threading.Lock()

    def _fd(self, k: int) -> int:
        """The descriptor of shard ``k`` (the lock held, :meth:`_after_fork` called first)."""
        fd = self._fds.get(k)
        if fd is not None:
            self._fds.move_to_end(k)
            return fd
        fd = os.open(self.root / self._shards[k], os.O_RDONLY)
        self._fds[k] = fd
        while len(self._fds) > MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def member(self, index: int) -> str:
        """``OUT/shard-000003.tar:KEY.jpg``: where sample ``index`` is."""
        return f"{self.root / self._shards[int(self._shard[index])]}:{self._keys[index]}.jpg"

    def describe(self, index: int) -> str:
        path = self._paths[index]
        return self.member(index) + (f" (from {path})" if path else "")

    def raw(self, index: int) -> bytes:
        """The JPEG bytes of sample ``index``; raises OSError when the shard no longer holds them there."""
        k, offset, size = int(self._shard[index]), int(self._offset[index]), int(self._size[index])
        name = f"{self._keys[index]}.".encode("utf-8", "surrogateescape")  # KEY.jpg (KEY.jpeg in a foreign tar)
        self._after_fork()
        with self._lock:  # the LRU of descriptors; the read itself is positional (no shared file offset)
            fd = self._fd(k)
            data = os.pread(fd, size + 512, offset - 512) if offset >= 512 else b""
        if len(data) != size + 512:
            raise OSError(f"truncated member: {len(data) - 512 if data else 0} of {size} bytes at offset {offset}")
        if not _header_names(data[:512], name):
            raise OSError(f"the index does not match the shard at offset {offset} ({repair_advice(self.root)})")
        return data[512:]

    def load(self, index: int) -> torch.Tensor:
        return decode_packed(self.raw(index))

    def close(self) -> None:
        self._after_fork()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
