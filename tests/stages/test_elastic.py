"""Elastic restarts (issue 15, section 1): under ``torchrun --max-restarts 1`` a worker dies on the first attempt,
torchrun restarts the group, the restarted run resumes from the newest complete state with no --resume typed, and
its final weights are bit-identical to an uninterrupted 2-process run. CPU, 2 processes, gloo.

The faults are test-only hooks in tests/stages/elastic_worker.py, keyed on TORCHELASTIC_RESTART_COUNT and RANK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RECIPE

WORKER = str(Path(__file__).with_name("elastic_worker.py"))
# 64 images, batch 16: 4 steps an epoch, 8 steps; a state every 2 steps.
SETS = ["--set", "pretrain.knn_every=0", "--set", "pretrain.checkpoint_every=2", "--set", "pretrain.log_every=1"]


def _torchrun(mode: str, recipe: Path, out: Path, *extra: str, restarts: int = 1) -> subprocess.CompletedProcess:
    # The documented setting for restarts (docs/distributed.md): without it torch >= 2.4 shares the launcher's
    # rendezvous store with the workers and the restarted gloo group cannot connect (pytorch/pytorch#135712).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.1",
           WORKER, mode, "pretrain", str(recipe), "--out", str(out), "-q", *SETS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _identical(a_path: Path, b_path: Path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-process run, for both tests."""
    tmp = tmp_path_factory.mktemp("elastic_ref")
    recipe = tmp / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    r = _torchrun("none", recipe, tmp / "ref", restarts=0)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return tmp / "ref" / "pretrain" / "model.safetensors"


@pytest.mark.multiprocess
def test_sigkilled_worker_restarts_and_resumes_bit_identical(reference, tiny_recipe_file, tmp_path):
    out = tmp_path / "run"
    # A stale run in the way: the first attempt replaces it (--overwrite), the restart must resume its own run
    # rather than set it aside again or refuse with "already holds".
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "summary.json").write_text("{}")
    r = _torchrun("kill-after-save", tiny_recipe_file, out, "--overwrite")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "elastic restart 1: resuming" in r.stderr and "(step 4)" in r.stderr, r.stderr[-3000:]
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["processes"] == 2
    _identical(reference, out / "pretrain" / "model.safetensors")
    steps = [json.loads(x)["step"] for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the restart kept the lines up to its state and logged the rest once
    assert not list(out.glob(".pretrain.*"))  # no folder set aside left over, lock released


@pytest.mark.multiprocess
def test_worker_killed_while_writing_a_state_keeps_the_previous_one(reference, tiny_recipe_file, tmp_path):
    out = tmp_path / "run"
    r = _torchrun("kill-while-saving", tiny_recipe_file, out)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    # The step-4 state was being written when rank 0 died: the restart resumed from step 2, took over the lock
    # the dead rank 0 left, and finished bit-identical.
    assert "elastic restart 1: resuming" in r.stderr and "(step 2)" in r.stderr, r.stderr[-3000:]
    assert "took over the lock" in r.stderr
    _identical(reference, out / "pretrain" / "model.safetensors")
    states = sorted(p.name for p in (out / "pretrain" / "state").iterdir())
    assert not [s for s in states if s.endswith(".tmp")], states
