"""Sharded evaluation (issue 14): 2 processes (torchrun, gloo, CPU) give the features of one process, bit for bit,
and the ``knn`` stage the same numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


# a 600-image bank is 3 evaluation batches of 256 (2 on process 0, 1 and a padding batch on process 1)
RECIPE = """
name = "sharded"
seed = 5

[data]
dataset = "synthetic"
val_split = "val"
image_size = 16
num_workers = 0
synthetic_train_size = 600
synthetic_val_size = 24

[model]
backbone = "test_resnet"

[knn]
k = 20
"""


@pytest.mark.multiprocess
def test_sharded_extraction_equals_one_process(tmp_path):
    out = tmp_path / "result"
    recipe = tmp_path / "sharded.toml"
    recipe.write_text(RECIPE)
    worker = Path(__file__).with_name("sharded_worker.py")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(out),
         str(recipe), str(tmp_path / "two")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(2)]
    # the knn stage: the same numbers as one process (this one), the summary written once
    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import knn

    one = knn.run(load_recipe(recipe, []), None, tmp_path / "one", init="random", show_progress=False)
    two = json.loads((tmp_path / "two" / "knn" / "summary.json").read_text())
    assert ranks[0]["knn"] == two and ranks[1]["knn"] == {}
    assert two["train_images"] == one["train_images"] == 600
    assert (two["knn_top1"], two["knn_top5"]) == (one["knn_top1"], one["knn_top5"])
    for case, (n, bs) in zip([c for c in ranks[0] if c != "knn"], ((23, 4), (37, 8), (5, 4), (3, 8))):
        for rank, result in enumerate(ranks):
            got = result[case]
            assert got["features_equal"] and got["labels_equal"], (case, rank)
            assert got["shape"] == [n, 96]  # test_resnet's h width
            assert got["still_training"]
            # everywhere=False: the main process gets the outputs, the other nothing
            assert got["main_only"] is (True if rank == 0 else None), (case, rank)
        # both processes run the same number of batches (padding included), half of one process's
        assert ranks[0][case]["my_batches"] == ranks[1][case]["my_batches"] == math.ceil(math.ceil(n / bs) / 2), case
