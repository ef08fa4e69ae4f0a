"""Resume state survives a process killed in the middle of a save (torn writes)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from simclr_cli.checkpoints import has_state, load_state, save_state

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
                tmp = path.with_name(".partial")
                tmp.write_bytes(data[: len(data) // 2])
                os._exit(9)
            real(path, data)
        ck.atomic_write_bytes = torn
    if where == "rename":  # die between moving the old state aside and moving the new one in
        real_rename = pathlib.Path.rename
        def rename(self, target):
            out = real_rename(self, target)
            if pathlib.Path(target).name.endswith(".old"):
                os._exit(9)
            return out
        pathlib.Path.rename = rename
    ck.save_state(folder, model, opt, {"step": 2})
    """
)


@pytest.mark.parametrize("where", ["optimizer", "rename"])
def test_kill_during_save_keeps_previous_state(tmp_path, where):
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
    assert counters["step"] == 1
    assert torch.equal(fresh.weight, torch.ones(2, 3))
    # the next save after the crash works and replaces it
    save_state(folder, model, opt, {"step": 3})
    assert load_state(folder, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))["step"] == 3
