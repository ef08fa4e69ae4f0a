"""The Python parts of ``benchmarks/gpu_check.sh``: each subcommand writes one JSON file (``--out``).

    python benchmarks/gpu_parts.py probe --out probe.json          # machine, torch, GPU
    python benchmarks/gpu_parts.py junit --xml cuda.xml --out t.json
    python benchmarks/gpu_parts.py epoch --out epoch.json           # CIFAR-10-sized epochs, in memory
    python benchmarks/gpu_parts.py settings --out settings.json     # the defaults, measured one by one
    python benchmarks/gpu_parts.py gradcache --out gc.json          # largest batch, with and without the cache
    python benchmarks/gpu_parts.py assemble --work DIR --out gpu_check.json

``--dry``: tiny sizes on CPU, to check the code paths where no GPU is (``SIMCLR_GPU_CHECK_DRY=1``
in gpu_check.sh). Every timed part has its own deadline (``--seconds``) and records what it reached.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SHARED = ROOT.parent / "shared" / "data"
PARTS = ("probe", "cuda_tests", "throughput_resnet18_cifar_32px", "throughput_resnet50_224px_jpeg", "epoch_cifar10",
         "settings", "grad_cache_max_batch", "jpeg_decode")


def _write(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def _device(dry: bool):
    import torch

    if dry or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- probe
def probe(args) -> dict:
    import accelerate
    import timm
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "accelerate": accelerate.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "cuda_available": torch.cuda.is_available(), "dry": args.dry}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    return out


# ----------------------------------------------------------------------------------------------- junit
def junit(args) -> dict:
    """pytest's junit XML as counts and one row per test (name, outcome, seconds, message)."""
    import xml.etree.ElementTree as ET

    path = Path(args.xml)
    if not path.is_file():
        return {"error": f"no junit file {path}: pytest did not get to write it"}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:2000]
                break
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), "message": message,
                      "output": (case.findtext("system-out") or "")[-1000:]})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"tests": len(cases), **counts, "cases": cases}


# ----------------------------------------------------------------------------------------------- epoch
def cifar10_root() -> Path | None:
    """CIFAR-10 class folders, extracted into benchmarks/.cache/ from the archive carried in
    benchmarks/.cache/ or kept in ../shared/data; None when neither is there."""
    target = CACHE / "cifar10"
    if (target / "train").is_dir():
        return target
    for archive in (CACHE / "cifar10-jpeg.tar.gz", SHARED / "cifar10-jpeg.tar.gz"):
        if archive.is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(CACHE, filter="data")
            return target if (target / "train").is_dir() else None
    return None


def epoch(args) -> dict:
    """Two epochs of the bundled cifar10 recipe (resnet18, CIFAR stem, B=512) over 50k images held in
    memory: the CIFAR-10 JPEG copy when carried, else synthetic pixels. The second epoch is the timed
    one (the first pays for cuDNN's and the allocator's warmup); both are reported."""
    import torch

    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    device = _device(args.dry)
    root = None if args.synthetic or args.dry else cifar10_root()
    if args.dry:
        data = ["data.dataset='synthetic'", "data.synthetic_train_size=256", "data.image_size=16"]
        model = ["model.backbone='test_resnet'", "pretrain.batch_size=32"]
        n, source = 256, "synthetic"
    elif root is not None:
        data = ["data.dataset='imagefolder'", f"data.root='{root.as_posix()}'", "data.train_split='train'",
                "data.in_memory='always'"]
        model, n, source = [], 50000, f"CIFAR-10 JPEG copy ({root})"
    else:
        data = ["data.dataset='synthetic'", "data.synthetic_train_size=50000"]
        model, n, source = [], 50000, "synthetic pixels (no CIFAR-10 archive carried)"
    precision = "bf16" if device.type == "cuda" else "no"
    overrides = [*data, *model, "data.val_split=''", f"data.num_workers={args.workers}", "pretrain.epochs=2",
                 "pretrain.knn_every=0", "pretrain.save_every=0", "pretrain.log_every=1000",
                 f"pretrain.mixed_precision='{precision}'",
                 f"pretrain.channels_last={'true' if args.channels_last else 'false'}"]
    recipe = load_recipe("cifar10", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = pretrain.run(recipe, Path(tmp) / "run", show_progress=False)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    ends = [x for x in lines if "loss" in x and float(x["epoch"]).is_integer()]
    per_epoch = [round(b["time"] - a["time"], 3) for a, b in zip([{"time": 0.0}, *ends], ends)]
    return {"data": source, "images": n, "device": summary["device"], "precision": precision,
            "channels_last": args.channels_last, "batch": recipe.pretrain.batch_size,
            "backbone": recipe.model.backbone, "num_workers": args.workers,
            "epoch_seconds": per_epoch, "timed_epoch_seconds": per_epoch[-1] if per_epoch else None,
            "timed_epoch_images_per_sec": round(n // recipe.pretrain.batch_size * recipe.pretrain.batch_size
                                                / per_epoch[-1], 1) if per_epoch else None,
            "final_loss": summary["final_loss"], "stage_wall_seconds": round(wall, 1),
            "torch_version": torch.__version__}


# ----------------------------------------------------------------------------------------------- settings
def _model_step_time(device, backbone: str, cifar_stem: bool, size: int, batch: int, *, bf16: bool,
                     channels_last: bool, compile_: bool = False, steps: int = 10, warmup: int = 3,
                     ddp: dict | None = None) -> dict:
    """Model-only step (forward, NT-Xent, backward, LARS) time and peak memory for one setting."""
    import torch

    from simclr_cli.losses.contrastive import nt_xent
    from simclr_cli.models import build_simclr_model
    from simclr_cli.optim import build_optimizer
    from simclr_cli.recipe.schema import ModelConfig

    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone=backbone, cifar_stem=cifar_stem, proj_layers=2)).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model.backbone.compile()
    net = model
    if ddp is not None:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda"
                                                        else None, **ddp)
    opt = build_optimizer("lars", model, lr=0.3, weight_decay=1e-6)
    x = torch.randn(2 * batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, first = [], None
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, z = net(x)
        loss = nt_xent(*z.float().chunk(2), temperature=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    times.sort()
    median = times[len(times) // 2]
    out = {"step_ms": round(1000 * median, 2), "images_per_sec": round(batch / median, 1),
           "first_step_s": round(first, 2)}
    if device.type == "cuda":
        out["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def settings(args) -> dict:
    """Each default candidate on and off, model-only (median step), so the choice rests on a number.

    resnet18 (CIFAR stem) at 32 px, B=512 and resnet50 at 224 px, B=128: fp32 against bf16, NCHW
    against channels_last, cudnn.benchmark off and on, torch.compile off and on; DDP in a one-rank
    group with gradient_as_bucket_view and static_graph off and on (step time, peak memory); the
    host-to-device copy of one uint8 batch, pinned and not, against the step it feeds (prefetch to
    the device pays only when that copy is a visible part of the step). Stops at its deadline and
    says which measurements it did not reach.
    """
    import torch

    device = _device(args.dry)
    deadline = time.perf_counter() + args.seconds
    if args.dry:
        r18 = ("test_resnet", False, 16, 8)
        r50 = ("test_resnet", False, 32, 4)
        steps, warmup = 1, 1
    else:
        r18 = ("resnet18", True, 32, 512)
        r50 = ("resnet50", False, 224, 128)
        steps, warmup = 10, 3
    rows: dict = {}
    plan = [
        ("resnet18_fp32", r18, dict(bf16=False, channels_last=False)),
        ("resnet18_bf16", r18, dict(bf16=True, channels_last=False)),
        ("resnet18_bf16_channels_last", r18, dict(bf16=True, channels_last=True)),
        ("resnet18_bf16_channels_last_cudnn_benchmark", r18, dict(bf16=True, channels_last=True, _bench=True)),
        ("resnet50_bf16", r50, dict(bf16=True, channels_last=False)),
        ("resnet50_bf16_channels_last", r50, dict(bf16=True, channels_last=True)),
        ("resnet50_bf16_channels_last_cudnn_benchmark", r50, dict(bf16=True, channels_last=True, _bench=True)),
        ("ddp_plain", r18, dict(bf16=True, channels_last=True, ddp={})),
        ("ddp_gradient_as_bucket_view", r18, dict(bf16=True, channels_last=True,
                                                  ddp={"gradient_as_bucket_view": True})),
        ("ddp_gradient_as_bucket_view_static_graph", r18, dict(bf16=True, channels_last=True,
                                                               ddp={"gradient_as_bucket_view": True,
                                                                    "static_graph": True})),
        ("resnet18_bf16_channels_last_compile", r18, dict(bf16=True, channels_last=True, compile_=True)),
    ]
    group = None
    for name, (backbone, stem, size, batch), kw in plan:
        _write(args.out, {"device": device.type, "rows": rows, "partial": True})  # a kill keeps what was measured
        left = deadline - time.perf_counter()
        kw = dict(kw)
        bench = kw.pop("_bench", False)
        if left <= 0 or (kw.get("compile_") and left < 60):
            rows[name] = {"not_reached": f"deadline of {args.seconds:g} s ({max(left, 0):.0f} s left)"}
            continue
        if kw.get("compile_") and args.dry:
            rows[name] = {"skipped": "dry run: compile needs a C++ toolchain and minutes"}
            continue
        try:
            if "ddp" in kw and group is None:
                import torch.distributed as dist

                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend, init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
                group = True
            torch.backends.cudnn.benchmark = bench
            rows[name] = _model_step_time(device, backbone, stem, size, batch, steps=steps, warmup=warmup, **kw)
        except Exception as e:  # one failed setting is a result too
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        finally:
            torch.backends.cudnn.benchmark = False
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if group:
        import torch.distributed as dist

        dist.destroy_process_group()
    rows["host_to_device_copy"] = _copy_costs(device, args.dry, rows)
    return {"device": device.type, "rows": rows}


def _copy_costs(device, dry: bool, rows: dict) -> dict:
    import torch

    if device.type != "cuda":
        return {"skipped": "no GPU: nothing to copy to"}
    out = {}
    for name, (batch, size), step_row in (("resnet18_32px_B512", (512, 32), "resnet18_bf16_channels_last"),
                                          ("resnet50_224px_B128", (128, 224), "resnet50_bf16_channels_last")):
        for pinned in (False, True):
            x = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8)
            if pinned:
                x = x.pin_memory()
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                x.to(device, non_blocking=pinned)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = 1000 * sorted(times)[2]
            step = rows.get(step_row, {}).get("step_ms")
            out[f"{name}_{'pinned' if pinned else 'pageable'}"] = {
                "copy_ms": round(ms, 3), "fraction_of_step": round(ms / step, 4) if step else None}
    return out


# ----------------------------------------------------------------------------------------------- gradcache
class _SimulatedOOM(RuntimeError):
    pass


def _fits(device, model, batch: int, size: int, micro: int, capacity: int, acc) -> dict:
    """One full training step (views made on the device, forward, NT-Xent, backward, LARS) at ``batch``."""
    import torch

    from simclr_cli.engine.tasks import ContrastiveTask, GradCacheContrastiveTask
    from simclr_cli.optim import build_optimizer

    if capacity and batch > capacity:  # --dry: a device that holds ``capacity`` images
        raise _SimulatedOOM(f"simulated: {batch} > {capacity}")
    opt = build_optimizer("lars", model, lr=0.3, weight_decay=1e-6)
    views = {k: torch.randn(batch, 3, size, size, device=device) for k in ("view1", "view2")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    if micro:
        out = GradCacheContrastiveTask(model, "nt_xent", 0.1, 0.5, micro).forward_backward(views, acc)
    else:
        with acc.autocast():
            out = ContrastiveTask(model, "nt_xent", 0.1, 0.5)(views)
        out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    row = {"batch": batch, "fits": True, "step_seconds": round(time.perf_counter() - t0, 3),
           "loss": round(out["loss"].item(), 4)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def _search(device, model, size: int, micro: int, start: int, cap: int, step: int, deadline: float,
            capacity: int, acc, first: int = 0, emit=lambda probes: None) -> dict:
    """Largest batch (a multiple of ``step``, at most ``cap``) whose step fits: doubling from
    ``start``, then bisection; stops at ``deadline`` with the bounds it has."""
    import torch

    oom = (torch.cuda.OutOfMemoryError, _SimulatedOOM)
    probes: list[dict] = []

    def attempt(b: int) -> bool:
        emit(probes)
        try:
            probes.append(_fits(device, model, b, size, micro, capacity, acc))
            return True
        except oom as e:
            probes.append({"batch": b, "fits": False, "error": f"{type(e).__name__}"})
            return False
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    lo, hi = 0, None  # lo fits, hi does not
    b = first or start
    while time.perf_counter() < deadline:
        if attempt(b):
            lo = b
            if b >= cap:
                break
            b = min(cap, b * 2)
        else:
            hi = b
            break
    while hi is not None and hi - lo > step and time.perf_counter() < deadline:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    done = (hi is not None and hi - lo <= step) or lo >= cap
    return {"max_batch": lo, "first_failing": hi, "cap": cap, "resolution": step, "micro_batch_size": micro,
            "complete": done, "probes": probes,
            **({} if done else {"stopped": "deadline reached; max_batch is a lower bound"})}


def gradcache(args) -> dict:
    """resnet50 at 224 px, bf16 autocast: the largest batch (images, each two views) whose full step fits,
    without the gradient cache and with it (micro-batches of ``--micro`` images), and the step at the
    target B=4096 with the cache. Half the deadline for each search."""
    import torch
    from accelerate import Accelerator

    from simclr_cli.models import build_simclr_model
    from simclr_cli.recipe.schema import ModelConfig

    device = _device(args.dry)
    if device.type != "cuda" and not args.dry:
        return {"skipped": "no GPU"}
    if args.dry:
        backbone, size, micro, capacity = "test_resnet", 16, 4, 24
        plain = dict(start=8, cap=32, step=8)
        cached = dict(start=16, cap=64, step=16, first=16)
    else:
        backbone, size, micro, capacity = "resnet50", 224, args.micro, 0
        plain = dict(start=256, cap=16384, step=64)
        cached = dict(start=4096, cap=32768, step=1024, first=4096)
    torch.manual_seed(0)
    model = build_simclr_model(ModelConfig(backbone=backbone, proj_layers=2)).to(device).train()
    model = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
    acc = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    half = args.seconds / 2
    t0 = time.perf_counter()
    head = {"backbone": backbone, "image_size": size, "device": device.type, "partial": True}
    without = _search(device, model, size, 0, deadline=t0 + half, capacity=capacity, acc=acc,
                      emit=lambda pr: _write(args.out, {**head, "without_cache_probes": pr}), **plain)
    with_cache = _search(device, model, size, micro, deadline=max(time.perf_counter(), t0) + half,
                         capacity=capacity, acc=acc,
                         emit=lambda pr: _write(args.out, {**head, "without_cache": without, "with_cache_probes": pr}),
                         **cached)
    target = next((p for p in with_cache["probes"] if p["batch"] == cached["first"]), None)
    return {"backbone": backbone, "image_size": size, "precision": "bf16" if device.type == "cuda" else "fp32",
            "device": device.type, "simulated_capacity": capacity or None,
            "without_cache": without, "with_cache": with_cache,
            "target_batch": cached["first"], "target_with_cache": target}


# ----------------------------------------------------------------------------------------------- assemble
def assemble(args) -> dict:
    """One JSON from the parts' files in ``--work``: ``<part>.json`` (its result) and ``<part>.status``
    (``rc seconds limit``, written by gpu_check.sh), ``<part>.log`` (its output, the tail kept on failure)."""
    work = Path(args.work)
    parts = {}
    for name in PARTS:
        status_file, result_file, log = work / f"{name}.status", work / f"{name}.json", work / f"{name}.log"
        if not status_file.is_file():
            parts[name] = {"status": "skipped", "reason": (work / f"{name}.skip").read_text().strip()
                           if (work / f"{name}.skip").is_file() else "not run"}
            continue
        rc, seconds, limit = status_file.read_text().split()[:3]
        rc = int(rc)
        entry: dict = {"rc": rc, "seconds": float(seconds), "limit_seconds": int(limit)}
        if rc in (124, 137):
            entry["status"] = "timeout"
        elif rc != 0:
            entry["status"] = "error"
        else:
            entry["status"] = "ok"
        if result_file.is_file():
            try:
                entry["result"] = json.loads(result_file.read_text())
            except json.JSONDecodeError as e:
                entry["result_unreadable"] = str(e)
        if entry["status"] != "ok" and log.is_file():
            entry["error_tail"] = log.read_text(errors="replace")[-3000:]
        result = entry.get("result") or {}
        if entry["status"] == "ok" and isinstance(result, dict) and "skipped" in result and len(result) == 1:
            entry["status"] = "skipped"
            entry["reason"] = result["skipped"]
        if name == "cuda_tests" and result.get("tests") and result.get("skipped") == result["tests"]:
            first = next((c["message"] for c in result["cases"]), "")
            entry["status"] = "skipped"
            entry["reason"] = f"no GPU: all {result['tests']} cuda tests skipped ({first})"
        parts[name] = entry
    meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").is_file() else {}
    if meta.get("dry"):
        for name, entry in parts.items():
            if entry["status"] == "ok":
                entry["measured"] = "nothing: dry run on CPU at tiny sizes, only the code path was checked"
    for name, entry in parts.items():  # one line each in the console, for a reader of the output tail
        print(f"  {name}: {entry['status']}" + (f" ({entry['seconds']:.0f} s)" if "seconds" in entry else "")
              + (f": {entry.get('reason')}" if entry.get("reason") else ""), file=sys.stderr)
    return {"script": "benchmarks/gpu_check.sh", **meta, "parts": parts}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["probe", "junit", "epoch", "settings", "gradcache", "assemble"])
    p.add_argument("--out", required=True)
    p.add_argument("--dry", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--seconds", type=float, default=60, help="the part's own deadline (settings, gradcache)")
    p.add_argument("--xml", default="", help="junit: pytest's --junitxml file")
    p.add_argument("--work", default="", help="assemble: the folder of part files")
    p.add_argument("--workers", type=int, default=8, help="epoch: DataLoader workers")
    p.add_argument("--channels-last", action="store_true", help="epoch")
    p.add_argument("--synthetic", action="store_true", help="epoch: synthetic pixels even when CIFAR-10 is there")
    p.add_argument("--micro", type=int, default=256, help="gradcache: micro-batch size (images)")
    args = p.parse_args(argv)
    limit = os.environ.get("GPU_CHECK_PART_LIMIT")  # gpu_check.sh: this part's timeout, maybe cut by the budget
    if limit:
        args.seconds = max(1.0, min(args.seconds, float(limit) - 25))
    fn = {"probe": probe, "junit": junit, "epoch": epoch, "settings": settings, "gradcache": gradcache,
          "assemble": assemble}[args.part]
    _write(args.out, fn(args))


if __name__ == "__main__":
    sys.exit(main())
