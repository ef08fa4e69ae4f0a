"""Issue 22 item 3: without RUN, every command that reads an encoder takes the newest run's pretrain encoder
(distill: the newest finetune checkpoint, its teacher) and says which file it chose."""

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import SimclrError
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, pretrain


class _Picked(SimclrError):
    """Stops a command right after it resolved its input: the table tests the choice, not the stage."""


@pytest.fixture
def two_runs(tiny_recipe_file):
    """runs/old (pretrain, then the newest finetune and distill checkpoints of all) and runs/new (a newer
    pretrain): a newest-checkpoint rule picks runs/old's finetune, the newest-run rule runs/new's pretrain."""
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.epochs=1", "pretrain.knn_every=0"]), "runs/new",
                 show_progress=False)
    ckpt = Path("runs/new/pretrain/model.safetensors")
    made = []
    for where in ("old/pretrain", "new/pretrain", "old/finetune", "old/distill"):
        target = Path("runs") / where / "model.safetensors"
        if target != ckpt:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ckpt, target)
        made.append(target)
    t0 = ckpt.stat().st_mtime - 1000
    for i, target in enumerate(made):  # in this order, oldest first
        os.utime(target, (t0 + 100 * i, t0 + 100 * i))
    return made


TABLE = [
    (["linear-eval"], "new/pretrain"),
    (["knn"], "new/pretrain"),
    (["finetune"], "new/pretrain"),
    (["transfer", "--dataset", "cifar10"], "new/pretrain"),
    (["export"], "new/pretrain"),
    (["plot"], "new/pretrain"),
    (["embed"], "new/pretrain"),
    (["distill"], "old/finetune"),
]


@pytest.mark.parametrize("args, expected", TABLE, ids=[a[0] for a, _ in TABLE])
def test_without_run_every_command_takes_the_newest_runs_encoder_and_says_which(two_runs, monkeypatch, args,
                                                                                expected):
    real = common.find_checkpoint
    picked = []

    def find_checkpoint(*a, **kw):
        picked.append(real(*a, **kw))
        raise _Picked("picked")

    monkeypatch.setattr(common, "find_checkpoint", find_checkpoint)
    r = CliRunner().invoke(app, args)
    assert picked, r.output
    chosen = Path("runs") / expected / "model.safetensors"
    assert picked[0].checkpoint == chosen, (args, picked[0].checkpoint)
    assert f"using {chosen}" in r.stdout, r.output
