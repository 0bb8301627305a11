"""randkit: randomness as a controlled resource across the life of a neural network.

``pip install randkit`` gives streams, randomization, data, models, training, cross-validation
and deployment; the server, HTML reports and Ray come with the extras ``serve``, ``report`` and
``ray`` (see ``randkit.extras``).
"""

from randkit.errors import UserError
from randkit.streams import SOURCES, Streams, deterministic, global_rng_guard

__version__ = "0.1.0"


def cross_validate(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See ``randkit.cv.cross_validate`` (imported lazily: it loads the training stack)."""
    from randkit.cv.api import cross_validate as run

    return run(*args, **kwargs)


__all__ = [
    "SOURCES",
    "Streams",
    "UserError",
    "__version__",
    "cross_validate",
    "deterministic",
    "global_rng_guard",
]
