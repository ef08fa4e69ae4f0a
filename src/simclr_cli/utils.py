"""Small helpers shared across the package."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def mix_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints or strings).

    Used to derive per-sample, per-epoch, per-view randomness so that data order
    and views do not depend on workers, processes or interruptions.
    """
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read 1 MiB at a time."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename, so a crash never leaves half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` through a temp file and a rename. A refused write (disk full, read-only folder)
    raises a one-line :class:`~simclr_cli.errors.SimclrError` naming ``path``; the old file stays."""
    path = Path(path)
    try:
        _atomic_write_bytes(path, data)
    except OSError as e:
        from simclr_cli.errors import from_os_error

        err = from_os_error(e, path)
        if err is None:
            raise
        raise err from e


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out_folder(folder: Path) -> None:
    """Refuse an output folder that cannot be one before any work: a file in its place (or in the place of
    a parent), or a folder this user may not write into (:class:`~simclr_cli.errors.UsageError`, exit 2)."""
    from simclr_cli.errors import UsageError

    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"output folder {folder}: {probe} is a file, not a folder; pass --out with a folder path, "
                         "or move the file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder}: {probe} is not writable; pass --out with a writable folder, "
                         "or fix its permissions")
