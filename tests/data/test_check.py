"""``simclr data check``: sizes of real images."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.data.check import SplitReport


def test_size_stats_are_sizes_of_real_images():
    # issue 11 item 13: a 20000x2 and a 2x20000 image were reported as "max 20000x20000"
    rep = SplitReport("train", "x", 3, {}, 0, heights=[20000, 2, 10], widths=[2, 20000, 12])
    stats = rep.size_stats()
    real = {(20000, 2), (2, 20000), (10, 12)}
    assert {stats["smallest"], stats["median"], stats["largest"]} <= real
    assert stats["smallest"] == (10, 12) and stats["largest"] == (20000, 2)
    assert stats["height"] == (2, 20000) and stats["width"] == (2, 20000)


def test_data_check_prints_no_size_that_no_image_has(tmp_path):
    for c, shape in (("a", (20000, 2, 3)), ("b", (2, 20000, 3))):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(tmp_path / "d" / "train" / c / "x.png")
    r = CliRunner().invoke(app, ["data", "check", "quickstart", "--set", "data.dataset=imagefolder",
                                 "--set", f"data.root={tmp_path / 'd'}", "--set", "data.val_split="])
    assert r.exit_code == 0, r.output
    assert "20000x20000" not in r.stdout
    assert "smallest 2x20000" in r.stdout and "largest 20000x2" in r.stdout
    assert "heights 2..20000" in r.stdout and "widths 2..20000" in r.stdout
