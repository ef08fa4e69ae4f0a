"""The data side of the shared loop: every image seen per epoch, unreadable images counted once each."""

import torch
from torch import nn
from torch.utils.data import Dataset

from simclr_cli.engine.fit import FitSpec, fit
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.engine.tasks import Task


class _Indexed(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        epoch, i = key
        return {"x": torch.tensor([float(i)]), "index": i, "epoch": epoch, "bad": -1}


class _Recorder(Task):
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


def test_fit_stops_before_training_on_known_unreadable_images(tmp_path):
    # issue 11 item 5, supervised stages: a labeled subset of an in-memory folder knows its failures up front
    import numpy as np
    import pytest
    from PIL import Image

    from simclr_cli.data.pipeline.augment import SimCLRAugment
    from simclr_cli.data.pipeline.loaders import LabeledViews, SubsetSource, known_unreadable
    from simclr_cli.data.sources.images import ImageFolderSource, decode_in_memory
    from simclr_cli.errors import DataError
    from simclr_cli.recipe.schema import AugmentConfig

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    (tmp_path / "train" / "b" / "3.png").write_bytes(b"broken")
    mem = decode_in_memory(ImageFolderSource(tmp_path, "train"), "always", 1.0, say=lambda _: None)
    sub = SubsetSource(mem, [0, 8, 9])  # source index 8 is b/3.png
    assert known_unreadable(sub) == {1: known_unreadable(mem)[8]}
    views = LabeledViews(sub, SimCLRAugment(AugmentConfig(), 8, (0.5,) * 3, (0.5,) * 3), 0)
    task = _Recorder()
    with pytest.raises(DataError, match=r"^1 unreadable images, more than data.max_bad_fraction=0.1 of 3 .*before"):
        fit(make_accelerator("no"), task, views, FitSpec(epochs=1, batch_size=3, lr=0.01, max_bad_fraction=0.1),
            stage="test", metrics_path=tmp_path / "m.jsonl", show_progress=False, state_dir=None)
    assert task.seen == []
