"""One inference path: the same bundle, inputs, seed and mode give the same outputs, bit for
bit, through the Python API (``Predictor``, ``MonteCarlo``, ``Smoothed``, ``randkit
certify``) and through the server's KServe V2 and TensorFlow Serving routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from randkit.deploy import MonteCarlo, Predictor, Sampling, Smoothed
from randkit.deploy.bundle import LoadedBundle, load_bundle
from randkit.deploy.certify_run import certify_run
from randkit.streams import Streams
from randkit.train.load import TrainedRun, load_trained
from serve_support import RunningServer, running_server, v2_body

# (model, parameters): every mode the server has; the sizes keep each request small.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("digits", {"mode": "mc_dropout", "samples": 8}),
    ("digits", {"mode": "tta", "samples": 8}),
    ("digits", {"mode": "weight_noise", "samples": 4, "sigma": 0.05}),
    ("digits", {"mode": "smooth", "samples": 64, "n0": 16, "sigma": 0.25, "alpha": 0.01}),
    ("digits", {"mode": "none"}),
    ("digits-ensemble", {"mode": "ensemble"}),
    # 3 inputs x 1,500 samples: more rows than one stochastic pass holds (pass by pass).
    ("digits", {"mode": "mc_dropout", "samples": 1500}),
]
RANDOMIZED = [case for case in CASES if case[1]["mode"] not in ("none", "ensemble")]
SEED = 4321


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    return f"{case[1]['mode']}-{case[1].get('samples', 1)}"


@pytest.fixture(scope="module")
def trained(serve_repository: Path) -> TrainedRun:
    """The training run that bundle digits/1 was exported from."""
    return load_trained(serve_repository.parent / "run1")


def _inputs(trained: TrainedRun, n: int, seed: int) -> np.ndarray:
    """n of the run's test digits, picked by ``seed``: real inputs, so that smoothing
    certifies some and abstains on others."""
    test = trained.prepared.test.x.numpy()
    pick = Streams(seed).numpy("noise", test=n).choice(len(test), n, replace=False)
    return test[np.sort(pick)]


@pytest.fixture(scope="module")
def server(serve_repository: Path):
    with running_server(serve_repository, max_batch=4096, max_delay_ms=5) as srv:
        yield srv


@pytest.fixture(scope="module")
def bundles(serve_repository: Path) -> dict[str, LoadedBundle]:
    return {
        name: load_bundle(serve_repository / name / "1") for name in ("digits", "digits-ensemble")
    }


def _sampling(params: dict[str, Any], seed: int) -> Sampling:
    """What the server makes of the parameters (weight noise relative: the bundle was trained
    without weight noise)."""
    return Sampling(
        params["mode"],
        params.get("samples", 32),
        seed,
        params.get("sigma"),
        alpha=params.get("alpha", 0.001),
        n0=params.get("n0", 100),
    )


def _library(bundle: LoadedBundle, x: np.ndarray, params: dict[str, Any], seed: int) -> dict:
    return Predictor.from_bundle(bundle).predict(torch.from_numpy(x), _sampling(params, seed))


def _v2(server: RunningServer, name: str, x: np.ndarray, params: dict, seed: int) -> dict:
    with server.client() as client:
        response = client.post(
            f"/v2/models/{name}/versions/1/infer", json=v2_body(x, seed=seed, **params)
        )
    assert response.status_code == 200, response.text
    return response.json()


def _tf(server: RunningServer, name: str, x: np.ndarray, params: dict, seed: int) -> dict:
    body = {"instances": x.tolist(), "parameters": {**params, "seed": seed}}
    with server.client() as client:
        response = client.post(f"/v1/models/{name}/versions/1:predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_python_api_v2_and_tf_serving_give_the_same_bits(server, bundles, trained, case):
    name, params = case
    x = _inputs(trained, 3, seed=11)
    expected = _library(bundles[name], x, params, SEED)
    v2 = _v2(server, name, x, params, SEED)
    tf = _tf(server, name, x, params, SEED)

    v2_outputs = {o["name"]: o for o in v2["outputs"]}
    assert set(v2_outputs) == {*expected, "class"}
    for key, array in expected.items():
        assert v2_outputs[key]["shape"] == list(array.shape), key
        assert v2_outputs[key]["data"] == array.reshape(-1).tolist(), key  # exact, as JSON
    rows = tf["predictions"]
    assert len(rows) == len(x)
    for key, array in expected.items():
        assert [row[key] for row in rows] == array.tolist(), key
    echoed = _sampling(params, SEED).as_parameters()
    assert {k: v2["parameters"][k] for k in echoed} == echoed
    assert {k: tf["parameters"][k] for k in echoed} == echoed


@pytest.mark.parametrize("case", RANDOMIZED, ids=_ids)
def test_another_seed_gives_other_outputs(server, bundles, trained, case):
    name, params = case
    x = _inputs(trained, 3, seed=12)
    key = "probabilities"  # smooth: the vote frequencies
    first = _library(bundles[name], x, params, SEED)[key]
    other = _library(bundles[name], x, params, SEED + 1)[key]
    assert not np.array_equal(first, other)
    served = _v2(server, name, x, params, SEED + 1)
    data = {o["name"]: o["data"] for o in served["outputs"]}[key]
    assert data == other.reshape(-1).tolist() and data != first.reshape(-1).tolist()


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("dropout", {"mode": "mc_dropout", "samples": 8}),
        ("weight_noise", {"mode": "weight_noise", "samples": 4, "sigma": 0.05}),
        ("tta", {"mode": "tta", "samples": 8}),
    ],
)
def test_montecarlo_is_the_same_path(bundles, trained, kind, params):
    bundle = bundles["digits"]
    predictor = Predictor.from_bundle(bundle)
    mc = MonteCarlo(
        bundle.models[0],
        kind,
        params["samples"],
        transforms=predictor.tta,
        noise_std=params.get("sigma", 0.01),
    )
    x = _inputs(trained, 5, seed=13)
    result = mc.predict(torch.from_numpy(x), seed=SEED)
    expected = predictor.predict(torch.from_numpy(x), _sampling(params, SEED))
    np.testing.assert_array_equal(result.probs, expected["probabilities"])
    np.testing.assert_array_equal(result.mutual_information, expected["mutual_information"])
    assert result.sample_probs.shape == (params["samples"], 5, 10)


def test_smoothed_certify_is_the_same_path(bundles, trained):
    bundle = bundles["digits"]
    params = {"mode": "smooth", "samples": 300, "n0": 20, "sigma": 0.25, "alpha": 0.01}
    x, sampling = torch.from_numpy(_inputs(trained, 6, seed=14)), _sampling(params, SEED)
    smoothed = Smoothed(bundle.models[0], len(bundle.classes), 0.25, "cpu")
    for batch_size in (7, 1000):  # how the noise is batched does not matter
        predicted, radius = smoothed.certify(
            x, 20, 300, 0.01, batch_size, sampling.generator("cpu")
        )
        expected = Predictor.from_bundle(bundle).predict(x, sampling)
        np.testing.assert_array_equal(predicted, expected["predicted"])
        np.testing.assert_array_equal(radius.astype(np.float32), expected["radius"])
    assert (predicted == -1).any() and (radius > 0).any()  # both outcomes are compared


def test_randkit_certify_rows_replay_in_the_predictor(
    serve_repository: Path, bundles, trained, tmp_path
):
    """``randkit certify``'s input i is the request with seed
    ``streams.seed("deploy", purpose="certify", index=i)`` of the run's streams."""
    run = trained.out
    sigma, n0, n, alpha = 0.25, 20, 200, 0.01
    certify_run(
        run, sigma, n0, n, alpha, batch=100, max_inputs=3, out=tmp_path / "c.tsv", quiet=True
    )
    rows = [line.split("\t") for line in (tmp_path / "c.tsv").read_text().splitlines()[1:]]
    predictor = Predictor.from_bundle(bundles["digits"])
    for row in rows:
        i = int(row[0])
        seed = trained.streams.seed("deploy", purpose="certify", index=i)
        request = Sampling("smooth", n, seed, sigma, alpha=alpha, n0=n0)
        out = predictor.predict(trained.prepared.test.x[i : i + 1], request)
        assert int(row[2]) == int(out["predicted"][0])
        assert abs(float(row[3]) - float(out["radius"][0])) <= 5e-4 + 1e-6  # TSV: 3 decimals
