"""``randkit certify``: certify a trained run's test inputs, Cohen et al.'s TSV format."""

from __future__ import annotations

import datetime
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from randkit import atomic
from randkit.deploy.sampling import Sampling
from randkit.deploy.smoothing import ABSTAIN, Smoothed
from randkit.errors import UserError
from randkit.extras import require
from randkit.train.load import load_trained


def certified_accuracy_curve(
    radii: np.ndarray, correct: np.ndarray, step: float = 0.25
) -> dict[str, list[float]]:
    """Fraction of inputs certified correct at radius >= r, for r = 0, step, 2 step, ..."""
    top = max(step, float(np.max(radii, initial=0.0)))
    grid = np.arange(0.0, top + step, step)
    accuracy = [float(np.mean(correct & (radii >= r))) if len(radii) else 0.0 for r in grid]
    return {"radii": [round(float(r), 6) for r in grid], "certified_accuracy": accuracy}


def certify_run(
    run: Path,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch: int = 1000,
    skip: int = 1,
    max_inputs: int | None = None,
    radius: float | None = None,
    out: Path | None = None,
    quiet: bool = False,
    onnx: Path | None = None,
) -> dict[str, Any]:
    """Certify every ``skip``-th test input of a trained run (at most ``max_inputs``): a TSV
    of Cohen et al.'s format, the certified-accuracy curve as JSON and PNG.

    ``onnx``: certify that ONNX model (``randkit export --format onnx`` of the run) through
    onnxruntime on the CPU instead of the run's PyTorch model, with the same noise draws."""
    require("report", "randkit certify")  # draws its figure with matplotlib
    _check_arguments(sigma, n0, n, alpha, batch, skip, radius)
    _check_limits(max_inputs, out)
    trained = load_trained(run, device="cpu" if onnx is not None else None)
    if trained.prepared.kind == "text":
        raise UserError("run", "randomized smoothing needs image or vector inputs, got text")
    test = trained.prepared.test
    indices = list(range(0, len(test), skip))[: max_inputs if max_inputs else None]
    model = trained.model if onnx is None else _onnx_model(onnx, trained.prepared)
    smoothed = Smoothed(model, len(trained.prepared.classes), sigma, trained.device)
    header = ["idx", "label", "predict", "radius", "correct", "time"]
    if radius is not None:
        header += ["samples", "certified"]  # appended: readers by column index keep working
    rows, radii, correct = ["\t".join(header)], [], []
    with _progress(quiet, len(indices)) as advance:
        for i in indices:
            # Each input is its own request, its seed from the run's streams (so --skip and
            # --max do not change its result), keyed as every smoothing request is.
            seed = trained.streams.seed("deploy", purpose="certify", index=i)
            request = Sampling("smooth", n, seed, sigma, alpha=alpha, n0=n0)
            x, label = test.x[i : i + 1], int(test.y[i])
            started = time.perf_counter()
            predict, rad, extra = _certify_one(smoothed, x, request, batch, radius, trained.device)
            elapsed = str(datetime.timedelta(seconds=time.perf_counter() - started))
            hit = int(predict == label)
            fields = [str(i), str(label), str(predict), f"{rad:.3f}", str(hit), elapsed, *extra]
            rows.append("\t".join(fields))
            radii.append(rad)
            correct.append(bool(hit))
            advance()
    at = f"-radius{radius:g}" if radius is not None else ""
    tsv = out or run / (f"certify-sigma{sigma:g}{at}" + ("-onnx" if onnx else "") + ".tsv")
    curve = {
        "sigma": sigma,
        "alpha": alpha,
        "n0": n0,
        "n": n,
        "inputs": len(indices),
        "radius": radius,
        **certified_accuracy_curve(np.array(radii), np.array(correct, dtype=bool)),
    }
    curve_json = tsv.with_suffix(".curve.json")
    atomic.write_files(  # all three or none, even on a full disk
        {
            tsv: ("\n".join(rows) + "\n").encode(),
            curve_json: (json.dumps(curve, indent=2) + "\n").encode(),
            tsv.with_suffix(".curve.png"): _plot(curve),
        }
    )
    return {"tsv": tsv, "curve": curve_json, **curve}


def _onnx_model(path: Path, prepared: Any) -> torch.nn.Module:
    """The ONNX classifier, refused in one line unless it takes the run's inputs and classes."""
    from randkit.deploy.onnx_model import OnnxClassifier

    model = OnnxClassifier(path)
    model.check_input(list(prepared.input_shape), torch.float32)
    if model.num_classes not in (None, len(prepared.classes)):
        raise UserError(
            "onnx",
            f"{str(path)!r} gives {model.num_classes} classes, the run has {len(prepared.classes)}",
        )
    return model


def _check_arguments(
    sigma: float, n0: int, n: int, alpha: float, batch: int, skip: int, radius: float | None
) -> None:
    for name, value, low in (("--sigma", sigma, 0.0), ("--alpha", alpha, 0.0)):
        if not value > low:
            raise UserError(name, f"must be > {low:g}, got {value}")
    if not 0 < alpha < 1:
        raise UserError("--alpha", f"must be in (0, 1), got {alpha}")
    for name, value in (("--n0", n0), ("--n", n), ("--batch", batch), ("--skip", skip)):
        if value < 1:
            raise UserError(name, f"must be >= 1, got {value}")
    if radius is not None and not 0 <= radius < math.inf:
        raise UserError("--radius", f"must be a finite number >= 0, got {radius}")
    if not math.isfinite(sigma):
        raise UserError("--sigma", f"must be a finite number, got {sigma}")


def _check_limits(max_inputs: int | None, out: Path | None) -> None:
    """``--max`` 0 or below would certify all or silently drop inputs; ``--out`` must name a
    file in a folder that exists (a typo in it would otherwise create folders unseen)."""
    if max_inputs is not None and max_inputs < 1:
        raise UserError("--max", f"must be >= 1, got {max_inputs}")
    if out is None:
        return
    if out.is_dir():
        raise UserError("--out", f"{str(out)!r} is a folder; give a file name")
    if not out.parent.is_dir():
        raise UserError("--out", f"folder {str(out.parent)!r} does not exist; create it first")


def _certify_one(
    smoothed: Smoothed,
    x: torch.Tensor,
    request: Sampling,
    batch: int,
    radius: float | None,
    device: torch.device,
) -> tuple[int, float, list[str]]:
    """(class or ABSTAIN, radius, extra TSV fields) of one input: CERTIFY, or the sequential
    decision at ``radius`` (its extra fields: the samples it used, certified true/false; the
    class is ABSTAIN only when pA > 1/2 was not shown, not for "not certified at radius")."""
    generator = request.generator(device)
    if radius is None:
        predicted, radii = smoothed.certify(
            x, request.n0, request.samples, request.alpha, batch, generator
        )
        return int(predicted[0]), float(radii[0]), []
    decision = smoothed.certify_at_radius(
        x, radius, request.alpha, request.samples, batch, generator, request.n0
    )
    ok = bool(decision.certified[0])
    predict = int(decision.predicted[0]) if decision.established[0] else ABSTAIN
    extra = [str(int(decision.samples[0])), "true" if ok else "false"]
    return predict, (radius if ok else 0.0), extra


def _progress(quiet: bool, total: int):  # type: ignore[no-untyped-def]
    import contextlib

    @contextlib.contextmanager
    def manager():  # type: ignore[no-untyped-def]
        if quiet:
            yield lambda: None
            return
        columns = (
            TextColumn("[bold]certify[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns) as progress:
            task = progress.add_task("", total=total)
            yield lambda: progress.advance(task)

    return manager()


def _plot(curve: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.8), dpi=120)
    ax = figure.subplots()
    ax.step(curve["radii"], curve["certified_accuracy"], where="post", marker="o")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Randomized smoothing, sigma = {curve['sigma']:g}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
