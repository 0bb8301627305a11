"""Batch transforms with per-sample random parameters drawn from an explicit generator.

Written by hand because no library does this job: torchvision v2 draws one set of
parameters per call (or needs a Python loop per sample), Kornia draws per sample but only
from the global RNG. Here every transform splits into ``draw`` (parameters for a batch shape,
from a ``torch.Generator``) and ``apply`` (a vectorized function of the batch and those
parameters), so the parameters can be kept and applied again (replay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Params = dict[str, torch.Tensor]
Shape = tuple[int, int, int, int]


def check_probability(p: float, name: str = "p") -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(p)


def check_range(bounds: Sequence[float], name: str, low: float = -math.inf) -> tuple[float, float]:
    lo, hi = (float(b) for b in bounds)
    if not low <= lo <= hi:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {list(bounds)}")
    return lo, hi


def uniform(
    n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``n`` draws from U(lo, hi)."""
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def log_uniform(
    n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.exp(uniform(n, math.log(lo), math.log(hi), generator, device))


class BatchTransform:
    """A random transform of ``(N, C, H, W)`` float batches, one parameter set per sample.

    Subclasses implement ``_draw`` and ``_apply``. Each sample is transformed with
    probability ``p`` (``applied`` in the parameters); the others come out unchanged.

    >>> flip = HorizontalFlip(p=0.5)                                # doctest: +SKIP
    >>> params = flip.draw(x.shape, generator, x.device)            # doctest: +SKIP
    >>> torch.equal(flip.apply(x, params), flip.apply(x, params))   # doctest: +SKIP
    True
    """

    mixes_labels = False

    def __init__(self, p: float = 1.0) -> None:
        self.p = check_probability(p)

    def draw(
        self, shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> Params:
        """Parameters for a batch of ``shape``; ``applied`` marks the samples transformed."""
        n = int(shape[0])
        device = torch.device(device)
        applied = torch.rand(n, generator=generator, device=device) < self.p
        return {"applied": applied, **self._draw(tuple(shape), generator, device)}  # type: ignore[arg-type]

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Transform ``x`` with ``params`` (as drawn for ``x.shape``)."""
        applied = params["applied"]
        if not applied.any():
            return x
        if applied.all():
            return self._apply(x, params)
        # Only the drawn samples are transformed (per-sample parameters sliced to match);
        # the others come out bit-for-bit unchanged.
        index = applied.nonzero().squeeze(1)
        n = len(applied)
        subset = {k: v[index] if v.dim() and v.shape[0] == n else v for k, v in params.items()}
        out = x.clone()
        out[index] = self._apply(x[index], subset)
        return out

    def apply_(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Like ``apply``, but may overwrite ``x`` (for a caller that owns ``x`` and no longer
        needs it, as ``Compose`` does after its first transform made a new tensor). Same
        result as ``apply``; transforms that can work in place override it."""
        return self.apply(x, params)

    def apply_targets(self, targets: torch.Tensor, params: Params) -> torch.Tensor:
        """Soft ``(N, K)`` targets after the transform (only mixing transforms change them)."""
        return targets

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape, generator, x.device))

    def _draw(self, shape: Shape, generator: torch.Generator, device: torch.device) -> Params:
        return {}

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Compose:
    """Transforms in order. ``draw`` gives one parameter set per transform, ``apply`` and
    ``apply_targets`` replay them.

    Mixing transforms (mixup, cutmix) need soft targets: pass integer labels with
    ``num_classes`` set, or ``(N, K)`` probabilities.
    """

    def __init__(self, transforms: Sequence[BatchTransform], num_classes: int | None = None):
        self.transforms = list(transforms)
        self.num_classes = num_classes

    @property
    def mixes_labels(self) -> bool:
        return any(t.mixes_labels for t in self.transforms)

    def draw(
        self, shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> list[Params]:
        params = []
        current: Shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
        for transform in self.transforms:
            params.append(transform.draw(current, generator, device))
            current = transform.output_shape(current)
        return params

    def apply(self, x: torch.Tensor, params: list[Params]) -> torch.Tensor:
        source, owned = x, False
        for transform, p in zip(self.transforms, params, strict=True):
            # Once a transform has made a new tensor, the rest may work in place on it: the
            # caller's batch is never written, and each in-place stage saves a 3 MB pass.
            x = transform.apply_(x, p) if owned else transform.apply(x, p)
            owned = owned or not _same_storage(x, source)
        return x

    def apply_targets(self, targets: torch.Tensor, params: list[Params]) -> torch.Tensor:
        soft = self.soft_targets(targets)
        for transform, p in zip(self.transforms, params, strict=True):
            soft = transform.apply_targets(soft, p)
        return soft

    def soft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 2:
            return targets.float()
        if self.num_classes is None:
            raise ValueError("integer targets need Compose(num_classes=...) to become soft")
        return torch.nn.functional.one_hot(targets, self.num_classes).float()

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, targets: torch.Tensor | None = None
    ):  # type: ignore[no-untyped-def]
        """``x`` transformed, or ``(x, soft targets)`` when ``targets`` are given."""
        params = self.draw(x.shape, generator, x.device)
        out = self.apply(x, params)
        if targets is None:
            return out
        return out, self.apply_targets(targets, params)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"
