"""Batched JPEG decoding on the GPU (issue 13, section 4): ``data.decode = "gpu"`` with nvJPEG.

Marked ``cuda``: skipped where ``torch.cuda.is_available()`` is False. The same path runs on the CPU in
tests/data/test_decode.py (``DeviceDecoder(views, "cpu")``); here the device is a real GPU, whose nvJPEG
output differs from libjpeg-turbo by rounding (IDCT and chroma upsampling), so views are compared within
a tolerance instead of exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from simclr_cli.data.pipeline.decode import DeviceDecoder
from simclr_cli.data.pipeline.loaders import ContrastiveViews
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import pretrain
from tests.data.test_decode import _aug, _folder, _jpeg, _mixed_blobs, _textured

pytestmark = pytest.mark.cuda


def test_gpu_decoding_matches_cpu_within_rounding_and_falls_back_per_image(tmp_path):
    blobs = _mixed_blobs()
    views = ContrastiveViews(_folder(tmp_path, blobs), _aug(), seed=7, batched=True, decode="gpu")
    decoder = DeviceDecoder(views, "cuda")
    idx = list(range(6))
    out = decoder(default_collate([views[(0, i)] for i in idx]))
    ref = default_collate([views.cpu_views(0, i) for i in idx])
    assert out["view1"].device.type == "cuda"
    for k in ("view1", "view2"):
        d = (out[k].cpu().float() - ref[k].float()).abs()
        assert d.mean() < 2.0, (k, float(d.mean()))
    assert out["bad"].tolist() == [-1, -1, -1, 3, -1, -1]
    assert decoder.fallbacks >= 2  # the PNG and the truncated JPEG at least
    again = DeviceDecoder(views, "cuda")(default_collate([views[(0, i)] for i in idx]))
    assert torch.equal(again["view1"], out["view1"])  # deterministic on the same device


def test_pretrain_with_gpu_decoding(tiny_recipe_file, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(16):
        (root / f"{i}.jpg").write_bytes(_jpeg(_textured(64, 48, i)))
    recipe = load_recipe(tiny_recipe_file, ["data.dataset='folder'", f"data.root='{root}'", "data.val_split=''",
                                            "data.decode='gpu'", "data.in_memory='never'", "pretrain.knn_every=0",
                                            "pretrain.epochs=1", "pretrain.batch_size=8"])
    summary = pretrain.run(recipe, tmp_path / "run", show_progress=False)
    assert summary is not None


def test_gpu_decoding_is_not_overwritten_by_work_queued_on_the_callers_stream(tmp_path):
    """torchvision's CUDA decoder uses a stream of its own (pytorch/vision PR 9606): the decoder synchronizes
    around it, so work still queued when a batch is decoded cannot corrupt the views."""
    blobs = [(f"{i}.jpg", _jpeg(_textured(320, 240, i))) for i in range(8)]
    views = ContrastiveViews(_folder(tmp_path, blobs), _aug(), seed=1, batched=True, decode="gpu")
    decoder = DeviceDecoder(views, "cuda")
    items = [views[(0, i)] for i in range(8)]
    ref = decoder(default_collate(items))["view1"].clone()
    for _ in range(20):
        x = torch.randn(4096, 4096, device="cuda")
        y = x @ x  # queued on the caller's stream; x and y are freed while it may still run
        del x, y
        assert torch.equal(decoder(default_collate(items))["view1"], ref)
