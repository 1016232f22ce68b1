"""SSNI: diffusion-based adversarial purification with sample-specific score-aware noise injection.

Pipeline: ``t = policy(x)`` -> ``x_pure = purifier(x, t)`` -> ``logits = classifier(x_pure)``.
"""

from .adapters import DiffusersUNet, ResizedPurifier
from .attacks import (
    APGD,
    EOT,
    PGD,
    Surrogate,
    ThreatModel,
    autoattack_rand,
    bpda,
    full,
    relaxed,
)
from .checkpoints import CheckpointError
from .defense import Defense, DefenseOutput
from .diffusion import VPSchedule
from .evaluate import Report, evaluate
from .gdmp import GDMP
from .gns import GNS
from .policies import SSNI, Constant, NoiseLevelPolicy, eps_score_norm
from .purifiers import DiffPure, Purification, Purifier, StraightThrough
from .sampling import ddim_step, euler_maruyama_step, reverse
from .score import EpsilonNetwork, GaussianScore, ScoreModel
from .zoo import CLASSIFIERS, SCORE_MODELS, load_classifier, load_score_model

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
    "load_score_model",
    "load_classifier",
    "SCORE_MODELS",
    "CLASSIFIERS",
    "CheckpointError",
    "DiffusersUNet",
    "ResizedPurifier",
    "ThreatModel",
    "PGD",
    "APGD",
    "autoattack_rand",
    "EOT",
    "Surrogate",
    "bpda",
    "full",
    "relaxed",
    "evaluate",
    "Report",
]
