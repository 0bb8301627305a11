"""Optional parts of randkit and the pip extra that installs each.

The core install (streams, randomize, data, models, train, cv, deploy) needs none of them; a
part whose extra is missing says so in one line::

    >>> from randkit.extras import require
    >>> require("serve", "randkit.serve")   # doctest: +SKIP
    MissingExtraError: randkit.serve needs the 'serve' extra (fastapi is not installed):
    pip install 'randkit[serve]'
"""

from __future__ import annotations

import importlib.util

from randkit.errors import UserError

# The modules each extra provides that randkit imports (their own dependencies come along).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "report": ("jinja2", "matplotlib"),
    "ray": ("ray",),
    "lightning": ("lightning",),
    "metrics": ("torchmetrics",),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
}


class MissingExtraError(UserError, ImportError):
    """A part of randkit is used whose optional dependencies are not installed.

    A ``UserError`` (the CLI prints its one line and exits with code 2) and an ``ImportError``
    (``try: import randkit.serve / except ImportError`` works as usual).
    """


def missing(extra: str) -> str | None:
    """The first module of ``extra`` that cannot be imported, or None when all can."""
    for module in EXTRAS[extra]:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):  # a blocked or half-installed package
            return module
    return None


def message(extra: str, part: str, module: str | None = None) -> str:
    """The one line that names the extra to install."""
    why = f" ({module} is not installed)" if module else ""
    return f"{part} needs the {extra!r} extra{why}: pip install 'randkit[{extra}]'"


def require(extra: str, part: str) -> None:
    """Raise ``MissingExtraError`` naming ``extra`` when one of its modules is missing."""
    module = missing(extra)
    if module is not None:
        raise MissingExtraError("", message(extra, part, module))
