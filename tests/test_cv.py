"""Cross-validation: plans, runners that agree, the resumable store, the CLI."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config
from randkit import Streams, global_rng_guard
from randkit.config import CVConfig, validate_config
from randkit.cv import make_plan, run_cv
from randkit.errors import UserError

SMALL: dict[str, Any] = {
    "seed": 5,
    "data": {"kind": "digits"},
    "model": {"name": "cnn", "args": {"widths": [4, 8], "hidden": 16, "dropout": 0.2}},
    "train": {
        "epochs": 2,
        "batch_size": 128,
        "optimizer": "adamw",
        "lr": 0.01,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "device": "cpu",
    },
    "randomize": {
        "augment": [
            {"kind": "crop", "padding": 1, "p": 0.5},
            {"kind": "mixup", "alpha": 0.4, "p": 0.5},
        ],
        "input_noise": {"kind": "gaussian", "level": 0.1, "p": 0.5},
    },
    "cv": {"folds": 4, "repeats": 1, "threads_per_trial": 1},
}
METRICS = ["accuracy", "loss", "macro_f1"]


def config(**cv: Any) -> Any:
    raw = json.loads(json.dumps(SMALL))
    raw["cv"].update(cv)
    return validate_config(raw)


def config_with(**sections: dict[str, Any]) -> Any:
    raw = json.loads(json.dumps(SMALL))
    for name, values in sections.items():
        raw[name].update(values)
    return validate_config(raw)


def table_without_time(out: Path) -> list[dict[str, str]]:
    """The rows of ``results.csv`` as written, less the wall time."""
    with open(out / "results.csv", newline="") as handle:
        return [
            {k: v for k, v in row.items() if k != "fit_seconds"} for row in csv.DictReader(handle)
        ]


# -- plans --------------------------------------------------------------------------------
def test_stratified_plan_covers_every_example_once_per_repeat() -> None:
    y = np.repeat(np.arange(4), 25)
    plan = make_plan(CVConfig(folds=5, repeats=2), y, None, Streams(0))
    assert len(plan.trials) == 10
    for repeat in (0, 1):
        tests = [t.test_idx for t in plan.trials if t.repeat == repeat]
        assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(100))
        for t in plan.trials:
            assert not set(t.train_idx) & set(t.test_idx)
            assert np.bincount(y[t.test_idx]).tolist() == [5, 5, 5, 5]  # stratified
    first = [t.test_idx for t in plan.trials if t.repeat == 0]
    second = [t.test_idx for t in plan.trials if t.repeat == 1]
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_vary_keeps_unlisted_sources_fixed() -> None:
    plan = make_plan(
        CVConfig(folds=2, repeats=3, vary=["init"]), np.repeat([0, 1], 10), None, Streams(0)
    )
    for t in plan.trials:
        assert t.levels["init"] == t.repeat
        assert all(t.levels[s] == 0 for s in ("split", "order", "augment", "noise", "dropout"))
    # The split did not vary, so every repeat has the same partition.
    parts = {tuple(t.test_idx) for t in plan.trials if t.fold == 0}
    assert len(parts) == 1


def test_decomposition_plan_shares_its_baseline_trials() -> None:
    plan = make_plan(
        CVConfig(folds=3, repeats=3, vary=["split", "init"], decompose=True),
        np.repeat([0, 1], 15),
        None,
        Streams(0),
    )
    # Per source: 3 folds x 3 levels; level 0 is the same baseline trial for both sources.
    assert len(plan.trials) == 3 + 2 * 3 * 2
    assert len(plan.cells) == 2 * 3 * 3
    baseline = [c["id"] for c in plan.cells if c["repeat"] == 0]
    assert sorted(set(baseline)) == ["f0", "f1", "f2"]


def test_five_by_two_and_group_plans() -> None:
    y = np.repeat([0, 1], 20)
    plan = make_plan(CVConfig(splitter="5x2"), y, None, Streams(0))
    assert len(plan.trials) == 10 and {t.fold for t in plan.trials} == {0, 1}
    groups = np.repeat(np.arange(8), 5)
    grouped = make_plan(CVConfig(splitter="group_kfold", folds=4), y, groups, Streams(0))
    for t in grouped.trials:
        assert not set(groups[t.train_idx]) & set(groups[t.test_idx])
    with pytest.raises(UserError, match=r"cv.splitter.*needs group labels"):
        make_plan(CVConfig(splitter="group_kfold", folds=4), y, None, Streams(0))


# -- runners agree ------------------------------------------------------------------------
def test_sequential_and_processes_give_bitwise_identical_metrics(tmp_path: Path) -> None:
    sequential = run_cv(config(), tmp_path / "seq", quiet=True, report=False)
    processes = run_cv(
        config(runner="processes", workers=2), tmp_path / "proc", quiet=True, report=False
    )
    assert sequential.table["id"].tolist() == processes.table["id"].tolist()
    for metric in METRICS:
        assert sequential.table[metric].tolist() == processes.table[metric].tolist(), metric
    for trial in sequential.table["id"]:
        a = (tmp_path / "seq" / "trials" / trial / "model.safetensors").read_bytes()
        b = (tmp_path / "proc" / "trials" / trial / "model.safetensors").read_bytes()
        assert a == b, trial


def test_vectorized_runner_agrees_with_sequential(tmp_path: Path) -> None:
    # SGD with momentum, every per-trial randomization on, 4 folds of 1,797 examples:
    # unequal training sizes (1347/1348), padded batches.
    sgd = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}
    sequential = run_cv(config_with(train=sgd), tmp_path / "seq", quiet=True, report=False)
    vectorized = run_cv(
        config_with(train=sgd, cv={"runner": "vectorized"}),
        tmp_path / "vec",
        quiet=True,
        report=False,
    )
    assert sorted(set(sequential.table["train_size"])) == [1347, 1348]
    assert np.array_equal(sequential.table["accuracy"], vectorized.table["accuracy"])
    assert np.allclose(sequential.table["loss"], vectorized.table["loss"], atol=1e-4, rtol=0)
    seq_hist = json.loads((tmp_path / "seq/trials/f0/metrics.json").read_text())["history"]
    vec_hist = json.loads((tmp_path / "vec/trials/f0/metrics.json").read_text())["history"]
    for a, b in zip(seq_hist, vec_hist, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


def test_vectorized_runner_with_adamw_agrees_to_float_noise(tmp_path: Path) -> None:
    # Adam divides by sqrt(v): a gradient component that is exactly 0 in one runner and
    # 1e-12 in the other (vmap's grouped convolutions round differently) gets a full-size
    # update, so AdamW runs agree less tightly than SGD ones.
    sequential = run_cv(config(), tmp_path / "seq", quiet=True, report=False)
    vectorized = run_cv(config(runner="vectorized"), tmp_path / "vec", quiet=True, report=False)
    one_sample = 1 / sequential.table["test_size"].min()
    assert np.abs(sequential.table["accuracy"] - vectorized.table["accuracy"]).max() <= one_sample
    assert np.allclose(sequential.table["loss"], vectorized.table["loss"], atol=1e-3, rtol=0)


def test_vectorized_runner_with_parameter_noise_and_early_stopping(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(SMALL))
    raw["train"].update(
        {
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "grad_clip": 1.0,
            "epochs": 3,
            "early_stopping": {"patience": 1, "metric": "loss"},
        }
    )
    raw["data"]["val_fraction"] = 0.1  # early stopping needs it; cv uses inner_val_fraction
    raw["randomize"].update(
        {
            "weight_noise": {"std": 0.01, "relative": True},
            "drop_connect": 0.05,
            "grad_noise": {"eta": 0.001},
        }
    )
    raw["cv"].update({"folds": 3, "inner_val_fraction": 0.1})
    sequential = run_cv(validate_config(raw), tmp_path / "seq", quiet=True, report=False)
    raw["cv"]["runner"] = "vectorized"
    vectorized = run_cv(validate_config(raw), tmp_path / "vec", quiet=True, report=False)
    assert np.array_equal(sequential.table["accuracy"], vectorized.table["accuracy"])
    assert np.allclose(sequential.table["loss"], vectorized.table["loss"], atol=1e-4, rtol=0)


def test_vectorized_runner_stacks_text_models_of_unequal_vocabularies(tmp_path: Path) -> None:
    """Each trial's vocabulary is fit on its own training part, so the text models' embeddings
    differ in size (62 rows of one unique word each, 3 folds: 41 or 42 training rows). The
    vectorized runner stacks the models that agree and gives each trial its sequential score
    (issue #18: it failed in stack_module_state)."""
    rows = "".join(f"{'good fine' if i % 2 else 'bad poor'} film w{i},{i % 2}\n" for i in range(62))
    (tmp_path / "texts.csv").write_text("text,label\n" + rows)
    raw = json.loads(json.dumps(SMALL))
    raw["data"] = {"kind": "csv_text", "path": str(tmp_path / "texts.csv")}
    raw["model"] = {"name": "text", "args": {"embed_dim": 8, "hidden": 8}}
    raw["randomize"] = {}
    raw["train"].update({"batch_size": 16})
    raw["cv"].update({"folds": 3})
    sequential = run_cv(validate_config(raw), tmp_path / "seq", quiet=True, report=False)
    raw["cv"]["runner"] = "vectorized"
    vectorized = run_cv(validate_config(raw), tmp_path / "vec", quiet=True, report=False)
    assert np.array_equal(sequential.table["accuracy"], vectorized.table["accuracy"])
    assert np.allclose(sequential.table["loss"], vectorized.table["loss"], atol=1e-4, rtol=0)


def test_vectorized_runner_refuses_what_it_cannot_vmap(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(SMALL))
    raw["model"]["args"]["batchnorm"] = True
    raw["cv"]["runner"] = "vectorized"
    with pytest.raises(UserError, match=r"cv.runner.*layer 'net.1' \(BatchNorm2d"):
        run_cv(validate_config(raw), tmp_path / "bn", quiet=True, report=False)


@pytest.mark.slow
def test_ray_runner_matches_sequential_and_survives_a_killed_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # The worker running trial f1 SIGKILLs itself mid-trial once; Ray retries the task.
    monkeypatch.setenv("RANDKIT_KILL_TRIAL_ONCE", f"f1:{tmp_path / 'killed'}")
    ray_run = run_cv(config(runner="ray", retries=2), tmp_path / "ray", quiet=True, report=False)
    assert (tmp_path / "killed").exists(), "the fault was injected"
    monkeypatch.delenv("RANDKIT_KILL_TRIAL_ONCE")
    sequential = run_cv(config(), tmp_path / "seq", quiet=True, report=False)
    for metric in METRICS:
        assert sequential.table[metric].tolist() == ray_run.table[metric].tolist(), metric


# -- the store: resume, refusal, global RNGs -----------------------------------------------
@pytest.mark.slow
def test_killed_cv_resumes_with_only_the_missing_trials(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(SMALL))
    raw["cv"].update({"folds": 3, "repeats": 2})
    path = write_config(tmp_path, raw)
    reference = tmp_path / "reference"
    assert run_cli("cv", str(path), "--out", str(reference), "--quiet").returncode == 0

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "randkit", "cv", str(path), "--out", str(out), "--quiet"]
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("trials/*/metrics.json"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("trials/*/metrics.json")))
    assert 2 <= done < 6

    resumed = run_cv(validate_config(raw), out, quiet=True)
    assert resumed.trained == 6 - done
    assert table_without_time(out) == table_without_time(reference)
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()


def test_other_config_is_refused_and_whole_cv_leaves_global_rngs_alone(tmp_path: Path) -> None:
    with global_rng_guard():
        first = run_cv(config(), tmp_path / "run", quiet=True)
    assert first.trained == 4 and len(first.table) == 4
    again = run_cv(config(), tmp_path / "run", quiet=True, report=False)
    assert again.trained == 0
    with pytest.raises(UserError, match=r"different config.*--restart"):
        run_cv(config(folds=5), tmp_path / "run", quiet=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and summary["n_trials"] == 4
    lo, hi = summary["ci95"]  # the headline: corrected, on the logit scale for accuracy
    assert 0.0 <= lo <= summary["mean"] <= hi <= 1.0
    assert summary["ci95_method"] == "nadeau_bengio_logit"
    assert lo <= summary["ci95_naive"][0] <= summary["ci95_naive"][1] <= hi  # naive: narrower
    assert summary["ci95_corrected"] == summary["ci95"]  # the old name, an alias for a release
    assert summary["per_metric"]["loss"]["ci95_method"] == "nadeau_bengio"


@pytest.mark.parametrize(
    "runner",
    [
        "sequential",
        "vectorized",
        pytest.param("processes", marks=pytest.mark.slow),
        pytest.param("ray", marks=pytest.mark.slow),
    ],
)
def test_every_runner_leaves_global_rngs_alone(
    runner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout, crop, mixup and input noise under each runner: none touches torch's, NumPy's
    or Python's global RNG (issue #18: the vectorized runner once did)."""
    if runner == "ray":
        pytest.importorskip("ray")
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg = config_with(train={"epochs": 1}, cv={"folds": 2, "runner": runner, "workers": 2})
    with global_rng_guard():
        result = run_cv(cfg, tmp_path / runner, quiet=True, report=False)
    assert result.trained == 2


def test_the_first_cross_validate_in_a_process_leaves_global_rngs_alone(tmp_path: Path) -> None:
    """In a fresh interpreter, where every lazy import (rich, scikit-learn) happens for the
    first time inside the call (issue #18: rich's import drew from Python's random)."""
    script = f"""
import random, numpy as np, torch
import randkit
from randkit import global_rng_guard
with global_rng_guard():
    randkit.cross_validate("mlp", folds=2, train={{"epochs": 1, "batch_size": 256}},
                           out={str(tmp_path / "run")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_variance_components_in_summary(tmp_path: Path) -> None:
    result = run_cv(
        config(folds=2, repeats=3, vary=["init"], decompose=True),
        tmp_path / "d",
        quiet=True,
        report=False,
    )
    components = result.summary["variance_components"]["components"]
    assert list(components) == ["init"]
    assert components["init"]["variance"] >= 0 and components["init"]["share"] == 1.0


# -- CLI ----------------------------------------------------------------------------------
def test_cli_cv_compare_and_errors(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(SMALL))
    raw["cv"].update({"folds": 3, "repeats": 2})
    a = write_config(tmp_path, raw, "a.yaml")
    raw["train"]["lr"] = 0.002
    b = write_config(tmp_path, raw, "b.yaml")
    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    done = run_cli("cv", str(a), "--out", str(run_a))
    assert done.returncode == 0 and "95% CI" in done.stdout and "report.html" in done.stdout
    assert run_cli("cv", str(b), "--out", str(run_b), "--quiet").returncode == 0
    compared = run_cli("compare", str(run_a), str(run_b), "--json", str(tmp_path / "c.json"))
    assert compared.returncode == 0, compared.stderr
    assert "Nadeau-Bengio corrected t-test" in compared.stdout
    assert "Bayesian correlated t-test (ROPE +-0.01" in compared.stdout
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["n_trials"] == 6 and len(result["differences"]) == 6
    bayes = result["bayesian_correlated_t_test"]
    assert sum(bayes[k] for k in ("p_a_better", "p_equivalent", "p_b_better")) == pytest.approx(1)
    bad = run_cli("cv", str(a), "--out", str(tmp_path / "x"), "--runner", "gpu")
    assert bad.returncode == 2 and bad.stderr.startswith("error: cv.runner")
    assert not (tmp_path / "x").exists()
    missing = run_cli("compare", str(run_a), str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a finished cross-validation" in missing.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vectorized_on_cuda(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(SMALL))
    raw["train"]["device"] = "cuda"
    raw["cv"]["runner"] = "vectorized"
    assert len(run_cv(validate_config(raw), tmp_path / "c", quiet=True).table) == 4


@pytest.mark.slow
def test_ray_runner_on_a_two_node_cluster_by_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        result = run_cv(
            config(runner="ray", address=cluster.address),
            tmp_path / "two",
            quiet=True,
            report=False,
        )
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    sequential = run_cv(config(), tmp_path / "seq", quiet=True, report=False)
    assert sequential.table["accuracy"].tolist() == result.table["accuracy"].tolist()
