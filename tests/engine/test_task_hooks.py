"""The Task hooks: the trainer and the loop call each one by name, on every task (issue 20, part 3)."""

from __future__ import annotations

import torch
from torch import nn

from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.engine.tasks import Task
from simclr_cli.objectives import FitInfo
from tests.engine.test_loop_data import _Indexed  # the indexed dataset the loop's tests share


class _Hooked(Task):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.calls: list[tuple] = []

    def on_fit_start(self, info: FitInfo) -> None:
        self.calls.append(("on_fit_start", info))

    def prepare_batch(self, batch: dict) -> dict:
        self.calls.append(("prepare_batch", len(batch["x"])))
        return {**batch, "x": batch["x"] * 0}  # what the loop trains on is what this returns

    def forward(self, batch):
        return {"loss": (self.w * batch["x"] + self.w).pow(2).mean()}

    def after_step(self, step: int) -> None:
        self.calls.append(("after_step", step, float(self.w.detach())))

    def warning(self, record: dict[str, float]) -> str | None:
        self.calls.append(("warning", record["step"]))
        return None


def test_every_hook_is_called_in_order(tmp_path):
    task = _Hooked()
    spec = FitSpec(epochs=2, batch_size=4, lr=0.1, log_every=3)
    trained, result, _ = fit(make_accelerator("no"), task, _Indexed(8), spec, stage="test",
                             metrics_path=tmp_path / "m.jsonl", show_progress=False, state_dir=None)
    calls = trained.calls
    assert result.step == 4
    assert calls[0] == ("on_fit_start", FitInfo(total_steps=4, steps_per_epoch=2, world_size=1, start_step=0))
    assert [c[0] for c in calls].count("on_fit_start") == 1
    assert [c[1] for c in calls if c[0] == "prepare_batch"] == [4, 4, 4, 4]
    steps = [c for c in calls if c[0] == "after_step"]
    assert [c[1] for c in steps] == [1, 2, 3, 4]
    # after the optimizer update: the weight it sees has moved (loss (w x 0 + w)^2 pulls w towards 0)
    assert all(w < 1.0 for *_, w in steps) and steps[0][2] > steps[-1][2]
    assert [c[1] for c in calls if c[0] == "warning"] == [2, 3, 4]  # logged: end of epoch 1, step 3, the last
