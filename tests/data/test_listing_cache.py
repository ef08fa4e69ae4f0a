"""The folder listing cache (data/listing/index.py, issue 13 section 2): a cached run lists no folder; any change in
the tree invalidates it; where it lives; the off switch; a corrupt cache is rebuilt; one process scans."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from simclr_cli.data.listing import folders, index
from simclr_cli.data.listing.folders import scan_class_folders, scan_images
from simclr_cli.data.pipeline.loaders import build_source
from simclr_cli.data.sources.builders import folder_source
from simclr_cli.recipe.schema import DataConfig

OLD = time.time_ns() - 3600 * 10**9  # an hour ago: older than the racy window


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded: listing trusts the extension")


def _tree(root: Path) -> Path:
    for rel in ("a/1.png", "a/b/2.jpg", "a/b/c/3.JPEG", "d/4.png", "top.png",
                ".hidden.png", "a/.h/5.png", "a/notes.txt"):  # not listed: hidden, not an image
        _touch(root / rel)
    return root


def _backdate(root: Path) -> None:
    """Every folder's mtime an hour back, as in a collection that is not being written (not racy)."""
    for top, dirs, _ in os.walk(root, topdown=False, followlinks=True):
        os.utime(top, ns=(OLD, OLD))


def _rel(files, root: Path) -> list[str]:
    return [os.path.relpath(f, root) for f in files]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    where = tmp_path / "cache"
    monkeypatch.setenv("SIMCLR_CACHE_DIR", str(where))
    # _backdate cannot move a folder's ctime (always "now"): without a racy window, a folder is racy only
    # when its times are not before the scan began. The tests of the window set it themselves.
    monkeypatch.setattr(index, "RACY_S", 0.0)
    return where / "index"


@pytest.fixture()
def no_listing(monkeypatch):
    """Any folder listing fails the test."""
    def boom(*a, **k):
        raise AssertionError(f"the tree was listed: {a}")

    def arm():
        for name in ("scandir", "listdir", "walk"):
            monkeypatch.setattr(os, name, boom)
    return arm


def test_cached_run_lists_no_folder_and_gives_the_same_listing(tmp_path, cache, no_listing, capsys):
    root = _backdate_tree(tmp_path / "imgs")
    first = scan_images(root)
    assert _rel(first, root) == ["a/1.png", "a/b/2.jpg", "a/b/c/3.JPEG", "d/4.png", "top.png"]
    assert "listing cached in" in capsys.readouterr().out
    labeled = scan_class_folders(root, loose=True, warn=False)
    capsys.readouterr()
    no_listing()
    again = scan_images(root)
    assert again == first and list(again) == list(first) and isinstance(again, index.Strings)
    cls = scan_class_folders(root, loose=True, warn=False)
    assert cls == labeled and list(cls.labels) == [0, 0, 0, 1, -1] and cls.classes == ["a", "d"]
    assert capsys.readouterr().out == ""  # one line on the first build only


def _backdate_tree(root: Path) -> Path:
    _tree(root)
    _backdate(root)
    return root


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_folder"])
def test_a_change_in_a_nested_folder_invalidates(tmp_path, cache, change):
    root = _backdate_tree(tmp_path / "imgs")
    before = _rel(scan_images(root), root)
    deep = root / "a" / "b" / "c"
    if change == "add":
        _touch(deep / "6.png")
        want = sorted(before + ["a/b/c/6.png"])
    elif change == "remove":
        (deep / "3.JPEG").unlink()
        want = [r for r in before if r != "a/b/c/3.JPEG"]
    elif change == "rename":
        (deep / "3.JPEG").rename(deep / "9.jpeg")
        want = sorted([r for r in before if r != "a/b/c/3.JPEG"] + ["a/b/c/9.jpeg"])
    else:
        _touch(deep / "e" / "f" / "7.png")
        want = sorted(before + ["a/b/c/e/f/7.png"])
    assert _rel(scan_images(root), root) == want
    assert _rel(scan_images(root), root) == want  # and the rebuilt cache is right


def test_racy_folders_are_listed_until_they_settle(tmp_path, cache, monkeypatch, no_listing):
    """A folder scanned while racy is listed again on cached runs; once a check finds it unchanged and older
    than the window, the cache is rewritten without it, and later runs list nothing."""
    root = _backdate_tree(tmp_path / "imgs")
    monkeypatch.setattr(index, "RACY_S", 10 * 3600.0)  # every folder racy at the scan
    first = list(scan_images(root))
    listed = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listed.append(p) or real(p))
    assert list(scan_images(root)) == first and len(listed) == 5  # still racy: each of the 5 folders listed
    monkeypatch.setattr(index, "RACY_S", 0.0)  # now they are old enough
    assert list(scan_images(root)) == first and len(listed) == 10  # checked once more, then settled
    no_listing()
    assert list(scan_images(root)) == first


def test_a_chmod_or_a_restored_mtime_invalidates(tmp_path, cache, monkeypatch):
    """A folder made readable keeps its mtime, and `touch -d` / `rsync -t` can put an old mtime back: the
    folder's ctime moves in both cases."""
    root = _backdate_tree(tmp_path / "imgs")
    deep = root / "a" / "b" / "c"
    scan_images(root)
    walks = []
    real = folders._walk
    monkeypatch.setattr(folders, "_walk", lambda *a, **k: walks.append(1) or real(*a, **k))
    deep.chmod(0o700)
    scan_images(root)
    assert len(walks) == 1
    _touch(deep / "6.png")
    os.utime(deep, ns=(OLD, OLD))  # the mtime recorded by the previous scan
    assert "a/b/c/6.png" in _rel(scan_images(root), root) and len(walks) == 2
    scan_images(root)
    assert len(walks) == 2


def test_a_change_behind_a_folder_link_invalidates(tmp_path, cache):
    outside = tmp_path / "outside"
    _touch(outside / "x.png")
    root = _backdate_tree(tmp_path / "imgs")
    (root / "a" / "link").symlink_to(outside, target_is_directory=True)
    _backdate(root)
    assert "a/link/x.png" in _rel(scan_images(root), root)
    _touch(outside / "y.png")  # only the link's target changes
    assert "a/link/y.png" in _rel(scan_images(root), root)


def test_a_change_that_keeps_a_recent_mtime_is_still_seen(tmp_path, cache, monkeypatch):
    """A coarse file-system clock can give a second change the same mtime: folders modified near the scan
    are checked by their names."""
    monkeypatch.setattr(index, "RACY_S", 2.0)
    root = _tree(tmp_path / "imgs")  # just written: racy
    deep = root / "a" / "b" / "c"
    st = os.stat(deep)
    scan_images(root)
    _touch(deep / "6.png")
    real_stat = os.stat

    def same_clock_tick(path, *a, **k):  # the folder's times as before the change, as a coarse clock gives
        now = real_stat(path, *a, **k)
        if os.fspath(path) != str(deep):
            return now
        return SimpleNamespace(st_mtime_ns=st.st_mtime_ns, st_ctime_ns=st.st_ctime_ns, st_ino=now.st_ino,
                               st_dev=now.st_dev, st_size=now.st_size)

    monkeypatch.setattr(os, "stat", same_clock_tick)
    assert "a/b/c/6.png" in _rel(scan_images(root), root)


def test_where_the_cache_lives(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SIMCLR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert index.cache_folder() == tmp_path / "xdg" / "simclr-cli" / "index"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert index.cache_folder() == tmp_path / "home" / ".cache" / "simclr-cli" / "index"
    monkeypatch.setenv("SIMCLR_CACHE_DIR", str(tmp_path / "mine"))
    assert index.cache_folder() == tmp_path / "mine" / "index"
    assert index.cache_folder(str(tmp_path / "recipe")) == tmp_path / "recipe"  # data.listing_cache=PATH
    root = _backdate_tree(tmp_path / "imgs")
    scan_images(root)
    out = capsys.readouterr().out
    assert f"folder:{root}: listed 5 images" in out and f"listing cached in {tmp_path / 'mine' / 'index'}" in out
    assert "SIMCLR_CACHE_DIR=off" in out and "data.listing_cache=off" in out
    assert len(list((tmp_path / "mine" / "index").glob("images-*.listing"))) == 1


def test_the_off_switches_list_every_time(tmp_path, monkeypatch, capsys):
    root = _backdate_tree(tmp_path / "imgs")
    calls = []
    real = folders._walk
    monkeypatch.setattr(folders, "_walk", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("SIMCLR_CACHE_DIR", "off")
    scan_images(root)
    scan_images(root)
    assert len(calls) == 2 and "cached" not in capsys.readouterr().out
    monkeypatch.setenv("SIMCLR_CACHE_DIR", str(tmp_path / "env"))
    cfg = DataConfig(dataset="folder", root=str(root), in_memory="never", listing_cache="off")
    for _ in range(2):
        assert len(build_source(cfg, "train", 0)) == 5
    assert len(calls) == 4 and not (tmp_path / "env").exists()
    cfg = DataConfig(dataset="folder", root=str(root), in_memory="never", listing_cache=str(tmp_path / "here"))
    for _ in range(2):
        build_source(cfg, "train", 0)
    assert len(calls) == 5 and len(list((tmp_path / "here").glob("*.listing"))) == 1


def test_a_corrupt_or_unwritable_cache_is_no_error(tmp_path, cache, capsys):
    root = _backdate_tree(tmp_path / "imgs")
    want = list(scan_images(root))
    (entry,) = cache.glob("images-*.listing")
    good = entry.read_bytes()
    for garbage in (b"", b"PK\x03\x04 something else", good[: len(good) // 2], good[:-8], good[:40] + b"{" + good[41:]):
        entry.write_bytes(garbage)
        assert list(scan_images(root)) == want
        assert entry.read_bytes()[:40] == good[:40] and len(entry.read_bytes()) == len(good)  # rebuilt
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    assert list(scan_images(root, cache=str(blocked))) == want
    assert "warning: the listing cache in" in capsys.readouterr().err


def test_one_process_scans_while_the_others_wait(tmp_path, cache, monkeypatch):
    """The second caller blocks on the first one's lock, then reads its listing instead of scanning."""
    import fcntl

    root = _backdate_tree(tmp_path / "imgs")
    scanning, release, second_waits = threading.Event(), threading.Event(), threading.Event()
    walks = []
    real_walk, real_flock = folders._walk, fcntl.flock

    def slow_walk(*a):
        walks.append(threading.current_thread().name)
        scanning.set()
        assert release.wait(60)
        return real_walk(*a)

    def flock(fd, op):
        if threading.current_thread().name == "second":
            second_waits.set()
        return real_flock(fd, op)

    monkeypatch.setattr(folders, "_walk", slow_walk)
    monkeypatch.setattr(fcntl, "flock", flock)
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, list(scan_images(root))), name=n)
               for n in ("first", "second")]
    threads[0].start()
    assert scanning.wait(60)
    threads[1].start()
    assert second_waits.wait(60)
    release.set()
    for t in threads:
        t.join(60)
    assert walks == ["first"] and results["first"] == results["second"] and len(results["first"]) == 5


def test_embed_folder_reads_images_at_any_depth(tmp_path, cache):
    """``simclr embed --data FOLDER``: every image at any depth, links followed, hidden skipped, labeled by
    its top-level folder (-1 directly in FOLDER), as the folder dataset finds them."""
    outside = tmp_path / "outside"
    _touch(outside / "deep" / "x.png")
    root = _tree(tmp_path / "imgs")
    (root / "d" / "link").symlink_to(outside, target_is_directory=True)
    src = folder_source(root)
    assert _rel(src.files, root) == ["a/1.png", "a/b/2.jpg", "a/b/c/3.JPEG", "d/4.png", "d/link/deep/x.png",
                                     "top.png"]
    assert list(src.labels) == [0, 0, 0, 1, 1, -1] and src.classes == ["a", "d"]
    assert sorted(_rel(src.files, root)) == sorted(_rel(scan_images(root), root))  # same images as `folder`


def _benchmark(name: str):
    from tests.benchmarks import load_benchmark

    return load_benchmark(name)


def test_listing_benchmark_smoke(tmp_path):
    result = _benchmark("listing_cache").main(["--files", "60", "--depth", "2", "--fanout", "2", "--runs", "1",
                                               "--settle", "0", "--dir", str(tmp_path)])
    for kind in ("images", "class-folders"):
        assert result[kind]["first_s"] > 0 and result[kind]["cached_speedup"] > 0
    assert result["images"]["before_s"] > 0


def test_worker_memory_benchmark_smoke():
    row = _benchmark("worker_memory").run_variant("compact", 3000, 1, 64)
    assert row["checksum"] > 0 and len(row["worker_growth_mib"]["uss"]) == 1


def test_a_link_between_class_folders_keeps_each_class_whole(tmp_path, cache):
    root = tmp_path / "imgs"
    _touch(root / "b" / "sub" / "1.png")
    _touch(root / "a" / "2.png")
    (root / "a" / "shared").symlink_to(root / "b" / "sub", target_is_directory=True)
    found = scan_class_folders(root, sniff=False)
    assert _rel(found.files, root) == ["a/2.png", "a/shared/1.png", "b/sub/1.png"]
    assert list(found.labels) == [0, 0, 1] and found.classes == ["a", "b"]


def test_a_damaged_cache_file_is_not_called_a_change_of_the_folder(tmp_path, cache, capsys):
    """Issue 19 item 18: a corrupt listing-cache file was reported as "the folder changed since it was cached"."""
    root = _backdate_tree(tmp_path / "imgs")
    want = list(scan_images(root))
    (entry,) = cache.glob("images-*.listing")
    entry.write_bytes(entry.read_bytes()[:40])
    capsys.readouterr()
    assert list(scan_images(root)) == want
    out = capsys.readouterr().out
    assert "the cache file was damaged (truncated or corrupt); listing cached in" in out, out
    assert "the folder changed" not in out
    _touch(root / "d" / "new.png")  # a real change is still called one
    _backdate(root)
    os.utime(root / "d", ns=(OLD + 10**9, OLD + 10**9))
    capsys.readouterr()
    assert len(scan_images(root)) == len(want) + 1
    assert "the folder changed since it was cached" in capsys.readouterr().out
