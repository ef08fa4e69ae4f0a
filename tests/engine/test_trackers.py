"""Experiment trackers through Accelerate (engine/trackers.py): TensorBoard, MLflow and W&B, all offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine.reporting import MetricsLog
from simclr_cli.engine.trackers import flat_config, tracker_names
from simclr_cli.errors import RecipeError
from simclr_cli.recipe import load_recipe, recipe_to_dict
from simclr_cli.stages import pretrain
from simclr_cli.stages.scaffold import StageRun

TINY = ["pretrain.epochs=1", "pretrain.log_every=1"]


def _logged(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_logged_scalar_and_the_recipe(tiny_recipe_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(tiny_recipe_file, TINY + ["trackers=tensorboard"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    tb = tmp_path / "run" / "pretrain" / "tensorboard"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "knn_top1", "images_per_sec", "summary/final_loss", "summary/knn_top1"} <= tags
    lines = [r for r in _logged(tmp_path / "run") if "loss" in r]
    losses = {e.step: e.value for e in acc.Scalars("loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in lines})  # the same numbers as metrics.jsonl
    hparams = list(tb.glob("*/hparams.yml"))  # Accelerate stores the config beside the events
    assert hparams and "pretrain.simclr.temperature: 0.5" in hparams[0].read_text()


def test_tensorboard_true_is_kept_as_an_alias():
    recipe = load_recipe("quickstart", ["tensorboard=true", "trackers=mlflow"])
    assert tracker_names(recipe) == ["mlflow", "tensorboard"]
    assert tracker_names(load_recipe("quickstart", [])) == []


def test_an_unknown_tracker_is_a_recipe_error():
    with pytest.raises(RecipeError, match="tensorboard, mlflow, wandb"):
        load_recipe("quickstart", ["trackers=tensorbord"])


def test_mlflow_local_file_store_gets_metrics_and_the_resolved_recipe(tiny_recipe_file, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe = load_recipe(tiny_recipe_file, TINY + ["trackers=mlflow", "tracker_project=tests"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "tiny/pretrain" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["pretrain.simclr.temperature"] == "0.5" and params["model.backbone"] == "test_resnet"
    assert params["stage"] == "pretrain" and params["augment.crop_scale"] == "[0.08, 1.0]"
    lines = [r for r in _logged(tmp_path / "run") if "loss" in r]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx({r["step"]: r["loss"] for r in lines})
    summary = json.loads((tmp_path / "run" / "pretrain" / "summary.json").read_text())
    assert run.data.metrics["summary/knn_top1"] == pytest.approx(summary["knn_top1"])


def test_mlflow_defaults_to_a_file_store_under_the_run(tiny_recipe_file, tmp_path, monkeypatch):
    """A stage without a training loop (knn) logs its summary; without MLFLOW_TRACKING_URI the store is RUN/mlruns."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set by the tracker otherwise; restored after the test
    recipe = load_recipe(tiny_recipe_file, ["pretrain.epochs=1", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    src = tmp_path / "run"
    r = CliRunner().invoke(app, ["knn", str(src), "-q", "--set", "trackers=mlflow"])
    assert r.exit_code == 0, r.output
    client = MlflowClient((src / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert run.info.run_name == "tiny/knn"
    top1 = json.loads((src / "knn" / "summary.json").read_text())["knn_top1"]
    assert run.data.metrics["summary/knn_top1"] == pytest.approx(top1)


def test_wandb_offline_run_is_written_with_the_logged_keys(tiny_recipe_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wb"),
                 "WANDB_CONFIG_DIR": str(tmp_path / "wbconfig"), "WANDB_CACHE_DIR": str(tmp_path / "wbcache")}.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wb").mkdir()
    recipe = load_recipe(tiny_recipe_file, TINY + ["trackers=wandb", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("*.wandb")  # the offline record `wandb sync` uploads
    raw = data.read_bytes()
    for key in (b"loss", b"lr", b"images_per_sec", b"summary/final_loss", b"pretrain.simclr.temperature"):
        assert key in raw


def test_a_missing_extra_is_a_clear_error_before_any_work(tiny_recipe_file, without_module):
    without_module("mlflow")
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "trackers=tensorboard,mlflow"])
    assert r.exit_code == 2, r.output
    assert "pip install 'simclr-cli[mlflow]'" in r.output and "Traceback" not in r.output
    assert not Path("runs/tiny").exists()  # nothing was started


class _Spy:
    """Stands in for the Accelerator: records what reaches the trackers."""

    def __init__(self, main: bool) -> None:
        self.is_main_process = main
        self.trackers = ["tracker"]
        self.calls: list = []

    def log(self, values, step=None):
        self.calls.append((values, step))


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_gives_numbers_to_the_trackers(tmp_path, main):
    calls = []
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=main, track=lambda v, s: calls.append((v, s)))
    log.write({"step": 3, "epoch": 0.5, "loss": 1.25, "lr": 0.1, "time": 2.0, "skipped": False})
    assert calls == ([({"loss": 1.25, "lr": 0.1}, 3)] if main else [])

    stage_run = StageRun()
    stage_run.accelerator, stage_run.main = _Spy(main), main
    stage_run.track({"loss": 1.0}, 5)
    assert stage_run.accelerator.calls == ([({"loss": 1.0}, 5)] if main else [])


def test_flat_config_is_one_level_of_scalars():
    flat = flat_config(recipe_to_dict(load_recipe("quickstart", [])))
    assert flat["name"] == "quickstart" and flat["data.std"].startswith("[")
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_a_resumed_run_hides_the_tensorboard_steps_logged_after_its_state(tiny_recipe_file, tmp_path):
    """A crash after step 6 with the newest state at step 4: the resumed run logs 5.. again, once in TensorBoard."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simclr_cli.errors import Interrupted

    recipe = load_recipe(tiny_recipe_file, ["pretrain.epochs=2", "pretrain.log_every=1", "pretrain.knn_every=0",
                                            "trackers=tensorboard"])
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        pretrain.run(recipe, run, show_progress=False, interrupt_after=6)
    shutil.rmtree(run / "pretrain" / "state" / f"step-{6:09d}")  # as if killed before that state was written
    pretrain.run(recipe, run, show_progress=False, resume=True)
    acc = EventAccumulator(str(run / "pretrain" / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == list(range(1, 9)) == [r["step"] for r in _logged(run) if "loss" in r]


def test_a_resumed_run_continues_its_mlflow_run(tiny_recipe_file, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from simclr_cli.errors import Interrupted

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe = load_recipe(tiny_recipe_file, ["pretrain.epochs=2", "pretrain.log_every=1", "pretrain.knn_every=0",
                                            "trackers=mlflow"])
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        pretrain.run(recipe, run, show_progress=False, interrupt_after=3)
    client = MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert first.info.status == "KILLED"  # stopped
    pretrain.run(recipe, run, show_progress=False, resume=True)
    (again,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(again.info.run_id, "loss")) == list(range(1, 9))
