"""Issue 22 item 4: plots a practitioner reads without the code, checked through matplotlib's objects (axis
labels, annotations, reference lines, titles), not pixels."""

import pytest
import torch

from simclr_cli.errors import Interrupted
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, distill, finetune, linear_eval, pretrain

pytest.importorskip("matplotlib")
from simclr_cli import plots  # noqa: E402


def _axes(fig):
    return {ax.get_ylabel(): ax for ax in fig.axes}


def _panel(fig, key):
    return _axes(fig)[plots.PANELS[key][1]]


@pytest.fixture
def run(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=1", "pretrain.epochs=3"])
    pretrain.run(recipe, tmp_path / "run", show_progress=False)
    return tmp_path / "run"


def test_pretrain_curves_label_every_axis_annotate_knn_and_draw_the_healthy_spread(run):
    fig = plots.curves_figure(run, "pretrain")
    assert all(ax.get_ylabel() for ax in fig.axes) and all(ax.get_xlabel() for ax in fig.axes)
    knn_values = [r["knn_top1"] for r in plots._metrics(run / "pretrain" / "metrics.jsonl") if "knn_top1" in r]
    knn = _panel(fig, "knn_top1")
    first, last = f"{knn_values[0]:.1f}", f"{knn_values[-1]:.1f}"
    assert [t.get_text() for t in knn.texts] == [first, last]
    assert knn.get_title().endswith(f"{first} -> {last}")
    spread = _panel(fig, "z_std_ratio")
    assert "collapse -> 0" in spread.get_title()
    healthy = [ln for ln in spread.lines if list(ln.get_ydata()) == [plots.HEALTHY_Z_SPREAD] * 2]
    assert healthy and "healthy" in healthy[0].get_label()
    assert "partial" not in fig._suptitle.get_text()


def test_a_finished_stage_draws_its_curves_itself(run):
    """No `simclr plot` needed: the stage refreshed RUN/plots/pretrain_curves.png when it finished."""
    png = run / "plots" / "pretrain_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_in_progress_is_marked_partial(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.log_every=1"])
    with pytest.raises(Interrupted):
        pretrain.run(recipe, tmp_path / "cut", show_progress=False, interrupt_after=3)
    title = plots.curves_figure(tmp_path / "cut", "pretrain")._suptitle.get_text()
    assert "partial" in title and "step 3" in title
    assert not (tmp_path / "cut" / "plots").exists()  # an interrupted stage draws nothing by itself


@pytest.mark.parametrize("mode", ["cached", "paper"])
def test_linear_eval_curves_show_test_accuracy_on_an_axis_that_counts_what_it_says(run, mode):
    src = common.find_checkpoint(run, ("pretrain",))
    recipe = common.inherit_recipe(src, None, [f'linear_eval.mode="{mode}"', "linear_eval.epochs=4"])
    summary = linear_eval.run(recipe, src, run, show_progress=False)
    fig = plots.curves_figure(run, "linear_eval")
    test = _panel(fig, "test_top1")
    ys = list(test.lines[0].get_ydata())
    assert len(ys) >= 2 and ys[-1] == pytest.approx(summary["top1"], abs=1e-3)
    assert test.get_xlabel() == ("epoch" if mode == "cached" else "step (optimizer updates)")
    if mode == "cached":
        assert list(test.lines[0].get_xdata()) == [1, 2, 3, 4]


def test_finetune_and_distill_curves_show_test_accuracy(run):
    src = common.find_checkpoint(run, ("pretrain",))
    recipe = common.inherit_recipe(src, None, ['finetune.labels="50%"', "finetune.epochs=3", "finetune.batch_size=8",
                                               "distill.epochs=2", "distill.batch_size=16"])
    ft = finetune.run(recipe, src, run, show_progress=False)
    ys = list(_panel(plots.curves_figure(run, "finetune"), "test_top1").lines[0].get_ydata())
    assert len(ys) == 3 and ys[-1] == pytest.approx(ft["top1"], abs=1e-3)  # after epochs 1, 2 and the last
    teacher = common.find_checkpoint(run, ("finetune",))
    dst = distill.run(common.inherit_recipe(teacher, None, []), teacher, run, show_progress=False)
    ys = list(_panel(plots.curves_figure(run, "distill"), "test_top1").lines[0].get_ydata())
    assert len(ys) == 2 and ys[-1] == pytest.approx(dst["student_top1"], abs=1e-3)
    assert (run / "plots" / "finetune_curves.png").is_file() and (run / "plots" / "distill_curves.png").is_file()


def test_embedding_map_axes_name_the_projection_and_tsne_is_the_default_for_small_samples(run):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=g) * torch.tensor([5.0, 2.0, 1, 1, 1, 1, 1, 1])
    coords, (xl, yl) = plots.projection(feats, "pca")
    share = [float(s.split("(")[1].split("%")[0]) for s in (xl, yl)]
    assert xl.startswith("PC1 (") and yl.startswith("PC2 (") and share[0] > share[1] > 0 and sum(share) <= 100
    fig = plots.embedding_figure(coords, torch.zeros(200, dtype=torch.long), ["a"], "t", (xl, yl))
    assert fig.axes[0].get_xlabel() == xl and fig.axes[0].get_ylabel() == yl
    assert plots.projection(feats[:10], "auto")[1][0].startswith("t-SNE")
    assert plots.projection(torch.randn(plots.TSNE_AUTO_MAX + 1, 4), "auto")[1][0].startswith("PC1")
    from simclr_cli.embed import embedding_map

    png = embedding_map(common.find_checkpoint(run, ("pretrain",)), max_points=16)
    assert png.name == "embedding_tsne.png"
