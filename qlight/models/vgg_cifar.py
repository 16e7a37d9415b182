"""CIFAR VGG-11 of the BCGD code (BCGD.md §4).

cfg [64,M,128,M,256,256,M,512,512,M,512,512,M]; every conv is 3x3 pad 1 WITH bias, then BN, then
the activation; classifier is a single Linear(512 -> classes); no dropout, no extra FC layers.
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from qlight.models.registry import register_model
from qlight.models.resnet_cifar import init_like_bcgd

VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class CifarVGG(nn.Module):
    """VGG feature stack for 32x32 inputs followed by one linear classifier."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_like_bcgd(self)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg11")
def vgg11(num_classes: int = 10) -> CifarVGG:
    """CIFAR VGG-11 with BN (BCGD code)."""
    return CifarVGG(VGG11_CFG, num_classes)
