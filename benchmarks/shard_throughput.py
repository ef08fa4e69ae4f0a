"""224 px SimCLR views per second per core: packed shards (shorter side 256) vs a folder of 500x375 JPEGs.

    python benchmarks/shard_throughput.py                    # 500 images, about 2 minutes on 2 cores
    python benchmarks/shard_throughput.py --images 2000 --repeats 3
    python benchmarks/shard_throughput.py --smoke            # every code path, tiny sizes, seconds
    PYTHONPATH=/path/to/wids python benchmarks/shard_throughput.py --wids   # also webdataset's indexed reader

The shared data has only 224x224 JPEGs (``../shared/data/imagenette-subset.tar.gz``): the first ``--images`` of
them are upscaled (bicubic) to 500x375 and saved as JPEG quality 90, the size class of ImageNet photos, in
``benchmarks/.cache/shard_bench/`` (git-ignored). That folder is packed with ``simclr data pack`` settings
(shorter side 256, quality 90), and both are read with the loader's per-image work of the default batched
backend (``ContrastiveViews(..., batched=True)``: decode, draw both views' parameters, crop and resize both views to
224 px; the colour work then runs on the model's device), in one process with one thread (``num_workers=0``,
``torch.set_num_threads(1)``), over a random order, after one warm-up pass (files in the page cache). Views/s
count views (two per image). ``with_batched_cpu`` adds the batched colour augmentation run on this CPU.

``--wids``: random access by sample index over a shuffled order, raw bytes only: :class:`ShardSource` vs
``wids.ShardListDataset`` (webdataset's indexed reader, a separate package) on the same tars, packed into
``--wids-shards`` shards; wids keeps 10 shards indexed at a time (its default ``lru_size``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "imagenette-subset.tar.gz"
CACHE = ROOT / "benchmarks" / ".cache" / "shard_bench"


def _jpegs(args) -> list[str]:
    """The first ``--images`` Imagenette JPEGs (sorted paths, every class), upscaled to 500x375."""
    from PIL import Image

    cache = Path(args.work)
    folder = cache / f"jpeg{args.width}x{args.height}"
    src = cache / "imagenette" / "train"
    if not src.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive) as tar:
            tar.extractall(cache, filter="data")
    originals = sorted(src.rglob("*.JPEG"))
    step = max(1, len(originals) // args.images)
    picked = originals[::step][:args.images]
    out = []
    for p in picked:
        target = folder / p.parent.name / (p.stem + ".jpg")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(p) as img:
                img.convert("RGB").resize((args.width, args.height), Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(str(target))
    return out


def _measure(configs: dict, n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Views (2 per image) per second of each config ``name -> (views, on_cpu or None)``, over one fixed random
    order, after one warm-up pass each. The configs take turns, ``repeats`` rounds, and each keeps its best pass,
    so a slow spell of this shared machine does not fall on one config only. ``cpu``: per second of this
    process's CPU time (what a core delivers, whatever else runs on the machine); ``wall``: per wall second."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()

    def one_pass(views, on_cpu) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        chunk = []
        for i in order:
            chunk.append(views[(1, i)])
            if on_cpu is not None and len(chunk) == 32:
                on_cpu(chunk)
                chunk = []
        if on_cpu is not None and chunk:
            on_cpu(chunk)
        return time.process_time() - c0, time.perf_counter() - w0

    for views, on_cpu in configs.values():
        one_pass(views, on_cpu)
    best = {name: [float("inf"), float("inf")] for name in configs}
    for _ in range(repeats):
        for name, (views, on_cpu) in configs.items():
            cpu, wall = one_pass(views, on_cpu)
            best[name] = [min(best[name][0], cpu), min(best[name][1], wall)]
    return {name: {"cpu": round(2 * n / c, 1), "wall": round(2 * n / w, 1)} for name, (c, w) in best.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--shorter-side", type=int, default=256)
    ap.add_argument("--size", type=int, default=224, help="view size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--archive", default=str(SHARED))
    ap.add_argument("--work", default=str(CACHE), help="where the JPEGs and the shards are made (git-ignored)")
    ap.add_argument("--wids", action="store_true", help="also time wids.ShardListDataset (needs the wids package)")
    ap.add_argument("--wids-shards", type=int, default=40)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: every code path in seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.repeats, args.wids_shards = 24, 1, 4
    if not Path(args.archive).is_file():
        result = {"skipped": f"no {args.archive}: pass --archive with the Imagenette subset"}
        print(json.dumps(result))
        return result

    from simclr_cli.data.pipeline.augment import SimCLRAugment
    from simclr_cli.data.pipeline.batched import BatchedAugment
    from simclr_cli.data.pipeline.loaders import ContrastiveViews
    from simclr_cli.data.shards.reader import ShardSource
    from simclr_cli.data.shards.writer import PackSettings, pack
    from simclr_cli.data.sources.images import FileListSource
    from simclr_cli.recipe.schema import AugmentConfig

    files = _jpegs(args)
    n = len(files)
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}",
                    "torch": torch.__version__, "images": n, "source_size": f"{args.width}x{args.height} (upscaled from "
                    "224x224 Imagenette JPEGs, quality 90)", "shorter_side": args.shorter_side, "view_size": args.size}
    files = sorted(files)
    listing = Path(args.work) / f"list-{n}.txt"  # exactly these images, in this order (the folder may hold more)
    listing.write_text("".join(f + "\n" for f in files))
    packed = Path(args.work) / f"shards{args.shorter_side}-{n}"
    t0 = time.perf_counter()
    res = pack(listing, packed, PackSettings(args.shorter_side, 90, 1000), overwrite=True,
               workers=os.cpu_count() or 1, say=lambda s: None)  # always packed again: the packing rate is timed
    pack_s = time.perf_counter() - t0
    result["pack"] = {"images_per_sec": round(res.images / pack_s, 1), "workers": os.cpu_count(),
                      "bytes_per_image": round(sum(p.stat().st_size for p in packed.glob("shard-*.tar")) / res.images),
                      "already": res.already}
    shard_src = ShardSource(packed)
    assert len(shard_src) == n, (len(shard_src), n)
    folder_src = FileListSource(files, [-1] * n, [], "jpeg-folder")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        aug = SimCLRAugment(AugmentConfig(), args.size, (0.5,) * 3, (0.25,) * 3)
        on_device = BatchedAugment(aug)

        def batched_cpu(chunk):
            for k in ("1", "2"):
                on_device(torch.stack([it[f"view{k}"] for it in chunk]), torch.stack([it[f"params{k}"] for it in chunk]),
                          cropped=True)

        draft = "decode_draft" in inspect.signature(ContrastiveViews).parameters  # reduced-size decoding (part 4)
        configs = {}
        for name, src in (("jpeg_folder", folder_src), ("shards", shard_src)):
            kw = {"decode_draft": False} if draft else {}
            configs[f"{name}/loader"] = (ContrastiveViews(src, aug, seed=0, batched=True, **kw), None)
            if draft:
                configs[f"{name}/loader_decode_draft"] = (ContrastiveViews(src, aug, seed=0, batched=True,
                                                                           decode_draft=True), None)
            configs[f"{name}/with_batched_cpu"] = (configs[f"{name}/loader"][0], batched_cpu)
        rows = _measure(configs, n, args.repeats)
        for key, value in rows.items():
            name, what = key.split("/")
            result.setdefault(name, {})[f"{what}_views_per_sec"] = value
        ratio = lambda a, b: round(rows[a]["cpu"] / rows[b]["cpu"], 2)  # noqa: E731
        result["speedup_cpu"] = {"loader": ratio("shards/loader", "jpeg_folder/loader"),
                                 "with_batched_cpu": ratio("shards/with_batched_cpu", "jpeg_folder/with_batched_cpu")}
        if draft:
            result["speedup_cpu"]["loader_both_decode_draft"] = ratio("shards/loader_decode_draft",
                                                                      "jpeg_folder/loader_decode_draft")
            result["speedup_cpu"]["shards_loader_vs_folder_decode_draft"] = ratio("shards/loader",
                                                                                  "jpeg_folder/loader_decode_draft")
        if args.wids:
            result["wids"] = _wids(args, files, n)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(result, indent=1))
    return result


def _wids(args, files: list[str], n: int) -> dict:
    """Random access to raw JPEG bytes in a shuffled order: ShardSource vs wids.ShardListDataset on the same tars."""
    try:
        import wids
    except ImportError:
        return {"skipped": "wids is not installed (pip install wids)"}
    from simclr_cli.data.shards.reader import ShardSource
    from simclr_cli.data.shards.writer import PackSettings, pack

    per_shard = -(-n // args.wids_shards)
    packed = Path(args.work) / f"shards{args.shorter_side}-{n}-by{per_shard}"
    pack(Path(args.work) / f"list-{n}.txt", packed, PackSettings(args.shorter_side, 90, per_shard),
         overwrite=True, workers=os.cpu_count() or 1, say=lambda s: None)
    ours = ShardSource(packed)
    tars = sorted(packed.glob("shard-*.tar"))
    counts = [int(((ours._shard == k).sum())) for k in range(len(tars))]
    theirs = wids.ShardListDataset([{"url": str(p), "nsamples": c} for p, c in zip(tars, counts)],
                                   localname=lambda url: url, transformations=[])  # read in place, no decoding
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    assert theirs[order[0]][".jpg"].getvalue() == ours.raw(order[0])

    def rate(get) -> float:
        for i in order:
            get(i)
        t0 = time.perf_counter()
        for i in order:
            get(i)
        return round(n / (time.perf_counter() - t0), 1)

    return {"shards": len(tars), "shard_source_samples_per_sec": rate(ours.raw),
            "wids_samples_per_sec": rate(lambda i: theirs[i][".jpg"].getvalue()),
            "wids_cache": dict(zip(("accesses", "misses"), theirs.get_stats()))}


if __name__ == "__main__":
    main()
