"""DataLoader worker memory over one pass of a 1M-entry file list: compact arrays against a plain list (issue 13).

    python benchmarks/worker_memory.py                       # 1,000,000 entries, 2 workers, both variants
    python benchmarks/worker_memory.py --entries 20000       # a quick look

A Python list of path strings is shared with forked DataLoader workers copy-on-write, but every read of a
string writes its reference count, so each worker ends up with its own copy of every page it read
("copy-on-read", pytorch/pytorch#13246). ``FileListSource`` keeps files and labels in numpy arrays
(``data/listing/index.py``: ``Strings``, ``Ints``), which reads never write.

Each variant runs in a fresh process: it builds a source of ``--entries`` paths (about 60 characters, labels
0..999), then one shuffled pass of a DataLoader (``--workers`` workers, fork, batch 256) whose
``__getitem__`` reads the path and the label and decodes nothing. The main process reads each worker's
``/proc/PID/smaps_rollup`` once the first batch has arrived and again after the last one, and reports the
growth of RSS, PSS and USS (Private_Clean + Private_Dirty: the worker's own pages) per worker, in MiB.
Prints one JSON object; the target is <= 50 MB growth per worker for ``compact``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _smaps(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of process ``pid`` in MiB, from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                fields[parts[0][:-1]] = int(parts[1]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0)}


class PlainListSource:
    """The source as it was: a list of str and a list of int."""

    def __init__(self, files: list[str], labels: list[int]) -> None:
        self.files = files
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)


class PathsOnly:
    """A Dataset that touches the path and the label of each sample, decoding nothing."""

    def __init__(self, source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source.files)

    def __getitem__(self, i: int) -> int:
        return len(self.source.files[i]) + self.source.labels[i]


def run_variant(variant: str, entries: int, workers: int, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from simclr_cli.data.sources.images import FileListSource

    t0 = time.perf_counter()
    files = [f"/data/collection/shard_{i % 997:04d}/part_{i % 13:02d}/image_{i:09d}.jpg" for i in range(entries)]
    labels = [i % 1000 for i in range(entries)]
    if variant == "compact":
        source = FileListSource(files, labels, [str(c) for c in range(1000)], "bench")
        del files, labels
    else:
        source = PlainListSource(files, labels)
    import gc

    gc.collect()
    built = time.perf_counter() - t0
    loader = DataLoader(PathsOnly(source), batch_size=batch, shuffle=True, num_workers=workers,
                        multiprocessing_context="fork", generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    total = next(it).sum().item()
    pids = [w.pid for w in it._workers]  # private, but the only way to the worker processes
    before = {pid: _smaps(pid) for pid in pids}
    t1 = time.perf_counter()
    for _ in range(len(loader) - 1):
        total += next(it).sum().item()
    after = {pid: _smaps(pid) for pid in pids}  # the workers are alive until the iterator is exhausted
    seconds = time.perf_counter() - t1
    del it
    growth = {k: [round(after[p][k] - before[p][k], 1) for p in pids] for k in ("rss", "pss", "uss")}
    return {"variant": variant, "entries": entries, "workers": workers, "build_s": round(built, 2),
            "pass_s": round(seconds, 2), "checksum": total,
            "worker_growth_mib": growth,
            "worker_after_mib": {k: [round(after[p][k], 1) for p in pids] for k in ("rss", "pss", "uss")}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--variants", default="compact,list")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.variant:
        row = run_variant(args.variant, args.entries, args.workers, args.batch)
        print(json.dumps(row))
        return row
    rows = []
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--entries", str(args.entries),
                              "--workers", str(args.workers), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    result = {"rows": rows}
    print("{\"rows\": [\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]}")
    return result


if __name__ == "__main__":
    main()
