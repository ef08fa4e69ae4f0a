"""The CLI as a user meets it: exit codes, one-line errors, help panels, outputs."""

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

import simclr_cli
from simclr_cli.cli import app
from tests.conftest import sigterm_once_logged

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and simclr_cli.__version__ in r.stdout


def test_help_lists_stages_in_panels():
    r = invoke("--help")
    assert r.exit_code == 0
    for name in ("pretrain", "linear-eval", "finetune", "distill", "transfer", "recipes", "Stages"):
        assert name in r.stdout


def test_recipe_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nepochz = 3\n")
    r = invoke("pretrain", str(bad))
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "did you mean 'pretrain.epochs'" in lines[0]
    assert "Traceback" not in r.output


def test_toml_syntax_error_exit_2_with_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    r = invoke("recipes", "validate", str(bad))
    assert r.exit_code == 2 and "line 1" in r.stderr


def test_bad_set_exit_2():
    r = invoke("pretrain", "quickstart", "--set", "pretrain.epochs=lots")
    assert r.exit_code == 2 and "--set pretrain.epochs=lots" in r.stderr and "integer" in r.stderr


def test_unknown_recipe_exit_2():
    r = invoke("pretrain", "imagenett")
    assert r.exit_code == 2 and "did you mean 'imagenet'" in r.stderr


def test_missing_data_exit_2_names_the_place(tmp_path):
    r = invoke("pretrain", "imagenet", "--set", f"data.root={tmp_path}/nowhere")
    assert r.exit_code == 2 and f"{tmp_path}/nowhere/train" in r.stderr
    assert "Traceback" not in r.output


def test_debug_shows_traceback(tmp_path):
    r = invoke("--debug", "pretrain", "imagenett")
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_runtime_failure_exit_1(tmp_path):
    # An imagefolder whose only image is corrupt: every sample fails -> runtime error, exit 1.
    root = tmp_path / "d" / "train" / "a"
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(b"not a jpeg")
    for workers in ("0", "1"):  # an error raised in a DataLoader worker is one line too
        r = invoke("pretrain", "quickstart", "--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path}/d",
                   "--set", "pretrain.batch_size=2", "--set", "pretrain.knn_every=0", "--out", str(tmp_path / workers),
                   "--set", f"data.num_workers={workers}")
        assert r.exit_code == 1, r.output
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "unreadable images in a row" in errors[0], r.stderr
        assert "Traceback" not in r.stderr


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tiny_recipe_file, tmp_path):
    args = ["pretrain", str(tiny_recipe_file), "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0",
            "--out", str(tmp_path / "o")]
    assert invoke(*args).exit_code == 0
    model = tmp_path / "o" / "pretrain" / "model.safetensors"
    before = model.read_bytes()
    r = invoke(*args, "--overwrite", "--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path}/nowhere")
    assert r.exit_code == 2 and model.read_bytes() == before


def test_recipes_list_show_validate(tiny_recipe_file):
    r = invoke("recipes", "list")
    assert r.exit_code == 0 and "quickstart" in r.stdout and "imagenet" in r.stdout
    r = invoke("recipes", "show", "cifar10")
    assert r.exit_code == 0 and 'backbone = "resnet18"' in r.stdout
    r = invoke("recipes", "show", "cifar10", "--resolved")
    assert r.exit_code == 0 and "knn_k = 200" in r.stdout
    r = invoke("recipes", "validate", str(tiny_recipe_file))
    assert r.exit_code == 0 and "ok:" in r.stdout
    r = invoke("recipes", "validate", str(tiny_recipe_file), "--set", "model.backbone=resnet5O")
    assert r.exit_code == 2 and "not a timm model" in r.stderr


def test_pretrain_cli_writes_runs_name_by_default(tiny_recipe_file, tmp_path):
    r = invoke("pretrain", str(tiny_recipe_file), "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "runs" / "tiny" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 4
    # output is not a terminal: plain lines, no control codes
    assert "\x1b[" not in r.stdout and "pretrain step 4/4" in r.stdout
    r = invoke("pretrain", str(tiny_recipe_file), "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0")
    assert r.exit_code == 2 and "--overwrite" in r.stderr


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "simclr_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and simclr_cli.__version__ in r.stdout


def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(tiny_recipe_file, tmp_path):
    """SIGTERM at whatever step, then --resume: same loss sequence and bit-identical weights
    as one uninterrupted run (DataLoader workers on, so their seeding is covered too)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe_args = ["pretrain", str(tiny_recipe_file), "--set", "pretrain.epochs=200", "--set", "pretrain.max_steps=60",
                   "--set", "pretrain.knn_every=0", "--set", "pretrain.log_every=1", "--set", "data.num_workers=1"]
    ref = subprocess.run([sys.executable, "-m", "simclr_cli", *recipe_args, "--out", str(tmp_path / "ref")],
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    args = [sys.executable, "-m", "simclr_cli", *recipe_args, "--out", str(out)]
    returncode, err = sigterm_once_logged(args, out / "pretrain" / "metrics.jsonl")
    assert returncode == 130, err
    assert "SIGTERM" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    from simclr_cli.checkpoints import read_trainer

    trainer = read_trainer(out / "pretrain" / "state")
    assert trainer["step"] >= 2
    assert not (out / "pretrain" / "model.safetensors").exists()
    assert trainer["step"] < 60, "the run finished before the signal; make it longer"
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "pretrain" / "summary.json").read_text())["steps"] == 60

    def losses(run):
        lines = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x["loss"]) for x in lines if "loss" in x]

    assert losses(out) == losses(tmp_path / "ref")
    a, b = load_file(out / "pretrain" / "model.safetensors"), load_file(tmp_path / "ref" / "pretrain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "finished" in r.stderr


def test_data_check_reports_and_exits_1_when_the_run_would_abort(tmp_path):
    import numpy as np
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog"):
            d = tmp_path / "d" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.zeros((10 + i, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    bad = tmp_path / "d" / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"nope")
    common = ["--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path / 'd'}"]
    r = invoke("data", "check", "quickstart", *common, "--set", "data.max_bad_fraction=0.2")
    assert r.exit_code == 0, r.output
    assert "broken.jpg" in r.stdout and "train: 13 images, 1 unreadable" in r.stdout and "would skip" in r.stdout
    assert "cat" in r.stdout and "smallest 10x12" in r.stdout
    r = invoke("data", "check", "quickstart", *common)
    assert r.exit_code == 1 and "training would stop" in r.stderr


def test_verbose_prints_the_resolved_recipe(tiny_recipe_file):
    from typer.testing import CliRunner as Runner

    from simclr_cli.cli import app

    r = Runner().invoke(app, ["--verbose", "pretrain", str(tiny_recipe_file), "-q", "--set", "pretrain.epochs=1",
                              "--set", "pretrain.knn_every=0"])
    assert r.exit_code == 0, r.output
    assert "# resolved recipe" in r.output and "trust_coefficient = 0.001" in r.output  # defaults included


def test_tensorboard_extra_missing_is_a_clear_error_before_any_work(tiny_recipe_file, monkeypatch):
    import builtins

    from typer.testing import CliRunner as Runner

    from simclr_cli.cli import app

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    r = Runner().invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "tensorboard=true"])
    assert r.exit_code == 2 and "pip install 'simclr-cli[tensorboard]'" in r.output
    import os

    assert not os.path.exists("runs/tiny")  # nothing was started


def test_debug_traceback_is_plain_without_locals(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[pretrain]\nepochs = "many"\n')
    r = subprocess.run([sys.executable, "-m", "simclr_cli", "--debug", "pretrain", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr and "RecipeError" in r.stderr
    assert "locals" not in r.stderr.lower() and "╭" not in r.stderr  # no rich frames with local variables


def test_help_has_the_runs_panel_and_completion():
    r = invoke("--help")
    for name in ("Runs", "plot", "embed", "export", "info", "runs", "--install-completion", "--verbose"):
        assert name in r.stdout, name


# ----------------------------------------------------------------------------- issue 11, items 11 to 13

QUICK = ["--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0"]


def _one_error(r) -> str:
    """The single error line of a failed command (and no traceback)."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def test_set_name_cannot_leave_runs(tiny_recipe_file, tmp_path):
    # item 11: name= wrote runs/pretrain, name=../x and absolute names escaped runs/
    for name in ("", "..", "../escaped", f"{tmp_path}/abs"):
        r = invoke("pretrain", str(tiny_recipe_file), "--set", f"name={name}", *QUICK)
        assert r.exit_code == 2 and "'name' must be a folder name" in _one_error(r), r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "abs").exists()


def test_embed_refuses_a_missing_data_folder_and_an_existing_output(tiny_recipe_file, tmp_path):
    # item 11: --data /nonexistent wrote /nonexistent.npy; item 13: embed overwrote silently, named no .npy
    from pathlib import Path

    assert invoke("pretrain", str(tiny_recipe_file), "-q", *QUICK).exit_code == 0
    nowhere = tmp_path / "nowhere"
    r = invoke("embed", "runs/tiny", "--data", str(nowhere))
    assert r.exit_code == 2 and f"--data {nowhere}: no such folder" in _one_error(r)
    r = invoke("embed", "runs/tiny", "--data", "nonsense")  # not a split of the synthetic set either
    assert r.exit_code == 2 and "not a split" in _one_error(r)
    assert not list(tmp_path.glob("nowhere*")) and not Path("runs/tiny/embed").exists()
    r = invoke("embed", "runs/tiny", "--data", "val")
    assert r.exit_code == 0 and "wrote runs/tiny/embed/val.npy (32, 96)" in r.stdout
    r = invoke("embed", "runs/tiny", "--data", "val")
    assert r.exit_code == 2 and "runs/tiny/embed/val.npy exists; pass --overwrite" in _one_error(r)
    assert invoke("embed", "runs/tiny", "--data", "val", "--overwrite").exit_code == 0
    r = invoke("embed", "runs/tiny", "--data", "val", "--out", "feats")  # numpy adds .npy: the message says so
    assert r.exit_code == 0 and "wrote feats.npy (32, 96) and feats.csv" in r.stdout and Path("feats.npy").is_file()


def test_an_output_folder_that_cannot_be_written_is_exit_2_naming_it(tiny_recipe_file, tmp_path, monkeypatch):
    # item 12: --out at a file, and a read-only folder, were raw NotADirectoryError / PermissionError, exit 1
    import errno
    import os
    import pathlib
    import tempfile

    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    for out in (blocker, blocker / "sub"):
        r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--out", str(out))
        assert r.exit_code == 2 and f"{blocker} is a file, not a folder" in _one_error(r)
    assert blocker.read_text() == "mine"
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root writes into read-only folders anyway; simulated below
        ro.chmod(0o555)
        r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--out", str(ro / "run"))
        ro.chmod(0o755)
        assert r.exit_code == 2 and f"{ro} is not writable" in _one_error(r)
    with monkeypatch.context() as m:  # what the up-front check sees for a read-only folder
        m.setattr(os, "access", lambda *a, **k: False)
        r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--out", str(ro / "run"))
        assert r.exit_code == 2 and f"{ro} is not writable" in _one_error(r)
    # A write refused later (a read-only mount, root-squashed NFS): simulated with writers raising PermissionError.
    real_mkdir = pathlib.Path.mkdir

    def refused_mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "mkdir", refused_mkdir)
        r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--out", str(ro / "run"))
        assert r.exit_code == 2 and f"{ro}/run" in _one_error(r) and "Permission denied; fix" in _one_error(r)

    def refused_mkstemp(*a, dir=None, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", refused_mkstemp)
        r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--out", str(ro / "run2"))
        err = _one_error(r)
        assert r.exit_code == 2 and f"{ro}/run2/pretrain/" in err and "cannot write there" in err


def test_disk_full_during_a_save_is_one_line_naming_the_file(tiny_recipe_file, tmp_path, monkeypatch):
    # item 12: ENOSPC was "error: OSError: [Errno 28] ..." without the file; runtime failure: exit 1
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--out", str(tmp_path / "o"))
    err = _one_error(r)
    assert r.exit_code == 1 and f"{tmp_path}/o/pretrain/" in err
    assert "no space left on device" in err and "intact" in err and "Errno" not in err


def test_recipes_validate_encoding_seed_and_backbone_origin(tiny_recipe_file, tmp_path):
    # item 12: BOM / non-UTF-8 recipes and a seed past int64; item 13: the backbone error blamed the file
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + tiny_recipe_file.read_bytes())
    assert invoke("recipes", "validate", str(bom)).exit_code == 0
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "x"\n# caf\u00e9\n'.encode("latin-1"))
    r = invoke("recipes", "validate", str(latin))
    assert r.exit_code == 2 and f"{latin}: not UTF-8" in _one_error(r)
    r = invoke("recipes", "validate", str(tiny_recipe_file), "--set", "seed=9223372036854775808")
    assert r.exit_code == 2 and "'seed' must be an integer from -2**63 to 2**63 - 1" in _one_error(r)
    r = invoke("recipes", "validate", str(tiny_recipe_file), "--set", "model.backbone=resnet5O")
    err = _one_error(r)
    assert r.exit_code == 2 and err.startswith("error: --set model.backbone=resnet5O: model.backbone: 'resnet5O'")
    assert "did you mean 'resnet" in err and str(tiny_recipe_file) not in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nbackbone = "resnet-18"\n')
    r = invoke("recipes", "validate", str(bad))
    assert r.exit_code == 2 and f"{bad}: model.backbone: 'resnet-18'" in _one_error(r)
    assert "did you mean 'resnet18'?" in r.stderr


def test_warnings_go_to_stderr(tiny_recipe_file, capsys):
    # item 13: progress warnings went to stdout while the unreadable-image warnings went to stderr
    from simclr_cli.engine.reporting import ProgressDisplay

    r = invoke("pretrain", str(tiny_recipe_file), *QUICK, "--set", "pretrain.warmup_epochs=5")
    assert r.exit_code == 0, r.output
    assert "warning: pretrain.warmup_epochs=5" in r.stderr and "warning" not in r.stdout
    display = ProgressDisplay(10, 0, True, "x")
    display.message("warning: representations may be collapsing")
    display.message("epoch 1 loss 3.2")
    display.close()
    seen = capsys.readouterr()
    assert seen.err == "warning: representations may be collapsing\n" and seen.out == "epoch 1 loss 3.2\n"


def test_finetune_with_file_names_that_are_not_utf8(tmp_path):
    # item 12: an image named b"\xff0.png" made finetune fail with UnicodeEncodeError writing labels.txt
    import os
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = os.fsencode(tmp_path / "d")
    for split in (b"train", b"val"):
        for c in (b"a", b"b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(4):
                name = (b"\xff%d.png" if c == b"a" else b"%d.png") % i
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.fsdecode(os.path.join(root, split, c, name)))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "odd"\n[data]\ndataset = "imagefolder"\nroot = "{tmp_path / "d"}"\nimage_size = 16\n'
                      'num_workers = 0\nin_memory = "never"\n[model]\nbackbone = "test_resnet"\nproj_dim = 16\n'
                      '[pretrain]\nepochs = 1\nbatch_size = 8\nknn_every = 0\n')
    assert invoke("pretrain", str(recipe), "-q").exit_code == 0
    r = invoke("finetune", "-q", "--labels", "100%", "--set", "finetune.epochs=1")
    assert r.exit_code == 0, r.output
    labels = Path("runs/odd/finetune/labels.txt").read_bytes().splitlines()
    assert sorted(labels) == sorted([b"\xff%d.png" % i for i in range(4)] + [b"%d.png" % i for i in range(4)])


def test_recipes_validate_checks_the_dataset_and_the_objective(tiny_recipe_file):
    r = invoke("recipes", "validate", str(tiny_recipe_file), "--set", "data.dataset=cifar")
    assert r.exit_code == 2 and "--set data.dataset=cifar: data.dataset: 'cifar' is not a dataset (did you mean 'cifar10'?)" in r.output
    r = invoke("recipes", "validate", str(tiny_recipe_file), "--set", "pretrain.objective=supcn")
    assert r.exit_code == 2 and "did you mean 'supcon'" in r.output


def test_old_flat_objective_keys_exit_2_naming_their_new_place(tiny_recipe_file):
    r = invoke("pretrain", str(tiny_recipe_file), "--set", "pretrain.temperature=0.2")
    assert r.exit_code == 2 and "pretrain.simclr.temperature" in r.stderr
    # switching the objective on the command line replaces the file's [pretrain.simclr]; a section given on the
    # command line for an objective that is not selected is still refused
    r = invoke("recipes", "validate", str(tiny_recipe_file), "--set", "pretrain.objective=supcon")
    assert r.exit_code == 0, r.stderr
    r = invoke("pretrain", str(tiny_recipe_file), "--set", "pretrain.objective=supcon",
               "--set", "pretrain.simclr.temperature=0.2")
    assert r.exit_code == 2 and "[pretrain.simclr] holds options of the objective 'simclr'" in r.stderr
