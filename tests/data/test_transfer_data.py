"""Transfer datasets: the three image-folder layouts, files without extensions, validation splits."""

import numpy as np
import pytest
from PIL import Image

from simclr_cli.data.listing.folders import is_image_file
from simclr_cli.data.sources.splits import per_class_split
from simclr_cli.data.sources.transfer import load_transfer
from simclr_cli.errors import DataError, UsageError


def _img(path, value=100, mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((12, 12, 3) if mode == "RGB" else (12, 12), value, np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _classes(root, per_class=5, classes=("a", "b")):
    for c in classes:
        for i in range(per_class):
            _img(root / c / f"{i}.jpg")


def test_layout_split_folders(tmp_path):
    _classes(tmp_path / "train", 6)
    _classes(tmp_path / "test", 2)
    d = load_transfer(f"imagefolder:{tmp_path}", "")
    assert (len(d.train), len(d.val), len(d.test)) == (10, 2, 4)  # val: 0.2 of each class of train, held out
    assert d.metric == "top1" and d.classes == ["a", "b"]
    assert not set(d.train.indices) & set(d.val.indices)


def test_layout_split_folders_with_val_folder(tmp_path):
    _classes(tmp_path / "train", 4)
    _classes(tmp_path / "val", 1)
    _classes(tmp_path / "test", 2)
    d = load_transfer(f"imagefolder:{tmp_path}", "")
    assert (len(d.train), len(d.val), len(d.test)) == (8, 2, 4) and d.val_note == "val/ folder"


def test_layout_list_files(tmp_path):
    _classes(tmp_path, 4)
    (tmp_path / "train.txt").write_text("a/0.jpg\na/1.jpg\nb/0.jpg\nb/1.jpg\na/2.jpg\nb/2.jpg\n")
    (tmp_path / "test.txt").write_text("a/3.jpg\nb/3.jpg\n")
    d = load_transfer(f"imagefolder:{tmp_path}", "")
    assert len(d.train) + len(d.val) == 6 and len(d.test) == 2
    assert sorted(d.test.describe(i).split("/")[-2] for i in range(2)) == ["a", "b"]
    (tmp_path / "test.txt").write_text("a/9.jpg\n")
    with pytest.raises(DataError, match="a/9.jpg"):
        load_transfer(f"imagefolder:{tmp_path}", "")


def test_layout_no_split_uses_per_class_protocol(tmp_path):
    _classes(tmp_path, 40, classes=("a", "b", "c"))
    d = load_transfer(f"imagefolder:{tmp_path}", "", split="30-per-class", seed=1)
    assert len(d.train) + len(d.val) == 90 and len(d.test) == 30
    again = load_transfer(f"imagefolder:{tmp_path}", "", split="30-per-class", seed=1)
    assert again.test.indices == d.test.indices  # deterministic
    d = load_transfer(f"imagefolder:{tmp_path}", "", split="0.5")
    assert len(d.test) == 60
    with pytest.raises(UsageError, match="transfer.split"):
        load_transfer(f"imagefolder:{tmp_path}", "", split="half")


def test_files_without_extension_and_grayscale_are_read(tmp_path):
    _classes(tmp_path, 3)
    _img(tmp_path / "a" / "no_extension", mode="L", fmt="PNG")
    _img(tmp_path / "a" / "odd.datafile", fmt="JPEG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "junk").write_bytes(b"\x00\x01garbage")
    assert is_image_file(tmp_path / "a" / "no_extension") and not is_image_file(tmp_path / "a" / "junk")
    d = load_transfer(f"imagefolder:{tmp_path}", "", split="2-per-class")
    files = [d.test.describe(i) for i in range(len(d.test))] + [d.train.describe(i) for i in range(len(d.train))] + \
        [d.val.describe(i) for i in range(len(d.val))]
    assert len(files) == 8 and any(f.endswith("no_extension") for f in files)
    gray = next(i for i, f in enumerate(files) if f.endswith("no_extension"))
    src = [d.test, d.train, d.val]
    sizes = [len(s) for s in src]
    owner = 0 if gray < sizes[0] else (1 if gray < sizes[0] + sizes[1] else 2)
    offset = sum(sizes[:owner])
    assert src[owner].load(gray - offset).shape == (3, 12, 12)  # grayscale became RGB


def test_per_class_split_keeps_a_test_image_per_class(tmp_path):
    _classes(tmp_path, 3)
    from simclr_cli.data.sources.images import FileListSource

    files = [str(p) for p in sorted(tmp_path.rglob("*.jpg"))]
    src = FileListSource(files, [0, 0, 0, 1, 1, 1], ["a", "b"], "x")
    train, test = per_class_split(src, "30-per-class", 0)
    assert len(train) == 4 and len(test) == 2


def test_unknown_and_missing_datasets():
    with pytest.raises(UsageError, match="unknown transfer dataset"):
        load_transfer("imagenet21k", "/nowhere")
    with pytest.raises(DataError, match="dtd: not found under /nowhere.*--download"):
        load_transfer("dtd", "/nowhere")


def test_imagefolder_needs_a_path_and_cifar_hints_name_the_transfer_options(tmp_path, monkeypatch):
    # issue 11 items 11 and 13: "imagefolder:" used the current folder; the CIFAR hint named data.download
    (tmp_path / "a").mkdir()
    _img(tmp_path / "a" / "x.jpg")
    monkeypatch.chdir(tmp_path)
    for name in ("imagefolder:", "imagefolder: "):
        with pytest.raises(UsageError, match="has no path; write imagefolder:PATH"):
            load_transfer(name, "")
    with pytest.raises(DataError) as e:
        load_transfer("cifar10", str(tmp_path / "nowhere"))
    assert "--download" in str(e.value) and "--root" in str(e.value) and "data." not in str(e.value)


def _voc_xml(path, objects):
    body = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult></object>" for n, d in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{body}</annotation>")


def test_voc2007_difficult_only_classes_are_ignored_not_positive(tmp_path):
    # issue 11 item 7: the devkit leaves an image whose only objects of class c are difficult out of c's AP
    import torch

    from simclr_cli.data.sources.builders import VOC_CLASSES
    from simclr_cli.evaluation.metrics import map_11point

    voc = tmp_path / "VOCdevkit" / "VOC2007"
    objects = {
        "000001": [("dog", False), ("cat", True)],  # cat only difficult: ignore
        "000002": [("cat", True), ("cat", False)],  # a non-difficult cat too: positive
        "000003": [("person", False)],
        "000004": [("dog", True)],
        "000005": [("car", False)],
    }
    for name, objs in objects.items():
        _voc_xml(voc / "Annotations" / f"{name}.xml", objs)
        _img(voc / "JPEGImages" / f"{name}.jpg")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("trainval", "test"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(objects) + "\n")
    data = load_transfer("voc2007", str(tmp_path))
    t = data.test.targets
    cat, dog, person = (VOC_CLASSES.index(c) for c in ("cat", "dog", "person"))
    assert t[:, cat].tolist() == [-1, 1, 0, 0, 0]
    assert t[:, dog].tolist() == [1, 0, 0, -1, 0]
    assert t[:, person].tolist() == [0, 0, 1, 0, 0]
    # the metric leaves ignored entries out: a difficult-only image ranked first costs nothing
    scores = torch.zeros(5, len(VOC_CLASSES))
    scores[:, cat] = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3])
    only_cat = torch.zeros_like(t)
    only_cat[:, cat] = t[:, cat]
    assert map_11point(scores, only_cat) == pytest.approx(100.0)
