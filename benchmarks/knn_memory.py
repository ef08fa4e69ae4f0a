"""Peak memory of the kNN search on a large synthetic bank, before and after the chunked search (issue 14).

    python benchmarks/knn_memory.py                      # 200k x 512 bank, 10k queries, k=200, 100 classes
    python benchmarks/knn_memory.py --configs after --bank 1000 --queries 100   # a quick look

Each configuration runs in a fresh subprocess on random L2-normalized features (the same seed for all) and
reports, as JSON on stdout: peak RSS (``ru_maxrss``), the RSS once the features exist, their difference (what
the search itself needed), the time, and a digest of the predicted classes (equal digests: the same predictions).

Configurations:
  before   the search as it was: 1024 queries at a time against the whole bank, one-hot (m, k, C) scores
  after    evaluation.knn.knn_scores with its defaults (QUERY_CHUNK x BANK_CHUNK similarities at a time)
  queries  knn_scores chunked over queries only (bank_chunk=0)
  whole    knn_scores with one (M, N) matrix (query_chunk=0, bank_chunk=0): what the chunks avoid
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

CONFIGS = ("before", "after", "queries", "whole")


def _before_knn_scores(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1, chunk=1024):
    """``evaluation.knn.knn_scores`` before issue 14, verbatim."""
    import torch
    import torch.nn.functional as F

    k = min(k, train_features.shape[0])
    out = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start : start + chunk] @ train_features.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        one_hot = F.one_hot(train_labels[top_idx], num_classes).float()  # (m, k, C)
        out.append((weights.unsqueeze(-1) * one_hot).sum(1))
    return torch.cat(out)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(config: str, bank: int, dim: int, queries: int, classes: int, k: int, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    from simclr_cli.evaluation.knn import BANK_CHUNK, QUERY_CHUNK, knn_scores

    g = torch.Generator().manual_seed(seed)
    bank_f = torch.randn(bank, dim, generator=g)
    bank_f /= bank_f.norm(dim=1, keepdim=True)  # in place: the peak so far is the features themselves
    bank_y = torch.randint(0, classes, (bank,), generator=g)
    q_f = F.normalize(torch.randn(queries, dim, generator=g), dim=1)
    base = _rss_mib()
    t0 = time.perf_counter()
    if config == "before":
        scores, chunks = _before_knn_scores(bank_f, bank_y, q_f, classes, k), (1024, bank)
    else:
        qc, bc = {"after": (QUERY_CHUNK, BANK_CHUNK), "queries": (QUERY_CHUNK, 0), "whole": (0, 0)}[config]
        scores, chunks = knn_scores(bank_f, bank_y, q_f, classes, k, 0.1, qc, bc), (qc or queries, bc or bank)
    seconds = time.perf_counter() - t0
    peak = _rss_mib()
    pred = scores.argmax(1).numpy().tobytes()
    return {"config": config, "query_chunk": chunks[0], "bank_chunk": chunks[1],
            "peak_rss_mib": round(peak), "rss_with_features_mib": round(base), "search_mib": round(peak - base),
            "seconds": round(seconds, 1), "predictions_sha1": hashlib.sha1(pred).hexdigest()[:12]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="before,after,queries", help=f"comma-separated, of {','.join(CONFIGS)}")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    sizes = [args.bank, args.dim, args.queries, args.classes, args.k, args.seed]
    if args.one:
        print(json.dumps(one(args.one, *sizes)))
        return []
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            p.error(f"--configs: unknown {config!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--one", config, "--bank", str(args.bank), "--dim", str(args.dim),
               "--queries", str(args.queries), "--classes", str(args.classes), "--k", str(args.k),
               "--seed", str(args.seed)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
