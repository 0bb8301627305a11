"""Tasks for object-first cross-validation: inference, default losses, metrics, widths."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from torch.nn import functional as F

from randkit.errors import UserError
from randkit.train.metrics import classification_metrics
from randkit.train.tasks import (
    TASKS,
    check_output_width,
    default_loss,
    headline_metric,
    infer_task,
    metric_direction,
    num_outputs,
    targets_tensor,
    task_metrics,
    user_metrics,
)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- inference -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (np.array([0, 1, 2, 1, 0]), "classification"),
        (np.array([True, False, True]), "classification"),
        (np.array(["cat", "dog", "cat"]), "classification"),
        (np.array(["cat", "dog"], dtype=object), "classification"),
        (np.array([0.0, 1.0, 2.0, 1.0]), "classification"),
        (np.array([[0, 1, 1], [1, 0, 0]]), "multilabel"),
        (np.array([[True, False], [False, False]]), "multilabel"),
    ],
)
def test_infer_task_takes_unambiguous_targets(targets: np.ndarray, expected: str) -> None:
    assert infer_task(targets, None) == expected


def test_continuous_diabetes_targets_are_refused_not_turned_into_classes() -> None:
    y = load_diabetes().target  # 214 distinct integer-valued floats: a regression target
    with pytest.raises(UserError) as info:
        infer_task(y, None)
    message = str(info.value)
    assert info.value.field == "task"
    assert "task='regression'" in message
    assert "214 distinct values" in message and "151.0" in message
    assert "\n" not in message
    assert infer_task(y, "regression") == "regression"


def test_non_integer_floats_are_refused_without_a_task() -> None:
    y = _rng().normal(size=40)
    with pytest.raises(UserError, match="task='regression'"):
        infer_task(y, None)


@pytest.mark.parametrize("task", [None, *TASKS])
def test_non_finite_targets_are_refused_for_every_task(task: str | None) -> None:
    y = np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]])
    with pytest.raises(UserError, match="non-finite"):
        infer_task(y if task in ("multilabel", "regression") else y[:, 0], task)


def test_given_task_must_fit_the_targets() -> None:
    with pytest.raises(UserError) as info:
        infer_task(np.array([151.3, 2.5, 7.0]), "classification", field="cv.task")
    assert info.value.field == "cv.task"
    assert "2 distinct non-integer values such as 151.3" in str(info.value)
    assert "task='regression'" in str(info.value)
    with pytest.raises(UserError, match="task='multilabel'"):
        infer_task(np.array([[0, 1], [1, 0]]), "classification")
    with pytest.raises(UserError, match="numeric targets"):
        infer_task(np.array(["a", "b"]), "regression")
    with pytest.raises(UserError, match="2-D array of 0/1"):
        infer_task(np.array([0, 1, 1]), "multilabel")
    with pytest.raises(UserError, match="values such as"):
        infer_task(np.array([[0, 2], [1, 0]]), "multilabel")
    with pytest.raises(UserError, match="unknown task 'ranking'"):
        infer_task(np.array([0, 1]), "ranking")
    # Integer-valued floats fit classification; 2-D floats fit multi-output regression.
    assert infer_task(np.array([1.0, 0.0]), "classification") == "classification"
    assert infer_task(_rng().normal(size=(5, 2)), "regression") == "regression"
    with pytest.raises(UserError, match="multi-output"):
        infer_task(_rng().normal(size=(5, 2)), None)


def test_num_outputs_and_targets_tensor_agree_on_the_encoding() -> None:
    assert num_outputs("classification", np.array([0, 3, 1])) == 4  # a missing class keeps its slot
    labels = np.array(["dog", "cat", "dog", "emu"])
    assert num_outputs("classification", labels) == 3
    encoded = targets_tensor("classification", labels)
    assert encoded.dtype == torch.long and encoded.tolist() == [1, 0, 1, 2]
    assert targets_tensor("classification", np.array([-1, 1, -1])).tolist() == [0, 1, 0]
    assert targets_tensor("classification", np.array([2.0, 0.0])).tolist() == [2, 0]
    assert num_outputs("multilabel", np.zeros((4, 5))) == 5
    assert num_outputs("regression", np.zeros(4)) == 1
    assert num_outputs("regression", np.zeros((4, 3))) == 3
    reg = targets_tensor("regression", np.array([1, 2]))
    assert reg.dtype == torch.float32 and reg.tolist() == [1.0, 2.0]
    assert targets_tensor("multilabel", np.array([[True, False]])).dtype == torch.float32


# --- losses ----------------------------------------------------------------------------


def test_default_losses_equal_torch_functionals_and_pickle() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    ce = default_loss("classification")
    assert torch.equal(ce(logits, labels), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(6, 4, generator=g), dim=1)  # mixup-style targets
    assert torch.allclose(ce(logits, soft), F.cross_entropy(logits, soft))
    multi = torch.randint(0, 2, (6, 4), generator=g)
    bce = default_loss("multilabel")
    assert torch.equal(
        bce(logits, multi), F.binary_cross_entropy_with_logits(logits, multi.float())
    )
    pred, target = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    assert torch.equal(default_loss("regression")(pred, target), F.mse_loss(pred, target))
    for task in TASKS:  # they travel to worker processes
        assert pickle.loads(pickle.dumps(default_loss(task))) is default_loss(task)


def test_regression_loss_does_not_broadcast_a_column_against_a_vector() -> None:
    outputs = torch.tensor([[1.0], [2.0], [4.0]])
    targets = torch.tensor([1.0, 3.0, 2.0])
    by_hand = (0.0**2 + 1.0**2 + 2.0**2) / 3  # 5/3; broadcasting (3, 3) would give 2.0
    loss = default_loss("regression")
    assert loss(outputs, targets).item() == pytest.approx(by_hand)
    assert loss(outputs[:, 0], targets[:, None]).item() == pytest.approx(by_hand)
    with pytest.raises(UserError, match=r"outputs of shape \(3, 2\)"):
        loss(torch.zeros(3, 2), targets)


# --- built-in metrics -----------------------------------------------------------------


def test_classification_metrics_match_sklearn_and_the_trainer() -> None:
    rng = _rng()
    logits = torch.tensor(rng.normal(size=(200, 5)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 4, size=200))  # class 4 never present
    got = task_metrics("classification", logits, labels)
    pred = logits.argmax(1).numpy()
    assert got["accuracy"] == pytest.approx(accuracy_score(labels.numpy(), pred))
    assert got["macro_f1"] == pytest.approx(
        f1_score(labels.numpy(), pred, labels=range(5), average="macro", zero_division=0)
    )
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert got == classification_metrics(logits, labels, 5)
    assert headline_metric("classification") in got


def test_regression_metrics_match_sklearn() -> None:
    rng = _rng()
    y = rng.normal(size=100)
    p = y + rng.normal(scale=0.3, size=100)
    got = task_metrics("regression", torch.tensor(p[:, None]), torch.tensor(y))
    assert got["mse"] == pytest.approx(mean_squared_error(y, p))
    assert got["loss"] == pytest.approx(got["mse"])
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert got["r2"] == pytest.approx(r2_score(y, p))
    y2, p2 = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    multi = task_metrics("regression", torch.tensor(p2), torch.tensor(y2))
    assert multi["r2"] == pytest.approx(r2_score(y2, p2))
    # A constant target has no variance to explain: finite values, no crash.
    const = torch.full((10,), 2.0)
    assert task_metrics("regression", const, const)["r2"] == 1.0
    assert task_metrics("regression", const + 1, const)["r2"] == 0.0
    assert task_metrics("regression", const[:1] + 1, const[:1])["r2"] == 0.0
    assert headline_metric("regression") == "rmse"


def test_multilabel_metrics_match_sklearn() -> None:
    rng = _rng()
    scores = rng.normal(size=(120, 4))
    y = (rng.random(size=(120, 4)) < 0.4).astype(int)
    y[:, 3] = 0  # a label that never occurs: no AUROC for it, F1 of 0
    got = task_metrics("multilabel", torch.tensor(scores), torch.tensor(y))
    pred = (scores > 0).astype(int)
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    for average in ("macro", "micro"):
        expected = f1_score(y, pred, average=average, zero_division=0)
        assert got[f"{average}_f1"] == pytest.approx(expected)
    assert got["auroc"] == pytest.approx(roc_auc_score(y[:, :3], scores[:, :3], average="macro"))
    bce = F.binary_cross_entropy_with_logits(torch.tensor(scores), torch.tensor(y).double())
    assert got["loss"] == pytest.approx(bce.item(), rel=1e-6)
    none_both = task_metrics("multilabel", torch.tensor(scores), torch.zeros(120, 4))
    assert math.isnan(none_both["auroc"])
    assert headline_metric("multilabel") == "macro_f1"


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("rmse", "min"),
        ("mae", "min"),
        ("mean_squared_error", "min"),
        ("accuracy", "max"),
        ("macro_f1", "max"),
        ("r2", "max"),
        ("multiclass_auroc", "max"),
    ],
)
def test_metric_direction(name: str, direction: str) -> None:
    assert metric_direction(name) == direction


# --- user metrics ----------------------------------------------------------------------


def top1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


def test_user_metrics_names_and_torchmetrics_objects_agree_with_callables() -> None:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

    rng = _rng()
    logits = torch.tensor(rng.normal(size=(90, 3)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 3, size=90))
    assert user_metrics(None, logits, labels) == {}
    got = user_metrics([top1, MulticlassAccuracy(num_classes=3, average="micro")], logits, labels)
    assert set(got) == {"top1", "multiclass_accuracy"}
    assert got["multiclass_accuracy"] == pytest.approx(got["top1"])
    auroc = MulticlassAUROC(num_classes=3)
    first = user_metrics({"auc": auroc}, logits, labels)["auc"]
    probs = torch.softmax(logits, 1).numpy()
    assert first == pytest.approx(roc_auc_score(labels.numpy(), probs, multi_class="ovr"))
    # The object is reset before each use: a second call gives the same value, not a blend.
    assert user_metrics({"auc": auroc}, logits[:30], labels[:30])["auc"] != first
    assert user_metrics({"auc": auroc}, logits, labels)["auc"] == pytest.approx(first)
    assert "multiclass_auroc" in user_metrics((auroc,), logits, labels)


def test_failing_or_odd_user_metrics_are_user_errors_naming_the_metric() -> None:
    logits, labels = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])

    def broken(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        raise ValueError("shapes\ndo not match")

    with pytest.raises(UserError) as info:
        user_metrics([broken], logits, labels)
    assert info.value.field == "metrics.broken"
    assert str(info.value) == "metrics.broken: raised ValueError: shapes do not match"

    def vector(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.sum(1)

    with pytest.raises(UserError, match=r"metrics.vec: returned Tensor of shape \(4,\)"):
        user_metrics({"vec": vector}, logits, labels)
    with pytest.raises(UserError, match=r"metrics.bad: returned nan"):
        user_metrics({"bad": lambda o, t: float("nan")}, logits, labels)
    with pytest.raises(UserError, match=r"metrics.text: returned str"):
        user_metrics({"text": lambda o, t: "high"}, logits, labels)
    with pytest.raises(UserError, match="two metrics are named 'top1'"):
        user_metrics([top1, top1], logits, labels)
    with pytest.raises(UserError, match="lambda has no name"):
        user_metrics([lambda o, t: 1.0], logits, labels)
    with pytest.raises(UserError, match=r"^train.metrics: expected None"):
        user_metrics(3, logits, labels, field="train.metrics")


# --- output width ----------------------------------------------------------------------


def test_output_width_check() -> None:
    check_output_width("classification", 10, 10)
    check_output_width("regression", None, 1)
    check_output_width("regression", 1, 1)
    check_output_width("regression", 3, 3)
    check_output_width("multilabel", 5, 5)
    with pytest.raises(UserError) as info:
        check_output_width("classification", 7, 10)
    assert str(info.value).startswith(
        "model: outputs 7 values per example but the data has 10 classes"
    )
    with pytest.raises(UserError, match=r"1-D output.*4 labels"):
        check_output_width("multilabel", None, 4, field="model.factory")
    with pytest.raises(UserError, match="2 values per example but the data has 3 target columns"):
        check_output_width("regression", 2, 3)
