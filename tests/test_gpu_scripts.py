"""The prepared GPU scripts (issue 14): runnable as they are, checked on CPU as far as CPU allows.

``benchmarks/gpu_check.sh`` and ``benchmarks/gpu_cifar100.sh`` run on a GPU machine; here they are
syntax-checked, their Python parts unit-tested, and run in their CPU dry mode (``SIMCLR_GPU_CHECK_DRY=1``).
"""

from __future__ import annotations

import json
import os
import sys
import stat
import subprocess
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "benchmarks" / "gpu_check.sh", ROOT / "benchmarks" / "gpu_cifar100.sh"]


def _parts():
    return load_benchmark("gpu_parts")


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIMCLR_GPU_CHECK", "GPU_C", "RUN_DIR"))}
    # PYTHON: this interpreter (CI's nox venv has no .venv/ beside the scripts, and python3 there lacks torch)
    return {**env, "SIMCLR_GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
            "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **extra}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_scripts_are_executable_and_bash_n_clean(script):
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_benchmarks_out_is_git_ignored():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "benchmarks/out/" in lines and "benchmarks/.cache/" in lines


def test_gpu_check_dry_run_writes_one_json_with_every_part(tmp_path):
    """Only the cuda tests run (the other parts are recorded as not selected): every section is there,
    and without a GPU the cuda tests are recorded as skipped, with the reason."""
    proc = subprocess.run(["bash", str(SCRIPTS[0])], env=_env(tmp_path, SIMCLR_GPU_CHECK_PARTS="cuda_tests"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["gpu_check.json"]
    result = json.loads(files[0].read_text())
    assert result["dry"] is True and set(result["parts"]) == set(_parts().PARTS)
    tests = result["parts"]["cuda_tests"]
    assert tests["status"] == "skipped" and tests["reason"].startswith("no GPU: all")
    assert tests["result"]["tests"] >= 7 and tests["result"]["skipped"] == tests["result"]["tests"]
    others = [v for k, v in result["parts"].items() if k != "cuda_tests"]
    assert all(v["status"] == "skipped" and "not selected" in v["reason"] for v in others)


def test_junit_summary_counts_each_outcome(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a" time="1.5"/>'
                   '<testcase classname="t" name="b"><failure message="boom">trace</failure></testcase>'
                   '<testcase classname="t" name="c"><skipped message="needs a CUDA GPU"/></testcase>'
                   '</testsuite></testsuites>')
    out = _parts().junit(type("A", (), {"xml": str(xml)})())
    assert (out["tests"], out["passed"], out["failed"], out["skipped"]) == (3, 1, 1, 1)
    assert out["cases"][1] == {"name": "t::b", "outcome": "failed", "seconds": 0.0, "message": "boom", "output": ""}


def test_assemble_records_a_timeout_and_an_error_with_their_logs(tmp_path):
    parts = _parts()
    (tmp_path / "meta.json").write_text('{"dry": false}')
    (tmp_path / "probe.status").write_text("0 3 60\n")
    (tmp_path / "probe.json").write_text('{"gpu": "X"}')
    (tmp_path / "epoch_cifar10.status").write_text("124 120 120\n")
    (tmp_path / "epoch_cifar10.log").write_text("step 10\n")
    (tmp_path / "settings.status").write_text("1 5 110\n")
    (tmp_path / "settings.log").write_text("Traceback: RuntimeError: x\n")
    (tmp_path / "settings.json").write_text('{"rows": {"a": {"step_ms": 1.0}}, "partial": true}')
    out = parts.assemble(type("A", (), {"work": str(tmp_path)})())
    p = out["parts"]
    assert p["probe"] == {"rc": 0, "seconds": 3.0, "limit_seconds": 60, "status": "ok", "result": {"gpu": "X"}}
    assert p["epoch_cifar10"]["status"] == "timeout" and p["epoch_cifar10"]["error_tail"] == "step 10\n"
    assert p["settings"]["status"] == "error" and "RuntimeError" in p["settings"]["error_tail"]
    assert p["settings"]["result"]["partial"] is True  # what it measured before failing is kept
    assert p["grad_cache_max_batch"] == {"status": "skipped", "reason": "not run"}


@pytest.mark.parametrize("capacity,expected", [(24, 24), (1000, 64), (3, 0), (8, 8)])
def test_largest_batch_search_doubles_then_bisects(monkeypatch, capacity, expected):
    parts = _parts()
    tried = []

    def fits(device, model, batch, size, micro, cap, acc):
        tried.append(batch)
        if batch > capacity:
            raise parts._SimulatedOOM("no")
        return {"batch": batch, "fits": True}

    monkeypatch.setattr(parts, "_fits", fits)
    model = type("M", (), {"zero_grad": lambda self, set_to_none: None})()
    import torch

    out = parts._search(torch.device("cpu"), model, 16, 0, start=4, cap=64, step=4, deadline=float("inf"),
                        capacity=0, acc=None)
    assert out["max_batch"] == expected // 4 * 4 and out["complete"]
    assert len(tried) == len(set(tried)) <= 10


def test_largest_batch_search_stops_at_its_deadline(monkeypatch):
    parts = _parts()
    monkeypatch.setattr(parts, "_fits", lambda *a: {"fits": True})
    model = type("M", (), {"zero_grad": lambda self, set_to_none: None})()
    import torch

    out = parts._search(torch.device("cpu"), model, 16, 0, start=4, cap=64, step=4, deadline=0.0, capacity=0, acc=None)
    assert out["max_batch"] == 0 and not out["complete"] and "deadline" in out["stopped"]


@pytest.mark.slow
def test_gpu_check_dry_run_every_part(tmp_path):
    """Every part's code path on CPU at tiny sizes (about 2 minutes on 2 busy cores)."""
    jpegs = tmp_path / "jpeg" / "train"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (jpegs / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(jpegs / c / f"{i}.jpg")
    proc = subprocess.run(["bash", str(SCRIPTS[0])], env=_env(tmp_path, SIMCLR_GPU_CHECK_JPEG_ROOT=str(jpegs)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]
    assert {k: v["status"] for k, v in parts.items()} == {
        "probe": "ok", "cuda_tests": "skipped", "throughput_resnet18_cifar_32px": "ok",
        "throughput_resnet50_224px_jpeg": "ok", "epoch_cifar10": "ok", "settings": "ok",
        "grad_cache_max_batch": "ok"}, {k: v.get("error_tail") for k, v in parts.items()}
    assert parts["throughput_resnet50_224px_jpeg"]["result"]["c_full_loop"]["batched"]["data"] == "jpeg"
    assert len(parts["epoch_cifar10"]["result"]["epoch_seconds"]) == 2
    gc = parts["grad_cache_max_batch"]["result"]
    assert gc["without_cache"]["max_batch"] == 24 and gc["with_cache"]["max_batch"] == 16  # simulated capacity
    assert "resnet18_bf16_channels_last" in parts["settings"]["result"]["rows"]
    assert all(v.get("measured", "").startswith("nothing: dry run") for v in parts.values() if v["status"] == "ok")


@pytest.mark.slow
def test_gpu_cifar100_dry_run_stops_on_its_time_limit_and_resumes(tmp_path):
    env = _env(tmp_path, GPU_CIFAR_LIMIT="20", RUN_DIR=str(tmp_path / "run"))
    subprocess.run(["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, timeout=300, check=True)
    cut = json.loads((tmp_path / "out" / "gpu_cifar100.json").read_text())
    assert cut["exit_code"] == 124 and cut["status"].startswith("cut off") and cut["saved_state_step"]
    env["GPU_CIFAR_LIMIT"] = "300"
    proc = subprocess.run(["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, timeout=400, check=True)
    assert "resuming from" in proc.stderr
    done = json.loads((tmp_path / "out" / "gpu_cifar100.json").read_text())
    assert done["status"] == "finished" and done["knn_top1"] is not None and done["epochs"] == 3
