"""The benchmark harness runs end to end (tiny sizes; the numbers are not checked, the shape is)."""

import importlib.util
from pathlib import Path


def test_pretrain_throughput_harness_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_throughput.py"
    spec = importlib.util.spec_from_file_location("pretrain_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    result = bench.main(["--backbone", "test_resnet", "--batch", "8", "--steps", "2", "--warmup", "1",
                         "--jpeg-images", "4", "--skip", "d", "--out", str(out)])
    assert out.is_file()
    assert result["a_model_only"]["images_per_sec"] > 0
    assert result["b_data_only"]["memory_32px"]["batched"] > 0
    assert {"batched", "torchvision"} <= set(result["c_full_loop"])
    assert "c_over_a" in result["ratios"]
