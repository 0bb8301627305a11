"""Randomization for training: per-sample batch transforms, input noise, parameter and
gradient noise, generator-driven stochastic layers, a zeroth-order optimizer."""

from randkit.randomize.base import BatchTransform, Compose, Params
from randkit.randomize.build import Randomization, build_randomization
from randkit.randomize.geometric import (
    HorizontalFlip,
    RandomAffine,
    RandomCrop,
    RandomResizedCrop,
    VerticalFlip,
)
from randkit.randomize.mixing import CutMix, Mixup, sample_beta
from randkit.randomize.modules import (
    Dropout,
    GaussianDropout,
    StochasticDepth,
    current_generator,
    use_generator,
)
from randkit.randomize.noise import NOISE_KINDS, InputNoise, parse_noise_levels
from randkit.randomize.photometric import ColorJitter, RandomErasing
from randkit.randomize.weights import INITIALIZERS, GradientNoise, initialize, perturbed_parameters
from randkit.randomize.zo import ZerothOrderSGD

__all__ = [
    "INITIALIZERS",
    "NOISE_KINDS",
    "BatchTransform",
    "ColorJitter",
    "Compose",
    "CutMix",
    "Dropout",
    "GaussianDropout",
    "GradientNoise",
    "HorizontalFlip",
    "InputNoise",
    "Mixup",
    "Params",
    "RandomAffine",
    "RandomCrop",
    "RandomErasing",
    "RandomResizedCrop",
    "Randomization",
    "StochasticDepth",
    "VerticalFlip",
    "ZerothOrderSGD",
    "build_randomization",
    "current_generator",
    "initialize",
    "parse_noise_levels",
    "perturbed_parameters",
    "sample_beta",
    "use_generator",
]
