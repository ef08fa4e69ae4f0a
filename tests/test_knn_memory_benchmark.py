"""benchmarks/knn_memory.py runs end to end (tiny sizes; the numbers are not checked, the shape is)."""

from tests.benchmarks import load_benchmark


def test_knn_memory_benchmark_smoke():
    rows = load_benchmark("knn_memory").main(["--bank", "300", "--dim", "8", "--queries", "20", "--classes", "3", "--k", "10",
                       "--configs", "before,after"])
    assert [r["config"] for r in rows] == ["before", "after"]
    assert rows[0]["predictions_sha1"] == rows[1]["predictions_sha1"]  # the chunked search predicts the same
    assert all(r["peak_rss_mib"] > 0 for r in rows)
