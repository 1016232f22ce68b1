"""SSNI: diffusion-based adversarial purification with sample-specific score-aware noise injection.

Pipeline: ``t = policy(x)`` -> ``x_pure = purifier(x, t)`` -> ``logits = classifier(x_pure)``.
"""

from .defense import Defense, DefenseOutput
from .diffusion import VPSchedule
from .gdmp import GDMP
from .gns import GNS
from .policies import SSNI, Constant, NoiseLevelPolicy, eps_score_norm
from .purifiers import DiffPure, Purification, Purifier, StraightThrough
from .sampling import ddim_step, euler_maruyama_step, reverse
from .score import EpsilonNetwork, GaussianScore, ScoreModel

__version__ = "0.1.0"

__all__ = [
    "VPSchedule",
    "ScoreModel",
    "EpsilonNetwork",
    "GaussianScore",
    "reverse",
    "ddim_step",
    "euler_maruyama_step",
    "Purifier",
    "Purification",
    "DiffPure",
    "StraightThrough",
    "GDMP",
    "GNS",
    "NoiseLevelPolicy",
    "Constant",
    "SSNI",
    "eps_score_norm",
    "Defense",
    "DefenseOutput",
]
