"""The scripts in examples/ run as a user runs them (``python examples/X.py --quick``) in a
fresh interpreter, and give what a user relies on: exit code 0, one row of results.csv per
trial, a summary, files on disk, and a headline metric better than chance or a trivial
baseline."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(
    name: str, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python examples/NAME --quick --out run ARGS`` in ``cwd``; fails with its output."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", "--out", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def results(run: Path) -> list[dict[str, Any]]:
    with (run / "results.csv").open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows])


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def load_example(name: str) -> ModuleType:
    """An example as a module (its ``main()`` does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_png_dataset_parts_at_module_level(tmp_path: Path) -> None:
    """make_vehicles, PngFolder and SmallCNN are importable (a benchmark uses them)."""
    import torch

    example = load_example("own_model_png_dataset.py")
    folder = example.make_vehicles(tmp_path / "a", per_class=3, seed=5)
    again = example.make_vehicles(tmp_path / "b", per_class=3, seed=5)
    dataset = example.PngFolder(folder)
    assert len(dataset) == 9 and dataset.classes == ["bicycle", "car", "truck"]
    for a, b in zip(sorted(folder.rglob("*.png")), sorted(again.rglob("*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes()  # same seed, same pixels
    x, label = dataset[8]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == 2
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    model = example.SmallCNN(num_classes=3)
    assert model(torch.stack([dataset[i][0] for i in range(4)])).shape == (4, 3)


@pytest.mark.slow
def test_own_model_png_dataset(tmp_path: Path) -> None:
    run_example("own_model_png_dataset.py", tmp_path, "--data-dir", "pngs")
    pngs = {p.name: len(list(p.glob("*.png"))) for p in (tmp_path / "pngs").iterdir()}
    assert pngs == {"bicycle": 60, "car": 60, "truck": 60}
    run = tmp_path / "run"
    rows = results(run)
    assert len(rows) == 3  # 3 folds x 1 repeat
    assert sum(int(r["test_size"]) for r in rows) == 180  # every image tested once
    s = summary(run)
    assert s["metric"] == "accuracy" and s["n_trials"] == 3
    assert s["mean"] > 0.5  # chance is 1/3
    for r in rows:
        assert (run / "trials" / r["id"] / "model.safetensors").exists()


@pytest.mark.slow
def test_diabetes_regression(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes

    proc = run_example("diabetes_regression.py", tmp_path)
    run = tmp_path / "run"
    rows = results(run)
    assert len(rows) == 6  # 3 folds x 2 repeats
    s = summary(run)
    assert s["metric"] == "rmse" and s["task"] == "regression"
    # the baseline on the same folds: predict the training fold's mean
    _, y = load_diabetes(return_X_y=True)
    plan = {t["id"]: t for t in json.loads((run / "plan.json").read_text())["trials"]}
    baseline = []
    for r in rows:
        train, test = y[plan[r["id"]]["train_idx"]], y[plan[r["id"]]["test_idx"]]
        baseline.append(np.sqrt(np.mean((test - train.mean()) ** 2)))
    baseline = np.array(baseline)
    rmse = column(rows, "rmse")
    assert rmse.mean() < 0.85 * baseline.mean()  # about 55 against 77
    assert s["mean"] == pytest.approx(rmse.mean())
    assert f"baseline: rmse {baseline.mean():.2f}" in proc.stdout


@pytest.mark.slow
def test_multilabel(tmp_path: Path) -> None:
    example = load_example("multilabel.py")
    run_example("multilabel.py", tmp_path)
    run = tmp_path / "run"
    rows = results(run)
    assert len(rows) == 3  # 3 folds x 1 repeat
    s = summary(run)
    assert s["metric"] == "macro_f1" and s["task"] == "multilabel"
    _, y = example.make_multilabel(600, seed=0)  # the data of --quick
    assert s["mean"] > example.all_yes_macro_f1(y) + 0.1  # about 0.66 against 0.47
    assert column(rows, "auroc").mean() > 0.8  # a random ranking gives 0.5
    hamming = column(rows, "hamming_loss")  # the custom metric callable
    assert (0 < hamming).all() and (hamming < 0.3).all()
    if importlib.util.find_spec("torchmetrics") is not None:
        assert (column(rows, "average_precision") > 0.5).all()


@pytest.mark.slow
def test_own_training_loop(tmp_path: Path) -> None:
    run_example("own_training_loop.py", tmp_path)  # runner="processes", 2 workers
    run = tmp_path / "run"
    rows = results(run)
    assert len(rows) == 6  # 3 folds x 2 repeats
    s = summary(run)
    assert s["metric"] == "accuracy" and s["runner"] == "processes"
    assert s["mean"] > 0.7  # chance is 0.1
    assert (column(rows, "loss") > 0).all()
    for r in rows:
        folder = run / "trials" / r["id"]
        assert (folder / "checkpoint.safetensors").exists()
        assert not list(folder.glob("*.pt"))  # no pickle files
        history = json.loads((folder / "history.json").read_text())
        assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # trial.report per epoch
    # a trial that did not finish: the rerun resumes it from its checkpoint (here after the
    # last epoch, so it only scores the saved weights) and keeps its learning curve
    last = run / "trials" / rows[-1]["id"]
    (last / "metrics.json").unlink()
    run_example("own_training_loop.py", tmp_path)
    again = results(run)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert len(json.loads((last / "history.json").read_text())) == 4


@pytest.mark.slow
def test_lightning_ray(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("ray")
    run_example("lightning_ray.py", tmp_path, env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    run = tmp_path / "run"
    rows = results(run)
    assert len(rows) == 3  # 3 folds x 1 repeat
    s = summary(run)
    assert s["metric"] == "accuracy" and s["runner"] == "ray"
    assert s["mean"] > 0.5  # chance is 0.1
    for r in rows:
        folder = run / "trials" / r["id"]
        assert (folder / "model.safetensors").exists() and (folder / "checkpoint.json").exists()
