"""Packed shards (issue 13, section 3): ``simclr data pack`` -> WebDataset tars + index -> random access by sample
index (``data.dataset = "shards"``): the packed images, labels, resume after an interruption, damaged members,
a missing index, pretraining from shards and determinism against the packed images read as files."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.data.pipeline.augment import SimCLRAugment
from simclr_cli.data.pipeline.loaders import ContrastiveViews, GlobalBatchSampler, load_with_fallback, make_loader
from simclr_cli.data.shards import writer as shards
from simclr_cli.data.shards.format import read_index
from simclr_cli.data.shards.reader import ShardSource
from simclr_cli.data.shards.writer import PackSettings, pack
from simclr_cli.data.sources.images import FileListSource, read_image
from simclr_cli.errors import DataError, Interrupted, UsageError
from simclr_cli.recipe.schema import AugmentConfig

SIZES = [(40, 30), (30, 52), (10, 12), (64, 48), (33, 33), (48, 20), (26, 40)]  # (w, h); (10, 12) is never upscaled
SETTINGS = PackSettings(shorter_side=16, quality=90, shard_size=3)


def _image(rng, w, h):
    """A smooth gradient with noise: compresses like a photo."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8))


def _labeled(root, n_per_class=(4, 3)):
    """root/<class>/<image>: JPEGs and PNGs of different sizes, one EXIF-rotated JPEG."""
    rng = np.random.default_rng(0)
    k = 0
    for cls, n in zip(("cat", "dog"), n_per_class):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = _image(rng, *SIZES[k % len(SIZES)])
            if k == 1:
                exif = img.getexif()
                exif[0x0112] = 6  # shown rotated by 90 degrees
                img.save(root / cls / f"{i}.jpg", exif=exif, quality=95)
            else:
                img.save(root / cls / (f"{i}.png" if k % 3 == 2 else f"{i}.jpg"), quality=95)
            k += 1
    return root


def _expected(path, side=SETTINGS.shorter_side, quality=SETTINGS.quality):
    """What the pack stores for ``path``, decoded."""
    return read_image(io.BytesIO(shards.encode_image(str(path), side, quality)))


def _reference(path, side=SETTINGS.shorter_side):
    """``path`` decoded upright at full size and scaled down (no JPEG round trip, no reduced-size decoding)."""
    return torch.from_numpy(np.array(shards.resize_shorter(read_image(path), side))).permute(2, 0, 1)


def test_pack_gives_random_access_to_the_resized_images_with_labels(tmp_path):
    src = _labeled(tmp_path / "src")
    result = pack(src, tmp_path / "out", SETTINGS, say=lambda s: None)
    assert (result.images, result.skipped, result.shards, result.reused) == (7, 0, 3, 0)
    ds = ShardSource(tmp_path / "out")
    files = sorted(str(p) for p in src.rglob("*.*"))
    assert len(ds) == 7 and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert isinstance(ds.labels, np.ndarray)  # compact: DataLoader workers do not copy it page by page
    for i in [6, 0, 3, 1, 5, 2, 4]:  # any order: random access
        img = ds.load(i)
        assert torch.equal(img, _expected(files[i]))
        full = read_image(files[i])
        h, w = full.shape[-2:]
        assert min(img.shape[-2:]) == min(min(h, w), 16)  # scaled down to 16, never up
        assert abs(img.shape[-1] / img.shape[-2] - w / h) < 0.1  # aspect kept
        assert (img.float() - _reference(files[i]).float()).abs().mean() < 6  # only JPEG and rounding differ
        assert ds.raw(i)[:2] == b"\xff\xd8"
        assert ds.describe(i) == f"{tmp_path / 'out'}/shard-{i // 3:06d}.tar:{i:09d}.jpg (from {files[i]})"
    rotated = ds.load(1)  # 30x52 stored with orientation 6: upright it is 52 wide, 30 high -> 16 x 28
    assert tuple(rotated.shape) == (3, 16, 28)
    index = read_index(tmp_path / "out")
    assert index["settings"] == {"shorter_side": 16, "quality": 90, "shard_size": 3}
    assert index["source"] == str(src) and [s["name"] for s in index["shards"]] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_unlabeled_folders_and_list_files(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        _image(rng, 30, 20).save(flat / f"{i}.jpg")
    (flat / "nested" / "deeper").mkdir(parents=True)
    _image(rng, 20, 30).save(flat / "nested" / "deeper" / "x.png")
    pack(flat, tmp_path / "a", SETTINGS, say=lambda s: None)
    ds = ShardSource(tmp_path / "a")
    assert len(ds) == 5 and ds.classes == [] and ds.labels.tolist() == [-1] * 5
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        assert [m.name for m in tar] == ["000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json",
                                         "000000002.jpg", "000000002.json"]  # no .cls: unlabeled
    labeled = _labeled(tmp_path / "lab")
    pack(labeled, tmp_path / "b", SETTINGS, labels="none", say=lambda s: None)
    assert ShardSource(tmp_path / "b").labels.tolist() == [-1] * 7
    (tmp_path / "list.csv").write_text("path,label\nflat/0.jpg,b\nflat/1.jpg,a\nflat/2.jpg,\n")
    pack(tmp_path / "list.csv", tmp_path / "c", SETTINGS, say=lambda s: None)
    ds = ShardSource(tmp_path / "c")
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [1, 0, -1]
    assert torch.equal(ds.load(1), _expected(flat / "1.jpg"))


def test_other_tools_read_the_shards_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    pack(_labeled(tmp_path / "src"), tmp_path / "out", SETTINGS, say=lambda s: None)
    ds = ShardSource(tmp_path / "out")
    urls = [str(p) for p in sorted((tmp_path / "out").glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    for i, s in enumerate(samples):
        assert s["jpg"] == ds.raw(i) and int(s["cls"]) == ds.labels[i]
        assert json.loads(s["json"])["class"] == ds.classes[ds.labels[i]]


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_interrupted_pack_resumes_and_ends_identical(tmp_path, monkeypatch):
    src = _labeled(tmp_path / "src")
    pack(src, tmp_path / "whole", SETTINGS, say=lambda s: None)
    real = shards._write_shard
    calls = []

    def stop_at_third(writer):
        calls.append(writer.final.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is being written
        real(writer)

    monkeypatch.setattr(shards, "_write_shard", stop_at_third)
    with pytest.raises(Interrupted, match="2 of 3 shards are complete and kept .*run the same command again to resume") as e:
        pack(src, tmp_path / "out", SETTINGS, say=lambda s: None)
    assert e.value.exit_code == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pack.json", "shard-000000.tar", "shard-000001.tar"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "out").glob("shard-*")}
    monkeypatch.setattr(shards, "_write_shard", real)
    said = []
    result = pack(src, tmp_path / "out", SETTINGS, say=said.append)
    assert result.reused == 2 and result.images == 7
    assert any("resuming: 2 of 3 shards are complete and kept" in s for s in said)
    for name, stamp in before.items():  # completed shards were not written again
        p = tmp_path / "out" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")  # byte for byte, index included
    assert pack(src, tmp_path / "out", SETTINGS, say=lambda s: None).already
    (tmp_path / "out" / "shard-000001.tar").unlink()  # a finished pack that lost a shard: only that one is rewritten
    result = pack(src, tmp_path / "out", SETTINGS, say=lambda s: None)
    assert not result.already and result.reused == 2 and _files(tmp_path / "out") == _files(tmp_path / "whole")
    # other settings: refused without --overwrite, repacked with it
    other = PackSettings(shorter_side=12, quality=90, shard_size=3)
    with pytest.raises(UsageError, match="holds a pack with other settings.*pass --overwrite"):
        pack(src, tmp_path / "out", other, say=lambda s: None)
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")
    assert pack(src, tmp_path / "out", other, overwrite=True, say=lambda s: None).reused == 0
    assert max(ShardSource(tmp_path / "out").load(3).shape[-2:]) <= 16
    # a folder that is not a pack is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="is not empty and is not a shard pack"):
        pack(src, tmp_path / "mine", SETTINGS, overwrite=True, say=lambda s: None)


def test_worker_processes_pack_the_same_bytes(tmp_path):
    src = _labeled(tmp_path / "src")
    pack(src, tmp_path / "one", SETTINGS, workers=0, say=lambda s: None)
    pack(src, tmp_path / "two", SETTINGS, workers=2, say=lambda s: None)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_unreadable_sources_and_damaged_members_are_skipped_and_named(tmp_path, capsys):
    src = _labeled(tmp_path / "src")
    (src / "dog" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    said = []
    result = pack(src, tmp_path / "out", SETTINGS, say=said.append)
    assert result.skipped == 1 and result.images == 7
    assert any(s.startswith(f"warning: skipping unreadable image {src / 'dog' / 'zz_broken.jpg'}") for s in said)
    out = tmp_path / "out"
    ds = ShardSource(out)
    offset, size = int(ds._offset[1]), int(ds._size[1])
    with open(out / "shard-000000.tar", "r+b") as f:  # corrupt member 1's JPEG in place
        f.seek(offset)
        f.write(b"\0" * size)
    with pytest.raises(Exception):
        ds.load(1)
    img, used, bad = load_with_fallback(ds, 1)
    assert (used, bad) == (2, 1) and torch.equal(img, ds.load(2))
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image {out}/shard-000000.tar:000000001.jpg (from {src / 'cat' / '1.jpg'})" in err
    # an index that no longer matches its shard (offsets moved): the member is unreadable, not a wrong image
    index = json.loads((out / "index.json").read_text())
    index["samples"]["offset"][4] += 512
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(OSError, match="the index does not match the shard"):
        ShardSource(out).load(4)
    # a truncated shard: the index no longer fits it; while the source exists, the advice is to pack again
    with open(out / "shard-000002.tar", "r+b") as f:
        f.truncate(700)
    with pytest.raises(DataError, match=r"shard-000002.tar has 700 bytes, the index says \d+.*simclr data pack"):
        ShardSource(out)


def test_data_check_lists_a_damaged_member(tmp_path, tiny_recipe_file):
    src = _labeled(tmp_path / "src")
    pack(src, tmp_path / "out", SETTINGS, say=lambda s: None)
    ds = ShardSource(tmp_path / "out")
    with open(tmp_path / "out" / "shard-000001.tar", "r+b") as f:
        f.seek(int(ds._offset[4]))
        f.write(b"\0" * int(ds._size[4]))
    r = CliRunner().invoke(app, ["data", "check", str(tiny_recipe_file), "--set", "data.dataset=shards",
                                 "--set", f"data.root={tmp_path / 'out'}"])
    assert r.exit_code == 1, r.output  # 1 of 7 is more than max_bad_fraction: training would stop
    assert "shard-000001.tar:000000004.jpg" in r.output and "7 images, 1 unreadable" in r.output


def test_a_missing_index_says_how_to_rebuild_it(tmp_path, tiny_recipe_file):
    pack(_labeled(tmp_path / "src"), tmp_path / "out", SETTINGS, say=lambda s: None)
    index = tmp_path / "out" / "index.json"
    before = index.read_bytes()
    index.unlink()
    runner = CliRunner()
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "data.dataset=shards", "--set",
                            f"data.root={tmp_path / 'out'}", "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert f"index.json is missing; rebuild it from the shards with `simclr data index {tmp_path / 'out'}`" in r.output
    r = runner.invoke(app, ["data", "index", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "indexed 7 images in 3 shards" in r.output and index.read_bytes() == before
    r = runner.invoke(app, ["data", "index", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no shard-NNNNNN.tar files to index" in r.output


def test_cli_pack_progress_ctrl_c_and_pretrain_from_shards(tmp_path, tiny_recipe_file, monkeypatch):
    src = _labeled(tmp_path / "src", (8, 8))
    runner = CliRunner()
    real = shards._write_shard

    def interrupt(writer):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_write_shard", interrupt)
    args = ["data", "pack", str(src), str(tmp_path / "out"), "--shorter-side", "16", "--shard-size", "5", "--workers", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "packing stopped: 0 of 4 shards are complete" in r.output and "run the same command again to resume" in r.output
    monkeypatch.setattr(shards, "_write_shard", real)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "packed 16/16 images" in r.output  # the progress (plain lines when not on a terminal)
    assert f"packed 16 images into 4 shards in {tmp_path / 'out'}" in r.output
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == 0 and "already packed" in r.output and "packed 16/16" not in r.output
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--set", "data.dataset=shards", "--set",
                            f"data.root={tmp_path / 'out'}", "--set", "pretrain.epochs=1", "--set",
                            "pretrain.batch_size=8", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "kNN monitor off: data.dataset=shards has no labeled val split" in r.output
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["bad_images"] == 0
    supcon = tmp_path / "supcon.toml"  # the recipe's temperature in the section of the objective it selects
    supcon.write_text(tiny_recipe_file.read_text().replace("[pretrain.simclr]", "[pretrain.supcon]"))
    r = runner.invoke(app, ["pretrain", str(supcon), "--set", "data.dataset=shards", "--set",
                            f"data.root={tmp_path / 'out'}", "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=8",
                            "--set", "pretrain.objective=supcon", "--set", f"data.labeled={src}", "--set",
                            "pretrain.knn_k=2", "--out", str(tmp_path / "sup"), "--quiet"])
    assert r.exit_code == 0, r.output  # the labels of the class folders reach a supervised objective
    summary = json.loads((tmp_path / "sup" / "pretrain" / "summary.json").read_text())
    assert summary["knn_top1"] is not None  # the monitor on a labeled folder elsewhere (data.labeled)


@pytest.mark.parametrize("batched", [False, True])
def test_views_from_shards_equal_views_of_the_packed_images_read_as_files(tmp_path, batched):
    src = _labeled(tmp_path / "src", (5, 5))
    pack(src, tmp_path / "out", SETTINGS, say=lambda s: None)
    ds = ShardSource(tmp_path / "out")
    files = []
    for k in range(len(ds)):  # the packed JPEGs as plain files, in index order
        path = tmp_path / "files" / f"{k}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(ds.raw(k))
        files.append(str(path))
    plain = FileListSource(files, ds.labels.tolist(), ds.classes, "files")
    aug = SimCLRAugment(AugmentConfig(), 16, (0.5,) * 3, (0.25,) * 3)
    a, b = ContrastiveViews(ds, aug, seed=3, batched=batched), ContrastiveViews(plain, aug, seed=3, batched=batched)
    for key in [(0, 0), (0, 7), (1, 7), (2, 9)]:
        x, y = a[key], b[key]
        assert torch.equal(x["view1"], y["view1"]) and torch.equal(x["view2"], y["view2"])
    # through DataLoader workers (descriptors opened after the fork): the same batches as in this process
    sampler = GlobalBatchSampler(len(ds), 4, seed=3)
    sampler.set_epoch(1)
    loader = make_loader(a, num_workers=2, pin_memory=False, batch_sampler=sampler)
    for batch, keys in zip(loader, sampler):
        assert torch.equal(batch["view1"], torch.stack([b[k]["view1"] for k in keys]))


def test_shard_throughput_benchmark_smoke(tmp_path):
    """benchmarks/shard_throughput.py end to end on a tiny archive in the Imagenette layout (numbers not checked)."""
    from tests.benchmarks import load_benchmark

    rng = np.random.default_rng(2)
    (tmp_path / "imagenette" / "train" / "n01").mkdir(parents=True)
    for i in range(6):
        _image(rng, 40, 40).save(tmp_path / "imagenette" / "train" / "n01" / f"{i}.JPEG")
    with tarfile.open(tmp_path / "subset.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imagenette", arcname="imagenette")
    result = load_benchmark("shard_throughput").main(["--smoke", "--archive", str(tmp_path / "subset.tar.gz"), "--work", str(tmp_path / "work"),
                         "--width", "50", "--height", "40", "--shorter-side", "32", "--size", "16"])
    assert result["images"] == 6 and result["speedup_cpu"]["loader"] > 0
    assert result["shards"]["loader_views_per_sec"]["cpu"] > 0 and result["jpeg_folder"]["loader_views_per_sec"]["wall"] > 0


def test_device_decoding_reads_the_shards_bytes(tmp_path):
    """data.decode="gpu": the loader hands ShardSource.raw(i) to the device decoder (run here on the CPU)."""
    from torch.utils.data import default_collate

    from simclr_cli.data.pipeline.decode import DeviceDecoder

    pack(_labeled(tmp_path / "src"), tmp_path / "out", SETTINGS, say=lambda s: None)
    ds = ShardSource(tmp_path / "out")
    aug = SimCLRAugment(AugmentConfig(), 16, (0.5,) * 3, (0.25,) * 3)
    views = ContrastiveViews(ds, aug, seed=1, batched=True, labels=True, decode="gpu")
    item = views[(0, 2)]
    assert item["jpeg"] == ds.raw(2)
    decoder = DeviceDecoder(views, "cpu")
    out = decoder(default_collate([views[(0, i)] for i in range(7)]))
    ref = default_collate([views.cpu_views(0, i) for i in range(7)])
    assert decoder.fallbacks == 0 and out["label"].tolist() == ds.labels.tolist()
    assert (out["view1"].float() - ref["view1"].float()).abs().max() <= 1
