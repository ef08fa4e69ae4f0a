"""Training on a shared machine: what other work on the box costs a run, with the thread budget and without.

    python benchmarks/contention.py                      # all variants, before and after, about 15 min on 2 cores
    python benchmarks/contention.py --variants single --steps 120
    python benchmarks/contention.py --smoke              # every path at tiny sizes, for the tests

Every case runs in fresh processes (``python -m simclr_cli pretrain quickstart``, 200 steps, no kNN):

* A: one run alone;
* B: two such runs at once (two users, or two runs of a sweep);
* C: one run beside two busy-loop processes (a machine where other jobs run).

Variants: ``single`` (one process), ``torchrun`` (``torchrun --standalone --nproc_per_node 2``, gloo, the same
global batch) and ``workers`` (an image folder of JPEGs read from disk with ``data.num_workers=2``,
``data.in_memory=never``). Modes: ``before`` runs with ``SIMCLR_THREADS=off`` (the libraries' defaults, as
before the budget existed), ``after`` with the budget (simclr_cli/threads.py); each case runs the modes
back to back, so that they see the same machine. ``--modes passive`` (an ablation) keeps the libraries'
thread counts and sets only ``OMP_WAIT_POLICY=PASSIVE``: what the wait policy alone buys.

Reported per case: the wall time of each process (start to exit, imports included) and the stage's own
``train_seconds``; the ratios B/A and C/A use the mean wall time. Targets (issue 21): B <= 2.3 x A and
C <= 2.3 x A, and A after no slower than A before. The load average before each case says how quiet the
machine was.
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

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
BUSY = "while True: pass"


def _env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "SIMCLR_THREADS", "SIMCLR_THREADS_SET", "SIMCLR_WAIT_SET", "MKL_NUM_THREADS",
                     "GOMP_SPINCOUNT")}
    env["HF_HUB_OFFLINE"] = "1"
    if mode in ("before", "passive"):
        env["SIMCLR_THREADS"] = "off"
    if mode == "passive":  # an ablation: the libraries' thread counts, with only the passive wait policy
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def make_folder(root: Path, images: int) -> Path:
    """An image folder of ``images`` 64 px JPEGs in 10 class folders (the synthetic shapes), made once."""
    import numpy as np
    from PIL import Image

    folder = root / f"jpegs{images}"
    done = folder / ".done"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        cls = folder / "train" / f"c{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(1, 1, 3))
        noise = rng.integers(0, 60, size=(64, 64, 3))
        img = np.clip(base + noise, 0, 255).astype("uint8")
        img[8 + i % 20: 40 + i % 20, 10:40] = 255 - base[0, 0]  # a bright square at a class-dependent place
        Image.fromarray(img).save(cls / f"{i:05d}.jpg", quality=90)
    done.touch()
    return folder


def command(variant: str, steps: int, out: Path, folder: Path | None) -> list[str]:
    stage = ["pretrain", "quickstart", "--set", f"pretrain.max_steps={steps}", "--set", "pretrain.knn_every=0",
             "--out", str(out), "--quiet"]
    if variant == "workers":
        stage += ["--set", "data.dataset=imagefolder", "--set", f"data.root={folder}", "--set", "data.val_split=",
                  "--set", "data.in_memory=never", "--set", "data.num_workers=2"]
    if variant == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "simclr_cli", *stage]
    return [sys.executable, "-m", "simclr_cli", *stage]


def run_case(case: str, variant: str, mode: str, steps: int, work: Path, folder: Path | None) -> dict:
    """One case in fresh processes; returns wall and train seconds of each measured run."""
    runs = 2 if case == "B" else 1
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 if case == "C" else 0)]
    load = os.getloadavg()[0]
    try:
        outs = [work / f"{variant}-{case}-{mode}-{i}" for i in range(runs)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(command(variant, steps, out, folder), env=_env(mode), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for out in outs]
        walls = []
        for p in procs:
            text, _ = p.communicate()
            walls.append(time.perf_counter() - t0)
            if p.returncode != 0:
                raise RuntimeError(f"{variant} {case} {mode} failed (exit {p.returncode}):\n{text[-3000:]}")
    finally:
        for b in busy:
            b.kill()
            b.wait()
    train = [json.loads((out / "pretrain" / "summary.json").read_text())["train_seconds"] for out in outs]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": [round(w, 2) for w in walls], "train_s": train, "mean_wall_s": round(sum(walls) / runs, 2),
            "load_before": round(load, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--variants", default="single,torchrun,workers")
    ap.add_argument("--modes", default="before,after")
    ap.add_argument("--cases", default="A,B,C")
    ap.add_argument("--images", type=int, default=2048, help="images of the workers variant's folder")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: every path in seconds (for the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.images = 2, 64
    modes = args.modes.split(",")
    result: dict = {"steps": args.steps, "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                    "variants": {}}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        work = Path(tmp)
        for variant in args.variants.split(","):
            folder = make_folder(work if args.smoke else CACHE, args.images) if variant == "workers" else None
            cases: dict = {}
            for case in args.cases.split(","):
                for mode in modes:
                    cases.setdefault(mode, {})[case] = run_case(case, variant, mode, args.steps, work, folder)
                    print(f"{variant:9s} {case} {mode:6s} {json.dumps(cases[mode][case])}", file=sys.stderr, flush=True)
            for mode in modes:
                a = cases[mode].get("A", {}).get("mean_wall_s")
                for case in ("B", "C"):
                    if a and case in cases[mode]:
                        cases[mode][f"{case}_over_A"] = round(cases[mode][case]["mean_wall_s"] / a, 2)
            if {"before", "after"} <= set(modes) and "A" in cases["before"]:
                cases["A_after_over_before"] = round(cases["after"]["A"]["mean_wall_s"] / cases["before"]["A"]["mean_wall_s"], 3)
            result["variants"][variant] = cases
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
