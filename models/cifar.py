"""Small networks designed for 32 px images, as published for CIFAR.

They sit beside the ImageNet zoo for members that must train on a laptop's CPUs: a
ResNet-20 has 0.27M parameters and 41 MFLOPs at 32 px (the low-res ResNet-18: 11M and
0.56 GFLOPs). No library we depend on ships them (torchvision and timm hold ImageNet
networks only), so they are written here, each following its paper.

- ResNet-20/32/56: He et al. 2016, "Deep Residual Learning", section 4.2: a 3x3 stem of
  16 channels, three stages of n basic blocks (16, 32, 64 channels, 6n+2 layers), option
  A shortcuts (stride-2 subsampling and zero-padded channels: no extra parameters).
- WRN-16-k: Zagoruyko & Komodakis 2016, "Wide Residual Networks": pre-activation blocks,
  widths 16k, 32k, 64k, (16-4)/6 = 2 blocks per stage, 1x1 projections where the shape
  changes.
- VGG-8: the VGG pattern (Simonyan & Zisserman 2015: stacks of 3x3 convs, 2x2 max-pools,
  batch norm as in vgg*_bn) cut to six convs of 32-128 channels and a global-pooled
  two-layer head, the size CIFAR tutorials use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init(model: nn.Module) -> nn.Module:
    """He (fan-out) init for convs, as both papers' reference code does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --- ResNet-20/32/56 ---------------------------------------------------------------------
class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample, then zero-pad the new channels (He et al. 2016, 3.3)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        blocks, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(_Basic(cin, width, 2 if i and not j else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- WRN-16-k ----------------------------------------------------------------------------
class _PreAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride > 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # The projection reads the activated input, as in the authors' code.
        short = self.proj(o) if self.proj is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return out + short


class WideResNet(nn.Module):
    def __init__(self, depth: int, k: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for i, width in enumerate((16 * k, 32 * k, 64 * k)):
            for j in range(n):
                blocks.append(_PreAct(cin, width, 2 if i and not j else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- VGG-8 -------------------------------------------------------------------------------
def vgg8(*, num_classes: int) -> nn.Module:
    layers, cin = [], 3
    for v in (32, 32, "M", 64, 64, "M", 128, 128, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        cin = v
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 256), nn.ReLU(inplace=True),
            nn.Dropout(0.3), nn.Linear(256, num_classes)]
    return _init(nn.Sequential(*layers, *head))


def resnet(depth: int):
    return lambda *, num_classes: CifarResNet(depth, num_classes)


def wide_resnet(depth: int, k: int):
    return lambda *, num_classes: WideResNet(depth, k, num_classes)
