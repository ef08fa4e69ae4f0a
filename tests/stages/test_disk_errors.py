"""A full disk or an unwritable output folder mid-run (issue 15, section 2): one line, exit 1, the size the state
needs, the last good state intact and loadable, and the printed resume command works once the cause is fixed."""

from __future__ import annotations

import errno
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from simclr_cli.checkpoints import latest_state, load_weights
from simclr_cli.cli import app

# 64 images, batch 16, one epoch: 4 steps, a state after every step.
QUICK = ["-q", "--set", "pretrain.knn_every=0", "--set", "pretrain.epochs=1", "--set", "pretrain.checkpoint_every=1"]


def _resume_hint(stderr: str) -> list[str]:
    marker = "resume with: "
    assert marker in stderr, stderr
    rest = stderr.split(marker, 1)[1]
    argv = shlex.split(rest[: rest.index("--resume") + len("--resume")])
    assert argv[0] == "simclr", argv
    return argv[1:]


@pytest.fixture
def reference(tiny_recipe_file, tmp_path):
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(tmp_path / "ref"), *QUICK])
    assert r.exit_code == 0, r.output
    return load_file(tmp_path / "ref" / "pretrain" / "model.safetensors")


def _check_failure_and_resume(r, out: Path, reason: str, reference) -> None:
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: cannot save the resume state of step 2"), line
    assert reason in line and re.search(r"the state needs \d+(\.\d)? (bytes|KiB|MiB|GiB);", line), line
    assert ("free at least that much space" if "space" in reason else "writable; then resume with") in line
    assert "the last complete state (step-000000001) is intact" in line
    state = out / "pretrain" / "state"
    assert latest_state(state).name == "step-000000001"
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]  # no debris
    tensors, _ = load_weights(latest_state(state) / "model.safetensors")  # loadable
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    hint = _resume_hint(line)
    r = CliRunner().invoke(app, hint)  # the printed command, verbatim
    assert r.exit_code == 0, r.output
    done = load_file(out / "pretrain" / "model.safetensors")
    assert done.keys() == reference.keys() and all(torch.equal(done[k], reference[k]) for k in done)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EACCES, "permission denied")])
def test_a_refused_state_write_keeps_the_last_state_and_says_what_it_needs(tiny_recipe_file, tmp_path, monkeypatch,
                                                                            reference, code, reason):
    import simclr_cli.checkpoints as checkpoints

    write = checkpoints.atomic_write_bytes

    def refusing(path, data):  # the writer of the step-2 state fails, as a full disk or a refusing folder would
        if Path(path).parent.name == "step-000000002.tmp" and Path(path).name == "optimizer.pt":
            raise OSError(code, os.strerror(code))
        return write(path, data)

    out = tmp_path / "my run"
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "atomic_write_bytes", refusing)
        r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK])
    _check_failure_and_resume(r, out, reason, reference)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="runs as root, which ignores folder permissions: a read-only folder stays writable "
                           "(the patched-writer test above covers the same path with EACCES)")
def test_state_folder_made_read_only_mid_run(tiny_recipe_file, tmp_path, monkeypatch, reference):
    import simclr_cli.engine.loop as loop

    save = loop.save_state
    out = tmp_path / "run"
    state = out / "pretrain" / "state"

    def save_then_lock(*a, **k):  # synchronised on the event: right after the first state is in place
        path = save(*a, **k)
        state.chmod(0o555)
        return path

    try:
        with monkeypatch.context() as m:
            m.setattr(loop, "save_state", save_then_lock)
            r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK])
    finally:
        state.chmod(0o755)
    _check_failure_and_resume(r, out, "permission denied", reference)
