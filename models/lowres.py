"""Low-resolution forms of ImageNet architectures, for 32-64 px inputs.

The ImageNet stems downsample 4x (stride-2 conv + max-pool) before the first block,
which leaves a 64 px Tiny-ImageNet image 2x2 pixels wide by the last stage. The usual
fix (He et al. 2016, CIFAR section; the Tiny-ImageNet baselines of CS231n) is a 3x3
stride-1 stem and no stem pooling; each function below applies it to one family.
"""
from __future__ import annotations

from torch import nn


def _stem_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 conv with the same channels as the ImageNet stem conv."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)


def resnet(model: nn.Module) -> nn.Module:
    """torchvision ResNet / ResNeXt / Wide ResNet: 3x3 stride-1 stem, no max-pool."""
    model.conv1 = _stem_conv(model.conv1)
    model.maxpool = nn.Identity()
    return model


def densenet(model: nn.Module) -> nn.Module:
    model.features.conv0 = _stem_conv(model.features.conv0)
    model.features.pool0 = nn.Identity()
    return model


def vgg(model: nn.Module) -> nn.Module:
    """VGG keeps its 3x3 convs; the 7x7x512 -> 4096 head (100M parameters, sized for
    224 px) becomes a global-pooled 512 -> 512 -> classes head, as in CIFAR VGGs."""
    num_classes = model.classifier[-1].out_features
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
    )
    return model


def googlenet(model: nn.Module) -> nn.Module:
    model.conv1.conv = _stem_conv(model.conv1.conv)
    model.maxpool1 = nn.Identity()
    model.maxpool2 = nn.Identity()
    return model


def inception_v3(model: nn.Module) -> nn.Module:
    """Stride-1 first conv and no stem pools: 64 px reaches Mixed_7c at 13x13."""
    model.Conv2d_1a_3x3.conv.stride = (1, 1)
    model.maxpool1 = nn.Identity()
    model.maxpool2 = nn.Identity()
    return model


def timm_inception(model: nn.Module) -> nn.Module:
    """timm Inception-v4 / Inception-ResNet-v2: stride-1 first conv, padded so that the
    unpadded reductions still leave a spatial map at 64 px."""
    first = model.features[0].conv if hasattr(model, "features") else model.conv2d_1a.conv
    first.stride = (1, 1)
    first.padding = (1, 1)
    return model
