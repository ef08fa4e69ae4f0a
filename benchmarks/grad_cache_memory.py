"""Peak memory of one pretrain step with and without the gradient cache.

    python benchmarks/grad_cache_memory.py --backbone resnet18 --batch 1024 --micro 128 --image-size 32

Each configuration runs in a fresh subprocess; reports peak RSS (CPU) or
max allocated (CUDA) as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(backbone: str, batch: int, micro: int, size: int, device: str) -> dict:
    import torch
    from accelerate import Accelerator

    from simclr_cli.engine.tasks import ContrastiveTask, GradCacheContrastiveTask
    from simclr_cli.models import build_simclr_model
    from simclr_cli.recipe.schema import ModelConfig

    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone=backbone, proj_layers=2)).to(device)
    batch_t = {k: torch.randn(batch, 3, size, size, device=device) for k in ("view1", "view2")}
    acc = Accelerator(cpu=device == "cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if micro:
        out = GradCacheContrastiveTask(model, "nt_xent", 0.5, 0.5, micro).forward_backward(batch_t, acc)
    else:
        out = ContrastiveTask(model, "nt_xent", 0.5, 0.5)(batch_t)
        out["loss"].backward()
    seconds = time.perf_counter() - t0
    result = {"backbone": backbone, "batch": batch, "micro": micro, "image_size": size, "device": device,
              "loss": out["loss"].item(), "seconds": round(seconds, 2),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "rss_before_step_mib": round(base / 1024, 1)}
    if device == "cuda":
        result["max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--micro", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one(a.backbone, a.batch, a.micro, a.image_size, a.device)))
        return
    rows = []
    for micro in (0, a.micro):
        cmd = [sys.executable, __file__, "--child", "--backbone", a.backbone, "--batch", str(a.batch),
               "--micro", str(micro), "--image-size", str(a.image_size), "--device", a.device]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
