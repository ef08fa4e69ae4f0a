"""Decoding fast enough for a GPU: reduced-size JPEG decoding on the CPU, batched JPEG decoding on the device.

* **Reduced-size decoding** (``data.decode_draft``). A JPEG much larger than the pipeline needs is decoded
  at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling (PIL's draft mode, :func:`read_image`), which skips
  most of the inverse DCT and colour conversion work. Evaluation decodes with the shorter side at least
  :data:`DRAFT_MARGIN` times the resize target. Training views draw their crop boxes on the full-size
  geometry first (the JPEG header gives the size, EXIF rotation applied), exactly as a full decode would,
  then decode at the largest reduction at which both boxes are still at least :data:`DRAFT_MARGIN` times
  the output size in both dimensions, and resample each view from its exact (fractional) box on the
  reduced image: the views stay a pure function of (seed, epoch, index) and differ from full decoding by
  resampling noise only (docs/performance.md has the measured differences).
* **Device decoding** (``data.decode = "gpu"``). The loader yields the encoded bytes and the view
  parameters; :class:`DeviceDecoder` decodes the whole batch with ``torchvision.io.decode_jpeg`` on the
  device (nvJPEG on CUDA), crops every view there and hands uint8 crops to the batched augmentation. An
  image the batch decoder rejects (PNG, CMYK, corrupt, ...) is made by the CPU path instead, per image.
  :func:`choose_decode` decides, for a run, whether it applies.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from simclr_cli.data.sources.images import EXIF_ORIENTATION, decode_opened, draft_factor
from simclr_cli.errors import RecipeError

# A crop box must stay at least this many times the output side (in both dimensions) on the reduced image.
# Below that the DCT-scaled pixels show through the final resize: 2 keeps training views within resampling
# noise of a full decode (measured in benchmarks/decode_speed.py; tests/data/test_decode.py checks it).
DRAFT_MARGIN = 2.0


def choose_decode(decode: str, batched: bool, device: torch.device, source: Any, progress: bool = True) -> str:
    """Where pretraining decodes: ``data.decode`` as it will run. 'gpu' needs the batched backend (a
    RecipeError otherwise), a CUDA device and encoded files (a source with ``raw``); without CUDA or files it
    falls back to 'cpu' with one line saying why (``progress``: print it, on the main process)."""
    if decode != "gpu":
        return decode
    if not batched:
        raise RecipeError("data.decode='gpu' needs augment.backend='batched' (the views are made on the device); "
                          "set augment.backend=batched or data.decode=cpu")
    why = ("no CUDA device" if device.type != "cuda" else
           "the images are not encoded files (in memory or a built-in dataset)" if not hasattr(source, "raw") else "")
    if why:
        if progress:
            print(f"data.decode='gpu': {why}; decoding on the CPU instead", file=sys.stderr, flush=True)
        return "cpu"
    return "gpu"


def header_size(raw: bytes) -> tuple[int, int, int]:
    """(height, width, EXIF orientation 1..8) of an encoded image: the size as it will be decoded, upright,
    so an orientation of 5 to 8 (a 90 degree turn) swaps the two. Reads the header only; raises like a
    decode on a file PIL cannot identify."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        return _upright_size(img)


def _upright_size(img) -> tuple[int, int, int]:
    """(height, width, EXIF orientation) of an opened PIL image as it will be decoded, upright."""
    w, h = img.size
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    orientation = orientation if orientation in range(1, 9) else 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return h, w, orientation


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded (C, H, W) image turned upright for its EXIF ``orientation``, as PIL's ``exif_transpose``
    does (torchvision's ``decode_jpeg`` ignores ``apply_exif_orientation`` on CUDA, so this runs on any device)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def decode_bytes(raw: bytes, min_side: int | None = None) -> torch.Tensor:
    """:func:`read_image` of encoded bytes (reduced to ``min_side`` like it), a plain RGB image returned as a
    (3, H, W) view of PIL's (H, W, 3) pixels: the same values without the transposing copy."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        return decode_opened(img, min_side=min_side, channels_last=True)[0]


def pick_reduction(crops: Sequence[tuple[int, int, int, int]], out: int, margin: float = DRAFT_MARGIN) -> int:
    """The largest reduction s in (8, 4, 2) such that every crop box ``(top, left, h, w)`` keeps
    ``h / s >= margin * out`` and ``w / s >= margin * out``; 1 when none does."""
    return draft_factor(min(min(c[2], c[3]) for c in crops), margin * out)


def decode_views(raw: bytes, draw: Callable[[int, int], Any], crops_of: Callable[[Any], Sequence[tuple]],
                 out: int, margin: float = DRAFT_MARGIN) -> tuple[Any, list[torch.Tensor]]:
    """Draw the views' parameters on ``raw``'s full-size geometry, then decode it as small as their crop
    boxes allow (see :func:`pick_reduction`) and cut the views: uint8 (3, out, out) each.

    ``draw(height, width)`` draws the parameters from the upright full size (read from the header, EXIF
    rotation applied, as :func:`header_size`); ``crops_of(drawn)`` gives their crop boxes. One open of the
    file serves both. Returns ``(drawn, views)``.

    At full size the views are ``TF.resized_crop`` (antialiased bilinear), the loader's usual path. On a
    reduced image the boxes are not whole pixels any more (``top / s``, ...): rounding them would shift a view
    by up to half a reduced pixel, several grey levels on textured images, so each view is resampled from its
    exact fractional box with PIL's antialiased bilinear resize (the filter torch's antialiased resize was
    written to match; 0.02 grey levels apart on full-size images).
    """
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        h, w, orientation = _upright_size(img)
        drawn = draw(h, w)
        crops = list(crops_of(drawn))
        s = pick_reduction(crops, out, margin) if img.format == "JPEG" else 1
        decoded, scale = decode_opened(img, min_side=min(h, w) // s if s > 1 else None, channels_last=True)
    if scale == 1:
        return drawn, crop_views(decoded, crops, out)
    # Reduced pixel j covers full pixels [j s, (j + 1) s) of the stored image; an axis that EXIF orientation
    # flips runs from the other end, so there the partial last block comes first: shift by what it lacks.
    flip_x, flip_y = _FLIPPED.get(orientation, (False, False))
    pad_y = decoded.shape[-2] * scale - h if flip_y else 0
    pad_x = decoded.shape[-1] * scale - w if flip_x else 0
    return drawn, [resized_crop_scaled(decoded, (t + pad_y, l + pad_x, ch, cw), scale, out)
                   for t, l, ch, cw in crops]


# EXIF orientation -> (upright x axis runs backwards on the stored image, upright y axis does): 2 mirror,
# 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise.
_FLIPPED = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True),
            8: (False, True)}


def decode_for_crops(raw: bytes, crops: Sequence[tuple[int, int, int, int]], out: int,
                     margin: float = DRAFT_MARGIN) -> list[torch.Tensor]:
    """:func:`decode_views` for crop boxes already drawn (full-size upright coordinates)."""
    return decode_views(raw, lambda h, w: crops, lambda c: c, out, margin)[1]


def crop_views(img: torch.Tensor, crops: Sequence[tuple[int, int, int, int]], size: int) -> list[torch.Tensor]:
    """Each crop box of ``img`` resized to ``size`` x ``size`` (antialiased), as the batched loader path does."""
    return [TF.resized_crop(img, *c, [size, size], antialias=True) for c in crops]


def resized_crop_scaled(img: torch.Tensor, crop: tuple[int, int, int, int], scale: int, out: int) -> torch.Tensor:
    """Full-size crop box ``crop`` of an image decoded at 1/``scale``, resized to ``out`` x ``out`` (uint8)."""
    if scale == 1:
        return TF.resized_crop(img, *crop, [out, out], antialias=True)
    from PIL import Image

    top, left, h, w = crop
    pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
    box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
    res = pil.resize((out, out), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(res).copy()).permute(2, 0, 1).contiguous()


class DeviceDecoder:
    """Turn a batch of encoded images and view parameters into cropped uint8 views on ``device``.

    The batch (from :class:`~simclr_cli.data.pipeline.loaders.ContrastiveViews` with ``decode="gpu"``) holds
    ``jpeg`` (a list of bytes), ``size`` (n, 3) full-size upright (height, width) and EXIF orientation,
    ``params1``/``params2`` and ``epoch``/``index``. The whole batch goes to
    ``torchvision.io.decode_jpeg(..., device=device)`` and each image is turned upright here
    (:func:`apply_orientation`); if the batch call fails the images are tried one by one, and an image that
    still fails (or decodes to another size than its header said) is made by the CPU path
    (``views.cpu_item``: exactly the item ``data.decode="cpu"`` gives, reduced-size with ``decode_draft``;
    :func:`read_image` reads PNG, CMYK, ..., and an unreadable file is skipped to the next readable one,
    counted in ``bad``/``bad_run`` like on the CPU path).

    Args:
        views: the dataset, for its output size and the per-image CPU path.
        device: where to decode (``cuda``; ``cpu`` runs the same path in tests).
    """

    def __init__(self, views, device: torch.device | str) -> None:
        self.views = views
        self.device = torch.device(device)
        self.fallbacks = 0  # images made by the CPU path (for tests and benchmarks)

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        def one(x: torch.Tensor) -> torch.Tensor | None:
            try:
                return decode_jpeg(x, mode=ImageReadMode.RGB, device=self.device)
            except Exception:  # noqa: BLE001 - rejected by the device decoder: the CPU path decodes it
                return None

        # torchvision's CUDA decoder runs on a stream of its own that is not ordered against the caller's: with
        # work still queued there it can write over memory that work reads (pytorch/vision PR 9606, seen on
        # H100). So nothing is left in flight on either side of it; one synchronization per batch.
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        # Not a JPEG at all (PNG, ...): left to the CPU path, so it does not fail the batch call for the others.
        jpeg = [k for k, x in enumerate(data) if x.numel() > 2 and int(x[0]) == 0xFF and int(x[1]) == 0xD8]
        out: list[torch.Tensor | None] = [None] * len(data)
        try:
            if jpeg:
                for k, img in zip(jpeg, decode_jpeg([data[k] for k in jpeg], mode=ImageReadMode.RGB,
                                                    device=self.device)):
                    out[k] = img
        except Exception:  # noqa: BLE001 - one bad image fails the whole batch call: decode one by one
            for k in jpeg:
                out[k] = one(data[k])
        if cuda:
            torch.cuda.synchronize(self.device)
        return out

    def __call__(self, batch: dict) -> dict:
        raws: list[bytes] = batch.pop("jpeg")
        sizes = batch.pop("size").tolist()
        epochs, indices = batch.pop("epoch").tolist(), batch["index"].tolist()
        size = self.views.augment.size
        data = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws]
        decoded = self._decode_all(data)
        v1, v2 = [], []
        for k, img in enumerate(decoded):
            if img is not None:
                img = apply_orientation(img, sizes[k][2])
            if img is not None and tuple(img.shape[-2:]) == tuple(sizes[k][:2]) and img.shape[0] == 3:
                p1, p2 = batch["params1"][k], batch["params2"][k]
                crops = [tuple(int(v) for v in p[:4].tolist()) for p in (p1, p2)]
                a, b = crop_views(img, crops, size)
            else:  # the CPU path for this image: same views as data.decode="cpu" would give
                self.fallbacks += 1
                item = self.views.cpu_item(epochs[k], indices[k])
                a, b = item["view1"].to(self.device), item["view2"].to(self.device)
                batch["params1"][k], batch["params2"][k] = item["params1"], item["params2"]
                for key in ("bad", "bad_run", "label"):
                    if key in batch:
                        batch[key][k] = item[key]
            v1.append(a)
            v2.append(b)
        batch["view1"], batch["view2"] = torch.stack(v1), torch.stack(v2)
        return batch
