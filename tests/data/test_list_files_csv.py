"""List files read as CSV by the csv module (issue 19 items 17 and 18): quoted paths holding a newline, the CSV
that ``simclr embed`` writes read back as a list, and paths listed twice."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from simclr_cli.data.listing.lists import read_file_list


def test_the_csv_that_embed_writes_reads_back_as_a_file_list_newlines_included(tiny_recipe_file, tmp_path):
    from simclr_cli.embed import embed
    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ["a.png", "two\nlines.png", "c, d.png"]
    for i, name in enumerate(names):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(folder / name)
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.max_steps=1"]), run,
                 show_progress=False)
    table = embed(run, str(folder), out=tmp_path / "h.npy").table
    assert "two\nlines.png" in table.read_text()  # the newline is written inside a quoted cell
    listed = read_file_list(table, warn=lambda s: None)
    with open(table, newline="") as f:
        expected = [row["path"] for row in csv.DictReader(f)]
    assert sorted(listed.files) == sorted(str(folder / n) for n in names) and list(listed.files) == expected


def test_a_quoted_path_with_a_newline_and_a_label(tmp_path):
    (tmp_path / "x\ny.png").write_bytes(b"")
    (tmp_path / "z.png").write_bytes(b"")
    with open(tmp_path / "l.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], ["x\ny.png", "cat"], ["z.png", "dog"]])
    src = read_file_list(tmp_path / "l.csv")
    assert list(src.files) == [str(tmp_path / "x\ny.png"), str(tmp_path / "z.png")]
    assert list(src.labels) == [0, 1] and src.classes == ["cat", "dog"]


def test_a_path_listed_twice_is_warned_about(tmp_path):
    """Item 18: duplicate paths were accepted without a word (each counts as an image of its own)."""
    for n in ("a.png", "b.png"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "l.txt").write_text("a.png\nb.png\n./a.png\n")
    said = []
    src = read_file_list(tmp_path / "l.txt", warn=said.append)
    assert len(src.files) == 3
    assert said and said[0].startswith(f"warning: {tmp_path / 'l.txt'}: 1 path(s) listed more than once") and "'./a.png'" in said[0]
    (tmp_path / "ok.txt").write_text("a.png\nb.png\n")
    said.clear()
    read_file_list(tmp_path / "ok.txt", warn=said.append)
    assert said == []
