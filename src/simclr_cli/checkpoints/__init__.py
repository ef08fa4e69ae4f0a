"""Checkpoints: safetensors weights with string metadata, resumable state, atomic writes.

``model.safetensors`` holds ``backbone.<timm key>`` and ``head.<key>`` tensors and
metadata ``simclr.*`` (stage, backbone, cifar_stem, feature_dim, version, recipe).
Resume state lives apart, in ``state/step-N/``: weights, optimizer and trainer counters;
the newest K complete ones are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from simclr_cli.errors import SimclrError
from simclr_cli.utils import atomic_write_bytes, atomic_write_text

MODEL_FILE = "model.safetensors"
STATE_DIR = "state"


def prefixed_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with ``prefix.`` before each key, detached, contiguous, on CPU."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically. Metadata values must be strings."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be strings: {bad}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


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
    final = root / f"step-{int(trainer['step']):09d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(tmp / MODEL_FILE, prefixed_state("model", model), {"simclr.kind": "state"})
        atomic_write_bytes(tmp / "optimizer.pt", _torch_bytes(optimizer.state_dict()))
        atomic_write_text(tmp / "trainer.json", json.dumps(trainer, indent=2))  # written last: marks it complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: the older states stay, without debris
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in complete_states(root)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def read_trainer(root: Path) -> dict[str, Any] | None:
    """Counters of the newest complete state (step, epoch, world size, ...), or None."""
    latest = latest_state(root)
    return json.loads((latest / "trainer.json").read_text()) if latest else None


def load_state(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer from the newest complete state; returns its counters."""
    folder = latest_state(root)
    if folder is None:
        raise SimclrError(f"{root}: no complete resume state")
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
