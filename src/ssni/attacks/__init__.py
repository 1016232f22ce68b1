"""Adversarial attacks on purification defenses: threat models, gradient estimators (EOT,
BPDA, surrogate, full), PGD and APGD, and losses (CE, DLR, score-norm-aware)."""

from .apgd import APGD, apgd_checkpoints, autoattack_rand
from .base import Attack, Chain
from .gradients import EOT, GradientEstimate, GradientEstimator, Surrogate, bpda, full, relaxed
from .losses import DLR, CrossEntropy, ScoreNormLoss, make_loss
from .pgd import PGD
from .threat import ThreatModel

__all__ = [
    "ThreatModel",
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
]
