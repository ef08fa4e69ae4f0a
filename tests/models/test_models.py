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


@pytest.mark.parametrize("threads", [2, 4])
def test_bf16_weight_gradient_of_a_conv_larger_than_its_input_is_right(threads):
    """Issue 11 item 0: on CPU with >= 2 threads, oneDNN's bf16 weight gradient of a 3x3 stride-2 conv
    on a 1x1 map (a ResNet's layer4 at 16 px) was garbage (up to inf), and bf16 pretraining stopped
    at step 1-3. Backbone convs now run such a conv in float32 under autocast."""
    from simclr_cli.models import create_backbone

    backbone = create_backbone("test_resnet")
    conv = backbone.layer4[0].conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, conv.in_channels, 1, 1, generator=g)
    grad_out = torch.randn(32, conv.out_channels, 1, 1, generator=g)
    conv.weight.grad = None
    conv(x).backward(grad_out)
    ref = conv.weight.grad.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            conv.weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            assert out.dtype == torch.bfloat16
            out.float().backward(grad_out)
            assert torch.isfinite(conv.weight.grad).all()
            assert (conv.weight.grad - ref).abs().max() <= 1e-2 * ref.abs().max()
    finally:
        torch.set_num_threads(before)


def test_padded_conv_guard_keeps_state_dict_keys():
    from simclr_cli.models import create_backbone
    import timm

    ours = create_backbone("test_resnet")
    plain = timm.create_model("test_resnet", num_classes=0)
    assert list(ours.state_dict()) == list(plain.state_dict())


def test_v2_head_last_bn_has_no_learned_shift(tiny_recipe_file, tmp_path):
    """Issue 11 item 7: the reference's last head layer is BN with center=False (scale, no shift)."""
    from safetensors.torch import load_file

    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    head = projection_head(8, 3, 8, 4)
    last_bn = head[2][1]
    assert not last_bn.bias.requires_grad and last_bn.weight.requires_grad
    recipe = load_recipe(tiny_recipe_file, ["model.proj_layers=3", "pretrain.epochs=1", "pretrain.knn_every=0"])
    pretrain.run(recipe, tmp_path / "r", show_progress=False)
    weights = load_file(tmp_path / "r" / "pretrain" / "model.safetensors")
    assert torch.count_nonzero(weights["head.2.1.bias"]) == 0
    assert not torch.equal(weights["head.2.1.weight"], torch.ones_like(weights["head.2.1.weight"]))  # the scale trains
    # a checkpoint written with a learned shift still loads strictly
    state = head.state_dict()
    state["2.1.bias"] = torch.full_like(state["2.1.bias"], 0.5)
    head.load_state_dict(state, strict=True)
