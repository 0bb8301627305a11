"""User errors: exit code 2, one line naming the field and the value, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_EXPERIMENT, merged, run_cli, write_config
from randkit.cli import main


def _npz(folder: Path, x: np.ndarray, y: np.ndarray) -> str:
    path = folder / "arrays.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def _nan_npz(folder: Path) -> str:
    x = np.zeros((20, 4), dtype=np.float32)
    x[13, 2] = np.nan
    return _npz(folder, x, np.arange(20) % 2)


def _images(folder: Path, empty_class: bool = False, broken: bool = False) -> str:
    root = folder / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        if empty_class and name == "dog":
            continue
        for i in range(3):
            Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    if broken:
        (root / "dog" / "broken.png").write_bytes(b"not an image at all")
    return str(root)


def _csv(folder: Path) -> str:
    path = folder / "texts.csv"
    path.write_text("review,label\ngood film,pos\nbad film,neg\n")
    return str(path)


Case = tuple[Callable[[Path], dict], list[str], tuple[str, ...]]

CASES: dict[str, Case] = {
    "negative-lr": (
        lambda d: merged(FAST_EXPERIMENT, train={"lr": -1}),
        [],
        ("train.lr", "must be > 0", "-1"),
    ),
    "unknown-field": (
        lambda d: merged(FAST_EXPERIMENT, train={"lrate": 0.1}),
        [],
        ("train.lrate", "unknown field", "0.1"),
    ),
    "epochs-not-int": (
        lambda d: merged(FAST_EXPERIMENT, train={"epochs": "ten"}),
        [],
        ("train.epochs", "integer", "'ten'"),
    ),
    "unknown-optimizer": (
        lambda d: merged(FAST_EXPERIMENT, train={"optimizer": "rmsprop"}),
        [],
        ("train.optimizer", "'rmsprop'"),
    ),
    "unknown-seed-source": (
        lambda d: merged(FAST_EXPERIMENT, seeds={"shuffle": 1}),
        [],
        ("seeds.shuffle", "unknown random source"),
    ),
    "unknown-data-kind": (
        lambda d: merged(FAST_EXPERIMENT, data={"kind": "parquet"}),
        [],
        ("data.kind", "'parquet'"),
    ),
    "npz-without-path": (
        lambda d: merged(FAST_EXPERIMENT, data={"kind": "npz"}),
        [],
        ("data.path", "required", "'npz'"),
    ),
    "npz-missing-file": (
        lambda d: merged(FAST_EXPERIMENT, data={"kind": "npz", "path": str(d / "no.npz")}),
        [],
        ("data.path", "not found", "no.npz"),
    ),
    "npz-nan": (
        lambda d: merged(FAST_EXPERIMENT, data={"kind": "npz", "path": _nan_npz(d)}),
        [],
        ("data.path", "NaN", "row 13"),
    ),
    "single-class": (
        lambda d: merged(
            FAST_EXPERIMENT,
            data={"kind": "npz", "path": _npz(d, np.ones((10, 3), np.float32), np.zeros(10, int))},
        ),
        [],
        ("data", "at least 2 classes", "1"),
    ),
    "missing-image-folder": (
        lambda d: merged(
            FAST_EXPERIMENT, data={"kind": "image_folder", "path": str(d / "nowhere")}
        ),
        [],
        ("data.path", "not found", "nowhere"),
    ),
    "empty-class": (
        lambda d: merged(
            FAST_EXPERIMENT, data={"kind": "image_folder", "path": _images(d, empty_class=True)}
        ),
        [],
        ("data.path", "holds no images", "dog"),
    ),
    "unreadable-image": (
        lambda d: merged(
            FAST_EXPERIMENT, data={"kind": "image_folder", "path": _images(d, broken=True)}
        ),
        [],
        ("data.path", "unreadable image", "broken.png"),
    ),
    "missing-text-column": (
        lambda d: merged(
            FAST_EXPERIMENT,
            data={"kind": "csv_text", "path": _csv(d)},
            model={"name": "text", "args": {}},
        ),
        [],
        ("data.text_column", "'text'", "review"),
    ),
    "unknown-model": (
        lambda d: merged(FAST_EXPERIMENT, model={"name": "transformer"}),
        [],
        ("model.name", "'transformer'"),
    ),
    "unknown-model-arg": (
        lambda d: merged(FAST_EXPERIMENT, model={"name": "mlp", "args": {"width": 3}}),
        [],
        ("model.args.width", "unknown argument", "3"),
    ),
    "early-stopping-without-val": (
        lambda d: merged(FAST_EXPERIMENT, train={"early_stopping": {"patience": 2}}),
        [],
        ("train.early_stopping", "val_fraction"),
    ),
    "epochs-flag-zero": (
        lambda d: FAST_EXPERIMENT,
        ["--epochs", "0"],
        ("train.epochs", "must be > 0", "0"),
    ),
    "seed-flag-negative": (
        lambda d: FAST_EXPERIMENT,
        ["--seed", "-4"],
        ("seed", "must be >= 0", "-4"),
    ),
    "test-fraction-one": (
        lambda d: merged(FAST_EXPERIMENT, data={"test_fraction": 1.0}),
        [],
        ("data.test_fraction", "must be < 1", "1.0"),
    ),
}


def _check_one_line(stderr: str, needles: tuple[str, ...]) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_config_or_data(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_raw, flags, needles = CASES[case]
    config = write_config(tmp_path, make_raw(tmp_path))
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--quiet", *flags]) == 2
    _check_one_line(capsys.readouterr().err, needles)
    assert not out.exists(), "a failed run must write nothing"


def test_config_file_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.yaml"), "--quiet"]) == 2
    _check_one_line(capsys.readouterr().err, ("config", "not found", "nope.yaml"))


def test_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lr: [1, 2\n")
    assert main(["train", str(config), "--quiet"]) == 2
    _check_one_line(capsys.readouterr().err, ("config", "not valid YAML", "line"))


def test_unknown_option_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "x.yaml", "--epoch", "3"]) == 2
    _check_one_line(capsys.readouterr().err, ("--epoch",))


def test_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, merged(FAST_EXPERIMENT, train={"lr": -1}))
    result = run_cli("train", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.lr: must be > 0, got -1"
    assert not (tmp_path / "run").exists()
