"""Checkpoints: safetensors weights with string metadata, resumable state, atomic writes.

``model.safetensors`` holds ``backbone.<timm key>`` and ``head.<key>`` tensors and
metadata ``simclr.*`` (stage, backbone, cifar_stem, feature_dim, version, recipe).
Resume state lives apart, in ``state/``: weights, optimizer and trainer counters.
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


def save_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any]) -> None:
    """Write resume state to ``folder`` atomically: build it beside, then swap it in."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(tmp / MODEL_FILE, prefixed_state("model", model), {"simclr.kind": "state"})
    buf = _torch_bytes(optimizer.state_dict())
    atomic_write_bytes(tmp / "optimizer.pt", buf)
    atomic_write_text(tmp / "trainer.json", json.dumps(trainer, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer from ``folder``; returns the trainer counters."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.exists():  # crashed between the two renames
        old.rename(folder)
    tensors, _ = load_weights(folder / MODEL_FILE)
    model.load_state_dict(sub_state(tensors, "model"), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / "trainer.json").read_text())


def has_state(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "trainer.json").exists() or (folder.with_name(folder.name + ".old") / "trainer.json").exists()


def _torch_bytes(obj: Any) -> bytes:
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()
