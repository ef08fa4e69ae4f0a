"""Image folders: any extension and case, mode conversion, corrupt files, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.data.pipeline.augment import EvalTransform
from simclr_cli.data.pipeline.loaders import EvalImages, build_source, load_with_fallback
from simclr_cli.errors import DataError
from simclr_cli.recipe.schema import DataConfig


def _img(mode, size=(20, 12)):
    rng = np.random.default_rng(0)
    if mode == "P":
        return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert("P")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8), "L")
    arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(arr, mode)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    _img("RGB").save(root / "train" / "cat" / "a.JPG")
    _img("L").save(root / "train" / "cat" / "b.png")
    _img("P").save(root / "train" / "dog" / "c.gif")
    _img("RGBA").save(root / "train" / "dog" / "d.PNG")
    _img("CMYK").save(root / "train" / "dog" / "e.jpeg")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_reads_every_mode_as_rgb(folder):
    src = build_source(DataConfig(dataset="imagefolder", root=str(folder)), "train", 0)
    assert len(src) == 5 and src.classes == ["cat", "dog"]
    assert src.labels == [0, 0, 1, 1, 1]
    for i in range(len(src)):
        img = src.load(i)
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 20)


def test_missing_root_says_where_it_looked(tmp_path):
    with pytest.raises(DataError) as e:
        build_source(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")), "train", 0)
    assert str(tmp_path / "nope" / "train") in str(e.value) and "data.root" in str(e.value)
    assert e.value.exit_code == 2


def test_missing_torchvision_data_is_clear(tmp_path):
    with pytest.raises(DataError) as e:
        build_source(DataConfig(dataset="cifar10", root=str(tmp_path)), "train", 0)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data.download=true" in msg and "Traceback" not in msg


def test_corrupt_image_is_skipped_with_a_named_warning(folder, capsys):
    bad = folder / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    src = build_source(DataConfig(dataset="imagefolder", root=str(folder)), "train", 0)
    i = src.files.index(str(bad))
    img, used, failed = load_with_fallback(src, i)
    assert failed == i and used != i and img.shape[0] == 3
    assert str(bad) in capsys.readouterr().err
    item = EvalImages(src, EvalTransform(8, (0.5,) * 3, (0.5,) * 3))[i]
    assert item["bad"] == i


def test_image_folders_decode_into_memory(tmp_path):
    import numpy as np
    from PIL import Image

    from simclr_cli.data.sources.images import ImageFolderSource, MemorySource, TensorSource, decode_in_memory

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    folder = ImageFolderSource(tmp_path, "train")
    mem = decode_in_memory(folder, "auto", 1.0, say=lambda *_: None)
    assert isinstance(mem, TensorSource) and mem.images.shape == (6, 3, 8, 8)
    assert all(torch.equal(mem.load(i), folder.load(i)) for i in range(6)) and mem.labels == folder.labels
    assert decode_in_memory(folder, "auto", 1e-9, say=lambda *_: None) is folder  # over the limit: stays on disk
    assert decode_in_memory(folder, "never", 1.0, say=lambda *_: None) is folder
    # different sizes and an unreadable file: a MemorySource that names the file when it fails
    Image.fromarray(np.zeros((5, 9, 3), np.uint8)).save(tmp_path / "train" / "a" / "odd.png")
    (tmp_path / "train" / "b" / "bad.png").write_bytes(b"not a png")
    folder = ImageFolderSource(tmp_path, "train")
    mem = decode_in_memory(folder, "always", 0.0, say=lambda *_: None)
    assert isinstance(mem, MemorySource) and len(mem) == 8
    bad = next(i for i in range(8) if mem.describe(i).endswith("bad.png"))
    with pytest.raises(OSError):
        mem.load(bad)


def test_16bit_grayscale_png_decodes_to_a_gradient_not_white(tmp_path):
    # issue 11 item 6: PIL's convert("RGB") clipped I;16 to 255, so a 16-bit PNG came out almost white
    import numpy as np
    from PIL import Image

    from simclr_cli.data.sources.images import read_image

    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (4, 1))).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 4, 256)
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    row = img[0, 0].long()
    assert row[0] == 0 and row[-1] == 255 and (row.diff() >= 0).all()
    expected = torch.from_numpy(np.rint(ramp / 257.0)).long()
    assert (row - expected).abs().max() <= 1
    assert (img == 255).float().mean() < 0.01  # not white
    # 32-bit 'I' beyond 16 bits: scaled by the image's own range
    Image.fromarray(np.tile(np.arange(0, 256 * 1000, 1000, dtype=np.int32), (2, 1))).save(tmp_path / "i32.tif")
    wide = read_image(tmp_path / "i32.tif")[0, 0].long()
    assert wide[0] == 0 and wide[-1] == 255 and (wide.diff() >= 0).all()


def test_single_class_split_and_empty_class_folder_warn_on_stderr(tmp_path, capsys):
    # issue 11 item 13: no warning for a single-class split or an empty class folder
    one = tmp_path / "one"
    (one / "train" / "only").mkdir(parents=True)
    _img("RGB").save(one / "train" / "only" / "a.png")
    build_source(DataConfig(dataset="imagefolder", root=str(one), in_memory="never"), "train", 0)
    out = capsys.readouterr()
    assert "warning: " in out.err and "single class folder ('only')" in out.err and "warning" not in out.out
    empty = tmp_path / "empty"
    for c in ("cat", "dog", "eel"):
        (empty / "train" / c).mkdir(parents=True)
    _img("RGB").save(empty / "train" / "cat" / "a.png")
    _img("RGB").save(empty / "train" / "eel" / "b.png")
    src = build_source(DataConfig(dataset="imagefolder", root=str(empty), in_memory="never"), "train", 0)
    err = capsys.readouterr().err
    assert src.classes == ["cat", "dog", "eel"]
    assert err.startswith("warning: ") and "1 class folder(s) with no images (dog)" in err and "single class" not in err
    # a healthy split says nothing
    (empty / "train" / "dog" / "c.png").parent.mkdir(exist_ok=True)
    _img("RGB").save(empty / "train" / "dog" / "c.png")
    build_source(DataConfig(dataset="imagefolder", root=str(empty), in_memory="never"), "train", 0)
    assert capsys.readouterr().err == ""
