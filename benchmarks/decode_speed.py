"""Decoding speed (issue 13, section 4): reduced-size JPEG decoding on the CPU and batched device decoding.

    # CPU: eval transforms and training views, full decode vs data.decode_draft, and how far the views move
    python benchmarks/decode_speed.py cpu --out decode_cpu.json
    # device: DataLoader workers + batched augmentation at 224 px, CPU decode vs decode_jpeg on the device
    python benchmarks/decode_speed.py device --device cuda --workers 8 --out decode_gpu.json
    # the same code path on the CPU, tiny sizes (no GPU needed)
    python benchmarks/decode_speed.py device --device cpu --smoke

Images: the 224 px images of /work/shared/data/imagenette-subset.tar.gz (or ``--tar``), UPSCALED with bicubic
to 500x375 and 1600x1200 and saved as JPEG quality 90 in a temporary folder; ``--texture`` adds noise and
a fine grating (a harder case for the accuracy numbers than smooth upscaled photos).
Single process, ``OMP_NUM_THREADS`` as given (1 for a per-core figure).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TAR = ROOT.parent / "shared" / "data" / "imagenette-subset.tar.gz"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(tar: Path, out: Path, n: int, size: tuple[int, int], texture: bool, seed: int = 0) -> list[str]:
    """``n`` JPEGs of ``size`` (w, h), upscaled from the archive's images (or generated when it is missing)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources: list[Image.Image] = []
    if tar.is_file():
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith((".jpeg", ".jpg", ".png")):
                    sources.append(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
                    if len(sources) >= n:
                        break
    while len(sources) < n:  # no archive: smooth random images
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        sources.append(Image.fromarray(small))
    files = []
    for i, img in enumerate(sources[:n]):
        a = np.asarray(img.resize(size, Image.Resampling.BICUBIC), np.float32)
        if texture:
            yy, xx = np.mgrid[: size[1], : size[0]]
            a = a + rng.normal(0, 12, a.shape) + 20 * np.sin(xx * 0.9 + yy * 0.4)[..., None]
        path = out / f"{i:05d}.jpg"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        files.append(str(path))
    return files


def _rates(fns: dict, items: int, seconds: float) -> dict:
    """Items per second of each ``fn(k)``, k = 0 .. items-1: passes over the items alternate between the
    functions (so a busy shared machine slows both alike) and each keeps its fastest pass."""
    for fn in fns.values():
        fn(0)  # warm-up
    best = {name: float("inf") for name in fns}
    t_end = time.perf_counter() + seconds
    for r in range(20):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for k in range(items):
                fn(k)
            best[name] = min(best[name], time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() > t_end:
            break
    return {name: items / t for name, t in best.items()}


def cpu_part(args) -> dict:
    from simclr_cli.data.pipeline.augment import EvalTransform, SimCLRAugment
    from simclr_cli.data.pipeline.loaders import ContrastiveViews, EvalImages
    from simclr_cli.data.sources.images import FileListSource
    from simclr_cli.recipe.schema import AugmentConfig

    out: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "margin": args.margin,
                 "threads": torch.get_num_threads(), "output_size": args.size, "images_note":
                 "imagenette 224 px images upscaled (bicubic) and saved as JPEG q90"}
    aug = SimCLRAugment(AugmentConfig(), args.size, MEAN, STD)
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in ((500, 375), (1600, 1200)):
            for texture in (False, True) if args.texture else (False,):
                key = f"{w}x{h}" + ("_textured" if texture else "")
                files = make_jpegs(Path(args.tar), Path(tmp) / key, args.images, (w, h), texture)
                src = FileListSource(files, [0] * len(files), ["x"], key)
                row: dict = {}
                t = EvalTransform(args.size, MEAN, STD)
                full_e, draft_e = EvalImages(src, t), EvalImages(src, t, decode_draft=True, draft_margin=args.margin)
                r = _rates({"full": lambda i: full_e[i], "draft": lambda i: draft_e[i]}, len(files), args.seconds)
                row["eval_full_per_s"], row["eval_draft_per_s"] = r["full"], r["draft"]
                d = torch.stack([((full_e[i]["image"] - draft_e[i]["image"]).abs() * STD[0] * 255).mean()
                                 for i in range(min(len(files), 16))])
                row["eval_mean_abs_diff_levels"] = float(d.mean())
                full_v = ContrastiveViews(src, aug, 0, batched=True)
                draft_v = ContrastiveViews(src, aug, 0, batched=True, decode_draft=True, draft_margin=args.margin)
                # the draft path without any reduction (margin infinite): what the one header read and the
                # channels-last decode give by themselves, apart from the DCT scaling
                layout_v = ContrastiveViews(src, aug, 0, batched=True, decode_draft=True, draft_margin=float("inf"))
                r = _rates({"full": lambda i: full_v[(0, i)], "draft": lambda i: draft_v[(0, i)],
                            "layout": lambda i: layout_v[(0, i)]}, len(files), args.seconds)
                row["views_full_per_s"], row["views_draft_per_s"] = r["full"], r["draft"]
                row["views_draft_without_reduction_per_s"] = r["layout"]
                diffs, worst, reduced, n = [], 0.0, 0, 0
                for e in range(2):
                    for i in range(min(len(files), 16)):
                        a, b = full_v[(e, i)], draft_v[(e, i)]
                        for k in ("view1", "view2"):
                            dd = (a[k].float() - b[k].float()).abs()
                            n += 1
                            if dd.max() > 0:
                                reduced += 1
                                diffs.append(float(dd.mean()))
                                worst = max(worst, float(dd.max()))
                row["views_reduced_fraction"] = reduced / max(n, 1)
                row["views_mean_abs_diff_levels"] = float(np.mean(diffs)) if diffs else 0.0
                row["views_worst_view_mean_levels"] = float(np.max(diffs)) if diffs else 0.0
                row["views_max_pixel_diff_levels"] = worst
                for a in ("eval", "views"):
                    row[f"{a}_speedup"] = row[f"{a}_draft_per_s"] / row[f"{a}_full_per_s"]
                out[key] = row
                print(key, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    return out


def device_part(args) -> dict:
    """DataLoader workers + the batched augmentation at ``--size``: views/s with CPU decoding in the
    workers vs the encoded bytes decoded on ``--device`` (torchvision.io.decode_jpeg, nvJPEG on CUDA)."""
    from simclr_cli.data.pipeline.augment import SimCLRAugment
    from simclr_cli.data.pipeline.batched import BatchedAugment
    from simclr_cli.data.pipeline.decode import DeviceDecoder
    from simclr_cli.data.pipeline.loaders import ContrastiveViews, GlobalBatchSampler, make_loader
    from simclr_cli.data.sources.images import FileListSource
    from simclr_cli.recipe.schema import AugmentConfig

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    aug = SimCLRAugment(AugmentConfig(), args.size, MEAN, STD)
    on_device = BatchedAugment(aug)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "workers": args.workers, "batch": args.batch, "output_size": args.size, "torch": torch.__version__,
                 "images_note": "imagenette 224 px images upscaled (bicubic) and saved as JPEG q90"}
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in ((500, 375), (1600, 1200)):
            files = make_jpegs(Path(args.tar), Path(tmp) / f"{w}x{h}", args.images, (w, h), False)
            src = FileListSource(files, [0] * len(files), ["x"], f"{w}x{h}")
            row = {}
            for mode in ("cpu", "device"):
                views = ContrastiveViews(src, aug, 0, batched=True, decode_draft=args.draft,
                                         decode="gpu" if mode == "device" else "cpu")
                decoder = DeviceDecoder(views, device) if mode == "device" else None
                sampler = GlobalBatchSampler(len(src), args.batch, 0)
                loader = make_loader(views, batch_sampler=sampler, num_workers=args.workers,
                                     pin_memory=device.type == "cuda")
                done, t0, epoch = 0, None, 0
                while True:
                    sampler.set_epoch(epoch)
                    for batch in loader:
                        if decoder is not None:
                            batch = decoder(batch)
                        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
                        on_device(batch["view1"], batch["params1"], cropped=True)
                        on_device(batch["view2"], batch["params2"], cropped=True)
                        if t0 is None:  # the first batch (worker start-up) is not timed
                            sync()
                            t0 = time.perf_counter()
                            continue
                        done += args.batch
                    epoch += 1
                    if done >= args.min_images or (t0 and time.perf_counter() - t0 > args.seconds):
                        break
                sync()
                row[f"{mode}_decode_images_per_s"] = done / (time.perf_counter() - t0)
                row[f"{mode}_fallbacks"] = decoder.fallbacks if decoder else 0
            row["device_over_cpu"] = row["device_decode_images_per_s"] / row["cpu_decode_images_per_s"]
            out[f"{w}x{h}"] = row
            print(f"{w}x{h}", json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("cpu", "device"))
    p.add_argument("--tar", default=str(TAR), help="archive of source images (default: the shared imagenette subset)")
    p.add_argument("--images", type=int, default=64, help="images generated per size")
    p.add_argument("--size", type=int, default=224, help="output side of the views")
    p.add_argument("--seconds", type=float, default=20.0, help="time per measurement (at least 3 passes)")
    p.add_argument("--margin", type=float, default=2.0, help="cpu: crops (and the eval resize target) kept at least "
                   "this many times the output size on the reduced image (data.decode_draft uses 2)")
    p.add_argument("--texture", action="store_true", help="cpu: also measure textured images (noise + grating)")
    p.add_argument("--device", default="cuda", help="device: where decode_jpeg and the augmentation run")
    p.add_argument("--workers", type=int, default=4, help="device: DataLoader workers")
    p.add_argument("--batch", type=int, default=64, help="device: batch size")
    p.add_argument("--min-images", type=int, default=2048, help="device: views timed per row (or --seconds)")
    p.add_argument("--draft", action="store_true", help="device: data.decode_draft on for the CPU rows")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the code path")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.seconds, args.batch, args.min_images, args.workers = 8, 0.0, 4, 8, 0
    result = cpu_part(args) if args.part == "cpu" else device_part(args)
    result["command"] = "python benchmarks/decode_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
