"""Compact file lists and the folder listing cache (issue 13, "Large collections").

**Compact lists.** A Python list of a million path strings costs a million str objects; every DataLoader
worker that reads them writes their reference counts, so the pages holding them are copied into each
worker (copy-on-read) and the workers' memory grows over an epoch. :class:`Strings` keeps the strings in
one uint8 buffer with int64 offsets and :class:`Ints` keeps labels in one int64 array: a handful of Python
objects whatever the length, read-only sequences that index, iterate, slice and compare like lists.

**Listing cache.** Walking a folder of a million files takes minutes on a network file system, and every
run and every process did it. :func:`cached_listing` stores what a scan found (relative file names, labels,
classes) together with a record of the tree: the ``mtime_ns``, ``ctime_ns`` (which a ``chmod`` or a
``touch -d`` also moves), inode and device of every folder that was read (symbolic links followed), and the
stat of every file whose content decided the result (files with an odd extension that were opened to see
whether they are images). A later run re-``stat``s those folders and files, one call each and no folder
listing, and reuses the listing when nothing moved: adding, removing or renaming a file in any folder
changes that folder's times. A folder modified within
:data:`RACY_S` seconds of the scan is "racy" (a coarse file-system clock could hide a second change in the
same tick), so its names are hashed and that one folder is listed again to check them, until a check finds
it unchanged and older than the window (the cache is then rewritten without the mark).

Where: ``$SIMCLR_CACHE_DIR/index``, else ``$XDG_CACHE_HOME/simclr-cli/index``, else
``~/.cache/simclr-cli/index``; ``SIMCLR_CACHE_DIR=off`` (or the recipe key ``data.listing_cache = "off"``)
turns the cache off, and ``data.listing_cache = "PATH"`` puts it in PATH. Concurrent processes (torchrun
ranks) take an ``fcntl`` lock per listing, so one scans and the others read its result; the file is
written atomically, and a cache that cannot be read, written or locked is ignored (the folder is listed
as before), never an error.

This module sits at the bottom of ``data/`` with :mod:`simclr_cli.data.listing.folders`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, overload

import numpy as np

VERSION = 2  # of the cache file layout; a file of another version is rebuilt
RACY_S = 2.0  # a folder modified this close to its scan is re-checked by its names (FAT: 2 s mtime steps)
ENV = "SIMCLR_CACHE_DIR"


# ----------------------------------------------------------------------------- compact sequences


def _encode(items: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 buffer, int64 offsets of len + 1) of the strings, file-system encoded (round-trips any path)."""
    encoded = [os.fsencode(s) for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return buf, offsets


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsdecode's


def _readonly(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


class Strings(Sequence[str]):
    """A read-only sequence of strings held in one uint8 buffer and int64 offsets, after a common ``prefix``.

    ``s[i]`` is ``prefix + (bytes i, decoded)``; slicing with step 1 shares the buffer. Equal to any
    sequence of the same strings (a list included). It pickles as its two arrays, so a DataLoader worker
    receives a few buffers rather than a million objects.
    """

    __slots__ = ("_buf", "_off", "prefix", "_bv", "_ov")

    def __init__(self, buf: np.ndarray, offsets: np.ndarray, prefix: str = "") -> None:
        self._buf = _readonly(np.ascontiguousarray(buf, dtype=np.uint8))
        self._off = _readonly(np.ascontiguousarray(offsets, dtype=np.int64))
        self.prefix = prefix
        # Memoryviews index to Python ints and decode without a copy: about 3x faster than numpy scalars.
        self._bv = memoryview(self._buf)
        self._ov = memoryview(self._off)

    @classmethod
    def of(cls, items: Iterable[str], prefix: str = "") -> Strings:
        """The strings ``items`` (each taken after ``prefix``, which they must not repeat)."""
        return cls(*_encode(items), prefix=prefix)

    def __len__(self) -> int:
        return len(self._off) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Strings: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                stop = max(stop, start)
                return Strings(self._buf, self._off[start:stop + 1], self.prefix)
            return Strings.of((self._item(i) for i in range(start, stop, step)))  # prefix folded in
        i = int(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} strings")
        return self._item(i)

    def _item(self, i: int) -> str:
        return self.prefix + str(self._bv[self._ov[i]:self._ov[i + 1]], _FS_ENCODING, _FS_ERRORS)

    def __iter__(self) -> Iterator[str]:
        bv, ov, prefix = self._bv, self._ov, self.prefix
        for i in range(len(self)):
            yield prefix + str(bv[ov[i]:ov[i + 1]], _FS_ENCODING, _FS_ERRORS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Strings) and other.prefix == self.prefix:
            return bool(np.array_equal(self._off - self._off[0], other._off - other._off[0])
                        and np.array_equal(self._buf[self._off[0]:self._off[-1]],
                                           other._buf[other._off[0]:other._off[-1]]))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        # Only the bytes in use travel (a slice of a large list pickles small).
        a, b = int(self._off[0]), int(self._off[-1])
        return (Strings, (self._buf[a:b].copy(), self._off - a, self.prefix))

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"Strings([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes + self._off.nbytes)


class Ints(Sequence[int]):
    """A read-only sequence of ints held in one int64 array; items are Python ints. Equal to any sequence
    of the same ints; ``np.asarray(ints)`` is the array itself (no copy)."""

    __slots__ = ("_a",)

    def __init__(self, values: Iterable[int] | np.ndarray) -> None:
        if isinstance(values, Ints):
            a = values._a
        elif isinstance(values, np.ndarray):
            a = values.astype(np.int64, copy=False)
        else:
            values = values if isinstance(values, (list, tuple, range)) else list(values)
            a = np.fromiter((int(v) for v in values), dtype=np.int64, count=len(values))
        self._a = _readonly(a.reshape(-1))

    def __len__(self) -> int:
        return len(self._a)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Ints: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Ints(self._a[index])
        return int(self._a[index])

    def __iter__(self) -> Iterator[int]:
        a = self._a
        for s in range(0, len(a), 65536):  # Python ints a chunk at a time, never a whole list
            yield from a[s:s + 65536].tolist()

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (int, np.integer)) and bool((self._a == value).any())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ints):
            return bool(np.array_equal(self._a, other._a))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self._a if dtype is None else self._a.astype(dtype)

    def __reduce__(self):
        return (Ints, (self._a.copy(),))

    def __repr__(self) -> str:
        return f"Ints({self._a.tolist()[:5]}{'...' if len(self) > 5 else ''}, n={len(self)})"


def as_strings(items: Iterable[str]) -> Strings:
    """``items`` as :class:`Strings` (itself when it already is)."""
    return items if isinstance(items, Strings) else Strings.of(str(s) for s in items)


def as_ints(values: Iterable[int]) -> Ints:
    """``values`` as :class:`Ints` (itself when it already is)."""
    return values if isinstance(values, Ints) else Ints(values)


# ----------------------------------------------------------------------------- where the cache lives


def cache_folder(setting: str = "auto") -> Path | None:
    """The folder of listing caches for the recipe value ``setting`` (``data.listing_cache``); None: off.

    ``"off"``: no cache. A path: that folder. ``"auto"`` (or ''): ``$SIMCLR_CACHE_DIR/index`` (``off`` there
    turns it off), else ``$XDG_CACHE_HOME/simclr-cli/index``, else ``~/.cache/simclr-cli/index``.
    """
    s = (setting or "auto").strip()
    if s.lower() == "off":
        return None
    if s.lower() != "auto":
        return Path(s).expanduser()
    env = os.environ.get(ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(env).expanduser() / "index"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative
    return base / "simclr-cli" / "index"


# ----------------------------------------------------------------------------- recording a tree while scanning


def _names_digest(names: Iterable[str]) -> bytes:
    return hashlib.blake2b("\0".join(sorted(names)).encode("utf-8", "surrogateescape"), digest_size=16).digest()


class TreeRecord:
    """What a scan read, so that a later run can tell whether the tree changed: every folder (as reached,
    links followed) with its ``mtime_ns``/``ctime_ns``/inode/device, the names of racy folders, and the files whose
    content mattered (opened to sniff) with their ``mtime_ns``/size/inode."""

    def __init__(self) -> None:
        self.started_ns = time.time_ns()
        self.dirs: list[str] = []
        self.dir_stats: list[tuple[int, int, int, int]] = []
        self.dir_digests: list[bytes] = []
        self.files: list[str] = []
        self.file_stats: list[tuple[int, int, int]] = []

    def _racy(self, st: os.stat_result) -> bool:
        return max(st.st_mtime_ns, st.st_ctime_ns) >= self.started_ns - int(RACY_S * 1e9)

    def folder(self, rel: str, st: os.stat_result, names: list[str] | None) -> None:
        """A folder ``rel`` (relative, '' for the root), stat'ed before it was listed; ``names``: its entries."""
        self.dirs.append(rel)
        self.dir_stats.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
        self.dir_digests.append(_names_digest(names) if names is not None and self._racy(st) else b"")

    def file(self, rel: str, st: os.stat_result) -> None:
        """A file whose content decided whether it is listed."""
        self.files.append(rel)
        self.file_stats.append((st.st_mtime_ns, st.st_size, st.st_ino))


def _join(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


def _unchanged(root: str, data: Any, settled: list[int] | None = None) -> bool:
    """Whether every recorded folder and file of the tree still has its recorded stat (and racy folders
    their names). One stat per folder; no folder is listed except the racy ones. ``settled`` receives the
    racy folders whose names matched and whose times are now older than the racy window: later changes
    to them will move their times, so they need no listing any more."""
    checked_ns = time.time_ns()
    dirs = Strings(data["dir_buf"], data["dir_off"])
    racy = data["dir_racy"].tolist()
    times, ids = data["dir_times"].tolist(), data["dir_ids"].tolist()
    for i, (rel, (mtime, ctime), (ino, dev)) in enumerate(zip(dirs, times, ids)):
        path = _join(root, rel)
        st = os.stat(path)
        if (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) != (mtime, ctime, ino, dev):
            return False
        if racy[i]:
            if _names_digest(os.listdir(path)) != data["dir_digests"][i].tobytes():
                return False
            if settled is not None and max(mtime, ctime) < checked_ns - int(RACY_S * 1e9):
                settled.append(i)
    files = Strings(data["file_buf"], data["file_off"])
    for rel, mtime, (size, ino) in zip(files, data["file_mtime"].tolist(), data["file_ids"].tolist()):
        st = os.stat(_join(root, rel))
        if (st.st_mtime_ns, st.st_size, st.st_ino) != (mtime, size, ino):
            return False
    return True


# ----------------------------------------------------------------------------- the cached listing


class Listing(NamedTuple):
    """A scan's result: ``files`` (full paths, :class:`Strings` with the folder as prefix), ``labels``
    (:class:`Ints`, -1 for none) and ``classes``."""

    files: Strings
    labels: Ints
    classes: list[str]


Scan = Callable[[TreeRecord], tuple[list[str], list[int], list[str]]]
"""A scan: fills the record and returns (sorted relative file names, labels, classes)."""


def _prefix(folder: str) -> str:
    """What goes before a relative name so that ``prefix + rel == str(Path(folder) / rel)``."""
    if folder in ("", "."):
        return ""
    return folder if folder.endswith(os.sep) else folder + os.sep


def _key(folder: str, kind: str, options: dict) -> str:
    """The entry's name. The machine is part of it: device numbers of a network mount differ from one machine
    to the next, so nodes sharing a home folder would otherwise invalidate each other's entry on every run."""
    import socket

    text = json.dumps({"v": VERSION, "kind": kind, "folder": os.path.abspath(folder), "options": options,
                       "host": socket.gethostname()}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:24]}"


MAGIC = b"SIMCLR-LISTING\n"


def _pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One file: MAGIC, an 8-byte header length, a JSON header (``meta`` and where each array lies), then the
    arrays' raw bytes, each at an 8-byte boundary. Reading is one ``read`` and no copy (no zip, no CRC)."""
    table, chunks, at = {}, [], 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        table[name] = [arr.dtype.str, list(arr.shape), at]
        raw = arr.tobytes()
        chunks.append(raw + b"\0" * (-len(raw) % 8))
        at += len(chunks[-1])
    header = json.dumps({"meta": meta, "arrays": table, "payload": at}).encode("utf-8", "surrogateescape")
    header += b" " * (-(len(MAGIC) + 8 + len(header)) % 8)
    return b"".join([MAGIC, len(header).to_bytes(8, "little"), header, *chunks])


def _unpack(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """What :func:`_pack` wrote; raises ValueError on anything else (a truncated or foreign file)."""
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError("not a listing cache")
    n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8 + n
    head = json.loads(blob[len(MAGIC) + 8:start].decode("utf-8", "surrogateescape"))
    if len(blob) != start + head["payload"]:
        raise ValueError("truncated listing cache")
    arrays = {}
    for name, (dtype, shape, at) in head["arrays"].items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(blob, dtype=dt, count=count, offset=start + at).reshape(shape)
    return head["meta"], arrays


def _map(path: Path):
    """The file's bytes, memory-mapped read-only: nothing is copied, the pages are shared with the other
    processes that read it (torchrun ranks, forked workers), and only the pages used are read. The cache is
    replaced by rename, never rewritten in place, so a mapped file never changes."""
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _load(path: Path, folder: str, key: str) -> Listing | str:
    """The cached listing at ``path`` when it is readable, of this key and version, and the tree is unchanged;
    otherwise why not, in words ('' when there is no cache file), for the line that says it was listed again."""
    if not path.exists():
        return ""
    try:
        meta, data = _unpack(_map(path))
        if meta.get("v") != VERSION or meta.get("key") != key:
            return "the cache was written by another version; "
        settled: list[int] = []
        if not _unchanged(folder, data, settled):
            return "the folder changed since it was cached; "
        if settled:
            _settle(path, meta, data, settled)
        names = Strings(data["name_buf"], data["name_off"], _prefix(folder))
        labels = Ints(data["labels"])
        if len(labels) != len(names) or (len(names) and int(data["name_off"][-1]) != len(data["name_buf"])):
            return "the cache file was damaged (truncated or corrupt); "
        return Listing(names, labels, list(meta["classes"]))
    except Exception:  # noqa: BLE001 - truncated or corrupt: list the folder again
        return "the cache file was damaged (truncated or corrupt); "


def _settle(path: Path, meta: dict, data: dict[str, np.ndarray], settled: list[int]) -> None:
    """Rewrite the cache with the ``settled`` folders no longer racy (best effort: skipped when another
    process holds the lock or the write fails; the next run tries again)."""
    import fcntl

    from simclr_cli.utils import atomic_write_bytes

    try:
        with open(path.with_suffix(".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            racy = data["dir_racy"].copy()
            racy[settled] = False
            atomic_write_bytes(path, _pack(meta, {**data, "dir_racy": racy}))
    except Exception:  # noqa: BLE001 - only an optimization
        pass


def _save(path: Path, key: str, names: Strings, labels: Ints, classes: list[str], record: TreeRecord) -> None:
    from simclr_cli.utils import atomic_write_bytes

    dir_buf, dir_off = _encode(record.dirs)
    file_buf, file_off = _encode(record.files)
    meta = {"v": VERSION, "key": key, "classes": classes, "written_ns": time.time_ns()}
    blob = _pack(meta, {
        "name_buf": names._buf, "name_off": names._off, "labels": np.asarray(labels),
        "dir_buf": dir_buf, "dir_off": dir_off,
        "dir_times": np.array([s[:2] for s in record.dir_stats], dtype=np.int64).reshape(-1, 2),
        "dir_ids": np.array([s[2:] for s in record.dir_stats], dtype=np.uint64).reshape(-1, 2),
        "dir_digests": np.frombuffer(b"".join(d or bytes(16) for d in record.dir_digests),
                                     dtype=np.uint8).reshape(-1, 16),
        "dir_racy": np.array([bool(d) for d in record.dir_digests], dtype=bool),
        "file_buf": file_buf, "file_off": file_off,
        "file_mtime": np.array([s[0] for s in record.file_stats], dtype=np.int64),
        "file_ids": np.array([s[1:] for s in record.file_stats], dtype=np.uint64).reshape(-1, 2)})
    atomic_write_bytes(path, blob)


def _note(text: str, *, warning: bool = False, any_rank: bool = False) -> None:
    """One line from the main process (or, ``any_rank``, from this one): information on stdout (like the
    data builders' lines), warnings on stderr."""
    if any_rank or int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr if warning else sys.stdout, flush=True)


_UNAVAILABLE_SAID: set[str] = set()


def cached_listing(folder: str, kind: str, options: dict, scan: Scan, *, setting: str = "auto",
                   what: str = "") -> Listing:
    """The listing of ``folder`` by ``scan``, from the cache when the tree has not changed since it was made.

    Args:
        folder: the scanned folder as the caller names it (file paths start with it).
        kind: what was scanned ('images', 'class-folders'), part of the cache key with ``options``.
        options: the scan's options (a JSON-able dict); another value is another cache entry.
        scan: lists the folder (see :data:`Scan`).
        setting: ``data.listing_cache`` ('auto', 'off' or a folder), see :func:`cache_folder`.
        what: how messages name the data (e.g. ``folder:/data/x``).
    """
    where = cache_folder(setting)
    if where is None:
        return _scanned(folder, scan, TreeRecord())[0]
    key = _key(folder, kind, options)
    path = where / f"{key}.listing"
    hit = _load(path, folder, key)
    if isinstance(hit, Listing):
        return hit
    lock = None
    try:
        where.mkdir(parents=True, exist_ok=True)
        lock = open(where / f"{key}.lock", "a+b")  # noqa: SIM115 - held across the scan
        import fcntl

        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # the first process scans; the others wait, then read
        hit = _load(path, folder, key)
        if isinstance(hit, Listing):
            return hit
    except Exception as e:  # noqa: BLE001 - no cache here (read-only, no locks): list without it
        if str(where) not in _UNAVAILABLE_SAID:
            _UNAVAILABLE_SAID.add(str(where))
            _note(f"warning: the listing cache in {where} is not usable ({type(e).__name__}: {e}); "
                  f"listing {folder} without it (data.listing_cache=off or {ENV}=off silences this)", warning=True)
        if lock is not None:
            lock.close()
        return _scanned(folder, scan, TreeRecord())[0]
    try:
        return _scan_and_save(folder, scan, path, key, why=hit, what=what)
    finally:
        lock.close()  # releases the flock


def _scanned(folder: str, scan: Scan, record: TreeRecord) -> tuple[Listing, float]:
    """``scan`` run into ``record``: the listing (paths after ``folder``) and the seconds it took."""
    t0 = time.perf_counter()
    rel, labels, classes = scan(record)
    names, ints = Strings.of(rel), Ints(labels)
    seconds = time.perf_counter() - t0
    return Listing(Strings(names._buf, names._off, _prefix(folder)), ints, classes), seconds


def _scan_and_save(folder: str, scan: Scan, path: Path, key: str, *, why: str, what: str) -> Listing:
    """Scan ``folder`` (the cache's lock held) and write the cache file ``path``; ``why``: why the cache was not
    used ('' when there was none), for the line that says the folder was listed."""
    record = TreeRecord()
    listing, seconds = _scanned(folder, scan, record)
    try:
        _save(path, key, listing.files, listing.labels, listing.classes, record)
        _note(f"{what or folder}: listed {len(listing.files):,} images in {seconds:.1f} s; {why}listing cached in "
              f"{path} (reused until a folder in the tree changes; data.listing_cache=off or "
              f"{ENV}=off turns it off)", any_rank=True)  # whichever process got the lock built it
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written is no error
        _note(f"warning: could not write the listing cache {path} ({type(e).__name__}: {e}); "
              f"{folder} will be listed again next run", warning=True)
    return listing
