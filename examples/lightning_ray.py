"""Cross-validate a LightningModule with Lightning's own Trainer, trials run as Ray tasks.

``LightningTrial(LitMLP, {...}, batch_size=..., trainer_kwargs={...})`` is the trial function:
in every trial it builds the module (initial weights from the trial's ``init`` stream), fits it
with ``lightning.Trainer.fit`` on the training fold (batch order from the ``order`` stream,
dropout from ``dropout``) and runs ``Trainer.test`` on the test fold. What ``test_step`` logs
with ``self.log`` becomes the trial's row of results.csv; ``accuracy`` is the headline.
Every epoch is checkpointed into the trial's folder (safetensors, no pickle), so a run started
again after a crash resumes the interrupted trials.

``runner="ray"`` sends one Ray task per trial to a local Ray cluster that randkit starts and
stops itself (pass ``cv={"address": "ray://..."}`` for an existing cluster).

Needs the extras: pip install 'randkit[lightning,ray]'

    python examples/lightning_ray.py            # a minute or two on a laptop CPU
    python examples/lightning_ray.py --quick    # tiny sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import randkit
from randkit.integrations.lightning import LightningTrial


class LitMLP(pl.LightningModule):
    """An MLP for 8x8 digits (64 pixel values), trained with Adam."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("loss", F.cross_entropy(logits, y))
        self.log("accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lightning_ray", help="run folder")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.folds, args.repeats = 3, 3, 1

    x, y = load_digits(return_X_y=True)  # 1797 8x8 digit images as 64 pixel values, 0..16
    dataset = TensorDataset(
        torch.from_numpy((x / 16.0).astype(np.float32)), torch.from_numpy(y).long()
    )

    fit = LightningTrial(
        LitMLP,
        {"hidden": 128, "lr": 1e-3},
        batch_size=64,
        trainer_kwargs={"max_epochs": args.epochs},  # CPU, one device per trial by default
    )
    result = randkit.cross_validate(
        data=dataset,
        fit=fit,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        runner="ray",
        out=args.out,
    )

    s = result.summary
    low, high = s["ci95"] or (math.nan, math.nan)  # None: no spread (s["ci95_note"])
    for trial_id, accuracy in zip(result.table["id"], result.table["accuracy"], strict=True):
        print(f"trial {trial_id}: accuracy {accuracy:.3f}")
    print(
        f"{s['metric']}: {s['mean']:.3f} +/- {s['std']:.3f} over {s['n_trials']} trials "
        f"(corrected 95% CI {low:.3f} to {high:.3f}); chance is 0.100"
    )
    print(f"results.csv, summary.json and each trial's checkpoint in {result.out}")


if __name__ == "__main__":
    main()
