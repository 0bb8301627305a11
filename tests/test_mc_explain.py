"""Monte-Carlo predictors and SmoothGrad."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli, write_config
from randkit import global_rng_guard
from randkit.deploy.explain import smoothgrad
from randkit.deploy.mc import MonteCarlo
from randkit.randomize import Compose, Dropout, HorizontalFlip
from randkit.streams import seeded_generator


def net(dropout: float, torch_dropout: bool = False) -> nn.Module:
    layer = nn.Dropout(dropout) if torch_dropout else Dropout(dropout)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # test-only: fixed weights for a throwaway model
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), layer, nn.Linear(32, 4))


def inputs(n: int = 16) -> torch.Tensor:
    return torch.rand((n, 3, 2, 2), generator=seeded_generator(1))


@pytest.mark.parametrize("kind", ["dropout", "weight_noise", "tta"])
def test_a_seed_replays_exactly_and_another_seed_differs(kind: str) -> None:
    transforms = Compose([HorizontalFlip(p=0.5)])
    mc = MonteCarlo(net(0.5), kind, samples=6, transforms=transforms, noise_std=0.1)
    x = inputs()
    first, again, other = mc.predict(x, seed=11), mc.predict(x, seed=11), mc.predict(x, seed=12)
    assert np.array_equal(first.sample_probs, again.sample_probs)
    assert not np.array_equal(first.sample_probs, other.sample_probs)
    assert first.sample_probs.shape == (6, 16, 4)
    assert np.allclose(first.probs.sum(1), 1, atol=1e-5)
    assert (first.mutual_information >= 0).all() and (first.variance >= 0).all()


@pytest.mark.parametrize("torch_dropout", [False, True])
def test_mc_dropout_with_rate_zero_is_the_plain_model(torch_dropout: bool) -> None:
    model, x = net(0.0, torch_dropout), inputs()
    with torch.no_grad():
        plain = torch.softmax(model(x), 1).numpy()
    result = MonteCarlo(model, "dropout", samples=4).predict(x, seed=3)
    assert np.allclose(result.probs, plain, atol=1e-7)
    assert np.allclose(result.mutual_information, 0, atol=1e-6)


def test_mc_dropout_keeps_mode_and_global_rngs() -> None:
    model = net(0.5, torch_dropout=True)
    model.eval()
    with global_rng_guard():
        result = MonteCarlo(model, "dropout", samples=5).predict(inputs(), seed=1)
    assert not model.training and not any(m.training for m in model.modules())
    assert result.mutual_information.mean() > 0  # the samples disagree


def test_ensemble_averages_its_members() -> None:
    a, b, x = net(0.0), nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), inputs()
    result = MonteCarlo([a, b], "ensemble").predict(x)
    with torch.no_grad():
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)).numpy() / 2
    assert np.allclose(result.probs, expected, atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        MonteCarlo(net(0.1), "bogus")
    with pytest.raises(ValueError, match="needs transforms"):
        MonteCarlo(net(0.1), "tta")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        MonteCarlo(net(0.1), "dropout", samples=0)


def test_smoothgrad_one_sample_no_noise_is_the_input_gradient() -> None:
    model, x = net(0.0), inputs(5)
    target = torch.tensor([0, 1, 2, 3, 0])
    plain_input = x.clone().requires_grad_(True)
    model(plain_input).gather(1, target.view(-1, 1)).sum().backward()
    maps = smoothgrad(model, x, target, samples=1, sigma=0.0, generator=seeded_generator(0))
    assert torch.allclose(maps, plain_input.grad)


def test_smoothgrad_replays_with_its_seed() -> None:
    model, x = net(0.0), inputs(5)
    a = smoothgrad(model, x, None, 8, 0.2, seeded_generator(9))
    b = smoothgrad(model, x, None, 8, 0.2, seeded_generator(9))
    c = smoothgrad(model, x, None, 8, 0.2, seeded_generator(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mc")
    raw = {
        "seed": 1,
        "data": {"kind": "digits"},
        "model": {"name": "cnn", "args": {"widths": [4], "hidden": 16, "dropout": 0.3}},
        "train": {"epochs": 1, "device": "cpu"},
        "randomize": {"augment": [{"kind": "crop", "padding": 1}]},
    }
    config = write_config(folder, raw)
    out = folder / "run"
    assert run_cli("train", str(config), "--out", str(out), "--quiet").returncode == 0
    return out


def test_cli_explain_and_evaluate_mc(trained_run: Path) -> None:
    explained = run_cli(
        "explain", str(trained_run), "--samples", "4", "--index", "0", "--index", "3"
    )
    assert explained.returncode == 0, explained.stderr
    assert (trained_run / "smoothgrad.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("explain", str(trained_run), "--index", "100000")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --index")
    evaluated = run_cli(
        "evaluate", str(trained_run), "--mc", "dropout:4", "--mc", "tta:3", "--seed", "5"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((trained_run / "uncertainty.json").read_text())
    for kind in ("dropout", "tta"):
        for key in ("accuracy", "nll", "brier", "ece", "ece_adaptive", "aurc"):
            assert key in report[kind]
        assert (trained_run / f"reliability-{kind}.png").is_file()
    assert report["dropout"]["samples"] == 4 and report["dropout"]["seed"] == 5
    wrong = run_cli("evaluate", str(trained_run), "--mc", "dropout:x")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: --mc")


def test_cli_export_writes_a_loadable_bundle(trained_run: Path, tmp_path: Path) -> None:
    from randkit.deploy.bundle import load_bundle

    repository = tmp_path / "repo"
    done = run_cli("export", str(trained_run), "--repository", str(repository), "--name", "dg")
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(repository / "dg" / "1")
    assert bundle.input_shape == [1, 8, 8] and len(bundle.models) == 1
    again = run_cli(
        "export",
        str(trained_run),
        "--repository",
        str(repository),
        "--name",
        "dg",
        "--version",
        "1",
    )
    assert again.returncode == 2 and again.stderr.startswith("error: version")


def test_cv_fold_ensemble_on_the_holdout(tmp_path: Path) -> None:
    raw = {
        "seed": 2,
        "data": {"kind": "digits"},
        "model": {"name": "mlp", "args": {"hidden": [16]}},
        "train": {"epochs": 2, "device": "cpu"},
        "cv": {"folds": 3, "holdout_fraction": 0.2},
    }
    config = write_config(tmp_path, raw)
    run = tmp_path / "cv"
    assert run_cli("cv", str(config), "--out", str(run), "--quiet").returncode == 0
    plan = json.loads((run / "plan.json").read_text())
    held = set(plan["holdout"])
    assert len(held) == 360
    assert not held & {i for t in plan["trials"] for i in t["train_idx"] + t["test_idx"]}
    done = run_cli("evaluate", str(run), "--mc", "ensemble")
    assert done.returncode == 0, done.stderr
    report = json.loads((run / "uncertainty.json").read_text())["ensemble"]
    assert report["members"] == 3 and report["holdout_size"] == 360
    assert 0.5 < report["accuracy"] <= 1.0
    refused = run_cli("evaluate", str(run), "--mc", "dropout:4")
    assert refused.returncode == 2 and "only --mc ensemble" in refused.stderr
