"""CIFAR ResNet-8/20/32/44/56/110 (He et al. 2016, option-A shortcuts) as in the BCGD authors' code.

Layout (BCGD.md §4): stem conv3x3(3->16)-BN-act; three stages of ``n = (depth-2)/6`` basic blocks with
16/32/64 channels and strides 1/2/2; each block is conv-BN-act-conv-BN, + shortcut, then act; head
global average pool + Linear(64 -> classes). Option A shortcut: stride-2 subsampling and zero channel
padding appended after the input's channels, as the authors' ``DownsampleA`` (``torch.cat((x, x.mul(0)), 1)``),
so the shortcut has no parameters (ResNet-20 has 0.27M parameters). ``shortcut_pad="symmetric"`` (half the
zeros before, half after) is qlight's earlier placement; checkpoints saved without the setting use it.

The block's two activations are by default ONE module (``act2 is act1``): the authors share one
activation resolution alpha per block, and ``qlight.quant.quantize_model`` keeps that sharing when it
swaps the ReLU for a quantized activation. ``share_block_act=False`` gives each its own module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from qlight.models.registry import register_model

#: where option-A shortcuts put the zero channels: ``after`` the input's (the BCGD authors' ``DownsampleA``:
#: ``torch.cat((x, x.mul(0)), 1)``) or half before and half after (``symmetric``, qlight before 0.2; checkpoints
#: without the setting were trained with it)
SHORTCUT_PADS = ("after", "symmetric")


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad the extra channels (``pad``: see above)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, pad: str = "after") -> None:
        super().__init__()
        if pad not in SHORTCUT_PADS:
            raise ValueError(f"shortcut_pad={pad!r} is not supported; valid: {list(SHORTCUT_PADS)}")
        self.stride = stride
        self.extra = out_channels - in_channels
        self.pad = pad

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            before = self.extra // 2 if self.pad == "symmetric" else 0
            x = F.pad(x, (0, 0, 0, 0, before, self.extra - before))
        return x

    @override
    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.extra}, pad={self.pad!r}"


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN (+ shortcut) -> act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, share_act: bool, pad: str = "after") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = self.act1 if share_act else nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride, pad)
        else:
            self.shortcut = nn.Identity()

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n+2`` with option-A shortcuts (``shortcut_pad``: :data:`SHORTCUT_PADS`)."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after"
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not a CIFAR ResNet depth; valid: 6n+2, e.g. 20, 32, 44, 56, 110")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_ch = 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1, share_block_act, shortcut_pad))
                in_ch = out_ch
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_like_bcgd(self)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def init_like_bcgd(model: nn.Module) -> None:
    """The authors' init: conv N(0, 2/(k^2 C_out)), BN gamma=1 beta=0, Linear Kaiming-normal, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("resnet8")
def resnet8(num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after") -> CifarResNet:
    """CIFAR ResNet-8 (one block per stage; a small stand-in for smoke tests and benchmarks)."""
    return CifarResNet(8, num_classes, share_block_act, shortcut_pad)


@register_model("resnet20")
def resnet20(num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after") -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters), the BCGD recipes' network."""
    return CifarResNet(20, num_classes, share_block_act, shortcut_pad)


@register_model("resnet32")
def resnet32(num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after") -> CifarResNet:
    """CIFAR ResNet-32."""
    return CifarResNet(32, num_classes, share_block_act, shortcut_pad)


@register_model("resnet44")
def resnet44(num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after") -> CifarResNet:
    """CIFAR ResNet-44."""
    return CifarResNet(44, num_classes, share_block_act, shortcut_pad)


@register_model("resnet56")
def resnet56(num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after") -> CifarResNet:
    """CIFAR ResNet-56."""
    return CifarResNet(56, num_classes, share_block_act, shortcut_pad)


@register_model("resnet110")
def resnet110(num_classes: int = 10, share_block_act: bool = True, shortcut_pad: str = "after") -> CifarResNet:
    """CIFAR ResNet-110."""
    return CifarResNet(110, num_classes, share_block_act, shortcut_pad)
