"""randkit: randomness as a controlled resource across the life of a neural network.

``pip install randkit`` gives streams, randomization, data, models, training, cross-validation
and deployment; the server, HTML reports and Ray come with the extras ``serve``, ``report`` and
``ray`` (see ``randkit.extras``).
"""

from randkit.errors import UserError
from randkit.streams import SOURCES, Streams, deterministic, global_rng_guard, isolated_global_rngs

# rich draws from Python's `random` when first imported (rich/style.py: getrandbits); every
# randkit entry point (the CLI, cross_validate, train, scikit-learn's progress bars) imports it
# lazily, so the first call would shift a user's `random` sequence. Importing it here, once,
# with the global RNGs restored, keeps them as they were.
with isolated_global_rngs():
    import rich.style  # noqa: F401

__version__ = "0.1.0"


def cross_validate(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See ``randkit.cv.cross_validate`` (imported lazily: it loads the training stack)."""
    from randkit.cv.api import cross_validate as run

    return run(*args, **kwargs)


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # randkit.Trial (what a trial function gets) loads the cross-validation stack lazily.
    if name == "Trial":
        from randkit.cv.fit import Trial

        return Trial
    raise AttributeError(f"module 'randkit' has no attribute {name!r}")


__all__ = [
    "SOURCES",
    "Streams",
    "Trial",
    "UserError",
    "__version__",
    "cross_validate",
    "deterministic",
    "global_rng_guard",
]
