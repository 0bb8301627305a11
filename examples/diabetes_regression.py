"""Regression: cross-validate an MLP on scikit-learn's diabetes data and compare it with the
simplest baseline, predicting the training fold's mean.

* ``(x, y)`` arrays go straight in; ``task="regression"`` is needed because continuous targets
  are never guessed to be classes. The headline metric is RMSE (lower is better); MAE and R2
  come with it.
* ``MLP`` is an ordinary ``nn.Module``. randkit passes ``in_shape`` (its signature names it);
  the other arguments are bound with ``functools.partial``. Its output is ``center + scale *
  net(x)``, so the network learns in standardized units while the predictions, the loss and
  every reported number stay in the target's own units.
* Each training fold holds out 20% for validation; training stops when the validation RMSE has
  not improved for ``patience`` epochs and keeps the best epoch's weights.
* The baseline is scored on exactly the same folds (read from ``plan.json`` in the run folder).

    python examples/diabetes_regression.py             # under a minute on a laptop CPU
    python examples/diabetes_regression.py --quick     # a few seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import randkit


class MLP(nn.Module):
    """A small MLP whose output is ``center + scale * net(x)``."""

    def __init__(
        self, in_shape: list[int], hidden: int = 64, center: float = 0.0, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_shape[0], hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.center, self.scale = center, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.center + self.scale * self.net(x).squeeze(1)


def mean_baseline_rmse(run_folder: Path, y: np.ndarray) -> np.ndarray:
    """RMSE of predicting the training fold's mean, for every trial of the run's plan."""
    plan = json.loads((run_folder / "plan.json").read_text())
    scores = []
    for trial in plan["trials"]:
        train, test = y[trial["train_idx"]], y[trial["test_idx"]]
        scores.append(np.sqrt(np.mean((test - train.mean()) ** 2)))
    return np.array(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/diabetes", help="run folder")
    parser.add_argument("--epochs", type=int, default=300, help="at most (early stopping)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="new split, init and order each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.folds, args.repeats = 25, 3, 2

    x, y = load_diabetes(return_X_y=True)  # 442 patients, 10 features, progression in 25..346
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)  # per-feature scaling, no labels used
    y = y.astype(np.float32)
    # A fixed change of units for the output layer (center and spread of the targets), so
    # the network starts near the right range; the model still learns everything else.
    model = functools.partial(MLP, hidden=64, center=float(y.mean()), scale=float(y.std()))

    result = randkit.cross_validate(
        model,
        (x, y),
        task="regression",
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        train={
            "epochs": args.epochs,
            "batch_size": 32,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "early_stopping": {"metric": "rmse", "patience": 20},
        },
        cv={"inner_val_fraction": 0.2},  # the validation part early stopping watches
        out=args.out,
    )

    s = result.summary
    baseline = mean_baseline_rmse(result.out, y)
    low, high = s["ci95"] or (math.nan, math.nan)  # None: no spread (s["ci95_note"])
    r2, mae = s["per_metric"]["r2"]["mean"], s["per_metric"]["mae"]["mean"]
    table = result.table
    print("fold repeat  MLP rmse  mean-predictor rmse")
    for fold, repeat, rmse, base in zip(
        table["fold"], table["repeat"], table["rmse"], baseline, strict=True
    ):
        print(f"{fold:4} {repeat:6} {rmse:9.2f} {base:20.2f}")
    print(
        f"MLP:      rmse {s['mean']:.2f} +/- {s['std']:.2f} "
        f"(corrected 95% CI {low:.2f} to {high:.2f}), r2 {r2:.3f}, mae {mae:.2f}"
    )
    print(f"baseline: rmse {baseline.mean():.2f} +/- {baseline.std(ddof=1):.2f} (training mean)")
    wins = int((table["rmse"] < baseline).sum())
    print(f"the MLP's rmse is lower in {wins} of {len(baseline)} trials")
    for source, part in s["variance_components"].get("components", {}).items():
        print(f"variance from {source}: {part['share']:.0%}")
    print(f"results.csv and summary.json in {result.out}")


if __name__ == "__main__":
    main()
