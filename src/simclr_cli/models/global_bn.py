"""Global BatchNorm for processes on CPU (gloo), where torch's SyncBatchNorm refuses to run.

SIMCLR.md section 2: BN statistics must be computed over the global batch, or
positives on the same device leak local information. On GPUs we use
``torch.nn.SyncBatchNorm`` (through timm's converter, which also handles timm's
BatchNormAct2d). On CPU processes, :class:`GlobalBatchNorm` all-reduces the
per-channel sums, with autograd, so forward and backward equal one big batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from simclr_cli.dist import all_reduce_sum_with_grad as all_reduce_with_grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of every process (training mode); plain BN in eval mode.

    Works for (N, C) and (N, C, ...) inputs. Statistics use two all-reduces (mean,
    then the centred second moment) for accuracy; running stats get the unbiased
    variance, as ``nn.BatchNorm`` does.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        in_dtype = x.dtype
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 even under autocast
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), count])
        stats = all_reduce_with_grad(stats)
        total = stats[-1]
        mean = stats[:-1] / total
        centred = x - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * total / max(total.item() - 1, 1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
                self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(in_dtype)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.BatchNorm1d/2d/3d`` with :class:`GlobalBatchNorm`, sharing parameters and buffers.

    Other norm layers (timm's ``BatchNormAct2d`` among them) are left as they are;
    :func:`local_batchnorms` lists them so the caller can warn.
    """
    out = module
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        new = convert_global_bn(child)
        if new is not child:
            setattr(out, name, new)
    return out



def local_batchnorms(module: nn.Module) -> list[str]:
    """Names of BatchNorm layers that are neither global nor synchronized."""
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm))]
