"""Labeled subsets for finetune: parsing, class balance, determinism, list files, errors."""

from collections import Counter

import pytest
import torch

from simclr_cli.data.pipeline.loaders import SubsetSource, load_with_fallback
from simclr_cli.data.sources.images import ImageFolderSource, TensorSource
from simclr_cli.data.sources.subsets import item_names, parse_label_spec, select_labeled, write_label_list
from simclr_cli.errors import UsageError


def _source(per_class=(50, 30, 20), unlabeled=0):
    labels = [c for c, n in enumerate(per_class) for _ in range(n)] + [-1] * unlabeled
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    return TensorSource(images, labels, [f"c{i}" for i in range(len(per_class))], "toy:train")


@pytest.mark.parametrize("text,kind,value", [("1%", "percent", 1.0), ("12.5 %", "percent", 12.5),
                                             ("10-per-class", "per_class", 10), ("3perclass", "per_class", 3)])
def test_parse_label_spec(text, kind, value):
    spec = parse_label_spec(text)
    assert (spec.kind, spec.value) == (kind, value)


@pytest.mark.parametrize("text", ["0%", "150%", "ten", "0-per-class", "missing.txt"])
def test_parse_label_spec_rejects(text):
    with pytest.raises(UsageError, match="--labels"):
        parse_label_spec(text)


def test_percent_subset_is_class_balanced_and_deterministic():
    src = _source((50, 30, 20), unlabeled=7)
    a = select_labeled(src, parse_label_spec("10%"), seed=3)
    b = select_labeled(src, parse_label_spec("10%"), seed=3)
    assert a == b == sorted(a)
    assert Counter(src.labels[i] for i in a) == {0: 5, 1: 3, 2: 2}  # 10% of each class
    assert all(src.labels[i] >= 0 for i in a)  # never unlabeled items
    assert select_labeled(src, parse_label_spec("10%"), seed=4) != a  # the seed decides which


def test_per_class_subset_and_its_errors():
    src = _source((50, 30, 20))
    chosen = select_labeled(src, parse_label_spec("4-per-class"), seed=0)
    assert Counter(src.labels[i] for i in chosen) == {0: 4, 1: 4, 2: 4}
    with pytest.raises(UsageError, match="'c2' has 20"):
        select_labeled(src, parse_label_spec("25-per-class"), seed=0)


def test_too_small_a_percentage_says_so():
    with pytest.raises(UsageError, match="fewer than the 3 classes"):
        select_labeled(_source((50, 30, 20)), parse_label_spec("2%"), seed=0)


def test_subset_grows_with_the_percentage():
    src = _source((200, 100, 100))
    one = set(select_labeled(src, parse_label_spec("1%"), seed=0))
    ten = set(select_labeled(src, parse_label_spec("10%"), seed=0))
    assert len(one) == 4 and len(ten) == 40


def _folder(tmp_path):
    for cls, names in {"cat": ["n01_1.JPEG", "n01_2.JPEG", "n01_3.JPEG"], "dog": ["n02_1.JPEG", "n02_2.JPEG"]}.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for n in names:
            (tmp_path / "train" / cls / n).write_bytes(b"x")
    return ImageFolderSource(tmp_path, "train")


def test_list_file_in_imagenet_format(tmp_path):
    src = _folder(tmp_path)
    lst = tmp_path / "1percent.txt"
    lst.write_text("n01_2.JPEG\nn02_1.JPEG\n\n")
    chosen = select_labeled(src, parse_label_spec(str(lst)), seed=0)
    assert [item_names(src)[i] for i in chosen] == ["n01_2.JPEG", "n02_1.JPEG"]
    # labels.txt round-trips through --labels
    out = tmp_path / "labels.txt"
    write_label_list(out, src, chosen)
    assert out.read_text() == "n01_2.JPEG\nn02_1.JPEG\n"
    assert select_labeled(src, parse_label_spec(str(out)), seed=9) == chosen
    lst.write_text("n01_2.JPEG\nnope.JPEG\n")
    with pytest.raises(UsageError, match="1 of 2 names are not in .*'nope.JPEG'"):
        select_labeled(src, parse_label_spec(str(lst)), seed=0)


def test_list_file_for_in_memory_sets_round_trips(tmp_path):
    src = _source((10, 10))
    chosen = select_labeled(src, parse_label_spec("20%"), seed=1)
    out = tmp_path / "labels.txt"
    write_label_list(out, src, chosen)
    assert select_labeled(src, parse_label_spec(str(out)), seed=0) == chosen


def test_subset_source_falls_back_inside_the_subset():
    class Flaky(TensorSource):
        def load(self, index):
            if index == 2:
                raise OSError("truncated")
            return super().load(index)

    base = Flaky(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), [0, 1, 0, 1, 0, 1], ["a", "b"], "flaky")
    sub = SubsetSource(base, [2, 5])
    _, used, bad = load_with_fallback(sub, 0)
    assert (used, bad) == (1, 0) and sub.indices[used] == 5  # the next subset item, not source item 3


def test_a_missing_labels_file_says_not_found(tmp_path):
    # issue 11 item 13: "--labels missing.txt" only listed the accepted forms
    for text in ("missing.txt", str(tmp_path / "nope" / "list")):
        with pytest.raises(UsageError, match=r"--labels .*: .* not found"):
            parse_label_spec(text)
    with pytest.raises(UsageError, match="is a folder"):
        parse_label_spec(str(tmp_path))
    with pytest.raises(UsageError, match="expected a percentage"):
        parse_label_spec("lots")


def test_label_list_round_trips_file_names_that_are_not_utf8(tmp_path):
    # issue 11 item 12: a file name with invalid UTF-8 bytes raised UnicodeEncodeError writing labels.txt
    import os

    from simclr_cli.data.sources.images import FileListSource

    names = [b"\xff.png", b"caf\xe9.png", b"plain.png", b"other.png"]
    files = [os.fsdecode(b"/data/" + c + b"/" + n) for c, n in zip((b"a", b"a", b"b", b"b"), names)]
    source = FileListSource(files, [0, 0, 1, 1], ["a", "b"], "odd:train")
    out = tmp_path / "labels.txt"
    write_label_list(out, source, [0, 1, 2])
    assert out.read_bytes() == b"\xff.png\ncaf\xe9.png\nplain.png\n"  # the names' own bytes
    assert select_labeled(source, parse_label_spec(str(out)), seed=0) == [0, 1, 2]


def test_an_empty_labels_value_says_it_is_empty():
    """Review: `--labels ""` was read as the current folder ('. is a folder')."""
    from simclr_cli.data.sources.subsets import parse_label_spec
    from simclr_cli.errors import UsageError

    with pytest.raises(UsageError, match=r"--labels is empty; give a percentage \(10%\), N-per-class"):
        parse_label_spec("")
