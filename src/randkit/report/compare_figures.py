"""Figures of the comparison page: the paired differences and the Bayesian posterior."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats as st

from randkit.report.figures import _DPI, _plain, _png


def paired_differences(
    differences: Sequence[float],
    groups: Sequence[str],
    metric: str,
    ci: Sequence[float] | None,
    rope: float,
) -> bytes:
    """One point per paired trial (A minus B, signed so that positive favours A), a column
    per repeat, the mean difference with its corrected 95% CI, and the ROPE as a band."""
    order = list(dict.fromkeys(groups))
    values = np.asarray(differences, dtype=float)
    labels = np.asarray([str(g) for g in groups], dtype=object)
    fig = Figure(figsize=(max(5.0, 0.9 * len(order) + 3.0), 3.8), dpi=_DPI)
    ax = fig.add_subplot()
    if rope > 0:
        ax.axhspan(-rope, rope, color="tab:green", alpha=0.15, label=f"ROPE \u00b1{rope:.4g}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    mean = float(values.mean())
    if ci is not None and all(math.isfinite(v) for v in ci):
        ax.axhspan(ci[0], ci[1], color="tab:blue", alpha=0.18, label="95% CI (corrected)")
    ax.axhline(mean, color="tab:blue", linewidth=1.5, label=f"mean {mean:+.4f}")
    for column, name in enumerate(order):
        ys = values[labels == name]
        width = 0.3 if len(ys) > 1 else 0.0
        xs = column + np.linspace(-width, width, len(ys))
        ax.scatter(xs, ys, s=24, color="black", alpha=0.8, zorder=3)
    ax.set_xticks(range(len(order)), [_plain(g) for g in order], fontsize=8)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylabel(_plain(f"difference in {metric} (> 0 favours A)"))
    ax.set_title("Paired differences per trial")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def posterior(
    mean: float, scale: float, df: float, rope: float, names: tuple[str, str]
) -> bytes | None:
    """The posterior of the mean difference (a Student t) with the three regions shaded.
    ``None`` for a point mass (every difference equal): there is no density to draw."""
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(mean) and df > 0):
        return None
    dist = st.t(df, loc=mean, scale=scale)
    lo = min(dist.ppf(0.0005), -1.5 * rope) if rope > 0 else dist.ppf(0.0005)
    hi = max(dist.ppf(0.9995), 1.5 * rope) if rope > 0 else dist.ppf(0.9995)
    xs = np.linspace(lo, hi, 600)
    ys = dist.pdf(xs)
    fig = Figure(figsize=(6.0, 3.4), dpi=_DPI)
    ax = fig.add_subplot()
    ax.plot(xs, ys, color="black", linewidth=1.2)
    regions = (
        (xs < -rope, "tab:red", f"{_plain(names[1])} better"),
        ((xs >= -rope) & (xs <= rope), "tab:green", "equivalent"),
        (xs > rope, "tab:blue", f"{_plain(names[0])} better"),
    )
    for mask, colour, label in regions:
        if mask.any():
            ax.fill_between(xs, 0, ys, where=mask, color=colour, alpha=0.3, label=label)
    ax.set_xlabel("mean difference (> 0 favours A)")
    ax.set_ylabel("posterior density")
    ax.set_title("Bayesian correlated t-test: posterior of the mean difference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)
