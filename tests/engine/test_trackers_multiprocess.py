"""2 processes (torchrun, gloo, CPU) with trackers on: only the main process writes tracker output."""

import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_RECIPE


@pytest.mark.multiprocess
def test_only_rank_0_writes_tensorboard_and_mlflow(tmp_path, monkeypatch):
    """Also: the default MLflow store (RUN/mlruns, a file store MLflow 3 refuses unless allowed) works as is."""
    from mlflow.tracking import MlflowClient

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "simclr_cli",
           "pretrain", str(recipe), "-q", "--out", str(tmp_path / "run"), "--set", "trackers=tensorboard,mlflow",
           "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    tb = tmp_path / "run" / "pretrain" / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # one writer: each process would open its own file
    assert len(list(tb.glob("*/hparams.yml"))) == 1
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it here
    client = MlflowClient((tmp_path / "run" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert [run.info.run_name for run in runs] == ["tiny/pretrain"]
