"""User model files: found next to the config from any folder, carried by bundles, refused
when they are not one file; references of functions and classes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from randkit.config import ModelConfig, load_config, validate_config
from randkit.deploy.bundle import export_bundle, load_bundle
from randkit.deploy.bundle_code import code_to_copy
from randkit.deploy.bundle_load import _build
from randkit.errors import UserError
from randkit.models import code_folders, resolve_factory
from randkit.models.user_code import (
    import_reference,
    load_source_file,
    reference_of,
    source_file_of,
)
from randkit.train import train_run

NET = '''"""A user's model, in a plain file next to its experiment config."""

import math

from torch import nn


class Net(nn.Module):
    def __init__(self, features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.body(x)


def make(in_shape, num_classes, hidden=12):
    return Net(math.prod(in_shape), hidden, num_classes)
'''

EXPERIMENT: dict[str, Any] = {
    "seed": 4,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "rk_tiny_net:make", "args": {"hidden": 12}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.01, "device": "cpu"},
    "cv": {"folds": 2, "runner": "sequential"},
}

# Loads a bundle in a fresh interpreter, serves it too, and prints what it computed.
LOAD_ELSEWHERE = """
import json, sys
import torch
from fastapi.testclient import TestClient
from randkit.deploy.bundle import load_bundle
from randkit.serve.app import create_app
from randkit.serve.server import ServerSettings

bundle = load_bundle(sys.argv[1])
x = torch.linspace(0, 1, 4 * 64).reshape(4, *bundle.input_shape)
with torch.no_grad():
    logits = [model(x).tolist() for model in bundle.models]
app = create_app(ServerSettings(repository=__import__("pathlib").Path(sys.argv[2])))
body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "data": x.reshape(-1).tolist()}]}
with TestClient(app) as client:
    served = client.post("/v2/models/tiny/infer", json=body)
print(json.dumps({
    "logits": logits,
    "module_file": sys.modules["rk_tiny_net"].__file__,
    "status": served.status_code,
    "outputs": {o["name"]: o["data"] for o in served.json().get("outputs", [])},
}))
"""


def _env() -> dict[str, str]:
    """The environment without PYTHONPATH: nothing but the installed packages is importable."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter in ``cwd``, with no PYTHONPATH."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=300,
        check=False,
    )


@pytest.fixture(autouse=True)
def forget_user_modules() -> Iterator[None]:
    """Modules these tests load from temp folders do not outlive the test."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("rk_", "_randkit_bundle_")):
            del sys.modules[name]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``project/exp.yaml`` with its model ``project/rk_tiny_net.py`` (on no import path)."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "rk_tiny_net.py").write_text(NET)
    (folder / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    return folder


@pytest.fixture(scope="module")
def cv_run(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = elsewhere / "runs" / "cv"
    config = os.path.relpath(project / "exp.yaml", elsewhere)
    done = _python("-m", "randkit", "cv", config, "--out", "runs/cv", "--quiet", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def bundle(cv_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cv run exported from a third folder: the run's config.yaml finds the module."""
    repo = tmp_path_factory.mktemp("served") / "repo"
    done = _python(
        *("-m", "randkit", "export", str(cv_run), "--repository", str(repo)),
        *("--name", "tiny", "--ensemble"),
        cwd=tmp_path_factory.mktemp("third"),
    )
    assert done.returncode == 0, done.stderr
    return repo / "tiny" / "1"


def test_cv_finds_the_model_file_next_to_the_config_from_another_folder(
    cv_run: Path, project: Path
):
    assert len(list((cv_run / "trials").glob("*/model.safetensors"))) == 2
    resolved = yaml.safe_load((cv_run / "config.yaml").read_text())
    assert resolved["model"]["code_dir"] == str(project)
    # The run's own config finds the module again, from anywhere.
    assert validate_config(resolved).model.code_dir == project


def test_missing_model_file_names_the_folders_looked_in(tmp_path: Path):
    raw = {**EXPERIMENT, "model": {"name": "rk_absent_net:make"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "exp.yaml")
    with pytest.raises(UserError) as missing:
        resolve_factory(cfg.model.name, code_folders(cfg.model))
    assert str(missing.value).startswith(
        "model.name: cannot import 'rk_absent_net:make': ModuleNotFoundError: No module named "
        f"'rk_absent_net' (looked in: {tmp_path}, "
    )


def test_code_dir_is_a_location_not_part_of_the_experiment(project: Path, tmp_path: Path):
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(project / "exp.yaml", moved / "exp.yaml")
    here, there = load_config(project / "exp.yaml"), load_config(moved / "exp.yaml")
    assert (here.model.code_dir, there.model.code_dir) == (project, moved)
    assert here.fingerprint() == there.fingerprint()
    # A relative code_dir is relative to the config file; zoo models get none.
    raw = {**EXPERIMENT, "model": {"name": "rk_tiny_net:make", "code_dir": "src"}}
    (moved / "sub.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(moved / "sub.yaml").model.code_dir == moved / "src"
    (moved / "zoo.yaml").write_text(yaml.safe_dump({**EXPERIMENT, "model": {"name": "mlp"}}))
    assert load_config(moved / "zoo.yaml").model.code_dir is None


def _original_logits(cv_run: Path, x: torch.Tensor) -> list[list[list[float]]]:
    """Each trial's weights in the model built from the project's own file."""
    cfg = validate_config(yaml.safe_load((cv_run / "config.yaml").read_text()))
    logits = []
    for trial in sorted((cv_run / "trials").iterdir()):
        model = _build(cfg.model, "image", [1, 8, 8], None, [str(c) for c in range(10)])
        model.load_state_dict(load_file(trial / "model.safetensors"))
        with torch.no_grad():
            logits.append(model.eval()(x).tolist())
    return logits


def test_bundle_carries_the_model_file_and_loads_in_a_fresh_process(
    bundle: Path, cv_run: Path, project: Path, tmp_path: Path
):
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["model"] == {"name": "rk_tiny_net:make", "args": {"hidden": 12}}
    code = meta["code"]
    assert code["module"] == "rk_tiny_net" and code["file"] == "code/rk_tiny_net.py"
    assert (bundle / code["file"]).read_text() == NET
    assert len(code["sha256"]) == 64

    done = _python("-c", LOAD_ELSEWHERE, str(bundle), str(bundle.parent.parent), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(fresh["module_file"]) == bundle / "code" / "rk_tiny_net.py"
    x = torch.linspace(0, 1, 4 * 64).reshape(4, 1, 8, 8)
    original = _original_logits(cv_run, x)
    torch.testing.assert_close(torch.tensor(fresh["logits"]), torch.tensor(original))
    assert fresh["status"] == 200, fresh
    probabilities = torch.tensor(fresh["outputs"]["probabilities"]).reshape(4, -1)
    assert fresh["outputs"]["predicted"] == probabilities.argmax(1).tolist()


def test_bundle_code_with_another_sha256_is_refused(bundle: Path, tmp_path: Path):
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    with open(tampered / "code" / "rk_tiny_net.py", "a") as handle:
        handle.write("\nprint('hello')\n")
    with pytest.raises(UserError, match=r"code file 'code/rk_tiny_net\.py' fails its sha256"):
        load_bundle(tampered)
    assert "rk_tiny_net" not in sys.modules  # refused before anything ran


def test_a_module_imported_under_the_same_name_with_other_code_does_not_shadow_the_bundle(
    bundle: Path, tmp_path: Path
):
    (tmp_path / "rk_tiny_net.py").write_text(NET.replace("hidden=12", "hidden=5"))
    load_source_file(tmp_path / "rk_tiny_net.py", "rk_tiny_net", None)
    loaded = load_bundle(bundle)  # the hidden sizes differ: the wrong code would not fit
    assert type(loaded.models[0].net).__module__.startswith("_randkit_bundle_rk_tiny_net_")


def test_a_module_inside_an_uninstalled_package_is_refused_at_export(tmp_path: Path):
    package = tmp_path / "code" / "rk_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text(NET)
    (package / "net.py").write_text("from .layers import make\n")
    raw = {
        **EXPERIMENT,
        "model": {"name": "rk_pkg.net:make", "code_dir": str(tmp_path / "code")},
    }
    train_run(validate_config(raw), tmp_path / "run", quiet=True)  # relative imports work
    with pytest.raises(UserError) as refused:
        export_bundle(tmp_path / "run", tmp_path / "repo", "pkg")
    assert refused.value.field == "model.name"
    assert "'rk_pkg.net:make' lives in package 'rk_pkg', which is not installed" in str(
        refused.value
    )
    assert not (tmp_path / "repo").exists()


def test_a_module_that_imports_local_modules_is_refused(tmp_path: Path):
    (tmp_path / "rk_layers.py").write_text(NET)
    uses = "import rk_layers\n\n\ndef make(in_shape, num_classes):\n"
    (tmp_path / "rk_uses_layers.py").write_text(
        uses + "    return rk_layers.make(in_shape, num_classes)\n"
    )
    with pytest.raises(UserError, match="uses the uninstalled module 'rk_layers'"):
        code_to_copy(ModelConfig(name="rk_uses_layers:make", code_dir=tmp_path))


def test_zoo_and_installed_models_need_no_copy():
    assert code_to_copy(ModelConfig(name="mlp")) is None
    assert code_to_copy(ModelConfig(name="torch.nn:Linear")) is None


# -- the references themselves ------------------------------------------------------------------


def module_level() -> int:
    return 1


class ModuleLevel:
    pass


def test_reference_of_module_level_functions_and_classes():
    assert reference_of(module_level, "f") == f"{__name__}:module_level"
    assert reference_of(ModuleLevel, "f") == f"{__name__}:ModuleLevel"
    assert source_file_of(module_level) == Path(__file__).resolve()
    assert source_file_of(f"{__name__}:ModuleLevel") == Path(__file__).resolve()
    assert source_file_of(len) is None
    assert source_file_of("rk_not_a_module:x") is None


def test_reference_of_refuses_what_cannot_be_imported_back():
    def nested() -> None:
        pass

    class Nested:
        pass

    with pytest.raises(UserError, match=r"model: .*<lambda> is a lambda"):
        reference_of(lambda: 1, "model")
    with pytest.raises(UserError, match="is defined inside a function; move it to module level"):
        reference_of(nested, "model")
    with pytest.raises(UserError, match="is defined inside a function"):
        reference_of(Nested, "model")
    for obj in (functools.partial(module_level), object(), 3):
        with pytest.raises(UserError, match="has no module and qualified name"):
            reference_of(obj, "model")


def test_import_reference_searches_folders_then_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "rk_found.py").write_text("class Thing:\n    pass\n")
    thing = import_reference("rk_found:Thing", "model.name", [first, second])
    assert thing.__module__ == "rk_found" and sys.modules["rk_found"].Thing is thing
    assert source_file_of(thing) == second / "rk_found.py"

    monkeypatch.chdir(second)
    (second / "rk_in_cwd.py").write_text("VALUE = 3\n")
    assert import_reference("rk_in_cwd:VALUE", "x", [first]) == 3

    with pytest.raises(UserError) as missing:
        import_reference("rk_nowhere:make", "model.name", [first])
    assert str(missing.value) == (
        "model.name: cannot import 'rk_nowhere:make': ModuleNotFoundError: No module named "
        f"'rk_nowhere' (looked in: {first}, {second})"
    )
    with pytest.raises(UserError, match="rk_found has no 'Absent'"):
        import_reference("rk_found:Absent", "model.name")
    with pytest.raises(UserError, match="is not of the form"):
        import_reference("rk_found", "model.name")


def test_a_module_whose_own_import_fails_says_why_on_one_line(tmp_path: Path):
    (tmp_path / "rk_broken.py").write_text("import rk_dependency_missing\n")
    (tmp_path / "rk_syntax.py").write_text("def f(:\n    pass\n")
    with pytest.raises(UserError, match="No module named 'rk_dependency_missing'") as broken:
        import_reference("rk_broken:f", "model.name", [tmp_path])
    with pytest.raises(UserError, match="SyntaxError") as syntax:
        import_reference("rk_syntax:f", "model.name", [tmp_path])
    for error in (broken, syntax):
        assert "\n" not in str(error.value)
    assert "rk_broken" not in sys.modules and "rk_syntax" not in sys.modules


def test_load_source_file_checks_the_sha256(tmp_path: Path):
    path = tmp_path / "rk_checked.py"
    path.write_text("X = 1\n")
    with pytest.raises(UserError, match=r"has sha256 .* expected 0+: the file was changed"):
        load_source_file(path, "rk_checked", "0" * 64)
    assert "rk_checked" not in sys.modules
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_source_file(path, "rk_checked", digest).X == 1
