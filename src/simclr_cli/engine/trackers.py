"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) through Accelerate's tracker API.

``metrics.jsonl`` is always written; trackers are extra copies of the same numbers, chosen with the
recipe's top-level ``trackers`` key (``trackers = "tensorboard,mlflow"``; the older ``tensorboard = true``
still adds TensorBoard). Each one is an optional extra, imported by :func:`require_trackers` before a stage
does any work, so a missing package is a one-line error naming what to install.

Where each one writes:

* ``tensorboard``: event files in ``RUN/STAGE/tensorboard/`` (the recipe as hparams beside them).
* ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else a local file store ``RUN/mlruns`` (``mlflow ui
  --backend-store-uri runs/NAME/mlruns``); experiment ``tracker_project``, run name ``NAME/STAGE``.
* ``wandb``: wherever W&B writes by itself (``./wandb`` or ``WANDB_DIR``), honouring ``WANDB_MODE``
  (``offline`` needs no account); project ``tracker_project``, run name ``NAME/STAGE``.

Accelerate starts, logs to and finishes trackers on the main process only; our callers also only log
there (:class:`~simclr_cli.engine.reporting.MetricsLog` is enabled on the main process alone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from simclr_cli.errors import UsageError

# tracker name -> (module that must import, the simclr-cli extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def parse_trackers(text: str) -> list[str]:
    """``"tensorboard, mlflow"`` -> ``["tensorboard", "mlflow"]`` (order kept, repeats dropped)."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name and name not in names:
            names.append(name)
    return names


def tracker_names(recipe) -> list[str]:
    """The trackers a recipe asks for: ``trackers`` plus TensorBoard for ``tensorboard = true``."""
    names = parse_trackers(recipe.trackers)
    if recipe.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def require_trackers(names: list[str]) -> None:
    """Import every tracker's package now, before any work is done (or replaced); a clear error naming the
    extra to install when one is missing."""
    for name in names:
        module, extra = TRACKERS[name]
        try:
            __import__(module)  # through builtins.__import__, so a test can make it fail
        except ImportError as e:
            raise UsageError(f"trackers: '{name}' needs the {extra} extra ({e}): pip install 'simclr-cli[{extra}]' "
                             f"(or remove '{name}' from trackers"
                             + (", and set tensorboard = false)" if name == "tensorboard" else ")")) from None


def mlflow_tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a local file store in ``run_dir/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / "mlruns").as_uri()


def build_trackers(names: list[str], stage_dir: Path, *, project: str, run_name: str) -> list:
    """Accelerate tracker objects for ``Accelerator(log_with=...)``; nothing is started or written until
    ``accelerator.init_trackers`` (each tracker's ``start`` runs on the main process only)."""
    from accelerate.tracking import GeneralTracker

    stage_dir = Path(stage_dir)
    trackers: list[GeneralTracker] = []
    for name in names:
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            trackers.append(TensorBoardTracker("tensorboard", stage_dir))  # -> STAGE_DIR/tensorboard
        elif name == "mlflow":
            trackers.append(_mlflow_tracker(project, run_name, mlflow_tracking_uri(stage_dir.parent)))
        elif name == "wandb":
            from accelerate.tracking import WandBTracker

            # wandb.init reads WANDB_MODE, WANDB_DIR, WANDB_API_KEY ... itself
            trackers.append(WandBTracker(project, name=run_name))
    return trackers


def _mlflow_tracker(project: str, run_name: str, uri: str):
    from accelerate.tracking import MLflowTracker, on_main_process

    class LocalMLflowTracker(MLflowTracker):
        """Accelerate's MLflow tracker, pointed at ``uri`` when it starts (mlflow's tracking URI is global)."""

        @on_main_process
        def start(self):
            import mlflow

            if uri.startswith("file:"):
                # MLflow 3 refuses file stores unless asked; a local store under the run is what we want here
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            try:
                super().start()
            except mlflow.exceptions.MlflowException:
                if self.run_id is None:
                    raise
                self.run_id = None  # the run to continue is not in this store (another MLFLOW_TRACKING_URI): a new one
                super().start()

        @on_main_process
        def finish(self, status: str = "FINISHED"):
            import mlflow

            mlflow.end_run(status=status)

    return LocalMLflowTracker(experiment_name=project, run_name=run_name)


TRACKER_FILE = "trackers.json"  # in the stage folder: the MLflow / W&B run ids, so that --resume continues them


def run_ids(trackers: list) -> dict[str, str]:
    """The started MLflow and W&B runs' ids (main process), to write to :data:`TRACKER_FILE`."""
    ids: dict[str, str] = {}
    for tracker in trackers:
        if tracker.name == "mlflow" and getattr(tracker, "active_run", None) is not None:
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb" and getattr(tracker, "run", None) is not None:
            ids["wandb"] = tracker.run.id
    return ids


def read_ids(path: Path) -> dict[str, str]:
    """The run ids in :data:`TRACKER_FILE` (empty when missing or unreadable: the trackers start new runs)."""
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def resume_trackers(trackers: list, step: int, ids: dict[str, str]) -> None:
    """A resumed stage goes on after ``step``: TensorBoard hides the events logged after it by the interrupted
    run (``purge_step``), as ``metrics.jsonl`` drops those lines; MLflow and W&B continue the interrupted
    run's own run (``ids``, from :data:`TRACKER_FILE`) when there is one."""
    for tracker in trackers:
        name = getattr(tracker, "name", "")
        if name == "tensorboard":
            tracker.init_kwargs["purge_step"] = int(step) + 1
        elif name == "mlflow" and ids.get("mlflow") and not tracker.run_id:
            tracker.run_id = ids["mlflow"]
        elif name == "wandb" and ids.get("wandb"):
            tracker.init_kwargs.update(id=ids["wandb"], resume="allow")


def flat_config(recipe_dict: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The resolved recipe as one level of ``section.key`` -> scalar (arrays as text), the form every tracker
    takes as a run's config or params."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in recipe_dict.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def scalars(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float | int]:
    """The numbers of a metrics record (booleans, text and None left out)."""
    return {k: v for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def finish_trackers(accelerator, status: str = "FINISHED") -> None:
    """Finish every started tracker (main process; Accelerate guards each call). Not
    ``accelerator.end_training()``: that also destroys the process group, which later barriers of the stage
    (and later stages in the same process) still use. ``status``: how the MLflow run ends, ``FINISHED``,
    ``FAILED`` or ``KILLED`` (stopped by a signal)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "mlflow":
            tracker.finish(status=status)
        else:
            tracker.finish()
    accelerator.trackers = []
