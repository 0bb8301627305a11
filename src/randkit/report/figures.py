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
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

_DPI = 110
_MAX_LEGEND_TRIALS = 10
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


def learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes | None:
    """Loss and accuracy against epoch, one colour per trial: train solid, validation dashed.

    ``None`` when no trial has a history with any of these values.
    """
    panels = [
        (kind, f"train_{kind}", f"val_{kind}")
        for kind in ("loss", "accuracy")
        if any(
            _curve(h, f"train_{kind}")[0] or _curve(h, f"val_{kind}")[0] for h in histories.values()
        )
    ]
    if not panels:
        return None
    fig = Figure(figsize=(5.0 * len(panels) + 0.5, 3.8), dpi=_DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = _trial_colours(len(histories))
    any_val = False
    for ax, (kind, train_key, val_key) in zip(axes, panels, strict=True):
        for colour, (trial, history) in zip(colours, histories.items(), strict=True):
            xs, ys = _curve(history, train_key)
            if xs:
                ax.plot(xs, ys, color=colour, linewidth=1.2, alpha=0.85, label=_plain(trial))
            xs, ys = _curve(history, val_key)
            if xs:
                any_val = True
                ax.plot(xs, ys, color=colour, linewidth=1.2, alpha=0.85, linestyle="--")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(kind)
        ax.set_title(f"{kind.capitalize()} per trial")
        ax.grid(alpha=0.3)
    styles = [Line2D([], [], color="grey", label="train")]
    if any_val:
        styles.append(Line2D([], [], color="grey", linestyle="--", label="validation"))
    handles: list[Any] = list(styles)
    if len(histories) <= _MAX_LEGEND_TRIALS:
        handles += [
            Line2D([], [], color=c, label=_plain(t))
            for c, t in zip(colours, histories, strict=True)
        ]
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    return _png(fig)


def _trial_colours(count: int) -> list[Any]:
    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.95, count)]


def variance_bars(components: Mapping[str, Mapping[str, Any]]) -> bytes:
    """One bar per variance component with its CI as an error bar; the share in the label."""
    names = list(components)
    heights = np.asarray([float(components[n].get("variance", 0.0)) for n in names])
    fig = Figure(figsize=(max(4.5, 1.2 * len(names) + 2.0), 3.8), dpi=_DPI)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.bar(positions, heights, color="tab:blue", alpha=0.75)
    for x, name, height in zip(positions, names, heights, strict=True):
        ci = components[name].get("ci")
        if ci is not None and _finite(ci):
            low, high = max(0.0, height - ci[0]), max(0.0, ci[1] - height)
            ax.errorbar(x, height, yerr=[[low], [high]], color="black", capsize=4, linewidth=1)
    labels = []
    for name in names:
        share = components[name].get("share")
        suffix = f"\n{100 * share:.1f}%" if isinstance(share, int | float) else ""
        labels.append(_plain(name) + suffix)
    ax.set_xticks(positions, labels)
    ax.set_ylabel("variance")
    ax.set_title("Variance components (95% CI, share of total)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


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
