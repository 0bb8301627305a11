"""The cross-validation progress bar: every runner advances it per epoch (issue #17 item 7)."""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import randkit.cv.run as cv_run
from randkit.config import validate_config
from randkit.cv import run_cv
from randkit.cv.progress import cv_progress

EPOCHS, FOLDS = 3, 2
TINY: dict[str, Any] = {
    "seed": 3,
    "data": {"kind": "digits"},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "train": {"epochs": EPOCHS, "batch_size": 256, "lr": 0.01, "device": "cpu"},
    "cv": {"folds": FOLDS, "threads_per_trial": 1, "workers": 2},
}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def recording(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The run's bar drawn on a terminal-like console that writes into the returned buffer."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    monkeypatch.setattr(cv_run, "cv_progress", functools.partial(cv_progress, console=console))
    return buffer


def frames(buffer: io.StringIO) -> str:
    return ANSI.sub("", buffer.getvalue())


@pytest.mark.parametrize(
    "runner",
    [
        "sequential",
        "vectorized",
        "processes",
        pytest.param("ray", marks=pytest.mark.slow),
    ],
)
def test_every_runner_advances_per_epoch(
    runner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if runner == "ray":
        pytest.importorskip("ray")
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray's CLI logger wraps sys.stdout with colorama when first imported; imported under
        # the bar it would wrap the bar's proxy of pytest's capture, closed before exit.
        import ray.autoscaler._private.cli_logger  # noqa: F401
    buffer = recording(monkeypatch)
    raw = {**TINY, "cv": {**TINY["cv"], "runner": runner}}
    run_cv(validate_config(raw), tmp_path / runner, quiet=False, report=False)
    text = frames(buffer)
    total = EPOCHS * FOLDS
    # Each epoch of each trial moved the bar by one: every count from 1 to the total shows.
    counts = {int(m) for m in re.findall(rf"(\d+)/{total} epochs", text)}
    assert set(range(1, total + 1)) <= counts, (counts, text[-800:])
    assert f"trials {FOLDS}/{FOLDS}" in text
    assert re.search(r"loss \d+\.\d{4}", text), text[-800:]
    assert "left" in text  # the time-left column


def test_quiet_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    for runner in ("sequential", "vectorized", "processes"):
        raw = {
            **TINY,
            "train": {**TINY["train"], "epochs": 1},
            "cv": {**TINY["cv"], "runner": runner},
        }
        run_cv(validate_config(raw), tmp_path / runner, quiet=True, report=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_resumed_run_starts_at_the_trials_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {**TINY, "train": {**TINY["train"], "epochs": 1}}
    run_cv(validate_config(raw), tmp_path / "run", quiet=True, report=False)
    buffer = recording(monkeypatch)
    run_cv(validate_config(raw), tmp_path / "run", quiet=False, report=False)
    assert f"{FOLDS}/{FOLDS} epochs" in frames(buffer)
    assert f"trials {FOLDS}/{FOLDS}" in frames(buffer)


def test_early_stopped_epochs_and_late_events() -> None:
    """A trial stopped early fills its missing epochs when done; later events are dropped."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    with cv_progress(False, trials=2, done=0, epochs=4, console=console) as bar:
        assert bar is not None
        bar.epoch("a", {"epoch": 1, "train_loss": 0.5})
        bar.trial_done({"id": "a", "history": [{"epoch": 1, "train_loss": 0.25}]})
        bar.epoch("a", {"epoch": 2, "train_loss": 0.1})  # a worker's late event
        bar.epoch("b", {"epoch": 1, "loss": 0.75})  # a trial function names it "loss"
        task = bar.progress.tasks[0]
        assert task.completed == 5
        assert task.fields["trials"] == "1/2" and task.fields["loss"] == "0.7500"
    with cv_progress(True, trials=2, done=0, epochs=4) as quiet:
        assert quiet is None


def test_a_trial_function_counts_trials_and_shows_its_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import object_models as om
    import randkit

    buffer = recording(monkeypatch)
    randkit.cross_validate(
        data=om.DigitsItems(), fit=om.fit_with_global_rng, folds=2, out=tmp_path / "fit",
        quiet=False,
    )  # fmt: skip
    text = frames(buffer)
    assert "1/2 trials" in text and "2/2 trials" in text
    assert "loss 0.0000" in text  # what the function reported with trial.report
