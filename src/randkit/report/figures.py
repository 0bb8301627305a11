"""Figures of a cross-validation report, each drawn to PNG bytes.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot), so drawing
one changes no global matplotlib state and never touches a global RNG.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 110
_MAX_ANNOTATED_CLASSES = 20


def data_uri(png: bytes) -> str:
    """``png`` as a ``data:`` URI to inline in an ``<img src=...>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plain(text: Any) -> str:
    # matplotlib reads "$...$" as mathtext; text from files must show as written.
    return str(text).replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    # No "Software" entry: the bytes do not depend on the matplotlib version string.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _finite(values: Sequence[float] | None) -> bool:
    return values is not None and all(v is not None and math.isfinite(v) for v in values)


def strip_plot(
    scores: Sequence[float],
    groups: Sequence[str],
    metric: str,
    mean: float | None = None,
    ci: Sequence[float] | None = None,
    ci_corrected: Sequence[float] | None = None,
    group_label: str = "group",
) -> bytes:
    """One point per trial, one column per group, with the mean and the 95% CIs as bands.

    Points are spread by evenly spaced offsets within their column (no random jitter).
    """
    order = list(dict.fromkeys(groups))
    fig = Figure(figsize=(max(4.5, 1.1 * len(order) + 2.5), 3.6), dpi=_DPI)
    ax = fig.add_subplot()
    if ci_corrected is not None and _finite(ci_corrected):
        for bound, label in zip(ci_corrected, ("95% CI (corrected)", None), strict=True):
            ax.axhline(bound, color="tab:orange", linestyle="--", linewidth=1.2, label=label)
    if ci is not None and _finite(ci):
        ax.axhspan(*ci, color="tab:blue", alpha=0.18, label="95% CI")
    if mean is not None and math.isfinite(mean):
        ax.axhline(mean, color="tab:blue", linewidth=1.5, label=f"mean {mean:.4f}")
    values = np.asarray(scores, dtype=float)
    labels = np.asarray([str(g) for g in groups], dtype=object)
    for column, name in enumerate(order):
        ys = values[labels == name]
        width = 0.3 if len(ys) > 1 else 0.0
        xs = column + np.linspace(-width, width, len(ys))
        ax.scatter(xs, ys, s=22, color="black", alpha=0.75, zorder=3)
    ax.set_xticks(range(len(order)), [_plain(g) for g in order])
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xlabel(_plain(group_label))
    ax.set_ylabel(_plain(metric))
    ax.set_title(_plain(f"Per-trial {metric}"))
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _curve(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for index, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(float(row.get("epoch", index + 1)))
            ys.append(float(value))
    return xs, ys


def curve_kinds(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """What the histories hold curves of (``train_loss``/``val_loss``, a trial function's
    ``loss``...): loss first, then accuracy, then the rest; at most three panels."""
    found: set[str] = set()
    for history in histories.values():
        for row in history:
            for key in row:
                if key not in ("epoch", "lr", "step"):
                    found.add(key.removeprefix("train_").removeprefix("val_"))
    order = sorted(found, key=lambda k: (k != "loss", k != "accuracy", k))
    return order[:3]


def _series(kind: str) -> tuple[tuple[str, str, str, str], ...]:
    # (label, history keys tried in turn, colour): a trial function may log plain "loss".
    return (
        ("training", f"train_{kind}", kind, "tab:blue"),
        ("validation", f"val_{kind}", f"val_{kind}", "tab:orange"),
    )


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes | None:
    """Training and validation curves per epoch: a thin line per trial and a thick one for the
    mean over trials, one panel per quantity. Each legend entry names lines that are drawn.

    ``None`` when no trial has a history with any value.
    """
    kinds = curve_kinds(histories)
    if not kinds:
        return None
    fig = Figure(figsize=(4.6 * len(kinds) + 0.6, 3.8), dpi=_DPI)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        for label, key, fallback, colour in _series(kind):
            curves = [_curve(h, key) if _curve(h, key)[0] else _curve(h, fallback)
                      for h in histories.values()]  # fmt: skip
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            for xs, ys in curves:
                ax.plot(xs, ys, color=colour, linewidth=0.8, alpha=0.3)
            epochs, means = _mean_curve(curves)
            style = "-" if label == "training" else "--"
            name = f"{label}, mean of {len(curves)}" if len(curves) > 1 else label
            ax.plot(epochs, means, color=colour, linewidth=2.2, linestyle=style, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_plain(kind))
        ax.set_title(_plain(kind.replace("_", " ").capitalize()))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """The mean over the trials that reached each epoch (early stopping ends some sooner)."""
    by_epoch: dict[float, list[float]] = {}
    for xs, ys in curves:
        for x, y in zip(xs, ys, strict=True):
            by_epoch.setdefault(x, []).append(y)
    epochs = sorted(by_epoch)
    return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def sd_bars(rows: Sequence[Mapping[str, Any]], unit: str) -> bytes:
    """One bar per variance component as a standard deviation in the metric's units, its
    95% CI as an error bar, its share of the total variance in the label."""
    names = [str(r["name"]) for r in rows]
    heights = np.asarray([float(r["sd"]) for r in rows])
    fig = Figure(figsize=(max(4.5, 1.6 * len(names) + 2.0), 3.8), dpi=_DPI)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.bar(positions, heights, color="tab:blue", alpha=0.75, width=0.6)
    top = _sd_axis_top(heights, [r.get("ci") for r in rows])
    for x, row, height in zip(positions, rows, heights, strict=True):
        ci = row.get("ci")
        if ci is not None and _finite(ci):
            shown = min(ci[1], top)
            low, high = max(0.0, height - ci[0]), max(0.0, shown - height)
            ax.errorbar(x, height, yerr=[[low], [high]], color="black", capsize=4, linewidth=1)
            if ci[1] > top:  # a CI of few repeats may reach far: say where, keep the bars legible
                ax.annotate(f"CI to {ci[1]:.3g}", (x, top), xytext=(4, -12),
                            textcoords="offset points", fontsize=8)  # fmt: skip
    ax.set_ylim(0, top * 1.05)
    labels = []
    for row in rows:
        share = row.get("share")
        suffix = f"\n{100 * share:.0f}% of variance" if isinstance(share, int | float) else ""
        labels.append(_plain(row["name"]) + suffix)
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylabel(f"standard deviation ({unit})" if unit else "standard deviation")
    ax.set_title("Sources of spread (SD, 95% CI)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _sd_axis_top(heights: np.ndarray, cis: Sequence[Any]) -> float:
    """The y range of the SD bars: every CI whole unless one reaches past three times the
    largest bar (or the other CIs), which would squash the bars to a few pixels."""
    highs = [float(c[1]) for c in cis if c is not None and _finite(c)]
    biggest = float(heights.max()) if heights.size else 0.0
    cap = 3.0 * max(biggest, max((float(c[0]) for c in cis if c is not None and _finite(c)),
                                 default=0.0))  # fmt: skip
    top = max([biggest, *highs]) if highs else biggest
    if cap > 0:
        top = min(top, max(cap, biggest))
    return top if top > 0 else 1.0


def confusion_heatmap(matrix: np.ndarray, classes: Sequence[str]) -> bytes:
    """Counts summed over trials: rows are the true class, columns the predicted one."""
    count = len(classes)
    side = min(12.0, max(4.0, 0.45 * count + 2.0))
    fig = Figure(figsize=(side + 0.8, side), dpi=_DPI)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    names = [_plain(c) for c in classes]
    ax.set_xticks(range(count), names, rotation=45 if count > 4 else 0, ha="right")
    ax.set_yticks(range(count), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (summed over trials)")
    if count <= _MAX_ANNOTATED_CLASSES:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), value in np.ndenumerate(matrix):
            colour = "white" if value > threshold else "black"
            ax.text(
                col,
                row,
                str(int(value)),
                ha="center",
                va="center",
                color=colour,
                fontsize=8 if count <= 10 else 6,
            )
    return _png(fig)


def robustness_curves(
    noise: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "accuracy"
) -> bytes | None:
    """``metric`` against noise level, one line per noise kind. ``None`` when nothing to draw."""
    fig = Figure(figsize=(5.5, 3.8), dpi=_DPI)
    ax = fig.add_subplot()
    drawn = False
    for kind, points in noise.items():
        pairs = [
            (float(p["level"]), float(p[metric]))
            for p in points
            if isinstance(p.get("level"), int | float) and isinstance(p.get(metric), int | float)
        ]
        if pairs:
            xs, ys = zip(*sorted(pairs), strict=True)
            ax.plot(xs, ys, marker="o", label=_plain(kind))
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("noise level")
    ax.set_ylabel(f"test {_plain(metric)}")
    if metric == "accuracy":
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Robustness under test-time input noise")
    return _png(fig)
