"""The CIFAR model zoo: sizes, parameter counts and structure the quantizers rely on."""

import pytest
import torch
from torch import nn

from qlight.models import build_model, list_models
from qlight.models.resnet_cifar import ShortcutA


@pytest.mark.parametrize(
    ("name", "params"),
    # He et al. 2016 Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M; VGG-11 with BN and a 512->10 head
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018),
     ("resnet110", 1_727_962), ("vgg11", 9_231_114)],
)
def test_parameter_counts(name: str, params: int) -> None:
    model = build_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar100_head() -> None:
    assert build_model("resnet20", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_resnet_block_shares_activation_by_default() -> None:
    block = build_model("resnet20").layer1[0]
    assert block.act2 is block.act1
    separate = build_model("resnet20", share_block_act=False).layer1[0]
    assert separate.act2 is not separate.act1


def test_resnet20_structure_matches_bcgd_code() -> None:
    model = build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)  # 1 stem + 3 stages x 3 blocks x 2
    assert [type(m) for m in model.modules()].count(ShortcutA) == 2  # the two downsampling blocks


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    """Zeros after the input's channels by default (the authors' DownsampleA); symmetric as an option."""
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and y[:, 16:].abs().sum() == 0
    y = ShortcutA(16, 32, stride=2, pad="symmetric")(x)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_vgg11_layout() -> None:
    model = build_model("vgg11")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.bias is not None for c in convs)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet20") as err:
        build_model("resnet21")
    assert "resnet21" in str(err.value)
    with pytest.raises(ValueError, match="depth=21"):
        from qlight.models.resnet_cifar import CifarResNet

        CifarResNet(21)


def test_torchvision_models_build_without_download() -> None:
    model = build_model("torchvision.resnet18", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "resnet20" in list_models()
