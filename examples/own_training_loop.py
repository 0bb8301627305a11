"""Your own training loop, cross-validated: ``fit=fit_and_score``.

randkit plans the folds and repeats and calls ``fit_and_score(trial)`` once per trial, in
worker processes here (``runner="processes"``). The function gets a ``randkit.Trial``:

* ``trial.loader("train", batch_size=..., epoch=e)``: a DataLoader over the training fold,
  shuffled by the trial's ``order`` stream at epoch ``e``; ``trial.loader("test", ...)`` for
  the test fold (in order). ``trial.train`` / ``trial.test`` are the plain ``Subset`` views.
* ``trial.streams.torch(source, **coords)``: a torch.Generator of any named random stream of
  the trial (here the input noise: one ``augment`` generator per epoch), the same in every
  runner and on every rerun.
* ``trial.report(epoch, **numbers)``: learning curves, written to ``trial.dir/history.json``.
* ``trial.dir``: the trial's own folder; the loop keeps a checkpoint there after every epoch
  and continues from it when the run is started again after a crash.

The returned ``{"accuracy": ..., "loss": ...}`` becomes the trial's row of results.csv. While
the function runs, torch's global RNG is seeded from the trial's ``init`` stream, so the
initial weights and ``nn.Dropout`` masks are reproducible too.

    python examples/own_training_loop.py            # about a minute on a laptop CPU
    python examples/own_training_loop.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import functools
import math

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import randkit
from randkit.train.checkpoint import (
    optimizer_from_flat,
    read_checkpoint,
    save_checkpoint,
    strip_prefix,
)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def fit_and_score(trial: randkit.Trial, epochs: int = 15) -> dict[str, float]:
    """Train a fresh model on the trial's training fold and score it on its test fold."""
    model = make_model()  # initial weights from torch's global RNG: seeded per trial
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # safetensors for the weights and the optimizer's tensors, JSON for the rest: no pickle.
    checkpoint = trial.dir / "checkpoint.safetensors"
    start = 0
    if checkpoint.exists():  # the run was interrupted: continue where this trial stopped
        tensors, state = read_checkpoint(checkpoint)
        model.load_state_dict(strip_prefix(tensors, "model."))
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        start = state["loop"]["epoch"]
        trial.history[:] = state["loop"]["history"]  # the learning curve so far

    for epoch in range(start, epochs):
        model.train()
        total, seen = 0.0, 0
        noise = trial.streams.torch("augment", epoch=epoch)  # this epoch's input noise
        for xb, yb in trial.loader("train", batch_size=64, epoch=epoch):
            xb = xb + 0.05 * torch.randn(xb.shape, generator=noise)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(xb), seen + len(xb)
        trial.report(epoch, train_loss=total / seen)
        loop = {"epoch": epoch + 1, "history": trial.history}
        save_checkpoint(checkpoint, model, optimizer, {}, {"loop": loop})  # atomic

    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for xb, yb in trial.loader("test", batch_size=256):
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    n = len(trial.test_indices)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/own_loop", help="run folder")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="new split, init and order each")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.folds, args.repeats = 4, 3, 2

    x, y = load_digits(return_X_y=True)  # 1797 8x8 digit images as 64 pixel values, 0..16
    x = (x / 16.0).astype(np.float32)

    result = randkit.cross_validate(
        data=(x, y),
        # a module-level function (worker processes import it); partial binds the epochs
        fit=functools.partial(fit_and_score, epochs=args.epochs),
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        runner="processes",
        workers=args.workers,
        out=args.out,
    )

    s = result.summary
    low, high = s["ci95"] or (math.nan, math.nan)  # None: no spread (s["ci95_note"])
    table = result.table  # one row per trial, as in results.csv
    print("fold repeat  accuracy      loss")
    for fold, repeat, accuracy, loss in zip(
        table["fold"], table["repeat"], table["accuracy"], table["loss"], strict=True
    ):
        print(f"{fold:4} {repeat:6} {accuracy:9.3f} {loss:9.3f}")
    print(
        f"{s['metric']}: {s['mean']:.3f} +/- {s['std']:.3f} over {s['n_trials']} trials "
        f"(corrected 95% CI {low:.3f} to {high:.3f}); chance is 0.100"
    )
    for source, part in s["variance_components"].get("components", {}).items():
        print(f"variance from {source}: {part['share']:.0%}")
    print(f"results.csv, summary.json and trials/*/checkpoint.pt in {result.out}")


if __name__ == "__main__":
    main()
