"""Messages of issue 19 item 18, each its own small test: one-line errors for bad option values, unreadable images
named by their path, what a failed or killed --overwrite kept, data.labeled checked before the training images are
decoded, and what changed in a pack's source."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import DataError, SimclrError, UsageError
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import pretrain


@pytest.mark.parametrize("argv, start", [(["knn", "runs/x", "--k", "abc"], "error: Invalid value for '--k'"),
                                         (["launch", "--gpus", "0", "pretrain", "quickstart"],
                                          "error: Invalid value for '--gpus'"),
                                         (["--bogus", "knn"], "error: No such option: --bogus"),
                                         (["knnn"], "error: No such command 'knnn'")])
def test_a_bad_option_value_is_one_error_line_not_a_panel(argv, start):
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), r.output
    assert "╭" not in r.output and "--help`)" in lines[0]


def test_no_arguments_still_show_the_help():
    r = CliRunner().invoke(app, ["data"])
    assert "Usage" in r.output and "pack" in r.output and "error:" not in r.output


def test_an_undecodable_image_is_named_by_its_path_not_an_in_memory_file(tmp_path, capsys):
    from simclr_cli.data.pipeline.augment import SimCLRAugment
    from simclr_cli.data.pipeline.loaders import ContrastiveViews
    from simclr_cli.data.sources.images import FileListSource
    from simclr_cli.recipe.schema import AugmentConfig

    bad = tmp_path / "broken-19.jpg"
    bad.write_bytes(b"this is no image at all" * 10)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good)
    src = FileListSource([str(bad), str(good)], [-1, -1], [], "test")
    views = ContrastiveViews(src, SimCLRAugment(AugmentConfig(blur=False), 16, (0.5,) * 3, (0.25,) * 3), seed=0,
                             batched=True, decode_draft=True)  # decoded from the file's bytes in memory
    capsys.readouterr()
    item = views[(0, 0)]
    assert item["bad"] == 0
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image {bad}: cannot identify image file {bad}" in err, err
    assert "BytesIO" not in err


def test_a_failed_overwrite_says_the_previous_run_is_still_there(tiny_recipe_file, tmp_path, monkeypatch):
    from simclr_cli.engine import tasks

    runner = CliRunner()
    base = ["pretrain", str(tiny_recipe_file), "--out", str(tmp_path / "run"), "-q", "--set", "pretrain.knn_every=0",
            "--set", "pretrain.max_steps=2"]
    assert runner.invoke(app, base).exit_code == 0
    before = (tmp_path / "run" / "pretrain" / "model.safetensors").read_bytes()

    def boom(self, batch):
        raise SimclrError("the new run failed at its first step")

    monkeypatch.setattr(tasks.ContrastiveTask, "forward", boom)
    r = runner.invoke(app, [*base, "--overwrite"])
    assert r.exit_code == 1, r.output
    assert (f"error: the new run failed at its first step ({tmp_path / 'run' / 'pretrain'} still holds the previous "
            "run)") in r.output, r.output
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").read_bytes() == before


def test_resume_and_info_name_the_run_a_killed_overwrite_set_aside(tiny_recipe_file, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(run), "-q", "--set",
                               "pretrain.knn_every=0", "--set", "pretrain.max_steps=2"]).exit_code == 0
    # what an --overwrite killed (SIGKILL) before its first state leaves: the old run set aside, a new folder
    (run / "pretrain").rename(run / ".pretrain.old-4242")
    (run / "pretrain").mkdir()
    shutil.copy(run / ".pretrain.old-4242" / "recipe.toml", run / "pretrain" / "recipe.toml")
    aside = f"warning: {run / '.pretrain.old-4242'} holds a previous pretrain run set aside by an --overwrite"
    r = runner.invoke(app, ["pretrain", str(run / "pretrain" / "recipe.toml"), "--out", str(run), "--resume", "-q"])
    assert r.exit_code == 2 and aside in r.output and "nothing to resume" in r.output, r.output
    r = runner.invoke(app, ["info", str(run)])
    assert aside in r.output, r.output


def test_data_labeled_is_checked_before_the_training_images_are_decoded(tiny_recipe_file, tmp_path, capsys):
    for i in range(6):
        Image.fromarray(np.full((20, 20, 3), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
    recipe = load_recipe(tiny_recipe_file, ["data.dataset='folder'", f"data.root='{tmp_path}'",
                                            "data.in_memory='always'", f"data.labeled='{tmp_path / 'nope'}'",
                                            "pretrain.batch_size=4"])
    capsys.readouterr()
    with pytest.raises(DataError, match="data.labeled: .*nope is not a folder"):
        pretrain.run(recipe, tmp_path / "run", show_progress=True)
    out = capsys.readouterr().out
    assert "into memory" not in out, out


def test_a_pack_of_a_changed_source_says_what_changed(tmp_path):
    from simclr_cli.data.shards.writer import PackSettings, pack

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 50 * i, np.uint8)).save(src / f"{i}.png")
    settings = PackSettings(shorter_side=16, shard_size=2)
    pack(src, tmp_path / "out", settings, say=lambda s: None)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src / "new.png")
    with pytest.raises(UsageError) as e:
        pack(src, tmp_path / "out", settings, say=lambda s: None)
    message = str(e.value)
    assert "whose files changed since it was packed (3 images when packed, 4 now" in message, message
    assert message.count(str(src)) == 1 and "--overwrite" in message
