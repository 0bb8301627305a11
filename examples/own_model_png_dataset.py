"""Cross-validate your own CNN on your own Dataset of PNG files.

The script first draws a small image set, "vehicles" (car, truck, bicycle; 32x32 PNGs with
random position, size, colours, direction and pixel noise) into --data-dir, one folder per
class. Then:

* ``PngFolder`` is an ordinary map-style ``torch.utils.data.Dataset``: ``__getitem__`` opens
  one PNG with Pillow and returns ``(tensor, label)``. Nothing is loaded up front; randkit
  reads the items batch by batch through ``DataLoader`` workers (``num_workers=2``).
* ``SmallCNN`` is an ordinary ``nn.Module``. randkit calls ``SmallCNN(num_classes=3)`` once
  per trial, with the initial weights drawn from that trial's ``init`` stream.
* ``randkit.cross_validate`` runs 5-fold cross-validation (stratified by class), with random
  horizontal flips as training augmentation, and writes results.csv and summary.json to --out.

    python examples/own_model_png_dataset.py               # about a minute on a laptop CPU
    python examples/own_model_png_dataset.py --quick       # a few seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset

import randkit

CLASSES = ("car", "truck", "bicycle")
SIZE = 32


# -- 1. a small image set on disk ---------------------------------------------------------
def _colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    r, g, b = rng.integers(low, high, size=3)
    return int(r), int(g), int(b)


def _draw(kind: str, rng: np.random.Generator) -> Image.Image:
    """One 32x32 drawing of ``kind`` facing right; the caller may mirror it."""
    image = Image.new("RGB", (SIZE, SIZE), _colour(rng, 150, 256))  # light background
    draw = ImageDraw.Draw(image)
    body, wheel = _colour(rng, 0, 140), (20, 20, 20)
    scale = rng.uniform(0.65, 1.0)
    x0 = int(rng.integers(0, 5))
    ground = int(rng.integers(24, 31))  # where the wheels touch the ground
    if kind == "car":  # long low body, small cabin on top, two wheels
        length, r = int(26 * scale), max(2, int(3.5 * scale))
        top = ground - r - int(6 * scale)
        draw.rectangle([x0, top, x0 + length, ground - r], fill=body)
        draw.rectangle(
            [x0 + length // 4, top - int(5 * scale), x0 + 3 * length // 4, top], fill=body
        )
        for cx in (x0 + length // 5, x0 + 4 * length // 5):
            draw.ellipse([cx - r, ground - 2 * r, cx + r, ground], fill=wheel)
    elif kind == "truck":  # tall cargo box, cab in front, three wheels
        length, r = int(27 * scale), max(2, int(3 * scale))
        top = ground - r - int(14 * scale)
        cargo_end = x0 + 2 * length // 3
        draw.rectangle([x0, top, cargo_end, ground - r], fill=body)
        draw.rectangle([cargo_end + 1, top + int(5 * scale), x0 + length, ground - r], fill=body)
        for cx in (x0 + length // 6, x0 + length // 2, x0 + 5 * length // 6):
            draw.ellipse([cx - r, ground - 2 * r, cx + r, ground], fill=wheel)
    else:  # bicycle: two large thin wheels joined by a triangular frame
        r = max(4, int(6 * scale))
        back, front = x0 + r + 1, x0 + r + 1 + int(15 * scale)
        hub = ground - r
        for cx in (back, front):
            draw.ellipse([cx - r, hub - r, cx + r, hub + r], outline=wheel, width=1)
        seat = ((back + front) // 2 - 2, hub - r - 2)
        draw.line([(back, hub), seat, ((back + front) // 2 + 2, hub), (back, hub)], fill=body)
        draw.line([seat, (front - 1, hub - r - 3), (front, hub)], fill=body, width=1)
    return image


def make_vehicles(folder: str | Path, per_class: int, seed: int = 0) -> Path:
    """Write ``per_class`` PNGs of each class to ``folder/<class>/<i>.png`` (reproducible:
    the same seed gives the same pixels)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for old in (folder / kind).glob("*.png"):  # a smaller set replaces a larger one
            old.unlink()
        for i in range(per_class):
            image = _draw(kind, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 30, (SIZE, SIZE, 3))
            noisy = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            noisy.save(folder / kind / f"{i:05d}.png")
    return folder


# -- 2. the user's Dataset: one PNG read per item -------------------------------------------
class PngFolder(Dataset):
    """``root/<class>/*.png`` as ``(3x32x32 float tensor in [0, 1], class index)`` items."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files: list[Path] = []
        self.targets: list[int] = []  # randkit reads labels from here (no pass over images)
        for label, name in enumerate(self.classes):
            for path in sorted((root / name).glob("*.png")):
                self.files.append(path)
                self.targets.append(label)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1), self.targets[index]


# -- 3. the user's model ----------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Two conv blocks and a small classifier head for 3x32x32 images."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 8 * 8, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="vehicles", help="where the PNGs are written")
    parser.add_argument("--out", default="runs/own_model_png", help="run folder")
    parser.add_argument("--per-class", type=int, default=200, help="images per class")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.epochs, args.folds = 60, 6, 3

    folder = make_vehicles(args.data_dir, args.per_class, args.seed)
    dataset = PngFolder(folder)
    print(f"{len(dataset)} images of {dataset.classes} in {folder}")

    result = randkit.cross_validate(
        SmallCNN,  # called as SmallCNN(num_classes=3) in every trial
        dataset,
        folds=args.folds,
        seed=args.seed,
        train={"epochs": args.epochs, "batch_size": 32, "lr": 2e-3},
        randomize={"augment": [{"kind": "hflip"}]},  # drawn from each trial's augment stream
        num_workers=2,  # DataLoader worker processes read the PNGs
        out=args.out,
    )

    s = result.summary
    low, high = s["ci95"] or (math.nan, math.nan)  # None: no spread (s["ci95_note"])
    table = result.table  # one row per trial, as in results.csv
    print("fold repeat  accuracy  macro_f1")
    for fold, repeat, accuracy, macro_f1 in zip(
        table["fold"], table["repeat"], table["accuracy"], table["macro_f1"], strict=True
    ):
        print(f"{fold:4} {repeat:6} {accuracy:9.3f} {macro_f1:9.3f}")
    print(
        f"{s['metric']}: {s['mean']:.3f} +/- {s['std']:.3f} over {s['n_trials']} folds "
        f"(95% CI, corrected for overlapping training sets: {low:.3f} to {high:.3f}); "
        f"chance is {1 / len(dataset.classes):.3f}"
    )
    print(f"results.csv and summary.json in {result.out}")


if __name__ == "__main__":
    main()
