"""What ``simclr info`` and ``simclr runs`` show: checkpoints' metadata and the runs under ./runs."""

from __future__ import annotations

import json
from pathlib import Path

from simclr_cli.checkpoints import MODEL_FILE, read_metadata
from simclr_cli.errors import UsageError
from simclr_cli.recipe import parse_saved_toml, recipe_from_dict
from simclr_cli.layout import KEY_METRICS, RANDOM_INIT_DIR, RUNS_ROOT, STAGE_FOLDERS


def resolve_checkpoint(path: Path, runs_root: Path = RUNS_ROOT) -> Path:
    """The checkpoint ``info`` shows for ``path``: the file itself, a stage folder's, a run folder's
    (its pretrain checkpoint, else its newest stage's), or that of a run name under ./runs."""
    path = Path(path).expanduser()
    if not path.exists() and len(path.parts) == 1 and (runs_root / path).is_dir():
        path = runs_root / path
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        found = [path / s / MODEL_FILE for s in STAGE_FOLDERS if (path / s / MODEL_FILE).is_file()]
        if not found:
            raise UsageError(f"{path}: no such checkpoint (no {MODEL_FILE} here, nor in a stage folder of it "
                             f"such as {path / 'pretrain'}); pass a run directory or a checkpoint")
        pretrain = path / "pretrain" / MODEL_FILE
        return pretrain if pretrain in found else max(found, key=lambda p: p.stat().st_mtime)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint")
    return path


def set_aside_runs(path: Path, runs_root: Path = RUNS_ROOT) -> list[str]:
    """Warnings for the previous runs that a killed ``--overwrite`` left set aside (``RUN/.STAGE.old-PID``) in the
    run that ``path`` (a checkpoint, a stage folder, a run folder or name) belongs to."""
    path = Path(path).expanduser()
    if not path.exists() and len(path.parts) == 1 and (runs_root / path).is_dir():
        path = runs_root / path
    if path.is_file():
        path = path.parent
    run = path.parent if path.name in STAGE_FOLDERS else path
    if not run.is_dir():
        return []
    return [f"warning: {old} holds a previous {old.name[1:].split('.old-')[0]} run set aside by an --overwrite that "
            f"was killed; move it back to {run / old.name[1:].split('.old-')[0]} to keep it, or delete it"
            for old in sorted(run.glob(".*.old-*")) if old.is_dir() and old.name[1:].split(".old-")[0] in STAGE_FOLDERS]


def read_summary(path: Path) -> dict | None:
    """A stage's summary.json, or None when it cannot be read or is not a JSON object (a torn or edited file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_info(path: Path) -> list[tuple[str, str]]:
    """(field, value) rows for one checkpoint: metadata, key recipe values, final metrics."""
    path = resolve_checkpoint(path)
    try:
        meta = read_metadata(path)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{path}: not a readable safetensors file ({e})") from None
    if "simclr.recipe" not in meta:
        raise UsageError(f"{path}: not a simclr-cli checkpoint (no simclr.recipe metadata)")
    r = recipe_from_dict(parse_saved_toml(meta["simclr.recipe"], str(path)), str(path))
    p = r.pretrain
    rows = [
        ("checkpoint", str(path)),
        ("stage", meta.get("simclr.stage", "?")),
        ("backbone", meta.get("simclr.backbone", "?") + (" (CIFAR stem)" if meta.get("simclr.cifar_stem") == "true" else "")),
        ("feature dim", meta.get("simclr.feature_dim", "?")),
        ("data", f"{r.data.dataset} ({r.data.root if r.data.dataset != 'synthetic' else 'built in'}), "
                 f"train '{r.data.train_split}', {r.data.image_size} px"),
        ("pretrain", f"{p.epochs} epochs" + (f" (max {p.max_steps} steps)" if p.max_steps else "")
                     + f", batch {p.batch_size}, {p.optimizer} lr {p.lr:g} ({p.lr_scaling})"),
        ("objective", p.objective_summary()),
        ("projection head", f"{r.model.proj_layers} layers, out {r.model.proj_dim}"),
    ]
    if "simclr.num_classes" in meta:
        rows.append(("classifier", f"{meta['simclr.num_classes']} classes on {meta.get('simclr.head_layers', '0')} "
                                   f"head layer(s), init {meta.get('simclr.init', '?')}"))
    if "simclr.labels" in meta:
        rows.append(("labels", meta["simclr.labels"]))
    rows.append(("simclr-cli", meta.get("simclr.version", "?")))
    summary = path.parent / "summary.json"
    if summary.is_file():
        data = read_summary(summary)
        if data is None:
            rows.append(("summary.json", f"unreadable ({summary}): not a JSON object; the checkpoint itself is fine"))
        for k, v in (data or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                text = f"{v:g}" if isinstance(v, float) else str(v)
                rows.append((k, text + (f"  ({TIME_FIELDS[k]})" if k in TIME_FIELDS else "")))
    return rows


# What the times of a summary.json count (the same for every stage; engine/loop.py LoopResult).
TIME_FIELDS = {
    "train_seconds": "seconds in training steps, over every invocation of a resumed run; "
                     "setup, kNN monitor and evaluation excluded",
    "wall_seconds": "wall-clock seconds of the stage, over every invocation: setup, training, kNN, evaluation",
    "images_per_sec": "images trained / train_seconds",
}


def list_runs(root: Path = Path("runs")) -> list[dict]:
    """One entry per run folder under ``root`` (and its random_init baselines): stages done, key
    metrics, wall time."""
    out = []
    if not root.is_dir():
        return out
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    for run in folders:
        for d in (run, run / RANDOM_INIT_DIR):
            stages, unreadable = {}, []
            for s in STAGE_FOLDERS:
                f = d / s / "summary.json"
                if f.is_file():
                    data = read_summary(f)
                    if data is None:
                        unreadable.append(s)  # shown as such; one bad file does not hide the other runs
                    stages[s] = data or {}
            interrupted = [s for s in STAGE_FOLDERS if (d / s / "state").is_dir() and s not in stages]
            if not stages and not interrupted:
                continue
            metrics = {}
            for s in stages:
                if s not in KEY_METRICS:  # the number each stage is judged by, for the runs table
                    continue
                value = stages[s].get(KEY_METRICS[s])
                if value is None and stages[s].get("final_loss") is not None:  # no kNN monitor: the final loss
                    metrics[f"{s} final loss"] = stages[s]["final_loss"]
                else:
                    metrics[s] = value
            if "transfer" in stages:
                res = stages["transfer"].get("results", {})
                n = sum(len(v) for v in res.values() if isinstance(v, (dict, list))) if isinstance(res, dict) else 0
                metrics["transfer"] = f"{n} result(s)"
            out.append({
                "run": str(d),
                "stages": list(stages),
                "interrupted": interrupted,
                "unreadable": unreadable,
                "metrics": metrics,
                "wall_seconds": round(sum(_number(v.get("wall_seconds")) for v in stages.values()), 1),
            })
    return out


def _number(value) -> float:
    """A summary's number, or 0 for a missing or edited value."""
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0
