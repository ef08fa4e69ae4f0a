"""Resume state survives a process killed in the middle of a save (torn writes)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from simclr_cli.checkpoints import complete_states, has_state, load_state, save_state

SCRIPT = textwrap.dedent(
    """
    import os, sys, pathlib, torch
    from torch import nn
    import simclr_cli.checkpoints as ck

    folder, where = pathlib.Path(sys.argv[1]), sys.argv[2]
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if where == "optimizer":  # die half-way through writing the optimizer file
        real = ck.atomic_write_bytes
        def torn(path, data):
            if path.name == "optimizer.pt":
                path.write_bytes(data[: len(data) // 2])
                os._exit(9)
            real(path, data)
        ck.atomic_write_bytes = torn
    if where == "rename":  # die with the new state complete but not yet moved into place
        def rename(self, target):
            os._exit(9)
        pathlib.Path.rename = rename
    if where == "prune":  # die after the new state is in place, before old ones are removed
        def rmtree(path, ignore_errors=False):
            if pathlib.Path(path).is_dir() and not str(path).endswith(".tmp"):
                os._exit(9)
        ck.shutil.rmtree = rmtree
    ck.save_state(folder, model, opt, {"step": 2}, keep=1)
    """
)


@pytest.mark.parametrize("where, newest", [("optimizer", 1), ("rename", 1), ("prune", 2)])
def test_kill_during_save_keeps_a_complete_state(tmp_path, where, newest):
    folder = tmp_path / "state"
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    save_state(folder, model, opt, {"step": 1})
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), where], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert has_state(folder)
    fresh = nn.Linear(3, 2)
    counters = load_state(folder, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    assert counters["step"] == newest
    assert torch.equal(fresh.weight, torch.full((2, 3), float(newest)))
    # the next save after the crash works and replaces it
    save_state(folder, model, opt, {"step": 3}, keep=2)
    assert load_state(folder, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))["step"] == 3
    assert [p.name for p in complete_states(folder)] == [f"step-{newest:09d}", "step-000000003"]


def test_keep_newest_k_states(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        save_state(tmp_path / "s", model, opt, {"step": step}, keep=3)
    assert [p.name for p in complete_states(tmp_path / "s")] == [f"step-{i:09d}" for i in (3, 4, 5)]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from simclr_cli.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_disk_full_during_a_save_names_the_file_and_keeps_the_last_state(tmp_path, monkeypatch):
    # issue 11 item 12: ENOSPC was a raw OSError (exit 1 with a traceback-ish line) and left step-N.tmp behind
    import errno
    import os

    from simclr_cli.checkpoints import latest_state
    from simclr_cli.errors import DiskFull

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = save_state(tmp_path, model, opt, {"step": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as e:
        save_state(tmp_path, model, opt, {"step": 2})
    msg = str(e.value)
    assert "step-000000002.tmp/model.safetensors" in msg and "no space left on device" in msg and "intact" in msg
    assert e.value.exit_code == 1 and "\n" not in msg
    assert latest_state(tmp_path) == first and [p.name for p in tmp_path.iterdir()] == [first.name]
