"""Issue 22 item 1: how long a stage will take (percent, ETA and finish time in the plain lines, one up-front
estimate), and throughput and times that mean one thing in every summary, a resumed run's included."""

import re

import pytest
from typer.testing import CliRunner

from simclr_cli.checkpoints import read_trainer
from simclr_cli.cli import app
from simclr_cli.engine.reporting import Eta, ProgressDisplay, format_duration
from simclr_cli.errors import Interrupted
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, finetune, pretrain


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_carry_percent_eta_and_one_upfront_estimate(capsys):
    clock = FakeClock()
    shown = ProgressDisplay(100, 0, enabled=True, description="pretrain tiny", clock=clock)
    assert shown.progress is None  # captured stdout is not a terminal: plain lines
    clock.now = 10.0  # 10 steps in 10 s (setup and warm-up included: nothing else to go on yet)
    shown.update(10, "", "pretrain step 10/100")
    clock.now = 15.0  # 10 more in 5 s: the pace from the first reported step on
    shown.update(20, "", "pretrain step 20/100")
    clock.now = 55.0
    shown.update(100, "", "pretrain step 100/100")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("pretrain tiny: about 1m30s to go for the remaining 90 of 100 steps at the pace so far; "
                        "expected to finish at " + lines[0].rsplit(" ", 1)[1])
    assert re.fullmatch(r"pretrain step 10/100 \| 10% eta 1m30s \(finish ~.+\)", lines[1]), lines[1]
    assert re.fullmatch(r"pretrain step 20/100 \| 20% eta 40s \(finish ~.+\)", lines[2]), lines[2]
    assert lines[3] == "pretrain step 100/100 | 100%" and len(lines) == 4  # the estimate is said once


def test_eta_of_a_resumed_run_counts_only_the_steps_left():
    clock = FakeClock()
    eta = Eta(total=100, done=60, clock=clock)
    clock.now = 8.0
    assert eta.remaining(60) is None  # nothing measured yet
    clock.now = 16.0
    assert eta.remaining(70) == pytest.approx(30 * 16.0 / 10)  # the first estimate: from the start
    clock.now = 20.0
    assert eta.remaining(80) == pytest.approx(20 * 4.0 / 10)  # then from the first measured step
    assert format_duration(59.6) == "1m00s" and format_duration(7260) == "2h01m"


def test_a_stage_prints_percent_and_eta_in_its_log_lines(tiny_recipe_file, tmp_path, capsys):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.log_every=2"])
    pretrain.run(recipe, tmp_path / "run", show_progress=True)
    out = capsys.readouterr().out
    steps = [ln for ln in out.splitlines() if ln.startswith("pretrain step")]
    assert steps and all(re.search(r" \| \d+%", ln) for ln in steps)
    assert " eta " in steps[0] and steps[-1].endswith("| 100%")
    assert sum("expected to finish at" in ln for ln in out.splitlines()) == 1


def _check_times(summary):
    images = summary["steps"] * summary["global_batch"]
    # train_seconds is rounded to 0.01 s in the summary: on a tiny run that alone moves images / it by several %
    seconds = summary["train_seconds"]
    lo, hi = images / (seconds + 0.005), images / max(seconds - 0.005, 1e-9)
    assert lo * 0.99 <= summary["images_per_sec"] <= hi * 1.01
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0


def test_resumed_runs_report_one_throughput_over_all_their_steps(tiny_recipe_file, tmp_path):
    """A resumed pretrain reported images_per_sec over every step but train_seconds of its last invocation only,
    and finetune summed wall and training time: images_per_sec is images trained / train_seconds everywhere."""
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=3"])
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "run", show_progress=False, interrupt_after=5)
    saved = read_trainer(tmp_path / "run" / "pretrain" / "state")
    summary = pretrain.run(recipe, tmp_path / "run", show_progress=False, resume=True)
    _check_times(summary)
    assert summary["train_seconds"] > saved["train_seconds"] > 0  # the invocations before count
    src = common.find_checkpoint(tmp_path / "run", ("pretrain",))
    ft = common.inherit_recipe(src, None, ['finetune.labels="50%"', "finetune.epochs=2", "finetune.batch_size=8"])
    with pytest.raises(Interrupted):
        finetune.run(ft, src, tmp_path / "run", show_progress=False, interrupt_after=3)
    _check_times(finetune.run(ft, src, tmp_path / "run", resume=True, show_progress=False))


def test_info_says_what_each_time_counts(tiny_recipe_file):
    args = ["pretrain", str(tiny_recipe_file), "-q", "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0"]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, ["info", "runs/tiny"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "training steps" in text and "kNN monitor and evaluation excluded" in text
    assert "images trained / train_seconds" in text and "wall-clock seconds of the stage" in text
