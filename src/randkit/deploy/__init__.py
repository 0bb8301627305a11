"""Randomized deployment: smoothing with certified robustness, Monte-Carlo inference,
uncertainty metrics, SmoothGrad explanations, model bundles."""

from randkit.deploy.mc import MCResult, MonteCarlo
from randkit.deploy.smoothing import (
    ABSTAIN,
    RadiusDecision,
    Smoothed,
    lower_confidence_bound,
    schedule,
    upper_confidence_bound,
)

__all__ = [
    "ABSTAIN",
    "MCResult",
    "MonteCarlo",
    "RadiusDecision",
    "Smoothed",
    "lower_confidence_bound",
    "schedule",
    "upper_confidence_bound",
]
