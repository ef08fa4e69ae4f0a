"""Regressions found reviewing issue 13 (unlabeled folders, lists, shards)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from simclr_cli.data.lists import read_file_list
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
