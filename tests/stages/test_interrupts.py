"""Every stop is honest (issue 11, item 9; item 13's throughput after a resume at the final step).

A second Ctrl-C names the state that exists and its resume command; SIGTERM at any point of a stage exits
130 with a message (never the silent 143); SIGTERM during pretrain's final kNN pass stops with the state saved,
and the printed resume command then finishes the run. Signals are raised in the test's own process
(``signal.raise_signal`` runs the handler before it returns), at points reached by patching, never by timing.
"""

from __future__ import annotations

import json
import shlex
import signal

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import loop
from simclr_cli.errors import Interrupted
from simclr_cli.evaluation.monitor import KnnMonitor
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, pretrain

FAST = ["--set", "pretrain.knn_every=0", "-q"]


@pytest.fixture
def sigterm_safety_net():
    """Before the fix SIGTERM killed the process; here it would end the command with 143, not pytest."""
    def fatal(signum, frame):
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, fatal)
    yield
    signal.signal(signal.SIGTERM, previous)


def resume_hint(text: str) -> list[str]:
    """The command after "Resume with: ", as a shell would split it."""
    assert "Resume with: " in text, text
    rest = text.split("Resume with: ", 1)[1]
    argv = shlex.split(rest[: rest.index("--resume") + len("--resume")])
    assert argv[0] == "simclr", argv
    return argv[1:]


def test_second_ctrl_c_after_a_saved_state_names_it_and_the_resume_works(tiny_recipe_file, tmp_path, monkeypatch):
    out = tmp_path / "ctrl c"
    save_state = loop.save_state
    calls = []

    def save_then_ctrl_c_twice(*args, **kwargs):
        saved = save_state(*args, **kwargs)
        calls.append(saved)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # the first: stop at the next step boundary
            signal.raise_signal(signal.SIGINT)  # the second: at once
        return saved

    monkeypatch.setattr(loop, "save_state", save_then_ctrl_c_twice)
    runner = CliRunner()
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), *FAST, "--out", str(out)])
    assert r.exit_code == 130, r.output
    assert "before any state was saved" not in r.stderr
    assert f"the last saved state (step 4) is in {out / 'pretrain' / 'state'}" in r.stderr
    monkeypatch.setattr(loop, "save_state", save_state)
    r = runner.invoke(app, resume_hint(r.stderr))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "pretrain" / "summary.json").read_text())["steps"] == 8


def test_sigterm_before_the_loop_exits_130_and_keeps_the_old_run(tiny_recipe_file, tmp_path, monkeypatch,
                                                                  sigterm_safety_net):
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0"]), run, show_progress=False)
    before = (run / "pretrain" / "summary.json").read_bytes()
    build_source = pretrain.build_source

    def sigterm_while_loading(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return build_source(*args, **kwargs)

    monkeypatch.setattr(pretrain, "build_source", sigterm_while_loading)
    args = ["pretrain", str(tiny_recipe_file), *FAST, "--out", str(run), "--overwrite"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "stopped by SIGTERM before the first step; no state was saved, run the command again" in r.stderr
    assert f"{run / 'pretrain'} still holds the previous run" in r.stderr
    assert (run / "pretrain" / "summary.json").read_bytes() == before
    monkeypatch.setattr(pretrain, "build_source", build_source)
    r = CliRunner().invoke(app, args)  # "run the command again"
    assert r.exit_code == 0, r.output


def test_sigterm_in_a_stage_without_a_loop_exits_130(tiny_recipe_file, tmp_path, monkeypatch, sigterm_safety_net):
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"]), run,
                 show_progress=False)
    load_encoder = common.load_encoder

    def sigterm_while_loading(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return load_encoder(*args, **kwargs)

    monkeypatch.setattr(common, "load_encoder", sigterm_while_loading)
    r = CliRunner().invoke(app, ["knn", str(run), "--k", "5", "-q"])
    assert r.exit_code == 130, r.output
    assert "stopped by SIGTERM; this stage keeps no state, run it again" in r.stderr
    monkeypatch.setattr(common, "load_encoder", load_encoder)
    assert CliRunner().invoke(app, ["knn", str(run), "--k", "5", "-q"]).exit_code == 0


def test_sigterm_during_the_final_knn_stops_and_the_printed_resume_finishes(tiny_recipe_file, tmp_path, monkeypatch,
                                                                           sigterm_safety_net):
    """Also item 10: pretrain's printed command works verbatim with a space in --out."""
    out = tmp_path / "final knn"
    from simclr_cli.engine import fit as training  # pretrain trains through the shared Trainer

    run_loop, knn_call = training.run_loop, KnnMonitor.__call__
    loop_done = []

    def loop_then_mark(*args, **kwargs):
        result = run_loop(*args, **kwargs)
        loop_done.append(result.step)
        return result

    def sigterm_in_final_knn(self, model):
        if loop_done:
            signal.raise_signal(signal.SIGTERM)
        return knn_call(self, model)

    monkeypatch.setattr(training, "run_loop", loop_then_mark)
    monkeypatch.setattr(KnnMonitor, "__call__", sigterm_in_final_knn)
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "-q", "--out", str(out)])  # knn_every=1
    assert loop_done == [8]
    assert r.exit_code == 130, r.output
    assert f"stopped by SIGTERM; the last saved state (step 8) is in {out / 'pretrain' / 'state'}" in r.stderr
    assert not (out / "pretrain" / "model.safetensors").exists()
    monkeypatch.undo()
    r = CliRunner().invoke(app, resume_hint(r.stderr))
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["knn_top1"] is not None and summary["knn_top1_init"] is not None
    assert summary["images_per_sec"] > 0  # item 13: the resume trained no step itself
    assert (out / "pretrain" / "model.safetensors").is_file()


def test_resume_at_the_final_step_keeps_the_measured_throughput(tiny_recipe_file, tmp_path):
    """Item 13: the summary of a run resumed at its last step reports the rate measured before, never 0.0."""
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0"])
    with pytest.raises(Interrupted, match="at step 8"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, interrupt_after=8)
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False, resume=True)
    assert summary["steps"] == 8 and summary["images_per_sec"] > 0
    logged = [json.loads(x)["images_per_sec"] for x in (tmp_path / "r" / "pretrain" / "metrics.jsonl").read_text()
              .splitlines() if "images_per_sec" in x]
    assert min(logged) / 3 < summary["images_per_sec"] < max(logged) * 3  # the same measurement, not a guess
