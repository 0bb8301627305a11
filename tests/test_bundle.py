"""Model bundles: export a run, load it back bit-exactly, refuse anything unsafe or broken."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from randkit import global_rng_guard
from randkit.config import validate_config
from randkit.cv import run_cv
from randkit.deploy.bundle import FORMAT, export_bundle, load_bundle, validate_input
from randkit.errors import UserError
from randkit.train import train_run
from randkit.train.load import load_trained

TINY: dict[str, Any] = {
    "seed": 5,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.01, "device": "cpu"},
    "randomize": {"input_noise": {"kind": "gaussian", "level": 0.25}},
}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "train"
    train_run(validate_config(TINY), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cv"
    raw = {**TINY, "cv": {"folds": 2, "runner": "sequential"}}
    run_cv(validate_config(raw), out, quiet=True, report=False)
    return out


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    words = ["good", "bad", "fine", "great", "awful", "plot", "actor", "music", "long", "short"]
    rng = np.random.default_rng(2)
    path = folder / "t.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            length = int(rng.integers(1, 12))
            writer.writerow([" ".join(rng.choice(words, size=length)), ("neg", "pos")[i % 2]])
    raw = {
        "seed": 1,
        "data": {"kind": "csv_text", "path": str(path), "max_length": 8, "test_fraction": 0.25},
        "model": {"name": "text", "args": {"embed_dim": 8, "hidden": 8}},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
    }
    out = folder / "run"
    train_run(validate_config(raw), out, quiet=True)
    return out


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_export_then_load_gives_the_runs_model_bit_exactly(train_dir: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    with global_rng_guard():
        bundle_dir = export_bundle(train_dir, repo, "digits")
    assert bundle_dir == repo / "digits" / "1"
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["bundle.json", "model.safetensors"]
    assert (bundle_dir / "model.safetensors").read_bytes() == (
        train_dir / "model.safetensors"
    ).read_bytes()
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["format"] == FORMAT
    assert (meta["name"], meta["version"]) == ("digits", "1")
    assert meta["source_run"] == str(train_dir.resolve())
    assert meta["model"] == {"name": "mlp", "args": {"hidden": [16]}}
    assert meta["input"]["shape"] == [1, 8, 8]
    assert meta["input"]["dtype"] == "float32"
    assert meta["input"]["value_range"] == [0, 1]
    assert meta["classes"] == [str(i) for i in range(10)] and meta["num_classes"] == 10
    assert meta["preprocessing"] == {}
    assert meta["members"] == ["model.safetensors"]
    assert meta["randomized"] == {
        "sigma": 0.25,
        "default_mode": None,
        "samples": 32,
        "augment": [],
        "weight_noise": None,
    }
    assert set(meta["sha256"]) == {"model.safetensors"}

    trained = load_trained(train_dir, device="cpu")
    with global_rng_guard():
        bundle = load_bundle(bundle_dir)
    assert len(bundle.models) == 1 and not bundle.models[0].training
    assert bundle.input_shape == [1, 8, 8] and bundle.input_dtype == torch.float32
    assert bundle.classes == meta["classes"]
    x = validate_input(bundle, trained.prepared.test.x)
    with torch.no_grad():
        assert torch.equal(bundle.models[0](x), trained.model(trained.prepared.test.x))
    # Only JSON and safetensors are written: every file parses as one or the other.
    for file in _files(repo):
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            assert file.suffix == ".safetensors"
            with safe_open(str(file), framework="pt") as handle:
                assert list(handle.keys())
    assert _hidden(repo) == []


def test_ensemble_of_a_cv_run_has_one_member_per_trial(cv_dir: Path, tmp_path: Path):
    bundle_dir = export_bundle(cv_dir, tmp_path / "repo", "digits-cv", ensemble=True)
    plan = json.loads((cv_dir / "plan.json").read_text())
    ids = [t["id"] for t in plan["trials"]]
    assert ids == ["f0", "f1"]
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["members"] == [f"models/{i}.safetensors" for i in ids]
    assert meta["input"]["shape"] == [1, 8, 8]
    assert meta["classes"] == json.loads((cv_dir / "summary.json").read_text())["classes"]
    bundle = load_bundle(bundle_dir)
    assert len(bundle.models) == len(ids)
    for trial_id, model in zip(ids, bundle.models, strict=True):
        saved = load_file(cv_dir / "trials" / trial_id / "model.safetensors")
        state = model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    # The members differ (each fold has its own weights and standardization).
    a, b = (m.state_dict() for m in bundle.models)
    assert not torch.equal(a["standardize.mean"], b["standardize.mean"])


def test_cv_run_needs_ensemble_and_train_run_refuses_it(
    train_dir: Path, cv_dir: Path, tmp_path: Path
):
    repo = tmp_path / "repo"
    with pytest.raises(UserError, match="--ensemble") as info:
        export_bundle(cv_dir, repo, "x")
    assert info.value.field == "ensemble"
    with pytest.raises(UserError, match="single model") as info:
        export_bundle(train_dir, repo, "x", ensemble=True)
    assert info.value.field == "ensemble"
    with pytest.raises(UserError, match="neither a finished training run") as info:
        export_bundle(tmp_path, repo, "x")
    assert info.value.field == "run"
    assert not repo.exists()  # nothing written for a refused export


def test_text_bundle_carries_the_vocabulary(text_dir: Path, tmp_path: Path):
    bundle_dir = export_bundle(text_dir, tmp_path / "repo", "reviews")
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["preprocessing"] == json.loads((text_dir / "preprocessing.json").read_text())
    assert meta["input"]["dtype"] == "int64" and meta["input"]["shape"] == [8]
    assert meta["input"]["value_range"] is None
    assert meta["randomized"]["sigma"] is None
    bundle = load_bundle(bundle_dir)
    trained = load_trained(text_dir, device="cpu")
    x = trained.prepared.test.x
    with torch.no_grad():
        assert torch.equal(bundle.models[0](validate_input(bundle, x)), trained.model(x))
    with pytest.raises(ValueError, match="not an integer"):
        validate_input(bundle, x.float())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
        validate_input(bundle, x + 10_000)
    # Each fold of a text cross-validation has its own vocabulary: no ensemble of them.
    cfg = validate_config(
        {**yaml.safe_load((text_dir / "config.yaml").read_text()), "cv": {"folds": 2}}
    )
    run_cv(cfg, tmp_path / "cv", quiet=True, report=False)
    with pytest.raises(UserError, match="own vocabulary"):
        export_bundle(tmp_path / "cv", tmp_path / "repo", "reviews-cv", ensemble=True)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["reviews"]


def test_versions_auto_increment_and_existing_version_is_refused(train_dir: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    assert export_bundle(train_dir, repo, "m").name == "1"
    assert export_bundle(train_dir, repo, "m").name == "2"
    assert export_bundle(train_dir, repo, "m", version="10").name == "10"
    assert export_bundle(train_dir, repo, "m", version="beta-1.0").name == "beta-1.0"
    assert export_bundle(train_dir, repo, "m").name == "11"
    assert export_bundle(train_dir, repo, "other").name == "1"
    before = (repo / "m" / "2" / "bundle.json").read_bytes()
    with pytest.raises(UserError, match="already exists") as info:
        export_bundle(train_dir, repo, "m", version="2")
    assert info.value.field == "version"
    assert (repo / "m" / "2" / "bundle.json").read_bytes() == before
    assert _hidden(repo) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "..", "a\nb", "x" * 65, "a b"])
def test_unsafe_names_and_versions_are_refused(train_dir: Path, tmp_path: Path, name: str):
    repo = tmp_path / "repo"
    with pytest.raises(UserError) as info:
        export_bundle(train_dir, repo, name)
    assert info.value.field == "name" and repr(name) in info.value.message
    with pytest.raises(UserError) as info:
        export_bundle(train_dir, repo, "ok", version=name)
    assert info.value.field == "version"
    assert not repo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_export_leaves_no_temp_folder(train_dir: Path, tmp_path: Path, monkeypatch):
    repo = tmp_path / "repo"
    export_bundle(train_dir, repo, "m")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("randkit.deploy.bundle.atomic.write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        export_bundle(train_dir, repo, "m")
    with pytest.raises(OSError, match="disk full"):
        export_bundle(train_dir, repo, "new")
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # "new" was removed again
    assert _hidden(repo) == []


def test_temp_folder_of_a_dead_export_is_cleaned_up(train_dir: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    stale = repo / "m" / ".tmp-999999999-abc"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert export_bundle(train_dir, repo, "m").name == "1"
    assert not stale.exists()


@pytest.fixture
def bundle_copy(train_dir: Path, tmp_path: Path) -> Path:
    return export_bundle(train_dir, tmp_path / "repo", "m")


def _edit_meta(bundle_dir: Path, **changes: Any) -> None:
    path = bundle_dir / "bundle.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _bundle_error(bundle_dir: Path) -> str:
    with pytest.raises(UserError) as info:
        load_bundle(bundle_dir)
    assert info.value.field == "bundle"
    return info.value.message


def test_corrupted_member_fails_its_sha256(bundle_copy: Path):
    member = bundle_copy / "model.safetensors"
    data = bytearray(member.read_bytes())
    data[-5] ^= 0x01  # a flipped bit in the last weight
    member.write_bytes(bytes(data))
    message = _bundle_error(bundle_copy)
    assert "sha256" in message and "'model.safetensors'" in message


def test_missing_or_unreadable_bundle_json(bundle_copy: Path, tmp_path: Path):
    assert "no bundle.json" in _bundle_error(tmp_path / "nowhere")
    (bundle_copy / "bundle.json").write_text("{not json")
    assert "not valid JSON" in _bundle_error(bundle_copy)
    (bundle_copy / "bundle.json").write_text("[1, 2]")
    assert "JSON object" in _bundle_error(bundle_copy)


def test_unknown_format_and_missing_member(bundle_copy: Path):
    _edit_meta(bundle_copy, format="randkit-bundle/99")
    assert "unknown format 'randkit-bundle/99'" in _bundle_error(bundle_copy)
    _edit_meta(bundle_copy, format=FORMAT)
    (bundle_copy / "model.safetensors").unlink()
    assert "'model.safetensors' is missing" in _bundle_error(bundle_copy)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"name": "mlp", "args": {"hidden": [32]}}, "'net.1.weight' has shape [16, 64]"),
        ({"name": "cnn", "args": {}}, "missing key 'net.0.weight'"),
        ({"name": "mlp", "args": {"hidden": []}}, "unexpected key 'net.3.bias' (and 1 more)"),
        ({"name": "nope", "args": {}}, "unknown model 'nope'"),
        ({"name": "mlp", "args": {"width": 3}}, "model.args.width"),
        ("mlp", "model section must be an object"),
        ({"name": "mlp", "args": [1]}, "model section: args"),
    ],
)
def test_wrong_model_section_is_refused(bundle_copy: Path, model: Any, expected: str):
    _edit_meta(bundle_copy, model=model)
    assert expected in _bundle_error(bundle_copy)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"input": {"kind": "image", "shape": [1, 8, -8], "dtype": "float32"}}, "input.shape"),
        ({"input": {"kind": "image", "shape": "1x8x8", "dtype": "float32"}}, "input.shape"),
        ({"input": {"kind": "image", "shape": [1, 8.0, 8], "dtype": "float32"}}, "input.shape"),
        ({"input": {"kind": "image", "shape": [64], "dtype": "float32"}}, "3 dimensions"),
        ({"input": {"kind": "image", "shape": [1, 8, 8], "dtype": "int64"}}, "input.dtype"),
        ({"members": ["../model.safetensors"]}, "inside the bundle"),
        ({"members": []}, "members must be"),
        ({"sha256": {}}, "no digest"),
        ({"num_classes": 3}, "num_classes"),
    ],
)
def test_malformed_sections_are_refused(bundle_copy: Path, changes: dict, expected: str):
    _edit_meta(bundle_copy, **changes)
    assert expected in _bundle_error(bundle_copy)


def test_validate_input(bundle_copy: Path):
    bundle = load_bundle(bundle_copy)
    good = np.random.default_rng(0).random((4, 1, 8, 8))  # float64 is accepted, made float32
    out = validate_input(bundle, good)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"input shape \[3, 8, 8\] does not match the bundle's"):
        validate_input(bundle, np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="no batch dimension"):
        validate_input(bundle, np.zeros((1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        validate_input(bundle, np.zeros((64,), dtype=np.float32))
    with pytest.raises(ValueError, match="no examples"):
        validate_input(bundle, np.zeros((0, 1, 8, 8), dtype=np.float32))
    bad = good.copy()
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_input(bundle, bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_input(bundle, torch.full((1, 1, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="uint8 is not floating point"):
        validate_input(bundle, np.zeros((2, 1, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="not numeric"):
        validate_input(bundle, np.array([["a"] * 8] * 8)[None, None])
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        validate_input(bundle, [[0.0] * 8] * 8)  # type: ignore[arg-type]


def test_unknown_device_is_refused(bundle_copy: Path):
    with pytest.raises(UserError) as info:
        load_bundle(bundle_copy, device="tpu9")
    assert info.value.field == "device" and "'tpu9'" in info.value.message
