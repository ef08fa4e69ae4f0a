"""Compact file lists (data/listing/index.py: no per-file Python object, so DataLoader workers do not copy them) and
the parallel in-memory decode (issue 13 section 2)."""

from __future__ import annotations

import gc
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.data.listing.index import Ints, Strings
from simclr_cli.data.sources import images as sources
from simclr_cli.data.sources.images import (
    FileListSource,
    MemorySource,
    SubsetSource,
    TensorSource,
    align_classes,
    decode_in_memory,
)


def test_strings_behave_like_a_list():
    items = ["/data/a.png", "/data/b/ü.jpg", "", os.fsdecode(b"/data/\xff.png"), "/data/z.png"]
    s = Strings.of(items)
    assert len(s) == 5 and s == items and items == s and list(s) == items and s[-1] == "/data/z.png"
    assert s[1] == "/data/b/ü.jpg" and s[3] == items[3] and os.fsencode(s[3]) == b"/data/\xff.png"
    assert s[1:4] == items[1:4] and s[::2] == items[::2] and s[4:1] == [] and s[:] == s
    assert "/data/z.png" in s and "/nope" not in s and s.index("/data/z.png") == 4
    assert s != items[:-1] and s != ["x"] * 5
    with pytest.raises(IndexError):
        s[5]
    back = pickle.loads(pickle.dumps(s[1:3]))
    assert back == items[1:3] and isinstance(back, Strings)
    with_prefix = Strings.of(["a.png", "b/c.png"], prefix="/root/")
    assert list(with_prefix) == ["/root/a.png", "/root/b/c.png"] and with_prefix[1:] == ["/root/b/c.png"]
    assert Strings.of([]) == [] and list(Strings.of([])) == []


def test_ints_behave_like_a_list():
    v = Ints([3, -1, 0, 2])
    assert v == [3, -1, 0, 2] and [3, -1, 0, 2] == v and len(v) == 4 and max(v) == 3 and -1 in v and 7 not in v
    assert type(v[0]) is int and all(type(y) is int for y in v) and v[1:] == [-1, 0, 2]
    assert np.asarray(v).dtype == np.int64 and np.shares_memory(np.asarray(v), np.asarray(v))
    assert pickle.loads(pickle.dumps(v)) == v and sum(1 for y in v if y < 0) == 1
    with pytest.raises(ValueError):
        np.asarray(v)[0] = 5  # read-only


def _objects_reachable(obj) -> int:
    """Python objects reachable from ``obj`` (numpy buffers count as one each)."""
    seen, todo = set(), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (type, type(os))):
            continue
        seen.add(id(o))
        if not isinstance(o, np.ndarray):
            todo.extend(gc.get_referents(o))
    return len(seen)


def test_a_large_file_list_holds_no_object_per_file():
    n = 100_000
    files = [f"/data/images/class_{i % 100:03d}/image_{i:07d}.jpg" for i in range(n)]
    src = FileListSource(files, [i % 100 for i in range(n)], [str(c) for c in range(100)], "big")
    assert isinstance(src.files, Strings) and isinstance(src.labels, Ints)
    assert src.files[12345] == files[12345] and src.labels[12345] == 45 and len(src) == n
    assert _objects_reachable(src.files) < 20 and _objects_reachable(src.labels) < 10  # not ~n
    raw = sum(len(f) for f in files) + 8 * n  # the bytes + one offset each
    assert len(pickle.dumps(src.files)) < raw * 1.05 + 1000  # what each worker receives: the buffers
    assert len(pickle.dumps(src.labels)) < 8 * n + 1000
    sub = SubsetSource(src, range(0, n, 2))
    assert isinstance(sub.indices, Ints) and isinstance(sub.labels, Ints) and sub.labels[3] == 6
    assert sub.describe(3) == files[6] and _objects_reachable(sub.labels) < 10


def test_other_code_paths_keep_working_with_compact_lists(tmp_path):
    a = FileListSource(["x/1.png", "x/2.png", "y/3.png"], [0, 1, -1], ["cat", "dog"], "a")
    b = FileListSource(["z/4.png"], [0], ["dog"], "b")
    align_classes(a, b)
    assert b.labels == [1] and isinstance(b.labels, Ints) and b.classes == ["cat", "dog"]
    t = TensorSource(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), a.labels, a.classes, "t", files=a.files)
    assert t.describe(2) == "y/3.png" and t.labels == [0, 1, -1]
    m = MemorySource(a, [None, None, None], {0: "bad"})
    assert m.describe(1) == "x/2.png" and m.labels == [0, 1, -1]


def _images(folder, n, bad=()):
    folder.mkdir()
    files = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        if i in bad:
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((6 + i % 3, 5, 3), i * 7 % 256, np.uint8)).save(p)
        files.append(str(p))
    return FileListSource(files, list(range(n)), [], "imgs")


def test_parallel_decode_gives_the_serial_result_with_errors_in_place(tmp_path, monkeypatch):
    src = _images(tmp_path / "imgs", 24, bad=(5, 17))
    serial = decode_in_memory(src, "always", 1.0, say=lambda s: None, threads=1)
    calls, threads_seen = [], set()
    barrier = threading.Barrier(2, timeout=30)  # two decoder threads at once, or the test fails
    real = sources.read_image

    def read_image(path, **kw):
        if threading.current_thread().name.startswith("simclr-decode"):
            threads_seen.add(threading.get_ident())
            calls.append(path)
            if len(calls) <= 2:
                barrier.wait()
        return real(path, **kw)

    monkeypatch.setattr(sources, "read_image", read_image)
    said = []
    parallel = decode_in_memory(src, "always", 1.0, say=said.append, threads=3)
    assert len(threads_seen) >= 2 and "3 threads" in said[0]
    assert isinstance(parallel, MemorySource) and isinstance(serial, MemorySource)
    assert sorted(parallel.errors) == [5, 17] and parallel.errors == serial.errors
    for i in range(24):
        if i in (5, 17):
            assert parallel.images[i] is None
            with pytest.raises(OSError):
                parallel.load(i)
        else:
            assert torch.equal(parallel.images[i], serial.images[i])
            assert parallel.images[i][0, 0, 0].item() == i * 7 % 256  # in its own place


def test_default_decode_threads_follow_the_cores(monkeypatch):
    """In-memory decoding uses the process's thread budget (simclr_cli/threads.py), decided at start-up."""
    from simclr_cli import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda *a, **k: None)
    saved = dict(threads._state)
    try:
        threads._reset_for_tests()
        threads.prepare_process({})
        assert sources.decode_threads() == 4
        threads._reset_for_tests()
        threads.prepare_process({"LOCAL_WORLD_SIZE": "2"})  # two torchrun processes on this machine share them
        assert sources.decode_threads() == 2
    finally:
        threads._state.clear()
        threads._state.update(saved)


def test_in_memory_decode_benchmark_smoke():
    from tests.benchmarks import load_benchmark

    result = load_benchmark("in_memory_decode").main(["--images", "6", "--threads", "1,2", "--repeats", "1"])
    assert [r["threads"] for r in result["rows"]] == [1, 2] and all(r["images_per_s"] > 0 for r in result["rows"])
