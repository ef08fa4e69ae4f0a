"""Sharded evaluation (issue 14): 2 processes (torchrun, gloo, CPU) give the features of one process, bit for bit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_sharded_extraction_equals_one_process(tmp_path):
    out = tmp_path / "result"
    worker = Path(__file__).with_name("sharded_worker.py")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(out)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(2)]
    for case, (n, bs) in zip(ranks[0], ((23, 4), (37, 8), (5, 4), (3, 8))):
        for rank, result in enumerate(ranks):
            got = result[case]
            assert got["features_equal"] and got["labels_equal"], (case, rank)
            assert got["shape"] == [n, 96]  # test_resnet's h width
            assert got["still_training"]
            # everywhere=False: the main process gets the outputs, the other nothing
            assert got["main_only"] is (True if rank == 0 else None), (case, rank)
        # both processes run the same number of batches (padding included), half of one process's
        assert ranks[0][case]["my_batches"] == ranks[1][case]["my_batches"] == math.ceil(math.ceil(n / bs) / 2), case
