"""Unlabeled data in the shapes people have it (issue 13, section 1): any folder of images at any depth
(``data.dataset = "folder"``), list files (``"filelist"``), and mixed formats and sizes in the one decoder."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from simclr_cli.data.listing.folders import scan_images
from simclr_cli.data.pipeline.augment import EvalTransform, SimCLRAugment
from simclr_cli.data.pipeline.batched import BatchedAugment, pack
from simclr_cli.data.pipeline.loaders import build_source
from simclr_cli.data.sources.images import ImageFolderSource, read_image
from simclr_cli.data.sources.registry import DATASETS
from simclr_cli.errors import DataError
from simclr_cli.recipe import DataConfig
from simclr_cli.recipe.schema import AugmentConfig


def _png(path, size=(8, 6), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _cfg(dataset, root, **kw):
    return DataConfig(dataset=dataset, root=str(root), in_memory="never", **kw)


@pytest.fixture
def messy_folder(tmp_path):
    """Images flat and nested three deep, hidden files and folders, non-images, and a symlinked subfolder."""
    root = tmp_path / "photos"
    _png(root / "a.png")
    _png(root / "b.PNG")  # any case
    _png(root / "2024" / "05" / "day1" / "c.png")
    Image.new("RGB", (8, 6)).save(root / "2024" / "noext", format="PNG")  # no extension: sniffed
    _png(root / ".hidden.png")
    _png(root / ".thumbs" / "d.png")
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / "data.bin").write_bytes(b"\x00\x01 not an image")
    elsewhere = _png(tmp_path / "elsewhere" / "e.png").parent
    os.symlink(elsewhere, root / "linked")
    os.symlink(root, root / "2024" / "loop")  # a cycle: read once
    return root


def test_folder_scan_any_depth_skips_hidden_and_non_images_and_follows_symlinks(messy_folder):
    files = [os.path.relpath(f, messy_folder) for f in scan_images(messy_folder)]
    assert files == ["2024/05/day1/c.png", "2024/noext", "a.png", "b.PNG", "linked/e.png"]


def test_folder_dataset_is_the_folder_itself_unlabeled(messy_folder):
    assert DATASETS["folder"].one_set and DATASETS["filelist"].one_set
    src = build_source(_cfg("folder", messy_folder), "train", 0)
    assert len(src) == 5 and src.labels == [-1] * 5 and src.classes == []
    assert src.name == f"folder:{messy_folder}"
    assert src.load(0).shape == (3, 6, 8) and src.load(0).dtype == torch.uint8
    # a flat folder works the same, in memory too
    flat = messy_folder.parent / "flat"
    for i in range(3):
        _png(flat / f"{i}.png")
    mem = build_source(DataConfig(dataset="folder", root=str(flat), in_memory="always"), "train", 0)
    assert len(mem) == 3 and mem.labels == [-1] * 3


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="is not a folder.*data.root") as e:
        build_source(_cfg("folder", tmp_path / "nope"), "train", 0)
    assert e.value.exit_code == 2
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(DataError, match="data.dataset=filelist"):
        build_source(_cfg("folder", tmp_path / "list.txt"), "train", 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images under .*empty at any depth"):
        build_source(_cfg("folder", tmp_path / "empty"), "train", 0)


def test_imagefolder_without_class_folders_points_to_folder(tmp_path):
    _png(tmp_path / "train" / "a.png")
    with pytest.raises(DataError, match="has no class folders.*data.dataset=folder"):
        ImageFolderSource(tmp_path, "train")


def test_text_list_relative_and_absolute_paths(tmp_path):
    lists = tmp_path / "lists"
    _png(lists / "imgs" / "a.png")
    absolute = _png(tmp_path / "other" / "b.png")
    (lists / "files.txt").write_text(f"# my images\nimgs/a.png\n\n  {absolute}  \n")
    src = build_source(_cfg("filelist", lists / "files.txt"), "train", 0)
    assert src.files == [str(lists / "imgs" / "a.png"), str(absolute)]
    assert src.labels == [-1, -1] and src.classes == [] and len(src) == 2
    assert src.load(1).shape == (3, 6, 8)


def test_csv_list_with_labels_header_and_unlabeled_rows(tmp_path):
    for n in ("x1", "x2", "x3", "x4"):
        _png(tmp_path / f"{n}.png")
    (tmp_path / "l.csv").write_text("path,label\nx1.png,dog\nx2.png,cat\nx3.png,\nx4.png,dog\n")
    src = build_source(_cfg("filelist", tmp_path / "l.csv"), "train", 0)
    assert src.classes == ["cat", "dog"] and src.labels == [1, 0, -1, 1]
    (tmp_path / "n.csv").write_text("x1.png,10\nx2.png,2\n")  # no header; numeric labels sort as numbers
    src = build_source(_cfg("filelist", tmp_path / "n.csv"), "train", 0)
    assert src.classes == ["2", "10"] and src.labels == [1, 0]


def test_list_naming_missing_files_is_exit_2_with_count_and_names(tmp_path):
    _png(tmp_path / "ok.png")
    names = ["gone1.png", "gone2.png", "gone3.png", "gone4.png"]
    (tmp_path / "l.txt").write_text("\n".join(["ok.png", *names]) + "\n")
    with pytest.raises(DataError) as e:
        build_source(_cfg("filelist", tmp_path / "l.txt"), "train", 0)
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert "4 of 5 listed files do not exist" in msg and "gone1.png, gone2.png, gone3.png and 1 more" in msg
    assert "data.allow_missing=true" in msg and f"relative to {tmp_path}" in msg


def test_allow_missing_trains_on_the_rest_and_warns_with_the_count(tmp_path, capsys):
    _png(tmp_path / "ok.png")
    (tmp_path / "l.csv").write_text("ok.png,a\nmissing.png,b\n")
    src = build_source(_cfg("filelist", tmp_path / "l.csv", allow_missing=True), "train", 0)
    assert src.files == [str(tmp_path / "ok.png")] and src.classes == ["a"] and src.labels == [0]
    err = capsys.readouterr().err
    assert "warning:" in err and "1 of 2 listed files do not exist (missing.png)" in err
    (tmp_path / "none.txt").write_text("missing.png\n")
    with pytest.raises(DataError, match="none is left"):
        build_source(_cfg("filelist", tmp_path / "none.txt", allow_missing=True), "train", 0)


def test_list_that_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not a list file.*data.dataset=folder"):
        build_source(_cfg("filelist", tmp_path), "train", 0)


def test_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    # Stored 40 wide x 20 high, left half red; orientation 6 means "rotate 90 degrees clockwise to show".
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "phone.jpg")
    assert out.shape == (3, 40, 20)  # shown upright: 20 wide, 40 high
    top, bottom = out[:, :15].float().mean((1, 2)), out[:, -15:].float().mean((1, 2))
    assert top[0] > 200 and top[1] < 50  # the red half is now on top
    assert bottom.max() < 50


def test_cmyk_grayscale_and_16bit_become_rgb(tmp_path):
    Image.new("CMYK", (9, 5), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    Image.new("L", (9, 5), 77).save(tmp_path / "gray.png")
    Image.fromarray(np.full((5, 9), 65535, dtype=np.uint16)).save(tmp_path / "wide.png")
    cmyk, gray, wide = (read_image(tmp_path / n) for n in ("cmyk.jpg", "gray.png", "wide.png"))
    assert cmyk.shape == gray.shape == wide.shape == (3, 5, 9)
    r, g, b = cmyk.float().mean((1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60
    assert gray.unique().tolist() == [77] and wide.unique().tolist() == [255]


@pytest.mark.parametrize("shape", [(7, 5), (1, 1), (3, 40)])
def test_an_image_too_small_to_crop_is_upscaled(shape):
    img = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    augment = SimCLRAugment(AugmentConfig(), 32, (0.5,) * 3, (0.5,) * 3)
    g = torch.Generator().manual_seed(0)
    params = [augment.sample(g, *shape) for _ in range(8)]
    for p in params:  # the per-image (torchvision) backend
        view = augment.apply(img, p)
        assert view.shape == (3, 32, 32) and torch.isfinite(view).all()
    batched = BatchedAugment(augment)
    packed = torch.stack([pack(p) for p in params])
    whole = batched(img[None].expand(8, -1, -1, -1).contiguous(), packed, cropped=False)  # cropped on the device
    crops = torch.stack([TF.resized_crop(img, *p.crop, [32, 32], antialias=True) for p in params])  # in the loader
    assert whole.shape == batched(crops, packed, cropped=True).shape == (8, 3, 32, 32)
    assert torch.isfinite(whole).all()
    for size in (32, 224):  # the evaluation transform, small and ImageNet-style
        assert EvalTransform(size, (0.5,) * 3, (0.5,) * 3)(img).shape == (3, size, size)


def test_data_check_scans_a_folder_once(messy_folder):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    r = CliRunner().invoke(app, ["data", "check", "quickstart", "--set", "data.dataset=folder",
                                 "--set", f"data.root={messy_folder}"])
    assert r.exit_code == 0, r.output
    assert "(unlabeled)" in r.stdout and "train: 5 images, 0 unreadable" in r.stdout
    assert "val:" not in r.stdout  # one set: the val split would be the same images again


def test_a_list_naming_only_missing_files_does_not_suggest_allow_missing(tmp_path):
    """Review: the hint offered data.allow_missing=true 'to use the 0 that exist'."""
    (tmp_path / "none.txt").write_text("a.png\nb.png\n")
    with pytest.raises(DataError) as e:
        build_source(_cfg("filelist", tmp_path / "none.txt"), "train", 0)
    assert "2 of 2 listed files do not exist" in str(e.value) and "allow_missing" not in str(e.value)
