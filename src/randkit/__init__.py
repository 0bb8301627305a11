"""randkit: randomness as a controlled resource across the life of a neural network."""

from randkit.errors import UserError
from randkit.streams import SOURCES, Streams, deterministic, global_rng_guard

__version__ = "0.1.0"

__all__ = ["SOURCES", "Streams", "UserError", "__version__", "deterministic", "global_rng_guard"]
