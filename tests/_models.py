"""Tiny models shared by tests."""

import torch
from torch import nn

import ssni


class TinyEpsNet(nn.Module):
    """A small convolutional epsilon network ``net(x, label)`` for gradient tests."""

    def __init__(self, channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, label):
        h = self.inp(x) + self.time(label[:, None] / 1000.0)[:, :, None, None]
        return self.out(torch.tanh(h))


class CountingScore(ssni.ScoreModel):
    """Wraps a score model and counts the rows it is called on."""

    def __init__(self, inner: ssni.ScoreModel) -> None:
        super().__init__(inner.schedule)
        self.inner = inner
        self.calls = 0
        self.rows = 0

    def eps(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner.eps(x, t)


class TinyClassifier(nn.Module):
    """Linear classifier on flattened images, deterministic weights from a seed."""

    def __init__(self, pixels: int = 64, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(pixels, classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(classes, pixels, generator=g) * 0.5)
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x.flatten(1))


def tiny_eps_model(seed: int = 0, channels: int = 1) -> ssni.EpsilonNetwork:
    torch.manual_seed(seed)
    return ssni.EpsilonNetwork(TinyEpsNet(channels), time_scale=1000.0)


def gaussian_images(n: int, mean: float = 0.0, std: float = 0.25, size: int = 8, seed: int = 0):
    """``(n, 1, size, size)`` images in [0, 1] whose model-space values are ~N(mean, std^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * std + mean
    return ((x.clamp(-1, 1) + 1) / 2).float()
