"""randkit.integrations.lightning: a LightningModule cross-validated with Lightning's Trainer."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load

pytest.importorskip("lightning")

from lightning_models import TinyData, dataset, lightning_trial, run_trial
from randkit import global_rng_guard
from randkit.errors import UserError
from randkit.integrations.lightning import SafetensorsCheckpointIO

TESTS_DIR = Path(__file__).parent


def trial_files(out: Path) -> dict[str, bytes]:
    (folder,) = (out / "trials").iterdir()
    return {file.name: file.read_bytes() for file in sorted(folder.iterdir())}


def test_the_modules_steps_and_optimizer_train_and_the_test_metrics_are_the_scores(
    tmp_path: Path,
) -> None:
    fit = lightning_trial(module_kwargs={"optimizer": "marked_sgd"})
    with global_rng_guard():
        record = run_trial(tmp_path, pickle.loads(pickle.dumps(fit)))
    assert not torch.are_deterministic_algorithms_enabled()  # Trainer(deterministic=True) undone
    scores = record["test"]
    assert set(scores) == {"test_acc", "training_steps", "marked_sgd"}  # "test/acc" renamed
    assert scores["marked_sgd"] == 1.0  # configure_optimizers' own optimizer stepped
    assert scores["training_steps"] == 4 * math.ceil(150 / 32)  # training_step, every batch
    assert scores["test_acc"] > 0.7
    assert [row["epoch"] for row in record["history"]] == [0, 1, 2, 3]
    assert all("train_loss" in row for row in record["history"])
    only = run_trial(tmp_path / "only", lightning_trial(metrics=["test/acc"]))
    assert list(only["test"]) == ["test_acc"]


def test_same_trial_same_bytes_and_another_init_level_other_weights(tmp_path: Path) -> None:
    first = run_trial(tmp_path / "a", lightning_trial())
    again = run_trial(tmp_path / "b", lightning_trial())
    assert first["test"] == again["test"] and first["history"] == again["history"]
    files = trial_files(tmp_path / "a")
    assert files == trial_files(tmp_path / "b")
    for name, data in files.items():  # JSON and safetensors only, nothing pickled
        assert json.loads(data) if name.endswith(".json") else safetensors_load(data), name
    other = run_trial(tmp_path / "c", lightning_trial(), levels={"init": 1})
    assert trial_files(tmp_path / "c")["model.safetensors"] != files["model.safetensors"]
    assert other["history"] != first["history"]


def test_a_datamodules_dataset_is_sliced_like_the_data(tmp_path: Path) -> None:
    plain = run_trial(tmp_path / "plain", lightning_trial())
    with_module = run_trial(tmp_path / "dm", lightning_trial(datamodule=TinyData))
    assert plain["test"] == with_module["test"]
    with pytest.raises(UserError, match=r"datamodule.*150 examples.*200"):
        run_trial(
            tmp_path / "short", lightning_trial(datamodule=TinyData, datamodule_kwargs={"n": 150})
        )


KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from lightning_models import KillOnce, lightning_trial, run_trial
out = Path(sys.argv[1])
callbacks = [KillOnce(out / "killed", epoch=2, batch=2)]
run_trial(out, lightning_trial(num_workers={workers}, trainer_kwargs={{"callbacks": callbacks}}))
"""


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_sigkilled_trial_resumes_to_the_same_bytes(tmp_path: Path, workers: int) -> None:
    # Killed in epoch 3 of 4, after epoch 2's checkpoint; the rerun resumes from it. With
    # workers, Lightning draws the resumed epoch's order before its set_epoch call.
    script = tmp_path / "trial.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS_DIR), workers=workers))
    out = tmp_path / "killed"
    run = [sys.executable, str(script), str(out)]
    killed = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "killed").exists() and not (out / "trials/f0/model.safetensors").exists()
    resumed = run_trial(out, lightning_trial(num_workers=workers))
    assert resumed["test"]["training_steps"] == 2 * 5  # only epochs 3 and 4 ran again
    whole = run_trial(tmp_path / "whole", lightning_trial(num_workers=workers))
    assert resumed["history"] == whole["history"]
    assert resumed["test"]["test_acc"] == whole["test"]["test_acc"]
    files = trial_files(out)
    assert files["model.safetensors"] == trial_files(tmp_path / "whole")["model.safetensors"]
    assert files == trial_files(tmp_path / "whole")
    assert not any(name.endswith((".ckpt", ".pt", ".pkl")) for name in files)


def test_checkpoint_io_round_trip_and_refusals(tmp_path: Path) -> None:
    io = SafetensorsCheckpointIO()
    state = {
        "state": {0: {"step": torch.tensor(3.0), "buf": torch.arange(4)}},
        "groups": [{"betas": (0.9, 0.999), "lr": float("nan"), "params": [0], "x": None}],
        "$odd": True,
    }
    path = tmp_path / "c.json"
    io.save_checkpoint(state, path)
    io.save_checkpoint({**state, "$odd": False}, path)  # the first payloads are replaced
    loaded = io.load_checkpoint(path)
    assert loaded["$odd"] is False and loaded["groups"][0]["betas"] == (0.9, 0.999)
    assert math.isnan(loaded["groups"][0]["lr"]) and loaded["groups"][0]["x"] is None
    assert torch.equal(loaded["state"][0]["buf"], torch.arange(4))
    assert len(list(tmp_path.iterdir())) == 3
    with pytest.raises(UserError, match=r"hyper_parameters.root.*PosixPath"):
        io.save_checkpoint({"hyper_parameters": {"root": tmp_path}}, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    payload = next(tmp_path.glob("c-*.safetensors"))
    payload.write_bytes(payload.read_bytes()[:-1] + b"\x00")
    with pytest.raises(UserError, match="sha256"):
        io.load_checkpoint(path)
    io.remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"trainer_kwargs": {"devices": 2}}, "trainer_kwargs.devices"),
        ({"trainer_kwargs": {"deterministic": False}}, "trainer_kwargs.deterministic"),
        ({"trainer_kwargs": {"max_epochs": None}}, "trainer_kwargs"),
        ({"batch_size": 0}, "batch_size"),
        ({"loader_kwargs": {"shuffle": True}}, "loader_kwargs.shuffle"),
    ],
)
def test_settings_randkit_owns_are_refused_in_one_line(options: dict, field: str) -> None:
    with pytest.raises(UserError) as error:
        lightning_trial(**options)
    assert error.value.field == field and "\n" not in str(error.value)


@pytest.mark.slow
def test_cross_validate_on_ray_gives_the_sequential_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import randkit

    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's workers import lightning_models (the module class travels by reference).
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    fit = lightning_trial(trainer_kwargs={"max_epochs": 2})
    runs = {  # bitwise on the CPU at the same threads per trial
        runner: randkit.cross_validate(
            data=dataset(),
            fit=fit,
            folds=2,
            runner=runner,
            cv={"threads_per_trial": 1},
            out=tmp_path / runner,
        )
        for runner in ("sequential", "ray")
    }
    for metric in ("test_acc", "training_steps"):
        assert runs["sequential"].table[metric].tolist() == runs["ray"].table[metric].tolist()


def test_a_rerun_with_other_lightning_settings_is_refused(tmp_path):
    import randkit
    from randkit import UserError

    randkit.cross_validate(
        data=dataset(),
        fit=lightning_trial(trainer_kwargs={"max_epochs": 1}),
        folds=2,
        out=tmp_path / "run",
    )
    longer = lightning_trial(trainer_kwargs={"max_epochs": 2})
    with pytest.raises(UserError, match="different config"):
        randkit.cross_validate(data=dataset(), fit=longer, folds=2, out=tmp_path / "run")
