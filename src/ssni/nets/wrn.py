"""WideResNet for 32x32 images (Zagoruyko & Komodakis 2016), in the pre-activation variant of
TRADES that RobustBench's ``WideResNet`` uses.

Written from the architecture's description. State-dict keys match RobustBench's class
(``conv1``, ``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``), so
RobustBench's ``Standard`` WRN-28-10 and DiffPure's WRN-70-16 (same class, depth 70, width 16,
dropout 0.3, CIFAR-10 mean/std normalisation inside) load with ``strict=True``.

Call: ``logits = net(x)`` with ``x`` ``(B, 3, 32, 32)`` in [0, 1]; returns ``(B, num_classes)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WideResNet", "wrn_28_10", "wrn_70_16", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class _BasicBlock(nn.Module):
    """Pre-activation block. A width-changing block pre-activates ``x`` itself (both branches
    see ``relu(bn1(x))``, the shortcut is a strided 1x1 conv); otherwise the identity shortcut
    adds the raw ``x``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, 1, stride=stride, padding=0, bias=False
            )
        self.dropout = float(dropout)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return shortcut + out


class _Stage(nn.Module):
    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                _BasicBlock(in_planes if i == 0 else out_planes, out_planes,
                            stride if i == 0 else 1, dropout)
                for i in range(n)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for CIFAR-size inputs.

    Args:
        depth: total depth; ``(depth - 4) / 6`` blocks per stage (28 -> 4).
        widen_factor: stage widths ``16k, 32k, 64k``.
        num_classes: logits.
        dropout: dropout between the two convs of each block (train mode only).
        bias_last: the final linear layer has a bias.
        sub_block1: create RobustBench's unused extra first stage (only for key compatibility).
        mean, std: optional per-channel input normalisation ``(x - mean) / std`` applied
            inside (non-persistent buffers, not part of the state_dict); ``None``: none.
    """

    def __init__(
        self,
        *,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        bias_last: bool = True,
        sub_block1: bool = False,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth - 4 must be divisible by 6, got depth={depth}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Stage(n, widths[0], widths[1], 1, dropout)
        if sub_block1:
            self.sub_block1 = _Stage(n, widths[0], widths[1], 1, dropout)
        self.block2 = _Stage(n, widths[1], widths[2], 2, dropout)
        self.block3 = _Stage(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)
        self.normalize = mean is not None
        if mean is not None and std is not None:
            self.register_buffer(
                "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
            )
            self.register_buffer(
                "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
            )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, 3, 32, 32)`` in [0, 1] -> logits ``(B, num_classes)``."""
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.flatten(1))


def wrn_28_10(**overrides) -> WideResNet:
    """RobustBench CIFAR-10 ``Standard``: WRN-28-10, no normalisation, inputs in [0, 1]."""
    kwargs = dict(depth=28, widen_factor=10)
    kwargs.update(overrides)
    return WideResNet(**kwargs)


def wrn_70_16(**overrides) -> WideResNet:
    """DiffPure's CIFAR-10 WRN-70-16 (``wrn-70-16-dropout``): dropout 0.3, CIFAR-10 mean/std
    normalisation inside, inputs in [0, 1]."""
    kwargs = dict(depth=70, widen_factor=16, dropout=0.3, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    kwargs.update(overrides)
    return WideResNet(**kwargs)
