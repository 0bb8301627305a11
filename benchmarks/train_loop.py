"""Training-loop throughput: randkit's Trainer against a plain PyTorch DataLoader loop.

Both train the same CNN on digits for the same number of epochs on the CPU, one after the
other in this process. randkit adds named streams (order, dropout via a forked global RNG
per step) and resumability; this measures what that costs, or saves.

    python benchmarks/train_loop.py [--epochs 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from randkit import Streams
from randkit.config import ExperimentConfig
from randkit.data import load_and_prepare
from randkit.models import build_model
from randkit.randomize import Dropout
from randkit.train import Trainer

CONFIG = {
    "seed": 0,
    "model": {"name": "cnn", "args": {"widths": [32, 64], "hidden": 128, "dropout": 0.1}},
    "train": {"epochs": 10, "batch_size": 64, "optimizer": "adamw", "lr": 0.003, "device": "cpu"},
}


def with_torch_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with PyTorch's own nn.Dropout, as a plain PyTorch user would have."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, torch.nn.Dropout(child.p))
    return model


def plain_pytorch(cfg: ExperimentConfig, prepared, model) -> float:  # type: ignore[no-untyped-def]
    """What a user writes by hand: DataLoader over a TensorDataset, shuffle with a generator."""
    model = with_torch_dropout(model)
    loader = DataLoader(
        TensorDataset(prepared.train.x, prepared.train.y),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def randkit_trainer(cfg: ExperimentConfig, prepared, model, streams) -> float:  # type: ignore[no-untyped-def]
    trainer = Trainer(
        model, prepared.train, None, len(prepared.classes), cfg.train, streams, torch.device("cpu")
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    raw = {**CONFIG, "train": {**CONFIG["train"], "epochs": args.epochs}}
    cfg = ExperimentConfig.model_validate(raw)
    streams = Streams(cfg.seed)
    prepared = load_and_prepare(cfg.data, streams)
    samples = len(prepared.train) * cfg.train.epochs
    plain, ours = [], []
    for _ in range(args.repeats):  # interleaved, best of N, so drift hits both alike
        plain.append(plain_pytorch(cfg, prepared, build_model(cfg.model, prepared, streams)))
        ours.append(
            randkit_trainer(cfg, prepared, build_model(cfg.model, prepared, streams), streams)
        )
    plain_rate, our_rate = samples / min(plain), samples / min(ours)
    print(f"plain PyTorch DataLoader loop: {plain_rate:10.0f} samples/s")
    print(f"randkit Trainer:               {our_rate:10.0f} samples/s")
    print(f"ratio (randkit / plain):       {our_rate / plain_rate:10.2f}x")
    print(
        json.dumps(
            {
                "benchmark": "train_loop",
                "ratio": round(our_rate / plain_rate, 3),
                "randkit_samples_per_s": round(our_rate),
                "plain_samples_per_s": round(plain_rate),
                "epochs": cfg.train.epochs,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
