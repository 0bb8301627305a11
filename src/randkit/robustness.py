"""Accuracy and loss of a trained model under test-time input noise, level by level."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from randkit import atomic
from randkit.data import TensorData
from randkit.extras import require
from randkit.randomize.noise import InputNoise
from randkit.streams import Streams
from randkit.train.metrics import classification_metrics, predict_logits


def noisy_metrics(
    model: torch.nn.Module,
    test: TensorData,
    num_classes: int,
    kind: str,
    level: float,
    streams: Streams,
    device: torch.device,
    batch_size: int = 1024,
    clip: bool = True,
) -> dict[str, float]:
    """Metrics on ``test`` with noise of ``kind`` at ``level`` from stream ``noise`` keyed by
    test-time coordinates (the level's value, so a level gives the same noise in any sweep)."""
    noise = InputNoise(kind, level, p=1.0, clip=clip)
    generator = streams.torch(
        "noise", device=device, phase="test", kind=kind, level=repr(float(level))
    )
    logits = []
    for start in range(0, len(test), batch_size):
        chunk = test.x[start : start + batch_size].to(device)
        logits.append(predict_logits(model, noise(chunk, generator), device, batch_size))
    return classification_metrics(torch.cat(logits), test.y, num_classes)


def robustness_curves(
    model: torch.nn.Module,
    test: TensorData,
    num_classes: int,
    sweeps: dict[str, list[float]],
    streams: Streams,
    device: torch.device,
    clip: bool = True,
) -> dict[str, list[dict[str, float]]]:
    """Metrics per noise level; ``clip`` keeps noisy inputs in [0, 1] (for data that lies
    there)."""
    return {
        kind: [
            {
                "level": level,
                **noisy_metrics(model, test, num_classes, kind, level, streams, device, clip=clip),
            }
            for level in levels
        ]
        for kind, levels in sweeps.items()
    }


def write_robustness(
    out: Path, curves: dict[str, list[dict[str, float]]], extra: dict[str, Any]
) -> tuple[Path, Path]:
    """Merge ``curves`` into ``out/robustness.json`` (kinds measured before are kept) and
    draw ``out/robustness.png``."""
    require("report", "randkit.robustness figures")  # draws its figure with matplotlib
    path = out / "robustness.json"
    merged: dict[str, Any] = {"noise": {}}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {"noise": {}}
    merged["noise"].update(curves)
    merged.update(extra)
    atomic.write_json(path, merged)
    png = out / "robustness.png"
    atomic.write_bytes(png, _plot(merged["noise"]))
    return path, png


def _plot(curves: dict[str, list[dict[str, float]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for kind, points in curves.items():
        ax.plot(
            [p["level"] for p in points], [p["accuracy"] for p in points], marker="o", label=kind
        )
    ax.set_xlabel("noise level")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Robustness under test-time input noise")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
