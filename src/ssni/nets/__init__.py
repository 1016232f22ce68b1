"""Network architectures, built from keyword arguments only, and their one registry.

``ARCHITECTURES`` maps the name stored in weight files and zoo entries to a constructor;
:func:`build_network` also accepts ``torchvision:<name>`` (optional dependency).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import nn

from .cnn import CNN as CNN
from .guided_unet import GuidedUNet as GuidedUNet
from .ncsnpp import NCSNpp as NCSNpp
from .resnet import ResNet as ResNet
from .unet import UNet as UNet
from .wrn import WideResNet as WideResNet
from .wrn import wrn_28_10 as wrn_28_10
from .wrn import wrn_70_16 as wrn_70_16

#: Architecture name -> constructor (keyword arguments only).
ARCHITECTURES: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "UNet": UNet,
        "CNN": CNN,
        "ncsnpp": NCSNpp,
        "guided_unet": GuidedUNet,
        "wide_resnet": WideResNet,
        "resnet": ResNet,
    }
)


def _torchvision_models(architecture: str) -> Any:
    try:
        import torchvision.models as tvm
    except ImportError as err:
        raise ImportError(
            f"{architecture} needs torchvision, which is optional: pip install "
            "'ssni[vision]' (or install a torchvision build matching your torch)"
        ) from err
    return tvm


def build_network(architecture: str, config: Mapping[str, Any]) -> nn.Module:
    """Construct ``architecture`` (a key of ``ARCHITECTURES`` or ``torchvision:<name>``) with
    keyword arguments ``config``; random weights. Unknown names raise ``KeyError`` listing the
    known ones."""
    if architecture.startswith("torchvision:"):
        tvm = _torchvision_models(architecture)
        return getattr(tvm, architecture.split(":", 1)[1])(weights=None, **dict(config))
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {architecture!r}; known: {known}")
    return ARCHITECTURES[architecture](**dict(config))
