"""simclr_cli.embed without the CLI: h of a split to .npy + .csv, and the 2-D embedding map."""

import numpy as np
import pytest

from simclr_cli.embed import embed, embedding_map
from simclr_cli.errors import DataError, UsageError
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, pretrain


def test_embed_is_a_plain_function(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"]), run, show_progress=False)
    said = []
    written = embed(run, "val", say=said.append)
    assert written.path == run / "embed" / "val.npy" and written.table == run / "embed" / "val.csv"
    assert np.load(written.path).shape == written.shape and written.shape[0] == 32
    assert len(written.table.read_text().splitlines()) == 33 and not said
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        embed(run, "val")
    with pytest.raises(DataError, match="not a split"):
        embed(run, "nope")
    pytest.importorskip("matplotlib")
    png = embedding_map(common.find_checkpoint(run, ("pretrain",)), "pca", max_points=16)
    assert png == run / "plots" / "embedding_pca.png" and png.stat().st_size > 0


def test_embed_without_data_embeds_the_training_split_and_says_so(tiny_recipe_file, tmp_path):
    """Issue 22 item 3: the default was the val split, silently; now the training split, named."""
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"]), run, show_progress=False)
    said = []
    written = embed(run, say=said.append)
    assert written.path == run / "embed" / "train.npy" and written.shape[0] == 64  # synthetic_train_size
    assert len(said) == 1 and "'train' split" in said[0] and "--data val" in said[0]


def test_embed_on_a_folder_run_refuses_a_split_it_does_not_have(tmp_path):
    """Review: on a data.dataset=folder run, `--data nosuch` (and the default `val`) silently embedded the
    training images under that name."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    for i in range(12):
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    r = CliRunner().invoke(app, ["pretrain", "quickstart", "--set", "data.dataset=folder", "--set",
                                 f"data.root={tmp_path}", "--set", "pretrain.batch_size=4", "--set",
                                 "pretrain.max_steps=2", "--set", "pretrain.knn_every=0", "--out", "runs/f", "-q"])
    assert r.exit_code == 0, r.output
    for data in ("nosuch", "val"):
        r = CliRunner().invoke(app, ["embed", "runs/f", "--data", data])
        assert r.exit_code == 2 and "not a split of the run's folder dataset" in r.output, r.output
    r = CliRunner().invoke(app, ["embed", "runs/f", "--data", "train"])
    assert r.exit_code == 0, r.output


def test_embed_gives_an_unreadable_image_nan_not_the_next_images_h(tiny_recipe_file, tmp_path, capsys):
    """Review (issue 13): an unreadable image got the h of the image after it under its own name. Its row is
    NaN now, marked in the CSV, and the readable rows are what embedding them alone gives."""
    import csv

    from PIL import Image

    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.max_steps=1"]), run,
                 show_progress=False)
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i + (90 if c == "b" else 0), np.uint8)).save(folder / c / f"{i}.png")
    clean = embed(run, str(folder), out=tmp_path / "clean.npy")
    (folder / "a" / "1.png").write_bytes(b"not a png")  # row 1
    written = embed(run, str(folder), out=tmp_path / "broken.npy")
    assert "1 unreadable image(s)" in capsys.readouterr().err
    h, h_clean = np.load(written.path), np.load(clean.path)
    assert np.isnan(h[1]).all() and not np.isnan(np.delete(h, 1, axis=0)).any()
    np.testing.assert_allclose(np.delete(h, 1, axis=0), np.delete(h_clean, 1, axis=0), rtol=1e-5, atol=1e-6)
    rows = list(csv.DictReader(written.table.open()))
    assert [r["unreadable"] for r in rows] == ["0", "1", "0", "0", "0", "0"]
    assert rows[1]["path"].endswith("1.png") and rows[1]["class"] == "a"


def test_embed_reads_a_list_file_and_a_pack(tiny_recipe_file, tmp_path):
    """Review (issue 13): `--data` took folders and splits only; a list file was "no such folder"."""
    from PIL import Image

    from simclr_cli.data.shards.writer import pack

    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.max_steps=1"]), run,
                 show_progress=False)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "some.txt").write_text("imgs/3.png\nimgs/1.png\n")
    listed = embed(run, str(tmp_path / "some.txt"), out=tmp_path / "listed.npy")
    whole = np.load(embed(run, str(folder), out=tmp_path / "whole.npy").path)
    np.testing.assert_allclose(np.load(listed.path), whole[[3, 1]], rtol=1e-5, atol=1e-6)
    pack(folder, tmp_path / "packed", workers=0, say=lambda *a: None)
    packed = embed(run, str(tmp_path / "packed"), out=tmp_path / "packed.npy")
    assert packed.shape == (5, whole.shape[1]) and not np.isnan(np.load(packed.path)).any()
    with pytest.raises(DataError, match="a .txt/.csv list of image paths, or a pack folder"):
        embed(run, str(tmp_path / "nope.txt"))
