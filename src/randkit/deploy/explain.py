"""SmoothGrad (Smilkov et al. 2017): input gradients of the class score averaged over
Gaussian-noised copies of the input, and ``randkit explain``'s saliency grid."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from randkit import atomic
from randkit.errors import UserError
from randkit.extras import require
from randkit.train.load import load_trained


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    samples: int,
    sigma: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean over ``samples`` noisy copies x + N(0, sigma^2) of d score_target / d input, where
    the score is the logit of ``target`` (default: the predicted class). With one sample and
    sigma 0 this is the plain input gradient."""
    if samples < 1 or sigma < 0:
        raise ValueError(f"need samples >= 1 and sigma >= 0, got {samples} and {sigma}")
    was_training = model.training
    model.eval()
    try:
        if target is None:
            with torch.no_grad():
                target = model(x).argmax(1)
        total = torch.zeros_like(x, dtype=torch.float32)
        for _ in range(samples):  # one batched pass per noise sample, all inputs at once
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noisy = (x + sigma * noise).detach().requires_grad_(True)
            scores = model(noisy).gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(scores, noisy)
            total += grad.float()
    finally:
        model.train(was_training)
    return total / samples


def explain_run(
    run: Path,
    samples: int = 50,
    sigma: float = 0.15,
    indices: list[int] | None = None,
    seed: int = 0,
    out: Path | None = None,
) -> dict[str, Any]:
    """Saliency maps of test inputs of a trained run, as a PNG grid (input | SmoothGrad)."""
    require("report", "randkit explain")  # draws its figure with matplotlib
    if samples < 1:
        raise UserError("--samples", f"must be >= 1, got {samples}")
    if not 0 <= sigma < math.inf:
        raise UserError("--sigma", f"must be a finite number >= 0, got {sigma}")
    if seed < 0:
        raise UserError("--seed", f"must be >= 0, got {seed}")
    # As randkit certify: a file in a folder that exists (a typo creates no folders).
    if out is not None and out.is_dir():
        raise UserError("--out", f"{str(out)!r} is a folder; give a file name")
    if out is not None and not out.parent.is_dir():
        raise UserError("--out", f"folder {str(out.parent)!r} does not exist; create it first")
    trained = load_trained(run)
    if trained.prepared.kind != "image":
        raise UserError("run", f"saliency maps need image inputs, got {trained.prepared.kind}")
    test = trained.prepared.test
    chosen = indices if indices else list(range(min(8, len(test))))
    bad = [i for i in chosen if not 0 <= i < len(test)]
    if bad:
        raise UserError("--index", f"must be in [0, {len(test) - 1}], got {bad[0]}")
    x = test.x[chosen].to(trained.device)
    generator = trained.streams.torch(
        "deploy", device=trained.device, purpose="explain", request=seed
    )
    saliency = smoothgrad(trained.model, x, None, samples, sigma, generator)
    with torch.no_grad():
        predicted = trained.model(x).argmax(1).cpu().numpy()
    classes = trained.prepared.classes
    labels = [classes[int(test.y[i])] for i in chosen]
    names = [classes[int(p)] for p in predicted]
    png = out or run / "smoothgrad.png"
    atomic.write_bytes(png, _grid(x.cpu().numpy(), saliency.cpu().numpy(), labels, names, chosen))
    return {"png": png, "indices": chosen, "predicted": names, "labels": labels}


def _grid(
    x: np.ndarray, saliency: np.ndarray, labels: list[str], predicted: list[str], indices: list[int]
) -> bytes:
    from matplotlib.figure import Figure

    n = len(x)
    figure = Figure(figsize=(2.0 * n, 4.2), dpi=100)
    axes = figure.subplots(2, n, squeeze=False)
    for k in range(n):
        image = x[k].transpose(1, 2, 0)
        image = image[..., 0] if image.shape[-1] == 1 else image.clip(0, 1)
        axes[0, k].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[0, k].set_title(f"#{indices[k]} true {labels[k]}\npred {predicted[k]}", fontsize=8)
        axes[1, k].imshow(np.abs(saliency[k]).max(0), cmap="magma")
        for row in (0, 1):
            axes[row, k].axis("off")
    axes[1, 0].set_title("SmoothGrad |gradient|", fontsize=8, loc="left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
