"""The binary tensor extension over HTTP, driven by tritonclient with its defaults (binary
inputs, and binary outputs when none are named), against the same requests in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from randkit.deploy.bundle import load_bundle
from randkit.streams import Streams
from serve_support import running_server, v2_body


@pytest.fixture(scope="module")
def server(serve_repository: Path):
    with running_server(serve_repository) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return Streams(seed).numpy("noise", test=n).random((n, 1, 8, 8)).astype(np.float32)


def _json_outputs(server, x: np.ndarray, version: str, **parameters) -> dict[str, np.ndarray]:
    with server.client() as http:
        response = http.post(
            f"/v2/models/digits/versions/{version}/infer", json=v2_body(x, **parameters)
        )
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def test_tritonclient_with_its_defaults_gets_every_output_in_binary(
    server, client, serve_repository
):
    x = _images(6)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True by default
    result = client.infer("digits", [tensor], model_version="1")  # no outputs: all, binary
    response = result.get_response()
    assert {o["name"] for o in response["outputs"]} == {
        "probabilities",
        "predicted",
        "class",
        "entropy",
        "mutual_information",
    }
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    bundle = load_bundle(serve_repository / "digits" / "1")
    with torch.no_grad():
        expected = torch.softmax(bundle.models[0](torch.from_numpy(x)), -1).numpy()
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    assert result.as_numpy("predicted").tolist() == expected.argmax(1).tolist()
    names = [c.decode() for c in result.as_numpy("class").tolist()]
    assert names == [bundle.classes[i] for i in expected.argmax(1)]
    assert result.as_numpy("entropy").dtype == np.float32 and result.as_numpy("entropy").shape == (
        6,
    )


def test_binary_and_json_give_the_same_numbers_for_a_seeded_random_mode(server, client):
    x = _images(3, seed=4)
    parameters = {"mode": "mc_dropout", "samples": 16, "seed": 1234}
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    binary = client.infer("digits", [tensor], model_version="2", parameters=parameters)
    plain = _json_outputs(server, x, "2", **parameters)
    # JSON carries float32 values as decimal text that reads back to the same float32.
    np.testing.assert_array_equal(
        binary.as_numpy("probabilities"), plain["probabilities"].astype(np.float32)
    )
    np.testing.assert_array_equal(binary.as_numpy("predicted"), plain["predicted"])
    assert binary.get_response()["parameters"]["seed"] == 1234


@pytest.mark.parametrize("input_binary,output_binary", [(True, False), (False, True)])
def test_binary_input_with_json_outputs_and_the_reverse(client, input_binary, output_binary):
    x = _images(2, seed=2)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=input_binary)
    wanted = [triton.InferRequestedOutput("predicted", binary_data=output_binary)]
    result = client.infer("digits", [tensor], model_version="1", outputs=wanted)
    output = result.get_response()["outputs"][0]
    assert ("data" in output) is not output_binary
    assert result.as_numpy("predicted").shape == (2,)
    assert result.as_numpy("probabilities") is None


def test_float64_binary_input_is_taken_like_json_float64(server, client):
    x = _images(2, seed=3).astype(np.float64)
    tensor = triton.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], model_version="1")
    plain = _json_outputs(server, x.astype(np.float32), "1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), plain["probabilities"], atol=1e-6)


def test_a_raw_binary_request_by_hand_matches_the_documented_framing(server):
    """What a client without tritonclient writes: the JSON header, then the raw floats."""
    x = _images(1, seed=5)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = httpx.post(
        f"{server.url}/v2/models/digits/versions/1/infer",
        content=header + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    meta = json.loads(response.content[:length])
    (output,) = meta["outputs"]
    assert output["parameters"]["binary_data_size"] == 10 * 4
    probabilities = np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(
        probabilities, _json_outputs(server, x, "1")["probabilities"], atol=1e-6
    )


def test_refused_binary_bodies_are_counted_and_the_server_keeps_serving(server, client):
    def refused() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("randkit_refused_requests_total{") and 'reason="parse"' in line
        )

    before = refused()
    header = b'{"inputs": [{"name": "input"'  # cut short: not JSON
    response = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        content=header + bytes(256),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "\n" not in response.json()["error"] and "JSON" in response.json()["error"]
    assert refused() == before + 1
    x = _images(1)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer("digits", [tensor]).as_numpy("predicted").shape == (1,)
