"""Run by torchrun in test_supcon.py: SupCon on 2 processes vs 1 (float64)."""

import json
import sys

import torch
import torch.distributed as dist

from simclr_cli.objectives.supcon import supcon_loss


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 8, 6
    z1_full = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2_full = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 3, 0])  # positives across the two processes' halves
    a, b = z1_full.clone().requires_grad_(), z2_full.clone().requires_grad_()
    ref = supcon_loss(a, b, labels, 0.3)
    ref.backward()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * n // world, (rank + 1) * n // world)
    z1, z2 = z1_full[rows].clone().requires_grad_(), z2_full[rows].clone().requires_grad_()
    loss = supcon_loss(z1, z2, labels[rows], 0.3)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grad = torch.cat([z1.grad, z2.grad]) / world  # as DDP averages
    parts = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(parts, grad)
    if rank == 0:
        h = n // world
        ok = all(torch.allclose(parts[r], torch.cat([a.grad[r * h:(r + 1) * h], b.grad[r * h:(r + 1) * h]]),
                                rtol=1e-9, atol=1e-12) for r in range(world))
        json.dump({"loss_2proc": total.item() / world, "loss_1proc": ref.item(), "grad_ok": ok}, open(sys.argv[1], "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
