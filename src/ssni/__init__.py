"""SSNI: diffusion-based adversarial purification with sample-specific score-aware noise injection.

Pipeline: ``t = policy(x)`` -> ``x_pure = purifier(x, t)`` -> ``logits = classifier(x_pure)``.
"""

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
from .core.defense import Defense, DefenseOutput
from .core.diffusion import VPSchedule
from .core.gdmp import GDMP
from .core.gns import GNS
from .core.learned import LearnedPolicy
from .core.policies import SSNI, Constant, NoiseLevelPolicy, eps_score_norm
from .core.purifiers import DiffPure, Purification, Purifier, StraightThrough
from .core.sampling import ddim_step, euler_maruyama_step, reverse
from .core.score import (
    EpsilonNetwork,
    GaussianScore,
    NetworkCalls,
    ScoreModel,
    count_network_calls,
)
from .eval.protocol import Report, evaluate
from .io.adapters import DiffusersUNet, ResizedPurifier
from .io.checkpoints import CheckpointError
from .io.weights import load_classifier_file, load_score_model_file
from .io.zoo import CLASSIFIERS, SCORE_MODELS, load_classifier, load_score_model

__version__ = "0.1.0"

__all__ = [
    "VPSchedule",
    "ScoreModel",
    "EpsilonNetwork",
    "GaussianScore",
    "NetworkCalls",
    "count_network_calls",
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
    "LearnedPolicy",
    "eps_score_norm",
    "Defense",
    "DefenseOutput",
    "load_score_model",
    "load_classifier",
    "load_score_model_file",
    "load_classifier_file",
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
