import pytest
import timm
import torch
from torch import nn

from simclr_cli.errors import UsageError
from simclr_cli.models import build_simclr_model, create_backbone, projection_head
from simclr_cli.recipe.schema import ModelConfig


def test_cifar_stem_plain_resnet():
    m = create_backbone("resnet18", cifar_stem=True)
    assert isinstance(m.conv1, nn.Conv2d)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.bias is None
    assert isinstance(m.maxpool, nn.Identity)
    assert m.num_features == 512
    assert m.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8: only the stage strides remain


def test_cifar_stem_deep_stem_and_non_resnet():
    m = create_backbone("test_resnet", cifar_stem=True)
    assert m.conv1[0].stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    with pytest.raises(UsageError, match="ResNet"):
        create_backbone("test_vit", cifar_stem=True)


def test_unknown_backbone_suggests():
    with pytest.raises(UsageError, match="did you mean 'resnet18'"):
        create_backbone("resnet-18")


@pytest.mark.parametrize("layers, n_linear", [(0, 0), (1, 1), (2, 2), (3, 3)])
def test_projection_head_layers(layers, n_linear):
    head = projection_head(32, layers, hidden_dim=16, out_dim=8)
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == n_linear
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (3 if layers == 3 else 0)
    out = head.eval()(torch.randn(4, 32))
    assert out.shape == (4, 8 if layers else 32)


def test_simclr_model_returns_h_and_z():
    model = build_simclr_model(ModelConfig(backbone="test_resnet", proj_layers=2, proj_dim=16))
    h, z = model(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, timm.create_model("test_resnet", num_classes=0).num_features) and z.shape == (2, 16)
