"""The data side of the shared loop: every image seen per epoch, unreadable images counted once each."""

import torch
from torch import nn
from torch.utils.data import Dataset

from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.setup import make_accelerator


class _Indexed(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        epoch, i = key
        return {"x": torch.tensor([float(i)]), "index": i, "epoch": epoch, "bad": -1}


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen: list[tuple[int, list[int]]] = []

    def forward(self, batch):
        self.seen.append((int(batch["epoch"][0]), batch["index"].tolist()))
        return {"loss": (self.w * batch["x"]).pow(2).mean()}


def test_fit_sees_every_image_every_epoch(tmp_path):
    # issue 11 item 7: finetune ran floor(n/B) steps per epoch, never seeing the remainder
    task = _Recorder()
    spec = FitSpec(epochs=3, batch_size=4, lr=0.01, log_every=1)
    _, result, batch = fit(make_accelerator("no"), task, _Indexed(10), spec, stage="test",
                           metrics_path=tmp_path / "m.jsonl", show_progress=False, state_dir=None)
    assert batch == 4 and result.step == 3 * 3  # ceil(10 / 4) steps per epoch
    for epoch in range(3):
        batches = [ids for e, ids in task.seen if e == epoch]
        assert len(batches) == 3 and all(len(ids) == 4 for ids in batches)  # full batches
        assert {i for ids in batches for i in ids} == set(range(10))
