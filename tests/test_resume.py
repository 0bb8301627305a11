"""Kill -9 a training run at several points, resume it, and get the very same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_config

RESUMABLE = {
    "seed": 21,
    "data": {"kind": "digits", "test_fraction": 0.2, "val_fraction": 0.1},
    "model": {"name": "cnn", "args": {"widths": [8, 16], "hidden": 32, "dropout": 0.2}},
    "train": {
        "epochs": 4,
        "batch_size": 64,
        "optimizer": "adamw",
        "lr": 0.005,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "label_smoothing": 0.05,
        "checkpoint_every": 5,
        "device": "cpu",
        "early_stopping": {"patience": 10, "metric": "accuracy"},
    },
    # Every kind of training-time randomization on, so each stream must replay on resume.
    "randomize": {
        "augment": [
            {"kind": "crop", "padding": 1, "p": 0.7},
            {"kind": "affine", "degrees": 10, "translate": [0.1, 0.1], "p": 0.5},
            {"kind": "erasing", "p": 0.3, "value": "random"},
            {"kind": "mixup", "alpha": 0.4, "p": 0.5},
        ],
        "input_noise": {"kind": "gaussian", "level": 0.1, "p": 0.8},
        "init": "kaiming_normal",
        "weight_noise": {"std": 0.01, "relative": True},
        "drop_connect": 0.05,
        "grad_noise": {"eta": 0.001},
    },
}


def _start(config: Path, out: Path, crash: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ}
    if crash:
        env["RANDKIT_CRASH_DURING_WRITE"] = crash
    return subprocess.Popen(
        [sys.executable, "-m", "randkit", "train", str(config), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _step(out: Path) -> int:
    try:
        return json.loads((out / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def _kill_when(process: subprocess.Popen[str], out: Path, step: int, delay: float) -> int:
    """SIGKILL once a checkpoint at ``step`` or later is on disk, after ``delay`` seconds."""
    deadline = time.monotonic() + 120
    while _step(out) < step:
        assert process.poll() is None, f"run ended before step {step}: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return _step(out)


@pytest.mark.slow
def test_kill_anywhere_and_resume_gives_identical_weights(tmp_path: Path) -> None:
    config = write_config(tmp_path, RESUMABLE)
    reference = tmp_path / "reference"
    assert run_cli("train", str(config), "--out", str(reference), "--quiet").returncode == 0

    out = tmp_path / "interrupted"
    # 1. Killed halfway through writing the third checkpoint (half the bytes on disk).
    crashed = _start(config, out, crash="checkpoint.safetensors:3")
    assert crashed.wait() == -signal.SIGKILL
    assert list(out.glob(".checkpoint.safetensors.tmp-*")), "the crash left a partial temp file"
    assert _step(out) == 10  # the second checkpoint is intact and is what state.json says

    # 2. Killed from outside at arbitrary moments of the training loop.
    steps_seen = []
    for target, delay in ((20, 0.0), (35, 0.013), (50, 0.031)):
        steps_seen.append(_kill_when(_start(config, out), out, target, delay))
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= 50

    # 3. Killed while writing state.json, then while writing the final model.
    assert _start(config, out, crash="state.json:2").wait() == -signal.SIGKILL
    assert _start(config, out, crash="model.safetensors:1").wait() == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()

    expected = (reference / "model.safetensors").read_bytes()
    finished = run_cli("train", str(config), "--out", str(out))
    assert finished.returncode == 0, finished.stderr
    assert "resumed from step" in finished.stdout
    assert (out / "model.safetensors").read_bytes() == expected
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]

    # Running the finished command again changes nothing.
    again = run_cli("train", str(config), "--out", str(out), "--quiet")
    assert again.returncode == 0
    assert (out / "model.safetensors").read_bytes() == expected


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, RESUMABLE)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"\x00garbage")
    result = run_cli("train", str(config), "--out", str(out), "--quiet")
    assert result.returncode == 2
    assert result.stderr.startswith("error: out: checkpoint") and "--restart" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_zeroth_order_run_resumes_bit_exactly(tmp_path: Path) -> None:
    raw = {
        **RESUMABLE,
        "train": {
            **RESUMABLE["train"],
            "optimizer": "zo-sgd",
            "lr": 0.01,
            "epochs": 2,
            "early_stopping": None,
        },
    }
    config = write_config(tmp_path, raw)
    reference = tmp_path / "reference"
    assert run_cli("train", str(config), "--out", str(reference), "--quiet").returncode == 0
    out = tmp_path / "interrupted"
    assert _start(config, out, crash="checkpoint.safetensors:4").wait() == -signal.SIGKILL
    assert run_cli("train", str(config), "--out", str(out), "--quiet").returncode == 0
    expected = (reference / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == expected
