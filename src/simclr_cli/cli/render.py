"""What the commands print: rich tables on a console that never truncates when written to a file or pipe."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich import box
from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A console for tables: the terminal's width, or 200 columns for files and pipes (never truncate)."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


def pick(summary: dict, *keys: str) -> dict:
    """The ``keys`` of a stage's summary that it has, in that order."""
    return {k: summary[k] for k in keys if k in summary}


def show_result(title: str, row: dict, enabled: bool = True) -> None:
    """A stage's result: a one-row table, floats to 2 decimals."""
    if not enabled:
        return
    table = Table(title=title, box=box.SIMPLE)
    for k in row:
        table.add_column(k, justify="right")
    table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    console().print(table)


def pretrain_done(summary: dict) -> str:
    """The last line of ``simclr pretrain``: steps, throughput and the kNN monitor (against random init)."""
    knn = summary.get("knn_top1")
    init = summary.get("knn_top1_init")
    extra = (f", kNN top-1 {knn:.2f}" + (f" (random init {init:.2f})" if init is not None else "")
             if knn is not None else "")
    return f"done: {summary['steps']} steps, {summary['images_per_sec']:.1f} img/s{extra}"


def show_info(path: Path, fields: Iterable[tuple[str, str]]) -> None:
    """``simclr info``: a checkpoint's fields, one per row."""
    table = Table("field", "value", title=str(path), show_header=False)
    for k, v in fields:
        table.add_row(k, v)
    console().print(table)


def show_runs(root: Path, found: list[dict]) -> None:
    """``simclr runs``: one row per run (:func:`simclr_cli.inspect_runs.list_runs`)."""
    table = Table("run", "stages done", "key metrics", "wall", title=f"runs under {root}/")
    for r in found:
        stages = ", ".join(r["stages"]) + (f" (interrupted: {', '.join(r['interrupted'])})" if r["interrupted"] else "")
        stages += f" (unreadable summary.json: {', '.join(r['unreadable'])})" if r.get("unreadable") else ""
        metrics = "  ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                            for k, v in r["metrics"].items() if v is not None)
        table.add_row(r["run"], stages, metrics, f"{r['wall_seconds']:.0f} s")
    console().print(table)


def show_recipes(recipes: Iterable[tuple[str, object]]) -> None:
    """``simclr recipes list``: (name, :class:`~simclr_cli.recipe.Recipe`) pairs, one row each."""
    table = Table("name", "dataset", "backbone", "px", "batch", "epochs", "optimizer", "tau", box=box.SIMPLE)
    for name, r in recipes:
        p = r.pretrain
        table.add_row(name, r.data.dataset, r.model.backbone + (" (cifar stem)" if r.model.cifar_stem else ""),
                      str(r.data.image_size), str(p.batch_size), str(p.epochs),
                      f"{p.optimizer} {p.lr:g} ({p.lr_scaling})",
                      f"{p.options.temperature:g}" if hasattr(p.options, "temperature") else "-")
    console().print(table)


def show_data_check(reports: Iterable, max_bad_fraction: float) -> list[str]:
    """``simclr data check``: per split (as each scan finishes), a table of class counts, image sizes, the
    unreadable files and a verdict. Returns the splits on which training would stop."""
    from simclr_cli.data.check import would_abort

    out = console()
    aborting = []
    for rep in reports:
        table = Table(title=f"{rep.split}: {rep.source}", show_header=True)
        table.add_column("class")
        table.add_column("images", justify="right")
        for name, n in rep.class_counts.items():
            table.add_row(name, str(n))
        if rep.unlabeled:
            table.add_row("(unlabeled)", str(rep.unlabeled))
        out.print(table)
        sizes = rep.size_stats()
        if sizes:
            hw = {k: f"{v[0]}x{v[1]}" for k, v in sizes.items() if k in ("smallest", "median", "largest")}
            out.print(f"sizes (h x w of real images, by area): smallest {hw['smallest']}, median {hw['median']}, "
                      f"largest {hw['largest']}; heights {sizes['height'][0]}..{sizes['height'][1]}, "
                      f"widths {sizes['width'][0]}..{sizes['width'][1]}")
        for name, err in rep.unreadable:
            out.print(f"unreadable: {name} ({err})", markup=False)
        bad = len(rep.unreadable)
        verdict = "training would stop" if would_abort(rep, max_bad_fraction) else "training would skip them"
        out.print(f"{rep.split}: {rep.images} images, {bad} unreadable"
                  + (f" ({100 * bad / max(rep.images, 1):.2f}%; {verdict})" if bad else ""))
        if would_abort(rep, max_bad_fraction):
            aborting.append(rep.split)
    return aborting
