import pytest
"""The bundled quickstart, end to end through the CLI: SimCLR must visibly learn, and the
evaluation stages must show it against the random-init baseline."""

import json

from typer.testing import CliRunner

from simclr_cli.cli import app


def _summary(path):
    return json.loads(path.read_text())


@pytest.mark.end_to_end
def test_quickstart_learns_and_beats_random_init_downstream(tmp_path):
    runner = CliRunner()
    q = tmp_path / "q"
    r = runner.invoke(app, ["pretrain", "quickstart", "--out", str(q)])
    assert r.exit_code == 0, r.output
    summary = _summary(q / "pretrain" / "summary.json")
    # knn_top1_init is the same kNN protocol on the random-init encoder (step 0, same seed and data).
    assert summary["knn_top1"] > summary["knn_top1_init"] + 10, summary

    for args in (["linear-eval", str(q)], ["linear-eval", str(q), "--init", "random"],
                 ["finetune", str(q), "--labels", "10%"], ["finetune", str(q), "--labels", "10%", "--init", "random"]):
        r = runner.invoke(app, [*args, "-q"])
        assert r.exit_code == 0, (args, r.output)
    lin, lin0 = _summary(q / "linear_eval" / "summary.json"), _summary(q / "random_init" / "linear_eval" / "summary.json")
    ft, ft0 = _summary(q / "finetune" / "summary.json"), _summary(q / "random_init" / "finetune" / "summary.json")
    assert lin["top1"] > lin0["top1"] + 10, (lin, lin0)
    assert ft["top1"] > ft0["top1"] + 5, (ft, ft0)
    assert ft["labeled_images"] == ft0["labeled_images"] and ft["steps"] == ft0["steps"]  # the same budget
