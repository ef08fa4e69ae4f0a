"""Preemption (issue 19, A.1): SIGTERM sent to the whole process group, as SLURM (``scancel``, preemption, the time
limit), ``timeout``, ``docker stop`` and ``kill -- -PGID`` do, reaches the DataLoader workers too. The run must
still stop at the next step with its state saved, exit 130, and the printed resume command must finish it
bit-identical to an uninterrupted run.

Each test starts the real command in its own process group (``data.num_workers=2``, ``data.in_memory='never'``:
the workers decode the images), waits for its first metrics line and signals the group. A test-only gate
(tests/stages/preempt_site/sitecustomize.py) only holds the main process after that line until the signal has
arrived, so the signal lands mid-run on a machine of any speed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from simclr_cli.recipe import load_recipe
from simclr_cli.stages import common, distill, finetune, pretrain
from tests.conftest import TINY_RECIPE

ROOT = Path(__file__).parents[2]
GATE = str(Path(__file__).with_name("preempt_site"))
LOADING = ["data.num_workers=2"]  # the reference runs load in the main process (the results do not depend on it)
BASE = ["data.dataset='imagefolder'", "data.in_memory='never'", "data.val_split='val'", "pretrain.knn_every=0",
        "pretrain.batch_size=8", "pretrain.epochs=1", "pretrain.log_every=1", 'finetune.labels="50%"',
        "finetune.epochs=3", "finetune.batch_size=8", "finetune.log_every=1", "distill.epochs=1",
        "distill.batch_size=8", "distill.log_every=1"]


def _env(gate: bool = False) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if gate:
        env.update(SIMCLR_TEST_GATE="1", PYTHONPATH=os.pathsep.join([GATE, env["PYTHONPATH"]]))
    return env


def _images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The images, the recipe, and the uninterrupted pretrain, finetune and distill runs to compare with."""
    tmp = tmp_path_factory.mktemp("preempt")
    _images(tmp / "data")
    (tmp / "tiny.toml").write_text(TINY_RECIPE)
    sets = [*BASE, f"data.root='{tmp / 'data'}'"]
    ref = tmp / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage commands run (OMP_NUM_THREADS=1 in _env): float sums depend on it
    try:
        pretrain.run(load_recipe(tmp / "tiny.toml", sets), ref, show_progress=False)
        src = common.find_checkpoint(ref, ("pretrain",))
        finetune.run(common.inherit_recipe(src, None, []), src, ref, show_progress=False)
        src = common.find_checkpoint(ref, ("finetune",))
        distill.run(common.inherit_recipe(src, None, []), src, ref, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return tmp, [x for s in sets for x in ("--set", s)]


def _group_sigterm(args: list[str], metrics: Path) -> subprocess.CompletedProcess:
    """Run ``simclr ARGS`` in a process group of its own, SIGTERM the group after the first metrics line."""
    proc = subprocess.Popen([sys.executable, "-m", "simclr_cli", *args], start_new_session=True, env=_env(gate=True),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"ended (exit {proc.returncode}) before its first metrics line: {err[-3000:]}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _resume(stderr: str) -> subprocess.CompletedProcess:
    """Run the printed resume command, verbatim (``simclr`` being this interpreter's simclr_cli)."""
    assert "Resume with: " in stderr, stderr[-3000:]
    words = shlex.split(stderr.split("Resume with: ")[1].splitlines()[0])
    assert words[0] == "simclr"
    return subprocess.run([sys.executable, "-m", "simclr_cli", *words[1:]], capture_output=True, text=True,
                          timeout=600, env=_env())


def _identical(a_path: Path, b_path: Path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "distill"])
def test_sigterm_to_the_process_group_saves_and_the_resume_is_bit_identical(data, stage, tmp_path):
    tmp, sets = data
    out = tmp_path / "run"
    if stage == "pretrain":
        args = ["pretrain", str(tmp / "tiny.toml"), "--out", str(out), "-q", *sets]
    else:
        source = tmp / "ref" / ("pretrain" if stage == "finetune" else "finetune") / "model.safetensors"
        args = [stage, str(source), "--out", str(out), "-q"]
    args += [x for s in LOADING for x in ("--set", s)]
    r = _group_sigterm(args, out / stage / "metrics.jsonl")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "is killed by signal" not in r.stderr
    assert f"stopped by SIGTERM at step 2; state saved in {out / stage / 'state'}" in r.stderr, r.stderr[-3000:]
    assert not (out / stage / "model.safetensors").exists()
    r = _resume(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    _identical(tmp / "ref" / stage / "model.safetensors", out / stage / "model.safetensors")


@pytest.mark.multiprocess
def test_sigterm_to_the_group_of_simclr_launch_with_2_processes(data, tmp_path):
    """The same under ``simclr launch --processes 2`` (torchrun, gloo): each process's workers get the signal."""
    tmp, sets = data
    launch = ["launch", "--processes", "2"]
    ref = subprocess.run([sys.executable, "-m", "simclr_cli", *launch, "pretrain", str(tmp / "tiny.toml"), "--out",
                          str(tmp_path / "ref"), "-q", *sets], capture_output=True, text=True, timeout=600, env=_env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    args = [*launch, "pretrain", str(tmp / "tiny.toml"), "--out", str(out), "-q", *sets,
            *[x for s in LOADING for x in ("--set", s)]]
    r = _group_sigterm(args, out / "pretrain" / "metrics.jsonl")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "is killed by signal" not in r.stderr
    assert f"stopped by SIGTERM at step 2; state saved in {out / 'pretrain' / 'state'}" in r.stderr, r.stderr[-3000:]
    assert "Resume with: simclr launch --processes 2 pretrain " in r.stderr
    r = _resume(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    _identical(tmp_path / "ref" / "pretrain" / "model.safetensors", out / "pretrain" / "model.safetensors")


_EXIT_WITH_LIVE_WORKERS = """
import signal, torch
from simclr_cli.data.pipeline.loaders import make_loader
loader = make_loader(torch.utils.data.TensorDataset(torch.arange(64.0)), num_workers=2, pin_memory=False, batch_size=4)
it = iter(loader)
next(it)
keep = (loader, it)  # persistent workers still alive when the interpreter exits
"""


def test_a_process_exits_with_its_workers_alive_and_a_group_sigterm_still_spares_them(tmp_path):
    """Workers ignore a SIGTERM sent to the process group but not their main process's own: Python's exit terminates
    daemonic children and then joins them, so a worker that ignored that one would hang its main process for good."""
    r = subprocess.run([sys.executable, "-c", _EXIT_WITH_LIVE_WORKERS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "exited unexpectedly" not in r.stderr and "Error" not in r.stderr, r.stderr
    # a SIGTERM (or SIGINT) from someone else, as a signal to the group is, leaves the workers serving batches
    serve = _EXIT_WITH_LIVE_WORKERS.replace("keep = ", "import sys\nprint(' '.join(str(w.pid) for w in it._workers), "
                                            "flush=True)\nsys.stdin.readline()\nprint(len(list(it)), flush=True)\nkeep = ")
    probe = subprocess.Popen([sys.executable, "-c", serve], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in probe.stdout.readline().split()]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGTERM)
        os.kill(pids[1], signal.SIGINT)
        out, err = probe.communicate("go\n", timeout=120)  # the other 15 batches need both workers
        assert probe.returncode == 0 and out.strip() == "15", err
    finally:
        if probe.poll() is None:
            probe.kill()
