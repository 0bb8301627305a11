"""Packaging: the core install works without the optional extras, a part whose extra is
missing says which one to install in one line, and the metadata keeps ranges, not pins."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from randkit.cv.store import ResultTable

ROOT = Path(__file__).resolve().parents[1]

# What the extras serve, report and ray (and pandas, which nothing needs) bring.
BLOCKED = (
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "prometheus_client",
    "matplotlib",
    "jinja2",
    "pandas",
    "ray",
)
# As if none of them were installed: every import finder is wrapped to find none of them (None
# in sys.modules would not do: libraries such as scikit-learn take that for an imported module).
BLOCKER = f"""
import sys
BLOCKED_NAMES = {BLOCKED!r}


class _Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED_NAMES:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
"""


def run_blocked(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=600,
        check=False,
    )


CORE = """
import importlib, json, pkgutil
from pathlib import Path

import randkit
from randkit import Streams, cross_validate
from randkit.randomize import Compose, HorizontalFlip, InputNoise

OPTIONAL = ("randkit.serve", "randkit.report", "randkit.integrations", "randkit.__main__")
imported = []
for info in pkgutil.walk_packages(randkit.__path__, "randkit."):
    if not info.name.startswith(OPTIONAL):
        importlib.import_module(info.name)
        imported.append(info.name)

import torch
x = torch.rand(4, 1, 8, 8)
pipeline = Compose([HorizontalFlip(p=0.5), InputNoise("gaussian", 0.1)])
params = pipeline.draw(x.shape, Streams(0).torch("augment", step=0), "cpu")
assert pipeline.apply(x, params).shape == x.shape
result = cross_validate("mlp", "digits", folds=2, train={"epochs": 1}, out=Path(sys.argv[1]))
try:
    result.table.to_pandas()
    to_pandas = "worked"
except ImportError as exc:
    to_pandas = str(exc)
print(json.dumps({
    "imported": imported,
    "rows": len(result.table),
    "accuracy": result.table["accuracy"].tolist(),
    "report": None if result.report is None else str(result.report),
    "to_pandas": to_pandas,
    "loaded": sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED_NAMES),
}))
"""


@pytest.mark.slow
def test_core_works_without_any_extra(tmp_path: Path) -> None:
    out = tmp_path / "cv"
    done = run_blocked(CORE, str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in (
        "randkit.streams",
        "randkit.randomize",
        "randkit.cv",
        "randkit.cv.run",
        "randkit.deploy",
        "randkit.train",
        "randkit.cli",
        "randkit.robustness",
    ):
        assert name in result["imported"]
    assert result["rows"] == 2 and all(0.5 < a <= 1 for a in result["accuracy"])
    assert (out / "results.csv").is_file() and (out / "summary.json").is_file()
    assert not (out / "report.html").exists() and result["report"] is None
    assert "pip install pandas" in result["to_pandas"]
    assert result["loaded"] == []  # no optional package slipped in some other way
    # One line says what was skipped and which extra brings it.
    lines = [line for line in done.stderr.splitlines() if "randkit[report]" in line]
    assert lines == [
        "randkit.report needs the 'report' extra (jinja2 is not installed): "
        "pip install 'randkit[report]'; skipped report.html"
    ], done.stderr
    assert "Traceback" not in done.stderr


CLI = "from randkit.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["serve", "."],
            "error: randkit serve needs the 'serve' extra (fastapi is not installed): "
            "pip install 'randkit[serve]'",
        ),
        (
            ["report", "."],
            "error: randkit report needs the 'report' extra (jinja2 is not installed): "
            "pip install 'randkit[report]'",
        ),
        (
            ["explain", "."],
            "error: randkit explain needs the 'report' extra (jinja2 is not installed): "
            "pip install 'randkit[report]'",
        ),
    ],
)
def test_command_without_its_extra_exits_2_with_one_line(
    tmp_path: Path, args: list[str], line: str
) -> None:
    done = run_blocked(CLI, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == line
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("part", ["serve", "report"])
def test_import_without_its_extra_is_an_import_error_naming_the_extra(part: str) -> None:
    code = (
        f"try:\n    import randkit.{part}\nexcept ImportError as exc:\n    print(exc)\n"
        "else:\n    print('imported')\n"
    )
    done = run_blocked(code)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rf"randkit\.{part} needs the '{part}' extra \(\w+ is not installed\): "
        rf"pip install 'randkit\[{part}\]'",
        done.stdout.strip(),
    ), done.stdout


FIGURES = """
import sys
from pathlib import Path

import numpy as np

from randkit.deploy.uncertainty import reliability, reliability_png
from randkit.errors import UserError
from randkit.robustness import write_robustness

out = Path(sys.argv[1])
calls = [
    lambda: write_robustness(out, {"gaussian": [{"level": 0.0, "accuracy": 1.0}]}, {}),
    lambda: reliability_png(reliability(np.eye(2), np.array([0, 1]), bins=2)),
]
for call in calls:
    try:
        call()
    except UserError as exc:
        print(exc)
"""


def test_library_figures_without_the_report_extra_name_it_and_write_nothing(
    tmp_path: Path,
) -> None:
    """The core's figure-drawing functions (robustness curve, reliability diagram) refuse in
    one line naming the extra, before writing any file."""
    done = run_blocked(FIGURES, str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.endswith(
            "needs the 'report' extra (jinja2 is not installed): pip install 'randkit[report]'"
        ), line
    assert list(tmp_path.iterdir()) == []


def test_metadata_keeps_ranges_and_constraints_pin_the_tested_floor() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    core = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower(): d for d in project["dependencies"]}
    assert not any("==" in d for d in core.values()), core
    for name in ("fastapi", "uvicorn", "prometheus-client", "matplotlib", "jinja2", "pandas"):
        assert name not in core, name
    extras = project["optional-dependencies"]
    assert {"serve", "report", "ray", "dev", "bench"} <= set(extras)
    assert any(d.startswith("fastapi") for d in extras["serve"])
    assert any(d.startswith("matplotlib") for d in extras["report"])
    assert {"kornia", "skorch"} <= {re.split(r"[<>=]", d)[0] for d in extras["bench"]}

    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    # The floor of each range is the exact release that make and CI install and test.
    assert f">={pins['torch']}" in core["torch"]
    assert f">={pins['torchvision']}" in core["torchvision"]
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_result_table_columns_rows_and_csv() -> None:
    table = ResultTable(
        ["id", "fold", "accuracy"],
        [{"id": "f0r0", "fold": 0, "accuracy": 0.5}, {"id": "f1r0", "fold": 1}],
    )
    assert len(table) == 2 and list(table) == ["id", "fold", "accuracy"] and "fold" in table
    assert table["id"].tolist() == ["f0r0", "f1r0"]
    assert table["fold"].sum() == 1
    assert table["accuracy"][0] == 0.5 and table["accuracy"][1] != table["accuracy"][1]  # NaN
    assert table.to_csv() == "id,fold,accuracy\nf0r0,0,0.5\nf1r0,1,\n"
    with pytest.raises(KeyError, match="loss"):
        table["loss"]
