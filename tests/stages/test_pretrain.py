"""The pretrain stage end to end on tiny data: files, checkpoint format, resume, safety."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from simclr_cli.checkpoints import read_metadata, sub_state
from simclr_cli.errors import Interrupted, UsageError
from simclr_cli.models import apply_cifar_stem
from simclr_cli.recipe import load_recipe, recipe_from_dict
from simclr_cli.recipe.loader import parse_toml
from simclr_cli.stages import pretrain


def test_pretrain_writes_all_outputs(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["model.cifar_stem=true"])
    summary = pretrain.run(recipe, tmp_path / "run", show_progress=False)
    d = tmp_path / "run" / "pretrain"
    assert {p.name for p in d.iterdir()} >= {"model.safetensors", "recipe.toml", "metrics.jsonl", "summary.json", "state"}
    # summary
    on_disk = json.loads((d / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 8  # 64 images / 16 per batch * 2 epochs
    assert on_disk["knn_top1"] is not None and on_disk["knn_top1_init"] is not None
    assert on_disk["images_per_sec"] > 0 and on_disk["wall_seconds"] > 0
    # metrics
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6, 8]
    for x in train_lines:
        assert {"step", "epoch", "loss", "lr", "images_per_sec", "time"} <= set(x)
    assert sum("knn_top1" in x for x in lines) == 3  # init, after epoch 1, final
    # recipe.toml is the resolved recipe
    assert recipe_from_dict(parse_toml((d / "recipe.toml").read_text(), "r")) == recipe
    # checkpoint: backbone.* loads strictly into timm with the CIFAR stem; metadata
    tensors = load_file(d / "model.safetensors")
    assert tensors and all(k.startswith(("backbone.", "head.")) for k in tensors)
    timm_model = apply_cifar_stem(timm.create_model("test_resnet", num_classes=0))
    timm_model.load_state_dict(sub_state(tensors, "backbone"), strict=True)
    meta = read_metadata(d / "model.safetensors")
    assert meta["simclr.stage"] == "pretrain" and meta["simclr.backbone"] == "test_resnet"
    assert meta["simclr.cifar_stem"] == "true" and meta["simclr.feature_dim"] == str(timm_model.num_features)
    assert meta["simclr.version"] and recipe_from_dict(parse_toml(meta["simclr.recipe"], "m")) == recipe


def _weights(path):
    return load_file(path / "pretrain" / "model.safetensors")


def test_resume_matches_uninterrupted_run(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.epochs=3", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "full", show_progress=False)
    with pytest.raises(Interrupted, match="--resume"):
        pretrain.run(recipe, tmp_path / "cut", show_progress=False, interrupt_after=5)  # mid-epoch 2
    assert not (tmp_path / "cut" / "pretrain" / "model.safetensors").exists()
    with pytest.raises(UsageError, match="interrupted"):
        pretrain.run(recipe, tmp_path / "cut", show_progress=False)
    pretrain.run(recipe, tmp_path / "cut", show_progress=False, resume=True)
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_resume_refuses_a_changed_recipe(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0"])
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, interrupt_after=2)
    other = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.lr=0.1"])
    with pytest.raises(UsageError, match="pretrain.lr"):
        pretrain.run(other, tmp_path / "r", show_progress=False, resume=True)
    summary = pretrain.run(other, tmp_path / "r", show_progress=False, resume=True, force=True)
    assert summary["steps"] == 8


def test_resume_refuses_another_world_size(tiny_recipe_file, tmp_path):
    from simclr_cli.checkpoints import latest_state

    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0"])
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, interrupt_after=2)
    trainer_file = latest_state(tmp_path / "r" / "pretrain" / "state") / "trainer.json"
    trainer_file.write_text(json.dumps({**json.loads(trainer_file.read_text()), "world_size": 8}))
    with pytest.raises(UsageError, match="saved by 8 process"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, resume=True)
    assert pretrain.run(recipe, tmp_path / "r", show_progress=False, resume=True, force=True)["steps"] == 8


def test_resume_refuses_changed_training_images(tmp_path):
    """Review (issue 13): a resume after files were added, removed or renamed went on silently, with sample i
    now another image: no longer the exact resume the state promises. It is refused (exit 2) unless forced."""
    import shutil

    from simclr_cli.recipe import load_recipe as load

    _folder(tmp_path / "d")
    recipe = load("quickstart", _imagefolder_args(tmp_path / "d", "pretrain.max_steps=4"))
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, interrupt_after=2)
    pic = tmp_path / "d" / "train" / "a" / "00.png"
    shutil.copy(pic, tmp_path / "d" / "train" / "a" / "zz.png")  # one more image
    with pytest.raises(UsageError, match=r"images changed since .* \(40 images then, 41 now\).*--force"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, resume=True)
    (tmp_path / "d" / "train" / "a" / "zz.png").unlink()
    pic.rename(tmp_path / "d" / "train" / "a" / "99.png")  # same count, another order
    with pytest.raises(UsageError, match="same 40 images count, other names or order"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, resume=True)
    assert pretrain.run(recipe, tmp_path / "r", show_progress=False, resume=True, force=True)["steps"] == 4
    (tmp_path / "d" / "train" / "a" / "99.png").rename(pic)  # back as it was: resumes without --force
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "r2", show_progress=False, interrupt_after=2)
    assert pretrain.run(recipe, tmp_path / "r2", show_progress=False, resume=True)["steps"] == 4


def test_finished_run_is_never_overwritten_silently(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.epochs=1", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "r", show_progress=False)
    before = (tmp_path / "r" / "pretrain" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="--overwrite"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert (tmp_path / "r" / "pretrain" / "model.safetensors").read_bytes() == before
    pretrain.run(recipe, tmp_path / "r", show_progress=False, overwrite=True)
    with pytest.raises(UsageError, match="nothing to resume"):
        pretrain.run(recipe, tmp_path / "other", show_progress=False, resume=True)


@pytest.mark.parametrize("loss", ["nt_logistic", "margin_triplet"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_loss_and_optimizer_choices_train(tiny_recipe_file, tmp_path, loss, optimizer):
    recipe = load_recipe(tiny_recipe_file, [f"pretrain.simclr.loss={loss}", f"pretrain.optimizer={optimizer}",
                                            "pretrain.epochs=1", "pretrain.knn_every=0", "pretrain.lr=0.01"])
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert summary["steps"] == 4 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN


def test_too_few_images_for_a_batch_is_a_usage_error(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.batch_size=128"])
    with pytest.raises(UsageError, match="fewer than one global batch"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False)


def _folder_with_one_corrupt_image(root):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    bad = root / "train" / "a" / "3.png"
    bad.write_bytes(b"\x89PNG broken")
    return bad


def test_corrupt_images_skipped_then_stop_past_the_fraction(tiny_recipe_file, tmp_path, capsys):
    from simclr_cli.errors import DataError

    bad = _folder_with_one_corrupt_image(tmp_path / "imgs")
    common = ["data.dataset='imagefolder'", f"data.root='{tmp_path / 'imgs'}'", "data.val_split=''",
              "pretrain.epochs=1", "pretrain.batch_size=20", "pretrain.knn_every=0"]
    summary = pretrain.run(load_recipe(tiny_recipe_file, [*common, "data.max_bad_fraction=0.1"]), tmp_path / "ok",
                           show_progress=False)
    assert summary["bad_images"] == 1 and str(bad) in capsys.readouterr().err
    with pytest.raises(DataError, match="max_bad_fraction"):
        pretrain.run(load_recipe(tiny_recipe_file, common), tmp_path / "stop", show_progress=False)


def test_bf16_mixed_precision_on_cpu(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.mixed_precision=bf16", "pretrain.epochs=1", "pretrain.knn_every=0"])
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert summary["steps"] == 4 and summary["final_loss"] == summary["final_loss"]
    weights = load_file(tmp_path / "r" / "pretrain" / "model.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())  # master weights stay fp32


def test_fp16_on_cpu_is_a_usage_error(tiny_recipe_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on GPU")
    recipe = load_recipe(tiny_recipe_file, ["pretrain.mixed_precision=fp16"])
    with pytest.raises(UsageError, match="bf16"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False)


def test_nonfinite_loss_stops_before_the_update_naming_the_step(tiny_recipe_file, tmp_path):
    from simclr_cli.errors import SimclrError

    base = ["pretrain.optimizer=sgd", "pretrain.lr=1e38", "pretrain.lr_scaling=none", "pretrain.warmup_epochs=0",
            "pretrain.knn_every=0", "pretrain.epochs=3"]
    with pytest.raises(SimclrError, match=r"non-finite loss or gradients at step \d+ \((the loss is|first non-finite gradient: ).*\); the update was not applied"):
        pretrain.run(load_recipe(tiny_recipe_file, base), tmp_path / "a", show_progress=False)
    skip = [*base, "pretrain.on_nonfinite=skip", "pretrain.max_nonfinite_skips=2"]
    with pytest.raises(SimclrError, match="3 steps in a row"):
        pretrain.run(load_recipe(tiny_recipe_file, skip), tmp_path / "b", show_progress=False)


def test_collapse_warning_and_ratio_logged(tiny_recipe_file, tmp_path, capsys):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.collapse_warn=5.0", "pretrain.epochs=1", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "r", show_progress=True)
    assert "may be collapsing" in capsys.readouterr().err  # warnings go to stderr (issue 11 item 13)
    lines = [json.loads(x) for x in (tmp_path / "r" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < x["z_std_ratio"] <= 1.5 for x in lines if "loss" in x)


def test_checkpoint_every_keeps_newest_states(tiny_recipe_file, tmp_path):
    from simclr_cli.checkpoints import complete_states

    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.checkpoint_every=1",
                                            "pretrain.keep_states=2", "pretrain.save_every=0"])
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "r", show_progress=False, interrupt_after=3)
    assert [p.name for p in complete_states(tmp_path / "r" / "pretrain" / "state")] == ["step-000000002", "step-000000003"]


def test_knn_aligns_imagefolder_classes_by_name(tiny_recipe_file, tmp_path):
    """val/ with fewer class folders than train/ must not shift the labels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "frog": (0, 0, 255)}
    for split, names, n in (("train", ["cat", "dog", "frog"], 8), ("val", ["dog", "frog"], 4)):
        for name in names:
            (tmp_path / "d" / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colours[name]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / "d" / split / name / f"{i}.png")
    recipe = load_recipe(tiny_recipe_file, ["data.dataset='imagefolder'", f"data.root='{tmp_path / 'd'}'",
                                            "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.lr=1e-6",
                                            "augment.strength=0.0", "augment.grayscale_p=0.0", "pretrain.knn_k=3"])
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    # Colour alone separates the classes: with labels aligned by name kNN is perfect even at init.
    assert summary["knn_top1_init"] == 100.0


@pytest.mark.parametrize("switch", ["channels_last", "compile"])
def test_channels_last_and_compile_train_the_same(tiny_recipe_file, tmp_path, monkeypatch, switch):
    """Both switches change speed, not results: same losses, same checkpoint keys."""
    monkeypatch.setattr(pretrain, "COMPILE_BACKEND", "eager")  # dynamo tracing without a C++ toolchain
    base = ["pretrain.knn_every=0", "pretrain.log_every=1", "pretrain.epochs=1"]
    runs = {}
    for on in (False, True):
        recipe = load_recipe(tiny_recipe_file, [*base, f"pretrain.{switch}={'true' if on else 'false'}"])
        pretrain.run(recipe, tmp_path / str(on), show_progress=False)
        lines = (tmp_path / str(on) / "pretrain" / "metrics.jsonl").read_text().splitlines()
        runs[on] = ([json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)],
                    load_file(tmp_path / str(on) / "pretrain" / "model.safetensors"))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert runs[True][1].keys() == runs[False][1].keys()


def test_fp16_loss_scale_survives_resume(tiny_recipe_file, tmp_path, monkeypatch):
    """Issue 11 item 7: a resumed fp16 run restarted its GradScaler at 65536. The scaler's state now
    travels in the saved state. (CPU has no fp16 autocast; a CPU GradScaler drives the same code.)"""
    from simclr_cli.checkpoints import read_trainer
    from simclr_cli.engine import setup

    scalers = []

    def make_accelerator(mixed_precision, key="pretrain.mixed_precision", **kwargs):
        acc = setup.make_accelerator("no", key, **kwargs)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1)
        scalers.append(acc.scaler)
        return acc

    from simclr_cli.stages import scaffold

    monkeypatch.setattr(scaffold, "make_accelerator", make_accelerator)
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=2"])
    pretrain.run(recipe, tmp_path / "full", show_progress=False)
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "cut", show_progress=False, interrupt_after=3)
    saved = read_trainer(tmp_path / "cut" / "pretrain" / "state")
    assert saved["grad_scaler"]["scale"] == 2.0 ** 7  # grew once per step
    pretrain.run(recipe, tmp_path / "cut", show_progress=False, resume=True)
    assert scalers[-1].get_scale() == scalers[0].get_scale() == 2.0 ** 12


def _folder(root, per_class=20, corrupt=()):
    """Two classes of ``per_class`` PNGs; source index c * per_class + i is ROOT/train/<c>/<i:02d>.png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, c in enumerate(("a", "b")):
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            path = root / "train" / c / f"{i:02d}.png"
            if ci * per_class + i in corrupt:
                path.write_bytes(b"\x89PNG broken")
            else:
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def _imagefolder_args(root, *more):
    return ["data.dataset='imagefolder'", f"data.root='{root}'", "data.val_split=''", "pretrain.knn_every=0",
            "pretrain.batch_size=20", "pretrain.log_every=1", *more]


def test_consecutive_unreadable_images_each_count(tiny_recipe_file, tmp_path, capsys):
    # issue 11 item 5: a bad file reached by falling back from the bad file before it was named but not
    # counted ("13 named, 8 unreadable")
    import re

    bad = {3, 4, 5, 6, 12, 13, 22, 23, 24, 30, 31, 32, 33}
    _folder(tmp_path / "imgs", corrupt=bad)
    recipe = load_recipe(tiny_recipe_file, _imagefolder_args(
        tmp_path / "imgs", "data.in_memory='never'", "data.max_bad_fraction=1.0", "pretrain.epochs=1",
        "pretrain.max_steps=1"))
    summary = pretrain.run(recipe, tmp_path / "r", show_progress=False)
    named = set(re.findall(r"skipping unreadable image (\S+):", capsys.readouterr().err))
    assert named and summary["bad_images"] == len(named)


def test_in_memory_unreadable_images_stop_before_training(tiny_recipe_file, tmp_path):
    # issue 11 item 5: decoded into memory, every failure is known before step 1
    from simclr_cli.errors import DataError

    _folder(tmp_path / "imgs", corrupt={7, 30})
    recipe = load_recipe(tiny_recipe_file, _imagefolder_args(tmp_path / "imgs", "data.in_memory='always'",
                                                             "data.max_bad_fraction=0.02"))
    with pytest.raises(DataError, match=r"^2 unreadable images, more than data.max_bad_fraction=0.02 of 40 .*"
                                        r"before training.*07\.png"):
        pretrain.run(recipe, tmp_path / "r", show_progress=False)
    assert not (tmp_path / "r" / "pretrain" / "metrics.jsonl").exists()  # no step ran


def test_unreadable_count_survives_resume(tiny_recipe_file, tmp_path):
    # issue 11 item 5: the count is kept in the resume state
    import json

    from simclr_cli.data.pipeline.loaders import GlobalBatchSampler
    from simclr_cli.errors import Interrupted

    sampler = GlobalBatchSampler(40, 20, seed=0)
    first, second = ({i for _, i in b} for b in sampler)
    # a file met only in step 1: in its batch, and not reached by falling back from step 2's images
    victim = next(i for i in sorted(first) if (i - 1) % 40 not in second)
    _folder(tmp_path / "imgs", corrupt={victim})
    args = _imagefolder_args(tmp_path / "imgs", "data.in_memory='never'", "data.max_bad_fraction=0.1",
                             "pretrain.epochs=1")
    full = pretrain.run(load_recipe(tiny_recipe_file, args), tmp_path / "full", show_progress=False)
    assert full["bad_images"] == 1
    with pytest.raises(Interrupted):
        pretrain.run(load_recipe(tiny_recipe_file, args), tmp_path / "r", show_progress=False, interrupt_after=1)
    state = next((tmp_path / "r" / "pretrain" / "state").glob("step-*"))
    assert json.loads((state / "trainer.json").read_text())["bad_indices"] == [victim]
    resumed = pretrain.run(load_recipe(tiny_recipe_file, args), tmp_path / "r", show_progress=False, resume=True)
    assert resumed["steps"] == 2 and resumed["bad_images"] == 1


def test_a_missing_val_folder_names_the_monitor_and_how_to_pretrain_without_it(tmp_path, tiny_recipe_file):
    """Review: an image folder with train/ only failed on data.val_split without saying that pretraining works
    with the monitor off."""
    import numpy as np
    from PIL import Image

    from simclr_cli.errors import DataError

    for c in ("a", "b"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(tmp_path / "d" / "train" / c / f"{i}.png")
    sets = ["data.dataset='imagefolder'", f"data.root='{tmp_path / 'd'}'", "pretrain.epochs=1", "pretrain.batch_size=8"]
    with pytest.raises(DataError, match=r"val does not exist.*pretrain.knn_every=0 pretrains without the monitor"):
        pretrain.run(load_recipe(tiny_recipe_file, sets), tmp_path / "r", show_progress=False)
    summary = pretrain.run(load_recipe(tiny_recipe_file, [*sets, "pretrain.knn_every=0"]), tmp_path / "r2",
                           show_progress=False)
    assert summary["steps"] == 2
