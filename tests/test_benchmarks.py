"""The benchmark harness runs end to end (tiny sizes; the numbers are not checked, the shape is)."""

from tests.benchmarks import load_benchmark


def test_pretrain_throughput_harness_smoke(tmp_path):
    out = tmp_path / "r.json"
    result = _bench().main(["--backbone", "test_resnet", "--batch", "8", "--steps", "2", "--warmup", "1",
                         "--jpeg-images", "4", "--skip", "d", "--out", str(out)])
    assert out.is_file()
    assert result["a_model_only"]["images_per_sec"] > 0
    assert result["b_data_only"]["memory_32px"]["batched"] > 0
    assert {"batched", "torchvision"} <= set(result["c_full_loop"])
    assert "c_over_a" in result["ratios"]


def _bench():
    return load_benchmark("pretrain_throughput")


def test_pretrain_throughput_full_loop_from_jpegs_smoke(tmp_path):
    """--data jpeg (the resnet50 224 px GPU row's code path): the real loop reading a JPEG folder, tiny sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.jpg")
    result = _bench().main(["--smoke", "--data", "jpeg", "--jpeg-root", str(tmp_path / "train"), "--skip", "a,b,d",
                            "--backends", "batched", "--channels-last", "--bf16"])
    row = result["c_full_loop"]["batched"]
    assert row["data"] == "jpeg" and row["steps"] >= 1 and row["images_per_sec"] > 0


def test_pretrain_throughput_refuses_cuda_without_a_gpu():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit):
        _bench().main(["--device", "cuda", "--smoke"])


def test_contention_benchmark_smoke(tmp_path):
    """benchmarks/contention.py: a case in fresh processes, both modes, and the ratio it reports."""
    out = tmp_path / "c.json"
    result = load_benchmark("contention").main(["--smoke", "--variants", "single", "--cases", "A", "--out", str(out)])
    assert out.is_file()
    single = result["variants"]["single"]
    for mode in ("before", "after"):
        assert single[mode]["A"]["mean_wall_s"] > 0 and single[mode]["A"]["train_s"][0] > 0
    assert single["A_after_over_before"] > 0
