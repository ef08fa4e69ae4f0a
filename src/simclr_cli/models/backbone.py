"""Encoder f: any timm model with its classifier removed, plus the CIFAR stem for ResNets."""

from __future__ import annotations

import timm
import torch
from torch import nn

from simclr_cli.errors import UsageError


def create_backbone(name: str, *, cifar_stem: bool = False, pretrained: bool = False,
                    image_size: int | None = None, where: str = "model.backbone") -> nn.Module:
    """``timm.create_model(name, num_classes=0)``; h = model(x) is the pooled feature, ``model.num_features`` wide.

    Args:
        name: any timm model name.
        cifar_stem: apply :func:`apply_cifar_stem` (App. B.9).
        pretrained: load timm's pretrained weights (downloads); off by default.
        image_size: the side of the square images it will see. A model built for one input size (timm's
            ``pretrained_cfg.fixed_input_size``: ViT, Swin, ...) is built for this size where it takes an
            ``img_size`` argument (position embeddings sized for it), and tried on one image of that size: one
            that cannot take it is a :class:`RecipeError` (exit 2) now, before any run folder is written, not
            an ``AssertionError`` at the first step.
        where: the recipe key (or option) that named the model, for the error.
    """
    check_backbone(name)
    fixed = fixed_input_size(name)
    model = None
    if image_size and fixed:
        try:
            model = timm.create_model(name, num_classes=0, pretrained=pretrained, img_size=image_size)
        except TypeError:  # no img_size argument: built for its one size, checked below
            model = None
        except Exception as e:  # noqa: BLE001 - timm asserts or raises on a size it cannot build for
            raise _size_error(name, image_size, where, e) from None
    if model is None:
        model = timm.create_model(name, num_classes=0, pretrained=pretrained)
    if cifar_stem:
        apply_cifar_stem(model, name)
    if image_size and fixed:
        check_input_size(model, name, image_size, where)
    return guard_padded_convs(model)


def fixed_input_size(name: str) -> bool:
    """Whether timm builds ``name`` for one input size (``pretrained_cfg.fixed_input_size``: ViT, Swin, ...)."""
    return bool(getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False))


def _size_error(name: str, image_size: int, where: str, e: BaseException):
    from simclr_cli.errors import RecipeError

    native = getattr(timm.models.get_pretrained_cfg(name), "input_size", None)
    size = f"{native[-1]} px (its native size)" if native else "the size it was built for"
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RecipeError(f"{where}: '{name}' takes images of a fixed size and cannot take data.image_size={image_size} "
                       f"({detail}); set data.image_size to a size it takes, e.g. {size}, or choose another backbone")


@torch.no_grad()
def check_input_size(model: nn.Module, name: str, image_size: int, where: str = "model.backbone") -> None:
    """Run ``model`` once on a (1, 3, S, S) zero image (eval mode, restored after); a :class:`RecipeError` naming
    the size when it cannot take it."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:  # noqa: BLE001 - AssertionError, RuntimeError: shapes the model cannot take
        raise _size_error(name, image_size, where, e) from None
    finally:
        model.train(was_training)


class PaddedSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs in float32 under CPU bf16 autocast when its input is smaller than its kernel.

    oneDNN's bf16 weight-gradient kernel on CPU returns garbage (values up to 1e37, or inf) for a
    kernel larger than its input (e.g. a 3x3 stride-2 conv on a 1x1 map, the first conv of a
    ResNet's last stage at 16 px) when it runs on 2 or more threads. Such a conv is almost all
    padding and costs next to nothing, so it runs in float32 and returns the autocast dtype.
    Same parameters and state_dict keys as ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and (x.shape[-2] < self.kernel_size[0] or x.shape[-1] < self.kernel_size[1])):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).to(torch.get_autocast_dtype("cpu"))
        return super().forward(x)


def guard_padded_convs(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv2d`` of ``model`` a :class:`PaddedSafeConv2d`, in place (nothing else changes)."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PaddedSafeConv2d
    return model


def check_backbone(name: str, where: str = "model.backbone") -> None:
    """Raise a one-line :class:`UsageError` (with the closest timm name) when ``name`` is not a timm model;
    ``where`` says where the name came from (the key, or the file or ``--set`` and the key)."""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"{where}: '{name}' is not a timm model{hint}; see timm.list_models()")


def apply_cifar_stem(model: nn.Module, name: str = "") -> nn.Module:
    """CIFAR variant of a ResNet stem: 3x3 stride-1 first conv without bias, and no max-pool.

    A plain stem (``conv1`` is a Conv2d) gets a new 3x3 conv; a deep stem
    (``conv1`` is a Sequential of 3x3 convs, e.g. resnet18d) keeps its convs with
    the first one's stride set to 1. Works in place and returns the model.
    """
    conv1 = getattr(model, "conv1", None)
    if conv1 is None or not hasattr(model, "maxpool"):
        raise UsageError(f"model.cifar_stem is for ResNet-family backbones (conv1 + maxpool); '{name}' has none")
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = PaddedSafeConv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1,
                                       bias=False)
    elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        conv1[0].stride = (1, 1)
    else:
        raise UsageError(f"model.cifar_stem: cannot adapt the stem of '{name}'")
    model.maxpool = nn.Identity()
    return model

