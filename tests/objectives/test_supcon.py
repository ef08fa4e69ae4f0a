"""SupCon against a naive loop formula, its reduction to NT-Xent, and the objective registry."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclr_cli.errors import DataError, RecipeError
from simclr_cli.losses.contrastive import nt_xent
from simclr_cli.objectives import OBJECTIVES, build_objective
from simclr_cli.objectives.supcon import supcon_loss
from simclr_cli.recipe.schema import PretrainConfig


def naive_supcon(z1, z2, labels, tau):
    """Khosla et al. eq. 2 written out: anchors i over 2N views, positives p != i of the same class."""
    z = [v.double() / v.double().norm() for v in torch.cat([z1, z2])]
    y = torch.cat([labels, labels]).tolist()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        denom = sum(torch.exp(z[i] @ z[a] / tau) for a in range(n2) if a != i)
        pos = [p for p in range(n2) if p != i and y[p] == y[i]]
        total = total - sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denom) for p in pos) / len(pos)
    return total / n2


@pytest.mark.parametrize("n, classes", [(1, 1), (4, 2), (7, 3), (8, 8)])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_matches_naive_formula(n, classes, tau):
    g = torch.Generator().manual_seed(n * 10 + classes)
    z1, z2 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    assert supcon_loss(z1, z2, labels, tau).item() == pytest.approx(naive_supcon(z1, z2, labels, tau).item(), rel=1e-5)


def test_supcon_gradient_matches_naive():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    supcon_loss(a, b, labels, 0.3).backward()
    c, d = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    naive_supcon(c, d, labels, 0.3).backward()
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.cat([c.grad, d.grad]), rtol=1e-9, atol=1e-12)


def test_supcon_with_unique_labels_is_nt_xent():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
    unique = torch.randperm(16, generator=g)
    assert supcon_loss(z1, z2, unique, 0.2).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), rel=1e-12)


def test_registry_names_and_errors():
    assert {"simclr", "supcon"} <= set(OBJECTIVES)
    assert build_objective(PretrainConfig(objective="supcon")).needs_labels
    with pytest.raises(RecipeError, match="did you mean 'supcon'"):
        build_objective(PretrainConfig(objective="supcn"))
    with pytest.raises(DataError, match="needs a label"):
        build_objective(PretrainConfig(objective="supcon")).loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, -1]))


@pytest.mark.multiprocess
def test_supcon_two_processes_equal_one(tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("dist_supcon_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loss_2proc"] == pytest.approx(result["loss_1proc"], rel=1e-9)
    assert result["grad_ok"]


def _labeled_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, count in (("train", 8), ("val", 3)):
        for c, rgb in colours.items():
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_supcon_pretrains_end_to_end_on_a_labeled_folder(tiny_recipe_file, tmp_path):
    """`simclr pretrain RECIPE --set pretrain.objective=supcon` on class folders; then linear-eval reads it."""
    from typer.testing import CliRunner

    from simclr_cli.cli import app
    from simclr_cli.checkpoints import read_metadata

    _labeled_folder(tmp_path / "data")
    # the recipe's temperature, in the section of the objective it selects (another's section is an error)
    tiny_recipe_file.write_text(tiny_recipe_file.read_text().replace("[pretrain.simclr]", "[pretrain.supcon]"))
    sets = ["--set", "pretrain.objective=supcon", "--set", "data.dataset=imagefolder", "--set",
            f"data.root={tmp_path / 'data'}", "--set", "pretrain.epochs=2", "--set", "pretrain.batch_size=8",
            "--set", "pretrain.knn_k=3"]
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), *sets, "--out", "runs/sc", "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads(Path("runs/sc/pretrain/summary.json").read_text())
    assert summary["steps"] == 6 and summary["knn_top1"] is not None
    assert 'objective = "supcon"' in read_metadata(Path("runs/sc/pretrain/model.safetensors"))["simclr.recipe"]
    r = CliRunner().invoke(app, ["linear-eval", "runs/sc", "-q"])
    assert r.exit_code == 0, r.output


def test_supcon_on_unlabeled_data_fails_before_training(tiny_recipe_file, tmp_path):
    from simclr_cli.data.pipeline.loaders import require_labels
    from simclr_cli.data.sources.images import TensorSource

    source = TensorSource(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), [0, -1, -1, 1], ["a", "b"], "mixed")
    with pytest.raises(DataError, match=r"pretrain.objective='supcon' needs a label for every training image, but "
                                        r"2 of 4 images of mixed have none"):
        require_labels(source, "pretrain.objective='supcon'")


def test_model_card_and_info_name_the_selected_objectives_own_options():
    """The card printed SimCLR's loss and temperature for every objective, `simclr info` a temperature only when
    the objective had one; now both show the selected one's section (PretrainConfig.objective_summary)."""
    from simclr_cli.recipe import load_recipe

    line = load_recipe("quickstart", ["pretrain.objective=supcon", "pretrain.supcon.temperature=0.2"]).pretrain
    assert line.objective_summary() == "supcon, temperature 0.2"
    assert "loss nt_xent, temperature 0.1" in load_recipe("quickstart").pretrain.objective_summary()
