"""Randomized deployment: one inference path (``Predictor``) for smoothing with certified
robustness and Monte-Carlo inference, uncertainty metrics, SmoothGrad explanations, model
bundles."""

from randkit.deploy.mc import MCResult, MonteCarlo
from randkit.deploy.predictor import Predictor
from randkit.deploy.sampling import MODES, Sampling
from randkit.deploy.sequential import decide_sequentially
from randkit.deploy.smoothing import (
    ABSTAIN,
    RadiusDecision,
    Smoothed,
    certify_from_counts,
    lower_confidence_bound,
    upper_confidence_bound,
)

__all__ = [
    "ABSTAIN",
    "MODES",
    "MCResult",
    "MonteCarlo",
    "Predictor",
    "RadiusDecision",
    "Sampling",
    "Smoothed",
    "certify_from_counts",
    "decide_sequentially",
    "lower_confidence_bound",
    "upper_confidence_bound",
]
