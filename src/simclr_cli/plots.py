"""Pictures of a run (matplotlib, the ``plot`` extra): training curves, pretrained against random init,
and a 2-D map of h (PCA or t-SNE) coloured by label, as in paper Fig. B.4."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from simclr_cli.errors import SimclrError, UsageError
from simclr_cli.layout import RANDOM_INIT_DIR, STAGE_FOLDERS


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


# The panels of a stage's curves, in this order: metrics.jsonl key -> (title, y-axis label).
PANELS = {
    "loss": ("training loss", "loss (mean over the logged steps)"),
    "test_top1": ("test top-1", "test top-1 (%)"),
    "knn_top1": ("kNN top-1 on val", "kNN top-1 (%)"),
    "train_top1": ("train top-1", "train top-1 (%, on the batches)"),
    "teacher_agreement": ("student agrees with the teacher", "agreement (%)"),
    "lr": ("learning rate", "learning rate"),
    "images_per_sec": ("throughput", "images/s"),
    "z_std_ratio": ("spread of normalized z; collapse -> 0", "std(z/|z|) x sqrt(d)"),
}
HEALTHY_Z_SPREAD = 1.0  # z_std_ratio of z spread evenly over the sphere (objectives/base.py)


def plot_curves(run: Path, stages: tuple[str, ...] = STAGE_FOLDERS) -> list[Path]:
    """``RUN/plots/<stage>_curves.png`` for every stage (of ``stages``) with a metrics.jsonl
    (:func:`curves_figure`)."""
    plt = _pyplot()
    written = []
    for stage in stages:
        fig = curves_figure(run, stage, plt)
        if fig is not None:
            written.append(_save(fig, run / "plots" / f"{stage}_curves.png", plt))
    return written


def curves_figure(run: Path, stage: str, plt=None):
    """The matplotlib figure of one stage's ``metrics.jsonl``, or None when it has nothing to draw: one panel
    per logged quantity (:data:`PANELS`) with its y-axis label, the kNN values annotated (first -> last), the
    collapse panel with its healthy level, and "partial" in the title while the stage has no summary.json
    (still running, or interrupted)."""
    plt = plt or _pyplot()
    lines = _metrics(run / stage / "metrics.jsonl")
    panels = [k for k in PANELS if any(x.get(k) is not None for x in lines)]
    if not panels:
        return None
    # Records of the training loop carry images_per_sec and count optimizer steps; a stage without them logs one
    # record per epoch (linear-eval cached: the fit on cached features), drawn against epochs.
    by_epoch = not any("images_per_sec" in x for x in lines)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        pts = [(x.get("epoch" if by_epoch else "step", 0), x[key]) for x in lines if x.get(key) is not None]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o" if len(pts) < 20 else None)
        title, ylabel = PANELS[key]
        if key in ("knn_top1", "test_top1") and pts:
            for x, y in ([pts[0], pts[-1]] if len(pts) > 1 else pts):
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            title += f": {ys[0]:.1f} -> {ys[-1]:.1f}" if len(pts) > 1 else f": {ys[0]:.1f}"
        if key == "z_std_ratio":
            ax.axhline(HEALTHY_Z_SPREAD, color="tab:green", linestyle="--", label="healthy (spread over the sphere)")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch" if by_epoch else "step (optimizer updates)")
        ax.grid(alpha=0.3)
    title = f"{run.name}: {stage}"
    if not (run / stage / "summary.json").is_file():
        last = max((x.get("step", 0) for x in lines), default=0)
        title += f" (partial: running or interrupted, at {'epoch' if by_epoch else 'step'} {last})"
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def refresh_curves(run: Path, stage: str) -> Path | None:
    """A finished stage redraws its curves when matplotlib (the ``plot`` extra) is installed; None otherwise,
    or when drawing fails (a plot never fails the stage: ``simclr plot`` draws it again)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    try:
        written = plot_curves(Path(run), (stage,))
    except Exception:  # noqa: BLE001 - the stage's results are written; a figure is a convenience
        return None
    return written[0] if written else None


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


TSNE_AUTO_MAX = 1000  # --method auto: t-SNE up to this many points (exact t-SNE, seconds on a CPU), PCA above


def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """(N, 2) coordinates: PCA, or t-SNE (exact, for a few thousand points) started from PCA."""
    return projection(features, method, seed)[0]


def projection(features: torch.Tensor, method: str = "pca", seed: int = 0) -> tuple[torch.Tensor, tuple[str, str]]:
    """(N, 2) coordinates and the two axis labels: PCA ("PC1 (31% of variance)"), or t-SNE started from PCA;
    ``auto``: t-SNE up to :data:`TSNE_AUTO_MAX` points, PCA above."""
    if method == "auto":
        method = "tsne" if features.shape[0] <= TSNE_AUTO_MAX else "pca"
    if method not in ("pca", "tsne"):
        raise UsageError(f"--method {method}: expected auto, pca or tsne")
    x = features.float() - features.float().mean(0)
    _, _, v = torch.pca_lowrank(x, q=min(2, x.shape[1]), center=False)
    pca = x @ v[:, :2]
    if method == "pca":
        total = x.var(0).sum().clamp_min(1e-12)
        share = [100 * float(pca[:, i].var() / total) for i in range(pca.shape[1])]
        return pca, tuple(f"PC{i + 1} ({p:.0f}% of variance)" for i, p in enumerate(share))
    return _tsne(x, pca / pca.std() * 1e-2, seed=seed), ("t-SNE 1 (no units)", "t-SNE 2 (no units)")


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


def plot_embedding(coords: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, title: str,
                   axis_labels: tuple[str, str] = ("", "")) -> Path:
    plt = _pyplot()
    return _save(embedding_figure(coords, labels, classes, title, axis_labels, plt), path, plt)


def embedding_figure(coords: torch.Tensor, labels: torch.Tensor, classes: list[str], title: str,
                     axis_labels: tuple[str, str] = ("", ""), plt=None):
    """The 2-D map of h, one colour per class, with the projection's axis labels."""
    plt = plt or _pyplot()
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
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
