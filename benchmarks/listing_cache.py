"""Listing a large folder: the first run (walk the tree, write the cache) against a cached run (issue 13).

    python benchmarks/listing_cache.py                      # 200,000 files, 4 levels deep, in a temp folder
    python benchmarks/listing_cache.py --files 2000 --runs 1   # a quick look

Generates ``--files`` empty ``.jpg`` files spread over ``--fanout`` ** ``--depth`` leaf folders (listing never
decodes, so empty files list like real ones), waits until the folders are older than the racy window
(``data/listing/index.py``: a folder modified within 2 s of a scan is re-checked by its names, as a folder being
written would be), then times, each in a fresh process so nothing is shared but the on-disk cache:

* ``before``: ``scan_images`` as it was before the cache (``os.walk``, a ``stat`` per file), verbatim;
* ``off``: today's ``scan_images`` with the cache off (``SIMCLR_CACHE_DIR=off``);
* ``first``: the first run with the cache on (walk + write the cache);
* ``cached``: later runs (stat every folder, read the cache).

The same for ``scan_class_folders`` (``imagefolder``, top-level folders as classes). Prints one JSON object;
``cached_speedup`` is ``first / cached`` (the target is >= 20x). The files were just written, so the first run
walks a warm dentry cache; on a cold cache or a network file system the first run is slower still.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BEFORE = r"""
import json, os, sys, time
from pathlib import Path
from simclr_cli.data.listing.folders import has_image_extension, is_image_file

def scan_images(folder, *, sniff=True):  # data/listing/folders.py before issue 13 section 2, verbatim
    accept = is_image_file if sniff else has_image_extension
    files = []
    seen = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [str(Path(top) / n) for n in names if not n.startswith(".") and accept(Path(top) / n)]
    return sorted(files)

t0 = time.perf_counter()
n = len(scan_images(Path(sys.argv[2])))
print(json.dumps({"seconds": time.perf_counter() - t0, "files": n}))
"""

_CHILD = r"""
import json, sys, time
from pathlib import Path
from simclr_cli.data.listing.folders import scan_class_folders, scan_images
kind, root = sys.argv[1], Path(sys.argv[2])
t0 = time.perf_counter()
if kind == "images":
    n = len(scan_images(root))
else:
    n = len(scan_class_folders(root, sniff=False, warn=False).files)
print(json.dumps({"seconds": time.perf_counter() - t0, "files": n}))
"""


def generate(root: Path, files: int, depth: int, fanout: int) -> int:
    """``files`` empty .jpg files over ``fanout ** depth`` leaf folders; returns the number of folders."""
    leaves = [Path()]
    for _ in range(depth):
        leaves = [p / f"d{i:02d}" for p in leaves for i in range(fanout)]
    for leaf in leaves:
        (root / leaf).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        fd = os.open(root / leaves[i % len(leaves)] / f"img_{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    return sum(fanout ** k for k in range(depth + 1))


def _time(kind: str, root: Path, cache: str, code: str = _CHILD) -> dict:
    env = dict(os.environ, SIMCLR_CACHE_DIR=cache)  # the JSON is the last line, after any message
    out = subprocess.run([sys.executable, "-c", code, kind, str(root)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--depth", type=int, default=4, help="folder levels below the root")
    ap.add_argument("--fanout", type=int, default=6, help="sub-folders per folder")
    ap.add_argument("--runs", type=int, default=3, help="cached runs (the best is reported)")
    ap.add_argument("--kinds", default="images,class-folders")
    ap.add_argument("--settle", type=float, default=2.5, help="seconds to wait after generating (racy window)")
    ap.add_argument("--dir", default="", help="where to generate (default: a temp folder, removed after)")
    args = ap.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="listing-bench-"))
    root, cache_dir = work / "images", work / "cache"
    try:
        t0 = time.perf_counter()
        folders = generate(root, args.files, args.depth, args.fanout)
        made = time.perf_counter() - t0
        time.sleep(args.settle)  # older than the racy window (see the docstring)
        result: dict = {"files": args.files, "folders": folders, "depth": args.depth, "generate_s": round(made, 2)}
        for kind in args.kinds.split(","):
            shutil.rmtree(cache_dir, ignore_errors=True)
            off = _time(kind, root, "off")
            before = _time(kind, root, "off", _BEFORE)["seconds"] if kind == "images" else 0.0
            first = _time(kind, root, str(cache_dir))
            cached = [_time(kind, root, str(cache_dir)) for _ in range(args.runs)]
            best = min(c["seconds"] for c in cached)
            assert off["files"] == first["files"] == cached[0]["files"] == args.files, (off, first, cached)
            result[kind] = {"off_s": round(off["seconds"], 4), "first_s": round(first["seconds"], 4),
                            **({"before_s": round(before, 4), "cached_vs_before": round(before / best, 1)}
                               if kind == "images" else {}),
                            "cached_s": [round(c["seconds"], 4) for c in cached],
                            "cached_speedup": round(first["seconds"] / best, 1),
                            "cached_vs_off": round(off["seconds"] / best, 1)}
        print(json.dumps(result, indent=2))
        return result
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
