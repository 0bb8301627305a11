"""The vectorized runner's stacked forward (batched matmuls, grouped convolutions) computes
what ``vmap`` of ``functional_call`` computes, and hands every other model to ``vmap``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F

from randkit.config import validate_config
from randkit.cv import native_matmul, run_cv
from randkit.cv.lockstep import Lockstep
from randkit.cv.stacked import StackedForward
from randkit.models import Classifier, Standardize, zoo
from randkit.randomize import GaussianDropout, use_generator
from test_cv import METRICS, SMALL

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
    # 16 channels: the first convolution and its pooling take the compiled kernel
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
    original = Lockstep.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        used.append(self.stacked)

    monkeypatch.setattr(Lockstep, "__init__", spy)
    sequential = run_cv(validate_config(raw), tmp_path / "seq", quiet=True, report=False)
    raw["cv"]["runner"] = "vectorized"
    vectorized = run_cv(validate_config(raw), tmp_path / "vec", quiet=True, report=False)
    assert used == [None]  # the LayerNorm model went through vmap
    assert np.array_equal(sequential.table["accuracy"], vectorized.table["accuracy"])
    assert np.allclose(sequential.table["loss"], vectorized.table["loss"], atol=1e-4, rtol=0)


def test_an_mlp_trains_the_same_with_and_without_autograd(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The vectorized runner takes an MLP's gradients from its dense tail directly (no
    autograd engine); with dropout, mixup's soft targets, label smoothing, gradient noise and
    clipping, every trial's metrics and saved weights equal those of the autograd path bit
    for bit."""
    raw = json.loads(json.dumps(SMALL))
    raw["model"] = {"name": "mlp", "args": {"hidden": [32, 16], "dropout": 0.2}}
    raw["train"].update({"label_smoothing": 0.1, "grad_clip": 1.0})
    raw["randomize"] = {
        "augment": [{"kind": "mixup", "alpha": 0.4, "p": 0.5}],
        "grad_noise": {"eta": 0.01},
    }
    raw["cv"].update({"folds": 3, "runner": "vectorized"})
    calls = []
    original = StackedForward.loss_and_grads

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(self, *args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(StackedForward, "loss_and_grads", spy)
    direct = run_cv(validate_config(raw), tmp_path / "direct", quiet=True, report=False)
    assert calls and all(calls)
    monkeypatch.setattr(StackedForward, "loss_and_grads", lambda self, *a, **k: None)
    autograd = run_cv(validate_config(raw), tmp_path / "autograd", quiet=True, report=False)
    for metric in METRICS:
        assert direct.table[metric].tolist() == autograd.table[metric].tolist(), metric
    for trial in direct.table["id"]:
        a = (tmp_path / "direct" / "trials" / trial / "model.safetensors").read_bytes()
        b = (tmp_path / "autograd" / "trials" / trial / "model.safetensors").read_bytes()
        assert a == b, trial


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
    original = Lockstep._pooled_batch

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        pooled_used.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Lockstep, "_pooled_batch", spy)
    pooled = run_cv(validate_config(raw), tmp_path / "pool", quiet=True, report=False)
    assert pooled_used
    monkeypatch.setattr(Lockstep, "_shared_pool", lambda self: None)
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
    trainer = Lockstep.__new__(Lockstep)  # only what test_logits reads
    trainer.base, trainer.params, trainer.buffers = models[0], params, buffers
    trainer.stacked, trainer.device = StackedForward.build(models[0]), torch.device("cpu")
    ours = trainer.test_logits(xs)
    assert models[0].training  # back in training mode
    for k, (model, x) in enumerate(zip(models, xs, strict=True)):
        with torch.no_grad():
            theirs = model.eval()(x)
        assert ours[k].shape == theirs.shape
        torch.testing.assert_close(ours[k], theirs, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["avx512", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The dense tail's products on randkit's AVX-512 kernel, or on torch (the kernel off)."""
    if request.param == "torch":
        monkeypatch.setattr(native_matmul, "native", None)
    elif not native_matmul.has_native_kernel():
        pytest.skip("the AVX-512 kernel is not built or this CPU lacks AVX-512")
    return request.param


def _tail_case(
    name: str, seed: int
) -> tuple[StackedForward, dict, dict, torch.Tensor, list[torch.Tensor], int, torch.Generator]:
    """A net's stacked forward, stacked parameters and buffers, a batch with its draws, the
    number of classes and the generator, for the dense-tail tests."""
    models = _models(name)
    stacked = StackedForward.build(models[0])
    assert stacked is not None
    params, buffers = _stacked_params(models)
    g = torch.Generator().manual_seed(seed)
    x, draws = _inputs_and_draws(models, NETS[name][1], g)
    classes = stacked(params, buffers, x, draws).shape[-1]
    return stacked, params, buffers, x, draws, classes, g


@pytest.mark.parametrize("target_kind", ["classes", "smoothed", "probabilities"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "gauss", "odd", "tabular"])
def test_the_hand_written_dense_tail_equals_autograd(
    name: str, target_kind: str, kernel: str
) -> None:
    """``StackedForward.loss`` runs the Linear/ReLU/dropout end of the network and the
    cross-entropy as one node with a hand-written backward; losses, logits and every
    parameter's gradient (the convolutions' too, through the tail's input gradient) equal
    autograd's through the plain stacked forward, with padded rows and per-trial weights,
    whether the products run on randkit's AVX-512 kernel or on torch.bmm."""
    stacked, params, buffers, x, draws, classes, g = _tail_case(name, 2)
    assert stacked.tail is not None
    row_weight = torch.ones(K, BATCH)
    row_weight[1, -3:] = 0  # padded rows
    if target_kind == "probabilities":
        target = torch.softmax(3 * torch.randn(K, BATCH, classes, generator=g), -1)
    else:
        target = torch.randint(0, classes, (K, BATCH), generator=g)
    smoothing = 0.0 if target_kind == "classes" else 0.1
    per_trial = torch.rand(K, generator=g) + 0.5  # the backward scales each trial's loss

    losses, logits = stacked.loss(params, buffers, x, target, row_weight, draws, smoothing)
    ours = torch.autograd.grad((losses * per_trial).sum(), list(params.values()))

    ref_logits = stacked(params, buffers, x, draws)
    ce = F.cross_entropy(
        ref_logits.flatten(0, 1), target.flatten(0, 1), reduction="none", label_smoothing=smoothing
    ).view(K, BATCH)
    ref_losses = (ce * row_weight).sum(1) / row_weight.sum(1)
    theirs = torch.autograd.grad((ref_losses * per_trial).sum(), list(params.values()))
    torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits.detach(), atol=1e-6, rtol=1e-5)
    assert not logits.requires_grad
    for name_, a, b in zip(params, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name_)


@pytest.mark.parametrize("name", ["mlp", "gauss", "tabular", "cnn", "odd"])
def test_an_all_dense_model_gets_the_same_gradients_without_autograd(
    name: str, kernel: str
) -> None:
    """``loss_and_grads`` (used by the lockstep trainer when every parameter is in the dense
    tail) returns the autograd node's losses, logits and gradients bit for bit, on either
    kernel; a model with parameters before its tail (a CNN, the odd net) is left to autograd
    (None)."""
    stacked, params, buffers, x, draws, classes, g = _tail_case(name, 5)
    row_weight = torch.ones(K, BATCH)
    row_weight[2, -4:] = 0
    target = torch.randint(0, classes, (K, BATCH), generator=g)
    direct = stacked.loss_and_grads(params, buffers, x, target, row_weight, draws, 0.1)
    if name in ("cnn", "odd"):
        assert direct is None
        return
    assert direct is not None
    losses, logits, grads = direct
    assert set(grads) == set(params) and not losses.requires_grad
    ref_losses, ref_logits = stacked.loss(params, buffers, x, target, row_weight, draws, 0.1)
    ref_grads = torch.autograd.grad(ref_losses.sum(), list(params.values()))
    assert torch.equal(losses, ref_losses.detach()) and torch.equal(logits, ref_logits)
    for (name_, p), ref in zip(params.items(), ref_grads, strict=True):
        assert grads[name_].shape == p.shape
        assert torch.equal(grads[name_], ref), name_


def test_a_network_that_reuses_a_layer_is_left_to_vmap() -> None:
    """``named_children`` lists a module used twice once, so the stacked forward would skip
    its second use: such a network takes the ``vmap`` path instead."""
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), shared, nn.ReLU(), shared)
    model = Classifier(net, Standardize(torch.zeros(1), torch.ones(1), "image"))
    assert StackedForward.build(model) is None


def test_the_dense_tail_refuses_a_backward_after_its_input_changed_in_place() -> None:
    """The tail saves what its backward needs through autograd, which notices a tensor
    changed in place in between instead of returning a silently wrong gradient."""
    models = _models("cnn")
    stacked = StackedForward.build(models[0])
    params, buffers = _stacked_params(models)
    x, draws = _inputs_and_draws(models, NETS["cnn"][1], torch.Generator().manual_seed(3))
    row_weight = torch.ones(K, BATCH)
    target = torch.zeros(K, BATCH, dtype=torch.long)
    losses, _ = stacked.loss(params, buffers, x, target, row_weight, draws)
    with torch.no_grad():
        params["net.10.weight"].add_(1.0)  # the head's last Linear
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        losses.sum().backward()
