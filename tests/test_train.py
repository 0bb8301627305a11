"""The training engine: reproducibility, stream separation, schedules, early stopping."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_EXPERIMENT, merged, run_cli, write_config
from randkit import Streams, global_rng_guard
from randkit.config import TrainConfig, validate_config
from randkit.data import load_and_prepare
from randkit.models import build_model
from randkit.train import Trainer, train_run
from randkit.train.optim import make_optimizer, make_scheduler


def _train(tmp_path: Path, name: str, **sections: object) -> Path:
    cfg = validate_config(merged(FAST_EXPERIMENT, **sections))
    out = tmp_path / name
    train_run(cfg, out, quiet=True)
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_run_directory_holds_every_artifact(tmp_path: Path) -> None:
    out = _train(tmp_path, "run")
    for name in (
        "config.yaml",
        "metrics.json",
        "model.safetensors",
        "state.json",
        "checkpoint.safetensors",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["test"]["loss"] > 0
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["sizes"] == {"train": 1437, "test": 360, "val": 0}
    assert json.loads((out / "state.json").read_text())["complete"] is True
    # The resolved config written out reproduces the run's fingerprint.
    resolved = validate_config(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert resolved.fingerprint() == validate_config(FAST_EXPERIMENT).fingerprint()


def test_same_seed_gives_byte_identical_model_and_other_seed_does_not(tmp_path: Path) -> None:
    a = _train(tmp_path, "a")
    b = _train(tmp_path, "b")
    c = _train(tmp_path, "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def _trainer(root: int, seeds: dict[str, int]) -> Trainer:
    cfg = validate_config(merged(FAST_EXPERIMENT, seed=root, seeds=seeds))
    streams = Streams(cfg.seed, cfg.seeds)
    prepared = load_and_prepare(cfg.data, streams)
    model = build_model(cfg.model, prepared, streams)
    return Trainer(model, prepared.train, prepared.val, 10, cfg.train, streams, torch.device("cpu"))


def test_pinning_a_source_fixes_only_what_it_drives() -> None:
    a, b = _trainer(1, {"order": 7, "split": 5}), _trainer(2, {"order": 7, "split": 5})
    # Pinned: batch order and the train/test split stay.
    assert torch.equal(a.batch_order(0), b.batch_order(0))
    assert torch.equal(a.batch_order(1), b.batch_order(1))
    assert torch.equal(a.train_data.y, b.train_data.y)
    assert torch.equal(a.train_data.x, b.train_data.x)
    # Not pinned: the initial weights follow the root seed.
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert not torch.equal(wa["net.1.weight"], wb["net.1.weight"])
    # Without the pin the order changes with the root seed, and epochs differ from each other.
    c, d = _trainer(1, {}), _trainer(2, {})
    assert not torch.equal(c.batch_order(0), d.batch_order(0))
    assert not torch.equal(c.batch_order(0), c.batch_order(1))


def test_whole_run_leaves_global_rngs_untouched(tmp_path: Path) -> None:
    cfg = validate_config(
        merged(
            FAST_EXPERIMENT,
            data={"val_fraction": 0.1},
            model={"name": "cnn", "args": {"dropout": 0.3}},
            train={"early_stopping": {"patience": 3}},
        )
    )
    with global_rng_guard():
        train_run(cfg, tmp_path / "guarded", quiet=True)


def test_dropout_is_driven_by_its_stream(tmp_path: Path) -> None:
    # Same everything but the pinned dropout seed: different weights; same pin: identical.
    with_dropout = {"name": "mlp", "args": {"hidden": [32], "dropout": 0.5}}
    a = _train(tmp_path, "a", model=with_dropout, seeds={"dropout": 1})
    b = _train(tmp_path, "b", model=with_dropout, seeds={"dropout": 2})
    c = _train(tmp_path, "c", model=with_dropout, seeds={"dropout": 1})
    assert not torch.equal(_weights(a)["net.1.weight"], _weights(b)["net.1.weight"])
    assert torch.equal(_weights(a)["net.1.weight"], _weights(c)["net.1.weight"])


def _lrs(schedule: str, **train: object) -> list[float]:
    cfg = TrainConfig(epochs=10, batch_size=1000, lr=0.1, schedule=schedule, **train)
    optimizer = make_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


def test_schedules_follow_their_shapes() -> None:
    assert set(_lrs("constant")) == {0.1}
    step = _lrs("step", step_epochs=3, step_gamma=0.5)
    assert step[0] == 0.1 and math.isclose(step[30], 0.05) and math.isclose(step[60], 0.025)
    cosine = _lrs("cosine")
    assert cosine[0] == 0.1 and cosine[-1] < 0.001
    assert all(x >= y for x, y in itertools.pairwise(cosine))
    warm = _lrs("cosine", warmup_epochs=2)
    assert math.isclose(warm[0], 0.001) and max(warm) == pytest.approx(0.1)
    assert warm.index(max(warm)) == 20
    one = _lrs("onecycle")
    assert one[0] < 0.01 and max(one) == pytest.approx(0.1, rel=1e-3) and one[-1] < 1e-3


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_learn_digits(tmp_path: Path, optimizer: str) -> None:
    lr = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01}[optimizer]
    out = _train(
        tmp_path,
        optimizer,
        train={
            "optimizer": optimizer,
            "lr": lr,
            "epochs": 5,
            "label_smoothing": 0.1,
            "weight_decay": 1e-4,
            "schedule": "cosine",
        },
    )
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy"] > 0.85


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path: Path) -> None:
    # An impossible min_delta: only epoch 1 ever "improves", so training stops after
    # 1 + patience epochs and the kept weights are epoch 1's.
    stopped = _train(
        tmp_path,
        "stopped",
        data={"val_fraction": 0.1},
        train={"epochs": 10, "early_stopping": {"patience": 2, "min_delta": 100}},
    )
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1
    one_epoch = _train(tmp_path, "one", data={"val_fraction": 0.1}, train={"epochs": 1})
    for name, tensor in _weights(one_epoch).items():
        assert torch.equal(tensor, _weights(stopped)[name]), name


def test_changed_config_is_refused_and_restart_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path, FAST_EXPERIMENT)
    assert run_cli("train", str(config), "--out", str(out), "--quiet").returncode == 0
    first = (out / "model.safetensors").read_bytes()
    other = write_config(tmp_path, merged(FAST_EXPERIMENT, train={"lr": 0.02}), "other.yaml")
    refused = run_cli("train", str(other), "--out", str(out), "--quiet")
    assert refused.returncode == 2
    assert "different config" in refused.stderr and "--restart" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == first
    restarted = run_cli("train", str(other), "--out", str(out), "--quiet", "--restart")
    assert restarted.returncode == 0
    assert (out / "model.safetensors").read_bytes() != first


def test_cli_train_prints_summary_and_quiet_silences(tmp_path: Path) -> None:
    config = write_config(tmp_path, FAST_EXPERIMENT)
    loud = run_cli("train", str(config), "--out", str(tmp_path / "loud"))
    assert loud.returncode == 0 and "test accuracy" in loud.stdout
    quiet = run_cli(
        "train",
        str(config),
        "--out",
        str(tmp_path / "quiet"),
        "--quiet",
        "--epochs",
        "1",
        "--seed",
        "9",
    )
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    resolved = (tmp_path / "quiet" / "config.yaml").read_text()
    assert "epochs: 1" in resolved and "seed: 9" in resolved


def test_version_and_help() -> None:
    assert run_cli("version").stdout.startswith("randkit ")
    helped = run_cli("--help")
    assert helped.returncode == 0 and "train" in helped.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_runs_and_is_repeatable(tmp_path: Path) -> None:
    a = _train(tmp_path, "a", train={"device": "cuda"})
    b = _train(tmp_path, "b", train={"device": "cuda"})
    for name, tensor in _weights(a).items():
        assert torch.allclose(tensor, _weights(b)[name], atol=1e-6), name


def test_macro_f1_from_per_class_f1_equals_scikit_learns_macro_average() -> None:
    """The cross-validation record passes the per-class F1 it already has; the macro-F1 must
    be scikit-learn's own, classes never predicted or absent included."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    from randkit.train.metrics import classification_metrics

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        k = 2 + trial % 9
        n = 5 + trial
        targets = torch.randint(0, k, (n,), generator=g)
        logits = torch.randn(n, k, generator=g)
        logits[:, -1] -= 10  # the last class is never predicted
        f1 = precision_recall_fscore_support(
            targets.numpy(), logits.argmax(1).numpy(), labels=list(range(k)), zero_division=0
        )[2]
        plain = classification_metrics(logits, targets, k)
        given = classification_metrics(logits, targets, k, per_class_f1=f1)
        assert given == plain
        assert np.isclose(plain["macro_f1"], f1.mean(), rtol=0, atol=0)
