"""--overwrite never loses the finished run to a failure (or a stop) of the new one (issue 11, item 8).

The new run writes RUN/STAGE as usual while the old one waits in RUN/.STAGE.old-PID; the old one is deleted
only once the new one has produced durable output, and moved back otherwise.
"""

from __future__ import annotations

import errno
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_cli.errors import DataError, Interrupted, UsageError
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, distill, finetune, knn, pretrain
from tests.conftest import TINY_RECIPE

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "frog": (0, 0, 255), "bird": (255, 255, 0)}
BASE = ["data.dataset='imagefolder'", "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.knn_k=3",
        "pretrain.knn_every=1", 'finetune.labels="50%"', "finetune.epochs=1", "finetune.batch_size=8",
        "distill.epochs=1", "distill.batch_size=8"]


def _images(root: Path) -> None:
    """train/ with 3 classes, val/ with 2 of them, val2/ with a class train/ lacks."""
    rng = np.random.default_rng(0)
    for split, names, n in (("train", ["cat", "dog", "frog"], 8), ("val", ["dog", "frog"], 4),
                            ("val2", ["dog", "bird"], 4)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished pretrain, finetune and distill on an image folder, shared by the tests (none changes it)."""
    tmp = tmp_path_factory.mktemp("overwrite")
    _images(tmp / "data")
    (tmp / "tiny.toml").write_text(TINY_RECIPE)
    recipe = load_recipe(tmp / "tiny.toml", [*BASE, f"data.root='{tmp / 'data'}'"])
    run = tmp / "run"
    pretrain.run(recipe, run, show_progress=False)
    src = common.find_checkpoint(run, ("pretrain",))
    finetune.run(common.inherit_recipe(src, None, []), src, run, show_progress=False)
    src = common.find_checkpoint(run, ("finetune",))
    distill.run(common.inherit_recipe(src, None, []), src, run, show_progress=False)
    return tmp


def _snapshot(stage_dir: Path) -> dict[str, bytes]:
    """Every file of a finished stage folder (model.safetensors, summary.json, state/, ...), by content."""
    files = {str(p.relative_to(stage_dir)): p.read_bytes() for p in sorted(stage_dir.rglob("*")) if p.is_file()}
    assert "summary.json" in files
    return files


def _assert_kept(stage_dir: Path, before: dict[str, bytes]) -> None:
    assert _snapshot(stage_dir) == before, f"{stage_dir} lost its finished run"
    assert not list(stage_dir.parent.glob(f".{stage_dir.name}.old-*")), "the set-aside copy was left behind"


def _pretrain_recipe(runs: Path, *overrides: str):
    return load_recipe(runs / "tiny.toml", [*BASE, f"data.root='{runs / 'data'}'", *overrides])


def test_overwrite_pretrain_missing_val_split_keeps_the_old_run(runs):
    stage_dir = runs / "run" / "pretrain"
    before = _snapshot(stage_dir)
    with pytest.raises(DataError, match="missing"):
        pretrain.run(_pretrain_recipe(runs, "data.val_split='missing'"), runs / "run", overwrite=True,
                     show_progress=False)
    _assert_kept(stage_dir, before)


def test_overwrite_pretrain_val_class_unknown_to_train_keeps_the_old_run(runs):
    stage_dir = runs / "run" / "pretrain"
    before = _snapshot(stage_dir)
    with pytest.raises(DataError, match="not among the classes"):
        pretrain.run(_pretrain_recipe(runs, "data.val_split='val2'"), runs / "run", overwrite=True,
                     show_progress=False)
    _assert_kept(stage_dir, before)


def test_overwrite_distill_hard_threshold_that_keeps_nothing_keeps_the_old_run(runs):
    stage_dir = runs / "run" / "distill"
    before = _snapshot(stage_dir)
    src = common.find_checkpoint(runs / "run", ("finetune",))
    recipe = common.inherit_recipe(src, None, ["distill.hard=true", "distill.threshold=1.0"])
    with pytest.raises(UsageError, match="lower --threshold"):
        distill.run(recipe, src, runs / "run", overwrite=True, show_progress=False)
    _assert_kept(stage_dir, before)


@contextmanager
def _read_only(folder: Path, monkeypatch):
    """``folder`` made read-only: its entries cannot be added, removed or renamed.

    As root, chmod does not stop anything, so there the refusal the kernel gives another user is simulated
    by patching os.rename/replace/rmdir/mkdir/unlink to fail with EACCES for entries of ``folder``.
    """
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    target = folder.resolve()

    def refusing(real):
        def op(path, *args, **kwargs):
            paths = [path] + [a for a in args[:1] if isinstance(a, (str, os.PathLike))]
            if kwargs.get("dir_fd") is None and kwargs.get("src_dir_fd") is None and any(
                    Path(p).resolve().parent == target for p in paths):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)
        return op

    with monkeypatch.context() as m:
        for name in ("rename", "replace", "rmdir", "mkdir", "unlink"):
            m.setattr(os, name, refusing(getattr(os, name)))
        yield


@pytest.mark.parametrize("stage", ["pretrain", "knn", "finetune"])
def test_overwrite_under_a_read_only_parent_keeps_the_old_run(runs, tmp_path, monkeypatch, stage):
    run = tmp_path / "run"  # a copy: this test changes permissions
    import shutil

    shutil.copytree(runs / "run", run)
    if stage == "knn":
        src = common.find_checkpoint(run, ("pretrain",))
        knn.run(common.inherit_recipe(src, None, ["knn.k=3"]), src, run, show_progress=False)
    stage_dir = run / stage
    before = _snapshot(stage_dir)
    with _read_only(run, monkeypatch), pytest.raises(UsageError, match="cannot move the previous run aside"):
        if stage == "pretrain":
            pretrain.run(_pretrain_recipe(runs), run, overwrite=True, show_progress=False)
        else:
            src = common.find_checkpoint(run, ("pretrain",))
            module = knn if stage == "knn" else finetune
            module.run(common.inherit_recipe(src, None, ["knn.k=3"]), src, run, overwrite=True, show_progress=False)
    _assert_kept(stage_dir, before)


def test_double_ctrl_c_before_the_first_state_keeps_the_old_run(runs, monkeypatch):
    """A second Ctrl-C while the new run sets up (the old one moved aside) puts the old one back."""
    stage_dir = runs / "run" / "pretrain"
    before = _snapshot(stage_dir)
    build = pretrain._knn_monitor

    def ctrl_c_twice(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the first asks for a stop at the next step boundary
        signal.raise_signal(signal.SIGINT)  # the second stops at once
        return build(*args, **kwargs)

    monkeypatch.setattr(pretrain, "_knn_monitor", ctrl_c_twice)
    with pytest.raises(Interrupted, match="before any state was saved.*still holds the previous run"):
        try:
            pretrain.run(_pretrain_recipe(runs), runs / "run", overwrite=True, show_progress=False)
        except KeyboardInterrupt:  # would end the whole pytest session
            pytest.fail("the second Ctrl-C escaped the stage as a bare KeyboardInterrupt")
    _assert_kept(stage_dir, before)


def test_successful_overwrite_replaces_the_run_and_leaves_nothing_aside(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    before = _snapshot(run / "pretrain")
    pretrain.run(_pretrain_recipe(runs, "pretrain.lr=0.1"), run, overwrite=True, show_progress=False)
    assert _snapshot(run / "pretrain") != before
    assert not list(run.glob(".pretrain.old-*"))


def test_a_stopped_overwrite_gives_the_previous_run_back(tmp_path):
    """Review: SIGTERM seconds into an --overwrite saved a state, which counted as the new run's first durable
    output, so the finished run was deleted. A stop's save no longer counts: the old run comes back."""
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(TINY_RECIPE)
    recipe = load_recipe(recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"])
    run = tmp_path / "run"
    pretrain.run(recipe, run, show_progress=False)
    before = (run / "pretrain" / "model.safetensors").read_bytes()
    with pytest.raises(Interrupted, match="still holds the previous run, and the new run was discarded"):
        pretrain.run(recipe, run, overwrite=True, show_progress=False, interrupt_after=2)
    assert (run / "pretrain" / "model.safetensors").read_bytes() == before
    from simclr_cli.checkpoints import read_trainer

    assert (run / "pretrain" / "summary.json").is_file()
    assert read_trainer(run / "pretrain" / "state")["step"] == 4  # the finished run's state, not the stop's
    assert not list(run.glob(".pretrain.old-*"))
