"""Run by torchrun from test_multiprocess.py: GlobalBatchNorm on 2 halves == BatchNorm on the whole batch."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from simclr_cli.models.global_bn import convert_global_bn


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)  # same on every process
        ref.bias.uniform_(-0.5, 0.5, generator=g)
    glob = convert_global_bn(nn.Sequential(nn.BatchNorm2d(3).double()))[0]
    glob.load_state_dict(ref.state_dict())
    xr = x_full.clone().requires_grad_()
    (ref(xr) * w).sum().backward()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    half = slice(rank * 4, rank * 4 + 4)
    x = x_full[half].clone().requires_grad_()
    y = glob(x)
    (y * w[half]).sum().backward()
    pg = torch.cat([glob.weight.grad, glob.bias.grad])
    dist.all_reduce(pg)  # what DDP would do (sum; the loss here is a sum, not a mean)
    result = {
        "out": torch.allclose(
            y.detach(), nn.functional.batch_norm(x_full, None, None, ref.weight, ref.bias, True)[half].detach(), atol=1e-9
        ),
        "input_grad": torch.allclose(x.grad, xr.grad[half], atol=1e-9),
        "param_grad": torch.allclose(pg, torch.cat([ref.weight.grad, ref.bias.grad]), atol=1e-9),
        "running": torch.allclose(glob.running_mean, ref.running_mean) and torch.allclose(glob.running_var, ref.running_var),
    }
    if rank == 0:
        json.dump(result, open(sys.argv[1], "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
