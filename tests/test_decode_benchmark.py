"""benchmarks/decode_speed.py runs end to end on the CPU (tiny sizes; the shape of the result is checked)."""

from tests.benchmarks import load_benchmark


def _bench():
    return load_benchmark("decode_speed")


def test_device_decode_benchmark_dry_run_on_cpu(tmp_path):
    """The GPU measurement's code path (workers, decode_jpeg, batched augmentation) with device cpu."""
    out = tmp_path / "d.json"
    result = _bench().main(["device", "--device", "cpu", "--smoke", "--tar", str(tmp_path / "none.tar.gz"),
                            "--out", str(out)])
    assert out.is_file()
    for size in ("500x375", "1600x1200"):
        row = result[size]
        assert row["cpu_decode_images_per_s"] > 0 and row["device_decode_images_per_s"] > 0
        assert row["device_fallbacks"] == 0
