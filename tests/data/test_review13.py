"""Regressions found reviewing issue 13 (unlabeled folders, lists, shards)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from simclr_cli.data.listing.lists import read_file_list
from simclr_cli.errors import DataError


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name", ["l.csv", "l.txt"])
def test_list_with_a_utf8_byte_order_mark(tmp_path, name):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    body = "path,label\r\na.png,x\r\nb.png,y\r\n" if name.endswith(".csv") else "a.png\r\nb.png\r\n"
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())  # as Excel / Notepad save it
    src = read_file_list(tmp_path / name)
    assert src.files == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    if name.endswith(".csv"):
        assert src.classes == ["x", "y"] and src.labels == [0, 1]


def test_a_list_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        read_file_list(tmp_path / "nope.txt")
    assert e.value.exit_code == 2


def test_data_index_on_an_interrupted_pack_refuses_and_names_the_pack_command(tmp_path, tiny_recipe_file):
    """`simclr data index` on an interrupted pack used to index the shards it found; the pack then said
    "already packed" for good and training used part of the images. Now both point to the pack command."""
    from typer.testing import CliRunner

    from simclr_cli.cli import app
    from simclr_cli.data.shards.writer import PackSettings, pack
    from tests.data.test_shards import _labeled

    src, out = _labeled(tmp_path / "src"), tmp_path / "out"
    settings = PackSettings(shorter_side=16, quality=90, shard_size=3)
    pack(src, out, settings, say=lambda s: None)
    full = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "shard-000002.tar").unlink()  # the state an interrupted pack leaves: no last shard, no index
    (out / "index.json").unlink()
    finish = f"simclr data pack {src} {out} --shorter-side 16 --quality 90 --shard-size 3"
    runner = CliRunner()
    r = runner.invoke(app, ["data", "index", str(out)])
    assert r.exit_code == 2 and "the pack is incomplete (2 of 3 shards" in r.output and finish in r.output, r.output
    assert f"`simclr data index {out} --partial`" in r.output and not (out / "index.json").exists()
    r = runner.invoke(app, ["data", "index", str(out), "--partial"])  # the source is gone: use what is there
    assert r.exit_code == 0 and "indexed 6 images in 2 shards" in r.output, r.output
    (out / "index.json").unlink()
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "data.dataset=shards", "--set",
                            f"data.root={out}", "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2 and finish in r.output, r.output
    # a partial index.json left by the old `data index` does not pass for a finished pack
    index = json.loads(full["index.json"])
    index["shards"] = index["shards"][:2]
    keep = [i for i, k in enumerate(index["samples"]["shard"]) if k < 2]
    index["samples"] = {c: [v[i] for i in keep] for c, v in index["samples"].items()}
    (out / "index.json").write_text(json.dumps(index))
    r = runner.invoke(app, ["data", "pack", str(src), str(out), "--shorter-side", "16", "--quality", "90",
                            "--shard-size", "3", "--quiet", "--workers", "0"])
    assert r.exit_code == 0 and "already packed" not in r.output, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == full


def test_labeled_flat_folder_and_imagefolder_on_a_flat_folder_say_what_is_wrong(tmp_path):
    from simclr_cli.data.sources.images import ImageFolderSource
    from simclr_cli.stages.common import labeled_elsewhere

    _png(tmp_path / "flat" / "a.png")
    _png(tmp_path / "flat" / "b.png")
    with pytest.raises(DataError) as e:  # it said "imagefolder:...: no images" of a folder of images
        labeled_elsewhere(str(tmp_path / "flat"), 0)
    assert e.value.exit_code == 2
    assert str(e.value).startswith("data.labeled: ") and "no images in class folders" in str(e.value)
    with pytest.raises(DataError) as e:
        ImageFolderSource(tmp_path / "flat", "train")
    assert f"--set data.dataset=folder --set data.root={tmp_path / 'flat'}" in str(e.value)


def test_an_unreadable_first_file_does_not_turn_in_memory_decoding_off(tmp_path):
    from simclr_cli.data.sources.images import FileListSource, MemorySource, decode_in_memory

    (tmp_path / "0_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    files = [str(tmp_path / "0_broken.jpg")] + [str(_png(tmp_path / f"{i}.png")) for i in range(1, 4)]
    src = decode_in_memory(FileListSource(files, [-1] * 4, [], "folder:x"), "auto", 1.0, say=lambda s: None)
    assert isinstance(src, MemorySource) and list(src.errors) == [0]  # known before training, counted


def test_pack_of_a_list_with_missing_files_names_its_own_option(tmp_path):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    _png(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text("a.png\ngone.png\n")
    runner = CliRunner()
    r = runner.invoke(app, ["data", "pack", str(tmp_path / "l.txt"), str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 2 and "pass --allow-missing" in r.output and "data.allow_missing" not in r.output
    r = runner.invoke(app, ["data", "pack", str(tmp_path / "l.txt"), str(tmp_path / "out"), "--quiet",
                            "--allow-missing", "--workers", "0"])
    assert r.exit_code == 0 and "left out (--allow-missing)" in r.output, r.output


def test_pack_of_a_file_name_that_is_not_utf8(tmp_path):
    """A Latin-1 file name (a lone surrogate in Python) made the index write fail (exit 1, UnicodeEncodeError)."""
    import os

    from simclr_cli.data.shards.reader import ShardSource
    from simclr_cli.data.shards.writer import PackSettings, pack, write_index

    src = tmp_path / "src"
    src.mkdir()
    odd = os.fsdecode(os.fsencode(str(src)) + b"/caf\xe9.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(odd, format="PNG")
    _png(src / "b.png")
    out = tmp_path / "out"
    pack(src, out, PackSettings(shorter_side=16, quality=90, shard_size=3), say=lambda s: None)
    index = (out / "index.json").read_bytes()
    index.decode("utf-8")  # still UTF-8
    ds = ShardSource(out)
    assert len(ds) == 2 and "caf\udce9.png" in ds.describe(1) and ds.load(1).shape[0] == 3
    (out / "index.json").unlink()
    write_index(out, say=lambda s: None)
    assert (out / "index.json").read_bytes() == index


@pytest.mark.parametrize("dataset", ["folder", "filelist", "shards", "imagefolder"])
def test_an_empty_data_root_is_refused_not_the_current_folder(tmp_path, monkeypatch, dataset):
    """`--set data.root=$PHOTOS` with PHOTOS unset listed the current folder (a home folder) and trained on it."""
    from simclr_cli.data.pipeline.loaders import build_source
    from simclr_cli.recipe import DataConfig

    _png(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data.root is empty") as e:
        build_source(DataConfig(dataset=dataset, root="", listing_cache="off"), "train", 0)
    assert e.value.exit_code == 2


def test_pack_quiet_still_warns_about_each_unreadable_image(tmp_path):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    _png(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    r = CliRunner().invoke(app, ["data", "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert f"warning: skipping unreadable image {tmp_path / 'src' / 'b.jpg'}" in r.output
    assert "1 unreadable images skipped (each named in a warning)" in r.output


def test_a_second_pack_into_the_same_out_is_refused_while_one_runs(tmp_path):
    """Two packs into one OUT wrote the same .shard-K.tar.tmp files (one failed with a raw FileNotFoundError, exit 1)."""
    import fcntl
    import os

    from simclr_cli.data.shards.writer import PackSettings, pack
    from simclr_cli.errors import UsageError

    _png(tmp_path / "src" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".pack.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running pack holds
    try:
        with pytest.raises(UsageError, match="being packed by another") as e:
            pack(tmp_path / "src", out, PackSettings(16, 90, 3), say=lambda s: None)
        assert e.value.exit_code == 2 and not (out / "pack.json").exists()
    finally:
        os.close(fd)
    assert pack(tmp_path / "src", out, PackSettings(16, 90, 3), say=lambda s: None).images == 1
    other = tmp_path / "other"  # a folder that is not a pack is left as it was
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="not a shard pack"):
        pack(tmp_path / "src", other, PackSettings(16, 90, 3), say=lambda s: None)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


def test_a_pack_of_no_readable_image_is_an_error(tmp_path):
    """Review: every image unreadable gave exit 0 and "packed 0 images", a pack training then refuses; also on a
    re-run, which found the empty pack "already packed". Exit 1, like unreadable images beyond the limit."""
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    (tmp_path / "src").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "src" / name).write_bytes(b"\xff\xd8\xff\xe0 not an image")
    args = ["data", "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet", "--workers", "0"]
    for _ in range(2):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1, r.output
        assert "none of its 2 images could be read" in r.output and "Traceback" not in r.output


def test_pack_labels_folders_on_a_flat_folder_is_an_error(tmp_path):
    """Review: `--labels folders` on a folder without class folders silently packed everything unlabeled."""
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    _png(tmp_path / "src" / "a.png")
    r = CliRunner().invoke(app, ["data", "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--labels", "folders",
                                 "--quiet", "--workers", "0"])
    assert r.exit_code == 2 and "--labels folders" in r.output and "has no class folders" in r.output, r.output
    r = CliRunner().invoke(app, ["data", "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output  # auto: unlabeled
