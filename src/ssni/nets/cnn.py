"""A small CNN classifier for grey-scale images in [0, 1].

``CNN(**kwargs)(x)``: ``x`` ``(B, C, H, W)`` in [0, 1] -> logits ``(B, num_classes)``.
Two stages of two 3x3 convolutions (BatchNorm, ReLU) each followed by 2x2 max-pooling, an adaptive
average pool to ``pool x pool`` and a two-layer head, so any input size of at least 4x4 works.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CNN"]


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class CNN(nn.Module):
    """Small convolutional classifier; see the module docstring.

    Args:
        in_channels: image channels.
        num_classes: number of logits.
        width: channels of the first stage (the second has ``2 * width``).
        hidden: width of the hidden fully connected layer.
        pool: spatial size after the adaptive average pool.
        dropout: dropout before the last layer.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        pool: int = 4,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(in_channels, w), _conv(w, w), nn.MaxPool2d(2),
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pool),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * pool * pool, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)`` in [0, 1] -> logits ``(B, num_classes)``."""
        return self.head(self.features(2.0 * x - 1.0))
