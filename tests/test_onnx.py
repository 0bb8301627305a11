"""ONNX export (``randkit export --format onnx``) and certification of the ONNX model.

Small digits runs (a CNN and an MLP, both with randkit's Dropout) and a CSV text run are
trained once per module; every export is checked against PyTorch with onnxruntime."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from randkit import extras
from randkit.cli import main
from randkit.config import validate_config
from randkit.deploy import Predictor, Sampling, Smoothed, onnx_export
from randkit.deploy.bundle import load_bundle
from randkit.deploy.onnx_export import export_onnx, to_onnx
from randkit.deploy.onnx_model import OnnxClassifier, inference_session
from randkit.errors import UserError
from randkit.train import train_run
from randkit.train.load import load_trained

# The onnx extra (the modules above import it only when used).
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

CNN: dict[str, Any] = {
    "seed": 1,
    "data": {"kind": "digits", "test_fraction": 0.2},
    "model": {"name": "cnn", "args": {"widths": [8, 16], "hidden": 32, "dropout": 0.3}},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.01, "device": "cpu"},
    "randomize": {"input_noise": {"kind": "gaussian", "level": 0.25}},
}
MLP: dict[str, Any] = {**CNN, "model": {"name": "mlp", "args": {"hidden": [32], "dropout": 0.2}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-runs")
    for name, raw in (("cnn", CNN), ("mlp", MLP)):
        train_run(validate_config(raw), root / name, quiet=True)
    train_run(validate_config(_text_config(root)), root / "text", quiet=True)
    return {name: root / name for name in ("cnn", "mlp", "text")}


def _text_config(root: Path) -> dict[str, Any]:
    words = ["good", "bad", "fine", "great", "awful", "plot", "actor", "music", "long", "short"]
    rng = np.random.default_rng(2)
    path = root / "t.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            length = int(rng.integers(1, 12))
            writer.writerow([" ".join(rng.choice(words, size=length)), ("neg", "pos")[i % 2]])
    return {
        "seed": 1,
        "data": {"kind": "csv_text", "path": str(path), "max_length": 8, "test_fraction": 0.25},
        "model": {"name": "text", "args": {"embed_dim": 8, "hidden": 8}},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
    }


def _leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.startswith("."))


@pytest.mark.parametrize("kind", ["cnn", "mlp", "text"])
def test_export_matches_the_bundles_predictor_on_the_test_split(
    runs: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    before = torch.random.get_rng_state()
    folder = export_onnx(runs[kind], tmp_path / "repo", kind)
    assert torch.equal(before, torch.random.get_rng_state())  # no global RNG touched
    assert folder == tmp_path / "repo" / kind / "1"
    files = {p.name for p in folder.iterdir()}
    assert {"bundle.json", "model.onnx", "model.safetensors", "config.pbtxt"} <= files
    assert _leftovers(tmp_path / "repo") == []
    section = json.loads((folder / "bundle.json").read_text())["onnx"]
    assert section["checked_on"] == "test" and section["max_abs_diff_probabilities"] <= 1e-5

    # The ONNX input is what the server's input tensor takes (standardization inside).
    bundle = load_bundle(folder)
    x = load_trained(runs[kind], device="cpu").prepared.test.x
    expected = Predictor.from_bundle(bundle).predict(x, Sampling("none", 1, 0))["probabilities"]
    model = OnnxClassifier(folder / "model.onnx")
    logits, probabilities = model.run(x)
    assert np.abs(probabilities - expected).max() <= 1e-5
    assert np.abs(probabilities - torch.softmax(torch.from_numpy(logits), -1).numpy()).max() < 1e-6
    assert model.input_dtype == bundle.input_dtype and model.num_classes == len(bundle.classes)

    # Triton's configuration for the file: the bundle's name, input and classes.
    config = (folder / "config.pbtxt").read_text()
    dims = ", ".join(map(str, bundle.input_shape))
    dtype = "TYPE_INT64" if kind == "text" else "TYPE_FP32"
    assert f'name: "{kind}"' in config and 'backend: "onnxruntime"' in config
    assert f'{{ name: "input", data_type: {dtype}, dims: [ {dims} ] }}' in config
    classes = len(bundle.classes)
    assert f'{{ name: "probabilities", data_type: TYPE_FP32, dims: [ {classes} ] }}' in config


def test_the_file_has_opset_17_or_later_a_dynamic_batch_and_no_random_op(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    folder = export_onnx(runs["cnn"], tmp_path / "repo", "digits")
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    assert opsets[""] >= 17
    (graph_input,) = proto.graph.input
    assert graph_input.name == "input"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    # randkit's Dropout(0.3) exported in eval mode: the identity, nothing random in the graph.
    assert not [
        n.op_type for n in proto.graph.node if "Random" in n.op_type or n.op_type == "Dropout"
    ]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["randkit.classes"]) == [
        str(c) for c in range(10)
    ]

    model = OnnxClassifier(folder / "model.onnx")
    x = load_trained(runs["cnn"], device="cpu").prepared.test.x
    (whole,) = model.run(x, ("logits",))
    for size in (1, 7, 64):  # any batch size, each row as in the whole batch
        (part,) = model.run(x[:size], ("logits",))
        assert part.shape == (size, 10)
        np.testing.assert_allclose(part, whole[:size], rtol=0, atol=1e-5)


def test_export_in_train_mode_is_still_deterministic(runs: dict[str, Path]) -> None:
    model = load_trained(runs["cnn"], device="cpu").model
    x = load_trained(runs["cnn"], device="cpu").prepared.test.x[:32]
    model.train()  # the export must switch randkit's Dropout off itself
    data = to_onnx(model, x[:2], {})
    assert model.training  # and give the model its mode back
    logits = inference_session(data).run(["logits"], {"input": x.numpy()})[0]
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=0, atol=1e-5)


class _Branchy(torch.nn.Module):
    """Control flow on a value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_a_model_that_does_not_export_is_refused_in_one_line() -> None:
    with pytest.raises(UserError) as error:
        to_onnx(_Branchy(), torch.ones(2, 4), {})
    message = str(error.value)
    assert message.startswith("format: the model does not export to ONNX: ")
    assert "\n" not in message and "\x1b" not in message


class _Perturbed:
    """An onnxruntime session whose outputs are off by 1e-4: the check must refuse it."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [value + np.float32(1e-4) for value in self.session.run(names, feeds)]


def test_a_failed_check_leaves_nothing(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    export_onnx(runs["mlp"], repo, "digits")  # version 1 exists and must stay as it is
    files = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    monkeypatch.setattr(
        onnx_export, "inference_session", lambda data: _Perturbed(inference_session(data))
    )
    with pytest.raises(UserError) as error:
        export_onnx(runs["mlp"], repo, "digits")
    message = str(error.value)
    assert "\n" not in message and "differ from PyTorch's by up to 0.0001" in message
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == files  # no version 2
    with pytest.raises(UserError):
        export_onnx(runs["mlp"], tmp_path / "fresh", "digits")
    assert not (tmp_path / "fresh").exists()  # the folders it would have made are gone too


def test_cli_export_and_its_one_line_errors(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    common = ["export", str(runs["mlp"]), "--repository", str(repo), "--name", "m"]
    assert main([*common, "--format", "onnx"]) == 0
    assert (repo / "m" / "1" / "model.onnx").is_file()
    assert main(common) == 0  # the default format is still the bundle alone
    assert not (repo / "m" / "2" / "model.onnx").exists()
    capsys.readouterr()
    assert main([*common, "--format", "tflite"]) == 2
    assert capsys.readouterr().err == "error: --format: must be bundle or onnx, got 'tflite'\n"
    assert main([*common, "--format", "onnx", "--ensemble"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ONNX export takes one model" in err
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2"]


def test_missing_extra_is_one_line(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(extras.EXTRAS, "onnx", ("onnx", "surely_not_installed_module"))
    with pytest.raises(extras.MissingExtraError, match=r"pip install 'randkit\[onnx\]'$"):
        export_onnx(runs["mlp"], tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()


def test_onnx_classifier_refuses_what_it_cannot_run(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        OnnxClassifier(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        OnnxClassifier(tmp_path / "junk.onnx")
    text = OnnxClassifier(export_onnx(runs["text"], tmp_path / "repo", "t") / "model.onnx")
    with pytest.raises(UserError, match=r"takes int64 inputs of shape \(N, 8\)"):
        text.check_input([1, 8, 8], torch.float32)


# Certification: the same noise draws through PyTorch and through onnxruntime. The first 6
# test inputs (no selection), each with the seed `randkit certify` gives it. A vote could only
# differ where a noisy sample's top two logits lie within ~1e-6 of each other; none did when
# this was written (0 of 120,000 draws at sigma 0.25, 0.5 and 1.0), at most 2 are allowed.
def test_certification_through_onnx_agrees_with_pytorch(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    folder = export_onnx(runs["cnn"], tmp_path / "repo", "digits")
    trained = load_trained(runs["cnn"], device="cpu")
    x = trained.prepared.test.x
    results = []
    for model in (trained.model, OnnxClassifier(folder / "model.onnx")):
        smoothed = Smoothed(model, 10, sigma=0.5)
        assert smoothed.device == torch.device("cpu")
        counts, classes, radii = [], [], []
        for i in range(6):
            seed = trained.streams.seed("deploy", purpose="certify", index=i)
            generator = Sampling("smooth", 1000, seed, 0.5).generator()
            counts.append(smoothed.sample_counts(x[i : i + 1], 1000, 500, generator))
            generator = Sampling("smooth", 1000, seed, 0.5).generator()
            predicted, radius = smoothed.certify(x[i : i + 1], 100, 1000, 0.001, 500, generator)
            classes.append(int(predicted[0]))
            radii.append(float(radius[0]))
        results.append((np.concatenate(counts), classes, np.array(radii)))
    (torch_counts, torch_classes, torch_radii), (onnx_counts, onnx_classes, onnx_radii) = results
    assert np.abs(torch_counts - onnx_counts).sum(1).max() <= 2 * 2  # a flip moves 2 cells
    assert onnx_classes == torch_classes
    np.testing.assert_allclose(onnx_radii, torch_radii, rtol=1e-2, atol=1e-6)
    same = (torch_counts == onnx_counts).all(1)  # the same votes give the same radius, bitwise
    assert (onnx_radii[same] == torch_radii[same]).all()
    assert len(set(torch_classes)) > 1  # not a degenerate case (all one class)


def test_cli_certify_with_onnx_gives_the_same_rows(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    folder = export_onnx(runs["cnn"], tmp_path / "repo", "digits")
    common = ["certify", str(runs["cnn"]), "--sigma", "0.25", "--n", "300", "--max", "5"]
    assert main([*common, "--out", str(tmp_path / "torch.tsv"), "--quiet"]) == 0
    onnx_tsv = tmp_path / "onnx.tsv"
    assert (
        main([*common, "--out", str(onnx_tsv), "--quiet", "--onnx", str(folder / "model.onnx")])
        == 0
    )

    def rows(path: Path) -> list[list[str]]:  # all but the time column
        return [line.split("\t")[:5] for line in path.read_text().splitlines()]

    assert rows(onnx_tsv) == rows(tmp_path / "torch.tsv") and len(rows(onnx_tsv)) == 6
    text_model = export_onnx(runs["text"], tmp_path / "repo", "text") / "model.onnx"
    capsys.readouterr()
    assert main([*common, "--quiet", "--onnx", str(text_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes int64 inputs" in err
