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
    png = embedding_map(common.find_source(run, ("pretrain",)), "pca", max_points=16)
    assert png == run / "plots" / "embedding_pca.png" and png.stat().st_size > 0
