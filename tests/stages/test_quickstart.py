"""The bundled quickstart, end to end through the CLI: SimCLR must visibly learn."""

import json

from typer.testing import CliRunner

from simclr_cli.cli import app


def test_quickstart_learns_above_random_init(tmp_path):
    r = CliRunner().invoke(app, ["pretrain", "quickstart", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "q" / "pretrain" / "summary.json").read_text())
    # knn_top1_init is the same kNN protocol on the random-init encoder (step 0, same seed and data).
    assert summary["knn_top1"] > summary["knn_top1_init"] + 10, summary
