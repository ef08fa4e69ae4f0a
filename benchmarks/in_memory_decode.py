"""The in-memory decode (``data.in_memory``) on 1, 2, ... threads (issue 13).

    python benchmarks/in_memory_decode.py                       # 400 JPEGs of 500x375, threads 1,2,4,...
    python benchmarks/in_memory_decode.py --images 40 --threads 1,2   # a quick look

Writes ``--images`` JPEGs of 500x375 (smooth random content, quality 90) into a temp folder, then decodes
them with ``decode_in_memory(..., threads=T)`` for each T, ``--repeats`` times, and prints one JSON object:
images/s (best of the repeats) and the process CPU time over wall time (above 1: the threads ran at once;
PIL releases the GIL while decoding). Every run's result is checked equal to the 1-thread one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from simclr_cli.data.sources.images import FileListSource, decode_in_memory, decode_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--threads", default="", help="comma-separated; default 1 and powers of 2 up to the cores")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cores = decode_threads()
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted(
        {1, *[2 ** k for k in range(1, 8) if 2 ** k <= cores], cores})
    work = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    try:
        rng = np.random.default_rng(0)
        for i in range(args.images):
            small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(work / f"{i:05d}.jpg", quality=90)
        files = sorted(str(p) for p in work.iterdir())
        src = FileListSource(files, [-1] * len(files), [], "bench")
        reference = None
        rows = []
        for t in counts:
            best, ratio = 0.0, 0.0
            for _ in range(args.repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                out = decode_in_memory(src, "always", 1e3, say=lambda s: None, threads=t)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if reference is None:
                    reference = out.images
                assert torch.equal(out.images, reference)
                if len(files) / wall > best:
                    best, ratio = len(files) / wall, cpu / wall
            rows.append({"threads": t, "images_per_s": round(best, 1), "cpu_over_wall": round(ratio, 2)})
        result = {"images": args.images, "size": "500x375", "cores": cores, "rows": rows,
                  "load_average": os.getloadavg()}
        print(json.dumps(result))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
