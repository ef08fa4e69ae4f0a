"""Building the Accelerator and global BN: the parts of a run that depend on the hardware."""

from __future__ import annotations

import torch
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from torch import nn

from simclr_cli.errors import UsageError
from simclr_cli.models.global_bn import convert_global_bn, local_batchnorms


def make_accelerator(mixed_precision: str, key: str = "pretrain.mixed_precision", *,
                     log_with: list | None = None, project_dir: Path | None = None) -> Accelerator:
    """An Accelerator for this launch (plain process, torchrun or ``accelerate launch``).

    fp16 needs a GPU; on CPU use ``bf16`` or ``no``. ``log_with``: Accelerate trackers
    (:func:`simclr_cli.engine.trackers.build_trackers`), started later by ``init_trackers``;
    ``project_dir``: the stage folder (Accelerate's logging directory).
    """
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError(f"{key}='fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    if AcceleratorState._shared_state:
        # Several runs in one Python process (tests, notebooks) may differ in precision;
        # the process-group part (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True lets Accelerate pick up torchrun/accelerate-launch processes on CPU (gloo).
    # A long timeout: the kNN monitor's and the probes' scoring runs on the main process (on features every
    # process extracted) while the others wait at a barrier, which on ImageNet-size data can take minutes.
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=3))
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout],
                       log_with=log_with or None, project_dir=str(project_dir) if project_dir is not None else None)


def convert_sync_bn(model: nn.Module, accelerator: Accelerator, enabled: bool) -> tuple[nn.Module, str]:
    """Global BN across processes when asked for and there is more than one process.

    Returns the model and a word for the log: ``local`` (one process, or off),
    ``sync`` (torch SyncBatchNorm on GPUs, via timm's converter that also handles
    BatchNormAct2d) or ``global`` (our all-reduce BN for CPU processes, where
    torch's SyncBatchNorm cannot run).
    """
    if not enabled or accelerator.num_processes == 1:
        return model, "local"
    if accelerator.device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model), "sync"
    model = convert_global_bn(model)
    left = local_batchnorms(model)
    if left:
        return model, f"global (except {len(left)} layer(s) of unsupported type, e.g. {left[0]})"
    return model, "global"
