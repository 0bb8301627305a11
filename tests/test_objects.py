"""Object-first cross-validation: the user's own model, Dataset, task, loss, optimizer,
metrics, callbacks and trial functions, and every refusal before training."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import object_models as om
import randkit
from randkit import UserError

FAST = {"epochs": 2, "batch_size": 64, "lr": 0.01}


def cv(model, data, tmp_path, name="run", **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("folds", 2)
    kwargs.setdefault("train", FAST)
    return randkit.cross_validate(model, data, out=tmp_path / name, **kwargs)


def weights(result, trial_id="f0"):  # type: ignore[no-untyped-def]
    return load_file(result.out / "trials" / trial_id / "model.safetensors")


def test_a_module_class_on_a_dataset_trains_and_reports(tmp_path):
    result = cv(om.DigitsNet, om.DigitsItems(), tmp_path)
    assert len(result.table) == 2
    assert result.summary["metric"] == "accuracy"
    assert result.summary["mean"] > 0.5  # 10 classes: chance is 0.1
    config = (result.out / "config.yaml").read_text()
    assert "object_models:DigitsNet" in config and "object_models:DigitsItems" in config


def test_streaming_a_dataset_gives_the_in_memory_results_bit_for_bit(tmp_path):
    x, y = om.digits_arrays()
    streamed = cv(om.DigitsNet, om.DigitsItems(), tmp_path, "streamed")
    workers = cv(om.DigitsNet, om.DigitsItems(), tmp_path, "workers", num_workers=2)
    memory = cv(
        om.DigitsNet, TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), tmp_path, "memory"
    )
    for other in (workers, memory):
        assert other.table["accuracy"].tolist() == streamed.table["accuracy"].tolist()
        for name, tensor in weights(streamed).items():
            assert torch.equal(tensor, weights(other)[name]), name


def test_class_factory_and_instance_all_work_and_instances_are_reinitialized(tmp_path):
    x, y = om.digits_arrays()
    by_class = cv(om.DigitsNet, (x, y), tmp_path, "class")
    by_factory = cv(functools.partial(om.DigitsNet, hidden=32), (x, y), tmp_path, "factory")
    instance = om.DigitsNet()
    before = {k: v.clone() for k, v in instance.state_dict().items()}
    by_instance = cv(instance, (x, y), tmp_path, "instance", repeats=2, vary=["init"])
    assert all(torch.equal(v, instance.state_dict()[k]) for k, v in before.items())  # untouched
    assert by_class.table["accuracy"].tolist() == by_factory.table["accuracy"].tolist()
    # Each trial starts from weights drawn from its init stream, not from the instance's.
    first, second = weights(by_instance, "f0"), weights(by_instance, "f0-init1")
    assert not torch.equal(first["net.body.1.weight"], second["net.body.1.weight"])
    assert by_instance.table["accuracy"].tolist()[:1] == by_class.table["accuracy"].tolist()[:1]


def test_a_dataloader_counts_as_its_dataset_and_labels_come_from_targets(tmp_path):
    loader = DataLoader(om.DigitsItems(with_targets_attribute=True), batch_size=7)
    result = cv(om.DigitsNet, loader, tmp_path)
    direct = cv(om.DigitsNet, om.DigitsItems(), tmp_path, "direct")
    assert result.table["accuracy"].tolist() == direct.table["accuracy"].tolist()


def test_regression_with_a_custom_loss_and_the_default_one(tmp_path):
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x, y = bunch.data.astype(np.float32), ((bunch.target - 150) / 75).astype(np.float32)
    linear = functools.partial(torch.nn.Linear, 10, 1)
    train = {"epochs": 30, "batch_size": 32, "lr": 0.05}
    default = cv(linear, (x, y), tmp_path, "mse", task="regression", train=train)
    custom = cv(linear, (x, y), tmp_path, "l1", task="regression", train=train, loss=om.smooth_l1)
    assert default.summary["metric"] == "rmse"
    assert set(default.summary["per_metric"]) >= {"rmse", "mae", "r2", "loss"}
    baseline = float(np.std(y))  # predicting the mean
    assert default.summary["mean"] < baseline
    assert custom.table["rmse"].tolist() != default.table["rmse"].tolist()
    assert "group" in default.table.columns and "accuracy" not in default.table.columns


def test_continuous_targets_without_task_are_refused_in_one_line(tmp_path):
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    with pytest.raises(UserError, match="task='regression'") as info:
        cv(om.DigitsNet, (bunch.data, bunch.target), tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "trials").exists()


def test_multilabel_task(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < 0.5], axis=1).astype(np.float32)
    result = cv(
        functools.partial(torch.nn.Linear, 6, 3),
        (x, y),
        tmp_path,
        task="multilabel",
        train={"epochs": 20, "lr": 0.05, "batch_size": 32},
    )
    assert result.summary["metric"] == "macro_f1"
    assert result.summary["per_metric"]["auroc"]["mean"] > 0.9
    assert result.summary["mean"] > 0.7


def test_optimizer_scheduler_metrics_and_callbacks_are_the_users(tmp_path):
    from torchmetrics.classification import MulticlassAccuracy

    recorder = om.RecordOptimizer()
    om.RecordOptimizer.SEEN.clear()
    result = cv(
        om.DigitsNet,
        om.DigitsItems(),
        tmp_path,
        optimizer=(torch.optim.RMSprop, {"lr": 1e-3}),
        scheduler=(torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.5}),
        metrics={"top2": om.top2_accuracy, "tm_accuracy": MulticlassAccuracy(10, average="micro")},
        callbacks=[recorder],
    )
    assert om.RecordOptimizer.SEEN == ["RMSprop"] * 4  # 2 trials x 2 epochs
    assert np.allclose(result.table["tm_accuracy"], result.table["accuracy"], atol=1e-6)
    assert (result.table["top2"] >= result.table["accuracy"]).all()
    record = json.loads((result.out / "trials" / "f0" / "metrics.json").read_text())
    assert [round(h["lr"], 6) for h in record["history"]] == [0.001, 0.0005]


def test_early_stopping_callback_on_any_metric(tmp_path):
    stop = randkit_early_stopping("val_rmse_never", patience=1)
    with pytest.raises(UserError, match="val_rmse_never"):
        cv(
            om.DigitsNet,
            om.DigitsItems(),
            tmp_path,
            "bad",
            callbacks=[stop],
            cv={"inner_val_fraction": 0.2},
        )
    stop = randkit_early_stopping("val_top2", patience=1, mode="max")
    result = cv(
        om.DigitsNet,
        om.DigitsItems(),
        tmp_path,
        metrics={"top2": om.top2_accuracy},
        callbacks=[stop],
        cv={"inner_val_fraction": 0.2},
        train={**FAST, "epochs": 30, "lr": 0.05},
    )
    record = json.loads((result.out / "trials" / "f0" / "metrics.json").read_text())
    assert 2 <= len(record["history"]) < 30
    assert "val_top2" in record["history"][0]


def randkit_early_stopping(monitor, **kwargs):  # type: ignore[no-untyped-def]
    from randkit.train.parts import EarlyStopping

    return EarlyStopping(monitor, **kwargs)


def test_a_trial_function_gets_its_fold_streams_folder_and_report(tmp_path):
    result = randkit.cross_validate(
        data=om.DigitsItems(), fit=om.fit_with_global_rng, folds=3, out=tmp_path / "fit"
    )
    assert result.summary["metric"] == "accuracy"
    assert list(result.table.columns)[-4:] == ["accuracy", "loss", "first_weight", "fit_seconds"]
    record = json.loads((result.out / "trials" / "f1" / "metrics.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert record["train_size"] + record["test_size"] == 600
    assert json.loads((result.out / "trials" / "f1" / "history.json").read_text())
    again = randkit.cross_validate(
        data=om.DigitsItems(), fit=om.fit_with_global_rng, folds=3, out=tmp_path / "fit"
    )
    assert again.trained == 0  # resumed: every trial was done


@pytest.mark.slow
def test_trial_functions_give_the_same_bits_under_every_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's workers import the trial function by reference, as a user's installed code.
    monkeypatch.setenv("PYTHONPATH", str(Path(om.__file__).parent))
    runs = {
        runner: randkit.cross_validate(
            data=om.DigitsItems(),
            fit=om.fit_with_global_rng,
            folds=2,
            runner=runner,
            workers=2,
            cv={"threads_per_trial": 1},
            out=tmp_path / runner,
        )
        for runner in ("sequential", "processes", "ray")
    }
    expected = runs["sequential"].table
    for runner in ("processes", "ray"):
        for column in ("accuracy", "loss", "first_weight"):
            assert runs[runner].table[column].tolist() == expected[column].tolist(), runner


@pytest.mark.slow
def test_the_built_in_trainer_on_a_dataset_under_processes_matches_sequential(tmp_path):
    kwargs = {"cv": {"threads_per_trial": 1}}
    sequential = cv(om.DigitsNet, om.DigitsItems(), tmp_path, "seq", **kwargs)
    processes = cv(
        om.DigitsNet, om.DigitsItems(), tmp_path, "proc", runner="processes", workers=2, **kwargs
    )
    assert processes.table["accuracy"].tolist() == sequential.table["accuracy"].tolist()


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"model": 3}, "model", "nn.Module subclass"),
        ({"model": om.DigitsNet, "data": 5}, "data", "map-style torch Dataset"),
        ({"model": functools.partial(om.DigitsNet, 7)}, "model", "outputs 7 values"),
        ({"model": om.DigitsNet, "data": om.StringLabels()}, "data", "integers 0..K-1"),
        ({"model": om.DigitsNet, "loss": om.broken_loss}, "loss", "fails on outputs"),
        ({"model": om.DigitsNet, "metric": "auroc"}, "metric", "not reported by"),
        ({"model": om.DigitsNet, "runner": "vectorized"}, "runner", "in-memory data"),
        ({"model": om.DigitsNet, "optimizer": (int, {})}, "optimizer", "not a torch.optim"),
        ({"model": om.DigitsNet, "callbacks": [object()]}, "callbacks[0]", "on_epoch_end"),
        ({"fit": om.fit_returns_list}, "fit", "dict of metric names"),
        ({"fit": lambda trial: {"a": 1.0}, "runner": "processes"}, "fit", "cannot be sent"),
        ({"fit": om.fit_with_global_rng, "runner": "vectorized"}, "runner", "built-in trainer"),
        ({"model": om.DigitsNet, "fit": om.fit_with_global_rng}, "fit", "either model="),
        ({"model": om.DigitsNet, "data": om.ParityItems()}, "data", "items' targets"),
        ({"model": om.DigitsNet, "data": om.GappedLabels()}, "data", "never occur"),
        (
            {"model": om.DigitsNet, "metrics": {"accuracy": om.top2_accuracy}},
            "metrics.accuracy",
            "already a column",
        ),
        (
            {"model": om.DigitsNet, "scheduler": (torch.optim.lr_scheduler.StepLR, {"gamma": 0.5})},
            "scheduler",
            "step_size",
        ),
        ({"model": om.DigitsNet, "cv": {"runner": "vectorized"}}, "cv.runner", "runner="),
        ({"fit": om.fit_returns_fold}, "fit", "column of results.csv"),
        ({"fit": om.fit_changes_keys}, "fit", "same metrics"),
        ({"model": om.DigitsNet, "data": (np.zeros((5, 64)), np.zeros(4))}, "data", "one length"),
        (
            {"model": om.DigitsNet, "data": om.digits_arrays(200), "labels": [0] * 200},
            "labels",
            "bring their labels",
        ),
    ],
)
def test_wrong_objects_are_refused_in_one_line_before_training(tmp_path, kwargs, field, words):
    kwargs = {"data": om.DigitsItems(200), **kwargs}
    model = kwargs.pop("model", None)
    data = kwargs.pop("data")
    with pytest.raises(UserError) as info:
        randkit.cross_validate(model, data, folds=2, train=FAST, out=tmp_path / "run", **kwargs)
    message = str(info.value)
    assert message.startswith(f"{field}:") and words in message and "\n" not in message
    if field != "fit" or "same" not in words:  # known only once a second trial returns
        assert not list((tmp_path / "run").glob("trials/*/metrics.json"))


def test_a_lightning_module_as_model_points_to_the_lightning_trial(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Lit(lightning.LightningModule):
        pass

    with pytest.raises(UserError, match="LightningTrial"):
        randkit.cross_validate(Lit, om.DigitsItems(200), out=tmp_path / "run")


def test_a_config_run_of_npz_regression_targets(tmp_path):
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    path = tmp_path / "diabetes.npz"
    np.savez(path, x=bunch.data, y=bunch.target)
    data = {"kind": "npz", "path": str(path)}
    with pytest.raises(UserError, match="task='regression'"):
        randkit.cross_validate("mlp", data, folds=2, train=FAST, out=tmp_path / "refused")
    with pytest.raises(UserError, match=r"cv\.splitter: 'stratified_kfold' stratifies"):
        randkit.cross_validate(
            "mlp", data, task="regression", splitter="stratified_kfold", out=tmp_path / "strat"
        )
    result = randkit.cross_validate(
        "mlp", data, task="regression", folds=2, train=FAST, out=tmp_path / "run"
    )
    assert result.summary["metric"] == "rmse" and len(result.table) == 2
    assert (result.out / "report.html").is_file()


def test_a_model_class_on_arrays_runs_vectorized_like_sequential(tmp_path):
    x, y = om.digits_arrays()
    sequential = cv(om.plain_net, (x, y), tmp_path, "seq")
    vectorized = cv(om.plain_net, (x, y), tmp_path, "vec", runner="vectorized")
    assert np.allclose(vectorized.table["accuracy"], sequential.table["accuracy"], atol=0.02)
    first = weights(sequential)["net.1.weight"]
    assert torch.allclose(weights(vectorized)["net.1.weight"], first, atol=1e-4)


def test_a_resumed_run_with_another_loss_or_optimizer_is_refused(tmp_path):
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    data = (bunch.data.astype(np.float32), (bunch.target / 100).astype(np.float32))
    linear = functools.partial(torch.nn.Linear, 10, 1)
    cv(linear, data, tmp_path, task="regression")
    again = cv(linear, data, tmp_path, task="regression")
    assert again.trained == 0
    with pytest.raises(UserError, match="different config"):
        cv(linear, data, tmp_path, task="regression", loss=om.smooth_l1)
    with pytest.raises(UserError, match="different config"):
        cv(linear, data, tmp_path, task="regression", optimizer=(torch.optim.SGD, {"lr": 0.1}))
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "partial(torch.nn.modules.linear:Linear, 10, 1)" in config


NET_FILE = """
import torch
from torch import nn


class FileNet(nn.Module):
    def __init__(self, num_classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.body(x)
"""

LOAD_BUNDLE = """
import json, sys
import torch
from randkit.deploy.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
x = torch.linspace(0, 1, 3 * 64).reshape(3, *bundle.input_shape)
with torch.no_grad():
    print(json.dumps([model(x).tolist() for model in bundle.models]))
"""


def test_a_bundle_of_a_python_api_run_loads_in_a_fresh_process(tmp_path, monkeypatch):
    import subprocess
    import sys

    project = tmp_path / "project"
    project.mkdir()
    (project / "rk_file_net.py").write_text(NET_FILE)
    monkeypatch.syspath_prepend(str(project))
    import rk_file_net

    x, y = om.digits_arrays(300)
    result = cv(functools.partial(rk_file_net.FileNet, hidden=6), (x, y), tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def python(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            env=env,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    repo = tmp_path / "repo"
    python(
        *("-m", "randkit", "export", str(result.out), "--repository", str(repo)),
        *("--name", "net", "--ensemble"),
    )
    (project / "rk_file_net.py").unlink()  # the bundle carries its own copy
    fresh = json.loads(python("-c", LOAD_BUNDLE, str(repo / "net" / "1")).splitlines()[-1])
    model = functools.partial(rk_file_net.FileNet, hidden=6)(10)
    wrapped = torch.nn.Sequential()
    state = weights(result)
    model.load_state_dict(
        {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    )
    del wrapped
    probe = torch.linspace(0, 1, 3 * 64).reshape(3, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(probe)
    torch.testing.assert_close(torch.tensor(fresh[0]), expected)
    sys.modules.pop("rk_file_net", None)


def test_a_trial_function_on_arrays_reads_the_real_labels(tmp_path):
    x, y = om.digits_arrays(200)
    result = randkit.cross_validate(
        data=(x.astype(np.float64), y + 1), fit=om.fit_reads_targets, folds=2, out=tmp_path / "r"
    )
    assert result.table["same"].tolist() == [1.0, 1.0]
    # Array labels are encoded as indices of the sorted unique values (1..10 -> 0..9).
    labels = y
    train_labels = [labels[np.setdiff1d(np.arange(200), t.test_idx)].sum() for t in _plan(result)]
    assert result.table["label_sum"].tolist() == [float(s) for s in train_labels]


def _plan(result):  # type: ignore[no-untyped-def]
    from randkit.cv.plan import Plan

    return Plan.from_json(json.loads((result.out / "plan.json").read_text())).trials


def test_torchmetrics_multilabel_metrics_get_integer_targets(tmp_path):
    from torchmetrics.classification import MultilabelAveragePrecision

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    result = cv(
        "mlp",
        (x, y),
        tmp_path,
        task="multilabel",
        metrics={"ap": MultilabelAveragePrecision(num_labels=3)},
    )
    assert ((result.table["ap"] > 0) & (result.table["ap"] <= 1)).all()


def test_random_transforms_inside_a_dataset_are_reproducible_and_leave_global_rngs(tmp_path):
    from randkit.streams import global_rng_guard

    with global_rng_guard():
        first = cv(om.DigitsNet, om.NoisyItems(300), tmp_path, "a")
        second = cv(om.DigitsNet, om.NoisyItems(300), tmp_path, "b")
    assert first.table["loss"].tolist() == second.table["loss"].tolist()
    for name, tensor in weights(first).items():
        assert torch.equal(tensor, weights(second)[name]), name


def test_integer_valued_float_labels_of_a_dataset_train_as_classes(tmp_path):
    floats = cv(om.DigitsNet, om.FloatLabels(), tmp_path, "floats")
    ints = cv(om.DigitsNet, om.DigitsItems(), tmp_path, "ints")
    assert floats.table["accuracy"].tolist() == ints.table["accuracy"].tolist()


def test_pandas_arrays_string_optimizer_and_plateau_scheduler(tmp_path):
    pd = pytest.importorskip("pandas")
    x, y = om.digits_arrays(300)
    frame, labels = pd.DataFrame(x), pd.Series([f"d{v}" for v in y])
    result = cv(
        om.DigitsNet,
        (frame, labels),
        tmp_path,
        optimizer="sgd",
        scheduler=(torch.optim.lr_scheduler.ReduceLROnPlateau, {"patience": 0, "factor": 0.5}),
        train={**FAST, "epochs": 3},
    )
    assert result.summary["classes"][:2] == ["d0", "d1"]
    config = (result.out / "config.yaml").read_text()
    assert "optimizer: sgd" in config and "ReduceLROnPlateau" in config


def test_a_resume_with_another_model_instance_or_loss_settings_is_refused(tmp_path):
    x, y = om.digits_arrays(200)
    cv(om.DigitsNet(10, 8), (x, y), tmp_path, loss=torch.nn.CrossEntropyLoss())
    assert cv(om.DigitsNet(10, 8), (x, y), tmp_path, loss=torch.nn.CrossEntropyLoss()).trained == 0
    with pytest.raises(UserError, match="different config"):
        cv(om.DigitsNet(10, 256), (x, y), tmp_path, loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(UserError, match="different config"):
        smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.5)
        cv(om.DigitsNet(10, 8), (x, y), tmp_path, loss=smoothed)


def test_early_stopping_mode_for_a_metric_whose_name_says_nothing(tmp_path):
    result = cv(
        om.DigitsNet,
        om.DigitsItems(),
        tmp_path,
        metrics={"top2": om.top2_accuracy},
        cv={"inner_val_fraction": 0.2},
        train={
            **FAST,
            "epochs": 4,
            "early_stopping": {"metric": "top2", "mode": "max", "patience": 9},
        },
    )
    record = json.loads((result.out / "trials" / "f0" / "metrics.json").read_text())
    assert len(record["history"]) == 4 and "val_top2" in record["history"][0]
