"""Adversarial attacks on purification defenses: threat models, gradient estimators (EOT,
BPDA, surrogate, full), PGD and APGD, losses (CE, DLR, score-norm-aware, norm penalty), and
policy-aware attacks on SSNI (norm-constrained two-phase, transfer from clean levels)."""

from .apgd import APGD, apgd_checkpoints, autoattack_rand
from .base import Attack, Chain
from .calls import Counted, count_calls
from .constrained import TwoPhase, lower_norm
from .gradients import EOT, GradientEstimate, GradientEstimator, Surrogate, bpda, full, relaxed
from .levels import SampledLevels, at_levels, clean_levels
from .losses import DLR, CrossEntropy, ScoreNormLoss, make_loss
from .norm import NormPenaltyLoss, clean_norm_target
from .pgd import PGD
from .target import AttackTarget
from .threat import ThreatModel

__all__ = [
    "ThreatModel",
    "AttackTarget",
    "Attack",
    "Chain",
    "PGD",
    "APGD",
    "apgd_checkpoints",
    "autoattack_rand",
    "GradientEstimate",
    "GradientEstimator",
    "EOT",
    "Surrogate",
    "bpda",
    "full",
    "relaxed",
    "CrossEntropy",
    "DLR",
    "ScoreNormLoss",
    "make_loss",
    "NormPenaltyLoss",
    "clean_norm_target",
    "TwoPhase",
    "lower_norm",
    "SampledLevels",
    "at_levels",
    "clean_levels",
    "Counted",
    "count_calls",
]
