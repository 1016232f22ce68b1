"""Network architectures, built from keyword arguments only."""

from .guided_unet import GuidedUNet as GuidedUNet
from .ncsnpp import NCSNpp as NCSNpp
from .wrn import WideResNet as WideResNet
from .wrn import wrn_28_10 as wrn_28_10
from .wrn import wrn_70_16 as wrn_70_16
