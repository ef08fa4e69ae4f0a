"""The distill stage on tiny data: outputs, hard-label counts, cached vs per-step teacher, students."""

import json

import pytest
import torch
from safetensors.torch import load_file

from simclr_cli.checkpoints import read_metadata, sub_state
from simclr_cli.errors import UsageError
from simclr_cli.losses.distill import confident_pseudo_labels
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, distill, finetune, pretrain
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """One pretrain + finetune for the whole module; each test writes its distill run elsewhere."""
    tmp_path = tmp_path_factory.mktemp("teacher")
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(TINY_RECIPE)
    recipe = load_recipe(recipe_file, ["pretrain.knn_every=0", 'finetune.labels="50%"', "finetune.epochs=2",
                                            "finetune.batch_size=8", "distill.epochs=2", "distill.batch_size=16"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    src = common.find_checkpoint(tmp_path / "run", ("pretrain",))
    finetune.run(recipe, src, tmp_path / "run", show_progress=False)
    return tmp_path / "run"


def _inputs(run, *overrides):
    src = common.find_checkpoint(run, ("finetune",))
    return src, common.inherit_recipe(src, None, list(overrides))


def test_distill_outputs_and_checkpoint(teacher, tmp_path):
    src, recipe = _inputs(teacher)
    summary = distill.run(recipe, src, tmp_path, show_progress=False)
    d = tmp_path / "distill"
    assert {p.name for p in d.iterdir()} >= {"model.safetensors", "summary.json", "recipe.toml", "metrics.jsonl",
                                             "teacher_logits.safetensors"}
    for k in ("teacher_top1", "student_top1", "teacher_top5", "student_top5", "teacher_params", "student_params"):
        assert k in summary
    assert summary["student_params"] == summary["teacher_params"]  # self-distillation, no head layers kept
    assert summary["unlabeled_images"] == 64 and summary["steps"] == 2 * 64 // 16
    assert summary["student_init"].startswith("pretrained")
    meta = read_metadata(d / "model.safetensors")
    assert meta["simclr.stage"] == "distill" and meta["simclr.num_classes"] == "10"
    assert sub_state(load_file(d / "model.safetensors"), "head")["0.weight"].shape == (10, 96)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher_agreement" in x for x in lines if "loss" in x)


def test_hard_variant_reports_how_many_were_kept(teacher, tmp_path):
    src, recipe = _inputs(teacher, "distill.hard=true", "distill.threshold=0.0")
    assert distill.run(recipe, src, tmp_path, show_progress=False)["kept_images"] == 64
    logits = load_file(tmp_path / "distill" / "teacher_logits.safetensors")["logits"]
    median = torch.softmax(logits, 1).max(1).values.median().item()
    src, recipe = _inputs(teacher, "distill.hard=true", f"distill.threshold={median!r}")
    summary = distill.run(recipe, src, tmp_path, overwrite=True, show_progress=False)
    expected = len(confident_pseudo_labels(logits, median)[0])
    assert summary["kept_images"] == expected and 0 < expected < 64
    assert summary["steps"] == 2 * -(-expected // min(16, expected))  # every kept image each epoch
    src, recipe = _inputs(teacher, "distill.hard=true", "distill.threshold=1.0")
    with pytest.raises(UsageError, match="lower --threshold"):
        distill.run(recipe, src, tmp_path, overwrite=True, show_progress=False)


def test_cached_teacher_equals_teacher_every_step(teacher, tmp_path):
    src, recipe = _inputs(teacher)
    distill.run(recipe, src, tmp_path / "cached", show_progress=False)
    src, recipe = _inputs(teacher, "distill.cache_teacher=false")
    distill.run(recipe, src, tmp_path / "online", show_progress=False)

    def losses(run):
        lines = (tmp_path / run / "distill" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]

    assert losses("online") == pytest.approx(losses("cached"), rel=1e-4)


def test_other_students_and_mixing(teacher, tmp_path):
    src, recipe = _inputs(teacher, 'distill.student="test_efficientnet"', "distill.noisy=true", "distill.alpha=0.5")
    summary = distill.run(recipe, src, tmp_path / "small", show_progress=False)
    assert summary["student_backbone"] == "test_efficientnet" and summary["student_init"] == "random"
    assert summary["student_params"] != summary["teacher_params"]
    meta = read_metadata(tmp_path / "small" / "distill" / "model.safetensors")
    assert meta["simclr.backbone"] == "test_efficientnet"
    src, recipe = _inputs(teacher, 'distill.student="test_efficientnet"', 'distill.student_init="pretrained"')
    with pytest.raises(UsageError, match="--student-init random"):
        distill.run(recipe, src, tmp_path / "bad", show_progress=False)


def test_distill_needs_a_classifier(teacher, tmp_path):
    src = common.find_checkpoint(teacher, ("pretrain",))
    recipe = common.inherit_recipe(src, None, [])
    with pytest.raises(UsageError, match="has no classifier"):
        distill.run(recipe, src, tmp_path, show_progress=False)
    assert torch.is_tensor(load_file(teacher / "finetune" / "model.safetensors")["head.0.weight"])


def test_teacher_logits_cache_made_by_another_teacher_is_recomputed(teacher, tmp_path, capsys):
    """Issue 11 item 3: a teacher_logits.safetensors left by a distill from another teacher (one that died
    before its first state save) was reused. The cache records the teacher's hash, the data and the
    transform; a mismatch recomputes it, with a line saying so."""
    import shutil

    from safetensors.torch import save_file

    src_a, recipe = _inputs(teacher)
    distill.run(recipe, src_a, tmp_path / "a", show_progress=False)
    cache_a = tmp_path / "a" / "distill" / distill.LOGITS_FILE
    # teacher B: the same checkpoint with other classifier weights
    b_ckpt = tmp_path / "b" / "finetune" / "model.safetensors"
    b_ckpt.parent.mkdir(parents=True)
    tensors = load_file(src_a.checkpoint)
    bias = next(k for k in tensors if k.startswith("head.") and k.endswith("bias"))
    tensors[bias] = tensors[bias] + torch.arange(len(tensors[bias]), dtype=tensors[bias].dtype) * 5
    save_file(tensors, str(b_ckpt), metadata=read_metadata(src_a.checkpoint))
    src_b, recipe_b = _inputs(tmp_path / "b")
    (tmp_path / "b" / "distill").mkdir()
    shutil.copy(cache_a, tmp_path / "b" / "distill" / distill.LOGITS_FILE)  # left by a run that died early
    capsys.readouterr()
    distill.run(recipe_b, src_b, tmp_path / "b", show_progress=True)
    assert "was made by another teacher" in capsys.readouterr().out
    logits_a = load_file(cache_a)["logits"]
    logits_b = load_file(tmp_path / "b" / "distill" / distill.LOGITS_FILE)["logits"]
    assert not torch.allclose(logits_a, logits_b)
    meta = read_metadata(tmp_path / "b" / "distill" / distill.LOGITS_FILE)
    import hashlib

    assert meta["simclr.teacher_sha256"] == hashlib.sha256(b_ckpt.read_bytes()).hexdigest()
    # the same teacher, data and transform: the cache is reused without a word
    (tmp_path / "c" / "distill").mkdir(parents=True)
    shutil.copy(tmp_path / "b" / "distill" / distill.LOGITS_FILE, tmp_path / "c" / "distill" / distill.LOGITS_FILE)
    distill.run(recipe_b, src_b, tmp_path / "c", show_progress=True)
    out = capsys.readouterr().out
    assert "recomputing" not in out and "teacher logits for" not in out


def test_resume_with_a_changed_teacher_is_refused_without_force(teacher, tmp_path, monkeypatch, capsys):
    """Issue 19 item 19: `distill --resume` after the teacher checkpoint changed recomputed the logits with a note
    and went on, training one student on two teachers' targets. Now exit 2 unless --force, like any changed input."""
    import shutil

    from safetensors.torch import save_file

    from simclr_cli.errors import Interrupted

    shutil.copytree(teacher / "finetune", tmp_path / "t" / "finetune")  # the module's teacher stays as it is
    src, recipe = _inputs(tmp_path / "t")
    with pytest.raises(Interrupted):
        distill.run(recipe, src, tmp_path / "s", show_progress=False, interrupt_after=1)
    tensors = load_file(src.checkpoint)  # the teacher is fine-tuned again in place: other weights, same path
    bias = next(k for k in tensors if k.startswith("head.") and k.endswith("bias"))
    tensors[bias] = tensors[bias] + 1
    save_file(tensors, str(src.checkpoint), metadata=read_metadata(src.checkpoint))
    logits = (tmp_path / "s" / "distill" / distill.LOGITS_FILE).read_bytes()
    with pytest.raises(UsageError, match="--resume: the teacher changed since .* pass --force") as e:
        distill.run(recipe, src, tmp_path / "s", resume=True, show_progress=False)
    assert e.value.exit_code == 2
    assert (tmp_path / "s" / "distill" / distill.LOGITS_FILE).read_bytes() == logits  # nothing was recomputed
    capsys.readouterr()
    summary = distill.run(recipe, src, tmp_path / "s", resume=True, force=True, show_progress=True)
    assert "--force: going on with the new teacher" in capsys.readouterr().out
    assert summary["epochs"] == 2
    record = json.loads((tmp_path / "s" / "distill" / "teacher.json").read_text())  # now the new teacher's
    import hashlib

    assert record == {"checkpoint": str(src.checkpoint.resolve()),
                      "sha256": hashlib.sha256(src.checkpoint.read_bytes()).hexdigest()}
