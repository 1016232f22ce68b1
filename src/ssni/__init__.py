"""SSNI: diffusion-based adversarial purification with sample-specific score-aware noise injection.

Pipeline: ``t = policy(x)`` -> ``x_pure = purifier(x, t)`` -> ``logits = classifier(x_pure)``.
"""

from .diffusion import VPSchedule
from .score import EpsilonNetwork, GaussianScore, ScoreModel

__version__ = "0.1.0"

__all__ = [
    "VPSchedule",
    "ScoreModel",
    "EpsilonNetwork",
    "GaussianScore",
]
