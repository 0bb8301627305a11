"""The model server, driven the way users drive it: tritonclient (KServe V2), httpx on the
TensorFlow Serving API, concurrent clients for batching, replay, canary and experiments."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from conftest import run_cli
from randkit.deploy.bundle import load_bundle
from randkit.streams import Streams
from serve_support import running_server, v2_body

RANDOM_MODES = [
    {"mode": "mc_dropout", "samples": 8},
    {"mode": "tta", "samples": 8},
    {"mode": "weight_noise", "samples": 4, "sigma": 0.05},
    {"mode": "smooth", "samples": 64, "n0": 16, "sigma": 0.25},
    {"mode": "none"},
]


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return Streams(seed).numpy("noise", test=n).random((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def server(serve_repository: Path):
    # A long batching window, so that concurrent requests really share forward passes.
    with running_server(serve_repository, max_batch=4096, max_delay_ms=30) as srv:
        yield srv


def _outputs(body: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: (o["shape"], o["data"]) for o in body["outputs"]}


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- KServe V2 with Triton's own client --------------------------------------------------------


def test_tritonclient_talks_to_the_server(server, serve_repository: Path):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "2")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["versions"] == ["1", "2"]

    x = _inputs(5)
    data = triton.InferInput("input", list(x.shape), "FP32")
    data.set_data_from_numpy(x, binary_data=False)
    wanted = [
        triton.InferRequestedOutput(name, binary_data=False)
        for name in ("probabilities", "predicted", "class")
    ]
    result = client.infer("digits", [data], model_version="1", outputs=wanted)
    probs = result.as_numpy("probabilities")
    bundle = load_bundle(serve_repository / "digits" / "1")
    with torch.no_grad():
        expected = torch.softmax(bundle.models[0](torch.from_numpy(x)), -1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert result.as_numpy("predicted").tolist() == expected.argmax(1).tolist()
    assert [str(c) for c in result.as_numpy("class")] == [
        bundle.classes[i] for i in expected.argmax(1)
    ]
    response = result.get_response()
    assert response["model_version"] == "1" and response["parameters"]["routed"] is False
    assert result.as_numpy("entropy") is None  # only the outputs asked for


def test_tritonclient_randomized_inference_replays_from_the_response_seed(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x = _inputs(2, seed=1)
    data = triton.InferInput("input", list(x.shape), "FP32")
    data.set_data_from_numpy(x, binary_data=False)
    out = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    first = client.infer(
        "digits", [data], "1", outputs=out, parameters={"mode": "mc_dropout", "samples": 16}
    )
    seed = first.get_response()["parameters"]["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = client.infer(
        "digits",
        [data],
        "1",
        outputs=out,
        parameters={"mode": "mc_dropout", "samples": 16, "seed": seed},
    )
    np.testing.assert_array_equal(first.as_numpy("probabilities"), again.as_numpy("probabilities"))
    other = client.infer(
        "digits",
        [data],
        "1",
        outputs=out,
        parameters={"mode": "mc_dropout", "samples": 16, "seed": seed + 1},
    )
    assert not np.array_equal(first.as_numpy("probabilities"), other.as_numpy("probabilities"))


# -- randomized inference: outputs and replay under batching -----------------------------------


@pytest.mark.parametrize("params", RANDOM_MODES, ids=lambda p: p["mode"])
def test_same_seed_same_response_alone_and_batched_with_30_others(server, params):
    x = _inputs(3, seed=7)
    body = v2_body(x, seed=1234, **params)
    url = "/v2/models/digits/versions/1/infer"
    with server.client() as client:
        alone = client.post(url, json=body)
        assert alone.status_code == 200, alone.text

    async def crowd() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            others = [
                client.post(url, json=v2_body(_inputs(1 + i % 4, seed=100 + i), **params))
                for i in range(30)
            ]
            mine = client.post(url, json=body)
            return await asyncio.gather(*others[:15], mine, *others[15:])

    before = httpx.get(f"{server.url}/metrics").text
    responses = asyncio.run(crowd())
    after = httpx.get(f"{server.url}/metrics").text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:2]
    batched = responses[15].json()
    assert _outputs(batched) == _outputs(alone.json())
    assert batched["parameters"] == alone.json()["parameters"]
    # The 31 requests ran in fewer forward batches than requests: they really were batched.
    batches = _metric(after, "randkit_batch_requests_count") - _metric(
        before, "randkit_batch_requests_count"
    )
    assert 1 <= batches < 31


def test_mode_outputs_are_well_formed(server):
    x = _inputs(4, seed=3)
    with server.client() as client:
        for params in RANDOM_MODES:
            body = client.post("/v2/models/digits/versions/1/infer", json=v2_body(x, **params))
            assert body.status_code == 200, body.text
            out = _outputs(body.json())
            shape, probs = out["probabilities"]
            probs = np.asarray(probs).reshape(shape)
            assert shape == [4, 10]
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
            assert out["predicted"][0] == [4]
            if params["mode"] == "smooth":
                radius = np.asarray(out["radius"][1])
                predicted = np.asarray(out["predicted"][1])
                assert ((predicted == -1) == (radius == 0)).all()
                assert "mutual_information" not in out
            else:
                assert np.asarray(out["mutual_information"][1]).min() >= 0
                assert out["predicted"][1] == probs.argmax(1).tolist()
        ensemble = client.post("/v2/models/digits-ensemble/infer", json=v2_body(x)).json()
        assert ensemble["parameters"]["mode"] == "ensemble"
        assert np.asarray(_outputs(ensemble)["mutual_information"][1]).max() > 0


def test_smooth_certifies_larger_radii_with_more_samples(server):
    x = _inputs(8, seed=4)
    radii = []
    with server.client() as client:
        for samples in (100, 2000):
            body = v2_body(x, mode="smooth", samples=samples, n0=50, sigma=0.25, seed=5)
            response = client.post("/v2/models/digits/versions/1/infer", json=body).json()
            radii.append(np.asarray(_outputs(response)["radius"][1]))
    assert radii[1].mean() > radii[0].mean()


# -- TensorFlow Serving REST --------------------------------------------------------------------


def test_tensorflow_serving_api(server):
    x = _inputs(3, seed=9)
    with server.client() as client:
        status = client.get("/v1/models/digits").json()
        assert [s["version"] for s in status["model_version_status"]] == ["1", "2"]
        assert all(s["state"] == "AVAILABLE" for s in status["model_version_status"])
        label = client.get("/v1/models/digits/labels/canary").json()
        assert [s["version"] for s in label["model_version_status"]] == ["2"]
        meta = client.get("/v1/models/digits/versions/2/metadata").json()
        assert meta["model_spec"] == {"name": "digits", "signature_name": "", "version": "2"}
        signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert [d["size"] for d in signature["inputs"]["input"]["tensor_shape"]["dim"]] == [
            "-1",
            "1",
            "8",
            "8",
        ]

        rows = client.post(
            "/v1/models/digits/labels/stable:predict", json={"instances": x.tolist()}
        )
        columns = client.post("/v1/models/digits/versions/1:predict", json={"inputs": x.tolist()})
        named = client.post(
            "/v1/models/digits/versions/1:predict",
            json={"instances": [{"input": row} for row in x.tolist()]},
        )
        v2 = client.post("/v2/models/digits/versions/1/infer", json=v2_body(x)).json()
    assert rows.status_code == columns.status_code == named.status_code == 200
    predictions = rows.json()["predictions"]
    assert len(predictions) == 3 and rows.json()["model_version"] == "1"
    probs = np.asarray(_outputs(v2)["probabilities"][1]).reshape(3, 10)
    np.testing.assert_array_equal(np.asarray([p["probabilities"] for p in predictions]), probs)
    assert columns.json()["outputs"]["probabilities"] == probs.tolist()
    assert named.json()["predictions"] == predictions
    assert predictions[0]["class"] == str(predictions[0]["predicted"])


def test_tensorflow_serving_takes_randkit_parameters(server):
    x = _inputs(2, seed=10)
    body = {"instances": x.tolist(), "parameters": {"mode": "tta", "samples": 8, "seed": 3}}
    with server.client() as client:
        first = client.post("/v1/models/digits/versions/1:predict", json=body).json()
        again = client.post("/v1/models/digits/versions/1:predict", json=body).json()
        v2 = client.post(
            "/v2/models/digits/versions/1/infer", json=v2_body(x, mode="tta", samples=8, seed=3)
        ).json()
    assert first["predictions"] == again["predictions"]
    assert first["parameters"]["mode"] == "tta" and first["parameters"]["seed"] == 3
    probs = [p["probabilities"] for p in first["predictions"]]
    assert np.asarray(probs).reshape(-1).tolist() == _outputs(v2)["probabilities"][1]


# -- traffic split, sticky keys, feedback and the experiment -------------------------------------


async def _many(url: str, count: int, path: str, body: dict, headers=None) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        limit = asyncio.Semaphore(32)

        async def one(i: int) -> dict:
            async with limit:
                response = await client.post(
                    path, json=body, headers=headers(i) if headers else None
                )
                assert response.status_code == 200, response.text
                return response.json()

        return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.slow
def test_canary_weights_90_10_over_10000_requests(server):
    body = v2_body(_inputs(1, seed=11))
    answers = asyncio.run(_many(server.url, 10_000, "/v2/models/digits/infer", body))
    canary = sum(a["model_version"] == "2" for a in answers)
    assert all(a["parameters"]["routed"] for a in answers)
    # Binomial(10000, 0.1): sd 30; four sd either side.
    assert abs(canary - 1000) <= 120, canary
    labels = {a["model_version"]: a["parameters"]["labels"] for a in answers}
    assert labels == {"1": "stable", "2": "canary"}


def test_sticky_keys_always_land_on_the_same_version(serve_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(serve_repository, repo)
    policy = repo / "digits" / "policy.yaml"
    policy.write_text(
        policy.read_text().replace("weights: {stable: 90, canary: 10}", "")
        + ("weights: {stable: 50, canary: 50}\nsticky: true\n")
    )
    body = v2_body(_inputs(1, seed=12))
    with running_server(repo) as srv:
        answers = asyncio.run(
            _many(
                srv.url,
                400,
                "/v2/models/digits/infer",
                body,
                headers=lambda i: {"X-Request-Key": f"user-{i % 80}"},
            )
        )
    by_key: dict[str, set[str]] = {}
    for i, answer in enumerate(answers):
        by_key.setdefault(f"user-{i % 80}", set()).add(answer["model_version"])
    assert all(len(v) == 1 for v in by_key.values())
    canary_users = sum(v == {"2"} for v in by_key.values())
    assert 20 <= canary_users <= 60  # Binomial(80, 0.5): about 3.6 sd either side


def _experiment(url: str, accuracy: dict[str, float]) -> dict[str, Any]:
    """1,200 routed requests, then feedback whose correctness is planted per version: the
    k-th answer of a version is right when floor((k + 1) * accuracy) moves, so each version
    scores its accuracy to within one answer whatever the concurrent routing gave it (random
    draws in answer order made the equal-accuracy case a 5% coin flip)."""
    body = v2_body(_inputs(1, seed=13))
    answers = asyncio.run(_many(url, 1200, "/v2/models/digits/infer", body))
    seen: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for answer in answers:
            predicted = _outputs(answer)["predicted"][1][0]
            version = answer["model_version"]
            k = seen[version] = seen.get(version, -1) + 1
            right = math.floor((k + 1) * accuracy[version]) > math.floor(k * accuracy[version])
            label = predicted if right else (predicted + 1) % 10
            response = client.post(
                "/v2/models/digits/feedback", json={"id": answer["id"], "label": label}
            )
            assert response.status_code == 200, response.text
            assert response.json()["correct"] is bool(right)
        again = client.post("/v2/models/digits/feedback", json={"id": answers[0]["id"], "label": 0})
        assert again.status_code == 409
        return client.get("/v2/models/digits/experiment").json()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accuracy", "verdict"),
    [({"1": 0.80, "2": 0.90}, "promote"), ({"1": 0.85, "2": 0.85}, "keep")],
    ids=["planted-difference", "no-difference"],
)
def test_experiment_detects_a_planted_difference_and_only_that(
    serve_repository: Path, tmp_path: Path, accuracy: dict[str, float], verdict: str
):
    repo = tmp_path / "repo"
    shutil.copytree(serve_repository, repo)
    (repo / "digits" / "policy.yaml").write_text(
        "labels: {stable: '1', canary: '2'}\nweights: {stable: 50, canary: 50}\n"
        "baseline: stable\nmin_samples: 200\n"
    )
    with running_server(repo) as srv:
        report = _experiment(srv.url, accuracy)
    versions = {v["version"]: v for v in report["versions"]}
    assert versions["1"]["labelled"] + versions["2"]["labelled"] == 1200
    for version, truth in accuracy.items():
        low, high = versions[version]["ci95"]
        assert low <= truth <= high
    (comparison,) = report["comparisons"]
    assert comparison["baseline"] == "1" and comparison["candidate"] == "2"
    assert comparison["recommendation"] == verdict
    # The default, anytime-valid test: its p-value and its lower confidence bound agree.
    assert comparison["test"] == "sequential" and "warning" not in comparison
    assert (comparison["p_value"] < 0.05) is (verdict == "promote")
    assert (comparison["ci"][0] > 0) is (verdict == "promote")


def test_experiment_says_not_enough_data_at_first(server):
    with server.client() as client:
        report = client.get("/v2/models/digits-ensemble/experiment").json()
        assert report["comparisons"] == [] or all(
            c["recommendation"] == "not enough data yet" for c in report["comparisons"]
        )
        answer = client.post("/v2/models/digits/infer", json=v2_body(_inputs(2))).json()
        ids = [f"{answer['id']}/0", f"{answer['id']}/1"]
        for i in ids:
            assert (
                client.post("/v2/models/digits/feedback", json={"id": i, "label": "3"}).json()[
                    "label"
                ]
                == 3
            )
        report = client.get("/v2/models/digits/experiment").json()
    assert all(c["recommendation"] == "not enough data yet" for c in report["comparisons"])


# -- repository, metrics, shutdown, CLI ---------------------------------------------------------


def test_load_and_unload_at_run_time(serve_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(serve_repository, repo)
    body = v2_body(_inputs(1))
    with running_server(repo) as srv, srv.client() as client:
        assert client.post("/v2/repository/models/digits/unload").status_code == 200
        assert client.post("/v2/models/digits/infer", json=body).status_code == 404
        assert client.get("/v2/models/digits/ready").status_code == 404
        index = {
            (e["name"], e["version"]): e["state"]
            for e in client.post("/v2/repository/index").json()
        }
        assert (
            index[("digits", "1")] == "UNAVAILABLE" and index[("digits-ensemble", "1")] == "READY"
        )
        # A new policy on disk takes effect at the next load: everything to the canary.
        (repo / "digits" / "policy.yaml").write_text(
            "labels: {stable: '1', canary: '2'}\nweights: {canary: 1}\n"
        )
        assert client.post("/v2/repository/models/digits/load").json()["versions"] == ["1", "2"]
        versions = {
            client.post("/v2/models/digits/infer", json=body).json()["model_version"]
            for _ in range(20)
        }
        assert versions == {"2"}
        (repo / "digits" / "policy.yaml").write_text("weights: {stable: 1}\n")
        refused = client.post("/v2/repository/models/digits/load")
        assert refused.status_code == 400 and "weights" in refused.json()["error"]
        assert client.post("/v2/models/digits/infer", json=body).status_code == 200  # old policy
        assert client.post("/v2/repository/models/..%2F..%2Fetc/load").status_code == 404


def test_metrics_count_requests_batches_and_latency(server):
    with server.client() as client:
        client.post("/v2/models/digits/versions/2/infer", json=v2_body(_inputs(1)))
        client.post("/v2/models/digits/versions/2/infer", json={"inputs": []})
        text = client.get("/metrics").text
    assert _metric(text, "randkit_requests_total", model="digits", version="2", status="200") >= 1
    assert _metric(text, "randkit_requests_total", model="digits", status="400") >= 1
    assert _metric(text, "randkit_request_latency_seconds_count", model="digits") >= 1
    assert _metric(text, "randkit_batch_rows_count") >= 1
    assert _metric(text, "randkit_queue_seconds_count") >= 1
    assert re.search(r"^randkit_requests_in_flight 1\.0$", text, re.M)  # this scrape itself


def test_graceful_shutdown_finishes_requests_in_flight(serve_repository: Path):
    body = v2_body(_inputs(4), mode="smooth", samples=3000, n0=100, sigma=0.25, seed=1)

    async def scenario(srv) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            tasks = [
                asyncio.create_task(client.post("/v2/models/digits/versions/1/infer", json=body))
                for _ in range(6)
            ]
            await asyncio.sleep(0.3)  # the requests are in flight
            srv.server.should_exit = True
            return await asyncio.gather(*tasks)

    with running_server(serve_repository) as srv:
        responses = asyncio.run(scenario(srv))
        srv.thread.join(timeout=120)
        assert not srv.thread.is_alive()
    assert [r.status_code for r in responses] == [200] * 6
    assert len({r.text.split('"id"')[0] for r in responses}) == 1


def test_serve_cli_refuses_bad_settings(tmp_path: Path):
    cases = [
        ([str(tmp_path / "missing")], "repository"),
        ([str(tmp_path), "--max-batch", "0"], "--max-batch"),
        ([str(tmp_path), "--token", "short"], "--token"),
        ([str(tmp_path), "--port", "70000"], "--port"),
        ([str(tmp_path), "--threads", "0"], "--threads"),
        ([str(tmp_path), "--device", "tpu"], "device"),
    ]
    for args, field in cases:
        result = run_cli("serve", *args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0], result.stderr


def test_serving_leaves_the_global_rngs_alone(server):
    from randkit import global_rng_guard

    with global_rng_guard(), server.client() as client:
        for params in RANDOM_MODES:
            body = v2_body(_inputs(2), **params)
            assert client.post("/v2/models/digits/infer", json=body).status_code == 200
        assert client.post("/v2/models/digits-ensemble/infer", json=v2_body(_inputs(2))).is_success


def test_a_request_bigger_than_a_batch_runs_alone_in_fixed_chunks_and_replays(server):
    # 3 inputs x 2,000 samples = 6,000 rows: more than one forward pass (4,096 rows) holds.
    big = v2_body(_inputs(3, seed=30), mode="mc_dropout", samples=2000, seed=8)
    small = v2_body(_inputs(1, seed=31), mode="mc_dropout", samples=8)
    url = "/v2/models/digits/versions/1/infer"

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(
                client.post(url, json=small),
                client.post(url, json=big),
                client.post(url, json=small),
            )

    with server.client() as client:
        alone = client.post(url, json=big)
        # 7 x 10,000 = 70,000 rows: more than one request may ask for (65,536).
        huge = v2_body(_inputs(7), mode="mc_dropout", samples=10_000, seed=1)
        too_big = client.post(url, json=huge)
    crowd = asyncio.run(together())
    assert alone.status_code == 200 and [r.status_code for r in crowd] == [200] * 3
    assert _outputs(crowd[1].json()) == _outputs(alone.json())
    assert too_big.status_code == 400 and "samples" in too_big.json()["error"]
