"""ResNet for ImageNet (He et al. 2016), in the variant torchvision ships (stride on the 3x3
convolution of the bottleneck, "ResNet v1.5").

Written from the architecture's description. State-dict keys match torchvision's ``ResNet``
(``conv1``, ``bn1``, ``layer{1..4}.<i>.{conv1,bn1,conv2,bn2[,conv3,bn3]}``,
``layer{k}.0.downsample.{0,1}``, ``fc``), so torchvision's ``resnet50-0676ba61.pth`` and the
other ImageNet ResNet files load with ``strict=True`` without torchvision installed.

Call: ``logits = net(x)`` with ``x`` ``(B, 3, H, W)`` already normalised (the zoo folds the
ImageNet mean/std in); returns ``(B, num_classes)``.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = ["ResNet"]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _downsample(inplanes: int, outplanes: int, stride: int):
    if stride == 1 and inplanes == outplanes:
        return None
    conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
    return nn.Sequential(conv, _bn(outplanes))


class ResNet(nn.Module):
    """ImageNet ResNet with torchvision's layout.

    Args:
        block: ``"bottleneck"`` (ResNet-50/101/152) or ``"basic"`` (ResNet-18/34).
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: output logits.
        width: channels of the stem and of the first stage's blocks (64 in every published
            model; smaller values give small stand-ins with the same key names).
        width_per_group: bottleneck inner width per 64 planes (128 for wide_resnet50_2).
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width: int = 64,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        if block not in ("bottleneck", "basic"):
            raise ValueError(f"block must be 'bottleneck' or 'basic', got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"layers needs 4 stage lengths, got {tuple(layers)}")
        cls = _Bottleneck if block == "bottleneck" else _Basic
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for k, n in enumerate(layers):
            planes = width * 2**k
            blocks = []
            for i in range(int(n)):
                stride = 2 if (k > 0 and i == 0) else 1
                blocks.append(cls(inplanes, planes, stride, width_per_group))
                inplanes = planes * cls.expansion
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
