"""Pretraining throughput in one run, as one JSON: the model-only limit, the data pipeline alone,
the real training loop, and the peer (lightly) pipeline, with the ratios that matter.

    python benchmarks/pretrain_throughput.py                       # CPU defaults, under 3 minutes
    python benchmarks/pretrain_throughput.py --smoke               # every code path, tiny sizes, seconds
    # the GPU rows of docs/performance.md (benchmarks/gpu_check.sh runs these):
    python benchmarks/pretrain_throughput.py --device cuda --backbone resnet18 --cifar-stem --image-size 32 \\
        --batch 512 --bf16 --channels-last --steps 30 --warmup 5 --workers 8 --skip b,d
    python benchmarks/pretrain_throughput.py --device cuda --backbone resnet50 --image-size 224 --batch 256 \\
        --bf16 --channels-last --data jpeg --steps 20 --warmup 5 --workers 14 --skip b,d

a. model_only: forward + backward + LARS step of backbone + head + NT-Xent on tensors made in advance.
b. data_only: decode + augment both views, images/s:
   - memory_32px: an in-memory CIFAR-size set, per-image torchvision backend vs the batched backend;
   - jpeg_224px: JPEG image folder (the Imagenette subset) on one core: torchvision's per-image PIL
     pipeline vs ours (decode with draft + batched augmentation).
c. full_loop: the real ``simclr pretrain`` loop (``stages.pretrain.run``), both backends, on in-memory
   synthetic data (``--data memory``) or read and decoded from the JPEG folder every step (``--data jpeg``).
   The stage trains on the GPU whenever one is visible, so ``--device`` must say where it runs.
d. lightly: lightly's SimCLRTransform, NTXentLoss and SimCLRProjectionHead with the same backbone and
   batch (when ``lightly`` is installed).

Images/s count images (pairs of views). The first ``--warmup`` steps of each measurement are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from simclr_cli import threads

threads.prepare_process()  # the thread budget, as the `simclr` command sets it (before torch is imported)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(args):
    from simclr_cli.models import build_simclr_model
    from simclr_cli.recipe.schema import ModelConfig

    torch.manual_seed(0)
    return build_simclr_model(ModelConfig(backbone=args.backbone, cifar_stem=args.cifar_stem, proj_layers=2))


def model_only(args, device: torch.device) -> dict:
    """a: the limit: no data pipeline at all."""
    from simclr_cli.losses.contrastive import nt_xent
    from simclr_cli.optim import build_optimizer

    model = _model(args).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer("lars", model, lr=0.3, weight_decay=1e-6)
    x = torch.randn(2 * args.batch, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            _, z = model(x)
        loss = nt_xent(*z.float().chunk(2), temperature=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"images_per_sec": round(args.batch * len(times) / sum(times), 2), "steps": len(times)}


def _memory_source(n: int, size: int):
    from simclr_cli.data.sources.synthetic import synthetic_source

    return synthetic_source("train", n, size, 10, 0)


def data_only_memory(args, device: torch.device) -> dict:
    """b, in memory: both backends through the real dataset and loader classes, views made for both."""
    from simclr_cli.data.pipeline.augment import SimCLRAugment
    from simclr_cli.data.pipeline.batched import BatchedAugment
    from simclr_cli.data.pipeline.loaders import ContrastiveViews, GlobalBatchSampler, make_loader
    from simclr_cli.recipe.schema import AugmentConfig

    n_batches = args.warmup + args.steps
    source = _memory_source(args.batch * n_batches, args.image_size)
    cfg = AugmentConfig(strength=0.5, blur=args.image_size > 32)
    out = {}
    for backend in ("torchvision", "batched"):
        aug = SimCLRAugment(cfg, args.image_size, (0.5,) * 3, (0.25,) * 3)
        views = ContrastiveViews(source, aug, 0, batched=backend == "batched")
        sampler = GlobalBatchSampler(len(views), args.batch, 0)
        loader = make_loader(views, batch_sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda")
        on_device = BatchedAugment(aug)
        count, t0 = 0, None
        for i, batch in enumerate(loader):
            if i == args.warmup:
                _sync(device)
                t0 = time.perf_counter()
            if backend == "batched":
                img = batch["image"].to(device, non_blocking=True)
                on_device(img, batch["params1"], cropped=False)
                on_device(img, batch["params2"], cropped=False)
            else:
                batch["view1"].to(device), batch["view2"].to(device)
            if i >= args.warmup:
                count += args.batch
        _sync(device)
        out[backend] = round(count / (time.perf_counter() - t0), 2)
    out["speedup"] = round(out["batched"] / out["torchvision"], 2)
    return out


def _jpeg_root(args) -> Path | None:
    """The JPEG class folders: --jpeg-root, else the Imagenette subset extracted into benchmarks/.cache/
    from ../shared/data or from a copy of the archive carried in benchmarks/.cache/ (a GPU machine)."""
    if args.jpeg_root:
        return Path(args.jpeg_root)
    archive = next((a for a in (SHARED / "imagenette-subset.tar.gz", CACHE / "imagenette-subset.tar.gz")
                    if a.is_file()), SHARED / "imagenette-subset.tar.gz")
    target = CACHE / "imagenette" / "train"
    if not target.is_dir() and archive.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
    return target if target.is_dir() else None


def data_only_jpeg(args) -> dict:
    """b, JPEG at 224 px on one core (main process, one thread): torchvision's per-image PIL
    pipeline against decode-with-draft + the batched backend."""
    from torchvision import datasets
    from torchvision import transforms as T

    from simclr_cli.data.pipeline.augment import SimCLRAugment
    from simclr_cli.data.pipeline.batched import BatchedAugment
    from simclr_cli.data.pipeline.loaders import ContrastiveViews
    from simclr_cli.data.sources.images import ImageFolderSource
    from simclr_cli.recipe.schema import AugmentConfig

    root = _jpeg_root(args)
    if root is None:
        return {"skipped": "no JPEG folder: pass --jpeg-root or keep ../shared/data/imagenette-subset.tar.gz"}
    n = args.jpeg_images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        size = 224
        ref = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2),
                         T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5), T.ToTensor(),
                         T.Normalize((0.5,) * 3, (0.25,) * 3)])
        ds = datasets.ImageFolder(str(root))
        t0 = time.perf_counter()
        for i in range(n):
            img, _ = ds[i * 7 % len(ds)]
            ref(img), ref(img)
        tv = n / (time.perf_counter() - t0)

        folder = ImageFolderSource(root.parent, root.name)
        aug = SimCLRAugment(AugmentConfig(), size, (0.5,) * 3, (0.25,) * 3)
        views = ContrastiveViews(folder, aug, 0, batched=True)
        on_device = BatchedAugment(aug)
        chunk = 32
        t0 = time.perf_counter()
        for start in range(0, n, chunk):
            items = [views[(0, i * 7 % len(folder))] for i in range(start, min(n, start + chunk))]
            for k in ("1", "2"):
                on_device(torch.stack([it[f"view{k}"] for it in items]), torch.stack([it[f"params{k}"] for it in items]),
                          cropped=True)
        ours = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"torchvision_pil_per_core": round(tv, 2), "ours_per_core": round(ours, 2), "speedup": round(ours / tv, 2),
            "images": n}


def full_loop(args, backend: str) -> dict:
    """c: the real pretrain loop on in-memory synthetic data or on the JPEG folder; throughput from the
    metrics windows after warmup."""
    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    n = args.batch * (args.warmup + args.steps)
    if args.data == "jpeg":
        root = _jpeg_root(args)
        if root is None:
            return {"skipped": "no JPEG folder: pass --jpeg-root or keep imagenette-subset.tar.gz in "
                               "../shared/data or benchmarks/.cache"}
        per_epoch = sum(1 for p in root.rglob("*") if p.is_file()) // args.batch
        if per_epoch == 0:
            return {"skipped": f"fewer JPEGs in {root} than one batch of {args.batch}"}
        data = ["data.dataset='imagefolder'", f"data.root='{root.parent.as_posix()}'",
                f"data.train_split='{root.name}'",
                "data.in_memory='never'", f"pretrain.epochs={-(-(args.warmup + args.steps) // per_epoch)}",
                f"pretrain.max_steps={args.warmup + args.steps}"]
    else:
        data = ["data.dataset='synthetic'", f"data.synthetic_train_size={n}", "pretrain.epochs=1"]
    overrides = [
        *data, f"data.image_size={args.image_size}",
        f"data.num_workers={args.workers}", "data.val_split=''", f"augment.backend='{backend}'",
        f"augment.blur={'true' if args.image_size > 32 else 'false'}", "augment.strength=0.5",
        f"model.backbone='{args.backbone}'", f"model.cifar_stem={'true' if args.cifar_stem else 'false'}",
        "model.proj_layers=2", f"pretrain.batch_size={args.batch}", "pretrain.knn_every=0",
        f"pretrain.channels_last={'true' if args.channels_last else 'false'}",
        f"pretrain.log_every={args.warmup}" if args.warmup else "pretrain.log_every=1",
        "pretrain.mixed_precision='bf16'" if args.bf16 else "pretrain.mixed_precision='no'", "pretrain.save_every=0",
    ]
    recipe = load_recipe("quickstart", overrides)
    with tempfile.TemporaryDirectory() as out:
        pretrain.run(recipe, out, show_progress=False)
        lines = [json.loads(x) for x in (Path(out) / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]  # the first line is at the end of the warmup steps
    first, last = steps[0], steps[-1]
    done, span = last["step"] - first["step"], last["time"] - first["time"]
    return {"images_per_sec": round(done * args.batch / span, 2), "steps": done, "backend": backend,
            "num_workers": args.workers, "data": args.data}


def lightly_pipeline(args, device: torch.device) -> dict:
    """d: the peer: lightly's transform, loss and head, a plain PyTorch loop, same backbone and batch."""
    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform
    except ImportError as e:
        return {"skipped": f"lightly is not installed ({e}); pip install lightly"}
    from PIL import Image

    from simclr_cli.optim import build_optimizer

    source = _memory_source(args.batch * (args.warmup + args.steps), args.image_size)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in source.images]
    transform = SimCLRTransform(input_size=args.image_size, cj_strength=0.5, gaussian_blur=0.5 if args.image_size > 32 else 0.0)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil)

        def __getitem__(self, i):
            v1, v2 = transform(pil[i])
            return v1, v2

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    model = _model(args)
    dim = model.backbone.num_features
    backbone = model.backbone.to(device)
    head = SimCLRProjectionHead(dim, dim, 128).to(device)
    params = torch.nn.ModuleList([backbone, head])
    opt = build_optimizer("lars", params, lr=0.3, weight_decay=1e-6)
    criterion = NTXentLoss(temperature=0.1)
    count, t0 = 0, None
    for i, (v1, v2) in enumerate(loader):
        if i == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        x = torch.cat([v1, v2]).to(device)
        z = head(backbone(x))
        loss = criterion(*z.chunk(2))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            count += args.batch
    _sync(device)
    import lightly

    return {"images_per_sec": round(count / (time.perf_counter() - t0), 2), "steps": count // args.batch,
            "lightly": lightly.__version__}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="measured steps per part")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from each measurement")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where a, b and d run; c (the stage) trains on the GPU whenever one is visible")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for b, c, d")
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (a, c)")
    p.add_argument("--channels-last", action="store_true", help="channels_last for a and c")
    p.add_argument("--data", default="memory", choices=["memory", "jpeg"],
                   help="c: in-memory synthetic images, or the JPEG folder decoded every step")
    p.add_argument("--backends", default="batched,torchvision", help="c: augmentation backends to run")
    p.add_argument("--smoke", action="store_true",
                   help="every code path at tiny sizes (test_resnet, batch 8, 2 steps): checks the script runs")
    p.add_argument("--jpeg-root", default="", help="class folders of JPEGs (default: the Imagenette subset)")
    p.add_argument("--jpeg-images", type=int, default=96)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
    p.add_argument("--out", default="", help="write the JSON here as well as to stdout")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.batch, args.steps, args.warmup, args.jpeg_images = "test_resnet", 8, 2, 1, 4
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and torch.cuda.is_available() and "c" not in set(args.skip.split(",")):
        p.error("a GPU is visible, and part c (the pretrain stage) trains on it: pass --device cuda, "
                "or hide it with CUDA_VISIBLE_DEVICES=''")
    device = torch.device(args.device)
    skip = set(args.skip.split(","))
    t_start = time.perf_counter()
    result: dict = {
        "args": vars(args),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    if "a" not in skip:
        result["a_model_only"] = model_only(args, device)
    if "b" not in skip:
        result["b_data_only"] = {"memory_32px": data_only_memory(args, device), "jpeg_224px": data_only_jpeg(args)}
    if "c" not in skip:
        result["c_full_loop"] = {b: full_loop(args, b) for b in args.backends.split(",")}
    if "d" not in skip:
        result["d_lightly"] = lightly_pipeline(args, device)
    ratios = {}
    c = result.get("c_full_loop", {}).get("batched", {}).get("images_per_sec")
    a = result.get("a_model_only", {}).get("images_per_sec")
    d = result.get("d_lightly", {}).get("images_per_sec")
    if c and a:
        ratios["c_over_a"] = round(c / a, 3)
    if c and d:
        ratios["c_over_d"] = round(c / d, 3)
    result["ratios"] = ratios
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"c/a = {ratios.get('c_over_a')}  c/d = {ratios.get('c_over_d')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
