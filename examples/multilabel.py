"""Multilabel classification: several yes/no labels per example, cross-validated.

The script generates the data: 20 numeric features per example and 6 labels, label j being
"w_j . x > t_j" (thresholds chosen so that some labels are common and some rare), with 5% of
the labels flipped as noise. Then:

* ``(x, labels)`` arrays go in with ``task="multilabel"`` (a 2-D array of 0/1, one column per
  label); the model outputs one logit per label and trains with binary cross-entropy.
* Built-in metrics of the task: ``macro_f1`` (the headline), ``micro_f1``, ``auroc`` (mean
  over labels), ``subset_accuracy`` (every label right) and ``loss``.
* Your own metrics come in ``metrics=``: here a plain function ``hamming_loss(outputs,
  targets)`` (outputs are the raw logits) and, when torchmetrics is installed, a
  torchmetrics object (its ``update``/``compute`` run once over the whole test fold).
* The printout compares with a trivial baseline: answering "yes" to every label.

    python examples/multilabel.py             # under a minute on a laptop CPU
    python examples/multilabel.py --quick     # a few seconds
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

import randkit


def make_multilabel(
    n: int, features: int = 20, labels: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (n, features) float32 and ``y`` (n, labels) 0/1 float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    w = rng.normal(size=(features, labels)) / np.sqrt(features)
    scores = x @ w
    # thresholds at quantiles: label prevalence from 50% down to about 10%
    prevalence = np.linspace(0.5, 0.1, labels)
    thresholds = [np.quantile(scores[:, j], 1 - prevalence[j]) for j in range(labels)]
    y = (scores > np.array(thresholds)).astype(np.float32)
    flip = rng.random(y.shape) < 0.05
    y[flip] = 1 - y[flip]
    return x, y


class MLP(nn.Module):
    """One logit per label; randkit passes ``in_shape`` and ``num_outputs`` (the labels)."""

    def __init__(self, in_shape: list[int], num_outputs: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_shape[0], hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hamming_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of wrong yes/no answers (a logit above 0 means yes); lower is better."""
    return ((outputs > 0) != targets.bool()).float().mean()


def all_yes_macro_f1(y: np.ndarray) -> float:
    """Macro F1 of answering yes to every label: 2p / (1 + p) for a label of prevalence p."""
    p = y.mean(0)
    return float(np.mean(2 * p / (1 + p)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/multilabel", help="run folder")
    parser.add_argument("--n", type=int, default=3000, help="examples")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.n, args.epochs, args.folds = 600, 15, 3

    x, y = make_multilabel(args.n, seed=args.seed)
    prevalence = ", ".join(f"{p:.2f}" for p in y.mean(0))
    print(f"{len(x)} examples, {y.shape[1]} labels of prevalence {prevalence}")

    metrics = {"hamming_loss": hamming_loss}
    try:  # optional: torchmetrics objects work too (pip install torchmetrics)
        from torchmetrics.classification import MultilabelAveragePrecision

        metrics["average_precision"] = MultilabelAveragePrecision(num_labels=y.shape[1])
    except ImportError:
        pass

    result = randkit.cross_validate(
        MLP,
        (x, y),
        task="multilabel",
        folds=args.folds,
        seed=args.seed,
        metrics=metrics,
        train={"epochs": args.epochs, "batch_size": 64, "lr": 3e-3},
        out=args.out,
    )

    s = result.summary
    low, high = s["ci95"] or (math.nan, math.nan)  # None: no spread (s["ci95_note"])
    print(f"{'metric':>18} {'mean':>7} {'std':>7}")
    for name, part in s["per_metric"].items():
        print(f"{name:>18} {part['mean']:7.3f} {part['std']:7.3f}")
    print(
        f"headline {s['metric']}: {s['mean']:.3f} (corrected 95% CI {low:.3f} to {high:.3f}); "
        f"answering yes to every label gives {all_yes_macro_f1(y):.3f}, a random ranking "
        "gives auroc 0.5"
    )
    print(f"results.csv and summary.json in {result.out}")


if __name__ == "__main__":
    main()
