"""Issue 22 item 2: a misspelt recipe name or --set key is refused (exit 2, "did you mean") before torch, timm
or accelerate are imported: what is imported when the error is raised is checked, not a clock."""

import subprocess
import sys

import pytest

# Runs the command in a fresh interpreter; at exit (after the error) it prints which heavy packages were loaded.
PROBE = """
import atexit, sys
heavy = ("torch", "timm", "accelerate", "torchvision")
atexit.register(lambda: sys.__stdout__.write("LOADED=" + ",".join(m for m in heavy if m in sys.modules) + "\\n"))
from simclr_cli.cli import main
sys.argv = ["simclr", *sys.argv[1:]]
main()
"""

CASES = [
    (["pretrain", "quickstrat"], "did you mean 'quickstart'"),
    (["pretrain", "quickstart", "--set", "pretrain.epoch=3"], "did you mean 'pretrain.epochs'"),
    (["linear-eval", "--set", "linear_eval.epoch=3"], "did you mean 'linear_eval.epochs'"),
    (["knn", "--set", "knn.kk=3"], "unknown key 'knn.kk'"),
    (["finetune", "--recipe", "quickstrat"], "did you mean 'quickstart'"),
    (["distill", "--set", "distil.alpha=0.5"], "did you mean 'distill'"),
    (["transfer", "--set", "transfer.mod=linear"], "did you mean 'transfer.mode'"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_typos_fail_before_torch_is_imported(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert "LOADED=\n" in p.stdout, p.stdout  # none of torch, timm, accelerate, torchvision
