"""The stacked engine: its forward (batched matmuls, grouped convolutions) computes what
``vmap`` of ``functional_call`` computes and hands every other model to ``vmap``; its trainer
trains each member as the single-model trainer would, inside and outside cross-validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from randkit import Streams, global_rng_guard
from randkit.config import TrainConfig, validate_config
from randkit.cv import run_cv
from randkit.data import TensorData
from randkit.errors import UserError
from randkit.models import Classifier, Standardize, zoo
from randkit.randomize import GaussianDropout, GradientNoise, Randomization, use_generator
from randkit.stacked import Member, StackedForward, StackedTrainer, batches
from randkit.train import rules
from randkit.train.loop import Trainer
from test_cv import SMALL

K, BATCH = 3, 7


class _Handout:
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    def draw(self, kind, shape, device, dtype):  # type: ignore[no-untyped-def]
        return self.tensors.pop(0)


def _odd_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.Tanh(),
        nn.Linear(4, 3),  # over the last (width) dimension of (B, C, H, W)
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 1, groups=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.GELU(),
        nn.Conv2d(6, 4, 2, dilation=2, padding=1),
        nn.Flatten(),
        GaussianDropout(0.3),
        nn.Linear(4 * 2 * 1, 5, bias=False),
    )


NETS = {
    "mlp": (lambda: zoo.mlp([1, 8, 8], 10, hidden=[12, 9], dropout=0.25), (1, 8, 8), "image"),
    "cnn": (
        lambda: zoo.cnn([1, 8, 8], 10, widths=[4, 6], hidden=8, dropout=0.2),
        (1, 8, 8),
        "image",
    ),
    # 16 channels, a wider grouped convolution
    "cnn16": (lambda: zoo.cnn([1, 8, 8], 10, widths=[16, 8], hidden=8), (1, 8, 8), "image"),
    "odd": (_odd_net, (2, 8, 8), "image"),
    "tabular": (lambda: zoo.mlp([5], 3, hidden=[4]), (5,), "tabular"),
    # a dense tail with Gaussian dropout and a Linear without bias
    "gauss": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 12),
            nn.ReLU(),
            GaussianDropout(0.3),
            nn.Linear(12, 10, bias=False),
        ),
        (1, 8, 8),
        "image",
    ),
}


def _models(name: str) -> list[Classifier]:
    make, shape, kind = NETS[name]
    out = []
    for k in range(K):
        with torch.random.fork_rng():  # different weights per model, global state kept
            torch.manual_seed(k)
            mean, std = torch.rand(shape[0]), torch.rand(shape[0]) + 0.5
            out.append(Classifier(make(), Standardize(mean, std, kind)).train())
    return out


def _inputs_and_draws(
    models: list[Classifier], shape: tuple[int, ...], g: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A stacked batch, and per model the numbers its stochastic layers draw for it."""
    x = torch.rand(K, BATCH, *shape, generator=g)
    calls: list[tuple[str, tuple[int, ...]]] = []

    class Recorder:
        def draw(self, kind, shape, device, dtype):  # type: ignore[no-untyped-def]
            calls.append((kind, shape))
            return torch.zeros(shape)

    with torch.no_grad(), use_generator(Recorder()):
        models[0](x[0])
    draws = [
        torch.rand(K, *s, generator=g) if kind == "uniform" else torch.randn(K, *s, generator=g)
        for kind, s in calls
    ]
    return x, draws


def _stacked_params(models: list[Classifier]) -> tuple[dict, dict]:
    params, buffers = stack_module_state(models)
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}, buffers


@pytest.mark.parametrize("name", list(NETS))
def test_stacked_forward_and_gradients_equal_vmap(name: str) -> None:
    models = _models(name)
    params, buffers = _stacked_params(models)
    x, draws = _inputs_and_draws(models, NETS[name][1], torch.Generator().manual_seed(1))
    stacked = StackedForward.build(models[0])
    assert stacked is not None
    ours = stacked(params, buffers, x, draws)

    def one(p, b, xb, db):  # type: ignore[no-untyped-def]
        with use_generator(_Handout(db)):
            return functional_call(models[0], (p, b), (xb,))

    theirs = vmap(one, randomness="error")(params, buffers, x, draws)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), [params[next(iter(params))]])
    (grad_theirs,) = torch.autograd.grad(theirs.square().sum(), [params[next(iter(params))]])
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-5, rtol=1e-5)
    if draws:  # the draws matter: other numbers give other outputs
        other = [d.flip(1) for d in draws]
        assert not torch.allclose(stacked(params, buffers, x, other), ours)


def test_models_it_does_not_know_are_left_to_vmap() -> None:
    assert StackedForward.build(zoo.resnet([3, 8, 8], 10, depth=8)) is None
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert StackedForward.build(plain) is None  # not behind randkit's Classifier
    norm = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3)))
    assert StackedForward.build(norm) is None
    reflect = Classifier(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")))
    assert StackedForward.build(reflect) is None
    assert StackedForward.build(Classifier(nn.Sequential(nn.Flatten(0)))) is None


def test_the_vmap_path_still_agrees_with_sequential(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads(json.dumps(SMALL))
    raw["model"] = {"name": "user_models:with_layer_norm", "args": {"hidden": 16}}
    raw["train"].update({"optimizer": "sgd", "lr": 0.05, "momentum": 0.9})
    raw["cv"].update({"folds": 3})
    used = []
    original = StackedTrainer.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        used.append(self.stacked)

    monkeypatch.setattr(StackedTrainer, "__init__", spy)
    sequential = run_cv(validate_config(raw), tmp_path / "seq", quiet=True, report=False)
    raw["cv"]["runner"] = "vectorized"
    vectorized = run_cv(validate_config(raw), tmp_path / "vec", quiet=True, report=False)
    assert used == [None]  # the LayerNorm model went through vmap
    assert np.array_equal(sequential.table["accuracy"], vectorized.table["accuracy"])
    assert np.allclose(sequential.table["loss"], vectorized.table["loss"], atol=1e-4, rtol=0)


def test_batches_gathered_from_the_shared_pool_match_the_per_trial_gathers(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Without per-trial augmentation or noise, all K batches come from one index op on the
    trials' pooled examples. Unequal folds (padded rows) and early stopping (trials that
    stop at different epochs) give the same bits as per-trial gathers, and the sequential
    runner's results."""
    raw = json.loads(json.dumps(SMALL))
    del raw["randomize"]
    raw["model"]["args"]["dropout"] = 0.2  # dropout still draws from each trial's stream
    raw["train"].update(
        {
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "epochs": 4,
            "early_stopping": {"patience": 1, "metric": "loss", "min_delta": 0.05},
        }
    )
    raw["cv"].update({"folds": 4, "inner_val_fraction": 0.1})
    sequential = run_cv(validate_config(raw), tmp_path / "seq", quiet=True, report=False)
    raw["cv"]["runner"] = "vectorized"
    pooled_used = []
    original = batches.SharedPool.batch

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        pooled_used.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(batches.SharedPool, "batch", spy)
    pooled = run_cv(validate_config(raw), tmp_path / "pool", quiet=True, report=False)
    assert pooled_used
    monkeypatch.setattr(batches.SharedPool, "usable", staticmethod(lambda runs, plan: False))
    pooled_used.clear()
    per_trial = run_cv(validate_config(raw), tmp_path / "per", quiet=True, report=False)
    assert not pooled_used
    epochs = [
        len(json.loads((tmp_path / "pool" / "trials" / t / "metrics.json").read_text())["history"])
        for t in pooled.table["id"]
    ]
    assert min(epochs) < 4  # some trial stopped early
    assert sorted(set(pooled.table["train_size"])) == [1212, 1213]  # unequal: padded rows
    for metric in ("accuracy", "loss", "macro_f1"):
        assert pooled.table[metric].tolist() == per_trial.table[metric].tolist(), metric
    for trial in pooled.table["id"]:
        a = (tmp_path / "pool" / "trials" / trial / "model.safetensors").read_bytes()
        b = (tmp_path / "per" / "trials" / trial / "model.safetensors").read_bytes()
        assert a == b, trial
    assert np.array_equal(sequential.table["accuracy"], pooled.table["accuracy"])
    assert np.allclose(sequential.table["loss"], pooled.table["loss"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["cnn16", "mlp"])
def test_test_logits_of_all_trials_at_once_equal_each_models_own(name: str) -> None:
    """The vectorized runner scores every trial's test set in one stacked pass (eval mode:
    no dropout), the shorter sets padded; each trial gets what its own model gives."""
    models = _models(name)
    params, buffers = stack_module_state(models)
    shape = NETS[name][1]
    g = torch.Generator().manual_seed(4)
    sizes = [9, 300, 17]  # unequal, and one longer than a 256-row pass
    xs = [torch.rand(n, *shape, generator=g) for n in sizes]
    trainer = StackedTrainer.__new__(StackedTrainer)  # only what test_logits reads
    trainer.base, trainer.params, trainer.buffers = models[0], params, buffers
    trainer.stacked, trainer.device = StackedForward.build(models[0]), torch.device("cpu")
    ours = trainer.test_logits(xs)
    assert models[0].training  # back in training mode
    for k, (model, x) in enumerate(zip(models, xs, strict=True)):
        with torch.no_grad():
            theirs = model.eval()(x)
        assert ours[k].shape == theirs.shape
        torch.testing.assert_close(ours[k], theirs, atol=1e-5, rtol=1e-5)


def test_a_network_that_reuses_a_layer_is_left_to_vmap() -> None:
    """``named_children`` lists a module used twice once, so the stacked forward would skip
    its second use: such a network takes the ``vmap`` path instead."""
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), shared, nn.ReLU(), shared)
    model = Classifier(net, Standardize(torch.zeros(1), torch.ones(1), "image"))
    assert StackedForward.build(model) is None


def _tabular_members(members: int) -> list[tuple[TensorData, TensorData]]:
    """Each member's own training and validation data (unequal sizes: padded rows)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(members):
        n = 90 + 7 * k
        x = torch.randn(n, 5, generator=g)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
        out.append((TensorData(x[:70], y[:70]), TensorData(x[70:], y[70:])))
    return out


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked-forward", "vmap"])
def test_the_stacked_trainer_trains_each_member_as_the_single_trainer_would(
    stacked: bool, schedule: str
) -> None:
    """Outside cross-validation: K members with their own data and streams, trained at once
    with dropout, weight noise, DropConnect, gradient noise, clipping, a schedule and early
    stopping, end with the weights and histories the single-model ``Trainer`` gives each of
    them (one set of training rules: ``train/rules.py``)."""
    cfg = TrainConfig(
        epochs=4,
        batch_size=16,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        schedule=schedule,
        grad_clip=0.5,
        label_smoothing=0.1,
        early_stopping={"patience": 1, "metric": "loss", "min_delta": 0.1},
    )
    plan = Randomization(
        weight_noise_std=0.02, drop_connect=0.1, grad_noise=GradientNoise(0.01, 0.55)
    )
    data = _tabular_members(3)
    streams = Streams(11)

    def model(k: int) -> nn.Module:
        with torch.random.fork_rng():  # different weights per member, global state kept
            torch.manual_seed(k)
            net = zoo.mlp([5], 3, hidden=[12], dropout=0.2)
            if not stacked:
                net.append(nn.LayerNorm(3))  # not a stacked-forward layer: vmap
            return Classifier(net, Standardize(torch.zeros(5), torch.ones(5), "tabular"))

    cpu = torch.device("cpu")
    members = [Member(streams, tr, val, coords={"member": k}) for k, (tr, val) in enumerate(data)]
    trainer = StackedTrainer([model(k) for k in range(3)], members, cfg, plan, 3, cpu)
    assert (trainer.stacked is not None) == stacked
    trainer.fit()
    lengths = []
    for k, (train, val) in enumerate(data):
        alone = Trainer(model(k), train, val, 3, cfg, streams, cpu, plan, member=k)
        alone.fit()
        lengths.append(len(alone.state.history))
        assert len(trainer.histories[k]) == len(alone.state.history)
        for ours, theirs in zip(trainer.histories[k], alone.state.history, strict=True):
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-4), (k, key)
        theirs = alone.model.state_dict()
        for name, value in trainer.weights(k).items():
            torch.testing.assert_close(value, theirs[name], atol=1e-5, rtol=1e-4)
    assert min(lengths) < cfg.epochs  # early stopping took some member before the end


def test_gradient_clipping_is_torchs_rule_for_each_stacked_model() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, 5, generator=g) * 3, torch.randn(3, 7, generator=g) * 0.01]
    grads[0][1] *= 1e-3  # model 1 is under the limit: left alone
    stacked = [t.clone() for t in grads]
    rules.clip_gradients(stacked, 1.0)
    for k in range(3):
        params = [nn.Parameter(torch.zeros_like(t[k])) for t in grads]
        for p, t in zip(params, grads, strict=True):
            p.grad = t[k].clone()
        nn.utils.clip_grad_norm_(params, 1.0)
        for p, t in zip(params, stacked, strict=True):
            torch.testing.assert_close(t[k], p.grad, atol=0, rtol=1e-6)
    assert torch.equal(stacked[0][1], grads[0][1])


def test_clipping_takes_scalar_parameters_too() -> None:
    scalar, matrix = torch.tensor(3.0), torch.full((2, 2), 2.0)
    grads = [scalar.unsqueeze(0), matrix.unsqueeze(0)]  # one model, as the Trainer calls it
    rules.clip_gradients(grads, 1.0)
    norm = torch.sqrt(scalar**2 + matrix.square().sum())
    torch.testing.assert_close(norm, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_vectorized_cv_with_a_schedule_leaves_the_global_rngs_alone(tmp_path: Path) -> None:
    """A learning-rate schedule (here cosine) drives the stacked trainer through a stand-in
    optimizer per member; building it must draw nothing from torch's global RNG."""
    raw = json.loads(json.dumps(SMALL))
    raw["train"].update({"epochs": 1, "schedule": "cosine"})
    raw["cv"].update({"folds": 2, "runner": "vectorized"})
    with global_rng_guard():
        result = run_cv(validate_config(raw), tmp_path / "run", quiet=True, report=False)
    assert len(result.table) == 2


class _RowlessNoise(nn.Module):
    """A stochastic layer whose draw is not one row per example (one number per feature)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        from randkit.randomize.modules import draw

        return x * (1 + 0.1 * draw("rowless", "normal", (x.shape[-1],), x))


def test_a_layer_whose_draw_is_not_one_row_per_example_is_refused_by_name() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), _RowlessNoise(), nn.Linear(8, 3))
    model = Classifier(net, Standardize(torch.zeros(1), torch.ones(1), "image"))
    train = TensorData(torch.rand(20, 1, 8, 8), torch.randint(0, 3, (20,)))
    member = Member(Streams(1), train)
    cfg = TrainConfig(epochs=1, batch_size=8)
    trainer = StackedTrainer(
        [model, copy.deepcopy(model)],
        [member, member],
        cfg,
        Randomization(),
        3,
        torch.device("cpu"),
    )
    with pytest.raises(UserError, match=r"^model: a stochastic layer draws numbers of shape \[8\]"):
        trainer.fit()
