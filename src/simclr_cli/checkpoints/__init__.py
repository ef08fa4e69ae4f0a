"""Checkpoints: safetensors weights with string metadata, resumable state, atomic writes.

``model.safetensors`` holds ``backbone.<timm key>`` and ``head.<key>`` tensors and
metadata ``simclr.*`` (stage, backbone, cifar_stem, feature_dim, version, recipe).
Resume state lives apart, in ``state/step-N/``: weights, optimizer and trainer counters;
the newest K complete ones are kept.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from simclr_cli.errors import DiskFull, SimclrError, from_os_error
from simclr_cli.utils import atomic_write_bytes, atomic_write_text

MODEL_FILE = "model.safetensors"
STATE_DIR = "state"


class StateWriteError(DiskFull):
    """A resume state could not be written (disk full, a read-only or unwritable folder): a runtime failure
    (exit 1); the last complete state is intact and loadable."""

    exit_code = 1


def human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def prefixed_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with ``prefix.`` before each key, detached, contiguous, on CPU."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def weights_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``tensors`` serialized as a safetensors file (own copies on CPU, so shared storage is fine). Metadata
    values must be strings."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be strings: {bad}")
    return st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically. Metadata values must be strings."""
    atomic_write_bytes(Path(path), weights_bytes(tensors, metadata))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        return st_load(data), read_metadata(path)
    except Exception as e:  # noqa: BLE001 - OSError or safetensors' own error types
        raise SimclrError(f"{path}: cannot read checkpoint: {e}") from None


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix.`` with the prefix removed (for ``load_state_dict(strict=True)``)."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def save_state(
    root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any], keep: int = 2
) -> Path:
    """Write resume state as ``root/step-NNNNNNNNN/`` and keep the newest ``keep`` of them.

    The folder is built as ``step-N.tmp`` and renamed only when complete, so a process
    killed mid-save leaves the previous states untouched; older states are pruned
    only after the new one is in place.
    """
    root = Path(root)
    final = state_folder(root, trainer["step"])
    tmp = final.with_name(final.name + ".tmp")
    # Serialized first, so a refused write can say how much space the state needs.
    weights = weights_bytes(prefixed_state("model", model), {"simclr.kind": "state"})
    opt = _torch_bytes(optimizer.state_dict())
    counters = json.dumps(trainer, indent=2)
    writing = tmp
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writing = tmp / MODEL_FILE
        atomic_write_bytes(writing, weights)
        writing = tmp / "optimizer.pt"
        atomic_write_bytes(writing, opt)
        writing = tmp / "trainer.json"
        atomic_write_text(writing, counters)  # written last: marks it complete
        writing = final
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: the older states stay, without debris
        refused = _write_refusal(e)
        if refused is None:
            raise
        need = human_size(len(weights) + len(opt) + len(counters))
        last = latest_state(root)
        kept = (f"the last complete state ({last.name}) is intact and loadable" if last is not None
                else "no earlier state was saved")
        todo = "free at least that much space" if refused == "no space left on device" else f"make {root} writable"
        raise StateWriteError(f"cannot save the resume state of step {int(trainer['step'])}: {writing}: {refused}; "
                              f"the state needs {need}; {kept} in {root}. To go on, {todo}") from e
    for old in complete_states(root)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_refusal(e: BaseException) -> str | None:
    """``strerror: path`` when ``e`` (or the OSError behind it) is a full disk or a refused permission."""
    os_error = e if isinstance(e, OSError) else e.__cause__ if isinstance(e.__cause__, OSError) else None
    if os_error is None or from_os_error(os_error) is None:
        return None
    if os_error.errno in (errno.ENOTDIR, errno.EEXIST):
        return None
    if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    return (os_error.strerror or os.strerror(os_error.errno or 0)).lower()


def complete_states(root: Path) -> list[Path]:
    """Complete state folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / "trainer.json").is_file())


def latest_state(root: Path) -> Path | None:
    """The newest complete state folder, or None."""
    states = complete_states(root)
    return states[-1] if states else None


def state_folder(root: Path, step: int) -> Path:
    """Where the state of ``step`` is (complete when it holds ``trainer.json``)."""
    return Path(root) / f"step-{int(step):09d}"


def read_trainer(root: Path, step: int | None = None) -> dict[str, Any] | None:
    """Counters of the newest complete state, or of the state of ``step`` (step, epoch, world size, ...), or None."""
    folder = latest_state(root) if step is None else state_folder(root, step)
    if folder is None or not (folder / "trainer.json").is_file():
        return None
    return json.loads((folder / "trainer.json").read_text())


def load_state(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               step: int | None = None) -> dict[str, Any]:
    """Restore weights and optimizer from the newest complete state (or that of ``step``); returns its counters."""
    folder = latest_state(root) if step is None else state_folder(root, step)
    if folder is None or not (folder / "trainer.json").is_file():
        raise SimclrError(f"{root}: no complete resume state" + (f" of step {step}" if step is not None else ""))
    tensors, _ = load_weights(folder / MODEL_FILE)
    model.load_state_dict(sub_state(tensors, "model"), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / "trainer.json").read_text())


def has_state(root: Path) -> bool:
    return latest_state(root) is not None


def _torch_bytes(obj: Any) -> bytes:
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()
