"""Shared fixtures: tiny recipes that train in seconds on CPU."""

from __future__ import annotations

import inspect
import os
import re
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights
# Folder listings are cached (data/listing/index.py): tests keep theirs out of ~/.cache.
os.environ.setdefault("SIMCLR_CACHE_DIR", tempfile.mkdtemp(prefix="simclr-test-cache-"))
# The thread budget, as the `simclr` command sets it (before torch is imported): this process and every stage
# subprocess or torchrun rank a test starts use the CPUs they may use, shared, with passive OpenMP waits.
# `fixed`: the CPUs whatever the machine's load, so that runs the tests compare compute alike (float sums depend
# on the thread count).
os.environ.setdefault("SIMCLR_THREADS", "fixed")
from simclr_cli import threads as _threads  # noqa: E402

_threads.prepare_process()


TINY_RECIPE = """
name = "tiny"
seed = 0

[data]
dataset = "synthetic"
val_split = "val"
image_size = 16
num_workers = 0
synthetic_train_size = 64
synthetic_val_size = 32

[augment]
strength = 0.5
blur = false

[model]
backbone = "test_resnet"
proj_layers = 2
proj_dim = 16

[pretrain]
epochs = 2
batch_size = 16
lr = 0.5
weight_decay = 1e-4
warmup_epochs = 1
knn_every = 1
knn_k = 5
log_every = 2

[pretrain.simclr]
temperature = 0.5
"""


# What makes a test start other processes (stage subprocesses, torchrun, a pty, a benchmark script).
_SPAWNS = re.compile(r"\b(subprocess|Popen|torchrun|sys\.executable|load_benchmark|pty\.|multiprocessing)\b|num_workers=[1-9]")


def _spawning_names(module) -> set[str]:
    """Functions (and fixtures) of ``module`` whose code starts processes, directly or through another such function."""
    funcs = {}
    for name, obj in vars(module).items():
        fn = getattr(obj, "__wrapped__", obj)  # fixtures wrap their function
        if inspect.isfunction(fn) and getattr(fn, "__module__", None) == module.__name__:
            try:
                funcs[name] = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
    spawning = {n for n, src in funcs.items() if _SPAWNS.search(src)}
    grew = True
    while grew:  # helpers that call helpers
        new = {n for n, src in funcs.items() if n not in spawning and any(re.search(rf"\b{h}\b", src) for h in spawning)}
        spawning |= new
        grew = bool(new)
    return spawning


def _mark_subprocess_tests(items) -> None:
    """Mark ``subprocess`` the tests that start other processes, themselves, through a helper of their module or
    through a fixture of their module or of this file, so that ``nox -s quick`` can leave them out."""
    here = _spawning_names(sys.modules[__name__])
    cache: dict = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module not in cache:
            cache[module] = _spawning_names(module) | here
        names = cache[module]
        if item.originalname in names or any(f in names for f in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.subprocess)


def pytest_collection_modifyitems(config, items):
    """Tests that start processes are marked ``subprocess``; ``cuda``-marked tests are skipped, with the reason
    shown, where no CUDA device is visible."""
    _mark_subprocess_tests(items)
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "on a GPU machine: bash benchmarks/gpu_check.sh")
    for item in marked:
        item.add_marker(skip)


def sigterm_once_logged(cmd: list[str], metrics, *, lines: int = 2, env: dict | None = None):
    """Run ``cmd``, send it SIGTERM once ``metrics`` (a metrics.jsonl) holds ``lines`` lines, and return
    ``(returncode, stderr)``. Waits on that event (or the process ending), not on a clock: a 10x slower
    machine only takes longer."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= lines):
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.fixture
def tiny_recipe_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Runs default to ./runs; keep every test's runs in its own temp folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def without_module(monkeypatch):
    """``without_module("mlflow")``: importing that package (or a sub-module) fails from now on in this test, as
    when its optional extra is not installed."""
    import builtins

    real_import = builtins.__import__

    def block(package: str) -> None:
        def guarded(name, *args, **kwargs):
            if name == package or name.startswith(package + "."):
                raise ImportError(f"No module named '{package}'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", guarded)

    return block
