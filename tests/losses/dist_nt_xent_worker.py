"""Run by torchrun in test_contrastive_multiprocess.py: NT-Xent on 2 processes vs 1."""

import json
import sys

import torch
import torch.distributed as dist

from simclr_cli.objectives.base import global_z_std
from simclr_cli.losses.contrastive import nt_xent


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 8, 6
    z1_full = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2_full = torch.randn(n, d, generator=g, dtype=torch.float64)
    # The 1-process reference, computed before the process group exists.
    a = z1_full.clone().requires_grad_()
    b = z2_full.clone().requires_grad_()
    ref = nt_xent(a, b, 0.3)
    ref.backward()
    ref_z_std = global_z_std(torch.cat([z1_full, z2_full])).item()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * n // world, (rank + 1) * n // world)
    z1 = z1_full[rows].clone().requires_grad_()
    z2 = z2_full[rows].clone().requires_grad_()
    loss = nt_xent(z1, z2, 0.3)
    loss.backward()
    # DDP averages parameter gradients over processes; do the same here.
    z_std = global_z_std(torch.cat([z1, z2])).item()
    local = torch.stack([loss.detach().double()])
    dist.all_reduce(local)
    grads = [torch.cat([z1.grad, z2.grad]) / world]
    gathered = [torch.empty_like(grads[0]) for _ in range(world)]
    dist.all_gather(gathered, grads[0])
    if rank == 0:
        h = n // world
        ok_grad = all(
            torch.allclose(gathered[r], torch.cat([a.grad[r * h:(r + 1) * h], b.grad[r * h:(r + 1) * h]]).float().double(),
                           rtol=1e-5, atol=1e-7)
            for r in range(world)
        )
        json.dump({"loss_2proc": local.item() / world, "loss_1proc": ref.item(), "grad_ok": ok_grad,
                   "z_std_2proc": z_std, "z_std_1proc": ref_z_std}, open(sys.argv[1], "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
