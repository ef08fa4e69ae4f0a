"""Pictures of a run (matplotlib, the ``plot`` extra): training curves, pretrained against random init,
and a 2-D map of h (PCA or t-SNE) coloured by label, as in paper Fig. B.4."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from simclr_cli.errors import SimclrError, UsageError
from simclr_cli.layout import RANDOM_INIT_DIR, STAGE_DIRS


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SimclrError("plots need matplotlib: pip install 'simclr-cli[plot]' (or pip install matplotlib)") from None
    return plt


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return out


def plot_curves(run: Path) -> list[Path]:
    """``RUN/plots/<stage>_curves.png`` for every stage with a metrics.jsonl: loss, lr, kNN top-1,
    images/s and the collapse std when present."""
    plt = _pyplot()
    written = []
    for stage in STAGE_DIRS:
        lines = _metrics(run / stage / "metrics.jsonl")
        panels = [k for k in ("loss", "lr", "knn_top1", "images_per_sec", "z_std_ratio", "train_top1",
                              "teacher_agreement") if any(k in x for x in lines)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
        for ax, key in zip(axes[0], panels):
            pts = [(x.get("step", 0), x[key]) for x in lines if x.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None)
            ax.set_title({"z_std_ratio": "std of normalized z x sqrt(d)", "knn_top1": "kNN top-1"}.get(key, key))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run.name}: {stage}")
        fig.tight_layout()
        written.append(_save(fig, run / "plots" / f"{stage}_curves.png", plt))
    return written


def plot_comparison(run: Path) -> Path | None:
    """Pretrained against ``--init random`` for each evaluation stage that has both."""
    pairs = []
    for stage, key in (("linear_eval", "top1"), ("knn", "knn_top1"), ("finetune", "top1")):
        a, b = run / stage / "summary.json", run / RANDOM_INIT_DIR / stage / "summary.json"
        if a.is_file() and b.is_file():
            pairs.append((stage, json.loads(a.read_text()).get(key), json.loads(b.read_text()).get(key)))
    pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
    if not pairs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(pairs), 3.2))
    xs = range(len(pairs))
    ax.bar([x - 0.2 for x in xs], [p[1] for p in pairs], width=0.4, label="pretrained")
    ax.bar([x + 0.2 for x in xs], [p[2] for p in pairs], width=0.4, label="random init")
    for x, p in zip(xs, pairs):
        ax.text(x - 0.2, p[1], f"{p[1]:.1f}", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, p[2], f"{p[2]:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [p[0] for p in pairs])
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    ax.set_title(f"{run.name}: pretrained vs random init")
    fig.tight_layout()
    return _save(fig, run / "plots" / "pretrained_vs_random.png", plt)


def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """(N, 2) coordinates: PCA, or t-SNE (exact, for a few thousand points) started from PCA."""
    x = features.float() - features.float().mean(0)
    _, _, v = torch.pca_lowrank(x, q=min(2, x.shape[1]), center=False)
    pca = x @ v[:, :2]
    if method == "pca":
        return pca
    if method != "tsne":
        raise UsageError(f"--method {method}: expected pca or tsne")
    return _tsne(x, pca / pca.std() * 1e-2, seed=seed)


def _tsne(x: torch.Tensor, init: torch.Tensor, perplexity: float = 30.0, steps: int = 500, seed: int = 0) -> torch.Tensor:
    """Exact t-SNE with gradient descent, momentum and early exaggeration (van der Maaten, 2008)."""
    torch.manual_seed(seed)
    n = x.shape[0]
    d = torch.cdist(x, x).pow(2)
    target = torch.log(torch.tensor(min(perplexity, (n - 1) / 3)))
    lo, hi = torch.full((n, 1), 1e-10), torch.full((n, 1), 1e10)
    beta = torch.ones(n, 1)
    for _ in range(50):  # binary search of each point's precision to match the perplexity
        p = torch.exp(-d * beta)
        p.fill_diagonal_(0)
        sum_p = p.sum(1, keepdim=True).clamp_min(1e-12)
        entropy = torch.log(sum_p) + beta * (d * p).sum(1, keepdim=True) / sum_p
        bigger = entropy > target
        lo = torch.where(bigger, beta, lo)
        hi = torch.where(bigger, hi, beta)
        beta = torch.where(hi < 1e10, (lo + hi) / 2, beta * 2)
    p = p / sum_p
    p = (p + p.T) / (2 * n)
    y = init.clone()
    vel = torch.zeros_like(y)
    for it in range(steps):
        num = 1.0 / (1.0 + torch.cdist(y, y).pow(2))
        num.fill_diagonal_(0)
        q = (num / num.sum()).clamp_min(1e-12)
        pe = p * (12.0 if it < 100 else 1.0)
        grad = 4 * (((pe - q) * num).unsqueeze(2) * (y.unsqueeze(1) - y.unsqueeze(0))).sum(1)
        vel = (0.5 if it < 100 else 0.8) * vel - 200.0 * grad
        y = y + vel
    return y


def plot_embedding(coords: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in sorted(set(labels.tolist())):
        m = labels == c
        name = classes[c] if 0 <= c < len(classes) else str(c)
        ax.scatter(coords[m, 0], coords[m, 1], s=6, color=cmap(c % cmap.N), label=name, alpha=0.8)
    if len(classes) <= 20:
        ax.legend(markerscale=2, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
