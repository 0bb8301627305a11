"""Building models: zoo and user factories, weights from stream ``init``, standardization."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from randkit import Streams, UserError, global_rng_guard
from randkit.config import DataConfig, ModelConfig
from randkit.data import Prepared, load_and_prepare
from randkit.models import Classifier, Standardize, build_model

TESTS_DIR = Path(__file__).parent


# ---------------------------------------------------------------------------------------------
# data fixtures (generated, small)


@pytest.fixture(scope="module")
def digits() -> Prepared:
    return load_and_prepare(DataConfig(), Streams(0))


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[0.0, 5.0, -3.0, 100.0], scale=[1.0, 2.0, 0.5, 10.0], size=(60, 4))
    x = np.column_stack([x, np.full(60, 7.0)])  # a constant feature
    path = tmp_path_factory.mktemp("vectors") / "v.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2] * 20))
    return load_and_prepare(DataConfig(kind="npz", path=path), Streams(0))


@pytest.fixture(scope="module")
def images32(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(30, 3, 32, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("images32") / "img.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2] * 10))
    return load_and_prepare(DataConfig(kind="npz", path=path), Streams(0))


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    words = ["good", "bad", "fine", "great", "awful", "plot", "actor", "music", "long", "short"]
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("text") / "t.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            length = int(rng.integers(1, 12))
            writer.writerow([" ".join(rng.choice(words, size=length)), ("neg", "pos")[i % 2]])
    return load_and_prepare(DataConfig(kind="csv_text", path=path, max_length=8), Streams(0))


@pytest.fixture
def user_models_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def random_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters drawn at random on construction (matrices and kernels, not norm scales)."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.dim() >= 2}


# ---------------------------------------------------------------------------------------------
# the zoo

ZOO = [
    pytest.param("mlp", "digits", {}, id="mlp-digits"),
    pytest.param("mlp", "vectors", {"hidden": [8, 8], "dropout": 0.1}, id="mlp-vectors"),
    pytest.param("cnn", "digits", {}, id="cnn-digits"),
    pytest.param("cnn", "digits", {"widths": [4], "batchnorm": True}, id="cnn-bn-digits"),
    pytest.param("resnet", "images32", {"norm": "batch"}, id="resnet-batch"),
    pytest.param("resnet", "images32", {"norm": "group", "depth": 8}, id="resnet-group"),
    pytest.param("text", "text", {}, id="text"),
]


@pytest.mark.parametrize(("name", "data", "args"), ZOO)
def test_zoo_model_gives_logits_per_class(
    request: pytest.FixtureRequest, name: str, data: str, args: dict[str, Any]
) -> None:
    prepared: Prepared = request.getfixturevalue(data)
    model = build_model(ModelConfig(name=name, args=args), prepared, Streams(0))
    assert isinstance(model, Classifier)
    model.eval()
    x = prepared.test.x[:5]
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, len(prepared.classes))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Different inputs give different logits: the network looks at its input.
    assert not torch.allclose(logits[0], logits[1])
    if prepared.kind == "text":
        assert isinstance(model.standardize, nn.Identity)
    else:
        assert isinstance(model.standardize, Standardize)


@pytest.mark.parametrize(("name", "data", "args"), ZOO)
def test_same_seed_same_weights_other_seed_other_weights(
    request: pytest.FixtureRequest, name: str, data: str, args: dict[str, Any]
) -> None:
    prepared: Prepared = request.getfixturevalue(data)
    cfg = ModelConfig(name=name, args=args)
    first = build_model(cfg, prepared, Streams(5))
    again = build_model(cfg, prepared, Streams(5))
    other = build_model(cfg, prepared, Streams(6))
    assert same_weights(first, again)
    drawn, redrawn = random_weights(first), random_weights(other)
    assert drawn and drawn.keys() == redrawn.keys()
    for key in drawn:
        assert not torch.equal(drawn[key], redrawn[key]), key


@pytest.mark.parametrize(("name", "data", "args"), ZOO)
def test_building_leaves_global_rng_alone(
    request: pytest.FixtureRequest, name: str, data: str, args: dict[str, Any]
) -> None:
    prepared: Prepared = request.getfixturevalue(data)
    with global_rng_guard():
        build_model(ModelConfig(name=name, args=args), prepared, Streams(3))


def test_pinned_init_source_ignores_root_seed(digits: Prepared) -> None:
    cfg = ModelConfig(name="cnn", args={"widths": [8, 8], "hidden": 16})
    a = build_model(cfg, digits, Streams(1, {"init": 9}))
    b = build_model(cfg, digits, Streams(2, {"init": 9}))
    assert same_weights(a, b)
    assert not same_weights(a, build_model(cfg, digits, Streams(1, {"init": 10})))
    # Pinning another source leaves init on the root seed.
    assert same_weights(
        build_model(cfg, digits, Streams(1)), build_model(cfg, digits, Streams(1, {"split": 4}))
    )


def test_coordinates_pick_separate_init_streams(digits: Prepared) -> None:
    cfg = ModelConfig(name="mlp", args={"hidden": [16]})
    fold0 = build_model(cfg, digits, Streams(0), fold=0)
    assert same_weights(fold0, build_model(cfg, digits, Streams(0), fold=0))
    assert not same_weights(fold0, build_model(cfg, digits, Streams(0), fold=1))


def test_weights_do_not_depend_on_global_rng_state(digits: Prepared) -> None:
    cfg = ModelConfig(name="cnn", args={"widths": [8], "hidden": 16})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        a = build_model(cfg, digits, Streams(0))
        torch.manual_seed(2)
        b = build_model(cfg, digits, Streams(0))
    assert same_weights(a, b)


# ---------------------------------------------------------------------------------------------
# standardization


def test_image_standardization_uses_train_statistics(digits: Prepared) -> None:
    model = build_model(ModelConfig(name="cnn"), digits, Streams(0))
    train = digits.train.x
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3))
    standardize = model.standardize
    assert standardize.mean.shape == (1, 1, 1, 1)
    torch.testing.assert_close(standardize.mean.flatten(), mean)
    torch.testing.assert_close(standardize.std.flatten(), std)
    # The training part comes out centred and scaled.
    z = standardize(train)
    torch.testing.assert_close(z.mean(), torch.tensor(0.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    # The network sees the standardized input.
    model.eval()
    x = digits.test.x[:4]
    with torch.no_grad():
        expected = model.net((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
        torch.testing.assert_close(model(x), expected)
    # A saved model carries its preprocessing.
    assert {"standardize.mean", "standardize.std"} <= set(model.state_dict())


def test_vector_standardization_per_feature(vectors: Prepared) -> None:
    model = build_model(ModelConfig(name="mlp", args={"hidden": [8]}), vectors, Streams(0))
    train = vectors.train.x
    assert model.standardize.mean.shape == (1, 5)
    z = model.standardize(train)
    torch.testing.assert_close(z[:, :4].mean(dim=0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, :4].std(dim=0), torch.ones(4), atol=1e-4, rtol=0)
    # The constant feature is centred but not divided by zero.
    assert model.standardize.std[0, 4] == 1.0
    assert torch.all(z[:, 4] == 0.0)
    test_z = model.standardize(vectors.test.x)
    assert torch.isfinite(test_z).all()
    # Test rows are scaled with the training statistics, not their own.
    torch.testing.assert_close(test_z, (vectors.test.x - train.mean(dim=0)) / model.standardize.std)


# ---------------------------------------------------------------------------------------------
# user factories


@pytest.mark.usefixtures("user_models_importable")
def test_user_factory_gets_data_spec_and_args(digits: Prepared) -> None:
    cfg = ModelConfig(name="user_models:make", args={"hidden": 7})
    model = build_model(cfg, digits, Streams(0))
    first, last = model.net[1], model.net[3]
    assert (first.in_features, first.out_features) == (64, 7)
    assert last.out_features == 10
    assert isinstance(model.standardize, Standardize)
    with torch.no_grad():
        assert model(digits.test.x[:3]).shape == (3, 10)
    # Its weights come from stream init too.
    assert same_weights(model, build_model(cfg, digits, Streams(0)))
    assert not same_weights(model, build_model(cfg, digits, Streams(1)))
    with global_rng_guard():
        build_model(cfg, digits, Streams(2))


@pytest.mark.usefixtures("user_models_importable")
def test_user_factory_with_var_keywords_gets_everything(digits: Prepared, text: Prepared) -> None:
    cfg = ModelConfig(name="user_models:make_any", args={"extra": 3})
    model = build_model(cfg, digits, Streams(0))
    assert model.net.received == {"in_shape": [1, 8, 8], "num_classes": 10, "extra": 3}
    text_model = build_model(ModelConfig(name="user_models:make_any"), text, Streams(0))
    assert text_model.net.received == {
        "in_shape": [8],
        "num_classes": 2,
        "vocab_size": text.vocab_size,
    }


@pytest.mark.usefixtures("user_models_importable")
def test_user_factory_is_given_only_what_it_takes(vectors: Prepared) -> None:
    model = build_model(ModelConfig(name="user_models:no_classes"), vectors, Streams(0))
    with torch.no_grad():
        assert model(vectors.test.x[:2]).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# errors

ERRORS = [
    pytest.param(
        "transformer", {}, "digits", "model.name", ["'transformer'", "mlp"], id="unknown-name"
    ),
    pytest.param(
        "mlp", {"widht": 3}, "digits", "model.args.widht", ["'mlp'", "3"], id="unknown-arg"
    ),
    pytest.param(
        "mlp", {"vocab_size": 50}, "digits", "model.args.vocab_size", ["50"], id="arg-not-taken"
    ),
    pytest.param(
        "mlp",
        {"num_classes": 3},
        "digits",
        "model.args.num_classes",
        ["from the data", "3"],
        id="num-classes-from-data",
    ),
    pytest.param(
        "cnn", {"in_shape": [1, 4, 4]}, "digits", "model.args.in_shape", [], id="in-shape"
    ),
    pytest.param("text", {"vocab_size": 5}, "text", "model.args.vocab_size", [], id="vocab"),
    pytest.param(
        "user_models:make_any",
        {"num_classes": 2},
        "digits",
        "model.args.num_classes",
        [],
        id="var-keywords-num-classes",
    ),
    pytest.param("resnet", {"depth": 9}, "images32", "model.args", ["depth", "9"], id="bad-depth"),
    pytest.param("resnet", {"norm": "layer"}, "images32", "model.args", ["'layer'"], id="bad-norm"),
    pytest.param(
        "user_models:make", {"hidden": "wide"}, "digits", "model.args", ["wide"], id="bad-type"
    ),
    pytest.param(
        "user_models:not_a_module",
        {},
        "digits",
        "model.name",
        ["dict", "torch.nn.Module"],
        id="not-a-module",
    ),
    pytest.param(
        "randkit_tests_no_such_module:make",
        {},
        "digits",
        "model.name",
        ["cannot import", "randkit_tests_no_such_module"],
        id="unimportable",
    ),
    pytest.param(
        "user_models:no_such_factory",
        {},
        "digits",
        "model.name",
        ["cannot import", "no_such_factory"],
        id="missing-attribute",
    ),
    pytest.param(
        "user_models:NOT_CALLABLE", {}, "digits", "model.name", ["not callable"], id="not-callable"
    ),
]


@pytest.mark.usefixtures("user_models_importable")
@pytest.mark.parametrize(("name", "args", "data", "field", "fragments"), ERRORS)
def test_model_errors_name_the_field(
    request: pytest.FixtureRequest,
    name: str,
    args: dict[str, Any],
    data: str,
    field: str,
    fragments: list[str],
) -> None:
    prepared: Prepared = request.getfixturevalue(data)
    with pytest.raises(UserError) as info:
        build_model(ModelConfig(name=name, args=args), prepared, Streams(0))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_builtin_factory_and_broken_module_are_user_errors(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "broken_models.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prepared = load_and_prepare(DataConfig(), Streams(0))
    for name, needle in (("builtins:dict", "signature"), ("broken_models:make", "SyntaxError")):
        with pytest.raises(UserError, match=needle) as info:
            build_model(ModelConfig(name=name), prepared, Streams(0))
        assert info.value.field == "model.name"
