"""Randomized deployment: smoothing with certified robustness."""

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
    "RadiusDecision",
    "Smoothed",
    "lower_confidence_bound",
    "schedule",
    "upper_confidence_bound",
]
